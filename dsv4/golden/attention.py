"""Goldens of the sparse-attention kernels (spec chapter 03): prefill_sparse_attn,
decode_sparse_attn (CSA), decode_sparse_attn_hca, decode_sparse_attn_swa.

Every golden turns a per-token list of raw KV indices into rows of three sources
(the ring cache, the current tokens' overlay rows, the compressed cache), attends
to them tile by tile with an online softmax and a per-head sink (§2.2-2.4), undoes
the RoPE on the output (§2.5) and applies the grouped output projection with a
per-(token, group) int8 quantisation (§2.6). The four goldens differ only in how
a raw index is decoded and how the rows are cut into tiles, which is part of
the contract because the probabilities are rounded to bf16 relative to each
tile's maximum:

    prefill  the gathered rows, compacted, in tiles of 128 (§3.4)
    CSA/HCA  positional tiles of 128 index columns, invalid columns masked (§5.3)
    SWA      the request's ring page in physical order, then the overlay block,
             validity as sets (§7.4)

Shapes come from the arrays; the window, index_topk and the RoPE width from
`config` (a preset name or a DeepSeekV4Config; default FLASH). Every block-table
entry and page index the computation would dereference is checked before
anything is computed (ValueError naming the tensor and the first bad position).
"""
import numpy as np

from ..config import get_config
from ._outputs import writes_outputs
from .numerics import (
    BF16, F32, bf16_rne, exp32, f32, int8_quant_per_row, matmul_i8, rope_interleaved,
    round_bf16,
)

ATTN_TILE = 128                 # softmax tile width of every golden
NEG_INF = F32(-1e20)            # the decode goldens' mask value (§5.4)

# where a gathered row comes from
_NONE, _RING, _OVERLAY, _CMP = -1, 0, 1, 2


# ---------------------------------------------------------------- shapes and checks

class _Dims:
    """T, H, HD from q; BLOCK from ori_kv; G, O_LORA, OGI from wo_a; D from wo_b."""

    def __init__(self, kernel, q, ori_kv, wo_a, wo_b, wo_b_scale, attn_sink, freqs_cos, freqs_sin,
                 cfg):
        self.kernel = kernel
        if q.ndim != 3:
            raise ValueError(f"{kernel}: q must be [T, H, HD], got shape {q.shape}")
        self.T, self.H, self.HD = q.shape
        if ori_kv.ndim != 4 or ori_kv.shape[2] != 1 or ori_kv.shape[3] != self.HD:
            raise ValueError(f"{kernel}: ori_kv must be [pages, BLOCK, 1, {self.HD}], got shape "
                             f"{ori_kv.shape}")
        self.BLOCK = ori_kv.shape[1]
        if wo_a.ndim != 3:
            raise ValueError(f"{kernel}: wo_a must be [G, O_LORA, OGI], got shape {wo_a.shape}")
        self.G, self.O_LORA, self.OGI = wo_a.shape
        if self.G * self.OGI != self.H * self.HD or self.H % self.G:
            raise ValueError(f"{kernel}: wo_a {wo_a.shape} does not cut the {self.H} heads of "
                             f"{self.HD} into G groups of whole heads")
        if wo_b.ndim != 2 or wo_b.shape[1] != self.G * self.O_LORA:
            raise ValueError(f"{kernel}: wo_b must be [D, {self.G * self.O_LORA}], got shape "
                             f"{wo_b.shape}")
        self.D = wo_b.shape[0]
        if np.shape(wo_b_scale) not in ((self.D,), (self.D, 1), (1, self.D)):
            raise ValueError(f"{kernel}: wo_b_scale must hold D = {self.D} scales, got shape "
                             f"{np.shape(wo_b_scale)}")
        if np.shape(attn_sink) != (self.H,):
            raise ValueError(f"{kernel}: attn_sink must be [{self.H}], got shape {np.shape(attn_sink)}")
        self.R = cfg.qk_rope_head_dim
        if not 0 < self.R <= self.HD or self.R % 2:
            raise ValueError(f"{kernel}: qk_rope_head_dim = {self.R} does not fit head_dim {self.HD}")
        for name, f in (("freqs_cos", freqs_cos), ("freqs_sin", freqs_sin)):
            if f.shape != (self.T, self.R):
                raise ValueError(f"{kernel}: {name} must be [T = {self.T}, {self.R}] (per-token "
                                 f"rows), got shape {f.shape}")
        self.WIN = int(cfg.sliding_window)
        self.SCALE = F32(float(self.HD ** -0.5))

    def index_shape(self, name, idx, rows):
        if idx.ndim != 2 or idx.shape[0] != rows:
            raise ValueError(f"{self.kernel}: {name} must be [{rows}, K], got shape {idx.shape}")


def _raise_first(kernel, checks, shape):
    """checks: (bad mask over the index positions, message(t, k)) in the order they apply
    to one position. Raises for the first position (row-major) any check finds."""
    first = None
    for bad, msg in checks:
        if bad.any():
            pos = int(np.flatnonzero(bad.reshape(-1))[0])
            if first is None or pos < first[0]:
                first = (pos, msg)
    if first is not None:
        t, k = np.unravel_index(first[0], shape)
        raise ValueError(f"{kernel}: {first[1](int(t), int(k))}")


def _page_checks(kernel, raw, use, page, table, table_rows, pages, table_name, pool_name,
                 idx_name, what):
    """Checks of one paged lookup at the positions `use`: the logical page index must lie
    in the table row, the physical page it names in the pool. Returns (checks, block ids)."""
    width = table.shape[-1]
    bad_page = use & (page >= width)
    ok = use & ~bad_page
    blk = np.full(raw.shape, -1, np.int64)
    blk[ok] = table[table_rows[ok], page[ok]] if table.ndim == 2 else table[page[ok]]
    bad_blk = ok & ((blk < 0) | (blk >= pages))

    def where(t, k):
        return (f"[{int(table_rows[t, k])}, {int(page[t, k])}]" if table.ndim == 2
                else f"[{int(page[t, k])}]")

    checks = [
        (bad_page, lambda t, k: (f"{idx_name}[{t}, {k}] = {int(raw[t, k])} addresses {what} page "
                                 f"{int(page[t, k])} >= {table_name} width {width}")),
        (bad_blk, lambda t, k: (f"{table_name}{where(t, k)} = {int(blk[t, k])} is outside "
                                f"[0, {pages}) (pages of {pool_name}), dereferenced by "
                                f"{idx_name}[{t}, {k}] = {int(raw[t, k])}")),
    ]
    return checks, blk


# ------------------------------------------------------------------ building blocks

def tile_stats(qt, kv, scale):
    """§2.2 for one query token and one tile of valid rows: qt [H, HD], kv [n, HD] (fp32
    holding bf16 values), n >= 1. Returns m [H], l [H] (sum of the fp32 exps) and
    o [H, HD] (the bf16-rounded exps times the rows)."""
    s = np.matmul(qt, kv.T) * scale
    m = np.max(s, axis=1)
    e = exp32(s - m[:, None])
    l = np.sum(e, axis=1, dtype=np.float32)
    o = np.matmul(round_bf16(e), kv)
    return m, l, o


def merge(state, tile):
    """§2.3: fold a later tile's (m, l, o) into the running state."""
    m, l, o = state
    mj, lj, oj = tile
    mn = np.maximum(m, mj)
    alpha = exp32(m - mn)
    beta = exp32(mj - mn)
    return mn, alpha * l + beta * lj, o * alpha[:, None] + oj * beta[:, None]


def attend(qt, tiles, scale, sink):
    """Tiles (each [n >= 1, HD] fp32) merged in order, then the sink (§2.4): O [H, HD]
    fp32, or None if there is no tile."""
    state = None
    for kv in tiles:
        st = tile_stats(qt, kv, scale)
        state = st if state is None else merge(state, st)
    if state is None:
        return None
    m, l, o = state
    denom = l + exp32(sink - m)
    return o / denom[:, None]


def inverse_rope(O, freqs_cos, freqs_sin, R):
    """§2.5: O [T, H, HD] fp32 -> bf16; the NOPE part rounded once, the last R columns
    turned back by the token's angles (interleaved pairs) and rounded."""
    N = O.shape[-1] - R
    Ob = np.empty(O.shape, BF16)
    Ob[..., :N] = bf16_rne(O[..., :N])
    Ob[..., N:] = rope_interleaved(O[..., N:], f32(freqs_cos)[:, None, :R],
                                   f32(freqs_sin)[:, None, :R], inverse=True)
    return Ob


def grouped_projection(Ob, wo_a, wo_b, wo_b_scale):
    """§2.6: Ob [T, H, HD] bf16 -> attn_out [T, D] bf16, plus the stages o_r [T, G, O_LORA],
    q8 [T, G, O_LORA] int8 and sdq [T, G]."""
    T = Ob.shape[0]
    G, O_LORA, OGI = wo_a.shape
    x = f32(Ob).reshape(T, G, OGI)
    o_r = np.empty((T, G, O_LORA), np.float32)
    for g in range(G):
        o_r[:, g] = np.matmul(x[:, g], f32(wo_a[g]).T)
    q8, sdq = int8_quant_per_row(o_r)                 # one amax per (token, group)
    wo_b = np.asarray(wo_b)
    acc = np.zeros((T, wo_b.shape[0]), np.float32)
    for g in range(G):                                # dequantised group by group, in order
        p = matmul_i8(q8[:, g], wo_b[:, g * O_LORA:(g + 1) * O_LORA].T)
        acc = acc + p.astype(np.float32) * sdq[:, g]
    out = acc * f32(wo_b_scale).reshape(1, -1)
    return bf16_rne(out), o_r, q8, sdq[..., 0]


def _finish(O, freqs_cos, freqs_sin, wo_a, wo_b, wo_b_scale, dims, stages):
    Ob = inverse_rope(O, freqs_cos, freqs_sin, dims.R)
    attn_out, o_r, q8, sdq = grouped_projection(Ob, wo_a, wo_b, wo_b_scale)
    out = {"attn_out": attn_out}
    if stages:
        out["stages"] = {"O": O, "Ob": Ob, "o_r": o_r, "q8": q8, "sdq": sdq}
    return out


def _rows(src, row, sources):
    """Gather rows (as fp32) from the flattened sources by (source id, row)."""
    out = np.empty((len(src), sources[0].shape[-1]), np.float32)
    for sid, flat in enumerate(sources):
        sel = src == sid
        if sel.any():
            out[sel] = f32(flat[row[sel]])
    return out


def _flat(kv):
    return np.asarray(kv).reshape(-1, kv.shape[-1])


# ----------------------------------------------------------------------- prefill

def prefill_pad(K, T, WIN, index_topk):
    """PREFILL_SPARSE_PAD (§1.2 with S = T): the most index columns a token may use."""
    max_cmp = max(1, min(index_topk, WIN + WIN // 2))
    topk = min(K, min(WIN, T) + max_cmp)
    return -(-topk // ATTN_TILE) * ATTN_TILE


def _prefill_resolve(idx, lens, num_tokens, ori_block_table, ori_pages, cmp_block_table,
                     cmp_pages, dims, cfg):
    """§3.3 for every (token, column): source and flat row of each gathered entry; -1 for
    entries that are skipped, not read or empty."""
    T, K = idx.shape
    WIN, BLOCK, kern = dims.WIN, dims.BLOCK, dims.kernel
    raw = idx.astype(np.int64)
    PAD = prefill_pad(K, T, WIN, cfg.index_topk)
    L = np.clip(np.minimum(np.asarray(lens).astype(np.int64).reshape(T), min(PAD, K)), 0, None)
    L[num_tokens:] = 0
    read = np.arange(K)[None, :] < L[:, None]

    ring = read & (raw >= 0) & (raw < WIN)
    u = raw - WIN
    ov = read & (raw >= WIN) & (raw < WIN + T) & (u < num_tokens)
    c = raw - (WIN + T)
    cap = cmp_block_table.shape[0] * BLOCK
    cmp = read & (raw >= WIN + T) & (c < cap)

    zeros = np.zeros(raw.shape, np.int64)
    ring_checks, ring_blk = _page_checks(
        kern, raw, ring, np.where(ring, raw // BLOCK, 0), ori_block_table, zeros, ori_pages,
        "ori_block_table", "ori_kv", "cmp_sparse_indices", "ring")
    cmp_checks, cmp_blk = _page_checks(
        kern, raw, cmp, np.where(cmp, c // BLOCK, 0), cmp_block_table, zeros, cmp_pages,
        "cmp_block_table", "cmp_kv", "cmp_sparse_indices", "compressed")
    _raise_first(kern, ring_checks + cmp_checks, raw.shape)

    src = np.full(raw.shape, _NONE, np.int8)
    row = np.zeros(raw.shape, np.int64)
    src[ring], row[ring] = _RING, (ring_blk * BLOCK + raw % BLOCK)[ring]
    src[ov], row[ov] = _OVERLAY, u[ov]
    src[cmp], row[cmp] = _CMP, (cmp_blk * BLOCK + c % BLOCK)[cmp]
    return src, row


@writes_outputs("attn_out")
def prefill_sparse_attn(q, ori_kv, ori_block_table, kv_overlay, cmp_kv, cmp_block_table,
                        cmp_sparse_indices, cmp_sparse_lens, attn_sink, freqs_cos, freqs_sin,
                        wo_a, wo_b, wo_b_scale, num_tokens=None, *, config=None, stages=False):
    """Prefill sparse attention of one request's chunk of T tokens (§3).

    Token t < num_tokens (default T) reads the first L(t) = clamp(cmp_sparse_lens[t],
    0, PAD) columns of its index row: raw < 0 empty, [0, WIN) a ring slot through the
    1-D ori_block_table, [WIN, WIN + T) overlay row raw - WIN (skipped if >= num_tokens),
    from WIN + T compressed slot c (skipped if c >= cmp_block_table entries * BLOCK).
    The gathered rows, compacted, are attended in tiles of 128; rows t >= num_tokens
    are zero. Returns attn_out [T, D] bf16.

    Stages (stages=True, spec chapter 03 §2.4-§2.6): O [T, H, HD] fp32 (attention
    output after the sink, zero for tokens with no row), Ob [T, H, HD] bf16 (after the
    inverse RoPE), o_r [T, G, O_LORA] fp32 (first projection), q8 [T, G, O_LORA] int8,
    sdq [T, G] fp32 (its per-(token, group) dequant scales).
    """
    cfg = get_config(config)
    q, ori_kv, wo_a, wo_b, freqs_cos, freqs_sin = (
        np.asarray(a) for a in (q, ori_kv, wo_a, wo_b, freqs_cos, freqs_sin))
    d = _Dims("prefill_sparse_attn", q, ori_kv, wo_a, wo_b, wo_b_scale, attn_sink, freqs_cos,
              freqs_sin, cfg)
    T = d.T
    num_tokens = T if num_tokens is None else int(num_tokens)
    if not 0 <= num_tokens <= T:
        raise ValueError(f"prefill_sparse_attn: num_tokens = {num_tokens} is outside [0, T = {T}]")
    idx = np.asarray(cmp_sparse_indices)
    d.index_shape("cmp_sparse_indices", idx, T)
    if np.shape(cmp_sparse_lens) not in ((T,), (T, 1)):
        raise ValueError(f"prefill_sparse_attn: cmp_sparse_lens must be [{T}], got shape "
                         f"{np.shape(cmp_sparse_lens)}")
    for name, tbl in (("ori_block_table", ori_block_table), ("cmp_block_table", cmp_block_table)):
        if np.ndim(tbl) != 1:
            raise ValueError(f"prefill_sparse_attn: {name} must be 1-D (one request), got shape "
                             f"{np.shape(tbl)}")
    if np.shape(kv_overlay) != (T, d.HD):
        raise ValueError(f"prefill_sparse_attn: kv_overlay must be [{T}, {d.HD}], got shape "
                         f"{np.shape(kv_overlay)}")
    cmp_kv = np.asarray(cmp_kv)
    if cmp_kv.ndim != 4 or cmp_kv.shape[1:] != (d.BLOCK, 1, d.HD):
        raise ValueError(f"prefill_sparse_attn: cmp_kv must be [pages, {d.BLOCK}, 1, {d.HD}], "
                         f"got shape {cmp_kv.shape}")

    src, row = _prefill_resolve(idx, cmp_sparse_lens, num_tokens,
                                np.asarray(ori_block_table).astype(np.int64), ori_kv.shape[0],
                                np.asarray(cmp_block_table).astype(np.int64), cmp_kv.shape[0],
                                d, cfg)

    qf, sink = f32(q), f32(attn_sink)
    sources = (_flat(ori_kv), np.asarray(kv_overlay), _flat(cmp_kv))
    O = np.zeros((T, d.H, d.HD), np.float32)
    for t in range(num_tokens):
        keep = src[t] != _NONE
        if not keep.any():
            continue
        kv = _rows(src[t][keep], row[t][keep], sources)         # the compacted list
        tiles = [kv[i:i + ATTN_TILE] for i in range(0, len(kv), ATTN_TILE)]
        O[t] = attend(qf[t], tiles, d.SCALE, sink)
    return _finish(O, freqs_cos, freqs_sin, wo_a, wo_b, wo_b_scale, d, stages)


# ------------------------------------------------------------------------ decode

def _decode_setup(kernel, q, ori_kv, ori_block_table, mtp_kv_overlay, cmp_sparse_indices,
                  attn_sink, freqs_cos, freqs_sin, wo_a, wo_b, wo_b_scale, config):
    cfg = get_config(config)
    d = _Dims(kernel, q, ori_kv, wo_a, wo_b, wo_b_scale, attn_sink, freqs_cos, freqs_sin, cfg)
    tbl = np.asarray(ori_block_table)
    if tbl.ndim != 2 or tbl.shape[0] < 1:
        raise ValueError(f"{kernel}: ori_block_table must be [B, pages per request], got shape "
                         f"{tbl.shape}")
    B = tbl.shape[0]
    if d.T % B:
        raise ValueError(f"{kernel}: T = {d.T} tokens (rows of q) is not a multiple of "
                         f"B = {B} requests (rows of ori_block_table)")
    d.B, d.S = B, d.T // B
    if np.shape(mtp_kv_overlay) != (d.T, d.HD):
        raise ValueError(f"{kernel}: mtp_kv_overlay must be [{d.T}, {d.HD}], got shape "
                         f"{np.shape(mtp_kv_overlay)}")
    idx = np.asarray(cmp_sparse_indices)
    d.index_shape("cmp_sparse_indices", idx, d.T)
    return d, idx.astype(np.int64), tbl.astype(np.int64)


def _decode_resolve(raw, ori_tbl, ori_pages, cmp_tbl, cmp_pages, d):
    """§4 for every (token, column): source and flat row; raw < 0 is invalid."""
    WIN, S, BLOCK = d.WIN, d.S, d.BLOCK
    b = np.broadcast_to((np.arange(d.T) // S)[:, None], raw.shape)
    ring = (raw >= 0) & (raw < WIN)
    ov = (raw >= WIN) & (raw < WIN + S)
    c = raw - (WIN + S)
    cmp = raw >= WIN + S
    ring_checks, ring_blk = _page_checks(
        d.kernel, raw, ring, np.where(ring, raw // BLOCK, 0), ori_tbl, b, ori_pages,
        "ori_block_table", "ori_kv", "cmp_sparse_indices", "ring")
    checks = ring_checks
    if cmp_tbl is not None:
        cmp_checks, cmp_blk = _page_checks(
            d.kernel, raw, cmp, np.where(cmp, c // BLOCK, 0), cmp_tbl, b, cmp_pages,
            "cmp_block_table", "cmp_kv", "cmp_sparse_indices", "compressed")
        checks = checks + cmp_checks
    _raise_first(d.kernel, checks, raw.shape)

    src = np.full(raw.shape, _NONE, np.int8)
    row = np.zeros(raw.shape, np.int64)
    src[ring], row[ring] = _RING, (ring_blk * BLOCK + raw % BLOCK)[ring]
    src[ov], row[ov] = _OVERLAY, (b * S + raw - WIN)[ov]
    if cmp_tbl is not None:
        src[cmp], row[cmp] = _CMP, (cmp_blk * BLOCK + c % BLOCK)[cmp]
    return src, row


def _check_cmp(kernel, cmp_kv, cmp_block_table, d):
    cmp_kv = np.asarray(cmp_kv)
    if cmp_kv.ndim != 4 or cmp_kv.shape[1:] != (d.BLOCK, 1, d.HD):
        raise ValueError(f"{kernel}: cmp_kv must be [pages, {d.BLOCK}, 1, {d.HD}], got shape "
                         f"{cmp_kv.shape}")
    tbl = np.asarray(cmp_block_table)
    if tbl.ndim != 2 or tbl.shape[0] != d.B:
        raise ValueError(f"{kernel}: cmp_block_table must be [B = {d.B}, pages per request], "
                         f"got shape {tbl.shape}")
    return cmp_kv, tbl.astype(np.int64)


def _positional(kernel, q, ori_kv, ori_block_table, mtp_kv_overlay, cmp_kv, cmp_block_table,
                cmp_sparse_indices, attn_sink, freqs_cos, freqs_sin, wo_a, wo_b, wo_b_scale,
                config, stages):
    """CSA and HCA (§5.3, §6.3): every column of the index row, in positional tiles of
    128 columns; invalid columns are masked, i.e. absent from their tile."""
    q, ori_kv, wo_a, wo_b, freqs_cos, freqs_sin = (
        np.asarray(a) for a in (q, ori_kv, wo_a, wo_b, freqs_cos, freqs_sin))
    d, raw, ori_tbl = _decode_setup(kernel, q, ori_kv, ori_block_table, mtp_kv_overlay,
                                    cmp_sparse_indices, attn_sink, freqs_cos, freqs_sin, wo_a,
                                    wo_b, wo_b_scale, config)
    cmp_kv, cmp_tbl = _check_cmp(kernel, cmp_kv, cmp_block_table, d)
    src, row = _decode_resolve(raw, ori_tbl, ori_kv.shape[0], cmp_tbl, cmp_kv.shape[0], d)

    qf, sink = f32(q), f32(attn_sink)
    sources = (_flat(ori_kv), np.asarray(mtp_kv_overlay), _flat(cmp_kv))
    K = raw.shape[1]
    O = np.zeros((d.T, d.H, d.HD), np.float32)
    for t in range(d.T):
        tiles = []
        for k0 in range(0, K, ATTN_TILE):
            s, r = src[t, k0:k0 + ATTN_TILE], row[t, k0:k0 + ATTN_TILE]
            keep = s != _NONE
            if keep.any():                         # an all-masked tile merges as a no-op
                tiles.append(_rows(s[keep], r[keep], sources))
        o = attend(qf[t], tiles, d.SCALE, sink)
        if o is not None:
            O[t] = o
    return _finish(O, freqs_cos, freqs_sin, wo_a, wo_b, wo_b_scale, d, stages)


@writes_outputs("attn_out")
def decode_sparse_attn(q, ori_kv, ori_block_table, mtp_kv_overlay, cmp_kv, cmp_block_table,
                       cmp_sparse_indices, attn_sink, freqs_cos, freqs_sin, wo_a, wo_b,
                       wo_b_scale, valid_block_mask=None, *, config=None, stages=False):
    """Decode sparse attention, CSA (§5): B = rows of ori_block_table requests of S = T / B
    tokens. Each token reads all K columns of its index row: raw < 0 invalid, [0, WIN)
    ring slot, [WIN, WIN + S) the request's current token raw - WIN, from WIN + S a
    compressed slot through the request's cmp_block_table row. Positional tiles of 128
    columns, masked; duplicates count twice. valid_block_mask is ignored. Returns
    attn_out [T, D] bf16.

    Stages (stages=True, spec chapter 03 §2.4-§2.6): O [T, H, HD] fp32 (attention
    output after the sink, zero for tokens with no row), Ob [T, H, HD] bf16 (after the
    inverse RoPE), o_r [T, G, O_LORA] fp32 (first projection), q8 [T, G, O_LORA] int8,
    sdq [T, G] fp32 (its per-(token, group) dequant scales).
    """
    return _positional("decode_sparse_attn", q, ori_kv, ori_block_table, mtp_kv_overlay, cmp_kv,
                       cmp_block_table, cmp_sparse_indices, attn_sink, freqs_cos, freqs_sin,
                       wo_a, wo_b, wo_b_scale, config, stages)


@writes_outputs("attn_out")
def decode_sparse_attn_hca(q, ori_kv, ori_block_table, mtp_kv_overlay, cmp_kv, cmp_block_table,
                           cmp_sparse_indices, attn_sink, freqs_cos, freqs_sin, wo_a, wo_b,
                           wo_b_scale, *, config=None, stages=False):
    """Decode sparse attention, HCA (§6): the CSA computation over all K (384) columns of
    the index row, including those past the module's TOPK.

    Stages (stages=True, spec chapter 03 §2.4-§2.6): O [T, H, HD] fp32 (attention
    output after the sink, zero for tokens with no row), Ob [T, H, HD] bf16 (after the
    inverse RoPE), o_r [T, G, O_LORA] fp32 (first projection), q8 [T, G, O_LORA] int8,
    sdq [T, G] fp32 (its per-(token, group) dequant scales).
    """
    return _positional("decode_sparse_attn_hca", q, ori_kv, ori_block_table, mtp_kv_overlay,
                       cmp_kv, cmp_block_table, cmp_sparse_indices, attn_sink, freqs_cos,
                       freqs_sin, wo_a, wo_b, wo_b_scale, config, stages)


@writes_outputs("attn_out")
def decode_sparse_attn_swa(q, ori_kv, ori_block_table, mtp_kv_overlay, cmp_sparse_indices,
                           attn_sink, freqs_cos, freqs_sin, wo_a, wo_b, wo_b_scale, cmp_kv=None,
                           cmp_block_table=None, win_bias=None, *, config=None, stages=False):
    """Decode sliding-window attention, SWA (§7). The index row only says which rows are
    valid, as sets: ring slots [0, WIN) and the request's current tokens [WIN, WIN + S);
    anything else is ignored. Tile 0 is the request's ring in physical slot order
    (one tile per 128 slots), the last tile the overlay block: rows 0..T-1 =
    mtp_kv_overlay, rows T..127 zero (so T <= 128). cmp_kv, cmp_block_table and
    win_bias are ignored.

    Stages (stages=True, spec chapter 03 §2.4-§2.6): O [T, H, HD] fp32 (attention
    output after the sink, zero for tokens with no row), Ob [T, H, HD] bf16 (after the
    inverse RoPE), o_r [T, G, O_LORA] fp32 (first projection), q8 [T, G, O_LORA] int8,
    sdq [T, G] fp32 (its per-(token, group) dequant scales).
    """
    kern = "decode_sparse_attn_swa"
    q, ori_kv, wo_a, wo_b, freqs_cos, freqs_sin = (
        np.asarray(a) for a in (q, ori_kv, wo_a, wo_b, freqs_cos, freqs_sin))
    d, raw, ori_tbl = _decode_setup(kern, q, ori_kv, ori_block_table, mtp_kv_overlay,
                                    cmp_sparse_indices, attn_sink, freqs_cos, freqs_sin, wo_a,
                                    wo_b, wo_b_scale, config)
    if d.T > ATTN_TILE:
        raise ValueError(f"{kern}: T = {d.T} tokens do not fit the {ATTN_TILE}-row overlay block "
                         f"(T <= {ATTN_TILE})")
    WIN, S, BLOCK = d.WIN, d.S, d.BLOCK
    src, row = _decode_resolve(raw, ori_tbl, ori_kv.shape[0], None, 0, d)
    # validity sets: slot s of the ring, row o of the overlay block
    n_ring_tiles = -(-WIN // ATTN_TILE)
    ring_valid = np.zeros((d.T, n_ring_tiles * ATTN_TILE), bool)
    ov_valid = np.zeros((d.T, ATTN_TILE), bool)
    tt, kk = np.nonzero(src == _RING)
    ring_valid[tt, raw[tt, kk]] = True
    tt, kk = np.nonzero(src == _OVERLAY)
    ov_valid[tt, row[tt, kk]] = True
    # the physical row of each ring slot, where the slot is valid (checked above)
    slot = np.arange(ring_valid.shape[1])
    b = np.arange(d.T) // S

    qf, sink = f32(q), f32(attn_sink)
    ring_flat, overlay = _flat(ori_kv), f32(mtp_kv_overlay)
    O = np.zeros((d.T, d.H, d.HD), np.float32)
    for t in range(d.T):
        tiles = []
        for j in range(n_ring_tiles):
            s = slot[j * ATTN_TILE:(j + 1) * ATTN_TILE][ring_valid[t, j * ATTN_TILE:(j + 1) * ATTN_TILE]]
            if len(s):
                pages = ori_tbl[b[t], s // BLOCK]
                tiles.append(f32(ring_flat[pages * BLOCK + s % BLOCK]))
        o_rows = np.flatnonzero(ov_valid[t])          # padding rows T..127 are never valid
        if len(o_rows):
            tiles.append(overlay[o_rows])
        o = attend(qf[t], tiles, d.SCALE, sink)
        if o is not None:
            O[t] = o
    return _finish(O, freqs_cos, freqs_sin, wo_a, wo_b, wo_b_scale, d, stages)
