"""Goldens of rms_norm and the Q/KV projection family (spec chapter 01 §4, §5).

Each function takes pypto-lib's tensor names and returns its outputs by
pypto-lib's names. Shapes come from the arrays; model facts (eps, RoPE width)
from `config` (a preset name or a DeepSeekV4Config; default FLASH).
"""
import numpy as np

from ..config import get_config
from ._outputs import writes_outputs
from .numerics import (
    BF16, bf16_rne, f32, int8_quant_per_row, matmul_bf16, matmul_i8, rms_inv,
    rms_norm as _rms_norm, rope_interleaved, round_bf16,
)


@writes_outputs("x_normed")
def rms_norm(x, norm_w, *, config=None, stages=False):
    """x_normed = bf16((x * rsqrt(mean(x^2) + eps)) * norm_w), x [T, D] bf16.

    Stages (stages=True, spec chapter 01 §4.1): inv [T, 1] fp32 (rsqrt(mean(x^2) + eps)),
    y_f32 [T, D] fp32 ((x * inv) * norm_w, before the bf16 rounding).
    """
    eps = get_config(config).rms_norm_eps
    inv = rms_inv(x, eps)
    y = (f32(x) * inv) * f32(norm_w)
    out = {"x_normed": bf16_rne(y)}
    if stages:
        out["stages"] = {"inv": inv, "y_f32": y}
    return out


def _qkv(xn, wq_a, wq_b, wq_b_scale, wkv, cos, sin, gamma_cq, gamma_ckv, cfg, round_latent,
         stages):
    """The shared body: xn [T, D] is the (normalised) input as fp32 holding bf16 values."""
    T = xn.shape[0]
    HD = wkv.shape[1]
    H = wq_b.shape[1] // HD
    N = HD - cfg.qk_rope_head_dim
    eps = cfg.rms_norm_eps

    # Q path: latent, its RMSNorm, int8 per token
    latent = matmul_bf16(xn, wq_a)
    qn = _rms_norm(latent, gamma_cq, eps)
    if round_latent:
        qn = round_bf16(qn)
    qr, qr_scale = int8_quant_per_row(qn)
    q_i32 = matmul_i8(qr, wq_b)
    # dequant left to right: (q_i32 * qr_scale) * wq_b_scale
    q_dequant = ((q_i32.astype(np.float32) * qr_scale)
                 * f32(wq_b_scale).reshape(-1)).reshape(T, H, HD)
    q_full = q_dequant * rms_inv(q_dequant, eps)  # per-head RMSNorm, no weight, over all HD
    q = np.empty((T, H, HD), dtype=BF16)
    q[..., :N] = bf16_rne(q_full[..., :N])
    q[..., N:] = rope_interleaved(q_full[..., N:], cos[:, None, :], sin[:, None, :])

    # KV path: the weight applies before the rotation
    kv_proj = matmul_bf16(xn, wkv)
    kv_full = _rms_norm(kv_proj, gamma_ckv, eps)
    kv = np.empty((T, HD), dtype=q.dtype)
    kv[:, :N] = bf16_rne(kv_full[:, :N])
    kv[:, N:] = rope_interleaved(kv_full[:, N:], cos, sin)

    out = {"q": q, "kv": kv, "qr": qr, "qr_scale": qr_scale}
    if stages:
        out["stages"] = {"x": xn, "latent": latent, "qn": qn, "qr": qr, "qr_scale": qr_scale,
                         "q_i32": q_i32, "q_dequant": q_dequant, "q_full": q_full, "q": q,
                         "kv_proj": kv_proj, "kv_full": kv_full, "kv": kv}
    return out


@writes_outputs("q", "kv", "qr", "qr_scale")
def qkv_proj_rope(x, wq_a, wq_b, wq_b_scale, wkv, rope_cos, rope_sin, gamma_cq, gamma_ckv, *,
                  config=None, stages=False):
    """Q/KV projection + RoPE of an already normalised x [T, D] (pypto-lib qkv_proj_rope).

    Returns q [T, H, HD] bf16, kv [T, HD] bf16, qr [T, Q] int8, qr_scale [T, 1] fp32.

    Stages (stages=True, spec chapter 01 §5.2; outputs appear where they are computed):
    x [T, D] fp32 (the projection input), latent [T, Q] fp32 (A = x wq_a), qn [T, Q] fp32
    (its RMSNorm), qr, qr_scale, q_i32 [T, H*HD] int32 (Qi = qr wq_b), q_dequant
    [T, H, HD] fp32 (Qf), q_full [T, H, HD] fp32 (Qn, after the per-head RMSNorm), q,
    kv_proj [T, HD] fp32 (Bkv = x wkv), kv_full [T, HD] fp32 (kvn), kv.
    """
    cfg = get_config(config)
    return _qkv(f32(x), wq_a, wq_b, wq_b_scale, wkv, f32(rope_cos), f32(rope_sin), gamma_cq,
                gamma_ckv, cfg, round_latent=False, stages=stages)


def _fused_input(x, norm_w, eps):
    # attention RMSNorm in fp32, rounded to bf16 by the projection's input cast
    T = x.shape[0] * x.shape[1]
    return round_bf16(_rms_norm(f32(x).reshape(T, -1), norm_w, eps))


@writes_outputs("q", "kv", "qr", "qr_scale")
def decode_qkv_proj_rope(x, norm_w, wq_a, wq_b, wq_b_scale, wkv, rope_cos, rope_sin, gamma_cq,
                         gamma_ckv, even_select_t=None, odd_select_t=None, *, config=None,
                         stages=False):
    """Decode variant (pypto-lib PR #385): x [B, S, D], fused RMSNorm with norm_w, the q
    latent rounded to bf16 before quantisation, per-token rope rows [B*S, R].
    even_select_t / odd_select_t are accepted and ignored, as pypto-lib's golden does.

    Stages (stages=True) as qkv_proj_rope's: x, latent, qn, qr, qr_scale, q_i32, q_dequant,
    q_full, q, kv_proj, kv_full, kv; here x [B*S, D] is the fused RMSNorm's output rounded
    to bf16, and qn is rounded to bf16 before the quantisation."""
    cfg = get_config(config)
    xn = _fused_input(x, norm_w, cfg.rms_norm_eps)
    return _qkv(xn, wq_a, wq_b, wq_b_scale, wkv, f32(rope_cos), f32(rope_sin), gamma_cq,
                gamma_ckv, cfg, round_latent=True, stages=stages)


@writes_outputs("q", "kv", "qr", "qr_scale")
def prefill_qkv_proj_rope(x, norm_w, wq_a, wq_b, wq_b_scale, wkv, freqs_cos, freqs_sin, gamma_cq,
                          gamma_ckv, even_select_t=None, odd_select_t=None, start_pos=0, *,
                          config=None, stages=False):
    """Prefill variant (pypto-lib PR #374): as decode_qkv_proj_rope, with RoPE rows
    start_pos .. start_pos+S-1 of freqs_cos/freqs_sin [P, R] for every batch row.
    Stages (stages=True) as decode_qkv_proj_rope's: x, latent, qn, qr, qr_scale, q_i32,
    q_dequant, q_full, q, kv_proj, kv_full, kv."""
    cfg = get_config(config)
    B, S = x.shape[0], x.shape[1]
    start_pos = int(start_pos)
    if start_pos < 0 or start_pos + S > freqs_cos.shape[0]:
        raise ValueError(
            f"prefill_qkv_proj_rope: start_pos = {start_pos}: positions {start_pos}..{start_pos + S - 1} "
            f"must lie in the rope tables freqs_cos/freqs_sin of {freqs_cos.shape[0]} rows")
    pos = np.tile(np.arange(start_pos, start_pos + S), B)
    xn = _fused_input(x, norm_w, cfg.rms_norm_eps)
    return _qkv(xn, wq_a, wq_b, wq_b_scale, wkv, f32(freqs_cos[pos]), f32(freqs_sin[pos]),
                gamma_cq, gamma_ckv, cfg, round_latent=True, stages=stages)
