"""Goldens of the decoder layers (spec chapter 06 §5, §6): one attention block of the
layer's kind on every expert-parallel rank, then the MoE sub-layer over all ranks.

    decode_layer    one decode step: per rank the decode block on the rank's own requests
                    and caches, then one MoE call on the T rows of every rank
    prefill_layer   a packed batch of prefill chunks: per request and per tile of TILE
                    rows the prefill block on the request's slices of every cache, state
                    and table, then one MoE call per tile; x_next gets the tile's valid rows

The kind comes from config.compress_ratios[layer_id] (0 SWA, 128 HCA, 4 CSA). The layer
tensors carry hca_ / csa_ prefixes where the block's own names would collide; the
goldens map them to the block's names and pass each block only the arguments it takes.

A call that raises leaves every cache and state as it was: decode runs on copies of
the caches its kind updates and writes them back at the end; prefill (whose packed
FLASH pools reach a GiB) checks every slot address first and keeps the original rows
of every slot the call may write, restoring them if any tile or MoE call fails.
"""
import inspect

import numpy as np

from ..config import get_config
from ..layers import TILE, layer_kind, prefill_tiles
from . import blocks
from ._outputs import writes_outputs
from .moe import moe

# TILE (= 128 rows) is the prefill tile of the packed layout, dsv4.layers.TILE: one ring
# page of BLOCK_SIZE rows, equal to the sliding window, the child blocks' fixed T.

_MOE_ARGS = ("hc_ffn_fn", "hc_ffn_scale", "hc_ffn_base", "norm_w", "gate_w", "gate_bias",
             "tid2eid", "routed_w1", "routed_w1_scale", "routed_w3", "routed_w3_scale",
             "routed_w2", "routed_w2_scale", "shared_w1", "shared_w1_scale", "shared_w3",
             "shared_w3_scale", "shared_w2", "shared_w2_scale")

# block argument -> layer tensor, per kind (unlisted names are the same in both)
_DECODE_NAMES = {
    "swa": {},
    "hca": {"cmp_wkv": "hca_cmp_wkv", "cmp_wgate": "hca_cmp_wgate", "cmp_ape": "hca_cmp_ape",
            "cmp_norm_w": "hca_cmp_norm_w", "compress_state": "hca_compress_state",
            "compress_state_block_table": "hca_compress_state_block_table",
            "cmp_slot_mapping": "hca_cmp_slot_mapping",
            "state_slot_mapping": "hca_state_slot_mapping", "ori_block_table": "block_table"},
    "csa": {"cmp_wkv": "csa_cmp_wkv", "cmp_wgate": "csa_cmp_wgate", "cmp_ape": "csa_cmp_ape",
            "cmp_norm_w": "csa_cmp_norm_w", "compress_state": "csa_compress_state",
            "compress_state_block_table": "csa_compress_state_block_table",
            "idx_wq_b": "csa_idx_wq_b", "idx_wq_b_scale": "csa_idx_wq_b_scale",
            "weights_proj": "csa_weights_proj", "hadamard_idx": "csa_hadamard_idx",
            "inner_wkv": "csa_inner_wkv", "inner_wgate": "csa_inner_wgate",
            "inner_ape": "csa_inner_ape", "inner_norm_w": "csa_inner_norm_w",
            "inner_compress_state": "csa_inner_compress_state",
            "inner_compress_state_block_table": "csa_inner_compress_state_block_table",
            "cmp_slot_mapping": "csa_cmp_slot_mapping", "idx_slot_mapping": "csa_idx_slot_mapping",
            "state_slot_mapping": "csa_state_slot_mapping",
            "inner_state_slot_mapping": "csa_inner_state_slot_mapping",
            "ori_block_table": "block_table"},
}
# the caches and states each decode kind updates
_DECODE_CACHES = {
    "swa": ("kv_cache",),
    "hca": ("kv_cache", "hca_compress_state", "cmp_kv"),
    "csa": ("kv_cache", "csa_compress_state", "csa_inner_compress_state", "cmp_kv",
            "idx_kv_cache"),
}

_PREFILL_NAMES = {
    "swa": {"block_table": "ori_block_table"},
    "hca": {"cmp_wkv": "hca_cmp_wkv", "cmp_wgate": "hca_cmp_wgate", "cmp_ape": "hca_cmp_ape",
            "cmp_norm_w": "hca_cmp_norm_w", "cmp_kv_state": "hca_cmp_kv_state",
            "cmp_score_state": "hca_cmp_score_state",
            "compress_state_block_table": "hca_compress_state_block_table",
            "cmp_slot_mapping": "hca_cmp_slot_mapping",
            "state_slot_mapping": "hca_state_slot_mapping"},
    "csa": {"cmp_wkv": "csa_cmp_wkv", "cmp_wgate": "csa_cmp_wgate", "cmp_ape": "csa_cmp_ape",
            "cmp_norm_w": "csa_cmp_norm_w", "cmp_kv_state": "csa_cmp_kv_state",
            "cmp_score_state": "csa_cmp_score_state",
            "compress_state_block_table": "csa_compress_state_block_table",
            "hadamard_idx": "csa_hadamard_idx", "idx_wq_b": "csa_idx_wq_b",
            "idx_wq_b_scale": "csa_idx_wq_b_scale", "idx_weights_proj": "csa_weights_proj",
            "inner_wkv": "csa_inner_wkv", "inner_wgate": "csa_inner_wgate",
            "inner_ape": "csa_inner_ape", "inner_norm_w": "csa_inner_norm_w",
            "inner_kv_state": "csa_inner_kv_state", "inner_score_state": "csa_inner_score_state",
            "inner_compress_state_block_table": "csa_inner_compress_state_block_table",
            "cmp_slot_mapping": "csa_cmp_slot_mapping", "idx_slot_mapping": "csa_idx_slot_mapping",
            "state_slot_mapping": "csa_state_slot_mapping",
            "inner_state_slot_mapping": "csa_inner_state_slot_mapping"},
}
# packed per-token tensors: a tile takes their rows [base, base + TILE)
_TOKEN_ROWS = {"x_hc", "position_ids", "ori_slot_mapping", "cmp_sparse_indices",
               "cmp_sparse_lens", "hca_cmp_slot_mapping", "hca_state_slot_mapping",
               "csa_cmp_slot_mapping", "csa_idx_slot_mapping", "csa_state_slot_mapping",
               "csa_inner_state_slot_mapping"}
# packed per-request tensors: request r owns rows [r cnt, (r + 1) cnt) of dim 1
_REQUEST_SLICES = {"kv_cache", "ori_block_table", "cmp_kv", "cmp_block_table", "idx_kv_cache",
                   "idx_block_table", "hca_cmp_kv_state", "hca_cmp_score_state",
                   "hca_compress_state_block_table", "csa_cmp_kv_state", "csa_cmp_score_state",
                   "csa_compress_state_block_table", "csa_inner_kv_state",
                   "csa_inner_score_state", "csa_inner_compress_state_block_table"}
# what a prefill call may write, per kind: (cache or state, the slot mapping addressing it)
_PREFILL_WRITES = {
    "swa": (("kv_cache", "ori_slot_mapping"),),
    "hca": (("kv_cache", "ori_slot_mapping"), ("hca_cmp_kv_state", "hca_state_slot_mapping"),
            ("hca_cmp_score_state", "hca_state_slot_mapping"),
            ("cmp_kv", "hca_cmp_slot_mapping")),
    "csa": (("kv_cache", "ori_slot_mapping"), ("csa_cmp_kv_state", "csa_state_slot_mapping"),
            ("csa_cmp_score_state", "csa_state_slot_mapping"),
            ("csa_inner_kv_state", "csa_inner_state_slot_mapping"),
            ("csa_inner_score_state", "csa_inner_state_slot_mapping"),
            ("cmp_kv", "csa_cmp_slot_mapping"), ("idx_kv_cache", "csa_idx_slot_mapping")),
}

_BLOCKS = {
    ("decode", "swa"): blocks.decode_attention_swa,
    ("decode", "hca"): blocks.decode_attention_hca,
    ("decode", "csa"): blocks.decode_attention_csa,
    ("prefill", "swa"): blocks.prefill_attention_swa,
    ("prefill", "hca"): blocks.prefill_attention_hca,
    ("prefill", "csa"): blocks.prefill_attention_csa,
}


def _block_args(fn):
    """The tensor arguments of a block golden, in order (not num_tokens, not keyword-only)."""
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind == p.POSITIONAL_OR_KEYWORD and p.name != "num_tokens"]


def _fail(kernel, msg):
    raise ValueError(f"{kernel}: {msg}")


def _ranks(kernel, x_hc, rows_name):
    x_hc = np.asarray(x_hc)
    if x_hc.ndim != 4:
        _fail(kernel, f"x_hc must be [R, {rows_name}, HC, D] (a leading rank axis), got shape "
                      f"{x_hc.shape}")
    return x_hc.shape[0]


def _moe(t, x_attn, input_ids, layer_id, n, cfg, stages=False):
    """The MoE sub-layer on the attention output of every rank, its first n rows active."""
    return moe(x_hc=x_attn, input_ids=input_ids, layer_id=layer_id, num_tokens=n, config=cfg,
               stages=stages, **{name: t[name] for name in _MOE_ARGS})


# ------------------------------------------------------------------------ decode

@writes_outputs("x_next", inouts=("kv_cache", "hca_compress_state", "csa_compress_state",
                                  "csa_inner_compress_state", "cmp_kv", "idx_kv_cache"))
def decode_layer(x_hc, hc_attn_fn, hc_attn_scale, hc_attn_base, attn_norm_w, wq_a, wq_b,
                 wq_b_scale, wkv, gamma_cq, gamma_ckv, freqs_cos, freqs_sin, kv_cache,
                 block_table, ori_slot_mapping, hca_cmp_slot_mapping, hca_state_slot_mapping,
                 csa_cmp_slot_mapping, csa_idx_slot_mapping, csa_state_slot_mapping,
                 csa_inner_state_slot_mapping, position_ids, kv_seq_lens, attn_sink, wo_a, wo_b,
                 wo_b_scale, hca_cmp_wkv, hca_cmp_wgate, hca_cmp_ape, hca_cmp_norm_w,
                 hca_compress_state, hca_compress_state_block_table, csa_cmp_wkv, csa_cmp_wgate,
                 csa_cmp_ape, csa_cmp_norm_w, csa_compress_state, csa_compress_state_block_table,
                 csa_idx_wq_b, csa_idx_wq_b_scale, csa_weights_proj, csa_hadamard_idx,
                 csa_inner_wkv, csa_inner_wgate, csa_inner_ape, csa_inner_norm_w,
                 csa_inner_compress_state, csa_inner_compress_state_block_table, cmp_kv,
                 cmp_block_table, idx_kv_cache, idx_block_table, hc_ffn_fn, hc_ffn_scale,
                 hc_ffn_base, norm_w, gate_w, gate_bias, tid2eid, input_ids, routed_w1,
                 routed_w1_scale, routed_w3, routed_w3_scale, routed_w2, routed_w2_scale,
                 shared_w1, shared_w1_scale, shared_w3, shared_w3_scale, shared_w2,
                 shared_w2_scale, layer_id, *, config=None, stages=False):
    """One decode step of decoder layer `layer_id` on R expert-parallel ranks (§5).

    Every tensor has a leading rank axis R. Per rank r, the decode attention block of the
    layer's kind (config.compress_ratios[layer_id]: 0 SWA, 128 HCA, 4 CSA) runs on
    x_hc[r] [T, HC, D] and the rank's own caches, which it updates in place (kv_cache;
    HCA: hca_compress_state, cmp_kv; CSA: csa_compress_state, csa_inner_compress_state,
    cmp_kv, idx_kv_cache); then the MoE sub-layer over all ranks (layer_id decides hash
    routing) on the attention outputs x_attn [R, T, HC, D] with num_tokens = T.

    Returns x_next [R, T, HC, D] bf16 and the caches. Raises ValueError for layer_id
    outside [0, num_hidden_layers); a call that raises changes no cache.

    Stages (stages=True, spec chapter 06 §5): attention, the list of the block's stage
    dicts per rank; then, as arrays with a leading rank axis R, the block's stages in
    their order (decode_attention_<kind>'s: x_mixed [R, T, D], post, comb, x_normed, qr,
    qr_scale, q, kv, compressed_kv (HCA, CSA), topk_idxs (CSA), sparse_indices,
    attn_out [R, T, D]);
    x_attn [R, T, HC, D] bf16 (the blocks' x_out, the MoE's input; the C kernel's stage
    too); the MoE's stages prefixed moe_ (moe_x_mixed, moe_post, moe_comb, moe_x_norm,
    moe_x_norm_i8, moe_x_norm_scale, moe_logits, moe_scores, moe_biased, moe_indices,
    moe_weights, moe_sh, moe_recv_count, moe_routed_y, moe_ffn; shapes as moe's)."""
    kern = "decode_layer"
    cfg = get_config(config)
    layer_id = int(layer_id)
    if not 0 <= layer_id < cfg.num_hidden_layers:
        _fail(kern, f"layer_id = {layer_id} is outside [0, {cfg.num_hidden_layers}) (the hidden "
                    f"layers of {cfg.name})")
    kind = layer_kind(layer_id, cfg)
    t = dict(locals())
    R = _ranks(kern, x_hc, "T")
    T = x_hc.shape[1]
    caches = {name: t[name] for name in _DECODE_CACHES[kind]}
    for name, a in caches.items():
        if not isinstance(a, np.ndarray) or not a.flags.writeable or a.ndim < 1 or a.shape[0] != R:
            _fail(kern, f"{name} must be a writeable ndarray with a leading rank axis of R = {R} "
                        f"(it is updated in place), got {type(a).__name__} "
                        f"{getattr(a, 'shape', '')}")
    work = {name: a.copy() for name, a in caches.items()}
    t.update(work)

    block = _BLOCKS["decode", kind]
    names = _DECODE_NAMES[kind]
    x_attn = np.empty(x_hc.shape, dtype=x_hc.dtype)
    per_rank = []
    for r in range(R):
        kw = {arg: t[names.get(arg, arg)][r] for arg in _block_args(block)}
        out = block(**kw, config=cfg, stages=stages)
        x_attn[r] = out["x_out"]
        if stages:
            per_rank.append(out["stages"])
    ffn = _moe(t, x_attn, input_ids, layer_id, T, cfg, stages)
    x_next = ffn["x_next"]

    for name, a in caches.items():
        np.copyto(a, work[name])
    out = {"x_next": x_next, "kv_cache": kv_cache, "hca_compress_state": hca_compress_state,
           "csa_compress_state": csa_compress_state,
           "csa_inner_compress_state": csa_inner_compress_state, "cmp_kv": cmp_kv,
           "idx_kv_cache": idx_kv_cache}
    if stages:
        st = {"attention": per_rank}
        st.update({name: np.stack([p[name] for p in per_rank]) for name in per_rank[0]})
        st["x_attn"] = x_attn
        st.update({"moe_" + name: v for name, v in ffn["stages"].items()})
        out["stages"] = st
    return out


# ----------------------------------------------------------------------- prefill

def _packed_stages(x_hc, wq_a, wq_b, wkv):
    """Zeroed [R, total, ...] arrays for the blocks' per-token stages, in block order."""
    R, total, HC, D = x_hc.shape
    Q, HD = wq_a.shape[-1], wkv.shape[-1]
    H = wq_b.shape[-1] // HD
    bf16, f32 = x_hc.dtype, np.float32
    shapes = {"x_mixed": ((D,), bf16), "post": ((HC,), f32), "comb": ((HC * HC,), f32),
              "x_normed": ((D,), bf16), "q": ((H, HD), bf16), "kv": ((HD,), bf16),
              "qr": ((Q,), np.int8), "qr_scale": ((1,), f32), "attn_out": ((D,), bf16)}
    return {name: np.zeros((R, total, *shape), dtype) for name, (shape, dtype) in shapes.items()}


class _Undo:
    """The original rows of every cache / state row a call may write, put back on failure."""

    def __init__(self):
        self.saved = []

    def keep(self, flat, rows):
        rows = np.unique(rows)
        self.saved.append((flat, rows, flat[rows].copy()))

    def restore(self):
        for flat, rows, vals in self.saved:
            flat[rows] = vals


def _request_slices(kern, t, kind, batch):
    """Per-request slice size of every packed per-request tensor the kind reads."""
    used = {"kv_cache"} | {_PREFILL_NAMES[kind].get(a, a)
                           for a in _block_args(_BLOCKS["prefill", kind])}
    cnt = {}
    for name in sorted(used & _REQUEST_SLICES):
        a = t[name]
        if not isinstance(a, np.ndarray) or a.ndim < 2:
            _fail(kern, f"{name} must be an ndarray [R, batch * cnt, ...], got "
                        f"{type(a).__name__} {getattr(a, 'shape', '')}")
        if a.shape[1] % batch:
            _fail(kern, f"{name} has {a.shape[1]} rows in dim 1, not a whole number per request "
                        f"for batch = {batch} requests (chunk_lens)")
        cnt[name] = a.shape[1] // batch
    return cnt


def _check_writes(kern, t, kind, tiles, cnt, R, undo):
    """Every slot an active row may write must address the request's slice; keep the
    original rows of all of them."""
    for cache, mapping in _PREFILL_WRITES[kind]:
        packed = t[cache]
        if not isinstance(packed, np.ndarray) or not packed.flags.writeable \
                or not packed.flags.c_contiguous:
            _fail(kern, f"{cache} must be a writeable, C-contiguous ndarray (it is updated in "
                        f"place)")
        slots = np.asarray(t[mapping])
        if slots.ndim != 2 or slots.shape[0] != R or slots.shape[1] != t["x_hc"].shape[1]:
            _fail(kern, f"{mapping} must be [R, total] = [{R}, {t['x_hc'].shape[1]}], got shape "
                        f"{slots.shape}")
        for k in range(R):
            per_req = {}
            for r, _tile, _ctx, valid, base in tiles:
                per_req.setdefault(r, []).append(slots[k, base:base + valid].astype(np.int64))
            for r, parts in per_req.items():
                view = packed[k, r * cnt[cache]:(r + 1) * cnt[cache]]
                flat = view.reshape(-1, view.shape[-1])
                s = np.concatenate(parts)
                bad = np.flatnonzero(s >= flat.shape[0])
                if bad.size:
                    _fail(kern, f"{mapping}[{k}] holds {int(s[bad[0]])} for an active row of "
                                f"request {r}, outside [0, {flat.shape[0]}) (rows of its slice "
                                f"of {cache})")
                undo.keep(flat, s[s >= 0])


@writes_outputs("x_next", inouts=("hca_cmp_kv_state", "hca_cmp_score_state", "csa_cmp_kv_state",
                                  "csa_cmp_score_state", "csa_inner_kv_state",
                                  "csa_inner_score_state", "kv_cache", "cmp_kv", "idx_kv_cache"))
def prefill_layer(x_hc, seq_lens, chunk_lens, chunk_offsets, chunk_tile_offsets, hc_attn_fn,
                  hc_attn_scale, hc_attn_base, attn_norm_w, wq_a, wq_b, wq_b_scale, wkv,
                  gamma_cq, gamma_ckv, freqs_cos, freqs_sin, hca_cmp_wkv, hca_cmp_wgate,
                  hca_cmp_ape, hca_cmp_norm_w, hca_cmp_kv_state, hca_cmp_score_state,
                  hca_compress_state_block_table, csa_cmp_wkv, csa_cmp_wgate, csa_cmp_ape,
                  csa_cmp_norm_w, csa_cmp_kv_state, csa_cmp_score_state,
                  csa_compress_state_block_table, csa_hadamard_idx, csa_idx_wq_b,
                  csa_idx_wq_b_scale, csa_weights_proj, csa_inner_wkv, csa_inner_wgate,
                  csa_inner_ape, csa_inner_norm_w, csa_inner_kv_state, csa_inner_score_state,
                  csa_inner_compress_state_block_table, kv_cache, ori_block_table,
                  ori_slot_mapping, cmp_kv, cmp_block_table, cmp_sparse_indices, cmp_sparse_lens,
                  idx_kv_cache, idx_block_table, position_ids, hca_cmp_slot_mapping,
                  hca_state_slot_mapping, csa_cmp_slot_mapping, csa_idx_slot_mapping,
                  csa_state_slot_mapping, csa_inner_state_slot_mapping, attn_sink, wo_a, wo_b,
                  wo_b_scale, hc_ffn_fn, hc_ffn_scale, hc_ffn_base, norm_w, gate_w, gate_bias,
                  tid2eid, input_ids, routed_w1, routed_w1_scale, routed_w3, routed_w3_scale,
                  routed_w2, routed_w2_scale, shared_w1, shared_w1_scale, shared_w3,
                  shared_w3_scale, shared_w2, shared_w2_scale, layer_id, *, config=None,
                  stages=False):
    """One decoder layer over a packed batch of prefill chunks on R ranks (§6).

    Every tensor has a leading rank axis R. Per-token tensors (x_hc [R, total, HC, D],
    input_ids, position_ids, the slot mappings, cmp_sparse_indices / lens) are packed:
    request r's chunk of chunk_lens[r] tokens starts at row chunk_offsets[r], padded to
    whole tiles of TILE = 128 rows. Caches, states and tables are per request: request r
    owns rows [r cnt, (r + 1) cnt) of dim 1 (cnt = dim 1 / batch), addressed by absolute
    positions with request-local tables. For each request, for each of its tiles (valid =
    its active rows): the prefill attention block of the layer's kind on every rank with
    the tile's rows and the request's slices (updated in place, so the next tile reads
    this one's writes; the CSA block builds its own index rows), num_tokens = valid; then
    the MoE sub-layer on the TILE-row attention output (input_ids zero past valid,
    num_tokens = valid); its valid rows go to x_next. Padding rows of x_next stay zero.

    Returns x_next [R, total, HC, D] bf16 and the caches and states. A call that raises
    changes nothing.

    Stages (stages=True, spec chapter 06 §6): tiles, the list of the tiles in execution
    order, each {"request", "tile", "ctx", "valid", "base", "attention": [the block's
    stage dicts per rank], "x_attn" [R, TILE, HC, D]}; then the blocks' per-token stages
    packed as x_hc, [R, total, ...] with each tile's valid rows and zeros elsewhere (the
    C kernel's stages too): x_mixed [R, total, D], post, comb, x_normed, q, kv, qr,
    qr_scale, attn_out [R, total, D]; and x_attn [R, total, HC, D] bf16, the blocks' x_out
    packed as x_hc (every row of each tile, zero rows outside the tiles)."""
    kern = "prefill_layer"
    cfg = get_config(config)
    kind = layer_kind(layer_id, cfg)
    layer_id = int(layer_id)
    t = dict(locals())
    R = _ranks(kern, x_hc, "total")
    total = x_hc.shape[1]
    tiles = prefill_tiles(chunk_lens, chunk_offsets, seq_lens)
    batch = np.shape(chunk_lens)[-1]
    for r, tile, _ctx, _valid, base in tiles:
        if base < 0 or base + TILE > total:
            _fail(kern, f"tile {tile} of request {r} covers packed rows [{base}, {base + TILE}), "
                        f"outside the {total} rows of x_hc (chunk_offsets must leave every "
                        f"request whole tiles of {TILE} rows)")
    cnt = _request_slices(kern, t, kind, batch)
    undo = _Undo()
    _check_writes(kern, t, kind, tiles, cnt, R, undo)

    block = _BLOCKS["prefill", kind]
    names = _PREFILL_NAMES[kind]
    args = _block_args(block)
    x_next = np.zeros(x_hc.shape, dtype=x_hc.dtype)
    packed = np.zeros(x_hc.shape, dtype=x_hc.dtype) if stages else None
    packed_stages = _packed_stages(x_hc, wq_a, wq_b, wkv) if stages else None
    ids = np.asarray(input_ids)
    done = []
    try:
        for r, tile, ctx, valid, base in tiles:
            x_attn = np.zeros((R, TILE, *x_hc.shape[2:]), dtype=x_hc.dtype)
            per_rank = []
            for k in range(R):
                kw = {}
                for arg in args:
                    name = names.get(arg, arg)
                    a = t[name]
                    if name in _TOKEN_ROWS:
                        kw[arg] = np.ascontiguousarray(a[k, base:base + TILE])
                    elif name in _REQUEST_SLICES:
                        kw[arg] = a[k, r * cnt[name]:(r + 1) * cnt[name]]
                    else:
                        kw[arg] = a[k]
                out = block(**kw, num_tokens=valid, config=cfg, stages=stages)
                x_attn[k] = out["x_out"]
                if stages:
                    per_rank.append(out["stages"])
            tile_ids = np.zeros((R, TILE), dtype=ids.dtype)
            tile_ids[:, :valid] = ids[:, base:base + valid]
            y = _moe(t, x_attn, tile_ids, layer_id, valid, cfg)["x_next"]
            x_next[:, base:base + valid] = y[:, :valid]
            if stages:
                packed[:, base:base + TILE] = x_attn
                for name, a in packed_stages.items():
                    a[:, base:base + valid] = np.stack([p[name][:valid] for p in per_rank])
                done.append({"request": r, "tile": tile, "ctx": ctx, "valid": valid,
                             "base": base, "attention": per_rank, "x_attn": x_attn})
    except BaseException:
        undo.restore()
        raise

    out = {"x_next": x_next, "hca_cmp_kv_state": hca_cmp_kv_state,
           "hca_cmp_score_state": hca_cmp_score_state, "csa_cmp_kv_state": csa_cmp_kv_state,
           "csa_cmp_score_state": csa_cmp_score_state, "csa_inner_kv_state": csa_inner_kv_state,
           "csa_inner_score_state": csa_inner_score_state, "kv_cache": kv_cache,
           "cmp_kv": cmp_kv, "idx_kv_cache": idx_kv_cache}
    if stages:
        out["stages"] = {"tiles": done, **packed_stages, "x_attn": packed}
    return out
