"""Inputs of rms_norm and the Q/KV projection family, with pypto-lib's
distributions (spec chapter 01 §4.3, §5.4, §5.6) and its comparators (§9.2)."""
import numpy as np

from ..compare import ratio_allclose
from ..config import get_config
from ..golden.numerics import bf16_rne, int8_quant_per_column
from ._common import cached, normal, uniform_bf16


def rms_norm(T=8, *, seed=0, config=None):
    """x [T, D] bf16 ~ N(0,1) - 0.5; norm_w [D] bf16 ~ N(0,1) * 0.1 + 1."""
    D = get_config(config).hidden_size
    return {
        "x": bf16_rne(normal(seed, "x", (T, D)) - np.float32(0.5)),
        "norm_w": bf16_rne(normal(seed, "norm_w", (D,)) * np.float32(0.1) + np.float32(1.0)),
    }


@cached
def _uniform_weights(seed, D, Q, HHD, HD):
    # the int8 wq_b is the per-column quantisation of a bf16 U(-0.1, 0.1) master
    wq_b, wq_b_scale = int8_quant_per_column(uniform_bf16(seed, "wq_b", (Q, HHD), -0.1, 0.1))
    return (uniform_bf16(seed, "wq_a", (D, Q), -0.1, 0.1), wq_b, wq_b_scale,
            uniform_bf16(seed, "wkv", (D, HD), -0.1, 0.1))


def qkv_proj_rope(T=8, *, seed=0, config=None):
    """Current pypto-lib builder: every tensor uniform (bf16 grid), synthetic rope rows
    U(-1, 1), random gammas."""
    c = get_config(config)
    D, Q, HD, R = c.hidden_size, c.q_lora_rank, c.head_dim, c.qk_rope_head_dim
    wq_a, wq_b, wq_b_scale, wkv = _uniform_weights(seed, D, Q, c.num_attention_heads * HD, HD)
    return {
        "x": uniform_bf16(seed, "x", (T, D), -1, 1),
        "wq_a": wq_a, "wq_b": wq_b, "wq_b_scale": wq_b_scale, "wkv": wkv,
        "rope_cos": uniform_bf16(seed, "rope_cos", (T, R), -1, 1),
        "rope_sin": uniform_bf16(seed, "rope_sin", (T, R), -1, 1),
        "gamma_cq": uniform_bf16(seed, "gamma_cq", (Q,), -1, 1),
        "gamma_ckv": uniform_bf16(seed, "gamma_ckv", (HD,), -1, 1),
    }


@cached
def _normal_weights(seed, D, Q, HHD, HD):
    # the PR #374/#385 builders: shifted normals scaled by 1/sqrt(fan), weights as bf16
    wq_b, wq_b_scale = int8_quant_per_column(
        bf16_rne((normal(seed, "wq_b", (Q, HHD)) - np.float32(0.5)) / np.float32(np.sqrt(HHD))))
    wq_a = bf16_rne((normal(seed, "wq_a", (D, Q)) - np.float32(0.5)) / np.float32(np.sqrt(D)))
    wkv = bf16_rne(normal(seed, "wkv", (D, HD)) / np.float32(np.sqrt(D)))
    return wq_a, wq_b, wq_b_scale, wkv


def _variant_inputs(B, S, seed, c):
    D, Q, HD = c.hidden_size, c.q_lora_rank, c.head_dim
    wq_a, wq_b, wq_b_scale, wkv = _normal_weights(seed, D, Q, c.num_attention_heads * HD, HD)
    return {
        "x": bf16_rne(normal(seed, "x", (B, S, D)) - np.float32(0.5)),
        "norm_w": np.ones(D, np.float32),
        "wq_a": wq_a, "wq_b": wq_b, "wq_b_scale": wq_b_scale, "wkv": wkv,
        "gamma_cq": bf16_rne(np.ones(Q, np.float32)),
        "gamma_ckv": bf16_rne(np.ones(HD, np.float32)),
    }


def _synthetic_table(rows, R, fn):
    # pypto-lib's stand-in tables: fn(arange(rows * R) * 1e-3), full width
    return bf16_rne(fn(np.arange(rows * R, dtype=np.float32).reshape(rows, R) * np.float32(1e-3)))


def decode_qkv_proj_rope(B=8, S=1, *, seed=0, config=None):
    """PR #385 builder: x ~ N(0,1) - 0.5 [B, S, D], unit norm_w and gammas, rope rows
    cos/sin(arange(T*R) * 1e-3) [B*S, R]."""
    c = get_config(config)
    d = _variant_inputs(B, S, seed, c)
    R = c.qk_rope_head_dim
    d["rope_cos"] = _synthetic_table(B * S, R, np.cos)
    d["rope_sin"] = _synthetic_table(B * S, R, np.sin)
    return d


def prefill_qkv_proj_rope(B=1, S=128, start_pos=0, *, max_seq_len=8192, seed=0, config=None):
    """PR #374 builder: as decode_qkv_proj_rope, with [max_seq_len, R] tables and start_pos."""
    c = get_config(config)
    d = _variant_inputs(B, S, seed, c)
    R = c.qk_rope_head_dim
    d["freqs_cos"] = _synthetic_table(max_seq_len, R, np.cos)
    d["freqs_sin"] = _synthetic_table(max_seq_len, R, np.sin)
    d["start_pos"] = start_pos
    return d


_QKV_CMP = {
    "q": ratio_allclose(atol=1e-4, rtol=1 / 128),
    "kv": ratio_allclose(atol=1e-4, rtol=1 / 128),
    "qr": ratio_allclose(atol=1, rtol=0, max_error_ratio=0),       # every int8 within +-1
    "qr_scale": ratio_allclose(atol=2.5e-5, rtol=5e-3),
}

COMPARATORS = {
    "rms_norm": {"x_normed": ratio_allclose(atol=1e-4, rtol=1 / 128)},
    "qkv_proj_rope": _QKV_CMP,
    "decode_qkv_proj_rope": _QKV_CMP,
    "prefill_qkv_proj_rope": _QKV_CMP,
}

# the deployment shapes pypto-lib tests (decode B=8 S=1, prefill B=1 S=128)
CASES = {
    "rms_norm": {"decode": dict(T=8), "prefill": dict(T=128)},
    "qkv_proj_rope": {"decode": dict(T=8), "prefill": dict(T=128)},
    "decode_qkv_proj_rope": {"decode": dict(B=8, S=1)},
    "prefill_qkv_proj_rope": {"prefill": dict(B=1, S=128, start_pos=0),
                              "prefill@8000": dict(B=1, S=128, start_pos=8000)},
}
