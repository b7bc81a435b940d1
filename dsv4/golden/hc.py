"""Goldens of the hyper-connection kernels hc_pre, hc_post, hc_head (spec chapter 01 §6-§8).

The residual stream is carried as HC parallel copies x[T, HC, D]. hc_pre mixes
them into one sub-layer input and produces the weights hc_post uses to write
the sub-layer output back; hc_head collapses them at the end of the model.
"""
import numpy as np

from ..config import get_config
from ._outputs import writes_outputs
from .numerics import (
    F32, bf16_haz, bf16_rne, chunked_matvec, chunked_sum_sq, f32, rsqrt, sigmoid, softmax_last,
)

RMS_K_CHUNK = 512      # sum of squares: chunk sums added in order
LINEAR_K_CHUNK = 256   # mixing logits: chunk dot products added in order


def _mix(x, fn, cfg):
    """Logits of an RMS-normalised projection of all streams: (x @ fn.T) * rsqrt(mean x^2 + eps)."""
    T = x.shape[0]
    xf = f32(x).reshape(T, -1)
    K = xf.shape[1]
    r = rsqrt(chunked_sum_sq(xf, RMS_K_CHUNK) * F32(1.0 / K) + F32(cfg.rms_norm_eps))
    # the 1/rms is applied after the dot product
    return chunked_matvec(xf, f32(fn), LINEAR_K_CHUNK) * r[:, None]


def sinkhorn(logits, iters, eps):
    """Row softmax (+eps), one column normalisation, then (iters - 1) row/column
    pairs; sums over the 4 entries are sequential, normalisation a true division."""
    eps = F32(eps)
    c = softmax_last(logits) + eps
    c = c / (_seq_sum(c, axis=-2) + eps)
    for _ in range(iters - 1):
        c = c / (_seq_sum(c, axis=-1) + eps)
        c = c / (_seq_sum(c, axis=-2) + eps)
    return c


def _seq_sum(c, axis):
    c = np.moveaxis(c, axis, -1)
    s = c[..., 0]
    for j in range(1, c.shape[-1]):
        s = s + c[..., j]
    return np.expand_dims(s, axis)


@writes_outputs("x_mixed", "post", "comb")
def hc_pre(x, hc_fn, hc_scale, hc_base, *, config=None, stages=False):
    """x [T, HC, D] bf16, hc_fn [(2+HC)*HC, HC*D] fp32, hc_scale [3], hc_base [(2+HC)*HC].

    Returns x_mixed [T, D] bf16 (ties-away rounding), post [T, HC] fp32,
    comb [T, HC*HC] fp32 (row i = input stream, column j = output stream).

    Stages (stages=True, spec chapter 01 §6.2; outputs appear where they are computed):
    mix [T, (2+HC)*HC] fp32 (the mixes, after the 1/rms), pre [T, HC] fp32 (pre weights),
    post, comb_logits [T, HC*HC] fp32 (L), comb, y [T, D] fp32 (the stream collapse
    before the ties-away rounding), x_mixed.
    """
    cfg = get_config(config)
    T, HC, _ = x.shape
    mix = _mix(x, hc_fn, cfg)
    scale, base = f32(hc_scale), f32(hc_base)
    pre = sigmoid(mix[:, :HC] * scale[0] + base[:HC]) + F32(cfg.hc_eps)
    post = F32(2.0) * sigmoid(mix[:, HC:2 * HC] * scale[1] + base[HC:2 * HC])
    logits = (mix[:, 2 * HC:] * scale[2] + base[2 * HC:]).reshape(T, HC, HC)
    comb = sinkhorn(logits, cfg.hc_sinkhorn_iters, cfg.hc_eps)
    # stream collapse, sequential from zero
    xf = f32(x)
    y = np.zeros((T, x.shape[2]), np.float32)
    for h in range(HC):
        y = y + xf[:, h, :] * pre[:, h:h + 1]
    out = {"x_mixed": bf16_haz(y), "post": post, "comb": comb.reshape(T, HC * HC)}
    if stages:
        out["stages"] = {"mix": mix, "pre": pre, "post": post,
                         "comb_logits": logits.reshape(T, HC * HC), "comb": out["comb"], "y": y,
                         "x_mixed": out["x_mixed"]}
    return out


@writes_outputs("y")
def hc_post(x, residual, post, comb, *, stages=False):
    """y[t, o] = bf16(x[t] * post[t, o] + sum_i residual[t, i] * comb[t, HC*i + o]),
    added in the order x, i = 0, 1, ..., HC-1.

    Stages (stages=True, spec chapter 01 §7.2): acc [T, HC, D] fp32, the sum before the
    bf16 rounding."""
    T, HC, D = residual.shape
    xf, rf = f32(x), f32(residual)
    p, c = f32(post), f32(comb).reshape(T, HC, HC)
    y = np.empty((T, HC, D), np.float32)
    for o in range(HC):
        acc = xf * p[:, o:o + 1]
        for i in range(HC):
            acc = acc + rf[:, i, :] * c[:, i, o:o + 1]
        y[:, o, :] = acc
    out = {"y": bf16_rne(y)}
    if stages:
        out["stages"] = {"acc": y}
    return out


@writes_outputs("y")
def hc_head(x_hc, hc_head_fn, hc_head_scale, hc_head_base, *, config=None, stages=False):
    """x_hc [T, HC, D] bf16 -> y [T, D] bf16: sigmoid weights, pairwise collapse
    ((x0 p0 + x1 p1) + (x2 p2 + x3 p3)), ties-away rounding. Any T.

    Stages (stages=True, spec chapter 01 §8.2): mix [T, HC] fp32, pre [T, HC] fp32,
    y_f32 [T, D] fp32 (the collapse before the ties-away rounding)."""
    cfg = get_config(config)
    HC = x_hc.shape[1]
    mix = _mix(x_hc, hc_head_fn, cfg)
    pre = sigmoid(mix * f32(hc_head_scale)[0] + f32(hc_head_base)) + F32(cfg.hc_eps)
    terms = [f32(x_hc)[:, h, :] * pre[:, h:h + 1] for h in range(HC)]
    while len(terms) > 1:       # pairwise tree: (t0 + t1) + (t2 + t3)
        terms = [terms[i] + terms[i + 1] for i in range(0, len(terms), 2)]
    out = {"y": bf16_haz(terms[0])}
    if stages:
        out["stages"] = {"mix": mix, "pre": pre, "y_f32": terms[0]}
    return out
