"""Goldens of the MTP input projection and the LM head (spec chapter 06 §8.1, §9).

mtp_projection turns the current token's hidden state and the previous model's
HC stack into the MTP block's HC stack: e_proj(enorm(h)) + h_proj(hnorm(prev)),
both projections W8A8 int8. lm_head projects final hidden rows onto the
vocabulary, whose rows are sharded over the tensor-parallel ranks.
"""
import numpy as np

from ..config import get_config
from ._outputs import writes_outputs
from .numerics import F32, bf16_rne, chunked_sum_sq, f32, int8_quant_per_row, matmul_i8, rsqrt

MTP_RMS_CHUNK = 128    # the projection's RMSNorm: sums of squares of 128-wide chunks, in order


def _mtp_norm(x, weight, eps):
    """((x * rsqrt(sum_sq * (1/D) + eps)) * weight) over the last axis, in fp32, not rounded."""
    xf = f32(x)
    D = xf.shape[-1]
    inv = rsqrt(chunked_sum_sq(xf, MTP_RMS_CHUNK) * F32(1.0 / D) + F32(eps))
    return (xf * inv[..., None]) * f32(weight)


@writes_outputs("hidden_states_out")
def mtp_projection(hidden_states, prev_hidden_states, enorm_w, hnorm_w, e_proj_w, e_proj_w_scale,
                   e_proj_smooth, h_proj_w, h_proj_w_scale, h_proj_smooth, *, config=None,
                   stages=False):
    """hidden_states [T, D] bf16, prev_hidden_states [T, HC, D] bf16 -> hidden_states_out
    [T, HC, D] bf16 = bf16(E[t] + Hh[t, lane]) with
    E  = dq(q8(enorm(hidden_states) * e_proj_smooth) @ e_proj_w.T) * e_proj_w_scale,
    Hh = dq(q8(hnorm(prev_hidden_states) * h_proj_smooth) @ h_proj_w.T) * h_proj_w_scale,
    every lane of prev normalised and quantised as a row of its own; e_proj_w, h_proj_w
    are int8 [D, D] ([out, in]) with per-output-row scales, norms and smooths fp32 [D].

    Stages (stages=True, spec chapter 06 §8.1): hidden_normed [T, D] fp32 and
    prev_normed [T, HC, D] fp32 (normalised, weighted and smoothed, not rounded),
    hidden_i8 [T, D] int8, hidden_scale [T, 1], prev_i8 [T, HC, D] int8, prev_scale
    [T, HC, 1] (dequant scales), hidden_e [T, D] fp32 and hidden_h [T, HC, D] fp32 (the
    dequantised projections), hidden_states_out.
    """
    eps = get_config(config).rms_norm_eps
    hn = _mtp_norm(hidden_states, enorm_w, eps) * f32(e_proj_smooth)
    pn = _mtp_norm(prev_hidden_states, hnorm_w, eps) * f32(h_proj_smooth)
    # the quantisation clamps the int32 codes to +-127 (a NaN code becomes -127)
    hq, hs = int8_quant_per_row(hn, clamp=True)
    pq, ps = int8_quant_per_row(pn, clamp=True)
    # exact int32 sums, widened to fp32, then (acc * row scale) * column scale
    T, HC, D = pq.shape
    e_i32 = matmul_i8(e_proj_w, hq.T).T      # = hq @ e_proj_w.T, the weight read row by row
    h_i32 = matmul_i8(h_proj_w, pq.reshape(T * HC, D).T).T.reshape(T, HC, -1)
    e = (e_i32.astype(np.float32) * hs) * f32(e_proj_w_scale)
    h = (h_i32.astype(np.float32) * ps) * f32(h_proj_w_scale)
    out = {"hidden_states_out": bf16_rne(e[:, None, :] + h)}
    if stages:
        out["stages"] = {"hidden_normed": hn, "prev_normed": pn, "hidden_i8": hq,
                         "hidden_scale": hs, "prev_i8": pq, "prev_scale": ps, "hidden_e": e,
                         "hidden_h": h, "hidden_states_out": out["hidden_states_out"]}
    return out


@writes_outputs("logits")
def lm_head(hidden_states, lm_head_weight, *, stages=False):
    """hidden_states [R, T, D] bf16 (each owner rank's rows), lm_head_weight [P, VS, D]
    bf16 (tensor-parallel rank p holds vocabulary rows p*VS .. (p+1)*VS - 1) -> logits
    [R, T, P*VS] fp32: logits[o] = concat over p of fp32(hidden_states[o]) @
    fp32(lm_head_weight[p]).T, fp32 sums. No norm, bias or softcap.

    Stages (stages=True): shard_logits [P, R, T, VS] fp32, each shard's logits before
    they are concatenated.
    """
    hidden, weight = f32(hidden_states), lm_head_weight
    shards = np.stack([np.matmul(hidden, f32(weight[p]).T) for p in range(weight.shape[0])])
    out = {"logits": np.concatenate(list(shards), axis=-1)}
    if stages:
        out["stages"] = {"shard_logits": shards}
    return out


_ATTN = ("hc_attn_fn", "hc_attn_scale", "hc_attn_base", "attn_norm_w", "wq_a", "wq_b",
         "wq_b_scale", "wkv", "gamma_cq", "gamma_ckv", "freqs_cos", "freqs_sin", "kv_cache",
         "ori_slot_mapping", "cmp_sparse_indices", "cmp_sparse_lens", "position_ids",
         "attn_sink", "wo_a", "wo_b", "wo_b_scale")
_MOE = ("hc_ffn_fn", "hc_ffn_scale", "hc_ffn_base", "norm_w", "gate_w", "gate_bias", "tid2eid",
        "input_ids", "routed_w1", "routed_w1_scale", "routed_w3", "routed_w3_scale", "routed_w2",
        "routed_w2_scale", "shared_w1", "shared_w1_scale", "shared_w3", "shared_w3_scale",
        "shared_w2", "shared_w2_scale")
_PROJ = ("hidden_states", "prev_hidden_states", "enorm_w", "hnorm_w", "e_proj_w",
         "e_proj_w_scale", "e_proj_smooth", "h_proj_w", "h_proj_w_scale", "h_proj_smooth")


@writes_outputs("hidden_out", "pre_hc_hidden_out", inouts=("kv_cache",))
def prefill_mtp(hidden_states, prev_hidden_states, enorm_w, hnorm_w, e_proj_w, e_proj_w_scale,
                e_proj_smooth, h_proj_w, h_proj_w_scale, h_proj_smooth, hc_attn_fn, hc_attn_scale,
                hc_attn_base, attn_norm_w, wq_a, wq_b, wq_b_scale, wkv, gamma_cq, gamma_ckv,
                freqs_cos, freqs_sin, kv_cache, ori_block_table, ori_slot_mapping,
                cmp_sparse_indices, cmp_sparse_lens, position_ids, attn_sink, wo_a, wo_b,
                wo_b_scale, hc_ffn_fn, hc_ffn_scale, hc_ffn_base, norm_w, gate_w, gate_bias,
                tid2eid, input_ids, routed_w1, routed_w1_scale, routed_w3, routed_w3_scale,
                routed_w2, routed_w2_scale, shared_w1, shared_w1_scale, shared_w3,
                shared_w3_scale, shared_w2, shared_w2_scale, mtp_hc_head_fn, mtp_hc_head_scale,
                mtp_hc_head_base, mtp_norm_w, num_tokens=None, *, config=None, stages=False):
    """The MTP block on one prefill tile of R expert-parallel ranks (pypto-lib
    prefill_mtp, spec chapter 06 §8.2); every tensor has a leading rank axis:
    per rank mtp_projection -> prefill_attention_swa (kv_cache[r] updated in place, the
    first num_tokens rows active) -> the MoE across the ranks at layer_id =
    num_hidden_layers (the MTP layer: score routing) -> pre_hc_hidden_out [R, T, HC, D]
    bf16; per rank hc_head with the mtp_hc_head_* weights -> rms_norm with mtp_norm_w ->
    hidden_out [R, T, D] bf16.

    Stages (stages=True): projected [R, T, HC, D] bf16 (the projections' outputs),
    x_attn [R, T, HC, D] bf16 (the attention blocks' outputs), pre_hc_hidden_out,
    x_head [R, T, D] bf16 (hc_head's), hidden_out.
    """
    from .blocks import prefill_attention_swa
    from .hc import hc_head
    from .moe import moe
    from .qkv import rms_norm

    cfg = get_config(config)
    args = dict(locals())
    R, T = hidden_states.shape[:2]
    n = T if num_tokens is None else int(num_tokens)
    projected = np.stack([mtp_projection(**{k: args[k][r] for k in _PROJ}, config=cfg)
                          ["hidden_states_out"] for r in range(R)])
    x_attn = np.stack([prefill_attention_swa(x_hc=projected[r],
                                             **{k: args[k][r] for k in _ATTN},
                                             block_table=ori_block_table[r], num_tokens=n,
                                             config=cfg)["x_out"] for r in range(R)])
    pre = moe(x_hc=x_attn, **{k: args[k] for k in _MOE}, layer_id=cfg.num_hidden_layers,
              num_tokens=n, config=cfg)["x_next"]
    # pypto-lib's head replica is hc_head's arithmetic for any row count (for HC = 4; with
    # another HC the replica adds the lanes in order, hc_head pairwise)
    x_head = np.stack([hc_head(pre[r], mtp_hc_head_fn[r], mtp_hc_head_scale[r],
                               mtp_hc_head_base[r], config=cfg)["y"] for r in range(R)])
    out = {"hidden_out": np.stack([rms_norm(x_head[r], mtp_norm_w[r], config=cfg)["x_normed"]
                                   for r in range(R)]),
           "pre_hc_hidden_out": pre, "kv_cache": kv_cache}
    if stages:
        out["stages"] = {"projected": projected, "x_attn": x_attn, "pre_hc_hidden_out": pre,
                         "x_head": x_head, "hidden_out": out["hidden_out"]}
    return out
