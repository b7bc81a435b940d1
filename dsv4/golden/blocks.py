"""Goldens of the attention blocks (spec chapter 06 §2-§4): one decode step or one prefill
tile of a sliding-window (SWA), heavily compressed (HCA, ratio 128) or compressed sparse
(CSA, ratio 4) attention layer, composed from the leaf goldens in pypto-lib's order (§2.1):

    hc_pre -> rms_norm -> RoPE rows -> qkv_proj_rope
    -> (HCA, CSA) main compressor -> (CSA) indexer with its inner compressor
    -> sparse index rows -> sparse attention (inverse RoPE, grouped o_proj)
    -> ring-cache write-back -> hc_post

Every cache and state is updated in place, in that order (§2.5): the compressors write
before attention, so a token that completes a window sees its own compressed row; the
attention reads the window ring as it was before the call; only then is each token's kv
written to its ring slot. A call that raises changes nothing: the block works on copies
and writes them back once every stage has run.

With stages=True a block also returns the intermediates an NPU engineer dumps when a block
fails, under "stages" (names as in the C kernel's stages): x_mixed, post, comb, x_normed,
qr, qr_scale, q, kv, the decode compressor's fp32 entry (compressed_kv), the indexer's
topk_idxs, the sparse index rows the block built (sparse_indices, and sparse_lens in
prefill) and attn_out.
"""
import numpy as np

from ..config import PREFILL_CMP_MAX_BLOCKS, get_config
from ..rope import gather_rope_rows
from . import attention, compressor, hc, indexer, qkv
from ._outputs import writes_outputs
from .attention import ATTN_TILE, prefill_pad
from .numerics import f32


def _fail(kernel, msg):
    raise ValueError(f"{kernel}: {msg}")


def _ints(a):
    return np.asarray(a).astype(np.int64).reshape(-1)


def _check_slots(kernel, name, slots, rows, what):
    """A slot mapping addresses rows [0, rows) of `what`; -1 (any negative) skips."""
    bad = np.flatnonzero(slots >= rows)
    if bad.size:
        i = int(bad[0])
        _fail(kernel, f"{name}[{i}] = {int(slots[i])} is outside [0, {rows}) (rows of {what})")


def _check_pages(kernel, table, b, pages, pool, tname, pname, why):
    """Entries 0 .. pages-1 of a block-table row (row b of a 2-D table) must address pages
    [0, pool) of the cache: every page the block may read, checked before any write."""
    table = np.asarray(table)
    row = table[b] if table.ndim == 2 else table
    if pages > row.shape[0]:
        _fail(kernel, f"{why} needs {pages} pages of {tname}, which has {row.shape[0]} columns")
    bad = np.flatnonzero((row[:pages] < 0) | (row[:pages] >= pool))
    if bad.size:
        j = int(bad[0])
        where = f"[{b}, {j}]" if table.ndim == 2 else f"[{j}]"
        _fail(kernel, f"{tname}{where} = {int(row[j])} is outside [0, {pool}) (pages of {pname}), "
                      f"read by {why}")


def _check_reads(kernel, pos, n, B, ori_block_table, kv_cache, cmp_block_table, cmp_kv, visible,
                 WIN, prefill):
    """The pages the block's own index rows can name: every request's window ring pages and
    the pages of each active token's visible compressed rows (visible(t), None: no compressed
    rows). Prefill skips compressed slots beyond the table, so only the table's pages count."""
    BLOCK = kv_cache.shape[1]
    for b in range(B):
        _check_pages(kernel, ori_block_table, b, -(-WIN // BLOCK), kv_cache.shape[0],
                     "ori_block_table", "kv_cache", "the window")
    if visible is None:
        return
    S = pos.shape[0] // B
    width = np.shape(cmp_block_table)[-1]
    for t in range(n):
        v = visible(t)
        pages = -(-v // BLOCK)
        if prefill:
            pages = min(pages, width)
        _check_pages(kernel, cmp_block_table, t // S, pages, cmp_kv.shape[0], "cmp_block_table",
                     "cmp_kv", f"token {t}'s {v} visible compressed rows")


def _check_lens(kernel, kv_seq_lens):
    lens = _ints(kv_seq_lens)
    bad = np.flatnonzero(lens < 0)
    if bad.size:
        _fail(kernel, f"kv_seq_lens[{int(bad[0])}] = {int(lens[bad[0]])} is negative")
    return lens


def _front(kernel, x_hc, hc_attn_fn, hc_attn_scale, hc_attn_base, attn_norm_w, wq_a, wq_b,
           wq_b_scale, wkv, gamma_cq, gamma_ckv, freqs_cos, freqs_sin, position_ids, cfg):
    """§2.1 up to the projections: hc_pre, rms_norm, the tokens' RoPE rows, qkv_proj_rope."""
    x_hc = np.asarray(x_hc)
    if x_hc.ndim != 3:
        _fail(kernel, f"x_hc must be [T, HC, D], got shape {x_hc.shape}")
    pos = _ints(position_ids)
    if pos.shape[0] != x_hc.shape[0]:
        _fail(kernel, f"position_ids must hold T = {x_hc.shape[0]} positions, got shape "
                      f"{np.shape(position_ids)}")
    st = dict(hc.hc_pre(x_hc, hc_attn_fn, hc_attn_scale, hc_attn_base, config=cfg))
    st["x_normed"] = qkv.rms_norm(st["x_mixed"], attn_norm_w, config=cfg)["x_normed"]
    R = cfg.qk_rope_head_dim
    rope_cos, rope_sin = gather_rope_rows(freqs_cos, freqs_sin, pos)
    rope_cos, rope_sin = rope_cos[:, :R], rope_sin[:, :R]
    proj = qkv.qkv_proj_rope(st["x_normed"], wq_a, wq_b, wq_b_scale, wkv, rope_cos, rope_sin,
                             gamma_cq, gamma_ckv, config=cfg)
    st.update((name, proj[name]) for name in ("qr", "qr_scale", "q", "kv"))   # computation order
    return st, pos, rope_cos, rope_sin


def _finish(kernel, st, x_hc, kv_cache, ori_slot_mapping, rows, caches, work, stages):
    """Ring write-back of the first `rows` tokens (after attention, §2.5), hc_post, and
    the copies written back into the caller's caches."""
    ring = work["kv_cache"].reshape(-1, work["kv_cache"].shape[-1])
    slots = _ints(ori_slot_mapping)
    for t in range(rows):
        if slots[t] >= 0:
            ring[slots[t]] = st["kv"][t]
    x_out = hc.hc_post(st["attn_out"], x_hc, st["post"], st["comb"])["y"]
    for name, a in caches.items():
        np.copyto(a, work[name])
    out = {"x_out": x_out, **caches}
    if stages:
        out["stages"] = {k: v for k, v in st.items()}
    return out


def _copies(**caches):
    """Private copies of the caches and states: every stage runs on them first."""
    for name, a in caches.items():
        if not isinstance(a, np.ndarray) or not a.flags.writeable:
            raise ValueError(f"{name} must be a writeable ndarray (it is updated in place)")
    return caches, {name: a.copy() for name, a in caches.items()}


# ------------------------------------------------------------------------ decode

def _decode_geometry(kernel, pos, table, cfg, one_token=False):
    """B (rows of the block table) and S = T / B; the decode compressors take S = 1."""
    B = np.shape(table)[0]
    T = pos.shape[0]
    if np.ndim(table) != 2 or B < 1 or T % B:
        _fail(kernel, f"T = {T} tokens must be a whole number of tokens per request for the "
                      f"{np.shape(table)} block table (B = rows)")
    if one_token and T != B:
        _fail(kernel, f"the decode compressor takes one token per request; T = {T} tokens for "
                      f"B = {B} requests")
    return B, T // B


def window_columns(pos, b, s, S, WIN):
    """§3.1 step 5: the window part of decode token (b, s) at position p = pos[b S + s]:
    the ring slots of positions max(0, p - WIN + 1) .. p, oldest first, where a slot that
    holds one of the request's current tokens os <= s is replaced by its overlay raw
    WIN + os."""
    p = int(pos[b * S + s])
    vals = ((p % WIN) + 1 + np.arange(WIN)) % WIN if p >= WIN - 1 else np.arange(p + 1)
    overlay = {int(pos[b * S + o]) % WIN: WIN + o for o in range(s + 1)}
    return np.array([overlay.get(int(v), int(v)) for v in vals], np.int64)


def _decode_compress_rope(freqs, pos, B, S, R, half):
    """The compressed row's RoPE values per request: fp32 of the first half of the table row
    of the window start p0 - p0 mod R (p0 the request's first token)."""
    p0 = pos[np.arange(B) * S]
    return f32(np.asarray(freqs)[p0 - p0 % R, :half])


@writes_outputs("x_out", inouts=("kv_cache",))
def decode_attention_swa(x_hc, hc_attn_fn, hc_attn_scale, hc_attn_base, attn_norm_w, wq_a, wq_b,
                         wq_b_scale, wkv, gamma_cq, gamma_ckv, freqs_cos, freqs_sin, kv_cache,
                         block_table, ori_slot_mapping, position_ids, attn_sink, wo_a, wo_b,
                         wo_b_scale, cmp_kv=None, cmp_block_table=None, *, config=None,
                         stages=False):
    """One decode step of a sliding-window layer (§3.1), B requests (rows of block_table)
    of S = T / B tokens. Token t attends the request's ring page (the window of its
    position, its own slot replaced by the overlay) and its own kv; kv_cache is updated in
    place after the attention at ori_slot_mapping. cmp_kv and cmp_block_table are accepted
    and not read. Returns x_out [T, HC, D] bf16 and kv_cache.

    Stages (stages=True, the C kernel's too; spec chapter 06 §3.1): x_mixed [T, D] bf16, post [T, HC] fp32, comb [T, HC*HC] fp32 (hc_pre), x_normed [T, D]
    bf16 (rms_norm), qr [T, Q] int8, qr_scale [T, 1] fp32, q [T, H, HD] bf16, kv [T, HD]
    bf16 (qkv_proj_rope),
    sparse_indices [T, WIN] int32 (the window index rows), attn_out [T, D] bf16."""
    kern = "decode_attention_swa"
    cfg = get_config(config)
    WIN = cfg.sliding_window
    st, pos, cos, sin = _front(kern, x_hc, hc_attn_fn, hc_attn_scale, hc_attn_base, attn_norm_w,
                               wq_a, wq_b, wq_b_scale, wkv, gamma_cq, gamma_ckv, freqs_cos,
                               freqs_sin, position_ids, cfg)
    B, S = _decode_geometry(kern, pos, block_table, cfg)
    caches, work = _copies(kv_cache=kv_cache)
    _check_slots(kern, "ori_slot_mapping", _ints(ori_slot_mapping),
                 np.prod(kv_cache.shape[:2]), "kv_cache")
    T = pos.shape[0]
    _check_reads(kern, pos, T, B, block_table, kv_cache, None, None, None, WIN, False)
    idx = np.full((T, WIN), -1, np.int32)
    for t in range(T):
        cols = window_columns(pos, t // S, t % S, S, WIN)
        idx[t, :len(cols)] = cols
    st["sparse_indices"] = idx
    st["attn_out"] = attention.decode_sparse_attn_swa(
        st["q"], kv_cache, block_table, st["kv"], idx, attn_sink, cos, sin, wo_a, wo_b,
        wo_b_scale, config=cfg)["attn_out"]
    return _finish(kern, st, x_hc, kv_cache, ori_slot_mapping, T, caches, work, stages)


def hca_topk_limit(cfg):
    """HCA_TOPK_LIMIT: the most compressed rows a decode HCA token attends."""
    return min(cfg.max_position_embeddings // 128, cfg.index_topk)


def hca_index_width(cfg, S=1):
    """Columns of the decode HCA index row: window, overlay, compressed, in whole tiles."""
    n = cfg.sliding_window + S + hca_topk_limit(cfg)
    return -(-n // ATTN_TILE) * ATTN_TILE


@writes_outputs("x_out", inouts=("compress_state", "cmp_kv", "kv_cache",))
def decode_attention_hca(x_hc, hc_attn_fn, hc_attn_scale, hc_attn_base, attn_norm_w, wq_a, wq_b,
                         wq_b_scale, wkv, gamma_cq, gamma_ckv, freqs_cos, freqs_sin, cmp_wkv,
                         cmp_wgate, cmp_ape, cmp_norm_w, compress_state,
                         compress_state_block_table, kv_cache, ori_block_table, cmp_kv,
                         cmp_block_table, ori_slot_mapping, cmp_slot_mapping, state_slot_mapping,
                         position_ids, kv_seq_lens, attn_sink, wo_a, wo_b, wo_b_scale, *,
                         config=None, stages=False):
    """One decode step of an HCA layer (§3.2): the ratio-128 compressor (state, and a
    cmp_kv row at a window's last token), then attention over the ring page in physical
    order (tile 0), the overlay and every visible compressed row (from column WIN + S),
    the ring write-back and hc_post. Updates compress_state, cmp_kv and kv_cache in place.

    Stages (stages=True, the C kernel's too; spec chapter 06 §3.2): x_mixed [T, D] bf16, post [T, HC] fp32, comb [T, HC*HC] fp32 (hc_pre), x_normed [T, D]
    bf16 (rms_norm), qr [T, Q] int8, qr_scale [T, 1] fp32, q [T, H, HD] bf16, kv [T, HD]
    bf16 (qkv_proj_rope),
    compressed_kv [B, 1, HD] fp32 (the compressor's kv), sparse_indices [T, K] int32 (K =
    hca_index_width), attn_out [T, D] bf16.
    """
    kern = "decode_attention_hca"
    cfg = get_config(config)
    WIN, R = cfg.sliding_window, 128
    st, pos, cos, sin = _front(kern, x_hc, hc_attn_fn, hc_attn_scale, hc_attn_base, attn_norm_w,
                               wq_a, wq_b, wq_b_scale, wkv, gamma_cq, gamma_ckv, freqs_cos,
                               freqs_sin, position_ids, cfg)
    B, S = _decode_geometry(kern, pos, ori_block_table, cfg, one_token=True)
    caches, work = _copies(compress_state=compress_state, cmp_kv=cmp_kv, kv_cache=kv_cache)
    _check_slots(kern, "ori_slot_mapping", _ints(ori_slot_mapping),
                 np.prod(kv_cache.shape[:2]), "kv_cache")
    lens = _check_lens(kern, kv_seq_lens)

    def visible(t):
        return min(hca_topk_limit(cfg), (int(pos[t]) + 1) // R, int(lens[t // S]) // R)

    _check_reads(kern, pos, pos.shape[0], B, ori_block_table, kv_cache, cmp_block_table,
                 np.asarray(cmp_kv), visible, WIN, False)
    half = cfg.qk_rope_head_dim // 2
    cc = _decode_compress_rope(freqs_cos, pos, B, S, R, half)
    cs = _decode_compress_rope(freqs_sin, pos, B, S, R, half)
    c = compressor.decode_compressor_ratio128(
        st["x_normed"].reshape(B, S, -1), work["compress_state"], compress_state_block_table,
        cmp_wkv, cmp_wgate, cmp_ape, cmp_norm_w, cc, cs, work["cmp_kv"],
        pos.reshape(B, S).astype(np.int32), _ints(cmp_slot_mapping).reshape(B, S),
        _ints(state_slot_mapping).reshape(B, S), config=cfg)
    st["compressed_kv"] = c["kv"]

    T = pos.shape[0]
    idx = np.full((T, hca_index_width(cfg, S)), -1, np.int32)
    for t in range(T):
        b, s, p = t // S, t % S, int(pos[t])
        own = {int(pos[b * S + o]) % WIN for o in range(s + 1)}
        for k in range(WIN):                        # tile 0: the ring in physical order
            if k <= p and k not in own:
                idx[t, k] = k
        for o in range(s + 1):
            idx[t, WIN + o] = WIN + o
        n = visible(t)
        idx[t, WIN + S:WIN + S + n] = WIN + S + np.arange(n)
    st["sparse_indices"] = idx
    st["attn_out"] = attention.decode_sparse_attn_hca(
        st["q"], kv_cache, ori_block_table, st["kv"], work["cmp_kv"], cmp_block_table, idx,
        attn_sink, cos, sin, wo_a, wo_b, wo_b_scale, config=cfg)["attn_out"]
    return _finish(kern, st, x_hc, kv_cache, ori_slot_mapping, T, caches, work, stages)


@writes_outputs("x_out", inouts=("compress_state", "inner_compress_state", "cmp_kv", "idx_kv_cache",
                                  "kv_cache",))
def decode_attention_csa(x_hc, hc_attn_fn, hc_attn_scale, hc_attn_base, attn_norm_w, wq_a, wq_b,
                         wq_b_scale, wkv, gamma_cq, gamma_ckv, freqs_cos, freqs_sin, cmp_wkv,
                         cmp_wgate, cmp_ape, cmp_norm_w, compress_state,
                         compress_state_block_table, idx_wq_b, idx_wq_b_scale, weights_proj,
                         hadamard_idx, inner_wkv, inner_wgate, inner_ape, inner_norm_w,
                         inner_compress_state, inner_compress_state_block_table, kv_cache,
                         ori_block_table, cmp_kv, cmp_block_table, idx_kv_cache, idx_block_table,
                         ori_slot_mapping, cmp_slot_mapping, idx_slot_mapping, state_slot_mapping,
                         inner_state_slot_mapping, position_ids, kv_seq_lens, attn_sink, wo_a,
                         wo_b, wo_b_scale, *, config=None, stages=False):
    """One decode step of a CSA layer (§3.3): the ratio-4 compressor, the lightning indexer
    (its inner compressor, then the top index_topk compressed rows, raw offset WIN + S),
    attention over the window (column 0..WIN-1, the token's own slot as overlay) and the
    indexer's rows that are visible (min((p+1)//4, kv_seq_lens // 4), kept in place, -1
    gaps), ring write-back, hc_post. Updates compress_state, inner_compress_state, cmp_kv,
    idx_kv_cache and kv_cache in place.

    Stages (stages=True, the C kernel's too; spec chapter 06 §3.3): x_mixed [T, D] bf16, post [T, HC] fp32, comb [T, HC*HC] fp32 (hc_pre), x_normed [T, D]
    bf16 (rms_norm), qr [T, Q] int8, qr_scale [T, 1] fp32, q [T, H, HD] bf16, kv [T, HD]
    bf16 (qkv_proj_rope),
    compressed_kv [B, 1, HD] fp32 (the compressor's kv), topk_idxs [B, 1, MAXS // 4] int32
    (the indexer's), sparse_indices [T, WIN + index_topk] int32, attn_out [T, D] bf16."""
    kern = "decode_attention_csa"
    cfg = get_config(config)
    WIN, R = cfg.sliding_window, 4
    st, pos, cos, sin = _front(kern, x_hc, hc_attn_fn, hc_attn_scale, hc_attn_base, attn_norm_w,
                               wq_a, wq_b, wq_b_scale, wkv, gamma_cq, gamma_ckv, freqs_cos,
                               freqs_sin, position_ids, cfg)
    B, S = _decode_geometry(kern, pos, ori_block_table, cfg, one_token=True)
    caches, work = _copies(compress_state=compress_state, inner_compress_state=inner_compress_state,
                           cmp_kv=cmp_kv, idx_kv_cache=idx_kv_cache, kv_cache=kv_cache)
    _check_slots(kern, "ori_slot_mapping", _ints(ori_slot_mapping),
                 np.prod(kv_cache.shape[:2]), "kv_cache")
    lens = _check_lens(kern, kv_seq_lens)
    SL = cfg.max_position_embeddings // R

    def visible(t):
        return min((int(pos[t]) + 1) // R, int(lens[t // S]) // R, SL)

    _check_reads(kern, pos, pos.shape[0], B, ori_block_table, kv_cache, cmp_block_table,
                 np.asarray(cmp_kv), visible, WIN, False)
    half = cfg.qk_rope_head_dim // 2
    p0 = pos[np.arange(B) * S]
    step_cos, step_sin = f32(np.asarray(freqs_cos)[p0, :half]), f32(np.asarray(freqs_sin)[p0, :half])
    cc = _decode_compress_rope(freqs_cos, pos, B, S, R, half)
    cs = _decode_compress_rope(freqs_sin, pos, B, S, R, half)
    BS = (B, S)
    c = compressor.decode_compressor_ratio4(
        st["x_normed"].reshape(B, S, -1), work["compress_state"], compress_state_block_table,
        cmp_wkv, cmp_wgate, cmp_ape, cmp_norm_w, cc, cs, work["cmp_kv"],
        pos.reshape(BS).astype(np.int32), _ints(cmp_slot_mapping).reshape(BS),
        _ints(state_slot_mapping).reshape(BS), config=cfg)
    st["compressed_kv"] = c["kv"]
    inner_kv = np.zeros((B, S, np.shape(inner_norm_w)[0]), np.float32)
    ix = indexer.decode_indexer(
        st["x_normed"].reshape(B, S, -1), st["qr"], st["qr_scale"], idx_wq_b, idx_wq_b_scale,
        weights_proj, step_cos, step_sin, hadamard_idx, inner_kv, work["inner_compress_state"],
        inner_compress_state_block_table, inner_wkv, inner_wgate, inner_ape, inner_norm_w,
        work["idx_kv_cache"], idx_block_table, pos.reshape(BS).astype(np.int32),
        _ints(idx_slot_mapping).reshape(BS), _ints(inner_state_slot_mapping).reshape(BS),
        kv_seq_lens, offset=WIN + S, config=cfg)
    st["topk_idxs"] = ix["topk_idxs"]

    T, topk = pos.shape[0], cfg.index_topk
    top = ix["topk_idxs"].reshape(T, -1)[:, :topk].astype(np.int64)
    idx = np.full((T, WIN + topk), -1, np.int32)
    for t in range(T):
        b, s, p = t // S, t % S, int(pos[t])
        cols = window_columns(pos, b, s, S, WIN)
        idx[t, :len(cols)] = cols
        valid = min((p + 1) // R, int(lens[b]) // R)
        raw = top[t]
        keep = (raw >= WIN + S) & (raw - (WIN + S) < valid)
        idx[t, WIN:][keep] = raw[keep]
    st["sparse_indices"] = idx
    st["attn_out"] = attention.decode_sparse_attn(
        st["q"], kv_cache, ori_block_table, st["kv"], work["cmp_kv"], cmp_block_table, idx,
        attn_sink, cos, sin, wo_a, wo_b, wo_b_scale, config=cfg)["attn_out"]
    return _finish(kern, st, x_hc, kv_cache, ori_slot_mapping, T, caches, work, stages)


# ----------------------------------------------------------------------- prefill

def _num_tokens(kernel, num_tokens, T):
    n = T if num_tokens is None else int(num_tokens)
    if not 0 <= n <= T:
        _fail(kernel, f"num_tokens = {n} is outside [0, T = {T}]")
    return n


@writes_outputs("x_out", inouts=("kv_cache",))
def prefill_attention_swa(x_hc, hc_attn_fn, hc_attn_scale, hc_attn_base, attn_norm_w, wq_a, wq_b,
                          wq_b_scale, wkv, gamma_cq, gamma_ckv, freqs_cos, freqs_sin, kv_cache,
                          block_table, ori_slot_mapping, cmp_sparse_indices, cmp_sparse_lens,
                          position_ids, attn_sink, wo_a, wo_b, wo_b_scale, num_tokens=None, *,
                          config=None, stages=False):
    """One prefill tile of a sliding-window layer (§4.1): T rows of one request, the first
    num_tokens (default T) active. Attention over the rows cmp_sparse_indices /
    cmp_sparse_lens name (ring slots, overlay rows WIN + t), then the active rows' kv into
    kv_cache at ori_slot_mapping, then hc_post. Rows past num_tokens flow through hc_pre
    and the projections; their attention output is zero and they write nothing.

    Stages (stages=True, the C kernel's too; spec chapter 06 §4.1): x_mixed [T, D] bf16, post [T, HC] fp32, comb [T, HC*HC] fp32 (hc_pre), x_normed [T, D]
    bf16 (rms_norm), qr [T, Q] int8, qr_scale [T, 1] fp32, q [T, H, HD] bf16, kv [T, HD]
    bf16 (qkv_proj_rope),
    attn_out [T, D] bf16."""
    kern = "prefill_attention_swa"
    cfg = get_config(config)
    st, pos, cos, sin = _front(kern, x_hc, hc_attn_fn, hc_attn_scale, hc_attn_base, attn_norm_w,
                               wq_a, wq_b, wq_b_scale, wkv, gamma_cq, gamma_ckv, freqs_cos,
                               freqs_sin, position_ids, cfg)
    T = pos.shape[0]
    n = _num_tokens(kern, num_tokens, T)
    caches, work = _copies(kv_cache=kv_cache)
    _check_slots(kern, "ori_slot_mapping", _ints(ori_slot_mapping)[:n],
                 np.prod(kv_cache.shape[:2]), "kv_cache")
    HD = kv_cache.shape[-1]
    # no compressed cache: every compressed raw reads a zero row, as pypto-lib's zero pool
    no_cmp = np.zeros((1, kv_cache.shape[1], 1, HD), kv_cache.dtype)
    st["attn_out"] = attention.prefill_sparse_attn(
        st["q"], kv_cache, block_table, st["kv"], no_cmp, np.zeros(PREFILL_CMP_MAX_BLOCKS, np.int32),
        cmp_sparse_indices, cmp_sparse_lens, attn_sink, cos, sin, wo_a, wo_b, wo_b_scale,
        num_tokens=n, config=cfg)["attn_out"]
    return _finish(kern, st, x_hc, kv_cache, ori_slot_mapping, n, caches, work, stages)


@writes_outputs("x_out", inouts=("cmp_kv_state", "cmp_score_state", "cmp_kv", "kv_cache",))
def prefill_attention_hca(x_hc, hc_attn_fn, hc_attn_scale, hc_attn_base, attn_norm_w, wq_a, wq_b,
                          wq_b_scale, wkv, gamma_cq, gamma_ckv, freqs_cos, freqs_sin, cmp_wkv,
                          cmp_wgate, cmp_ape, cmp_norm_w, cmp_kv_state, cmp_score_state,
                          compress_state_block_table, kv_cache, ori_slot_mapping,
                          ori_block_table, cmp_kv, cmp_block_table, cmp_sparse_indices,
                          cmp_sparse_lens, position_ids, cmp_slot_mapping, state_slot_mapping,
                          attn_sink, wo_a, wo_b, wo_b_scale, num_tokens=None, *, config=None,
                          stages=False):
    """One prefill tile of an HCA layer (§4.2): the ratio-128 prefill compressor (both
    state pools, and the compressed row of a token that ends a window, into cmp_kv), then
    attention over the rows the given index rows name (ring, overlay, compressed from
    WIN + T), ring write-back, hc_post.

    Stages (stages=True, the C kernel's too; spec chapter 06 §4.2): x_mixed [T, D] bf16, post [T, HC] fp32, comb [T, HC*HC] fp32 (hc_pre), x_normed [T, D]
    bf16 (rms_norm), qr [T, Q] int8, qr_scale [T, 1] fp32, q [T, H, HD] bf16, kv [T, HD]
    bf16 (qkv_proj_rope),
    attn_out [T, D] bf16."""
    kern = "prefill_attention_hca"
    cfg = get_config(config)
    st, pos, cos, sin = _front(kern, x_hc, hc_attn_fn, hc_attn_scale, hc_attn_base, attn_norm_w,
                               wq_a, wq_b, wq_b_scale, wkv, gamma_cq, gamma_ckv, freqs_cos,
                               freqs_sin, position_ids, cfg)
    T = pos.shape[0]
    n = _num_tokens(kern, num_tokens, T)
    caches, work = _copies(cmp_kv_state=cmp_kv_state, cmp_score_state=cmp_score_state,
                           cmp_kv=cmp_kv, kv_cache=kv_cache)
    _check_slots(kern, "ori_slot_mapping", _ints(ori_slot_mapping)[:n],
                 np.prod(kv_cache.shape[:2]), "kv_cache")
    compressor.prefill_compressor_ratio128(
        st["x_normed"], work["cmp_kv_state"], work["cmp_score_state"],
        compress_state_block_table, cmp_wkv, cmp_wgate, cmp_ape, cmp_norm_w, freqs_cos,
        freqs_sin, work["cmp_kv"], position_ids, cmp_slot_mapping, state_slot_mapping,
        num_tokens=n, config=cfg)
    st["attn_out"] = attention.prefill_sparse_attn(
        st["q"], kv_cache, ori_block_table, st["kv"], work["cmp_kv"], cmp_block_table,
        cmp_sparse_indices, cmp_sparse_lens, attn_sink, cos, sin, wo_a, wo_b, wo_b_scale,
        num_tokens=n, config=cfg)["attn_out"]
    return _finish(kern, st, x_hc, kv_cache, ori_slot_mapping, n, caches, work, stages)


def prefill_csa_rows(pos, n, cmp_topk, WIN, T, K, pad, ratio=4):
    """§4.3 step 8: the sparse index rows of a prefill CSA tile, compacted. Active row t
    (position p): the window keys max(0, p - WIN + 1) .. p ascending, a key that is the
    position of an active row t' <= t as overlay raw WIN + t', else as ring slot key mod WIN;
    then the indexer's raws (offset WIN + T) of visible slots (< (p + 1) // ratio), in its
    order, up to `pad` columns. Returns (indices [T, K], lens [T])."""
    idx = np.full((T, max(K, pad)), -1, np.int32)
    lens = np.zeros(T, np.int32)
    row_of = {}
    for t in range(n):
        p = int(pos[t])
        row_of[p] = t
        lo = max(0, p - WIN + 1)
        cur = 0
        for j in range(lo, p + 1):
            idx[t, cur] = WIN + row_of[j] if j in row_of else j % WIN
            cur += 1
        visible = (p + 1) // ratio
        for raw in cmp_topk[t]:
            if cur >= pad:
                break
            if raw >= WIN + T and raw - (WIN + T) < visible:
                idx[t, cur] = raw
                cur += 1
        lens[t] = cur
    return idx[:, :K], lens


@writes_outputs("x_out", inouts=("cmp_kv_state", "cmp_score_state", "inner_kv_state",
                                  "inner_score_state", "cmp_kv", "idx_kv_cache", "kv_cache",))
def prefill_attention_csa(x_hc, hc_attn_fn, hc_attn_scale, hc_attn_base, attn_norm_w, wq_a, wq_b,
                          wq_b_scale, wkv, gamma_cq, gamma_ckv, freqs_cos, freqs_sin, cmp_wkv,
                          cmp_wgate, cmp_ape, cmp_norm_w, cmp_kv_state, cmp_score_state,
                          compress_state_block_table, hadamard_idx, idx_wq_b, idx_wq_b_scale,
                          idx_weights_proj, inner_wkv, inner_wgate, inner_ape, inner_norm_w,
                          inner_kv_state, inner_score_state, inner_compress_state_block_table,
                          kv_cache, ori_block_table, ori_slot_mapping, cmp_kv, cmp_block_table,
                          idx_kv_cache, idx_block_table, position_ids, cmp_slot_mapping,
                          idx_slot_mapping, state_slot_mapping, inner_state_slot_mapping,
                          attn_sink, wo_a, wo_b, wo_b_scale, num_tokens=None, *, config=None,
                          stages=False):
    """One prefill tile of a CSA layer (§4.3): the ratio-4 prefill compressor, the prefill
    indexer (inner compressor, then the top compressed slots per token, raw offset
    WIN + T), the block's own sparse index rows (window with overlay, then the visible
    indexer slots, compacted up to the attention's pad), attention, ring write-back,
    hc_post. Updates every state pool, cmp_kv, idx_kv_cache and kv_cache in place.

    Stages (stages=True, the C kernel's too; spec chapter 06 §4.3): x_mixed [T, D] bf16, post [T, HC] fp32, comb [T, HC*HC] fp32 (hc_pre), x_normed [T, D]
    bf16 (rms_norm), qr [T, Q] int8, qr_scale [T, 1] fp32, q [T, H, HD] bf16, kv [T, HD]
    bf16 (qkv_proj_rope),
    topk_idxs [T, CAP] int32 (the indexer's), sparse_indices [T, WIN + index_topk] int32,
    sparse_lens [T] int32 (the index rows the block built), attn_out [T, D] bf16."""
    kern = "prefill_attention_csa"
    cfg = get_config(config)
    WIN = cfg.sliding_window
    st, pos, cos, sin = _front(kern, x_hc, hc_attn_fn, hc_attn_scale, hc_attn_base, attn_norm_w,
                               wq_a, wq_b, wq_b_scale, wkv, gamma_cq, gamma_ckv, freqs_cos,
                               freqs_sin, position_ids, cfg)
    T = pos.shape[0]
    n = _num_tokens(kern, num_tokens, T)
    caches, work = _copies(cmp_kv_state=cmp_kv_state, cmp_score_state=cmp_score_state,
                           inner_kv_state=inner_kv_state, inner_score_state=inner_score_state,
                           cmp_kv=cmp_kv, idx_kv_cache=idx_kv_cache, kv_cache=kv_cache)
    _check_slots(kern, "ori_slot_mapping", _ints(ori_slot_mapping)[:n],
                 np.prod(kv_cache.shape[:2]), "kv_cache")
    CAP = indexer.prefill_score_cap(kv_cache.shape[1])
    _check_reads(kern, pos, n, 1, ori_block_table, kv_cache, cmp_block_table, np.asarray(cmp_kv),
                 lambda t: min((int(pos[t]) + 1) // 4, CAP), WIN, True)
    compressor.prefill_compressor_ratio4(
        st["x_normed"], work["cmp_kv_state"], work["cmp_score_state"],
        compress_state_block_table, cmp_wkv, cmp_wgate, cmp_ape, cmp_norm_w, freqs_cos,
        freqs_sin, work["cmp_kv"], position_ids, cmp_slot_mapping, state_slot_mapping,
        num_tokens=n, config=cfg)
    half = cfg.qk_rope_head_dim // 2
    ix = indexer.prefill_indexer(
        st["x_normed"], st["qr"], st["qr_scale"], idx_wq_b, idx_wq_b_scale, idx_weights_proj,
        f32(cos[:, :half]), f32(sin[:, :half]), freqs_cos, freqs_sin, hadamard_idx,
        work["inner_kv_state"], work["inner_score_state"], inner_compress_state_block_table,
        inner_wkv, inner_wgate, inner_ape, inner_norm_w, work["idx_kv_cache"], idx_block_table,
        position_ids, idx_slot_mapping, inner_state_slot_mapping, num_tokens=n, config=cfg)
    st["topk_idxs"] = ix["topk_idxs"]
    K = WIN + cfg.index_topk
    pad = prefill_pad(K, T, WIN, cfg.index_topk)
    idx, lens = prefill_csa_rows(pos, n, ix["topk_idxs"].astype(np.int64), WIN, T, K, pad)
    st["sparse_indices"], st["sparse_lens"] = idx, lens
    st["attn_out"] = attention.prefill_sparse_attn(
        st["q"], kv_cache, ori_block_table, st["kv"], work["cmp_kv"], cmp_block_table, idx,
        lens, attn_sink, cos, sin, wo_a, wo_b, wo_b_scale, num_tokens=n,
        config=cfg)["attn_out"]
    return _finish(kern, st, x_hc, kv_cache, ori_slot_mapping, n, caches, work, stages)
