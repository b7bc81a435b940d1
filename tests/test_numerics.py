"""The numerics core (spec chapter 01 §0, §4.1), C (dsv4._C.<primitive>) and NumPy
(dsv4.golden.numerics), each checked against cases worked out independently:
hand examples from the spec, Python-integer bit manipulation, ml_dtypes, and
float64 / exact-integer references.
"""
import ml_dtypes
import numpy as np
import pytest

import dsv4
from dsv4 import _C
from dsv4.golden import numerics as gn
from conftest import PATHS

# NaN and out-of-range inputs are cast on purpose
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")

BF16 = np.dtype(ml_dtypes.bfloat16)
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
f32 = np.float32


def bits32(*u):
    """float32 array from uint32 bit patterns."""
    return np.array(u, dtype=np.uint32).view(np.float32)


def u16(a):
    return np.asarray(a).view(np.uint16)


def c_bf16(x):
    return _C.cast_bf16(x=np.ascontiguousarray(x, dtype=np.float32))["y"]


def c_bf16_haz(x):
    return _C.cast_bf16_haz(x=np.ascontiguousarray(x, dtype=np.float32))["y"]


def c_fp8(x):
    return _C.cast_fp8(x=np.ascontiguousarray(x, dtype=np.float32))["y"]


def random_bits(n, seed):
    return np.random.default_rng(seed).integers(0, 2**32, size=n, dtype=np.uint64).astype(
        np.uint32).view(np.float32)


def rne_ref_bits(x):
    """The spec's integer form of bf16 RNE (§0.1), for non-NaN fp32 x, as uint16 bits."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return (((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000) >> 16).astype(np.uint16)


@pytest.fixture
def restore_isa():
    yield
    dsv4.set_isa("auto")


@pytest.fixture(params=PATHS)
def each_isa(request):
    if request.param not in dsv4.available_isas():
        pytest.skip(f"{request.param} not available on this CPU")
    dsv4.set_isa(request.param)
    try:
        yield request.param
    finally:
        dsv4.set_isa("auto")


# =========================================================== bf16, ties to even

RNE_CASES = [
    # (input bits, expected bf16 bits, what)
    (0x3F808000, 0x3F80, "1.00390625: tie, down to even 1.0"),
    (0x3F818000, 0x3F82, "1.01171875: tie, up to even 1.015625"),
    (0xBF808000, 0xBF80, "-1.00390625 -> -1.0"),
    (0xBF818000, 0xBF82, "-1.01171875 -> -1.015625"),
    (0x3F808001, 0x3F81, "just above a tie rounds up"),
    (0x3F807FFF, 0x3F80, "just below a tie rounds down"),
    (0xBF808001, 0xBF81, "negative, just above a tie"),
    (0x3F80FFFF, 0x3F81, "just below the next code"),
    (0x40490FDB, 0x4049, "pi"),
    (0x7F7F7FFF, 0x7F7F, "largest value that stays finite"),
    (0x7F7F8000, 0x7F80, "tie at the top of the range (odd mantissa) -> +inf"),
    (0x7F7FFFFF, 0x7F80, "FLT_MAX -> +inf"),
    (0xFF7FFFFF, 0xFF80, "-FLT_MAX -> -inf"),
    (0x7F800000, 0x7F80, "+inf"),
    (0xFF800000, 0xFF80, "-inf"),
    (0x00000000, 0x0000, "+0"),
    (0x80000000, 0x8000, "-0"),
    (0x00000001, 0x0000, "smallest subnormal -> +0"),
    (0x80000001, 0x8000, "negative smallest subnormal -> -0"),
    (0x00008000, 0x0000, "subnormal tie, down to even 0"),
    (0x00018000, 0x0002, "subnormal tie, up to even"),
    (0x0000C000, 0x0001, "subnormal above a tie"),
    (0x00010000, 0x0001, "exact bf16 subnormal"),
    (0x007FFFFF, 0x0080, "largest subnormal -> smallest normal"),
    (0x807FFFFF, 0x8080, "negative largest subnormal"),
]


def test_bf16_rne_worked_example():
    x = np.array([1.00390625, 1.01171875], np.float32)
    assert x.view(np.uint32).tolist() == [0x3F808000, 0x3F818000]
    for y in (gn.bf16_rne(x), c_bf16(x)):
        assert y.dtype == BF16
        assert y.astype(np.float32).tolist() == [1.0, 1.015625]
    assert gn.round_bf16(x).tolist() == [1.0, 1.015625]


@pytest.mark.parametrize("u,expected,what", RNE_CASES, ids=[c[2] for c in RNE_CASES])
def test_bf16_rne_cases(u, expected, what):
    x = bits32(u)
    assert int(rne_ref_bits(x)[0]) == expected          # the spec's formula agrees with the table
    assert int(u16(gn.bf16_rne(x))[0]) == expected
    assert int(u16(c_bf16(x))[0]) == expected


@pytest.mark.parametrize("u", [0x7FC00000, 0x7F800001, 0x7F80FFFF, 0x7FFFFFFF, 0xFFC00000,
                               0xFF800001, 0xFFFFFFFF, 0xFFFF8000])
def test_bf16_rne_nan_stays_nan(u):
    # 0x7F800001 would become +inf and 0xFFFFFFFF would wrap to 0 under the bare integer trick
    x = bits32(u)
    for y in (gn.bf16_rne(x), c_bf16(x)):
        assert np.isnan(y.astype(np.float32)[0])


def test_bf16_rne_random_bits_c_equals_ml_dtypes():
    x = random_bits(1 << 20, seed=1)
    x = np.concatenate([x, np.random.default_rng(2).standard_normal(1 << 18).astype(np.float32)])
    c = u16(c_bf16(x))
    ref = u16(x.astype(BF16))                           # ml_dtypes
    g = u16(gn.bf16_rne(x))
    nan = np.isnan(x)
    assert nan.any() and (~nan).sum() > 10**6
    np.testing.assert_array_equal(c[~nan], ref[~nan])
    np.testing.assert_array_equal(g[~nan], ref[~nan])
    np.testing.assert_array_equal(c[~nan], rne_ref_bits(x[~nan]))
    assert np.isnan(c_bf16(x[nan]).astype(np.float32)).all()
    assert np.isnan(gn.bf16_rne(x[nan]).astype(np.float32)).all()


# ================================================== bf16, ties away from zero

def haz_ref_python(xs):
    """§0.1 on Python ints: s' = (s + 0x8000) & -0x10000 on the signed int32 view."""
    out = []
    for u in np.asarray(xs, np.float32).view(np.uint32).tolist():
        s = u - (1 << 32) if u >= 1 << 31 else u
        r = (s + 0x8000) & -0x10000
        out.append((r & 0xFFFFFFFF) >> 16)
    return np.array(out, dtype=np.uint16)


def test_bf16_haz_worked_examples():
    x = np.array([1.00390625, -1.00390625, 1.01171875, -1.01171875], np.float32)
    exp = [1.0078125, -1.0078125, 1.015625, -1.015625]
    for y in (gn.bf16_haz(x), c_bf16_haz(x)):
        assert y.dtype == BF16
        assert y.astype(np.float32).tolist() == exp
    assert haz_ref_python(x).tolist() == u16(np.array(exp, np.float32).astype(BF16)).tolist()


@pytest.mark.parametrize("u,expected", [
    (0x3F808000, 0x3F81), (0xBF808000, 0xBF81),          # ties go away from zero
    (0x3F807FFF, 0x3F80), (0x3F808001, 0x3F81),
    (0x00008000, 0x0001), (0x80008000, 0x8001),          # subnormal ties too
    (0x00007FFF, 0x0000),
    (0x7F7F8000, 0x7F80), (0xFF7F8000, 0xFF80),          # to +-inf
    (0x7F7F7FFF, 0x7F7F),
    (0x7F800000, 0x7F80), (0xFF800000, 0xFF80), (0x80000000, 0x8000),
])
def test_bf16_haz_cases(u, expected):
    x = bits32(u)
    assert int(haz_ref_python(x)[0]) == expected
    assert int(u16(gn.bf16_haz(x))[0]) == expected
    assert int(u16(c_bf16_haz(x))[0]) == expected


@pytest.mark.parametrize("u", [0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0xFF800001, 0xFFFFFFFF])
def test_bf16_haz_nan_stays_nan(u):
    x = bits32(u)
    for y in (gn.bf16_haz(x), c_bf16_haz(x)):
        assert np.isnan(y.astype(np.float32)[0])


def test_bf16_haz_random_bits():
    x = random_bits(1 << 20, seed=3)
    nan = np.isnan(x)
    c, g = u16(c_bf16_haz(x)), u16(gn.bf16_haz(x))
    np.testing.assert_array_equal(c[~nan], g[~nan])
    assert np.isnan(c_bf16_haz(x[nan]).astype(np.float32)).all()
    assert np.isnan(gn.bf16_haz(x[nan]).astype(np.float32)).all()
    # Python-integer reference on a sample, with exact ties mixed in
    rng = np.random.default_rng(4)
    s = x[~nan][:20000]
    ties = (rng.integers(0, 2**32, 5000, dtype=np.uint64).astype(np.uint32) & np.uint32(0xFFFF0000)) \
        | np.uint32(0x8000)
    ties = ties.view(np.float32)
    s = np.concatenate([s, ties[~np.isnan(ties)]])
    ref = haz_ref_python(s)
    np.testing.assert_array_equal(u16(c_bf16_haz(s)), ref)
    np.testing.assert_array_equal(u16(gn.bf16_haz(s)), ref)
    # and haz differs from RNE on exactly the ties whose truncated mantissa is even
    t = ties[~np.isnan(ties)]
    tu = t.view(np.uint32)
    even = ((tu >> 16) & 1) == 0
    finite_res = np.abs(t) < np.float32(3.3e38)
    differ = u16(c_bf16_haz(t)) != u16(c_bf16(t))
    np.testing.assert_array_equal(differ[finite_res], even[finite_res])


# ================================================================ fp8 e4m3fn

def fp8_decode_ref(code):
    """Independent e4m3fn decoding: bias 7, 3 mantissa bits, S.1111.111 is NaN, no inf."""
    s, e, m = code >> 7, (code >> 3) & 15, code & 7
    if e == 15 and m == 7:
        return float("nan")
    v = m * 2.0**-9 if e == 0 else (1 + m / 8) * 2.0**(e - 7)
    return -v if s else v


ALL_CODES = np.arange(256, dtype=np.uint8)
POS_FINITE = np.array([fp8_decode_ref(c) for c in range(127)])          # codes 0x00..0x7e


def c_fp8_to_f32(codes):
    return _C.fp8_to_f32(x=np.ascontiguousarray(codes, dtype=np.uint8).view(FP8))["y"]


def assert_fp8_equal(actual_codes, expected_codes):
    """Codes equal bit for bit, except that any NaN code matches any NaN code."""
    a = np.asarray(actual_codes).view(np.uint8)
    e = np.asarray(expected_codes).view(np.uint8)
    a_nan = (a & 0x7F) == 0x7F
    e_nan = (e & 0x7F) == 0x7F
    np.testing.assert_array_equal(a_nan, e_nan)
    np.testing.assert_array_equal(a[~a_nan], e[~e_nan])


def test_fp8_decode_all_codes():
    ref = np.array([fp8_decode_ref(c) for c in range(256)], np.float64)
    c = c_fp8_to_f32(ALL_CODES)
    ml = ALL_CODES.view(FP8).astype(np.float32)
    assert c.dtype == np.float32
    nan = np.isnan(ref)
    assert nan.sum() == 2 and nan[0x7F] and nan[0xFF]
    assert np.isnan(c[nan]).all() and np.isnan(ml[nan]).all()
    np.testing.assert_array_equal(c[~nan].astype(np.float64), ref[~nan])
    np.testing.assert_array_equal(ml[~nan].astype(np.float64), ref[~nan])
    assert np.signbit(c[0x80]) and c[0x80] == 0                       # -0 decodes to -0.0
    assert c[0x7E] == 448 and c[0x01] == 2.0**-9 and c[0x08] == 2.0**-6


def test_fp8_every_finite_code_round_trips():
    codes = ALL_CODES[(ALL_CODES & 0x7F) != 0x7F]
    vals = c_fp8_to_f32(codes)
    np.testing.assert_array_equal(c_fp8(vals).view(np.uint8), codes)
    np.testing.assert_array_equal(gn.fp8_e4m3fn(vals).view(np.uint8), codes)


def test_fp8_midpoints_round_to_even_code():
    k = np.arange(126)
    mid = ((POS_FINITE[:-1] + POS_FINITE[1:]) / 2).astype(np.float32)
    assert np.array_equal(mid.astype(np.float64), (POS_FINITE[:-1] + POS_FINITE[1:]) / 2)  # exact
    even = np.where(k % 2 == 0, k, k + 1).astype(np.uint8)
    up = np.nextafter(mid, np.float32(np.inf))
    down = np.nextafter(mid, np.float32(-np.inf))
    for sign in (0, 0x80):
        sgn = np.float32(-1.0 if sign else 1.0)
        for x, exp in ((mid, even), (up, (k + 1).astype(np.uint8)), (down, k.astype(np.uint8))):
            exp = exp | np.uint8(sign)
            xs = sgn * x
            np.testing.assert_array_equal(c_fp8(xs).view(np.uint8), exp)
            np.testing.assert_array_equal(xs.astype(FP8).view(np.uint8), exp)
            np.testing.assert_array_equal(gn.fp8_e4m3fn(xs).view(np.uint8), exp)


def test_fp8_range_ends_and_specials():
    x = np.array([448, 450, 463.99997, 464, 465, 480, 1e6, np.inf, -np.inf, np.nan, -0.0, 0.0,
                  -448, -464, -465, np.nextafter(np.float32(464), np.float32(np.inf)),
                  2.0**-10, 2.0**-11, 3 * 2.0**-10, 2.0**-6, 2.0**-7, 1e-30, -1e-30],
                 np.float32)
    ml = x.astype(FP8)
    c = c_fp8(x)
    assert_fp8_equal(c, ml)
    cu = c.view(np.uint8)
    # 464 lies halfway between 448 (mantissa 110, even) and the NaN slot 480 (mantissa 111):
    # ml_dtypes rounds it to the even code 448, and C must too; above it, NaN
    assert cu[3] == 0x7E and cu[13] == 0xFE
    assert cu[0] == 0x7E and cu[1] == 0x7E and cu[2] == 0x7E
    for i in (4, 5, 6, 7, 8, 9, 14, 15):
        assert cu[i] & 0x7F == 0x7F, (x[i], hex(cu[i]))
    assert cu[10] == 0x80 and cu[11] == 0x00                           # -0.0 keeps its sign
    assert cu[16] == 0x00 and cu[17] == 0x00 and cu[18] == 0x02        # subnormal ties to even
    assert cu[19] == 0x08 and cu[20] == 0x04 and cu[21] == 0 and cu[22] == 0x80


def test_fp8_subnormal_range_dense():
    # every fp32 on a fine grid of [0, 2^-5]: crosses the subnormal/normal boundary
    x = (np.arange(0, 2**14 + 1, dtype=np.float64) * 2.0**-19).astype(np.float32)
    x = np.concatenate([x, -x])
    assert_fp8_equal(c_fp8(x), x.astype(FP8))


def test_fp8_random_values_and_bits():
    rng = np.random.default_rng(5)
    xs = [rng.uniform(-500, 500, 10**6).astype(np.float32),
          random_bits(10**6, seed=6),
          (rng.standard_normal(10**5) * np.exp2(rng.integers(-12, 9, 10**5))).astype(np.float32)]
    for x in xs:
        ml = x.astype(FP8)
        assert_fp8_equal(c_fp8(x), ml)
        assert_fp8_equal(gn.fp8_e4m3fn(x), ml)
        # decode of C's code equals ml_dtypes' decode
        a = c_fp8_to_f32(c_fp8(x).view(np.uint8))
        b = ml.astype(np.float32)
        assert np.array_equal(a, b, equal_nan=True)


# ======================================================= int8 per-row quant

def both_quant(x):
    x = np.ascontiguousarray(x, dtype=np.float32)
    q, s = gn.int8_quant_per_row(x)
    c = _C.quant_int8(x=x)
    return (q, s), (c["y"], c["scale"])


def test_quant_micro_example_a():
    x = np.array([[127, 2.5, -3.5, 0.5, -0.5, 1.5]], np.float32)
    assert f32(f32(1) / f32(127)) == f32(0.007874015718698502)
    for q, s in both_quant(x):
        assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == (1, 1)
        assert q.tolist() == [[127, 2, -4, 0, 0, 2]]
        assert s[0, 0] == 1.0


def test_quant_micro_example_b():
    # amax 3: sq = f32(f32(1/3) * 127) = 42.333335876464844, not f32(127/3) = 42.33333206176758
    v = [3.0, 1.0, -2.0, 0.75, 2.303149461746216, -2.84645676612854]
    x = np.array([v], np.float32)
    sq = f32(f32(1) / f32(3)) * f32(127)
    sq_div = f32(127) / f32(3)
    assert sq == f32(42.333335876464844) and sq_div == f32(42.33333206176758)
    expected = [127, 42, -85, 32, 98, -121]
    # the last two land on .5 under the reciprocal form only (97.5 -> 98, -120.50001 -> -121);
    # the division form would give 97 and -120
    assert np.rint(x[0] * sq_div).astype(int).tolist()[4:] == [97, -120]
    for q, s in both_quant(x):
        assert q.tolist() == [expected]
        assert s[0, 0] == f32(0.023622045293450356)
        assert s[0, 0] != f32(3.0) / f32(127.0)                       # not amax/127


def test_quant_all_zero_row_uses_amax_floor():
    x = np.zeros((2, 37), np.float32)
    x[1, 5] = -0.0
    eps = f32(1e-4)
    sq = f32(f32(1) / eps) * f32(127)
    exp_scale = f32(1) / sq
    assert abs(float(exp_scale) - 1e-4 / 127) < 1e-6 * 1e-4 / 127
    for q, s in both_quant(x):
        assert (q == 0).all()
        assert s[:, 0].tolist() == [exp_scale, exp_scale]


def test_quant_rows_below_floor():
    # amax 5e-5 < 1e-4: the floor is used, so the largest |q| is about 63.5, not 127
    x = np.array([[5e-5, -2.5e-5, 1e-5, 0.0]], np.float32)
    eps = f32(1e-4)
    sq = f32(f32(1) / eps) * f32(127)
    exp = np.rint(x[0] * sq).astype(int).tolist()
    assert 60 <= exp[0] <= 66
    for q, s in both_quant(x):
        assert q[0].tolist() == exp
        assert s[0, 0] == f32(1) / sq


@pytest.mark.parametrize("j", [-6, -3, -1, 0, 1, 2, 5])
def test_quant_exact_half_landings(j):
    # amax = 127 * 2^j gives sq = 2^-j exactly, so v = (k + 0.5) 2^j lands on k + 0.5
    rng = np.random.default_rng(100 + j)
    k = rng.integers(-127, 127, size=(4, 50))
    v = ((k + 0.5) * 2.0**j).astype(np.float32)
    v[:, 0] = np.array([127, -127, 127, -127]) * 2.0**j
    amax = f32(127 * 2.0**j)
    assert f32(f32(1) / amax) * f32(127) == f32(2.0**-j)
    exp = np.vectorize(lambda t: round(t))(k + 0.5)                    # Python: half to even
    exp[:, 0] = [127, -127, 127, -127]
    for q, s in both_quant(v):
        np.testing.assert_array_equal(q, exp)
        assert (s == f32(2.0**j)).all()


def test_quant_c_equals_numpy_random_rows():
    rng = np.random.default_rng(7)
    rows = []
    for n in (1, 7, 64, 1000):
        x = rng.standard_normal((40, n)).astype(np.float32)
        x *= np.exp2(rng.integers(-20, 20, (40, 1))).astype(np.float32)
        rows.append(x)
    # rows built to land on .5: amax a, elements (k + 0.5) / sq for the actual sq
    a = f32(3.7)
    sq = f32(f32(1) / a) * f32(127)
    k = rng.integers(-126, 126, (30, 200))
    x = ((k + 0.5) / np.float64(sq)).astype(np.float32)
    x[:, 0] = a
    rows.append(x)
    rows.append(np.full((3, 10), 3e-5, np.float32))
    for x in rows:
        (qg, sg), (qc, sc) = both_quant(x)
        np.testing.assert_array_equal(qc, qg)
        np.testing.assert_array_equal(sc.view(np.uint32), sg.view(np.uint32))
        # independent properties of the result
        assert np.abs(qc.astype(int)).max() <= 127
        big = np.abs(x).max(axis=1) > 1e-4
        assert (np.abs(qc[big].astype(int)).max(axis=1) == 127).all()
        err = np.abs(x.astype(np.float64) - qc * sc.astype(np.float64))
        assert (err <= (0.5 + 1e-4) * sc.astype(np.float64) * (1 + 1e-6)).all()


# ================================================================= matmul_i8

def i8_ref(a, b):
    return a.astype(np.int64) @ b.astype(np.int64)


# M >= 16 with K a multiple of 64 takes the AMX tiles where the CPU has them; 13 and 40
# leave a tile of 8 rows, 17 and 33 columns a partial tile
@pytest.mark.parametrize("M", [1, 3, 8, 13, 16, 40])
@pytest.mark.parametrize("K", [1, 5, 64, 1024, 1100])
def test_matmul_i8_exact(M, K, each_isa):
    rng = np.random.default_rng(M * 10007 + K)
    for N in (1, 17, 32, 33, 100):
        a = rng.integers(-128, 128, (M, K)).astype(np.int8)
        b = rng.integers(-128, 128, (K, N)).astype(np.int8)
        ref = i8_ref(a, b)
        c = _C.matmul_i8(a=a, b=b)["c"]
        assert c.dtype == np.int32 and c.shape == (M, N)
        np.testing.assert_array_equal(c, ref)
        np.testing.assert_array_equal(gn.matmul_i8(a, b), ref)


# weights as rows, the layout of the experts and of the attention output projection; K above
# 2048 is summed in k-slices through the int32 output on AMX
@pytest.mark.parametrize("M", [1, 8, 13, 16, 40])
@pytest.mark.parametrize("K", [5, 64, 1100, 2048, 2112, 4096])
def test_matmul_i8_nt_exact(M, K, each_isa):
    rng = np.random.default_rng(M * 7919 + K)
    for N in (1, 17, 33, 64):
        a = rng.integers(-128, 128, (M, K)).astype(np.int8)
        w = rng.integers(-128, 128, (N, K)).astype(np.int8)
        c = _C.matmul_i8_nt(a=a, b=w)["c"]
        assert c.dtype == np.int32 and c.shape == (M, N)
        np.testing.assert_array_equal(c, i8_ref(a, w.T))


@pytest.mark.parametrize("va,vb", [(-128, -128), (127, -128)])
def test_matmul_i8_nt_extremes(va, vb, each_isa):
    M, N, K = 40, 33, 8192
    a = np.full((M, K), va, np.int8)
    w = np.full((N, K), vb, np.int8)
    np.testing.assert_array_equal(_C.matmul_i8_nt(a=a, b=w)["c"], np.full((M, N), va * vb * K))


@pytest.mark.parametrize("K", [1, 5, 1023, 1024, 1025, 1100, 4096])
@pytest.mark.parametrize("va,vb", [(-128, -128), (127, 127), (127, -128), (-128, 127)])
def test_matmul_i8_extremes(K, va, vb, each_isa):
    M, N = 24, 33
    a = np.full((M, K), va, np.int8)
    b = np.full((K, N), vb, np.int8)
    ref = np.full((M, N), va * vb * K, np.int64)
    np.testing.assert_array_equal(_C.matmul_i8(a=a, b=b)["c"], ref)
    np.testing.assert_array_equal(gn.matmul_i8(a, b), ref)


# the golden sums k in 1024-long float32 slices: no k, a batch axis, a transposed weight
@pytest.mark.parametrize("shape_a,shape_b,transposed", [
    ((3, 0), (0, 2), False), ((2, 4, 3000), (2, 3000, 6), False), ((5, 2049), (7, 2049), True),
    ((6, 8192), (8192, 3), False)])
def test_golden_matmul_i8_in_slices(shape_a, shape_b, transposed):
    rng = np.random.default_rng(len(shape_a) + shape_a[-1])
    a = rng.integers(-128, 128, shape_a).astype(np.int8)
    b = rng.integers(-128, 128, shape_b).astype(np.int8)
    if shape_a[-1] == 8192:
        a[0], b[:, 0] = -128, -128          # one dot product at the extreme, 2^27
    b = b.T if transposed else b
    got = gn.matmul_i8(a, b)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.matmul(a.astype(np.int64), b.astype(np.int64)))


# ================================================================ matmul_bf16

def rand_bf16(rng, shape, spread=8):
    x = rng.standard_normal(shape) * np.exp2(rng.integers(-spread, spread + 1, shape))
    return x.astype(np.float32).astype(BF16)


def seq_fma_ref(a, b):
    """c_k = fl32(c_{k-1} + a_k b_k), sequentially over k.

    A bf16 value has 8 significant bits, so a bf16 x bf16 product has at most 16
    and is exact in fp32 (no over/underflow for these magnitudes). fmaf(a, b, c)
    rounds c + ab once; with ab exact that is exactly the fp32 sum c + fl32(ab),
    which is what a float32 NumPy multiply then add computes. So this reference
    is bit-exact for the C kernel's sequential fmaf over k.
    """
    A, B = a.astype(np.float32), b.astype(np.float32)
    C = np.zeros((A.shape[0], B.shape[1]), np.float32)
    for k in range(A.shape[1]):
        p = A[:, k:k + 1] * B[k:k + 1, :]
        assert np.array_equal(p.astype(np.float64), A[:, k:k + 1].astype(np.float64) * B[k:k + 1, :])
        C = C + p
    return C


@pytest.mark.parametrize("M", [1, 3, 8, 13])
@pytest.mark.parametrize("K", [1, 5, 64, 1100])
def test_matmul_bf16(M, K, each_isa):
    rng = np.random.default_rng(M * 31 + K)
    for N in (1, 17, 32, 100):
        a, b = rand_bf16(rng, (M, K)), rand_bf16(rng, (K, N))
        c = _C.matmul_bf16(a=a, b=b)["c"]
        assert c.dtype == np.float32 and c.shape == (M, N)
        # bound: products exact, sequential fp32 sum of K terms: |err| <= gamma_K sum|a||b|
        A64, B64 = a.astype(np.float64), b.astype(np.float64)
        exact = A64 @ B64
        mag = np.abs(A64) @ np.abs(B64)
        u = 2.0**-24
        bound = K * u / (1 - K * u) * mag
        assert (np.abs(c - exact) <= bound).all()
        g = gn.matmul_bf16(a, b)
        assert (np.abs(g - exact) <= bound).all()
        # bit-exact against the sequential reference (argued in seq_fma_ref)
        np.testing.assert_array_equal(c.view(np.uint32), seq_fma_ref(a, b).view(np.uint32))


def test_matmul_bf16_cancellation_order_matters():
    # 2^24 + 1 - 2^24: sequential fp32 gives 0 (1 is absorbed), a different order gives 1;
    # the kernel's documented order is sequential over k
    a = np.array([[1.0, 1.0, 1.0]], np.float32).astype(BF16)
    b = np.array([[2.0**24], [1.0], [-(2.0**24)]], np.float32).astype(BF16)
    assert _C.matmul_bf16(a=a, b=b)["c"][0, 0] == 0.0
    b2 = np.array([[2.0**24], [-(2.0**24)], [1.0]], np.float32).astype(BF16)
    assert _C.matmul_bf16(a=a, b=b2)["c"][0, 0] == 1.0


# ================================================== scalar vs each vector path

@pytest.fixture(params=["avx2", "avxvnni", "avx512"])
def simd(request, restore_isa):
    if request.param not in dsv4.available_isas():
        pytest.skip(f"{request.param} not available on this CPU")
    return request.param


def under_both(fn, simd):
    out = {}
    for name in ("scalar", simd):
        dsv4.set_isa(name)
        assert dsv4.get_isa() == name
        out[name] = fn()
    return out["scalar"], out[simd]


def test_isa_matmul_i8_identical(simd):
    rng = np.random.default_rng(11)
    for M, K, N in [(1, 1, 1), (13, 1100, 100), (8, 5, 17), (3, 64, 32), (9, 4099, 65)]:
        a = rng.integers(-128, 128, (M, K)).astype(np.int8)
        b = rng.integers(-128, 128, (K, N)).astype(np.int8)
        s, v = under_both(lambda: _C.matmul_i8(a=a, b=b)["c"], simd)
        np.testing.assert_array_equal(s, v)
        np.testing.assert_array_equal(s, i8_ref(a, b))


def test_isa_matmul_bf16_identical(simd):
    rng = np.random.default_rng(12)
    for M, K, N in [(1, 1, 1), (13, 1100, 100), (8, 5, 17), (3, 64, 32), (9, 333, 65)]:
        a, b = rand_bf16(rng, (M, K), 20), rand_bf16(rng, (K, N), 20)
        s, v = under_both(lambda: _C.matmul_bf16(a=a, b=b)["c"], simd)
        np.testing.assert_array_equal(s.view(np.uint32), v.view(np.uint32))


def test_isa_matmul_bf16_identical_when_products_underflow(simd):
    # products below 2^-126 are not exact in fp32: the portable path must take the fused
    # steps there as the vector path does, and the result must show it
    rng = np.random.default_rng(15)
    for M, K, N in [(8, 300, 40), (3, 17, 65)]:
        a = (rand_bf16(rng, (M, K), 6).astype(np.float32) * np.float32(2.0**-64)).astype(BF16)
        b = (rand_bf16(rng, (K, N), 6).astype(np.float32) * np.float32(2.0**-64)).astype(BF16)
        s, v = under_both(lambda: _C.matmul_bf16(a=a, b=b)["c"], simd)
        np.testing.assert_array_equal(s.view(np.uint32), v.view(np.uint32))
        A, B = a.astype(np.float32), b.astype(np.float32)
        unfused = np.zeros((M, N), np.float32)
        with np.errstate(under="ignore"):
            for k in range(K):
                unfused = unfused + A[:, k:k + 1] * B[k:k + 1, :]
        assert (s != unfused).any()          # the case does tell the two forms apart


def test_isa_quant_int8_identical(simd):
    rng = np.random.default_rng(13)
    x = (rng.standard_normal((50, 333)) * np.exp2(rng.integers(-10, 10, (50, 1)))).astype(np.float32)
    # rows with NaN (skipped by the max, quantised to 0), infinities (amax inf: every q 0),
    # exact .5 ties of v * 127 / amax, a row below INT8_AMAX_EPS and a zero row; the vector
    # path takes 16 lanes at a time, so the specials sit in the body and in the tail
    x[0, [3, 40, 332]] = np.nan
    x[1, 17] = np.inf
    x[2, 5] = -np.inf
    x[3, :] = 0.0
    x[4, :] = 1e-6
    x[5, :] = np.arange(333, dtype=np.float32) - 166.0       # amax 166: many .5 ties
    x[5, 0] = 127.0 * 2.0                                     # amax 254: v/2 ties exactly
    x[6, 20] = np.nan                                         # a NaN in the vectors only
    s, v = under_both(lambda: tuple(_C.quant_int8(x=x).values()), simd)
    for p, q in zip(s, v):
        np.testing.assert_array_equal(p.view(np.uint8), q.view(np.uint8))
    q = s[0] if s[0].dtype == np.int8 else s[1]
    assert (q[0, [3, 40, 332]] == 0).all() and (q[1] == 0).all() and (q[3] == 0).all()
    assert (q[6] == 0).all()


def exp_inputs():
    rng = np.random.default_rng(14)
    # every range the softmax meets: scores minus their max (<= 0), merge factors, the sink
    # term (either sign), down to the fp32 subnormals and past overflow
    x = np.concatenate([rng.uniform(-110, 90, 400_000), rng.uniform(-1, 1, 100_000),
                        -np.exp2(rng.uniform(-30, 7, 100_000))]).astype(np.float32)
    specials = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 88.72283, 88.72284, -87.33655,
                         -103.97208, -103.97209, 1e-30, -1e-30, 3e38, -3e38], np.float32)
    # the specials sit in the vector body and in the scalar tail
    return np.concatenate([specials, x, specials[:7]])


def test_exp_f32_rounds_the_true_value(each_isa):
    x = exp_inputs()
    y = _C.exp_f32(x=x)["y"]
    with np.errstate(over="ignore"):
        ref = np.exp(x.astype(np.float64)).astype(np.float32)
    fin = np.isfinite(ref) & (ref != 0)
    ulps = np.abs(y[fin].view(np.int32).astype(np.int64) - ref[fin].view(np.int32))
    assert ulps.max() <= 1
    assert (ulps != 0).mean() < 1e-5         # a miss needs the value within ~1e-14 of a tie
    np.testing.assert_array_equal(y[~fin & ~np.isnan(x)], ref[~fin & ~np.isnan(x)])
    assert np.isnan(y[np.isnan(x)]).all()
    assert y[0] == 1.0 and y[1] == 1.0 and y[3] == np.inf and y[4] == 0.0
    assert y[5] < np.inf and y[6] == np.inf and y[12] == np.inf and y[13] == 0.0
    np.testing.assert_array_equal(y[-7:], y[:7])


def test_isa_exp_identical(simd):
    x = exp_inputs()
    s, v = under_both(lambda: _C.exp_f32(x=x)["y"], simd)
    np.testing.assert_array_equal(s.view(np.uint32), v.view(np.uint32))


def test_isa_qkv_proj_rope_identical(simd):
    import dataclasses
    cfg = dataclasses.replace(dsv4.FLASH, hidden_size=256, q_lora_rank=64, num_attention_heads=4,
                              head_dim=96, qk_rope_head_dim=32)
    inp = dsv4.specs.qkv_proj_rope(T=11, seed=3, config=cfg)
    s, v = under_both(lambda: dsv4.qkv_proj_rope(**inp, config=cfg), simd)
    for k in ("q", "kv", "qr", "qr_scale"):
        np.testing.assert_array_equal(s[k].view(np.uint8), v[k].view(np.uint8))


# ======================================================================= RoPE

def rope_ref(x, cos, sin, inverse=False):
    """Own fp32 evaluation of §0.5 (three roundings per output) + own RNE bf16 bits."""
    x = x.astype(np.float32)
    h = x.shape[-1] // 2
    c, s = cos.astype(np.float32)[..., :h], sin.astype(np.float32)[..., :h]
    a, b = x[..., 0::2], x[..., 1::2]
    if inverse:
        e = np.float32(a * c) + np.float32(b * s)
        o = np.float32(b * c) - np.float32(a * s)
    else:
        e = np.float32(a * c) - np.float32(b * s)
        o = np.float32(a * s) + np.float32(b * c)
    out = np.empty(x.shape, np.uint16)
    out[..., 0::2] = rne_ref_bits(e)
    out[..., 1::2] = rne_ref_bits(o)
    return out


def c_rope(x, cos, sin, inverse=False):
    fn = _C.rope_inv if inverse else _C.rope
    return fn(x=np.ascontiguousarray(x, np.float32), cos=np.ascontiguousarray(cos),
              sin=np.ascontiguousarray(sin))["y"]


@pytest.mark.parametrize("R", [64, 6, 22])
def test_rope_matches_own_reference_on_every_path(each_isa, R):
    """The vector form takes 8 pairs at a time: R = 64 is whole vectors, 6 only the scalar
    tail, 22 both; NaN, infinities, overflow and bf16 ties go through each."""
    rng = np.random.default_rng(R)
    M = 40
    theta = rng.uniform(-np.pi, np.pi, (M, R // 2))
    cos = np.cos(theta).astype(np.float32).astype(BF16)
    sin = np.sin(theta).astype(np.float32).astype(BF16)
    x = (rng.standard_normal((M, R)) * np.exp2(rng.integers(-20, 20, (M, 1)))).astype(np.float32)
    x[0, :4] = [np.nan, 1.0, np.inf, -np.inf]
    x[1, :2] = [3e38, 3e38]                               # the products overflow
    x[2, :] = np.float32(1 + 2.0**-8)                     # a bf16 tie on the way out
    cos[2, :], sin[2, :] = 1.0, 0.0
    for inverse in (False, True):
        y = c_rope(x, cos, sin, inverse).view(np.uint16)
        with np.errstate(over="ignore", invalid="ignore"):       # the specials, on purpose
            ref = rope_ref(x, cos, sin, inverse)
        np.testing.assert_array_equal(y, ref)


def test_rope_micro_example():
    v = np.array([[1, 2, 3, 4]], np.float32)
    cos = np.array([[0.5, 0.25]], np.float32).astype(BF16)
    sin = np.array([[0.75, 1.0]], np.float32).astype(BF16)
    # columns beyond R/2 = 2 are garbage and must not be read
    cosw = np.array([[0.5, 0.25, np.nan, 1e30]], np.float32).astype(BF16)
    sinw = np.array([[0.75, 1.0, -np.inf, 7]], np.float32).astype(BF16)
    fwd = [-1.0, 1.75, -3.25, 4.0]
    inv = [2.0, 0.25, 4.75, -2.0]          # (ac + bs, bc - as) by hand
    for c, s in ((cos, sin), (cosw, sinw)):
        for y in (gn.rope_interleaved(v, c, s), c_rope(v, c, s)):
            assert y.dtype == BF16 and y.astype(np.float32).tolist() == [fwd]
        for y in (gn.rope_interleaved(v, c, s, inverse=True), c_rope(v, c, s, inverse=True)):
            assert y.astype(np.float32).tolist() == [inv]


def test_rope_inverse_undoes_forward():
    rng = np.random.default_rng(21)
    M, R = 64, 64
    theta = rng.uniform(-np.pi, np.pi, (M, R // 2))
    cos = np.cos(theta).astype(np.float32).astype(BF16)
    sin = np.sin(theta).astype(np.float32).astype(BF16)
    v = rng.standard_normal((M, R)).astype(np.float32)
    pair = np.repeat(np.hypot(v[:, 0::2], v[:, 1::2]), 2, axis=1)
    # bf16 unit roundoff u = 2^-8. z - v = (c^2 + s^2 - 1) v + R(-t) e1 + e2 with
    # |c^2 + s^2 - 1| <= 2u (bf16 cos/sin), |R(-t) e1| <= sqrt(2) u (1 + 2u) |pair| (the
    # rounding of y), |e2| <= u |z|: in all < 3.5 u = 1.75 * 2^-7 of the pair norm
    # (observed max ~1.14 * 2^-7)
    tol = 3.5 * 2.0**-8 * pair
    for impl in ("golden", "c"):
        if impl == "golden":
            y = gn.rope_interleaved(v, cos, sin)
            z = gn.rope_interleaved(y.astype(np.float32), cos, sin, inverse=True)
        else:
            y = c_rope(v, cos, sin)
            z = c_rope(y.astype(np.float32), cos, sin, inverse=True)
        err = np.abs(z.astype(np.float64) - v)
        assert (err <= tol).all()
        # and the forward turn really did something
        assert np.abs(y.astype(np.float32) - v).max() > 0.5


@pytest.mark.parametrize("inverse", [False, True])
def test_rope_ignores_columns_past_half(inverse):
    rng = np.random.default_rng(22)
    M, R = 9, 16
    v = rng.standard_normal((M, R)).astype(np.float32)
    cos = rng.uniform(-1, 1, (M, R)).astype(np.float32)
    sin = rng.uniform(-1, 1, (M, R)).astype(np.float32)
    cos2, sin2 = cos.copy(), sin.copy()
    cos2[:, R // 2:] = np.nan
    sin2[:, R // 2:] = 1e30
    expected = rope_ref(v, cos.astype(BF16), sin.astype(BF16), inverse)
    for c, s in ((cos, sin), (cos2, sin2)):
        c, s = c.astype(BF16), s.astype(BF16)
        np.testing.assert_array_equal(u16(gn.rope_interleaved(v, c, s, inverse=inverse)), expected)
        np.testing.assert_array_equal(u16(c_rope(v, c, s, inverse)), expected)
        # the narrow table (only R/2 columns) gives the same
        np.testing.assert_array_equal(
            u16(c_rope(v, np.ascontiguousarray(c[:, :R // 2]), np.ascontiguousarray(s[:, :R // 2]),
                       inverse)), expected)


@pytest.mark.parametrize("inverse", [False, True])
def test_rope_c_equals_numpy_random(inverse):
    rng = np.random.default_rng(23 + inverse)
    M, R = 257, 64
    v = (rng.standard_normal((M, R)) * np.exp2(rng.integers(-8, 8, (M, R)))).astype(np.float32)
    cos = rng.uniform(-1, 1, (M, R)).astype(np.float32).astype(BF16)
    sin = rng.uniform(-1, 1, (M, R)).astype(np.float32).astype(BF16)
    c = u16(c_rope(v, cos, sin, inverse))
    g = u16(gn.rope_interleaved(v, cos, sin, inverse=inverse))
    np.testing.assert_array_equal(c, g)
    np.testing.assert_array_equal(c, rope_ref(v, cos, sin, inverse))


def test_rope_is_not_rotate_half():
    # pair (0, 1) turns by column 0 only: a 90-degree turn in column 0, identity elsewhere
    R = 8
    v = np.arange(1, R + 1, dtype=np.float32)[None]
    cos = np.ones((1, R), np.float32)
    sin = np.zeros((1, R), np.float32)
    cos[0, 0], sin[0, 0] = 0, 1
    exp = [-2, 1, 3, 4, 5, 6, 7, 8]
    c, s = cos.astype(BF16), sin.astype(BF16)
    assert gn.rope_interleaved(v, c, s).astype(np.float32).tolist() == [exp]
    assert c_rope(v, c, s).astype(np.float32).tolist() == [exp]


# =================================================================== rms_norm

def test_rms_norm_micro_example():
    x = np.array([[3.0, 4.0]], np.float32)
    w = np.array([1.0, 0.5], np.float32)
    inv = gn.rms_inv(x, 1e-6)
    assert inv[0, 0] == f32(0.2828426957130432)
    y = gn.rms_norm(x, w, 1e-6)
    assert y.dtype == np.float32
    assert np.allclose(y, [[0.8485280871, 0.5656853914]], rtol=1e-7, atol=0)
    assert gn.bf16_rne(y).astype(np.float32).tolist() == [[0.84765625, 0.56640625]]
    xb, wb = x.astype(BF16), w.astype(BF16)
    for out in (dsv4.golden.rms_norm(xb, wb)["x_normed"], dsv4.rms_norm(xb, wb)["x_normed"]):
        assert out.dtype == BF16
        assert out.astype(np.float32).tolist() == [[0.84765625, 0.56640625]]
