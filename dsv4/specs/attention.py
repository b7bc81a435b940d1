"""Inputs of the sparse-attention kernels, with pypto-lib's distributions and index
fixtures (spec chapter 03 §3.6, §5.6, §6.4, §7.5) and its comparator (§3.7).

Cache sizes are the FLASH deployment ones (§1.1): pages of BLOCK = 128 rows, one
ring page and 32 compressed pages per request, identity block tables. Prefill:
ori_kv [1, 128, 1, HD], a shared compressed pool of 256 pages, cmp_block_table
[0..31]. Decode: ORI_BLOCK_NUM = B ring pages, CMP_BLOCK_NUM = 32 B compressed pages.
"""
import numpy as np

from ..compare import ratio_allclose
from ..config import get_config
from ..golden.attention import ATTN_TILE, NEG_INF, prefill_pad
from ..golden.numerics import bf16_rne, int8_quant_per_column
from ..rope import rope_tables
from ._common import cached, rng

BLOCK = 128                 # paged-cache page rows (BLOCK_SIZE)
CMP_MAX_BLOCKS = 32         # compressed pages per request (KV_CMP_MAX_BLOCKS)
PREFILL_CMP_BLOCK_NUM = 256  # the decode batch's shared compressed pool
RATIOS = (0, 4, 128)


def _u01(seed, name, shape):
    """torch.rand: fp32 U[0, 1)."""
    return rng(seed, name).random(size=shape, dtype=np.float32)


def _centered(seed, name, shape, scale=None):
    """(U(0,1) - 0.5) [* scale], fp32 (cast to bf16 by the caller)."""
    v = _u01(seed, name, shape) - np.float32(0.5)
    return v if scale is None else v * np.float32(scale)


@cached
def _o_proj_weights(seed, G, O_LORA, OGI, D):
    """wo_a = (U - 0.5) / sqrt(OGI) as bf16; wo_b, wo_b_scale = §2.7 per-row int8 of the bf16
    Wb = (U - 0.5) / sqrt(G O_LORA) [D, G O_LORA]."""
    wo_a = bf16_rne((_u01(seed, "wo_a", (G, O_LORA, OGI)) - np.float32(0.5))
                    / np.float32(np.sqrt(OGI)))
    wb = bf16_rne((_u01(seed, "wo_b", (D, G * O_LORA)) - np.float32(0.5))
                  / np.float32(np.sqrt(G * O_LORA)))
    w_i8, scale = int8_quant_per_column(wb.T)        # per column of Wb^T = per row of Wb
    return wo_a, np.ascontiguousarray(w_i8.T), scale


def _model(c):
    H, HD = c.num_attention_heads, c.head_dim
    G, O_LORA = c.o_groups, c.o_lora_rank
    if H % G:
        raise ValueError(f"num_attention_heads = {H} is not a multiple of o_groups = {G}")
    return H, HD, G, O_LORA, (H // G) * HD, c.hidden_size


def _weights(seed, c):
    H, HD, G, O_LORA, OGI, D = _model(c)
    wo_a, wo_b, wo_b_scale = _o_proj_weights(seed, G, O_LORA, OGI, D)
    return {"wo_a": wo_a, "wo_b": wo_b, "wo_b_scale": wo_b_scale}


def _check_ratio(compress_ratio):
    if compress_ratio not in RATIOS:
        raise ValueError(f"compress_ratio = {compress_ratio!r} is not one of {set(RATIOS)}")


def _yarn_rows(c, compress_ratio, start, T):
    """Rows start .. start+T-1 of the layer kind's YaRN tables (bf16)."""
    cos, sin = rope_tables(c, compress_ratio)
    if start < 0 or start + T > cos.shape[0]:
        raise ValueError(f"positions {start}..{start + T - 1} are outside the {cos.shape[0]}-row "
                         f"RoPE tables")
    return np.ascontiguousarray(cos[start:start + T]), np.ascontiguousarray(sin[start:start + T])


def _synthetic_rows(R, start, T):
    """§6.4: angle[p, i] = fp32(R/2 * p + i) * fp32(0.001) for the absolute position p,
    cos/sin in double rounded to fp32, the half row written twice, then bf16."""
    half = R // 2
    p = np.arange(start, start + T, dtype=np.int64)[:, None]
    angle = (p * half + np.arange(half)).astype(np.float32) * np.float32(1e-3)
    out = []
    for fn in (np.cos, np.sin):
        v = fn(angle.astype(np.float64)).astype(np.float32)
        out.append(bf16_rne(np.concatenate([v, v], axis=1)))
    return out


# ----------------------------------------------------------------------- prefill

def prefill_cmp_valid(compress_ratio, T, index_topk):
    """§3.5: compressed slots the fixture makes visible."""
    _check_ratio(compress_ratio)
    if compress_ratio == 0:
        return 0
    return min(index_topk, T // compress_ratio, CMP_MAX_BLOCKS * BLOCK)


def prefill_sparse_attn(T=128, compress_ratio=4, num_tokens=None, *, seed=0, config=None):
    """§3.6: q, caches and overlay (U - 0.5) * 0.05 as bf16; token t < num_tokens lists the
    overlay rows 0..t, then min(cmp_valid, (t+1) // ratio) compressed slots; lens = 1 +
    the last used column; YaRN rows 0..T-1 of the ratio's profile; zero sinks."""
    c = get_config(config)
    H, HD, G, O_LORA, OGI, D = _model(c)
    WIN, IDX = c.sliding_window, c.index_topk
    K = WIN + IDX
    n = T if num_tokens is None else int(num_tokens)
    if not 0 <= n <= T:
        raise ValueError(f"num_tokens = {n} is outside [0, T = {T}]")
    cmp_valid = prefill_cmp_valid(compress_ratio, T, IDX)
    PAD = prefill_pad(K, T, WIN, IDX)

    idx = np.full((T, K), -1, np.int32)
    lens = np.zeros(T, np.int32)
    for t in range(n):
        cursor = min(t + 1, PAD, K)
        idx[t, :cursor] = WIN + np.arange(cursor)
        if compress_ratio:
            cc = min(cmp_valid, (t + 1) // compress_ratio, PAD - cursor, K - cursor)
            if cc > 0:
                idx[t, cursor:cursor + cc] = WIN + T + np.arange(cc)
        used = np.flatnonzero(idx[t] >= 0)
        lens[t] = used[-1] + 1 if len(used) else 0

    ori_pages = -(-WIN // BLOCK)
    cos, sin = _yarn_rows(c, compress_ratio, 0, T)
    return {
        "q": bf16_rne(_centered(seed, "q", (T, H, HD), 0.05)),
        "ori_kv": bf16_rne(_centered(seed, "ori_kv", (ori_pages, BLOCK, 1, HD), 0.05)),
        "ori_block_table": np.arange(ori_pages, dtype=np.int32),
        "kv_overlay": bf16_rne(_centered(seed, "kv_overlay", (T, HD), 0.05)),
        "cmp_kv": bf16_rne(_centered(seed, "cmp_kv", (PREFILL_CMP_BLOCK_NUM, BLOCK, 1, HD), 0.05)),
        "cmp_block_table": np.arange(CMP_MAX_BLOCKS, dtype=np.int32),
        "cmp_sparse_indices": idx,
        "cmp_sparse_lens": lens,
        "attn_sink": np.zeros(H, np.float32),
        "freqs_cos": cos,
        "freqs_sin": sin,
        **_weights(seed, c),
        "num_tokens": n,
    }


# ------------------------------------------------------------------------ decode

def standalone_cmp_valid(compress_ratio, c):
    """§5.5: the compressed tail the decode fixtures list."""
    _check_ratio(compress_ratio)
    return {0: 0, 4: c.index_topk, 128: c.max_position_embeddings // 128}[compress_ratio]


def _decode_common(B, S, flags, start_pos, seed, c):
    """§5.6: everything but the index row and the RoPE rows. The causal-regression and
    overlay-replacement edits of q, ori_kv and the overlay are applied here."""
    H, HD, G, O_LORA, OGI, D = _model(c)
    T, WIN = B * S, c.sliding_window
    if start_pos < 0:
        raise ValueError(f"start_pos = {start_pos} is negative")
    ori_pages = -(-WIN // BLOCK)
    q = _centered(seed, "q", (T, H, HD))
    ori_kv = _centered(seed, "ori_kv", (B * ori_pages, BLOCK, 1, HD))
    overlay = _centered(seed, "mtp_kv_overlay", (T, HD))
    if flags["causal_regression"]:
        q[0] = 1.0
        ori_kv[(WIN - 1) // BLOCK, (WIN - 1) % BLOCK, 0] = 8.0
    if flags["overlay_replacement"]:
        overlay[:] = 0.0
        overlay[:, 0] = 4.0
    return {
        "q": bf16_rne(q),
        "ori_kv": bf16_rne(ori_kv),
        "ori_block_table": np.arange(B * ori_pages, dtype=np.int32).reshape(B, ori_pages),
        "mtp_kv_overlay": bf16_rne(overlay),
        "cmp_kv": bf16_rne(_centered(seed, "cmp_kv", (B * CMP_MAX_BLOCKS, BLOCK, 1, HD))),
        "cmp_block_table": np.arange(B * CMP_MAX_BLOCKS, dtype=np.int32).reshape(B, CMP_MAX_BLOCKS),
        "attn_sink": np.zeros(H, np.float32),
        **_weights(seed, c),
    }


def _window_head(idx):
    """The short-window / mixed-topk / overlay-replacement rewrite: columns 0..16 = 0..16."""
    idx[:] = -1
    n = min(17, idx.shape[1])
    idx[:, :n] = np.arange(n)


def _decode_indices(kind, T, S, compress_ratio, flags, c):
    """§5.6 (CSA), §6.4 (HCA), §7.5 (SWA) index fixtures; flags in the order short-window,
    mixed-topk, overlay-replacement, causal-regression."""
    WIN, IDX = c.sliding_window, c.index_topk
    cv = standalone_cmp_valid(compress_ratio, c)
    if kind == "csa":
        K = WIN + IDX
        cmp_col = WIN                       # the compressed tail starts right after the window
    elif kind == "hca":
        topk = WIN + S + min(c.max_position_embeddings // 128, IDX)
        K = max(2, -(-topk // ATTN_TILE)) * ATTN_TILE
        cv = min(cv, topk - WIN)
        cmp_col = WIN + S                   # after the relocated overlay columns
    else:
        K, cv, cmp_col = WIN, 0, WIN
    cv = max(0, min(cv, K - cmp_col))

    idx = np.full((T, K), -1, np.int32)
    idx[:, :min(WIN, K)] = np.arange(min(WIN, K))
    idx[:, cmp_col:cmp_col + cv] = WIN + S + np.arange(cv)
    if flags["short_window"]:
        _window_head(idx)
    if flags["mixed_topk"]:
        _window_head(idx)
        mixed = min(cv, IDX)
        idx[:, cmp_col:cmp_col + mixed] = WIN + S + np.arange(mixed)
    if flags["overlay_replacement"]:
        _window_head(idx)
        if kind == "hca":
            idx[:, 16] = -1                 # the current token's ring slot, masked in the page...
            idx[:, WIN] = WIN               # ...and attended through the relocated overlay column
        else:
            idx[:, min(16, K - 1)] = WIN
    if flags["causal_regression"]:
        idx[0, WIN - 1] = WIN - 1
    return idx


def _decode(kind, B, S, compress_ratio, start_pos, flags, seed, config):
    c = get_config(config)
    T = B * S
    d = _decode_common(B, S, flags, start_pos, seed, c)
    d["cmp_sparse_indices"] = _decode_indices(kind, T, S, compress_ratio, flags, c)
    if kind == "csa":
        d["freqs_cos"], d["freqs_sin"] = _yarn_rows(c, compress_ratio, start_pos, T)
    else:
        d["freqs_cos"], d["freqs_sin"] = _synthetic_rows(c.qk_rope_head_dim, start_pos, T)
    return c, d


def _flags(short_window, mixed_topk, overlay_replacement, causal_regression):
    return dict(short_window=short_window, mixed_topk=mixed_topk,
                overlay_replacement=overlay_replacement, causal_regression=causal_regression)


def decode_sparse_attn(B=8, S=1, compress_ratio=4, start_pos=0, *, short_window=False,
                       mixed_topk=False, overlay_replacement=False, causal_regression=False,
                       seed=0, config=None):
    """§5.6: q, caches, overlay U(-0.5, 0.5) as bf16; row = ring slots 0..WIN-1, then the
    compressed slots 0..cv-1 (cv = 512 / 128 / 0 for ratio 4 / 128 / 0); YaRN rows
    start_pos .. start_pos+T-1; valid_block_mask from the row."""
    c, d = _decode("csa", B, S, compress_ratio, start_pos,
                   _flags(short_window, mixed_topk, overlay_replacement, causal_regression),
                   seed, config)
    idx = d["cmp_sparse_indices"]
    K = idx.shape[1]
    nblk = max(2, -(-K // ATTN_TILE))
    mask = np.zeros((B * S, nblk), np.int32)
    for sb in range(nblk):
        cols = idx[:, sb * ATTN_TILE:min(sb * ATTN_TILE + ATTN_TILE, K)]
        mask[:, sb] = (cols >= 0).any(axis=1) if cols.size else 0
    return _ordered(d, "valid_block_mask", mask)


def decode_sparse_attn_hca(B=8, S=1, compress_ratio=128, start_pos=0, *, short_window=False,
                           mixed_topk=False, overlay_replacement=False, causal_regression=False,
                           seed=0, config=None):
    """§6.4: as decode_sparse_attn with a [T, 384] row: ring slots in columns 0..WIN-1,
    column WIN (the relocated overlay) -1, compressed slots from column WIN + S;
    synthetic RoPE rows."""
    c, d = _decode("hca", B, S, compress_ratio, start_pos,
                   _flags(short_window, mixed_topk, overlay_replacement, causal_regression),
                   seed, config)
    return _ordered(d)


def decode_sparse_attn_swa(B=8, S=1, compress_ratio=0, start_pos=0, *, short_window=False,
                           mixed_topk=False, overlay_replacement=False, causal_regression=False,
                           seed=0, config=None):
    """§7.5: a [T, WIN] row (ring slots 0..WIN-1 by default), synthetic RoPE rows, and
    win_bias [T, 256], the physical-order encoding of the row's validity sets."""
    c, d = _decode("swa", B, S, compress_ratio, start_pos,
                   _flags(short_window, mixed_topk, overlay_replacement, causal_regression),
                   seed, config)
    WIN, T = c.sliding_window, B * S
    idx = d["cmp_sparse_indices"]
    ring_cols = -(-WIN // ATTN_TILE) * ATTN_TILE
    bias = np.full((T, ring_cols + ATTN_TILE), NEG_INF, np.float32)
    for t in range(T):
        b = t // S
        for raw in idx[t, :WIN].tolist():
            if 0 <= raw < WIN:
                bias[t, raw] = 0.0
            elif WIN <= raw < WIN + S:
                bias[t, ring_cols + b * S + raw - WIN] = 0.0
    return _ordered(d, "win_bias", bias)


_DECODE_ORDER = ["q", "ori_kv", "ori_block_table", "mtp_kv_overlay", "cmp_kv", "cmp_block_table",
                 "cmp_sparse_indices", "attn_sink", "freqs_cos", "freqs_sin", "wo_a", "wo_b",
                 "wo_b_scale"]


def _ordered(d, extra=None, value=None):
    """The inputs in the decode kernels' argument order, the auxiliary input last."""
    out = {k: d[k] for k in _DECODE_ORDER}
    if extra is not None:
        out[extra] = value
    return out


COMPARATORS = {
    k: {"attn_out": ratio_allclose(atol=1e-4, rtol=1 / 128)}
    for k in ("prefill_sparse_attn", "decode_sparse_attn", "decode_sparse_attn_hca",
              "decode_sparse_attn_swa")
}

# pypto-lib's standalone runs: prefill T = 128 per compress ratio; decode B = 8, S = 1
CASES = {
    "prefill_sparse_attn": {"ratio4": dict(T=128, compress_ratio=4),
                            "ratio128": dict(T=128, compress_ratio=128),
                            "window": dict(T=128, compress_ratio=0)},
    "decode_sparse_attn": {"decode": dict(B=8, S=1, compress_ratio=4),
                           "decode@8192": dict(B=8, S=1, compress_ratio=4, start_pos=8192)},
    "decode_sparse_attn_hca": {"decode": dict(B=8, S=1, compress_ratio=128)},
    "decode_sparse_attn_swa": {"decode": dict(B=8, S=1, compress_ratio=0),
                               "overlay": dict(B=8, S=1, compress_ratio=0,
                                               overlay_replacement=True)},
}
