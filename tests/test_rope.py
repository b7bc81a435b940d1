"""Tests of dsv4.rope against spec §3."""

import math

import ml_dtypes
import numpy as np
import pytest

from dsv4 import rope as R
from dsv4.config import DEMO, FLASH, PRO
from dsv4.rope import gather_rope_rows, inv_freq, precompute_freqs_cos_sin, rope_profile, rope_tables

BF16 = np.dtype(ml_dtypes.bfloat16)

# §3.2 reference inv_freq values (fp32 printed to 9 significant digits).
INV_SWA = [
    1, 0.749894202, 0.562341332, 0.421696514, 0.316227764, 0.237137362, 0.177827939, 0.133352146,
    0.100000001, 0.0749894157, 0.0562341288, 0.0421696492, 0.0316227786, 0.0237137359, 0.0177827943,
    0.0133352149, 0.00999999978, 0.00749894232, 0.00562341325, 0.00421696482, 0.00316227786,
    0.00237137382, 0.00177827943, 0.00133352145, 0.00100000005, 0.000749894185, 0.000562341302,
    0.000421696488, 0.000316227786, 0.000237137385, 0.00017782794, 0.00013335215,
]
INV_COMPRESSED = [
    1, 0.687656045, 0.472870797, 0.325172454, 0.223606795, 0.153764561, 0.10573712, 0.0727107748,
    0.0500000007, 0.0343828015, 0.0236435402, 0.0162586235, 0.0111803403, 0.00768822804,
    0.00528685655, 0.00363553851, 0.00226562493, 0.00139680132, 0.000849689706, 0.000508081983,
    0.000296977785, 0.000168179977, 9.08678412e-05, 4.54442306e-05, 1.95312532e-05, 5.37231244e-06,
    3.69430336e-06, 2.5404097e-06, 1.74692821e-06, 1.20128561e-06, 8.260713e-07, 5.6805294e-07,
]

COS_COLS = [0, 1, 15, 16, 31, 32, 33]
SIN_COLS = [0, 1, 15, 16, 31, 32]

# §3.2 spot values of the FLASH bf16 tables: (profile, pos, cos values, sin values).
SPOT_VALUES = [
    ("swa", 0, [1.0] * 7, [0.0] * 6),
    ("swa", 1,
     [0.5390625, 0.73046875, 1.0, 1.0, 1.0, 0.5390625, 0.73046875],
     [0.83984375, 0.6796875, 0.0133056640625, 0.010009765625, 0.000133514404296875, 0.83984375]),
    ("swa", 8192,
     [0.29296875, -0.248046875, -0.7578125, 0.97265625, 0.4609375, 0.29296875, -0.248046875],
     [-0.95703125, -0.96875, 0.65625, 0.236328125, 0.88671875, -0.95703125]),
    ("swa", 16383,
     [-0.91796875, -0.3125, 0.1298828125, 0.89453125, -0.57421875, -0.91796875, -0.3125],
     [0.39453125, 0.94921875, -0.9921875, 0.451171875, 0.81640625, 0.39453125]),
    ("compressed", 1,
     [0.5390625, 0.7734375, 1.0, 1.0, 1.0, 0.5390625, 0.7734375],
     [0.83984375, 0.6328125, 0.003631591796875, 0.00225830078125, 5.662441253662109e-07, 0.83984375]),
    ("compressed", 8192,
     [0.29296875, -0.921875, -0.06298828125, 0.95703125, 1.0, 0.29296875, -0.921875],
     [-0.95703125, -0.392578125, -0.99609375, -0.28515625, 0.004638671875, -0.95703125]),
    ("compressed", 16383,
     [-0.91796875, 0.9921875, -0.9921875, 0.8359375, 1.0, -0.91796875, 0.9921875],
     [0.39453125, 0.11767578125, 0.12890625, -0.55078125, 0.00927734375, 0.39453125]),
]


@pytest.fixture(scope="module")
def flash_tables():
    """FLASH [16384, 64] bf16 tables of both profiles, built once."""
    return {"swa": rope_tables(FLASH, 0), "compressed": rope_tables(FLASH, 4)}


def _flash_inv(compress_ratio):
    base, original = rope_profile(FLASH, compress_ratio)
    return inv_freq(64, original, base, FLASH.rope_factor, FLASH.beta_fast, FLASH.beta_slow)


# ---- profiles (§3.1) ----


@pytest.mark.parametrize(
    "config, ratio, expected",
    [
        (FLASH, 0, (10000.0, 0)),
        (FLASH, 4, (160000.0, 65536)),
        (FLASH, 128, (160000.0, 65536)),
        (PRO, 0, (10000.0, 0)),
        (PRO, 128, (160000.0, 65536)),
        (DEMO, 0, (10000.0, 0)),
        (DEMO, 4, (40000.0, 0)),
        (None, 4, (160000.0, 65536)),
        ("demo", 128, (40000.0, 0)),
    ],
)
def test_rope_profile(config, ratio, expected):
    base, original = rope_profile(config, ratio)
    assert (base, original) == expected
    assert isinstance(base, float) and isinstance(original, int)


def test_rope_profile_rejects_bad_config():
    with pytest.raises(TypeError):
        rope_profile(1.5, 0)
    with pytest.raises(ValueError):
        rope_profile("huge", 0)


# ---- inv_freq (§3.2 steps 1-4) ----


@pytest.mark.parametrize("ratio, reference", [(0, INV_SWA), (4, INV_COMPRESSED)], ids=["swa", "compressed"])
def test_inv_freq_reference_values(ratio, reference):
    got = _flash_inv(ratio)
    assert got.dtype == np.float32 and got.shape == (32,)
    wrong = [(i, f"{float(g):.9g}", ref) for i, (g, ref) in enumerate(zip(got, reference)) if g != np.float32(ref)]
    assert wrong == []


def test_pro_shares_flash_inv_freq():
    for ratio in (0, 128):
        base, original = rope_profile(PRO, ratio)
        assert np.array_equal(inv_freq(64, original, base, PRO.rope_factor, 32, 1), _flash_inv(ratio))


def test_yarn_correction_range_flash():
    assert R._correction_dim(32, 64, 160000.0, 65536) == pytest.approx(15.453295264960229, rel=1e-15)
    assert R._correction_dim(1, 64, 160000.0, 65536) == pytest.approx(24.708423791350597, rel=1e-15)
    assert R._correction_range(64, 160000.0, 65536, 32, 1) == (15, 25)


def test_yarn_ramp_structure():
    plain = inv_freq(64, 0, 160000.0, 16.0, 32, 1)
    yarn = _flash_inv(4)
    # pairs 0..15 keep the plain frequency, pairs 25..31 are divided by 16
    assert np.array_equal(yarn[:16], plain[:16])
    assert np.array_equal(yarn[25:], plain[25:] / np.float32(16.0))
    # blended pairs lie strictly between the two
    assert np.all(yarn[16:25] < plain[16:25])
    assert np.all(yarn[16:25] > plain[16:25] / np.float32(16.0))


def test_yarn_low_equals_high_branch():
    # original_seq_len = 6 with base 10000 gives low = high = 0, so the ramp
    # width becomes 0.001: pair 0 keeps its frequency, all others are /factor.
    assert R._correction_range(64, 10000.0, 6, 32, 1) == (0, 0)
    plain = inv_freq(64, 0, 10000.0, 16.0, 32, 1)
    got = inv_freq(64, 6, 10000.0, 16.0, 32, 1)
    assert np.all(np.isfinite(got))
    assert got[0] == plain[0]
    assert np.array_equal(got[1:], plain[1:] / np.float32(16.0))


def test_demo_compressed_profile_has_no_yarn():
    base, original = rope_profile(DEMO, 4)
    assert original == 0
    demo = inv_freq(64, original, base, DEMO.rope_factor, DEMO.beta_fast, DEMO.beta_slow)
    # identical to the plain base-40000 frequencies, whatever the factor
    assert np.array_equal(demo, inv_freq(64, 0, 40000.0, 1.0, 32, 1))
    expected = [np.float32(1.0 / np.float32(40000.0 ** (i / 32))) for i in range(32)]
    assert np.array_equal(demo, np.array(expected, dtype=np.float32))
    # had YaRN been applied, the low-frequency pairs would differ
    assert not np.array_equal(demo, inv_freq(64, 65536, 40000.0, DEMO.rope_factor, 32, 1))
    cos, sin = rope_tables(DEMO, 4, max_seq_len=256)
    ref_cos, ref_sin = precompute_freqs_cos_sin(64, 256, 0, 40000.0, 1.0, 32, 1)
    assert np.array_equal(cos, ref_cos) and np.array_equal(sin, ref_sin)


# ---- FLASH tables (§3.2 spot values) ----


@pytest.mark.parametrize("profile", ["swa", "compressed"])
def test_flash_table_shape_and_dtype(flash_tables, profile):
    cos, sin = flash_tables[profile]
    assert cos.shape == sin.shape == (16384, 64)
    assert cos.dtype == sin.dtype == BF16


@pytest.mark.parametrize("profile, pos, cos_vals, sin_vals", SPOT_VALUES, ids=lambda v: str(v))
def test_flash_spot_values(flash_tables, profile, pos, cos_vals, sin_vals):
    cos, sin = flash_tables[profile]
    assert [float(v) for v in cos[pos, COS_COLS]] == cos_vals
    assert [float(v) for v in sin[pos, SIN_COLS]] == sin_vals


@pytest.mark.parametrize("profile", ["swa", "compressed"])
def test_flash_rows_follow_scalar_recipe(flash_tables, profile):
    # §3.2 recipe evaluated one element at a time: fp32 angle product, cos/sin
    # in double, fp32 rounding, then bf16. Large positions are where an angle
    # kept in double instead of fp32 would change the table.
    inv = _flash_inv(0 if profile == "swa" else 4)
    cos, sin = flash_tables[profile]
    for pos in (3, 777, 8191, 12345, 16383):
        for i in range(32):
            angle = float(np.float32(pos) * inv[i])
            assert cos[pos, i] == np.float32(math.cos(angle)).astype(BF16), (pos, i)
            assert sin[pos, i] == np.float32(math.sin(angle)).astype(BF16), (pos, i)


@pytest.mark.parametrize("profile", ["swa", "compressed"])
def test_columns_are_duplicated(flash_tables, profile):
    for table in flash_tables[profile]:
        assert np.array_equal(table[:, 32:], table[:, :32])


@pytest.mark.parametrize("profile", ["swa", "compressed"])
def test_table_is_bf16_of_fp32_table(flash_tables, profile):
    # bf16 output must be the RNE rounding of the fp32 table (no other path)
    ratio = 0 if profile == "swa" else 4
    cos32, sin32 = rope_tables(FLASH, ratio, max_seq_len=2048, dtype="fp32")
    cos, sin = flash_tables[profile]
    assert cos32.dtype == np.float32
    assert np.array_equal(cos32.astype(BF16), cos[:2048])
    assert np.array_equal(sin32.astype(BF16), sin[:2048])


# ---- independent float64 check ----


@pytest.mark.parametrize("original_seq_len, base", [(0, 10000.0), (65536, 160000.0), (0, 40000.0)])
def test_tables_agree_with_float64(original_seq_len, base):
    dim, seqlen = 64, 512
    inv = inv_freq(dim, original_seq_len, base, 16.0, 32, 1).astype(np.float64)
    angle = np.arange(seqlen, dtype=np.float64)[:, None] * inv[None, :]
    ref_cos, ref_sin = np.cos(angle), np.sin(angle)
    # The fp32 angle product may differ from the exact one by half an fp32 ulp.
    slack = angle * 2.0**-24 + 1e-30

    cos, sin = precompute_freqs_cos_sin(dim, seqlen, original_seq_len, base, 16.0, 32, 1)
    for table, ref in ((cos, ref_cos), (sin, ref_sin)):
        got = table[:, : dim // 2].astype(np.float64)
        # bf16 rounding: at most half a bf16 ulp, i.e. 2^-8 relative
        assert np.all(np.abs(got - ref) <= np.abs(ref) * 2.0**-8 + slack)
        assert np.array_equal(table[:, dim // 2 :], table[:, : dim // 2])

    cos32, sin32 = precompute_freqs_cos_sin(dim, seqlen, original_seq_len, base, 16.0, 32, 1, dtype="fp32")
    for table, ref in ((cos32, ref_cos), (sin32, ref_sin)):
        got = table[:, : dim // 2].astype(np.float64)
        assert np.all(np.abs(got - ref) <= np.abs(ref) * 2.0**-24 + slack)


def test_small_dim_table():
    cos, sin = precompute_freqs_cos_sin(2, 3, 0, 10000.0, 1.0, 32, 1, dtype="fp32")
    # one pair with inv_freq 1: angle = position
    expected_cos = np.float32([math.cos(0), math.cos(1), math.cos(2)])
    expected_sin = np.float32([math.sin(0), math.sin(1), math.sin(2)])
    assert np.array_equal(cos, np.stack([expected_cos, expected_cos], axis=1))
    assert np.array_equal(sin, np.stack([expected_sin, expected_sin], axis=1))


# ---- dtype handling and validation ----


@pytest.mark.parametrize(
    "dtype, expected",
    [
        ("bf16", BF16),
        ("BFloat16", BF16),
        ("torch.bfloat16", BF16),
        (ml_dtypes.bfloat16, BF16),
        ("fp32", np.float32),
        ("FLOAT32", np.float32),
        ("torch.float32", np.float32),
        (np.float32, np.float32),
        (np.dtype(np.float32), np.float32),
        ("fp16", np.float16),
        ("Float16", np.float16),
        ("torch.float16", np.float16),
        (np.float16, np.float16),
    ],
)
def test_dtype_spellings(dtype, expected):
    cos, sin = precompute_freqs_cos_sin(8, 4, 0, 10000.0, 1.0, 32, 1, dtype=dtype)
    assert cos.dtype == np.dtype(expected) and sin.dtype == np.dtype(expected)
    ref, _ = precompute_freqs_cos_sin(8, 4, 0, 10000.0, 1.0, 32, 1, dtype="fp32")
    assert np.array_equal(cos, ref.astype(expected))


def test_default_dtype_is_bf16():
    cos, sin = precompute_freqs_cos_sin(8, 4, 0, 10000.0, 1.0, 32, 1)
    assert cos.dtype == BF16 and sin.dtype == BF16


@pytest.mark.parametrize("dtype", ["int8", "float64", "bf16 ", np.int32, np.float64, None, "torch.half"])
def test_bad_dtype(dtype):
    with pytest.raises(ValueError, match="dtype") as info:
        precompute_freqs_cos_sin(8, 4, 0, 10000.0, 1.0, 32, 1, dtype=dtype)
    assert repr(dtype) in str(info.value)


@pytest.mark.parametrize("dim", [0, -2, 63, 1, 64.0, True])
def test_bad_dim(dim):
    with pytest.raises(ValueError) as info:
        precompute_freqs_cos_sin(dim, 4, 0, 10000.0, 1.0, 32, 1)
    assert "dim" in str(info.value) and repr(dim) in str(info.value)
    with pytest.raises(ValueError, match="dim"):
        inv_freq(dim, 0, 10000.0, 1.0, 32, 1)


@pytest.mark.parametrize("seqlen", [0, -1, 2.0])
def test_bad_seqlen(seqlen):
    with pytest.raises(ValueError) as info:
        precompute_freqs_cos_sin(8, seqlen, 0, 10000.0, 1.0, 32, 1)
    assert "seqlen" in str(info.value) and repr(seqlen) in str(info.value)


def test_numpy_integer_arguments_accepted():
    a = precompute_freqs_cos_sin(np.int64(8), np.int32(5), 0, 10000.0, 1.0, 32, 1)
    b = precompute_freqs_cos_sin(8, 5, 0, 10000.0, 1.0, 32, 1)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_chunked_fill_matches_single_chunk(monkeypatch):
    whole = precompute_freqs_cos_sin(64, 300, 65536, 160000.0, 16.0, 32, 1)
    monkeypatch.setattr(R, "_CHUNK_ROWS", 7)  # many partial chunks
    chunked = precompute_freqs_cos_sin(64, 300, 65536, 160000.0, 16.0, 32, 1)
    assert np.array_equal(whole[0], chunked[0]) and np.array_equal(whole[1], chunked[1])


# ---- rope_tables wrapper and its cache ----


def test_rope_tables_defaults_come_from_config():
    cos, sin = rope_tables("demo", 0)
    assert cos.shape == (DEMO.max_position_embeddings, DEMO.qk_rope_head_dim)
    cos, sin = rope_tables(FLASH, 128, max_seq_len=10, rope_dim=16, dtype="fp32")
    assert cos.shape == sin.shape == (10, 16) and cos.dtype == np.float32
    ref = precompute_freqs_cos_sin(16, 10, 65536, 160000.0, 16.0, 32, 1, dtype="fp32")
    assert np.array_equal(cos, ref[0]) and np.array_equal(sin, ref[1])


def test_rope_tables_cached_and_read_only(flash_tables):
    cos, sin = rope_tables()  # FLASH, ratio 0
    assert cos is flash_tables["swa"][0] and sin is flash_tables["swa"][1]
    assert rope_tables("Flash", 0, dtype=ml_dtypes.bfloat16)[0] is cos  # same key after normalising
    for table in (cos, sin):
        assert not table.flags.writeable
        with pytest.raises(ValueError):
            table[0, 0] = 2.0
        with pytest.raises(ValueError):
            table.setflags(write=True)
    assert float(cos[0, 0]) == 1.0
    # a copy is writable and independent
    copy = cos.copy()
    copy[0, 0] = 0.0
    assert float(rope_tables()[0][0, 0]) == 1.0


def test_rope_tables_validates():
    with pytest.raises(ValueError, match="dim"):
        rope_tables(FLASH, 0, rope_dim=3)
    with pytest.raises(ValueError, match="seqlen"):
        rope_tables(FLASH, 0, max_seq_len=0)
    with pytest.raises(ValueError, match="dtype"):
        rope_tables(FLASH, 0, dtype="int4")
    with pytest.raises(TypeError, match="config"):
        rope_tables(42)


# ---- gather_rope_rows ----


def test_gather_rope_rows(flash_tables):
    cos, sin = flash_tables["compressed"]
    positions = np.array([[8192, 0], [16383, 1]], dtype=np.int32)
    cos_rows, sin_rows = gather_rope_rows(cos, sin, positions)
    assert cos_rows.shape == sin_rows.shape == (4, 64)
    assert cos_rows.dtype == sin_rows.dtype == BF16
    for row, pos in enumerate([8192, 0, 16383, 1]):  # C-order flattening
        assert np.array_equal(cos_rows[row], cos[pos])
        assert np.array_equal(sin_rows[row], sin[pos])
    # fresh arrays, not views of the read-only cache
    assert cos_rows.flags.writeable and cos_rows.flags.c_contiguous


def test_gather_rope_rows_list_and_empty():
    cos, sin = precompute_freqs_cos_sin(8, 5, 0, 10000.0, 1.0, 32, 1, dtype="fp32")
    c, s = gather_rope_rows(cos, sin, [4, 4, 2])
    assert np.array_equal(c, cos[[4, 4, 2]]) and np.array_equal(s, sin[[4, 4, 2]])
    c, s = gather_rope_rows(cos, sin, [])
    assert c.shape == (0, 8) and c.dtype == np.float32


@pytest.mark.parametrize(
    "positions, index, value",
    [([0, 3, 5, 9], 2, 5), ([-1, 2], 0, -1), (np.array([[1, 2], [7, 8]], dtype=np.uint16), 2, 7)],
)
def test_gather_rope_rows_out_of_range(positions, index, value):
    cos, sin = precompute_freqs_cos_sin(8, 5, 0, 10000.0, 1.0, 32, 1)
    with pytest.raises(ValueError) as info:
        gather_rope_rows(cos, sin, positions)
    message = str(info.value)
    assert "position_ids" in message
    assert f"[{index}]" in message and f"= {value}" in message
    assert "length 5" in message


def test_gather_rope_rows_rejects_bad_inputs():
    cos, sin = precompute_freqs_cos_sin(8, 5, 0, 10000.0, 1.0, 32, 1)
    with pytest.raises(ValueError, match="position_ids"):
        gather_rope_rows(cos, sin, np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="shape"):
        gather_rope_rows(cos, sin[:4], [0])
