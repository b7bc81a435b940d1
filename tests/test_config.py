"""Tests of dsv4.config against spec §1."""

import dataclasses
from collections import Counter

import numpy as np
import pytest

from dsv4 import config as C
from dsv4.config import DEMO, FLASH, PRESETS, PRO, DeepSeekV4Config, get_config

# §1.1, in field order: (field, DEMO, FLASH, PRO); compress_ratios is in §1.3.
FIELD_TABLE = [
    ("name", "demo", "flash", "pro"),
    ("hidden_size", 4096, 4096, 7168),
    ("num_attention_heads", 64, 64, 128),
    ("head_dim", 512, 512, 512),
    ("qk_rope_head_dim", 64, 64, 64),
    ("q_lora_rank", 1024, 1024, 1536),
    ("o_lora_rank", 1024, 1024, 1024),
    ("o_groups", 8, 8, 16),
    ("sliding_window", 128, 128, 128),
    ("rms_norm_eps", 1e-6, 1e-6, 1e-6),
    ("vocab_size", 129280, 129280, 129280),
    ("moe_intermediate_size", 4096, 2048, 3072),
    ("n_routed_experts", 16, 256, 384),
    ("n_shared_experts", 1, 1, 1),
    ("num_experts_per_tok", 2, 6, 6),
    ("scoring_func", "sqrtsoftplus", "sqrtsoftplus", "sqrtsoftplus"),
    ("routed_scaling_factor", 1.0, 1.5, 2.5),
    ("swiglu_limit", 0.0, 10.0, 10.0),
    ("num_hidden_layers", 8, 43, 61),
    ("num_hash_layers", 0, 3, 3),
    ("num_nextn_predict_layers", 1, 1, 1),
    ("compress_ratios", None, None, None),
    ("index_n_heads", 64, 64, 64),
    ("index_head_dim", 128, 128, 128),
    ("index_topk", 512, 512, 1024),
    ("hc_mult", 4, 4, 4),
    ("hc_sinkhorn_iters", 20, 20, 20),
    ("hc_eps", 1e-6, 1e-6, 1e-6),
    ("max_position_embeddings", 4096, 16384, 1048576),
    ("rope_theta", 10000.0, 10000.0, 10000.0),
    ("compress_rope_theta", 40000.0, 160000.0, 160000.0),
    ("rope_factor", 40.0, 16.0, 16.0),
    ("beta_fast", 32, 32, 32),
    ("beta_slow", 1, 1, 1),
    ("original_max_position_embeddings", 0, 65536, 65536),
    ("dtype", "fp8", "fp8", "fp8"),
    ("scale_fmt", "ue8m0", "ue8m0", "ue8m0"),
    ("expert_dtype", None, "fp4", None),
    ("scale_dtype", "fp8", "fp8", "fp8"),
    ("max_batch_size", 4, 4, 4),
]

PRESET_LIST = [DEMO, FLASH, PRO]

# §1.2: (property, DEMO, FLASH, PRO)
DERIVED_TABLE = [
    ("nope_head_dim", 448, 448, 448),
    ("softmax_scale", 0.04419417382415922, 0.04419417382415922, 0.04419417382415922),
    ("index_nope_head_dim", 64, 64, 64),
    ("index_weights_scale", 0.011048543456039806, 0.011048543456039806, 0.011048543456039806),
    ("hc_dim", 16384, 16384, 28672),
    ("mix_hc", 24, 24, 24),
]


def test_field_order_matches_spec():
    assert [f.name for f in dataclasses.fields(DeepSeekV4Config)] == [row[0] for row in FIELD_TABLE]


def test_every_field_is_required():
    missing = dataclasses.MISSING
    assert all(f.default is missing and f.default_factory is missing for f in dataclasses.fields(DeepSeekV4Config))
    with pytest.raises(TypeError):
        DeepSeekV4Config(name="x")


@pytest.mark.parametrize("row", [r for r in FIELD_TABLE if r[0] != "compress_ratios"], ids=lambda r: r[0])
def test_preset_field_values(row):
    field, *expected = row
    for preset, value in zip(PRESET_LIST, expected):
        got = getattr(preset, field)
        assert got == value and type(got) is type(value), (preset.name, field, got)


@pytest.mark.parametrize("row", DERIVED_TABLE, ids=lambda r: r[0])
def test_derived_properties(row):
    prop, *expected = row
    for preset, value in zip(PRESET_LIST, expected):
        # Exact equality: the spec lists the Python-double results.
        assert getattr(preset, prop) == value, (preset.name, prop)


def test_derived_properties_follow_fields():
    cfg = dataclasses.replace(FLASH, head_dim=256, qk_rope_head_dim=32, hc_mult=2, hidden_size=1000)
    assert cfg.nope_head_dim == 224
    assert cfg.softmax_scale == 256 ** -0.5
    assert cfg.index_nope_head_dim == 96
    assert cfg.hc_dim == 2000
    assert cfg.mix_hc == 8


def test_compress_ratios_exact():
    assert DEMO.compress_ratios == (0, 0, 4, 128, 4, 128, 4, 0)
    assert FLASH.compress_ratios == (0, 0) + (4, 128) * 20 + (4, 0)
    assert PRO.compress_ratios == (128, 128) + (4, 128) * 29 + (4, 0)


# §1.3 says num_hidden_layers + 1 entries, but its own DEMO tuple (and the
# reference) has 8 entries for 8 layers; FLASH and PRO do have the extra one.
@pytest.mark.parametrize(
    "preset, length, extra, counts",
    [
        (DEMO, 8, 0, {0: 3, 4: 3, 128: 2}),
        (FLASH, 44, 1, {0: 3, 4: 21, 128: 20}),
        (PRO, 62, 1, {0: 1, 4: 30, 128: 31}),
    ],
    ids=lambda v: v.name if isinstance(v, DeepSeekV4Config) else None,
)
def test_compress_ratio_counts(preset, length, extra, counts):
    ratios = preset.compress_ratios
    assert isinstance(ratios, tuple)
    assert len(ratios) == length == preset.num_hidden_layers + extra
    assert dict(Counter(ratios)) == counts
    assert ratios[-1] == 0  # the trailing (MTP) entry


def test_compress_ratios_list_becomes_tuple():
    cfg = dataclasses.replace(DEMO, compress_ratios=[0, 4, 128])
    assert cfg.compress_ratios == (0, 4, 128)
    hash(cfg)  # still usable as a cache key


def test_presets_mapping():
    assert list(PRESETS) == ["demo", "flash", "pro"]
    assert PRESETS["demo"] is DEMO and PRESETS["flash"] is FLASH and PRESETS["pro"] is PRO
    for key, preset in PRESETS.items():
        assert preset.name == key


def test_presets_are_frozen_and_hashable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        FLASH.hidden_size = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRO.compress_ratios = ()
    assert FLASH.hidden_size == 4096
    assert len({DEMO, FLASH, PRO, dataclasses.replace(FLASH)}) == 3


def test_get_config_default_is_flash():
    assert get_config() is FLASH
    assert get_config(None) is FLASH


@pytest.mark.parametrize("name, preset", [("demo", DEMO), ("FLASH", FLASH), ("Pro", PRO), ("fLaSh", FLASH)])
def test_get_config_by_name_case_insensitive(name, preset):
    assert get_config(name) is preset


def test_get_config_passes_instances_through():
    custom = dataclasses.replace(FLASH, n_routed_experts=64)
    assert get_config(custom) is custom
    assert get_config(PRO) is PRO


@pytest.mark.parametrize("bad", ["flash2", "", " flash"])
def test_get_config_unknown_name(bad):
    with pytest.raises(ValueError) as info:
        get_config(bad)
    message = str(info.value)
    assert repr(bad) in message
    for valid in ("demo", "flash", "pro"):
        assert valid in message


@pytest.mark.parametrize("bad, type_name", [(3, "int"), ({"name": "flash"}, "dict"), (b"flash", "bytes")])
def test_get_config_wrong_type(bad, type_name):
    with pytest.raises(TypeError) as info:
        get_config(bad)
    assert "config" in str(info.value)
    assert type_name in str(info.value)


def test_deployment_constants():
    assert (C.DECODE_BATCH, C.DECODE_SEQ, C.DECODE_TOKENS, C.DECODE_START_POS) == (8, 1, 8, 8192)
    assert (C.PREFILL_BATCH, C.PREFILL_SEQ, C.PREFILL_TOKENS) == (1, 128, 128)
    assert C.DECODE_TOKENS == C.DECODE_BATCH * C.DECODE_SEQ
    assert C.PREFILL_TOKENS == C.PREFILL_BATCH * C.PREFILL_SEQ
    assert C.MOE_TOKENS == C.DECODE_TOKENS == 8


def test_implementation_constants():
    assert (C.BLOCK_SIZE, C.C4A_COMPRESSOR_BLOCK_SIZE, C.C128_COMPRESSOR_BLOCK_SIZE, C.LM_HEAD_TP_SIZE) == (
        128,
        4,
        8,
        8,
    )


def test_block_count_constants():
    expected = {
        "KV_ORI_MAX_BLOCKS": 1,
        "KV_CMP_MAX_BLOCKS": 32,
        "IDX_CACHE_MAX_BLOCKS": 64,
        "DECODE_ORI_BLOCK_NUM": 8,
        "DECODE_CMP_BLOCK_NUM": 256,
        "DECODE_IDX_BLOCK_NUM": 512,
        "PREFILL_ORI_MAX_BLOCKS": 1,
        "PREFILL_ORI_BLOCK_NUM": 1,
        "PREFILL_CMP_MAX_BLOCKS": 32,
        "PREFILL_CMP_BLOCK_NUM": 256,
        "PREFILL_IDX_MAX_BLOCKS": 64,
        "PREFILL_IDX_BLOCK_NUM": 512,
    }
    assert {k: getattr(C, k) for k in expected} == expected
    # relations of §1.5
    assert C.DECODE_ORI_BLOCK_NUM == C.DECODE_BATCH * C.KV_ORI_MAX_BLOCKS
    assert C.DECODE_CMP_BLOCK_NUM == C.DECODE_BATCH * C.KV_CMP_MAX_BLOCKS
    assert C.DECODE_IDX_BLOCK_NUM == C.DECODE_BATCH * C.IDX_CACHE_MAX_BLOCKS
    assert C.PREFILL_ORI_MAX_BLOCKS == -(-C.PREFILL_SEQ // C.BLOCK_SIZE)
    assert C.PREFILL_ORI_BLOCK_NUM == C.PREFILL_BATCH * C.PREFILL_ORI_MAX_BLOCKS
    assert C.PREFILL_CMP_BLOCK_NUM == C.DECODE_CMP_BLOCK_NUM
    assert C.PREFILL_IDX_BLOCK_NUM == C.DECODE_IDX_BLOCK_NUM


def test_int8_and_mask_constants():
    assert C.INT8_SCALE_MAX == 127.0 and isinstance(C.INT8_SCALE_MAX, float)
    assert C.INT8_AMAX_EPS == 1e-4
    # §1.6: applied as f32(1e-4)
    # (the spec prints it to 15 significant digits)
    assert f"{float(np.float32(C.INT8_AMAX_EPS)):.15g}" == "9.99999974737875e-05"
    assert C.FP32_NEG_INF == -3.4028234663852886e38
    assert C.FP32_NEG_INF == float(np.finfo(np.float32).min)
    assert np.isfinite(np.float32(C.FP32_NEG_INF))


def test_ep_constants():
    assert (C.EP_WORLD_SIZE, C.DECODE_RECV_MAX, C.PREFILL_RECV_MAX, C.RECV_MAX) == (8, 64, 1024, 64)
    assert C.DECODE_RECV_MAX == C.EP_WORLD_SIZE * C.DECODE_TOKENS
    assert C.PREFILL_RECV_MAX == C.EP_WORLD_SIZE * C.PREFILL_TOKENS
    assert C.RECV_MAX == C.DECODE_RECV_MAX
