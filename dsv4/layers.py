"""Host metadata of the packed chunked prefill layer (spec chapter 06 §6.2-§6.5).

A prefill layer call packs the new tokens of several requests into one [total, ...] row
axis: request r contributes chunk_lens[r] tokens after start_positions[r] tokens of
context, padded to whole tiles of TILE rows, so request r's rows start at
chunk_offsets[r] (a prefix sum of padded lengths) and a tile never straddles two
requests. Caches and states are per request (request-local slices addressed by absolute
positions), so tile N+1 of a request reads what tile N and the history left there.

    prefill_tiles(chunk_lens, chunk_offsets, seq_lens)   the tiles, in execution order
    prefill_metadata(chunk_lens, start_positions)         the packed metadata tensors

prefill_metadata computes the per-token tensors from the closed form of §6.5 (what
pypto-lib's host builder copies out of one child-block builder per tile): positions,
ring slots, window index rows with the tile-local overlay, compressed and state slots.
"""
import numpy as np

from .config import BLOCK_SIZE, C4A_COMPRESSOR_BLOCK_SIZE, C128_COMPRESSOR_BLOCK_SIZE, get_config

# Rows of one prefill tile. The child attention blocks are fixed-shape: a tile covers
# exactly one ring page of BLOCK_SIZE rows (= the sliding window, = the ratio-128
# compression window), which is what lets the overlay raws WIN + t address one tile's
# fresh kv and puts the compressed raws at WIN + TILE = 256.
TILE = 128
assert TILE == BLOCK_SIZE

KINDS = {0: "swa", 128: "hca", 4: "csa"}
# compressed slots of one request the prefill HCA fixture maps (cmp_block_table = [0, -1, ...])
HCA_MAPPED_SLOTS = BLOCK_SIZE


def layer_kind(layer_id, config=None):
    """'swa', 'hca' or 'csa' from config.compress_ratios[layer_id] (§1, the lookup rule)."""
    cfg = get_config(config)
    layer_id = int(layer_id)
    if not 0 <= layer_id < len(cfg.compress_ratios):
        raise ValueError(f"layer_id = {layer_id} is outside [0, {len(cfg.compress_ratios)}) "
                         f"(the compress_ratios of {cfg.name})")
    ratio = cfg.compress_ratios[layer_id]
    if ratio not in KINDS:
        raise ValueError(f"layer_id = {layer_id} has compress ratio {ratio}; only 0 (SWA), "
                         f"128 (HCA) and 4 (CSA) have attention blocks")
    return KINDS[ratio]


def _row0(a, name):
    """A 1-D int64 copy of a batch vector, or of rank 0's copy of a [R, batch] one."""
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[0]
    if a.ndim != 1:
        raise ValueError(f"{name} must be [batch] or [R, batch], got shape {np.shape(a)}")
    return a.astype(np.int64)


def _batch(chunk_lens, start_positions):
    lens = _row0(chunk_lens, "chunk_lens")
    if lens.size == 0:
        raise ValueError("chunk_lens is empty: a prefill batch needs at least one request")
    bad = np.flatnonzero(lens <= 0)
    if bad.size:
        raise ValueError(f"chunk_lens[{int(bad[0])}] = {int(lens[bad[0]])}: every chunk must hold "
                         f"at least one token, got {lens.tolist()}")
    if start_positions is None:
        starts = np.zeros_like(lens)
    else:
        starts = _row0(start_positions, "start_positions")
        if starts.shape != lens.shape:
            raise ValueError(f"start_positions has {starts.size} entries but chunk_lens has "
                             f"{lens.size}; give one start position per request")
        bad = np.flatnonzero(starts < 0)
        if bad.size:
            raise ValueError(f"start_positions[{int(bad[0])}] = {int(starts[bad[0]])} is negative")
    return lens, starts


def _padded_offsets(lens):
    tiles = -(-lens // TILE)
    offsets = np.concatenate([[0], np.cumsum(tiles * TILE)[:-1]]).astype(np.int64)
    tile_offsets = np.concatenate([[0], np.cumsum(tiles)[:-1]]).astype(np.int64)
    return tiles, offsets, tile_offsets


def prefill_tiles(chunk_lens, chunk_offsets=None, seq_lens=None):
    """The tiles of a packed prefill batch in execution order (request-major, §6.3):
    a list of (request, tile_id, ctx, valid, base).

    chunk_lens [batch] (or the rank-replicated [R, batch]); chunk_offsets default to the
    padded prefix sums; seq_lens (context length after the chunk) default to chunk_lens,
    i.e. no history. ctx = seq_lens[r] - chunk_lens[r] + TILE * tile_id is the absolute
    position of the tile's first row, valid = min(TILE, chunk_lens[r] - TILE * tile_id)
    its active rows, base = chunk_offsets[r] + TILE * tile_id its first packed row."""
    lens, _ = _batch(chunk_lens, None)
    offsets = _padded_offsets(lens)[1] if chunk_offsets is None else _row0(chunk_offsets,
                                                                           "chunk_offsets")
    starts = np.zeros_like(lens) if seq_lens is None else _row0(seq_lens, "seq_lens") - lens
    if offsets.shape != lens.shape or starts.shape != lens.shape:
        raise ValueError(f"chunk_lens, chunk_offsets and seq_lens must have one entry per request, "
                         f"got {lens.size}, {offsets.size} and {starts.size}")
    out = []
    for r, (n, off, s) in enumerate(zip(lens.tolist(), offsets.tolist(), starts.tolist())):
        for tile_id in range(-(-n // TILE)):
            p0 = TILE * tile_id
            out.append((r, tile_id, s + p0, min(TILE, n - p0), off + p0))
    return out


def _state_row(p, pages, page):
    """Row of position p in a prefill state pool: table (17 j + 3) mod pages over logical
    pages j = p // page (§2.2)."""
    return ((17 * (p // page) + 3) % pages) * page + p % page


def prefill_metadata(chunk_lens, start_positions=None, *, layer_id=2, n_ranks=2, config=None):
    """The packed metadata tensors of a prefill layer call (§6.3, §6.5), each replicated
    over n_ranks ranks:

        seq_lens, chunk_lens, chunk_offsets, chunk_tile_offsets   int32 [R, batch]
        position_ids                                              int32 [R, total]
        ori_slot_mapping                                          int64 [R, total]
        cmp_sparse_indices                                        int32 [R, total, WIN + topk]
        cmp_sparse_lens                                           int32 [R, total]
        hca_cmp_slot_mapping, hca_state_slot_mapping,
        csa_cmp_slot_mapping, csa_idx_slot_mapping,
        csa_state_slot_mapping, csa_inner_state_slot_mapping      int64 [R, total]

    total = sum of the chunks padded to whole tiles. Active row t of a tile (position
    p = ctx + t): ring slot p mod WIN; window keys max(0, p - WIN + 1) .. p ascending,
    a key of this tile as overlay raw WIN + (key - ctx), an older one as ring slot
    key mod WIN; for an HCA layer then the visible compressed slots 0 .. (p + 1) // 128 - 1
    as raw WIN + TILE + slot; the compressed and state slots of the layer's kind (the
    other kinds' mappings stay -1). Padding rows: position = index in the tile, slot
    mappings -1, indices -1, lens 0. Raises ValueError for a chunk_len <= 0, a negative
    start, mismatched lengths, a chunk past max_position_embeddings, or (CSA) a request
    whose compressed slots exceed what the prefill indexer scores (seq_len // 4 > 256).
    """
    cfg = get_config(config)
    kind = layer_kind(layer_id, cfg)
    lens, starts = _batch(chunk_lens, start_positions)
    R = int(n_ranks)
    if R < 1:
        raise ValueError(f"n_ranks = {n_ranks} must be >= 1")
    seq = starts + lens
    MAXS = cfg.max_position_embeddings
    bad = np.flatnonzero(seq > MAXS)
    if bad.size:
        r = int(bad[0])
        raise ValueError(f"request {r}: start {int(starts[r])} + chunk {int(lens[r])} = "
                         f"{int(seq[r])} positions exceed max_position_embeddings = {MAXS}")
    if kind == "csa":
        from .golden.indexer import RATIO, prefill_score_cap
        cap = prefill_score_cap(BLOCK_SIZE)
        bad = np.flatnonzero(seq // RATIO > cap)
        if bad.size:
            r = int(bad[0])
            raise ValueError(f"request {r}: seq_len {int(seq[r])} has {int(seq[r]) // RATIO} "
                             f"compressed slots, more than the {cap} the prefill indexer scores "
                             f"(a CSA layer takes seq_len <= {RATIO * cap + RATIO - 1})")
    tiles, offsets, tile_offsets = _padded_offsets(lens)
    total = int((tiles * TILE).sum())
    WIN = cfg.sliding_window
    K = WIN + cfg.index_topk
    CMP_RAW = WIN + TILE

    pos = np.zeros(total, np.int32)
    ori = np.full(total, -1, np.int64)
    idx = np.full((total, K), -1, np.int32)
    nidx = np.zeros(total, np.int32)
    slots = {n: np.full(total, -1, np.int64) for n in (
        "hca_cmp_slot_mapping", "hca_state_slot_mapping", "csa_cmp_slot_mapping",
        "csa_idx_slot_mapping", "csa_state_slot_mapping", "csa_inner_state_slot_mapping")}
    hca_pages = -(-MAXS // C128_COMPRESSOR_BLOCK_SIZE)
    csa_pages = -(-MAXS // C4A_COMPRESSOR_BLOCK_SIZE)

    for _r, _tile, ctx, valid, base in prefill_tiles(lens, offsets, seq):
        pos[base:base + TILE] = np.arange(TILE)                     # padding: tile-local index
        for t in range(valid):
            row, p = base + t, ctx + t
            pos[row] = p
            ori[row] = p % WIN
            keys = np.arange(max(0, p - WIN + 1), p + 1)
            cols = np.where(keys >= ctx, WIN + (keys - ctx), keys % WIN)
            if kind == "hca":
                n_cmp = min((p + 1) // 128, K - cols.size)
                cols = np.concatenate([cols, CMP_RAW + np.arange(n_cmp)])
                slot = (p + 1) // 128 - 1
                if (p + 1) % 128 == 0 and slot < HCA_MAPPED_SLOTS:
                    slots["hca_cmp_slot_mapping"][row] = slot
                slots["hca_state_slot_mapping"][row] = _state_row(
                    p, hca_pages, C128_COMPRESSOR_BLOCK_SIZE)
            elif kind == "csa":
                if (p + 1) % 4 == 0:
                    slots["csa_cmp_slot_mapping"][row] = (p + 1) // 4 - 1
                    slots["csa_idx_slot_mapping"][row] = (p + 1) // 4 - 1
                srow = _state_row(p, csa_pages, C4A_COMPRESSOR_BLOCK_SIZE)
                slots["csa_state_slot_mapping"][row] = srow
                slots["csa_inner_state_slot_mapping"][row] = srow
            idx[row, :cols.size] = cols
            nidx[row] = cols.size

    def rep(a, dtype):
        return np.ascontiguousarray(np.broadcast_to(np.asarray(a, dtype), (R, *np.shape(a))))

    return {
        "seq_lens": rep(seq, np.int32),
        "chunk_lens": rep(lens, np.int32),
        "chunk_offsets": rep(offsets, np.int32),
        "chunk_tile_offsets": rep(tile_offsets, np.int32),
        "position_ids": rep(pos, np.int32),
        "ori_slot_mapping": rep(ori, np.int64),
        "cmp_sparse_indices": rep(idx, np.int32),
        "cmp_sparse_lens": rep(nidx, np.int32),
        **{n: rep(a, np.int64) for n, a in slots.items()},
    }


__all__ = ["TILE", "layer_kind", "prefill_tiles", "prefill_metadata"]
