"""Inputs of the KV compressors, with pypto-lib's distributions and metadata (spec
chapter 04 §4.3.5 and the Fixture subsections of §4.4-§4.7), and their comparators
(§4.12.3).

Deployment layout (FLASH): decode state pools of 65 pages of 4 positions (ratio 4) or
64 pages of 8 (ratio 128) per request, addressed through a table covering
max_position_embeddings positions, so positions p and p + 260 (ratio 4) or p + 512
(ratio 128) share a state row; 32 compressed pages of 128 rows per request. Prefill:
one request, full-length state tables (17 j + 3) mod W, the decode batch's shared pool
of 256 compressed pages, compressed slot c at row c.

The metadata helpers (block_table, state_slot_mapping, compressed_slot_mapping and
the canonical decode start sets) are pypto-lib's decode_metadata.py re-derived in
NumPy; the indexer fixtures use them too.
"""
import numpy as np

from ..compare import ratio_allclose
from ..config import (
    BLOCK_SIZE, C4A_COMPRESSOR_BLOCK_SIZE, C128_COMPRESSOR_BLOCK_SIZE, DECODE_START_POS,
    FP32_NEG_INF, KV_CMP_MAX_BLOCKS, PREFILL_CMP_BLOCK_NUM, get_config,
)
from ..golden.numerics import bf16_rne
from ..rope import rope_tables
from ._common import BF16, cached, normal, rng

F32 = np.float32

# per ratio: state page, physical state pages per decode request, permuted decode tables
_STATE_PAGE = {4: C4A_COMPRESSOR_BLOCK_SIZE, 128: C128_COMPRESSOR_BLOCK_SIZE}
_DECODE_STATE_PAGES = {4: 65, 128: 64}
_PERMUTED = {4: False, 128: True}
# wkv std, wgate std, ape std, norm_w mean, norm_w std (calibrated to the released model)
_WEIGHT_SCALES = {4: (0.0245, 0.0388, 0.1243, 0.9666, 0.1929),
                  128: (0.0246, 0.0316, 0.0340, 0.1001, 0.0549)}
HISTORY_SCALE = 0.05            # history state rows: (U[0, 1) - 0.5) * 0.05


# ------------------------------------------------------- metadata (decode_metadata.py)

def block_table(batch, table_blocks, physical_blocks=None, permuted=False):
    """table[b, j] = b P + g(j mod P), P = physical_blocks (default table_blocks), g(u) = u
    or (7 u + 3) mod P when permuted. int32 [batch, table_blocks]."""
    P = table_blocks if physical_blocks is None else physical_blocks
    cols = np.arange(table_blocks, dtype=np.int64) % P
    if permuted and P > 1:
        cols = (cols * 7 + 3) % P
    return (np.arange(batch, dtype=np.int64)[:, None] * P + cols[None, :]).astype(np.int32)


def _paged_rows(page_of_row, table, page_size, valid):
    """Flat row table[b, page] * page_size + intra where valid, the page inside the table
    and its entry >= 0; -1 elsewhere."""
    table = np.asarray(table, np.int64)
    in_bounds = page_of_row[0] < table.shape[1]
    blk = np.take_along_axis(table, np.minimum(page_of_row[0], table.shape[1] - 1), axis=1)
    ok = valid & in_bounds & (blk >= 0)
    return np.where(ok, blk * page_size + page_of_row[1], -1).astype(np.int64)


def state_slot_mapping(positions, table, state_block_size):
    """The flat state row of every position [B, S] (4.3.3); -1 beyond the table or for a
    negative entry. int64."""
    p = np.asarray(positions, np.int64)
    return _paged_rows((p // state_block_size, p % state_block_size), table, state_block_size,
                       np.ones(p.shape, bool))


def compressed_slot_mapping(positions, cmp_table, compress_ratio, block_size=BLOCK_SIZE):
    """For a position completing a window, the cache row of its slot c = p // R through
    cmp_table; -1 for other positions, beyond the table or for a negative entry. int64."""
    p = np.asarray(positions, np.int64)
    c = p // compress_ratio
    return _paged_rows((c // block_size, c % block_size), cmp_table, block_size,
                       (p + 1) % compress_ratio == 0)


def _tile_starts(pattern, batch):
    uniq = []
    for p in pattern:
        if p not in uniq:
            uniq.append(int(p))
    return np.array([uniq[b % len(uniq)] for b in range(batch)], np.int32)


def csa_decode_start_set(batch, seq=1, compress_ratio=4, state_block_size=4, cache_tile=64,
                         window=128, long_pos=DECODE_START_POS):
    """Canonical CSA start positions: long context, cold start, boundaries, second window,
    sliding-window edges, state page 31 -> 32, one and two indexer cache tiles."""
    R = compress_ratio
    return _tile_starts([long_pos, 0, R - seq, R - 1, 2 * R - 1, window - 1, window,
                         state_block_size * 32 - 1, R * cache_tile - 1, R * 2 * cache_tile - 1],
                        batch)


def hca_decode_start_set(batch, compress_ratio=128, state_block_size=8, long_pos=DECODE_START_POS):
    """Canonical HCA start positions [8192, R-1, R, 2R-1, PAGE-1, 10], tiled over the batch."""
    R = compress_ratio
    return _tile_starts([long_pos, R - 1, R, 2 * R - 1, state_block_size - 1, 10], batch)


def resolve_start_positions(start_pos, batch, seq, max_seq_len, default):
    """Every request at start_pos if given, else the canonical set; start >= 0 and
    start + seq <= max_seq_len."""
    starts = default() if start_pos is None else np.full(batch, int(start_pos), np.int32)
    if (starts < 0).any():
        raise ValueError(f"decode start positions must be non-negative, got {starts.tolist()}")
    if (starts.astype(np.int64) + seq > max_seq_len).any():
        raise ValueError(f"decode start positions plus seq = {seq} must fit "
                         f"max_position_embeddings = {max_seq_len}, got {starts.tolist()}")
    return starts


# ------------------------------------------------------------------------ tensors

def _u01(seed, name, shape):
    """torch.rand: fp32 U[0, 1)."""
    return rng(seed, name).random(size=shape, dtype=np.float32)


def _centered(seed, name, shape, scale):
    return (_u01(seed, name, shape) - F32(0.5)) * F32(scale)


@cached
def _weights(seed, R, OD, HD, D):
    """wkv, wgate = N(0,1) * std -> bf16 [OD, D]; ape = N(0,1) * std fp32 [R, OD];
    norm_w = mean + std * N(0,1) -> bf16 [HD]."""
    s_kv, s_gate, s_ape, g_mu, g_sd = (F32(v) for v in _WEIGHT_SCALES[R])
    return (bf16_rne(normal(seed, "wkv", (OD, D)) * s_kv),
            bf16_rne(normal(seed, "wgate", (OD, D)) * s_gate),
            normal(seed, "ape", (R, OD)) * s_ape,
            bf16_rne(g_mu + g_sd * normal(seed, "norm_w", (HD,))))


def _model(R, c):
    HD = c.head_dim
    return HD, (2 if R == 4 else 1) * HD, c.hidden_size, c.max_position_embeddings


# ------------------------------------------------------------------------ decode

def _decode(R, B, S, start_pos, history, seed, config):
    c = get_config(config)
    HD, OD, D, MAXS = _model(R, c)
    PAGE, P = _STATE_PAGE[R], _DECODE_STATE_PAGES[R]
    W = -(-MAXS // PAGE)
    if R == 4:
        default = lambda: csa_decode_start_set(B, S, R, PAGE, window=c.sliding_window)  # noqa: E731
    else:
        default = lambda: hca_decode_start_set(B, R, PAGE)  # noqa: E731
    starts = resolve_start_positions(start_pos, B, S, MAXS, default)
    positions = (starts[:, None] + np.arange(S, dtype=np.int32)[None, :]).astype(np.int32)
    table = block_table(B, W, P, permuted=_PERMUTED[R])
    cmp_table = block_table(B, KV_CMP_MAX_BLOCKS, KV_CMP_MAX_BLOCKS, permuted=_PERMUTED[R])

    # ratio 4: kv 0 and score NEG everywhere; ratio 128: all zeros
    state = np.zeros((B * P, PAGE, 2 * OD), np.float32)
    if R == 4:
        state[:, :, OD:] = F32(FP32_NEG_INF)
    if history:
        # the rows the request's current window (and, for ratio 4, the previous one) reads
        # before its own token: positions [p0 - p0 mod R - (COFF - 1) R, p0)
        COFF = OD // HD
        hist = [(b, q) for b in range(B) for p0 in [int(starts[b])]
                for q in range(max(0, p0 - p0 % R - (COFF - 1) * R), p0)]
        vals = _centered(seed, "compress_state", (len(hist), 2 * OD), HISTORY_SCALE)
        for (b, q), v in zip(hist, vals):
            blk = int(table[b, q // PAGE])
            state[blk, q % PAGE] = v

    cos_t, sin_t = rope_tables(c, R)
    rows = starts.astype(np.int64) - starts % R             # the window start of token 0
    half = c.qk_rope_head_dim // 2
    wkv, wgate, ape, norm_w = _weights(seed, R, OD, HD, D)
    return {
        "x": bf16_rne(_u01(seed, "x", (B, S, D))),
        "compress_state": state,
        "compress_state_block_table": table,
        "wkv": wkv,
        "wgate": wgate,
        "ape": ape,
        "norm_w": norm_w,
        "cos": np.ascontiguousarray(cos_t[rows, :half].astype(np.float32)),
        "sin": np.ascontiguousarray(sin_t[rows, :half].astype(np.float32)),
        "cmp_kv_cache": np.zeros((B * KV_CMP_MAX_BLOCKS, BLOCK_SIZE, 1, HD), BF16),
        "position_ids": positions,
        "cmp_slot_mapping": compressed_slot_mapping(positions, cmp_table, R),
        "state_slot_mapping": state_slot_mapping(positions, table, PAGE),
    }


def decode_compressor_ratio4(B=8, S=1, start_pos=None, *, history=False, seed=0, config=None):
    """§4.4 fixture: x U[0,1) -> bf16; state kv 0, score NEG; 65-page rolling state table
    per request; cos/sin rows at each request's window start; positions from the CSA
    start set [8192, 0, 3, 7, 127, 128, 255, 511] or all start_pos.

    history=True (not in pypto-lib, whose cold state makes every pool a single row,
    spec Q1) fills the state rows of the positions before start_pos that its window
    reads with (U - 0.5) * 0.05. The golden accepts S = 1 only."""
    return _decode(4, B, S, start_pos, history, seed, config)


def decode_compressor_ratio128(B=8, S=1, start_pos=None, *, history=False, seed=0, config=None):
    """§4.5 fixture: as ratio 4 with an all-zero state (scores 0), a permuted 64-page
    rolling state table and a permuted compressed table, positions from the HCA set
    [8192, 127, 128, 255, 7, 10, 8192, 127] or all start_pos; history as ratio 4."""
    return _decode(128, B, S, start_pos, history, seed, config)


# ----------------------------------------------------------------------- prefill

def prefill_state_table(R, config=None):
    """The prefill state table (17 j + 3) mod W over W = MAXS / PAGE logical pages."""
    W = -(-get_config(config).max_position_embeddings // _STATE_PAGE[R])
    return ((np.arange(W, dtype=np.int64) * 17 + 3) % W).astype(np.int32)


def _prefill(R, T, start_pos, num_tokens, seed, config):
    c = get_config(config)
    HD, OD, D, MAXS = _model(R, c)
    PAGE = _STATE_PAGE[R]
    SL = (OD // HD) * R
    start_pos = int(start_pos)
    if start_pos < 0 or start_pos + T > MAXS:
        raise ValueError(f"start_pos must satisfy 0 <= start_pos <= {MAXS - T} (T = {T}), "
                         f"got {start_pos}")
    n = T if num_tokens is None else int(num_tokens)
    if not 0 <= n <= T:
        raise ValueError(f"num_tokens = {n} is outside [0, T = {T}]")
    table = prefill_state_table(R, c)
    NB = table.shape[0]

    def row(q):
        return int(table[q // PAGE]) * PAGE + q % PAGE

    hist = list(range(max(0, start_pos - SL), start_pos))
    states = {}
    for name in ("kv_state", "score_state"):                # independent draws (spec Q23)
        st = np.zeros((NB, PAGE, OD), np.float32)
        flat = st.reshape(-1, OD)
        flat[[row(q) for q in hist]] = _centered(seed, name, (len(hist), OD), HISTORY_SCALE)
        states[name] = st

    positions = np.arange(start_pos, start_pos + T, dtype=np.int32)
    p = positions.astype(np.int64)
    boundary = ((p + 1) % R == 0) & (p + 1 >= R)
    cmp_map = np.where(boundary, (p + 1) // R - 1, -1).astype(np.int64)
    if (cmp_map >= PREFILL_CMP_BLOCK_NUM * BLOCK_SIZE).any():
        raise ValueError("a fixture compressed slot exceeds the cmp_kv pool")
    freqs_cos, freqs_sin = rope_tables(c, R)
    wkv, wgate, ape, norm_w = _weights(seed, R, OD, HD, D)
    return {
        "x": bf16_rne(_centered(seed, "x", (T, D), 0.1)),
        "kv_state": states["kv_state"],
        "score_state": states["score_state"],
        "compress_state_block_table": table,
        "wkv": wkv,
        "wgate": wgate,
        "ape": ape,
        "norm_w": norm_w,
        "freqs_cos": freqs_cos,
        "freqs_sin": freqs_sin,
        "cmp_kv": np.zeros((PREFILL_CMP_BLOCK_NUM, BLOCK_SIZE, 1, HD), BF16),
        "position_ids": positions,
        "cmp_slot_mapping": cmp_map,
        "state_slot_mapping": np.array([row(q) for q in p.tolist()], np.int64),
        "num_tokens": n,
    }


def prefill_compressor_ratio4(T=128, start_pos=0, num_tokens=None, *, seed=0, config=None):
    """§4.6 fixture: x (U - 0.5) * 0.1 -> bf16; kv_state, score_state zero but for the 8
    positions before start_pos ((U - 0.5) * 0.05, independent draws); state table
    (17 j + 3) mod 4096; positions start_pos + t; a compressed row p // 4 for every
    p = 3 mod 4; the full compress-profile RoPE tables."""
    return _prefill(4, T, start_pos, num_tokens, seed, config)


def prefill_compressor_ratio128(T=128, start_pos=0, num_tokens=None, *, seed=0, config=None):
    """§4.7 fixture: as ratio 4 with 128 history positions, table (17 j + 3) mod 2048 and a
    compressed row (p + 1) / 128 - 1 for every p = 127 mod 128."""
    return _prefill(128, T, start_pos, num_tokens, seed, config)


# ------------------------------------------------------------------ comparators

_CACHE_CMP = dict(atol=1e-4, rtol=1 / 128, max_error_ratio=0.0)
_STATE_CMP = dict(atol=1e-3, rtol=1e-3, max_error_ratio=0.0)

COMPARATORS = {
    **{k: {"kv": ratio_allclose(**_CACHE_CMP),
           "compress_state": ratio_allclose(**_STATE_CMP),
           "cmp_kv_cache": ratio_allclose(**_CACHE_CMP)}
       for k in ("decode_compressor_ratio4", "decode_compressor_ratio128")},
    **{k: {"kv_state": ratio_allclose(**_STATE_CMP),
           "score_state": ratio_allclose(**_STATE_CMP),
           "cmp_kv": ratio_allclose(**_CACHE_CMP)}
       for k in ("prefill_compressor_ratio4", "prefill_compressor_ratio128")},
}

# pypto-lib's runs (decode B = 8, S = 1; prefill T = 128 from position 0), a decode step
# in the long context where every request completes a window over a warm state, and
# prefill chunks with history (an aligned second chunk, an unaligned one)
CASES = {
    "decode_compressor_ratio4": {"decode": dict(B=8, S=1),
                                 "window@8195": dict(B=8, S=1, start_pos=8195, history=True)},
    "decode_compressor_ratio128": {"decode": dict(B=8, S=1),
                                   "window@8191": dict(B=8, S=1, start_pos=8191, history=True)},
    "prefill_compressor_ratio4": {"chunk@0": dict(T=128, start_pos=0),
                                  "chunk@128": dict(T=128, start_pos=128),
                                  "chunk@8190": dict(T=128, start_pos=8190)},
    "prefill_compressor_ratio128": {"chunk@0": dict(T=128, start_pos=0),
                                    "chunk@128": dict(T=128, start_pos=128),
                                    "chunk@8000": dict(T=128, start_pos=8000)},
}
