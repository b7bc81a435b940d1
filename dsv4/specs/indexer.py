"""Inputs of the lightning-indexer kernels with pypto-lib's distributions and metadata
(spec chapter 04 §4.3.5, §4.8-§4.10 Fixture subsections) and its comparators
(§4.12.3, the Comparators subsections).

Pool sizes are the FLASH deployment ones: ratio-4 state pages of 4 positions, a
rolling per-request state pool of 65 pages in decode, full-length permuted state
tables in prefill, an indexer cache of 64 blocks of 128 rows per request (the
decode-batch-sized pool of 8 requests in prefill). States and caches are fresh
writable arrays (they are updated in place); large weights are cached read-only.
"""
import numpy as np

from ..compare import Comparator, ratio_allclose, topk_pair_compare
from ..config import (
    BLOCK_SIZE, C4A_COMPRESSOR_BLOCK_SIZE, DECODE_BATCH, DECODE_START_POS, FP32_NEG_INF,
    IDX_CACHE_MAX_BLOCKS, get_config,
)
from ..golden.indexer import RATIO, max_cmp_writes, prefill_score_cap
from ..golden.numerics import (
    F32, bf16_rne, exp32, f32, fp8_e4m3fn, int8_quant_per_row,
)
from ..rope import rope_tables
from ._common import cached, normal, rng
from .compressor import block_table

PAGE = C4A_COMPRESSOR_BLOCK_SIZE        # ratio-4 state page (positions per page)
DECODE_STATE_PAGES = 65                 # rolling physical state pages per decode request
IDX_BLOCKS = IDX_CACHE_MAX_BLOCKS       # indexer cache blocks per request
NEG = F32(FP32_NEG_INF)


# ------------------------------------------------------------------ draws

def _u01(seed, name, shape):
    """torch.rand: fp32 U[0, 1)."""
    return rng(seed, name).random(size=shape, dtype=np.float32)


def _gauss(seed, name, shape, std, mean=0.0):
    """mean + std * N(0, 1) in fp32 (torch.randn(...) * std [+ mean])."""
    v = normal(seed, name, shape) * F32(std)
    return v if mean == 0.0 else F32(mean) + v


def hadamard_sylvester(n):
    """H_1 = [1], H_2m = [[H, H], [H, -H]], times n^-0.5, as bf16 (§4.2.9)."""
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    if h.shape[0] != n:
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two size, got {n}")
    return bf16_rne(h * F32(n ** -0.5))


def fp8_grid_int8_weight(W, dequant_std, block=128):
    """The quantisation half of pypto-lib's gen_shared_weight (§4.10.1 Fixture), for an
    fp32 master W [out, in]: per block x block tile an E8M0 scale 2^ceil(log2(amax / 448))
    and an e4m3fn rounding (ml_dtypes, RNE); then per output row int8 =
    clamp(rne(Wq / (amax / 127)), +-127) and a scale rescaled so that the dequantised
    matrix has standard deviation dequant_std (1/std, then times dequant_std).
    Returns (w8 int8 [out, in], scale fp32 [out])."""
    W = f32(W)
    out, inn = W.shape
    Wb = W.reshape(out // block, block, inn // block, block)
    amax = np.max(np.abs(Wb), axis=(1, 3), keepdims=True)
    ratio = np.maximum(amax / F32(448.0), F32(1e-20))
    scale = np.exp2(np.ceil(np.log2(ratio))).astype(np.float32)
    Wq = (f32(fp8_e4m3fn(Wb / scale)) * scale).reshape(out, inn)
    row_amax = np.maximum(np.max(np.abs(Wq), axis=1, keepdims=True), F32(1e-4))
    sc = row_amax / F32(127.0)
    w8 = np.clip(np.rint(Wq / sc), -127, 127).astype(np.int8)
    std = F32(np.std((f32(w8) * sc).astype(np.float64), ddof=1))
    sc = sc * ((F32(1.0) / std) * F32(dequant_std))
    return w8, sc.reshape(out).astype(np.float32)


def gen_shared_weight(seed, name, shape, dequant_std, chan_cv):
    """pypto-lib's gen_shared_weight: W = N(0,1) [out, in] * exp(chan_cv * N(0,1) [out, 1])
    (a per-output-row gain), quantised by fp8_grid_int8_weight."""
    out, inn = shape
    gain = exp32(F32(chan_cv) * normal(seed, name + ":gain", (out, 1)))
    return fp8_grid_int8_weight(normal(seed, name, shape) * gain, dequant_std)


@cached
def _wq_b(seed, H, HD, QL):
    """wq_b [QL, H HD] int8 (the transposed gen_shared_weight) and wq_b_scale [H HD]."""
    w8, sc = gen_shared_weight(seed, "wq_b", (H * HD, QL), 0.108, 0.56)
    return np.ascontiguousarray(w8.T), sc


@cached
def _inner_weights(seed, OD, D, HD, prefix):
    """The indexer compressor's calibrated weights (§4.8 Fixture)."""
    return (bf16_rne(_gauss(seed, prefix + "wkv", (OD, D), 0.0293)),
            bf16_rne(_gauss(seed, prefix + "wgate", (OD, D), 0.0512)),
            _gauss(seed, prefix + "ape", (RATIO, OD), 0.1528),
            bf16_rne(_gauss(seed, prefix + "norm_w", (HD,), 0.2610, mean=0.6850)))


@cached
def _weights_proj(seed, D, H):
    return bf16_rne(_gauss(seed, "weights_proj", (D, H), 0.2313))


# ------------------------------------------------------------- metadata (§4.3.5)

def _lookup(table, b, blk):
    """table[b, blk] (b None for a 1-D table) or -1 beyond the table width."""
    width = table.shape[-1]
    ok = blk < width
    safe = np.where(ok, blk, 0)
    val = table[safe] if b is None else table[b, safe]
    return np.where(ok, val.astype(np.int64), -1)


def state_slot_mapping(positions, table, page=PAGE):
    """Flat state row of every position (-1 beyond the table or for a negative entry), int64.
    positions [B, S] with a 2-D table, or [T] with a 1-D table."""
    p = np.asarray(positions).astype(np.int64)
    b = None if table.ndim == 1 else np.arange(p.shape[0])[:, None]
    blk = _lookup(table, b, p // page)
    return np.where(blk >= 0, blk * page + p % page, -1)


def compressed_slot_mapping(positions, table, ratio=RATIO, block=BLOCK_SIZE):
    """Cache row of compressed slot p // ratio for window-completing positions, else -1."""
    p = np.asarray(positions).astype(np.int64)
    c = p // ratio
    b = None if table.ndim == 1 else np.arange(p.shape[0])[:, None]
    blk = _lookup(table, b, c // block)
    return np.where(((p + 1) % ratio == 0) & (blk >= 0), blk * block + c % block, -1)


def csa_decode_start_set(batch, c, seq=1):
    """The canonical CSA start positions (§4.3.5): [8192, 0, R-S, R-1, 2R-1, WIN-1, WIN,
    32 PAGE - 1, 64 R - 1, 128 R - 1], deduplicated in order, repeated to fill the batch.
    The long-context point is min(8192, MAXS / 2) for presets shorter than FLASH."""
    R, WIN = RATIO, c.sliding_window
    pattern = [min(DECODE_START_POS, c.max_position_embeddings // 2), 0, R - seq, R - 1,
               2 * R - 1, WIN - 1, WIN, PAGE * 32 - 1, R * 64 - 1, R * 128 - 1]
    uniq = list(dict.fromkeys(pattern))
    return np.array([uniq[b % len(uniq)] for b in range(batch)], np.int32)


def _decode_starts(B, S, start_pos, c):
    if S != 1:
        raise ValueError(f"the decode indexer kernels are defined for S = 1 only, got S = {S}")
    MAXS = c.max_position_embeddings
    starts = (csa_decode_start_set(B, c, S) if start_pos is None
              else np.full(B, int(start_pos), np.int32))
    if (starts < 0).any() or (starts.astype(np.int64) + S > MAXS).any():
        raise ValueError(f"decode start positions must lie in [0, {MAXS - S}], got "
                         f"{starts.tolist()}")
    return starts


def _rope_rows(c, positions):
    """Half-width fp32 rows of the compress-profile tables at `positions` (§4.2.7)."""
    cos, sin = rope_tables(c, RATIO)
    half = c.qk_rope_head_dim // 2
    p = np.asarray(positions).astype(np.int64).reshape(-1)
    return (np.ascontiguousarray(f32(cos[p, :half])), np.ascontiguousarray(f32(sin[p, :half])))


# ----------------------------------------------------------------- decode

def _decode_compressor_inputs(B, starts, seed, c, prefix):
    """The inner compressor's tensors of the decode fixtures (§4.8 Fixture)."""
    D, HD = c.hidden_size, c.index_head_dim
    OD = 2 * HD
    MAXS = c.max_position_embeddings
    state = np.zeros((B * DECODE_STATE_PAGES, PAGE, 2 * OD), np.float32)
    state[:, :, OD:] = NEG
    table = block_table(B, -(-MAXS // PAGE), DECODE_STATE_PAGES)
    pos = starts[:, None].astype(np.int32)
    wkv, wgate, ape, norm_w = _inner_weights(seed, OD, D, HD, prefix)
    return state, table, wkv, wgate, ape, norm_w, pos, state_slot_mapping(pos, table)


def decode_indexer_compressor(B=DECODE_BATCH, S=1, start_pos=None, *, seed=0, config=None):
    """§4.8 Fixture: x U[0,1) bf16; state kv 0 / score NEG; state table 65b + (j mod 65);
    calibrated Gaussian weights; cos/sin at the window start p - p mod 4; random
    U[0,1) 128^-0.5 "hadamard"; empty cache of 64 blocks per request; positions = the CSA
    start set (or start_pos for every request); slot mappings from the tables."""
    c = get_config(config)
    D, HD = c.hidden_size, c.index_head_dim
    starts = _decode_starts(B, S, start_pos, c)
    state, table, wkv, wgate, ape, norm_w, pos, srow = _decode_compressor_inputs(
        B, starts, seed, c, "")
    cos, sin = _rope_rows(c, starts - starts % RATIO)
    return {
        "x": bf16_rne(_u01(seed, "x", (B, S, D))),
        "compress_state": state,
        "compress_state_block_table": table,
        "wkv": wkv, "wgate": wgate, "ape": ape, "norm_w": norm_w,
        "cos": cos, "sin": sin,
        "hadamard": bf16_rne(_u01(seed, "hadamard", (HD, HD)) * F32(HD ** -0.5)),
        "idx_kv_cache": bf16_rne(np.zeros((B * IDX_BLOCKS, BLOCK_SIZE, 1, HD), np.float32)),
        "position_ids": pos,
        "idx_slot_mapping": compressed_slot_mapping(pos, block_table(B, IDX_BLOCKS)),
        "inner_state_slot_mapping": srow,
    }


def _query_inputs(N, seed, c):
    """qr/qr_scale = per-row int8 of U[0,1); wq_b on the FP8 grid; weights_proj N * 0.2313."""
    H, HD, QL, D = c.index_n_heads, c.index_head_dim, c.q_lora_rank, c.hidden_size
    qr, qr_scale = int8_quant_per_row(_u01(seed, "qr", (N, QL)))
    wq_b, wq_b_scale = _wq_b(seed, H, HD, QL)
    return {"qr": qr, "qr_scale": qr_scale, "wq_b": wq_b, "wq_b_scale": wq_b_scale,
            "weights_proj": _weights_proj(seed, D, H)}


def decode_indexer(B=DECODE_BATCH, S=1, start_pos=None, *, seed=0, config=None):
    """§4.10.1 Fixture: as decode_indexer_compressor for the inner compressor, but cos/sin
    at the token's own position (quirk Q3) and a random U[0,1) bf16 cache history
    everywhere; kv_seq_lens = p + 1; offset 128 (= WIN)."""
    c = get_config(config)
    D, HD = c.hidden_size, c.index_head_dim
    starts = _decode_starts(B, S, start_pos, c)
    state, table, wkv, wgate, ape, norm_w, pos, srow = _decode_compressor_inputs(
        B, starts, seed, c, "inner_")
    cos, sin = _rope_rows(c, starts)
    idx_table = block_table(B, IDX_BLOCKS)
    return {
        "x": bf16_rne(_u01(seed, "x", (B, S, D))),
        **_query_inputs(B * S, seed, c),
        "cos": cos, "sin": sin,
        "hadamard": bf16_rne(_u01(seed, "hadamard", (HD, HD)) * F32(HD ** -0.5)),
        "inner_kv": np.zeros((B, S, HD), np.float32),
        "inner_compress_state": state,
        "inner_compress_state_block_table": table,
        "inner_wkv": wkv, "inner_wgate": wgate, "inner_ape": ape, "inner_norm_w": norm_w,
        "idx_kv_cache": bf16_rne(_u01(seed, "idx_kv_cache", (B * IDX_BLOCKS, BLOCK_SIZE, 1, HD))),
        "idx_block_table": idx_table,
        "position_ids": pos,
        "idx_slot_mapping": compressed_slot_mapping(pos, idx_table),
        "inner_state_slot_mapping": srow,
        "kv_seq_lens": (starts.astype(np.int64) + S).astype(np.int32),
        "offset": c.sliding_window,
    }


# ----------------------------------------------------------------- prefill

def _prefill_positions(T, start_pos, c):
    MAXS = c.max_position_embeddings
    if start_pos < 0 or start_pos + T > MAXS:
        raise ValueError(f"start_pos must satisfy 0 <= start_pos <= {MAXS - T}, got {start_pos}")
    return np.arange(start_pos, start_pos + T, dtype=np.int32)


def _prefill_compressor_inputs(T, start_pos, n, seed, c, prefix):
    """§4.9 Fixture: the state tensors with the 8 positions before start_pos filled with
    (U - 0.5) * 0.05 (independent draws for kv and score), the (17j + 3) mod N table,
    the weights and the state slot mapping."""
    D, HD = c.hidden_size, c.index_head_dim
    OD = 2 * HD
    NB = -(-c.max_position_embeddings // PAGE)
    table = ((np.arange(NB, dtype=np.int64) * 17 + 3) % NB).astype(np.int32)
    hist = np.arange(max(0, start_pos - 2 * RATIO), start_pos)
    rows = state_slot_mapping(hist, table)
    states = []
    for name in ("kv_state", "score_state"):
        st = np.zeros((NB, PAGE, OD), np.float32)
        vals = (_u01(seed, prefix + name, (len(hist), OD)) - F32(0.5)) * F32(0.05)
        st.reshape(-1, OD)[rows] = vals
        states.append(st)
    pos = _prefill_positions(T, start_pos, c)
    srow = state_slot_mapping(pos, table)
    srow[n:] = -1
    return (*states, table, *_inner_weights(seed, OD, D, HD, prefix), pos, srow)


def _idx_slots(pos, table, n):
    m = compressed_slot_mapping(pos, table)
    m[n:] = -1
    return m


def prefill_indexer_compressor(T=128, start_pos=0, num_tokens=None, *, seed=0, config=None):
    """§4.9 Fixture: x (U - 0.5) * 0.1 bf16; warm state rows before start_pos; full
    compress-profile tables; the Sylvester Hadamard; an empty cache pool of 8 x 64
    blocks; idx_block_table (5j + 1) mod 64 (not read by the kernel, quirk Q18) which
    also places the committed slots; positions start_pos + t."""
    c = get_config(config)
    D, HD = c.hidden_size, c.index_head_dim
    n = T if num_tokens is None else int(num_tokens)
    if not 0 <= n <= T:
        raise ValueError(f"num_tokens = {n} is outside [0, T = {T}]")
    kvs, scs, table, wkv, wgate, ape, norm_w, pos, srow = _prefill_compressor_inputs(
        T, start_pos, n, seed, c, "")
    idx_table = ((np.arange(IDX_BLOCKS, dtype=np.int64) * 5 + 1) % IDX_BLOCKS).astype(np.int32)
    freqs_cos, freqs_sin = rope_tables(c, RATIO)
    return {
        "x": bf16_rne((_u01(seed, "x", (T, D)) - F32(0.5)) * F32(0.1)),
        "kv_state": kvs, "score_state": scs,
        "inner_compress_state_block_table": table,
        "wkv": wkv, "wgate": wgate, "ape": ape, "norm_w": norm_w,
        "freqs_cos": freqs_cos, "freqs_sin": freqs_sin,
        "hadamard": hadamard_sylvester(HD),
        "idx_kv_cache": bf16_rne(np.zeros((DECODE_BATCH * IDX_BLOCKS, BLOCK_SIZE, 1, HD),
                                          np.float32)),
        "idx_block_table": idx_table,
        "position_ids": pos,
        "idx_slot_mapping": _idx_slots(pos, idx_table, n),
        "inner_state_slot_mapping": srow,
        "num_tokens": n,
    }


def prefill_indexer(T=128, start_pos=0, num_tokens=None, *, seed=0, config=None):
    """§4.10.2 Fixture: the prefill compressor's inputs (inner_*), an identity
    idx_block_table, a cache holding bf16((U - 0.5) * 0.05) history keys in the
    start_pos // 4 slots before the chunk, per-token cos/sin at each position, the
    query inputs of decode_indexer. Needs (start_pos + T) // 4 <= 256."""
    c = get_config(config)
    D, HD = c.hidden_size, c.index_head_dim
    n = T if num_tokens is None else int(num_tokens)
    if not 0 <= n <= T:
        raise ValueError(f"num_tokens = {n} is outside [0, T = {T}]")
    cap = prefill_score_cap(BLOCK_SIZE)
    if (start_pos + T) // RATIO > cap:
        raise ValueError(f"prefill_indexer scores at most {cap} compressed slots: start_pos + T "
                         f"= {start_pos + T} needs {(start_pos + T) // RATIO}")
    kvs, scs, table, wkv, wgate, ape, norm_w, pos, srow = _prefill_compressor_inputs(
        T, start_pos, n, seed, c, "inner_")
    idx_table = np.arange(IDX_BLOCKS, dtype=np.int32)
    cache = np.zeros((DECODE_BATCH * IDX_BLOCKS * BLOCK_SIZE, HD), np.float32)
    hist = start_pos // RATIO
    cache[idx_table[np.arange(hist) // BLOCK_SIZE] * BLOCK_SIZE + np.arange(hist) % BLOCK_SIZE] = (
        (_u01(seed, "idx_kv_cache", (hist, HD)) - F32(0.5)) * F32(0.05))
    freqs_cos, freqs_sin = rope_tables(c, RATIO)
    cos, sin = _rope_rows(c, pos)
    return {
        "x": bf16_rne((_u01(seed, "x", (T, D)) - F32(0.5)) * F32(0.1)),
        **_query_inputs(T, seed, c),
        "cos": cos, "sin": sin,
        "freqs_cos": freqs_cos, "freqs_sin": freqs_sin,
        "hadamard": hadamard_sylvester(HD),
        "inner_kv_state": kvs, "inner_score_state": scs,
        "inner_compress_state_block_table": table,
        "inner_wkv": wkv, "inner_wgate": wgate, "inner_ape": ape, "inner_norm_w": norm_w,
        "idx_kv_cache": bf16_rne(cache).reshape(DECODE_BATCH * IDX_BLOCKS, BLOCK_SIZE, 1, HD),
        "idx_block_table": idx_table,
        "position_ids": pos,
        "idx_slot_mapping": _idx_slots(pos, idx_table, n),
        "inner_state_slot_mapping": srow,
        "num_tokens": n,
    }


# ------------------------------------------------------------- comparators

def score_valid_region(atol=1e-4, rtol=1 / 128, max_error_ratio=0.005):
    """decode_indexer `score` (§4.10.1): ratio_allclose over the elements where the
    expected score is not NEG (the kernel need not write the tail)."""
    inner = ratio_allclose(atol=atol, rtol=rtol, max_error_ratio=max_error_ratio)

    def run(a, e, ctx, outs, h_atol, h_rtol):
        valid = f32(e) != NEG
        return inner(f32(a)[valid], f32(e)[valid], name=ctx["name"], atol=h_atol, rtol=h_rtol)
    return Comparator(f"score_valid_region({inner.desc})", run)


def topk_paired(offset, cols, invalid_neg_inf, plus_tokens=False):
    """The indexers' `topk_idxs` comparator (§4.10.1, §4.10.2): the first `cols` columns,
    each actual index paired with the actual score at clamp(idx - offset, 0, width - 1)
    (with -inf for idx < offset when invalid_neg_inf), then topk_pair_compare.
    plus_tokens adds the row count T of the output to offset (prefill: WIN + T)."""
    pair = topk_pair_compare("_topk_paired_scores")

    def run(a, e, ctx, outs, h_atol, h_rtol):
        off = offset + (a.shape[0] if plus_tokens else 0)
        a_top, e_top = a[..., :cols], e[..., :cols]
        score = outs.get("score")
        if score is None:
            return pair(a_top, e_top, name=ctx["name"], actual_outputs=outs)
        score = f32(score)
        idx = np.clip(a_top.astype(np.int64) - off, 0, score.shape[-1] - 1)
        paired = np.take_along_axis(score, idx, axis=-1)
        if invalid_neg_inf:
            paired = np.where(a_top < off, F32(-np.inf), paired)
        return pair(a_top, e_top, name=ctx["name"],
                    actual_outputs={**outs, "_topk_paired_scores": paired})
    off_txt = f"WIN + T = {offset} + T" if plus_tokens else str(offset)
    return Comparator(f"topk_paired(offset={off_txt}, cols={cols}, "
                      f"invalid={'-inf' if invalid_neg_inf else 'clamp'})", run)


def _cache_cmp(bad_elements, numel):
    return ratio_allclose(atol=1e-4, rtol=1 / 128, max_error_ratio=bad_elements / numel)


_FLASH = get_config(None)
_IDX_NUMEL = DECODE_BATCH * IDX_BLOCKS * BLOCK_SIZE * _FLASH.index_head_dim
_STATE_CMP = ratio_allclose(atol=1e-3, rtol=1e-3, max_error_ratio=0)

COMPARATORS = {
    "decode_indexer_compressor": {
        "kv": ratio_allclose(atol=1e-4, rtol=1 / 128, max_error_ratio=0),
        "compress_state": _STATE_CMP,
        "idx_kv_cache": _cache_cmp(4, _IDX_NUMEL),
    },
    "prefill_indexer_compressor": {
        "kv": ratio_allclose(atol=1e-4, rtol=1 / 128,
                             max_error_ratio=16 / (max_cmp_writes(128) * _FLASH.index_head_dim)),
        "kv_state": _STATE_CMP,
        "score_state": _STATE_CMP,
        "idx_kv_cache": _cache_cmp(16, _IDX_NUMEL),
    },
    "decode_indexer": {
        "score": score_valid_region(),
        # pypto-lib pairs with the constant OFFSET = WIN = 128, not the offset input
        "topk_idxs": topk_paired(_FLASH.sliding_window, _FLASH.index_topk, invalid_neg_inf=False),
        # the inner compressor's state: pypto-lib does not compare it, the next step reads it
        "inner_kv": ratio_allclose(atol=1e-4, rtol=1 / 128, max_error_ratio=0),
        "inner_compress_state": _STATE_CMP,
        "idx_kv_cache": _cache_cmp(4, _IDX_NUMEL),
    },
    "prefill_indexer": {
        "score": ratio_allclose(atol=1e-4, rtol=1 / 128, max_error_ratio=0.005),
        "topk_idxs": topk_paired(_FLASH.sliding_window, _FLASH.index_topk,
                                 invalid_neg_inf=True, plus_tokens=True),
        "inner_kv_state": _STATE_CMP,
        "inner_score_state": _STATE_CMP,
        "idx_kv_cache": _cache_cmp(16, _IDX_NUMEL),
    },
}

# pypto-lib's standalone runs (decode B = 8, S = 1; prefill T = 128) plus warm starts
CASES = {
    "decode_indexer_compressor": {"decode": dict(B=8, S=1),
                                  "decode@8191": dict(B=8, S=1, start_pos=8191)},
    "prefill_indexer_compressor": {"prefill": dict(T=128, start_pos=0),
                                   "prefill@202": dict(T=128, start_pos=202)},
    "decode_indexer": {"decode": dict(B=8, S=1),
                       "decode@8191": dict(B=8, S=1, start_pos=8191)},
    "prefill_indexer": {"prefill": dict(T=128, start_pos=0),
                        "prefill@512": dict(T=128, start_pos=512)},
}
