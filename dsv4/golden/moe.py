"""Goldens of the Mixture-of-Experts kernels gate, expert_routed, expert_shared, moe
(spec chapter 05).

One MoE FFN sub-layer: the gate normalises the hc-mixed hidden state, quantises it
to int8 per token and picks K experts per token (hash table for the first layers,
biased router scores afterwards); every expert is a W8A8 SwiGLU FFN; moe runs the
whole sub-layer for R expert-parallel ranks at once. Shapes come from the arrays,
model facts (eps, routing scale, SwiGLU limit, hash layers) from `config`.
"""
import warnings

import numpy as np

from ..config import get_config
from ._outputs import writes_outputs
from .hc import hc_post, hc_pre
from .numerics import (
    BF16, F32, bf16_rne, f32, int8_quant_per_row, rsqrt, sqrtsoftplus, swiglu,
)


def _active(num_tokens, T):
    """num_tokens clamped to [0, T]; None means all T tokens."""
    return T if num_tokens is None else max(0, min(T, int(num_tokens)))


def _first_bad(bad):
    return tuple(int(i) for i in np.argwhere(bad)[0])


# ------------------------------------------------------------------------- gate

def _check_hash_lookup(tid2eid, input_ids, E_g):
    """§3.4: every input id must index the table, every looked-up id must be an
    expert; all T rows are looked up, active or not."""
    V = tid2eid.shape[0]
    ids = np.asarray(input_ids).astype(np.int64)
    bad = (ids < 0) | (ids >= V)
    if bad.any():
        t = _first_bad(bad)[0]
        raise ValueError(f"gate: input_ids[{t}] = {int(ids[t])} is not a vocabulary id in "
                         f"[0, {V}) (rows of tid2eid)")
    looked_up = np.asarray(tid2eid)[ids]
    bad = (looked_up < 0) | (looked_up >= E_g)
    if bad.any():
        t, k = _first_bad(bad)
        raise ValueError(f"gate: tid2eid[{int(ids[t])}, {k}] = {int(looked_up[t, k])} (looked up "
                         f"by input_ids[{t}]) is not an expert id in [0, {E_g})")
    return looked_up.astype(np.int32)


def _weight_denominator(v):
    """Sum of the K selected scores per row in torch's order (§3.3 G7): four partial
    sums start at v0..v3, elements 4.. go into partial 0 in order, then partials
    1, 2, 3 are added to partial 0. For K < 4 a plain sequential sum."""
    K = v.shape[-1]
    if K < 4:
        den = v[..., 0]
        for k in range(1, K):
            den = den + v[..., k]
        return den
    den = v[..., 0]
    for k in range(4, K):
        den = den + v[..., k]
    for k in range(1, 4):
        den = den + v[..., k]
    return den


@writes_outputs("x_norm", "x_norm_i8", "x_norm_scale", "indices", "weights")
def gate(x_mixed, norm_w, gate_w, gate_bias, tid2eid, input_ids, layer_id, num_tokens=None, *,
         config=None, stages=False):
    """x_mixed [T, D] bf16 -> RMSNorm, int8 per token, router scores, top-K.

    norm_w [D] bf16, gate_w [E_g, D] fp32, gate_bias [E_g] fp32, tid2eid [V, K] int32,
    input_ids [T] int64. Layers below config.num_hash_layers take the K expert ids
    from tid2eid[input_ids] (table order, duplicates kept, no bias); the others the
    K best of score + bias (stable: the lower id wins a tie). Weights come from the
    unbiased scores, normalised over the K and multiplied by routed_scaling_factor.
    Tokens from num_tokens on (None = T) get scale, indices and weights 0; their
    x_norm and x_norm_i8 are still computed.

    Returns x_norm [T, D] bf16, x_norm_i8 [T, D] int8, x_norm_scale [T, 1] fp32,
    indices [T, K] int32, weights [T, K] fp32.

    Stages (stages=True, spec chapter 05 §3.3; outputs appear where they are computed):
    x_norm, x_norm_i8, x_norm_scale, logits [T, E_g] fp32 (G3), scores [T, E_g] fp32
    (sqrt-softplus, G4), biased [T, E_g] fp32 (scores + gate_bias, G5), indices, weights.
    """
    cfg = get_config(config)
    T, D = x_mixed.shape
    E_g = gate_w.shape[0]
    K = tid2eid.shape[1]
    if K != cfg.num_experts_per_tok:
        raise ValueError(f"gate: tid2eid has {K} columns, but the config routes each token to "
                         f"num_experts_per_tok = {cfg.num_experts_per_tok} experts")
    n = _active(num_tokens, T)
    hash_layer = int(layer_id) < cfg.num_hash_layers
    hashed = _check_hash_lookup(tid2eid, input_ids, E_g) if hash_layer else None

    # G1 RMSNorm of every row: (x * rsqrt(sum(x^2) * (1/D) + eps)) * norm_w, bf16
    x = f32(x_mixed)
    ss = np.sum(x * x, axis=-1, keepdims=True, dtype=np.float32)
    inv_rms = rsqrt(ss * F32(1.0 / D) + F32(cfg.rms_norm_eps))
    x_norm = bf16_rne((x * inv_rms) * f32(norm_w))
    xn = f32(x_norm)

    # G2 int8 per token, from the bf16-rounded x_norm
    x_norm_i8, x_norm_scale = int8_quant_per_row(xn)

    # G3-G5 logits, sqrt-softplus scores, biased scores (selection only)
    logits = np.matmul(xn, f32(gate_w).T)
    scores = sqrtsoftplus(logits)
    biased = scores + f32(gate_bias)

    # G6 expert choice
    if hash_layer:
        indices = hashed
    else:
        indices = np.argsort(-biased, axis=-1, kind="stable")[:, :K].astype(np.int32)

    # G7 weights from the unbiased scores: (v / sum v) * rho
    v = np.take_along_axis(scores, indices.astype(np.int64), axis=-1)
    den = _weight_denominator(v)
    weights = (v / den[:, None]) * F32(cfg.routed_scaling_factor)

    # G8 inactive tokens route nowhere
    x_norm_scale[n:] = 0
    indices[n:] = 0
    weights[n:] = 0
    out = {"x_norm": x_norm, "x_norm_i8": x_norm_i8, "x_norm_scale": x_norm_scale,
           "indices": indices, "weights": weights}
    if stages:
        out["stages"] = {"x_norm": x_norm, "x_norm_i8": x_norm_i8, "x_norm_scale": x_norm_scale,
                         "logits": logits, "scores": scores, "biased": biased,
                         "indices": indices, "weights": weights}
    return out


# ---------------------------------------------------------------------- experts

def _dequant_weight(w_i8, scale):
    """Per-output-channel dequantisation: W[n, k] = f32(w_i8[n, k]) * scale[n]."""
    return f32(w_i8) * f32(scale)[:, None]


def expert_rows(xq, sx, w1, s1, w3, s3, w2, s2, swiglu_limit, row_weight=None, stages=None):
    """One expert on a block of int8 rows (spec §2.5); returns bf16 [rows, D].

    xq [rows, D] int8 with dequant scales sx [rows]; w1, w3 [I, D], w2 [D, I] int8
    with per-output-channel scales. The weights are dequantised and the GEMMs run
    in fp32. The SwiGLU output is requantised to int8 per row; a routing weight
    (routed experts) multiplies that row's dequant scale before the w2 GEMM.
    A dict passed as `stages` receives the steps of §2.5: x, g, u, h, hq, hs, (routed)
    rs, y.
    """
    x = f32(xq) * f32(sx)[:, None]
    gate_ = np.matmul(x, _dequant_weight(w1, s1).T)
    up = np.matmul(x, _dequant_weight(w3, s3).T)
    h = swiglu(gate_, up, swiglu_limit)
    hq, hs = int8_quant_per_row(h)
    rs = hs if row_weight is None else hs * f32(row_weight)[:, None]
    y = np.matmul(f32(hq) * rs, _dequant_weight(w2, s2).T)
    if stages is not None:
        stages.update(x=x, g=gate_, u=up, h=h, hq=hq, hs=hs)
        if row_weight is not None:
            stages["rs"] = rs
        stages["y"] = y
    return bf16_rne(y)


@writes_outputs("recv_y")
def expert_routed(recv_x, recv_scale_dq, recv_weights, recv_expert_count, routed_w1,
                  routed_w1_scale, routed_w3, routed_w3_scale, routed_w2, routed_w2_scale, *,
                  config=None, stages=False):
    """The E_l local routed experts on their receive buffers.

    recv_x [E_l, M, D] int8, recv_scale_dq / recv_weights [E_l, M] fp32,
    recv_expert_count [E_l, 1] int32 (rows [0, count) of each expert are valid),
    routed_w1 / routed_w3 [E_l, I, D] int8 with scales [E_l, I], routed_w2 [E_l, D, I]
    int8 with scale [E_l, D]. Returns recv_y [E_l, M, D] bf16, the weighted expert
    output of every valid row; rows from count on are +0 whatever the inputs hold.

    Stages (stages=True, spec chapter 05 §2.5, per expert and receive row, zero from count
    on): x [E_l, M, D] fp32 (dequantised rows), g, u, h [E_l, M, I] fp32 (gate, up,
    SwiGLU), hq [E_l, M, I] int8, hs [E_l, M, 1] fp32 (its scales), rs [E_l, M, 1] fp32
    (hs times the routing weight), y [E_l, M, D] fp32 (before the bf16 rounding).
    """
    cfg = get_config(config)
    E_l, M, D = recv_x.shape
    counts = np.asarray(recv_expert_count).reshape(E_l)
    for e in range(E_l):
        if not 0 <= int(counts[e]) <= M:
            raise ValueError(f"expert_routed: recv_expert_count[{e}] = {int(counts[e])} is outside "
                             f"[0, {M}] (M = rows of recv_x per expert)")
    recv_y = np.zeros((E_l, M, D), dtype=BF16)
    I = routed_w1.shape[1]
    st = _expert_stages((E_l, M), D, I, routed=True) if stages else None
    for e in range(E_l):
        c = int(counts[e])
        if c == 0:
            continue
        rows = {} if stages else None
        recv_y[e, :c] = expert_rows(recv_x[e, :c], recv_scale_dq[e, :c],
                                    routed_w1[e], routed_w1_scale[e], routed_w3[e],
                                    routed_w3_scale[e], routed_w2[e], routed_w2_scale[e],
                                    cfg.swiglu_limit, row_weight=recv_weights[e, :c], stages=rows)
        if stages:
            for name, v in rows.items():
                st[name][e, :c] = v
    out = {"recv_y": recv_y}
    if stages:
        out["stages"] = st
    return out


def _expert_stages(lead, D, I, routed):
    """Zeroed stage arrays of expert_rows for rows indexed by `lead`."""
    shapes = {"x": D, "g": I, "u": I, "h": I, "hq": I, "hs": 1, "rs": 1, "y": D}
    return {name: np.zeros((*lead, w), np.int8 if name == "hq" else np.float32)
            for name, w in shapes.items() if routed or name != "rs"}


@writes_outputs("sh")
def expert_shared(x_local_i8, x_local_scale_dq, shared_w1, shared_w1_scale, shared_w3,
                  shared_w3_scale, shared_w2, shared_w2_scale, *, config=None, stages=False):
    """The shared expert on every token: x_local_i8 [T, D] int8 with x_local_scale_dq
    [T, 1] (the gate's x_norm_i8 / x_norm_scale), shared_w1 / shared_w3 [I, D],
    shared_w2 [D, I] int8 with per-output-channel scales. Returns sh [T, D] bf16
    (unweighted; a token with scale 0 gives exactly 0).

    Stages (stages=True, spec chapter 05 §2.5): x [T, D] fp32 (dequantised rows), g, u,
    h [T, I] fp32 (gate, up, SwiGLU), hq [T, I] int8, hs [T, 1] fp32, y [T, D] fp32
    (before the bf16 rounding)."""
    cfg = get_config(config)
    T = x_local_i8.shape[0]
    st = {} if stages else None
    sh = expert_rows(x_local_i8, np.asarray(x_local_scale_dq).reshape(T), shared_w1,
                     shared_w1_scale, shared_w3, shared_w3_scale, shared_w2, shared_w2_scale,
                     cfg.swiglu_limit, stages=st)
    out = {"sh": sh}
    if stages:
        out["stages"] = st
    return out


# -------------------------------------------------------------------------- moe

def _check_capacity(idx, R, T, E_l):
    """§6.5: no (destination, local expert) may receive more than M = R*T routes
    (pypto-lib's golden fails there). A (source, destination, expert) lane above T
    only breaks the NPU's dispatch windows; that is a warning."""
    E_g = R * E_l
    flat = idx.reshape(R, -1)
    per_src = np.stack([np.bincount(flat[s], minlength=E_g) for s in range(R)])
    total = per_src.sum(axis=0)
    if total.max(initial=0) > R * T:
        e = int(np.argmax(total))
        raise ValueError(
            f"moe: {int(total[e])} active routes go to expert {e} (rank {e // E_l}, local expert "
            f"{e % E_l}), more than the receive depth M = R*T = {R * T}; the routing (tid2eid rows "
            f"with duplicate experts in a hash layer) overflows pypto-lib's receive buffer")
    if per_src.max(initial=0) > T:
        s, e = (int(i) for i in np.unravel_index(np.argmax(per_src), per_src.shape))
        warnings.warn(f"moe: rank {s} sends {int(per_src[s, e])} routes to expert {e}, more than "
                      f"its lane of T = {T} rows in the NPU's dispatch window (duplicate experts in "
                      f"tid2eid rows); the NPU kernel would overwrite neighbouring lanes",
                      RuntimeWarning, stacklevel=3)


@writes_outputs("x_next")
def moe(x_hc, hc_ffn_fn, hc_ffn_scale, hc_ffn_base, norm_w, gate_w, gate_bias, tid2eid,
        input_ids, routed_w1, routed_w1_scale, routed_w3, routed_w3_scale, routed_w2,
        routed_w2_scale, shared_w1, shared_w1_scale, shared_w3, shared_w3_scale, shared_w2,
        shared_w2_scale, layer_id, num_tokens=None, *, config=None, stages=False):
    """One MoE FFN sub-layer on R expert-parallel ranks, simulated in one process.

    Every tensor has a leading rank axis R; rank r holds its own tokens x_hc[r]
    [T, H, D] bf16 and input_ids[r], the routed shard routed_*[r] (global experts
    r*E_l .. r*E_l + E_l - 1) and a copy of everything else. Per rank: hc_pre,
    gate (over E_g = R*E_l experts), shared expert; every active (token, k) route
    runs on the destination rank's expert with the source rank's int8 row; the
    bf16 route outputs are added to the shared output in k order (fp32, one bf16
    rounding); hc_post with the rank's x_hc as residual gives x_next [R, T, H, D]
    bf16.

    Stages (stages=True, spec chapter 05 §7; rank axis first): hc_pre's x_mixed [R, T, D]
    bf16, post [R, T, H] and comb [R, T, H*H] fp32; the gate's x_norm [R, T, D] bf16,
    x_norm_i8 [R, T, D] int8, x_norm_scale [R, T, 1], logits, scores, biased [R, T, E_g]
    fp32, indices [R, T, K] int32 (the chosen experts), weights [R, T, K] fp32; sh
    [R, T, D] bf16 (the shared expert); recv_count [R, E_l] int32 (routes per expert,
    destination rank first); routed_y [R, n, K, D] bf16 (each active route's weighted
    expert output, by source rank, token, k); ffn [R, T, D] bf16 (shared plus routes,
    the hc_post input).
    """
    cfg = get_config(config)
    R, T, H, D = x_hc.shape
    E_l = routed_w1.shape[1]
    E_g = gate_w.shape[1]
    if E_g != R * E_l:
        raise ValueError(f"moe: gate_w routes over E_g = {E_g} experts, but R = {R} ranks hold "
                         f"E_l = {E_l} experts each in routed_w1 (E_g must equal R*E_l = {R * E_l})")
    n = _active(num_tokens, T)

    # 1. per rank, once: hc_pre, gate, shared expert
    front = []
    for r in range(R):
        pre = hc_pre(x_hc[r], hc_ffn_fn[r], hc_ffn_scale[r], hc_ffn_base[r], config=cfg)
        g = gate(pre["x_mixed"], norm_w[r], gate_w[r], gate_bias[r], tid2eid[r], input_ids[r],
                 layer_id, n, config=cfg, stages=stages)
        g.update(g.pop("stages", {}))
        sh = expert_shared(g["x_norm_i8"], g["x_norm_scale"], shared_w1[r], shared_w1_scale[r],
                           shared_w3[r], shared_w3_scale[r], shared_w2[r], shared_w2_scale[r],
                           config=cfg)["sh"]
        front.append({**pre, **g, "sh": sh})
    K = front[0]["indices"].shape[1]

    # 2. the active routes (r, t, k), in the dispatch's packing order
    idx = np.stack([f["indices"][:n] for f in front]).astype(np.int64)         # [R, n, K]
    bad = (idx < 0) | (idx >= E_g)
    if bad.any():
        r, t, k = _first_bad(bad)
        raise ValueError(f"moe: rank {r} routes token {t} to expert {int(idx[r, t, k])} (k = {k}), "
                         f"outside [0, {E_g})")
    _check_capacity(idx, R, T, E_l)
    xq = np.stack([f["x_norm_i8"] for f in front])                              # [R, T, D]
    sx = np.stack([f["x_norm_scale"][:, 0] for f in front])                     # [R, T]
    wt = np.stack([f["weights"] for f in front])                                # [R, T, K]

    # 3. each expert once, on all its routes: the destination's shard, the source's rows
    routed_y = np.zeros((R, n, K, D), dtype=BF16)
    flat = idx.reshape(-1)
    recv_count = np.bincount(flat, minlength=E_g).reshape(R, E_l)
    for e in np.flatnonzero(recv_count.reshape(-1)):
        dst, l = divmod(int(e), E_l)
        rs, ts, ks = np.unravel_index(np.flatnonzero(flat == e), idx.shape)
        routed_y[rs, ts, ks] = expert_rows(
            xq[rs, ts], sx[rs, ts], routed_w1[dst, l], routed_w1_scale[dst, l], routed_w3[dst, l],
            routed_w3_scale[dst, l], routed_w2[dst, l], routed_w2_scale[dst, l], cfg.swiglu_limit,
            row_weight=wt[rs, ts, ks])

    # 4. combine: shared + route outputs in k order (fp32), one bf16 rounding; hc_post
    x_next = np.empty(x_hc.shape, dtype=BF16)
    ffn = []
    for r in range(R):
        acc = f32(front[r]["sh"])
        for k in range(K):
            acc[:n] = acc[:n] + f32(routed_y[r, :, k])
        ffn.append(bf16_rne(acc))
        x_next[r] = hc_post(ffn[r], x_hc[r], front[r]["post"], front[r]["comb"])["y"]

    out = {"x_next": x_next}
    if stages:
        names = ("x_mixed", "post", "comb", "x_norm", "x_norm_i8", "x_norm_scale", "logits",
                 "scores", "biased", "indices", "weights", "sh")
        out["stages"] = {name: np.stack([f[name] for f in front]) for name in names}
        out["stages"].update(recv_count=recv_count.astype(np.int32), routed_y=routed_y,
                             ffn=np.stack(ffn))
    return out
