"""Goldens of the KV compressors (spec chapter 04 §4.2-§4.7, worked examples §4.11):
decode_compressor_ratio4 and decode_compressor_ratio128 (one decode step of B requests,
one token each), prefill_compressor_ratio4 and prefill_compressor_ratio128 (one prefill
chunk of one request).

Every token deposits its kv projection K = x wkv^T and its score projection plus the
absolute position embedding, G' = x wgate^T + ape[p mod R], in a paged state (decode:
one merged row [K | G']; prefill: a kv_state row and a score_state row). A token that
completes a window of R positions yields one compressed row: the per-column softmax
pool of the window's rows (R = 4: 8 rows, the front halves of the previous window and
the back halves of the current one; R = 128: the window's 128 rows), RMSNorm with
norm_w, interleaved RoPE on the last qk_rope_head_dim columns, stored as bf16 in the
compressed cache (decode also returns the fp32 row in `kv`).

The four goldens differ in what is part of the contract: decode pools in batch form
from the state after the current token was written and decides a compression by
position (p mod R == R - 1); prefill decides it by cmp_slot_mapping, pools from the
state as it was before the chunk with the chunk's own rows laid over it (ratio 4:
online form; ratio 128: batch form, missing rows scored 0 instead of -inf), and writes
the chunk's state rows last.

The states (compress_state, kv_state, score_state) and the caches (cmp_kv_cache,
cmp_kv) are updated in place and returned under their names. Every index the call
dereferences (positions, slot mappings, state-table entries, cache rows, RoPE rows)
is checked before the first write: a bad one raises ValueError naming the tensor and
the first bad position, and leaves every array untouched. A negative slot mapping
means "do not write"; a negative state-table entry means "missing row". Shapes come
from the arrays; eps, the RoPE width and max_position_embeddings from `config`.
"""
import numpy as np

from ..config import get_config
from ._outputs import writes_outputs
from .numerics import (
    BF16, F32, bf16_rne, f32, rms_norm, rope_interleaved_f32, softmax_pool, softmax_pool_online,
)

NEG_INF = F32(-np.inf)


# ---------------------------------------------------------------- shapes and checks

def _bad(kernel, msg):
    raise ValueError(f"{kernel}: {msg}")


def _dims(kernel, name, a, dims):
    """a must have len(dims) axes; a str entry names a free size (returned), an int
    entry must match. Returns the free sizes in order."""
    shape = np.shape(a)
    want = "[" + ", ".join(str(d) for d in dims) + "]"
    if len(shape) != len(dims) or any(isinstance(d, int) and s != d for s, d in zip(shape, dims)):
        _bad(kernel, f"{name} must be {want}, got shape {shape}")
    return [s for s, d in zip(shape, dims) if not isinstance(d, int)]


def _ints(kernel, name, a):
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.integer):
        _bad(kernel, f"{name} must hold integers, got dtype {a.dtype}")
    return a.astype(np.int64)


def _inout(kernel, name, a, dtype):
    """A state or cache: updated in place, so it must be a writable array of its dtype
    (TypeError otherwise, as the C binding raises for a dtype; ValueError if read-only)."""
    if not isinstance(a, np.ndarray) or a.dtype != dtype:
        raise TypeError(f"{kernel}: {name} is updated in place and must be a {np.dtype(dtype)} "
                        f"numpy array, got {getattr(a, 'dtype', type(a).__name__)}")
    if not a.flags.writeable:
        _bad(kernel, f"{name} is updated in place but is read-only")


class _Model:
    """HD from norm_w, OD = COFF HD from the ratio; D from x; checks the weights."""

    def __init__(self, kernel, R, D, wkv, wgate, ape, norm_w, cfg):
        self.R = R
        self.COFF = 2 if R == 4 else 1
        (self.HD,) = _dims(kernel, "norm_w", norm_w, ["HD"])
        self.OD = self.COFF * self.HD
        for name, w in (("wkv", wkv), ("wgate", wgate)):
            _dims(kernel, name, w, [self.OD, D])
        _dims(kernel, "ape", ape, [R, self.OD])
        self.rd = int(cfg.qk_rope_head_dim)
        if not 0 < self.rd <= self.HD or self.rd % 2:
            _bad(kernel, f"qk_rope_head_dim = {self.rd} does not fit the head dim {self.HD}")
        self.nd = self.HD - self.rd
        self.eps = cfg.rms_norm_eps
        self.MAXS = int(cfg.max_position_embeddings)


def _rope_dims(kernel, m, name, a, rows):
    n = _dims(kernel, name, a, [rows, "C"])[-1]
    if n < m.rd // 2:
        _bad(kernel, f"{name} needs at least {m.rd // 2} columns (qk_rope_head_dim / 2), got {n}")


def _finish(pooled, norm_w, cos_row, sin_row, m):
    """RMSNorm with gamma (§4.2.5), then RoPE on the last rd columns (§4.2.6); fp32.
    Returns (normed, roped)."""
    normed = rms_norm(pooled, norm_w, m.eps)
    y = normed.copy()
    y[m.nd:] = rope_interleaved_f32(y[m.nd:], f32(cos_row)[:m.rd // 2], f32(sin_row)[:m.rd // 2])
    return normed, y


def _stage_rows(rows, OD, HD):
    """Zeroed per-token stages of a compressor: rows of the entry each token completes."""
    st = {name: np.zeros((rows, OD), np.float32) for name in ("kv_proj", "score_proj")}
    return st, {name: np.zeros((rows, HD), np.float32) for name in ("pooled", "normed", "roped")}


def _projections(x2, wkv, wgate):
    """K = x wkv^T, G = x wgate^T (§4.2.1): fp32 products of the bf16 values."""
    x2 = f32(x2)
    return np.matmul(x2, f32(wkv).T), np.matmul(x2, f32(wgate).T)


def _window(R, p, HD):
    """The pool slots of the entry completed by position p: (position, column offset in
    a [front | back] row). R = 4: the previous window's front halves, then the current
    window's back halves (§4.3.2); R = 128: the window's rows."""
    cur = p + 1 - R
    if R == 4:
        return [(cur - 4 + j, 0) for j in range(4)] + [(cur + j, HD) for j in range(4)]
    return [(cur + j, 0) for j in range(R)]


# ------------------------------------------------------------------------ decode

def _decode(kernel, R, x, compress_state, table, wkv, wgate, ape, norm_w, cos, sin, cache,
            position_ids, cmp_slot_mapping, state_slot_mapping, config, stages):
    cfg = get_config(config)
    B, S, D = _dims(kernel, "x", x, ["B", "S", "D"])
    if S != 1:
        _bad(kernel, f"x must be [B, 1, D]: a decode step takes one token per request (spec "
                     f"chapter 04 Q19), got shape {np.shape(x)}")
    m = _Model(kernel, R, D, wkv, wgate, ape, norm_w, cfg)
    HD, OD = m.HD, m.OD
    _inout(kernel, "compress_state", compress_state, np.float32)
    NB, PAGE = _dims(kernel, "compress_state", compress_state, ["NB", "PAGE", 2 * OD])
    (W,) = _dims(kernel, "compress_state_block_table", table, [B, "W"])
    for name, a in (("cos", cos), ("sin", sin)):
        _rope_dims(kernel, m, name, a, B)
    _inout(kernel, "cmp_kv_cache", cache, BF16)
    NC, BLOCK = _dims(kernel, "cmp_kv_cache", cache, ["NC", "BLOCK", 1, HD])
    for name, a in (("position_ids", position_ids), ("cmp_slot_mapping", cmp_slot_mapping),
                    ("state_slot_mapping", state_slot_mapping)):
        _dims(kernel, name, a, [B, 1])
    pos = _ints(kernel, "position_ids", position_ids)[:, 0]
    cmp_rows = _ints(kernel, "cmp_slot_mapping", cmp_slot_mapping)[:, 0]
    state_rows = _ints(kernel, "state_slot_mapping", state_slot_mapping)[:, 0]
    tbl = _ints(kernel, "compress_state_block_table", table)

    # every index first (spec README decision 1)
    windows = {}
    for b in range(B):
        p = int(pos[b])
        if p < 0:
            _bad(kernel, f"position_ids[{b}, 0] = {p} is negative")
        r = int(state_rows[b])
        if r >= NB * PAGE:
            _bad(kernel, f"state_slot_mapping[{b}, 0] = {r} is outside [0, {NB * PAGE}) (rows of "
                         f"compress_state, {NB} pages of {PAGE})")
        if (p + 1) % R:
            continue                                    # no window completes at p
        reads = []
        for q, off in _window(R, p, HD):
            if q < 0:
                reads.append((-1, 0, off))              # before position 0: missing row
                continue
            page = q // PAGE
            if page >= W:
                reads.append((-1, 0, off))              # beyond the table (>= MAXS): missing row
                continue
            blk = int(tbl[b, page])
            if blk >= NB:
                _bad(kernel, f"compress_state_block_table[{b}, {page}] = {blk} is outside "
                             f"[0, {NB}) (pages of compress_state), read for position {q}")
            reads.append((blk, q % PAGE, off))
        c = int(cmp_rows[b])
        if c >= NC * BLOCK:
            _bad(kernel, f"cmp_slot_mapping[{b}, 0] = {c} is outside [0, {NC * BLOCK}) (rows of "
                         f"cmp_kv_cache, {NC} blocks of {BLOCK})")
        windows[b] = reads

    K, G = _projections(np.asarray(x)[:, 0, :], wkv, wgate)
    G = G + f32(ape)[pos % R]                           # G' = G + ape[p mod R], stored as is

    # request by request: write the state row, then pool the window (current row included)
    pooled = {}
    for b in range(B):
        r = int(state_rows[b])
        if r >= 0:
            compress_state[r // PAGE, r % PAGE, :OD] = K[b]
            compress_state[r // PAGE, r % PAGE, OD:] = G[b]
        if b in windows:
            kv_rows = np.zeros((len(windows[b]), HD), np.float32)
            sc_rows = np.full((len(windows[b]), HD), NEG_INF, np.float32)
            for i, (blk, intra, off) in enumerate(windows[b]):
                if blk >= 0:
                    kv_rows[i] = compress_state[blk, intra, off:off + HD]
                    sc_rows[i] = compress_state[blk, intra, OD + off:OD + off + HD]
            pooled[b] = softmax_pool(kv_rows, sc_rows)

    kv = np.zeros((B, S, HD), np.float32)
    cos, sin = f32(cos), f32(sin)
    st, rows = _stage_rows(B, OD, HD)
    for b, v in pooled.items():
        normed, y = _finish(v, norm_w, cos[b], sin[b], m)
        rows["pooled"][b], rows["normed"][b], rows["roped"][b] = v, normed, y
        c = int(cmp_rows[b])
        if c >= 0:                                      # -1: an uncommitted boundary
            kv[b, 0] = y
            cache[c // BLOCK, c % BLOCK, 0] = bf16_rne(y)
    out = {"kv": kv, "compress_state": compress_state, "cmp_kv_cache": cache}
    if stages:
        st.update(kv_proj=K, score_proj=G, compress_state=compress_state, **rows, kv=kv,
                  cmp_kv_cache=cache)
        out["stages"] = st
    return out


@writes_outputs("kv", inouts=("compress_state", "cmp_kv_cache"))
def decode_compressor_ratio4(x, compress_state, compress_state_block_table, wkv, wgate, ape,
                             norm_w, cos, sin, cmp_kv_cache, position_ids, cmp_slot_mapping,
                             state_slot_mapping, *, config=None, stages=False):
    """One decode step of the CSA main compressor (ratio 4, overlap; spec §4.4).

    x [B, 1, D] bf16; compress_state [NB, PAGE, 4 HD] fp32 (rows [K_front | K_back |
    G'_front | G'_back]); compress_state_block_table [B, W] int; wkv, wgate [2 HD, D] bf16;
    ape [4, 2 HD] fp32; norm_w [HD] bf16; cos, sin [B, >= rd/2] fp32 (the RoPE row of
    each request's compressed entry); cmp_kv_cache [NC, BLOCK, 1, HD] bf16;
    position_ids, cmp_slot_mapping, state_slot_mapping [B, 1] int.

    Request b writes its row [K | G + ape[p mod 4]] at state_slot_mapping[b, 0] (if >= 0);
    if p mod 4 == 3 it pools the previous window's front halves and the current window's
    back halves from the state (missing rows: kv 0, score -inf), normalises and rotates
    the pooled row and, if cmp_slot_mapping[b, 0] >= 0, writes it to kv[b, 0] (fp32) and
    to that cmp_kv_cache row (bf16). Returns {"kv", "compress_state", "cmp_kv_cache"};
    the last two are the arguments, updated.

    Stages (stages=True, spec chapter 04 §4.4; outputs appear where they are computed):
    kv_proj [B, 2 HD] fp32 (K = x wkv^T), score_proj [B, 2 HD] fp32 (G' = x wgate^T +
    ape[p mod 4], the row stored in the state), compress_state, then per request the
    entry its token completes (zero rows for the others): pooled [B, HD] fp32 (softmax
    pool, before the norm), normed [B, HD] fp32 (RMSNorm with norm_w), roped [B, HD] fp32
    (after RoPE, before the bf16 rounding); kv, cmp_kv_cache.
    """
    return _decode("decode_compressor_ratio4", 4, x, compress_state, compress_state_block_table,
                   wkv, wgate, ape, norm_w, cos, sin, cmp_kv_cache, position_ids,
                   cmp_slot_mapping, state_slot_mapping, config, stages)


@writes_outputs("kv", inouts=("compress_state", "cmp_kv_cache"))
def decode_compressor_ratio128(x, compress_state, compress_state_block_table, wkv, wgate, ape,
                               norm_w, cos, sin, cmp_kv_cache, position_ids, cmp_slot_mapping,
                               state_slot_mapping, *, config=None, stages=False):
    """One decode step of the HCA compressor (ratio 128, no overlap; spec §4.5).

    As decode_compressor_ratio4 with compress_state [NB, PAGE, 2 HD] (rows [K | G']),
    wkv, wgate [HD, D], ape [128, HD]: a request with p mod 128 == 127 pools the 128 rows
    of positions p - 127 .. p (missing rows: kv 0, score -inf).

    Stages (stages=True) as decode_compressor_ratio4's (spec §4.5): kv_proj, score_proj
    (here [B, HD]), compress_state, pooled, normed, roped, kv, cmp_kv_cache.
    """
    return _decode("decode_compressor_ratio128", 128, x, compress_state,
                   compress_state_block_table, wkv, wgate, ape, norm_w, cos, sin, cmp_kv_cache,
                   position_ids, cmp_slot_mapping, state_slot_mapping, config, stages)


# ----------------------------------------------------------------------- prefill

def _prefill(kernel, R, x, kv_state, score_state, table, wkv, wgate, ape, norm_w, freqs_cos,
             freqs_sin, cmp_kv, position_ids, cmp_slot_mapping, state_slot_mapping, num_tokens,
             config, stages):
    cfg = get_config(config)
    T, D = _dims(kernel, "x", x, ["T", "D"])
    m = _Model(kernel, R, D, wkv, wgate, ape, norm_w, cfg)
    HD, OD = m.HD, m.OD
    _inout(kernel, "kv_state", kv_state, np.float32)
    _inout(kernel, "score_state", score_state, np.float32)
    NB, PAGE = _dims(kernel, "kv_state", kv_state, ["NB", "PAGE", OD])
    _dims(kernel, "score_state", score_state, [NB, PAGE, OD])
    (W,) = _dims(kernel, "compress_state_block_table", table, ["W"])
    for name, a in (("freqs_cos", freqs_cos), ("freqs_sin", freqs_sin)):
        _rope_dims(kernel, m, name, a, "L")
    L = np.shape(freqs_cos)[0]
    if np.shape(freqs_sin)[0] != L:
        _bad(kernel, f"freqs_cos and freqs_sin must have the same rows, got {L} and "
                     f"{np.shape(freqs_sin)[0]}")
    _inout(kernel, "cmp_kv", cmp_kv, BF16)
    NC, BLOCK = _dims(kernel, "cmp_kv", cmp_kv, ["NC", "BLOCK", 1, HD])
    for name, a in (("position_ids", position_ids), ("cmp_slot_mapping", cmp_slot_mapping),
                    ("state_slot_mapping", state_slot_mapping)):
        _dims(kernel, name, a, [T])
    if R == 128 and T > R:
        _bad(kernel, f"x has T = {T} rows; a ratio-128 chunk lays its tokens over the pool by "
                     f"position mod 128, so it may hold at most 128 tokens (spec chapter 04 Q12)")
    n = T if num_tokens is None else num_tokens
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or not 0 <= n <= T:
        _bad(kernel, f"num_tokens = {num_tokens!r} must be an integer in [0, T = {T}]")
    n = int(n)
    pos = _ints(kernel, "position_ids", position_ids)
    cmp_rows = _ints(kernel, "cmp_slot_mapping", cmp_slot_mapping)
    state_rows = _ints(kernel, "state_slot_mapping", state_slot_mapping)
    tbl = _ints(kernel, "compress_state_block_table", table)

    def state_row(q, t, wp):
        """row(q) of §4.6: -1 outside [0, MAXS) or for a negative table entry."""
        if q < 0 or q >= m.MAXS:
            return -1
        page = q // PAGE
        if page >= W:
            return -1                                   # a position the table does not cover
        blk = int(tbl[page])
        if blk >= NB:
            _bad(kernel, f"compress_state_block_table[{page}] = {blk} is outside [0, {NB}) (pages "
                         f"of kv_state / score_state), read for position {q}")
        return -1 if blk < 0 else blk * PAGE + q % PAGE

    # every index first (spec README decision 1); tokens t >= num_tokens are ignored
    entries = []
    for t in range(n):
        p = int(pos[t])
        if p < 0:
            _bad(kernel, f"position_ids[{t}] = {p} is negative")
        r = int(state_rows[t])
        if r >= NB * PAGE:
            _bad(kernel, f"state_slot_mapping[{t}] = {r} is outside [0, {NB * PAGE}) (rows of "
                         f"kv_state / score_state, {NB} pages of {PAGE})")
        dst = int(cmp_rows[t])
        if dst < 0:
            continue
        if dst >= NC * BLOCK:
            _bad(kernel, f"cmp_slot_mapping[{t}] = {dst} is outside [0, {NC * BLOCK}) (rows of "
                         f"cmp_kv, {NC} blocks of {BLOCK})")
        if p < R - 1:
            _bad(kernel, f"cmp_slot_mapping[{t}] = {dst} asks for a compressed entry at "
                         f"position_ids[{t}] = {p}, but its window would start at {p + 1 - R} < 0 "
                         f"(spec chapter 04 Q11)")
        if p + 1 - R >= L:
            _bad(kernel, f"the compressed entry of position_ids[{t}] = {p} needs RoPE row "
                         f"{p + 1 - R}, beyond the {L} rows of freqs_cos / freqs_sin")
        reads = []
        for i, (q, off) in enumerate(_window(R, p, HD)):
            if R == 4 and i < 4 and p < 2 * R - 1:
                continue                                # window 0: no previous window is read
            reads.append((i, state_row(q, t, p), off))
        entries.append((t, dst, p, reads))

    K, G = _projections(x, wkv, wgate)
    pos_n = pos[:n]
    Gp = G[:n] + f32(ape)[pos_n % R]
    cos, sin = freqs_cos, freqs_sin
    SL = m.COFF * R
    st, rows = _stage_rows(T, OD, HD)
    for t0, dst, wp, reads in entries:
        cur = wp + 1 - R
        kv_rows = np.zeros((SL, HD), np.float32)
        # an empty slot: score -inf for ratio 4, 0 for ratio 128 (spec Q2)
        sc_rows = np.full((SL, HD), NEG_INF if R == 4 else F32(0.0), np.float32)
        for i, row, off in reads:                       # the state before this chunk's writes
            if row >= 0:
                kv_rows[i] = kv_state[row // PAGE, row % PAGE, off:off + HD]
                sc_rows[i] = score_state[row // PAGE, row % PAGE, off:off + HD]
        for t in range(n):                              # the chunk's own rows, later ones win
            p = int(pos_n[t])
            if R == 4:
                prev = cur - 4
                if not prev <= p <= wp:
                    continue
                slot, off = (p - prev, 0) if p < cur else (4 + p - cur, HD)
            else:
                if p > wp:                              # no lower bound: T <= 128 (Q12)
                    continue
                slot, off = p % R, 0
            kv_rows[slot] = K[t, off:off + HD]
            sc_rows[slot] = Gp[t, off:off + HD]
        if R == 4:
            order = [7] + ([4, 5, 6] if wp < 2 * R - 1 else list(range(7)))
            pooled = softmax_pool_online(kv_rows, sc_rows, order)
        else:
            pooled = softmax_pool(kv_rows, sc_rows)
        normed, y = _finish(pooled, norm_w, np.asarray(cos[cur]), np.asarray(sin[cur]), m)
        rows["pooled"][t0], rows["normed"][t0], rows["roped"][t0] = pooled, normed, y
        cmp_kv[dst // BLOCK, dst % BLOCK, 0] = bf16_rne(y)

    for t in range(n):                                  # the chunk's state rows, after pooling
        r = int(state_rows[t])
        if r >= 0:
            kv_state[r // PAGE, r % PAGE] = K[t]
            score_state[r // PAGE, r % PAGE] = Gp[t]
    out = {"kv_state": kv_state, "score_state": score_state, "cmp_kv": cmp_kv}
    if stages:
        st["kv_proj"][:n], st["score_proj"][:n] = K[:n], Gp
        st.update(**rows, cmp_kv=cmp_kv, kv_state=kv_state, score_state=score_state)
        out["stages"] = st
    return out


def prefill_compressor_ratio4(x, kv_state, score_state, compress_state_block_table, wkv, wgate,
                              ape, norm_w, freqs_cos, freqs_sin, cmp_kv, position_ids,
                              cmp_slot_mapping, state_slot_mapping, num_tokens=None, *,
                              config=None, stages=False):
    """One prefill chunk of the CSA main compressor (ratio 4, overlap; spec §4.6).

    x [T, D] bf16; kv_state, score_state [NB, PAGE, 2 HD] fp32; compress_state_block_table
    [W] int; wkv, wgate [2 HD, D] bf16; ape [4, 2 HD] fp32; norm_w [HD] bf16; freqs_cos,
    freqs_sin [L, >= rd/2] (bf16 tables); cmp_kv [NC, BLOCK, 1, HD] bf16; position_ids,
    cmp_slot_mapping, state_slot_mapping [T] int; num_tokens (default T): tokens
    t >= num_tokens are ignored.

    Every token t with cmp_slot_mapping[t] >= 0 (the mapping decides) yields the entry of
    the window ending at wp = position_ids[t]: 8 slots from the state as it was before the
    chunk (front halves of wp-7..wp-4 unless wp < 7, back halves of wp-3..wp; missing rows
    kv 0, score -inf), overlaid with the chunk's rows of those positions, pooled by the
    online recurrence, normalised, rotated with RoPE row wp-3, written as bf16. Then the
    chunk's rows [K], [G + ape[p mod 4]] go to the state. Returns {"kv_state",
    "score_state", "cmp_kv"}: the arguments, updated.

    Stages (stages=True, spec chapter 04 §4.6; outputs appear where they are computed):
    kv_proj [T, 2 HD] fp32 (K), score_proj [T, 2 HD] fp32 (G + ape[p mod 4]), both zero
    from num_tokens on; then per token the entry it completes (zero rows for the others):
    pooled [T, HD] fp32 (online softmax pool, before the norm), normed [T, HD] fp32,
    roped [T, HD] fp32 (before the bf16 rounding); cmp_kv, kv_state, score_state.
    """
    return _prefill("prefill_compressor_ratio4", 4, x, kv_state, score_state,
                    compress_state_block_table, wkv, wgate, ape, norm_w, freqs_cos, freqs_sin,
                    cmp_kv, position_ids, cmp_slot_mapping, state_slot_mapping, num_tokens, config,
                    stages)


def prefill_compressor_ratio128(x, kv_state, score_state, compress_state_block_table, wkv, wgate,
                                ape, norm_w, freqs_cos, freqs_sin, cmp_kv, position_ids,
                                cmp_slot_mapping, state_slot_mapping, num_tokens=None, *,
                                config=None, stages=False):
    """One prefill chunk of the HCA compressor (ratio 128, no overlap; spec §4.7).

    As prefill_compressor_ratio4 with kv_state, score_state [NB, PAGE, HD], wkv, wgate
    [HD, D], ape [128, HD], T <= 128: an entry pools 128 slots, slot i from the state row
    of position wp-127+i (missing rows kv 0 and score 0, spec Q2), then every chunk token
    with p <= wp laid over slot p mod 128 (pypto-lib's rule, right while a chunk spans at
    most 128 positions, spec Q12), in batch form; RoPE row wp-127.

    Stages (stages=True) as prefill_compressor_ratio4's (spec §4.7): kv_proj, score_proj
    (here [T, HD]), pooled (batch form), normed, roped, cmp_kv, kv_state, score_state.
    """
    return _prefill("prefill_compressor_ratio128", 128, x, kv_state, score_state,
                    compress_state_block_table, wkv, wgate, ape, norm_w, freqs_cos, freqs_sin,
                    cmp_kv, position_ids, cmp_slot_mapping, state_slot_mapping, num_tokens, config,
                    stages)
