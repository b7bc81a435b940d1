"""Goldens of the lightning-indexer kernels (spec chapter 04 §4.8-§4.10):
decode_indexer_compressor, prefill_indexer_compressor, decode_indexer, prefill_indexer.

The indexer-key compressor is the ratio-4 overlapping compressor of §4.4/§4.6 with
head dim 128, followed by a bf16 rounding and a right-multiplication by the
"Hadamard" matrix (`k = v · H`, row vector on the left). The lightning indexer
builds per-head int8 queries (W8A8), runs that compressor to commit this call's
keys, scores every visible compressed key with int8 dot products (W8A8C16) and
selects the top-k slots.

Conventions shared by the four goldens:

* Shapes come from the arrays; the RoPE width, eps, max_position_embeddings (MAXS),
  the indexer head counts and index_topk from `config` (default FLASH).
* States and caches (pypto-lib's InOut tensors) are updated in place and returned;
  decode_indexer's `inner_kv` / `inner_compress_state` and prefill_indexer's
  `inner_kv_state` / `inner_score_state` are plain inputs in pypto-lib that its golden
  mutates: they are mutated in place here too (the next call reads them) but not
  returned.
* Every index the computation dereferences is checked before the first write
  (ValueError naming the tensor and the first bad position), so a call that raises
  leaves every state and cache as it was. Negative slot mappings mean "no write",
  negative state-table entries "missing row" (§4.3.3, §4.14).
* Top-k order is deterministic: score descending, then slot ascending (§4.15).
"""
import numpy as np

from ..config import FP32_NEG_INF, get_config
from ._outputs import writes_outputs
from .numerics import (
    BF16, F32, bf16_rne, f32, int8_quant_per_row, matmul_i8, rms_norm, rope_interleaved,
    softmax_pool, softmax_pool_online, topk_desc,
)

RATIO = 4                       # the indexer runs on ratio-4 (CSA) layers only
NEG = F32(FP32_NEG_INF)         # -FLT_MAX: finite "empty" score (§4.1.1)
NINF = F32(-np.inf)
PREFILL_SCORE_BLOCKS = 2        # prefill scores at most 2 cache blocks of slots (§4.10.2)
HEAD_CHUNK = 16                 # head sum: chunks of 16 heads (§4.10.0, torch's observed order)


# ------------------------------------------------------------------ checks

def _fail(kernel, msg):
    raise ValueError(f"{kernel}: {msg}")


def _first(kernel, name, arr, bad, what):
    """Raise for the first (row-major) position of `bad`: name[pos] = value what."""
    bad = np.asarray(bad)
    if bad.size == np.size(arr):
        bad = bad.reshape(np.shape(arr))
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        val = np.asarray(arr)[pos] if np.ndim(arr) else arr
        _fail(kernel, f"{name}[{', '.join(map(str, pos))}] = {int(val)} {what}")


def _shape(kernel, name, a, shape):
    """Check a's shape against `shape` (None = any extent)."""
    s = np.shape(a)
    if len(s) != len(shape) or any(w is not None and w != g for w, g in zip(shape, s)):
        want = "[" + ", ".join("?" if w is None else str(w) for w in shape) + "]"
        _fail(kernel, f"{name} must have shape {want}, got {s}")


def _inplace(kernel, name, a, dtype):
    """An InOut / mutated tensor must be a writable array of its own dtype."""
    if not isinstance(a, np.ndarray) or a.dtype != dtype:
        raise TypeError(f"{kernel}: {name} is updated in place and must be a numpy "
                        f"{np.dtype(dtype)} array, got {getattr(a, 'dtype', type(a).__name__)}")
    if not a.flags.writeable:
        raise ValueError(f"{kernel}: {name} is updated in place but is read-only")


def _ints(a):
    return np.asarray(a).astype(np.int64)


class _Compressor:
    """Shapes shared by both indexer compressors: HD from norm_w, OD = 2 HD."""

    def __init__(self, kernel, cfg, D, wkv, wgate, ape, norm_w, hadamard, cache, names):
        self.kernel, self.names = kernel, names
        self.HD = np.shape(norm_w)[0] if np.ndim(norm_w) == 1 else -1
        if self.HD <= 0:
            _fail(kernel, f"{names['norm_w']} must be 1-D [HD], got shape {np.shape(norm_w)}")
        HD = self.HD
        self.OD = 2 * HD
        self.rd = cfg.qk_rope_head_dim
        if not 0 < self.rd <= HD or self.rd % 2:
            _fail(kernel, f"qk_rope_head_dim = {self.rd} does not fit the head dim {HD}")
        self.nd = HD - self.rd
        _shape(kernel, names["wkv"], wkv, (self.OD, D))
        _shape(kernel, names["wgate"], wgate, (self.OD, D))
        _shape(kernel, names["ape"], ape, (RATIO, self.OD))
        _shape(kernel, "hadamard", hadamard, (HD, HD))
        _shape(kernel, "idx_kv_cache", cache, (None, None, 1, HD))
        _inplace(kernel, "idx_kv_cache", cache, BF16)
        self.BLOCK = cache.shape[1]
        self.cache_rows = cache.shape[0] * cache.shape[1]
        self.MAXS = cfg.max_position_embeddings
        self.eps = cfg.rms_norm_eps

    def finish(self, pooled, cos, sin, hadamard, norm_w, st=None, row=None):
        """§4.8 steps 3-5 / §4.9 steps 6-8: RMSNorm with gamma, RoPE on the last rd dims of
        the unrounded fp32 vector, bf16, then v · H. Returns k (fp32); fills row `row` of
        the stages in `st` if given."""
        y = rms_norm(pooled, norm_w, self.eps)
        v = np.empty(y.shape, BF16)
        v[..., :self.nd] = bf16_rne(y[..., :self.nd])
        v[..., self.nd:] = rope_interleaved(y[..., self.nd:], cos, sin)
        k = np.matmul(f32(v), f32(hadamard))
        if st is not None:
            st["pooled"][row], st["normed"][row], st["roped"][row], st["keys"][row] = \
                pooled, y, v, k
        return k

    def stage_rows(self, rows):
        """Zeroed per-token stages: the projections, then the key each token commits."""
        st = {"kv_proj": np.zeros((rows, self.OD), np.float32),
              "score_proj": np.zeros((rows, self.OD), np.float32)}
        st.update({name: np.zeros((rows, self.HD), np.float32) for name in ("pooled", "normed")})
        st["roped"] = np.zeros((rows, self.HD), BF16)
        st["keys"] = np.zeros((rows, self.HD), np.float32)
        return st


# ------------------------------------------------------------ decode compressor

class _DecodeCompressor(_Compressor):
    """§4.8 (and the inner compressor of §4.10.1): checks first, then `run` writes."""

    def __init__(self, kernel, cfg, x, state, table, wkv, wgate, ape, norm_w, cos, sin, hadamard,
                 cache, position_ids, idx_slot_mapping, state_slot_mapping, names):
        if np.ndim(x) != 3:
            _fail(kernel, f"x must be [B, S, D], got shape {np.shape(x)}")
        B, S, D = np.shape(x)
        if S != 1:
            _fail(kernel, f"x has S = {S} tokens per request; the decode indexer kernels are "
                          f"defined for S = 1 only (spec §4.4, quirk Q19)")
        super().__init__(kernel, cfg, D, wkv, wgate, ape, norm_w, hadamard, cache, names)
        self.B = B
        st, tb = names["compress_state"], names["compress_state_block_table"]
        _shape(kernel, st, state, (None, None, 2 * self.OD))
        _inplace(kernel, st, state, np.float32)
        self.NB, self.PAGE = state.shape[0], state.shape[1]
        _shape(kernel, tb, table, (B, None))
        half = self.rd // 2
        for n, a in (("cos", cos), ("sin", sin)):
            if np.ndim(a) != 2 or np.shape(a)[0] != B or np.shape(a)[1] < half:
                _fail(kernel, f"{n} must be [B = {B}, {half}], got shape {np.shape(a)}")
        for n, a in (("position_ids", position_ids), ("idx_slot_mapping", idx_slot_mapping),
                     (names["state_slot_mapping"], state_slot_mapping)):
            _shape(kernel, n, a, (B, 1))
        pos = _ints(position_ids)[:, 0]
        _first(kernel, "position_ids", position_ids, pos < 0, "is negative")
        srow = _ints(state_slot_mapping)[:, 0]
        _first(kernel, names["state_slot_mapping"], state_slot_mapping,
               srow >= self.NB * self.PAGE,
               f"is outside the {self.NB * self.PAGE} rows of {st}")
        self.compress = pos % RATIO == RATIO - 1
        tbl = _ints(table)
        width = tbl.shape[1]
        for b in np.flatnonzero(self.compress):
            cur = pos[b] - (RATIO - 1)
            for q in range(cur - RATIO, cur + RATIO):
                if q < 0:
                    continue
                page = q // self.PAGE
                if page >= width:
                    continue                       # beyond the table: a missing row (§4.3.3)
                if tbl[b, page] >= self.NB:
                    _fail(kernel, f"{tb}[{b}, {page}] = {tbl[b, page]} is outside [0, {self.NB}) "
                                  f"(pages of {st}), read for position {q}")
        crow = _ints(idx_slot_mapping)[:, 0]
        _first(kernel, "idx_slot_mapping", idx_slot_mapping,
               self.compress & (crow >= self.cache_rows),
               f"is outside the {self.cache_rows} rows of idx_kv_cache")
        self.pos, self.srow, self.crow, self.tbl = pos, srow, crow, tbl

    def run(self, x, state, wkv, wgate, ape, norm_w, cos, sin, hadamard, cache, kv, st=None):
        """Steps 1-6 of §4.8. kv [B, 1, HD] fp32 receives the keys of committing requests
        (other rows untouched); state and cache are written in place. `st` (from
        stage_rows) receives the stages."""
        HD, OD, PAGE = self.HD, self.OD, self.PAGE
        xf = f32(x)[:, 0]
        K = np.matmul(xf, f32(wkv).T)
        G = np.matmul(xf, f32(wgate).T)
        ape = f32(ape)
        pooled = {}
        for b in range(self.B):
            p = int(self.pos[b])
            Gp = G[b] + ape[p % RATIO]
            if st is not None:
                st["kv_proj"][b], st["score_proj"][b] = K[b], Gp
            r = int(self.srow[b])
            if r >= 0:
                state[r // PAGE, r % PAGE, :OD] = K[b]
                state[r // PAGE, r % PAGE, OD:] = Gp
            if not self.compress[b]:
                continue
            cur = p - (RATIO - 1)
            kvs = np.zeros((2 * RATIO, HD), np.float32)
            scs = np.full((2 * RATIO, HD), NINF, np.float32)
            for j in range(2 * RATIO):
                front = j < RATIO                  # slots 0..3: previous window, front half
                q = cur - RATIO + j                # slots 4..7: this window, back half
                if q < 0 or q // PAGE >= self.tbl.shape[1]:
                    continue                       # before position 0 or beyond the table
                blk = int(self.tbl[b, q // PAGE])
                if blk < 0:
                    continue
                row = state[blk, q % PAGE]
                c0 = 0 if front else HD
                kvs[j] = row[c0:c0 + HD]
                scs[j] = row[OD + c0:OD + c0 + HD]
            pooled[b] = softmax_pool(kvs, scs)
        for b, pb in pooled.items():
            k = self.finish(pb, f32(cos)[b, :self.rd // 2], f32(sin)[b, :self.rd // 2], hadamard,
                            norm_w, st, b)
            row = int(self.crow[b])
            if row >= 0:
                kv[b, 0] = k
                cache[row // self.BLOCK, row % self.BLOCK, 0] = bf16_rne(k)


_DECODE_NAMES = {n: n for n in ("norm_w", "wkv", "wgate", "ape", "compress_state",
                                "compress_state_block_table")}
_DECODE_NAMES["state_slot_mapping"] = "inner_state_slot_mapping"


@writes_outputs("kv", inouts=("compress_state", "idx_kv_cache"))
def decode_indexer_compressor(x, compress_state, compress_state_block_table, wkv, wgate, ape,
                              norm_w, cos, sin, hadamard, idx_kv_cache, position_ids,
                              idx_slot_mapping, inner_state_slot_mapping, *, config=None,
                              stages=False):
    """One decode step of the indexer-key compressor (§4.8), B requests of S = 1 token.

    Appends each token's projections [K | G + ape] to compress_state; a request whose
    token completes a window (p mod 4 == 3) pools the 8 overlapping rows (batch softmax,
    §4.2.3), RMSNorms, applies RoPE with cos[b]/sin[b], rounds to bf16 and multiplies by
    hadamard. If idx_slot_mapping[b, 0] >= 0: kv[b, 0] = the fp32 key and idx_kv_cache
    row = bf16(key). Returns kv [B, 1, HD] fp32 plus compress_state and idx_kv_cache,
    both updated in place.

    Stages (stages=True, spec chapter 04 §4.8; outputs appear where they are computed):
    kv_proj [B, 2 HD] fp32 (K), score_proj [B, 2 HD] fp32 (G + ape[p mod 4]),
    compress_state, then per request the key its token commits (zero rows for the
    others): pooled [B, HD] fp32 (softmax pool, before the norm), normed [B, HD] fp32
    (RMSNorm with norm_w), roped [B, HD] bf16 (after RoPE, rounded), keys [B, HD] fp32
    (roped · hadamard, before the bf16 rounding); kv, idx_kv_cache.
    """
    cfg = get_config(config)
    k = "decode_indexer_compressor"
    c = _DecodeCompressor(k, cfg, x, compress_state, compress_state_block_table, wkv, wgate, ape,
                          norm_w, cos, sin, hadamard, idx_kv_cache, position_ids, idx_slot_mapping,
                          inner_state_slot_mapping, _DECODE_NAMES)
    kv = np.zeros((c.B, 1, c.HD), np.float32)
    st = c.stage_rows(c.B) if stages else None
    c.run(x, compress_state, wkv, wgate, ape, norm_w, cos, sin, hadamard, idx_kv_cache, kv, st)
    out = {"kv": kv, "compress_state": compress_state, "idx_kv_cache": idx_kv_cache}
    if stages:
        out["stages"] = _decode_key_stages(st, "", compress_state, kv, idx_kv_cache)
    return out


def _decode_key_stages(st, prefix, state, kv, cache):
    """The decode key compressor's stages in the order of §4.8: the state is written
    before the window is pooled."""
    names = ("kv_proj", "score_proj", "compress_state", "pooled", "normed", "roped", "keys",
             "kv", "idx_kv_cache")
    st = {**st, "compress_state": state, "kv": kv, "idx_kv_cache": cache}
    return {(prefix + n if n != "idx_kv_cache" else n): st[n] for n in names}


# ----------------------------------------------------------- prefill compressor

class _PrefillCompressor(_Compressor):
    """§4.9 (and the inner compressor of §4.10.2): checks first, then `run` writes."""

    def __init__(self, kernel, cfg, x, kv_state, score_state, table, wkv, wgate, ape, norm_w,
                 freqs_cos, freqs_sin, hadamard, cache, position_ids, num_tokens,
                 idx_slot_mapping, state_slot_mapping, names):
        if np.ndim(x) != 2:
            _fail(kernel, f"x must be [T, D], got shape {np.shape(x)}")
        T, D = np.shape(x)
        super().__init__(kernel, cfg, D, wkv, wgate, ape, norm_w, hadamard, cache, names)
        self.T = T
        n = T if num_tokens is None else int(num_tokens)
        if not 0 <= n <= T:
            _fail(kernel, f"num_tokens = {n} is outside [0, T = {T}]")
        self.n = n
        ks, ss, tb = names["kv_state"], names["score_state"], names["table"]
        for name, a in ((ks, kv_state), (ss, score_state)):
            _shape(kernel, name, a, (None, None, self.OD))
            _inplace(kernel, name, a, np.float32)
        if kv_state.shape != score_state.shape:
            _fail(kernel, f"{ks} {kv_state.shape} and {ss} {score_state.shape} differ in shape")
        self.NB, self.PAGE = kv_state.shape[0], kv_state.shape[1]
        if np.ndim(table) != 1:
            _fail(kernel, f"{tb} must be 1-D (one request), got shape {np.shape(table)}")
        half = self.rd // 2
        for name, a in (("freqs_cos", freqs_cos), ("freqs_sin", freqs_sin)):
            if np.ndim(a) != 2 or np.shape(a)[1] < half:
                _fail(kernel, f"{name} must be [rows, >= {half}], got shape {np.shape(a)}")
        for name, a in (("position_ids", position_ids), ("idx_slot_mapping", idx_slot_mapping),
                        (names["state_slot_mapping"], state_slot_mapping)):
            _shape(kernel, name, a, (T,))
        pos = _ints(position_ids)
        valid = np.arange(T) < n
        _first(kernel, "position_ids", position_ids, valid & (pos < 0), "is negative")
        srow = _ints(state_slot_mapping)
        _first(kernel, names["state_slot_mapping"], state_slot_mapping,
               valid & (srow >= self.NB * self.PAGE),
               f"is outside the {self.NB * self.PAGE} rows of {ks}")
        dst = _ints(idx_slot_mapping)
        flagged = valid & (dst >= 0)
        _first(kernel, "idx_slot_mapping", idx_slot_mapping, flagged & (dst >= self.cache_rows),
               f"is outside the {self.cache_rows} rows of idx_kv_cache")
        tbl = _ints(table)
        rope_rows = min(np.shape(freqs_cos)[0], np.shape(freqs_sin)[0])
        for t in np.flatnonzero(flagged):
            wp = int(pos[t])
            if wp < RATIO - 1:
                _fail(kernel, f"idx_slot_mapping[{t}] = {dst[t]} flags token {t} at position "
                              f"{wp} < {RATIO - 1}: its window would start at a negative "
                              f"position (spec quirk Q11)")
            cur = wp + 1 - RATIO
            if cur >= rope_rows:
                _fail(kernel, f"token {t} (position {wp}) needs RoPE row {cur} beyond the "
                              f"{rope_rows} rows of freqs_cos/freqs_sin")
            first = cur - RATIO if wp >= 2 * RATIO - 1 else cur
            for q in range(first, cur + RATIO):
                if q < 0 or q // self.PAGE >= tbl.shape[0]:
                    continue                       # missing rows (§4.3.3)
                if tbl[q // self.PAGE] >= self.NB:
                    _fail(kernel, f"{tb}[{q // self.PAGE}] = {tbl[q // self.PAGE]} is outside "
                                  f"[0, {self.NB}) (pages of {ks}), read for position {q}")
        self.pos, self.srow, self.dst, self.tbl, self.flagged = pos, srow, dst, tbl, flagged

    def _row(self, q):
        if q < 0 or q // self.PAGE >= self.tbl.shape[0]:
            return -1
        blk = int(self.tbl[q // self.PAGE])
        return -1 if blk < 0 else blk * self.PAGE + q % self.PAGE

    def run(self, x, kv_state, score_state, wkv, wgate, ape, norm_w, freqs_cos, freqs_sin,
            hadamard, cache, kv, st=None):
        """§4.9 steps 1-10. kv [W, HD] bf16 receives the i-th written key (i < W). `st`
        (from stage_rows) receives the stages."""
        HD, OD, PAGE, R = self.HD, self.OD, self.PAGE, RATIO
        xf = f32(x)
        K = np.matmul(xf, f32(wkv).T)
        G = np.matmul(xf, f32(wgate).T)
        pos, n = self.pos, self.n
        Gp = G + f32(ape)[pos % R]
        if st is not None:
            st["kv_proj"][:n], st["score_proj"][:n] = K[:n], Gp[:n]
        kv_flat = kv_state.reshape(-1, OD)
        sc_flat = score_state.reshape(-1, OD)
        half = self.rd // 2
        i = 0
        for t0 in np.flatnonzero(self.flagged):
            wp = int(pos[t0])
            cur = wp + 1 - R
            prev = cur - R
            window0 = wp < 2 * R - 1
            kvs = np.zeros((2 * R, HD), np.float32)
            scs = np.full((2 * R, HD), NINF, np.float32)
            for s in range(R):
                if not window0:
                    r = self._row(prev + s)
                    if r >= 0:
                        kvs[s], scs[s] = kv_flat[r, :HD], sc_flat[r, :HD]
                r = self._row(cur + s)
                if r >= 0:
                    kvs[R + s], scs[R + s] = kv_flat[r, HD:], sc_flat[r, HD:]
            for t in range(n):                       # overlay this chunk; later tokens win
                p = int(pos[t])
                if p < prev or p > wp:
                    continue
                if p < cur:
                    kvs[p - prev], scs[p - prev] = K[t, :HD], Gp[t, :HD]
                else:
                    kvs[R + p - cur], scs[R + p - cur] = K[t, HD:], Gp[t, HD:]
            order = [2 * R - 1] + [j for j in range(2 * R - 1) if j >= R or not window0]
            with np.errstate(invalid="ignore"):
                pooled = softmax_pool_online(kvs, scs, order)
            k = self.finish(pooled, f32(freqs_cos[cur, :half]), f32(freqs_sin[cur, :half]),
                            hadamard, norm_w, st, t0)
            kb = bf16_rne(k)
            d = int(self.dst[t0])
            cache[d // self.BLOCK, d % self.BLOCK, 0] = kb
            if i < kv.shape[0]:
                kv[i] = kb
            i += 1
        for t in range(n):                           # state write-back after all entries
            r = int(self.srow[t])
            if r >= 0:
                kv_state[r // PAGE, r % PAGE] = K[t]
                score_state[r // PAGE, r % PAGE] = Gp[t]


_PREFILL_NAMES = {n: n for n in ("norm_w", "wkv", "wgate", "ape", "kv_state", "score_state")}
_PREFILL_NAMES.update(table="inner_compress_state_block_table",
                      state_slot_mapping="inner_state_slot_mapping")


def max_cmp_writes(T):
    """MAX_CMP_WRITES: rows of prefill_indexer_compressor's kv output."""
    return max(1, T // RATIO)


@writes_outputs("kv", inouts=("kv_state", "score_state", "idx_kv_cache"))
def prefill_indexer_compressor(x, kv_state, score_state, inner_compress_state_block_table, wkv,
                               wgate, ape, norm_w, freqs_cos, freqs_sin, hadamard, idx_kv_cache,
                               idx_block_table, position_ids, idx_slot_mapping,
                               inner_state_slot_mapping, num_tokens=None, *, config=None,
                               stages=False):
    """One prefill chunk of the indexer-key compressor (§4.9), x [T, D].

    Every token t < num_tokens (default T) with idx_slot_mapping[t] >= 0 commits one key:
    the 8 overlapping rows of the window ending at its position (state before this chunk,
    overlaid by this chunk's tokens), online softmax pooling, RMSNorm, RoPE with
    freqs_*[wp - 3], bf16, v · H, written as bf16 to idx_kv_cache and (for the first
    W = max(1, T // 4)) to kv in write order. Then the chunk's projections are appended to
    kv_state / score_state. idx_block_table is accepted and not read (quirk Q18).
    Returns kv [W, HD] bf16, kv_state, score_state, idx_kv_cache (in place).

    Stages (stages=True, spec chapter 04 §4.9; outputs appear where they are computed):
    kv_proj [T, 2 HD] fp32 (K), score_proj [T, 2 HD] fp32 (G + ape[p mod 4]), both zero
    from num_tokens on; then per token the key it commits (zero rows for the others):
    pooled [T, HD] fp32 (softmax pool, before the norm), normed [T, HD] fp32
    (RMSNorm with norm_w), roped [T, HD] bf16 (after RoPE, rounded), keys [T, HD] fp32
    (roped · hadamard, before the bf16 rounding); idx_kv_cache, kv,
    kv_state, score_state (written back last).
    """
    cfg = get_config(config)
    c = _PrefillCompressor("prefill_indexer_compressor", cfg, x, kv_state, score_state,
                           inner_compress_state_block_table, wkv, wgate, ape, norm_w, freqs_cos,
                           freqs_sin, hadamard, idx_kv_cache, position_ids, num_tokens,
                           idx_slot_mapping, inner_state_slot_mapping, _PREFILL_NAMES)
    kv = np.zeros((max_cmp_writes(c.T), c.HD), BF16)
    st = c.stage_rows(c.T) if stages else None
    c.run(x, kv_state, score_state, wkv, wgate, ape, norm_w, freqs_cos, freqs_sin, hadamard,
          idx_kv_cache, kv, st)
    out = {"kv": kv, "kv_state": kv_state, "score_state": score_state,
           "idx_kv_cache": idx_kv_cache}
    if stages:
        out["stages"] = {**st, "idx_kv_cache": idx_kv_cache, "kv": kv, "kv_state": kv_state,
                         "score_state": score_state}
    return out


# ------------------------------------------------------------- lightning indexer

class _Query:
    """§4.10.0 shapes: N rows of qr, H heads of HD, checked against config."""

    def __init__(self, kernel, cfg, N, D, qr, qr_scale, wq_b, wq_b_scale, weights_proj, HD):
        H = cfg.index_n_heads
        if HD != cfg.index_head_dim:
            _fail(kernel, f"hadamard is {HD} wide but config index_head_dim = {cfg.index_head_dim}")
        if np.ndim(qr) != 2 or np.shape(qr)[0] != N:
            _fail(kernel, f"qr must be [{N}, Q_LORA], got shape {np.shape(qr)}")
        QL = np.shape(qr)[1]
        if np.shape(qr_scale) not in ((N, 1), (N,)):
            _fail(kernel, f"qr_scale must be [{N}, 1], got shape {np.shape(qr_scale)}")
        _shape(kernel, "wq_b", wq_b, (QL, H * HD))
        if np.shape(wq_b_scale) not in ((H * HD,), (1, H * HD)):
            _fail(kernel, f"wq_b_scale must be [{H * HD}], got shape {np.shape(wq_b_scale)}")
        _shape(kernel, "weights_proj", weights_proj, (D, H))
        self.H, self.HD, self.N = H, HD, N
        self.WS = F32(cfg.index_weights_scale)

    def project(self, qr, qr_scale, wq_b, wq_b_scale, cos, sin, hadamard, rd, st=None):
        """Q = (int32(qr · wq_b) * qr_scale) * wq_b_scale; RoPE on the last rd dims of every
        head (rounded to bf16), bf16 of the rest, then · H. Returns Qr [N, H, HD] fp32; `st`
        receives q_dequant (Q) and q_rot (Qr)."""
        N, H, HD = self.N, self.H, self.HD
        q_i32 = matmul_i8(np.asarray(qr), np.asarray(wq_b))
        Q = ((q_i32.astype(np.float32) * f32(qr_scale).reshape(N, 1))
             * f32(wq_b_scale).reshape(1, -1)).reshape(N, H, HD)
        nd = HD - rd
        q = np.empty((N, H, HD), BF16)
        q[..., :nd] = bf16_rne(Q[..., :nd])
        q[..., nd:] = rope_interleaved(Q[..., nd:], cos[:, None, :], sin[:, None, :])
        Qr = np.matmul(f32(q), f32(hadamard))
        if st is not None:
            st.update(q_dequant=Q, q_rot=Qr)
        return Qr

    def weights(self, x2d, weights_proj):
        """Wt = (x · weights_proj) * WS, [N, H]."""
        return np.matmul(f32(x2d), f32(weights_proj)) * self.WS


def head_sum(term):
    """Sum over the head axis (-2) of [..., H, C]: chunks of 16 consecutive heads, each
    summed in order, then the chunk sums in order (the order torch's CPU reduction
    uses; the spec leaves it free)."""
    H = term.shape[-2]
    total = None
    for h0 in range(0, H, HEAD_CHUNK):
        acc = term[..., h0, :].copy()
        for h in range(h0 + 1, min(h0 + HEAD_CHUNK, H)):
            acc = acc + term[..., h, :]
        total = acc if total is None else total + acc
    return total


def _check_idx_table(kernel, table, rows, slots, blocks, BLOCK):
    """The idx_block_table entries the slots 0..slots-1 of `rows` need must lie in
    [0, blocks) (quirk Q26)."""
    if slots <= 0:
        return
    need = (slots - 1) // BLOCK + 1
    tbl = _ints(table)
    if tbl.shape[-1] < need:
        _fail(kernel, f"idx_block_table has {tbl.shape[-1]} columns but slot {slots - 1} needs "
                      f"block column {need - 1}")
    sub = tbl[..., :need] if tbl.ndim == 1 else tbl[rows, :need]
    bad = (sub < 0) | (sub >= blocks)
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        if tbl.ndim == 2:
            pos = (int(np.asarray(rows).reshape(-1)[pos[0]]), pos[1])
        _fail(kernel, f"idx_block_table[{', '.join(map(str, pos))}] = {int(tbl[pos])} is outside "
                      f"[0, {blocks}) (blocks of idx_kv_cache), needed by a visible slot")


def _gather_keys(cache, rows):
    flat = cache.reshape(-1, cache.shape[-1])
    return f32(flat[rows])


@writes_outputs("score", "topk_idxs", inouts=("inner_kv", "inner_compress_state", "idx_kv_cache"))
def decode_indexer(x, qr, qr_scale, wq_b, wq_b_scale, weights_proj, cos, sin, hadamard,
                   inner_kv, inner_compress_state, inner_compress_state_block_table, inner_wkv,
                   inner_wgate, inner_ape, inner_norm_w, idx_kv_cache, idx_block_table,
                   position_ids, idx_slot_mapping, inner_state_slot_mapping, kv_seq_lens,
                   offset=128, *, config=None, stages=False):
    """One decode step of the lightning indexer (§4.10.1), B requests of S = 1 token.

    Query: int8 qr · wq_b dequantised, RoPE (cos[b], sin[b]) on the last 64 dims of each
    head, bf16, · hadamard. The inner compressor (§4.8) commits this step's key into
    idx_kv_cache (also updating inner_kv and inner_compress_state in place). Then for
    request b, the vis = min(kv_seq_lens[b] // 4, (p + 1) // 4, MAXS // 4) visible keys
    are read back from the bf16 cache through idx_block_table, int8-quantised per row,
    and scored: score = (sum_h relu(S32 * qdq) * Wt) * kdq. topk_idxs holds the
    min(index_topk, vis) best slots + offset (score descending, slot ascending), -1
    elsewhere; score is NEG = -FLT_MAX beyond vis.
    Returns score [B, 1, MAXS // 4] fp32, topk_idxs [B, 1, MAXS // 4] int32, and the
    updated inner_kv, inner_compress_state and idx_kv_cache (in place).

    Stages (stages=True, spec chapter 04 §4.10.1; outputs appear where they are
    computed): q_dequant [B, H, HD] fp32 (Q), q_rot [B, H, HD] fp32 (Qr = bf16(RoPE(Q)) ·
    hadamard); the inner compressor's stages (decode_indexer_compressor's, prefixed
    inner_): inner_kv_proj, inner_score_proj, inner_compress_state, inner_pooled,
    inner_normed, inner_roped, inner_keys, inner_kv, idx_kv_cache; weights [B, H] fp32
    (Wt, the head weights), q8 [B, H, HD] int8, qdq [B, H, 1] fp32 (the int8 query);
    score (the scores before the top-k), topk_idxs.
    """
    cfg = get_config(config)
    kern = "decode_indexer"
    names = {"norm_w": "inner_norm_w", "wkv": "inner_wkv", "wgate": "inner_wgate",
             "ape": "inner_ape", "compress_state": "inner_compress_state",
             "compress_state_block_table": "inner_compress_state_block_table",
             "state_slot_mapping": "inner_state_slot_mapping"}
    comp = _DecodeCompressor(kern, cfg, x, inner_compress_state, inner_compress_state_block_table,
                             inner_wkv, inner_wgate, inner_ape, inner_norm_w, cos, sin, hadamard,
                             idx_kv_cache, position_ids, idx_slot_mapping,
                             inner_state_slot_mapping, names)
    B, HD, rd = comp.B, comp.HD, comp.rd
    _shape(kern, "inner_kv", inner_kv, (B, 1, HD))
    _inplace(kern, "inner_kv", inner_kv, np.float32)
    qy = _Query(kern, cfg, B, np.shape(x)[2], qr, qr_scale, wq_b, wq_b_scale, weights_proj, HD)
    _shape(kern, "kv_seq_lens", kv_seq_lens, (B,))
    lens = _ints(kv_seq_lens)
    _first(kern, "kv_seq_lens", kv_seq_lens, lens < 0, "is negative")
    _shape(kern, "idx_block_table", idx_block_table, (B, None))
    SCORE_LEN = cfg.max_position_embeddings // RATIO
    vis = np.minimum(np.minimum(lens // RATIO, (comp.pos + 1) // RATIO), SCORE_LEN)
    for b in range(B):
        _check_idx_table(kern, idx_block_table, [b], int(vis[b]), idx_kv_cache.shape[0],
                         comp.BLOCK)
    offset = int(offset)

    # everything checked: compute and write
    half = rd // 2
    st = {} if stages else None
    Qr = qy.project(qr, qr_scale, wq_b, wq_b_scale, f32(cos)[:, :half], f32(sin)[:, :half],
                    hadamard, rd, st)
    inner = comp.stage_rows(B) if stages else None
    comp.run(x, inner_compress_state, inner_wkv, inner_wgate, inner_ape, inner_norm_w, cos, sin,
             hadamard, idx_kv_cache, inner_kv, inner)
    Wt = qy.weights(np.asarray(x)[:, 0], weights_proj)             # [B, H]
    score = np.full((B, 1, SCORE_LEN), NEG, np.float32)
    topk_idxs = np.full((B, 1, SCORE_LEN), -1, np.int32)
    q8, qdq = int8_quant_per_row(Qr)                               # [B, H, HD], [B, H, 1]
    tbl = _ints(idx_block_table)
    BLOCK = comp.BLOCK
    for b in range(B):
        v = int(vis[b])
        if v <= 0:
            continue
        c = np.arange(v)
        keys = _gather_keys(idx_kv_cache, tbl[b, c // BLOCK] * BLOCK + c % BLOCK)
        k8, kdq = int8_quant_per_row(keys)                         # [v, HD], [v, 1]
        s32 = matmul_i8(q8[b], k8.T)                               # [H, v]
        term = np.maximum(s32.astype(np.float32) * qdq[b], F32(0)) * Wt[b][:, None]
        sc = head_sum(term) * kdq[:, 0]
        score[b, 0, :v] = sc
        k = min(cfg.index_topk, v)
        topk_idxs[b, 0, :k] = (topk_desc(sc, k) + offset).astype(np.int32)
    out = {"score": score, "topk_idxs": topk_idxs, "inner_kv": inner_kv,
           "inner_compress_state": inner_compress_state, "idx_kv_cache": idx_kv_cache}
    if stages:
        st.update(_decode_key_stages(inner, "inner_", inner_compress_state, inner_kv,
                                     idx_kv_cache))
        st.update(weights=Wt, q8=q8, qdq=qdq, score=score, topk_idxs=topk_idxs)
        out["stages"] = st
    return out


def prefill_score_cap(BLOCK=128):
    """INDEXER_SCORE_CAP: slots the prefill indexer scores (score / topk_idxs width)."""
    return PREFILL_SCORE_BLOCKS * BLOCK


@writes_outputs("score", "topk_idxs",
                inouts=("inner_kv_state", "inner_score_state", "idx_kv_cache"))
def prefill_indexer(x, qr, qr_scale, wq_b, wq_b_scale, weights_proj, cos, sin, freqs_cos,
                    freqs_sin, hadamard, inner_kv_state, inner_score_state,
                    inner_compress_state_block_table, inner_wkv, inner_wgate, inner_ape,
                    inner_norm_w, idx_kv_cache, idx_block_table, position_ids, idx_slot_mapping,
                    inner_state_slot_mapping, num_tokens=None, *, config=None, stages=False):
    """One prefill chunk of the lightning indexer (§4.10.2), x [T, D], one request.

    The inner compressor (§4.9) commits the chunk's keys into idx_kv_cache (and updates
    inner_kv_state / inner_score_state in place). Every token sees
    vis[t] = min((p_t + 1) // 4, CAP) slots, CAP = 2 * 128; with MV = max vis over the
    first num_tokens tokens, the first MV slots are read through the 1-D idx_block_table
    and scored for all T rows: score = sum_h relu((S32 * qdq) * kdq) * Wt, NEG where
    c >= vis[t]. Token t < num_tokens gets its min(CAP, vis[t]) best slots + (WIN + T) in
    topk_idxs (score descending, slot ascending), -1 elsewhere.
    Returns score [T, CAP] fp32, topk_idxs [T, CAP] int32, and the updated inner_kv_state,
    inner_score_state and idx_kv_cache (in place).

    Stages (stages=True, spec chapter 04 §4.10.2; outputs appear where they are
    computed): the inner compressor's stages (prefill_indexer_compressor's, prefixed
    inner_): inner_kv_proj, inner_score_proj, inner_pooled, inner_normed, inner_roped,
    inner_keys, idx_kv_cache, inner_kv_state, inner_score_state; q_dequant [T, H, HD] fp32
    (Q), q_rot [T, H, HD] fp32 (Qr = bf16(RoPE(Q)) · hadamard), weights [T, H] fp32 (Wt),
    q8 [T, H, HD] int8, qdq [T, H, 1] fp32, k8 [MV, HD] int8, kdq [MV, 1] fp32 (the int8
    keys of the MV slots read back); score (the scores before the top-k), topk_idxs.
    """
    cfg = get_config(config)
    kern = "prefill_indexer"
    names = {"norm_w": "inner_norm_w", "wkv": "inner_wkv", "wgate": "inner_wgate",
             "ape": "inner_ape", "kv_state": "inner_kv_state", "score_state": "inner_score_state",
             "table": "inner_compress_state_block_table",
             "state_slot_mapping": "inner_state_slot_mapping"}
    comp = _PrefillCompressor(kern, cfg, x, inner_kv_state, inner_score_state,
                              inner_compress_state_block_table, inner_wkv, inner_wgate, inner_ape,
                              inner_norm_w, freqs_cos, freqs_sin, hadamard, idx_kv_cache,
                              position_ids, num_tokens, idx_slot_mapping,
                              inner_state_slot_mapping, names)
    T, n, HD, rd, BLOCK = comp.T, comp.n, comp.HD, comp.rd, comp.BLOCK
    qy = _Query(kern, cfg, T, np.shape(x)[1], qr, qr_scale, wq_b, wq_b_scale, weights_proj, HD)
    half = rd // 2
    for name, a in (("cos", cos), ("sin", sin)):
        if np.ndim(a) != 2 or np.shape(a)[0] != T or np.shape(a)[1] < half:
            _fail(kern, f"{name} must be [T = {T}, {half}] (per-token rows), got shape "
                        f"{np.shape(a)}")
    if np.ndim(idx_block_table) != 1:
        _fail(kern, f"idx_block_table must be 1-D (one request), got shape "
                    f"{np.shape(idx_block_table)}")
    CAP = prefill_score_cap(BLOCK)
    TOPK_CAP = min(cfg.index_topk, CAP)
    OFFSET = cfg.sliding_window + T
    vis = np.minimum((comp.pos + 1) // RATIO, CAP)                 # all T rows (quirk Q15)
    MV = int(vis[:n].max()) if n > 0 else 0
    MV = max(MV, 0)
    _check_idx_table(kern, idx_block_table, None, MV, idx_kv_cache.shape[0], BLOCK)

    # everything checked: compute and write
    kv_scratch = np.zeros((max_cmp_writes(T), HD), BF16)
    inner = comp.stage_rows(T) if stages else None
    comp.run(x, inner_kv_state, inner_score_state, inner_wkv, inner_wgate, inner_ape,
             inner_norm_w, freqs_cos, freqs_sin, hadamard, idx_kv_cache, kv_scratch, inner)
    score = np.full((T, CAP), NEG, np.float32)
    topk_idxs = np.full((T, CAP), -1, np.int32)
    out = {"score": score, "topk_idxs": topk_idxs, "inner_kv_state": inner_kv_state,
           "inner_score_state": inner_score_state, "idx_kv_cache": idx_kv_cache}
    if stages:
        st = {"inner_" + name: v for name, v in inner.items()}
        st.update(idx_kv_cache=idx_kv_cache, inner_kv_state=inner_kv_state,
                  inner_score_state=inner_score_state)
        out["stages"] = st
    if MV == 0 and not stages:
        return out
    # with MV == 0 the query still runs when stages are asked for, so they are always there
    Qr = qy.project(qr, qr_scale, wq_b, wq_b_scale, f32(cos)[:, :half], f32(sin)[:, :half],
                    hadamard, rd, out.get("stages"))
    Wt = qy.weights(x, weights_proj)                               # [T, H]
    c = np.arange(MV)
    tbl = _ints(idx_block_table)
    keys = _gather_keys(idx_kv_cache, tbl[c // BLOCK] * BLOCK + c % BLOCK)
    q8, qdq = int8_quant_per_row(Qr)                               # [T, H, HD], [T, H, 1]
    k8, kdq = int8_quant_per_row(keys)                             # [MV, HD], [MV, 1]
    if stages:
        out["stages"].update(weights=Wt, q8=q8, qdq=qdq, k8=k8, kdq=kdq, score=score,
                             topk_idxs=topk_idxs)
        if MV == 0:
            return out
    s32 = matmul_i8(q8.reshape(T * qy.H, HD), k8.T).reshape(T, qy.H, MV)
    term = np.maximum((s32.astype(np.float32) * qdq) * kdq[:, 0], F32(0)) * Wt[:, :, None]
    sc = head_sum(term)                                            # [T, MV]
    sc[c[None, :] >= vis[:, None]] = NEG
    score[:, :MV] = sc
    for t in range(n):
        k = min(TOPK_CAP, int(vis[t]))
        if k > 0:
            topk_idxs[t, :k] = (topk_desc(sc[t], k) + OFFSET).astype(np.int32)
    return out
