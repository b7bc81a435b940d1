"""The sparse-attention goldens (spec chapter 03), checked on small configs against
hand-built caches whose attended rows are known, against a float64 dense attention
written here, and on crafted cases where a plausible wrong reading of the spec
(tile partition, l in bf16, true-division quant scale, group order, duplicates)
gives a different answer.

One-hot value rows make the attention output O show the probabilities: with
q = 0 every score is 0, every gathered row gets weight 1, and O[t, h, d] is
(number of times the row with one-hot dimension d was gathered) / (rows + sink).

Nothing here calls dsv4.golden.numerics: bf16 rounding is done on the bit pattern.
"""
import dataclasses

import ml_dtypes
import numpy as np
import pytest

import dsv4
from conftest import same_bits

BF16 = np.dtype(ml_dtypes.bfloat16)
f32 = np.float32
F64 = np.float64

# H = 4 heads of 128, rope 32, 2 groups of 2 heads, O_LORA 64, D 256, window 16
CFG = dataclasses.replace(dsv4.FLASH, num_attention_heads=4, head_dim=128, qk_rope_head_dim=32,
                          o_groups=2, o_lora_rank=64, hidden_size=256, sliding_window=16,
                          index_topk=32)
H, HD, R, G, OL, D, WIN = 4, 128, 32, 2, 64, 256, 16
# FLASH's window and top-k (so that lists are longer than one 128-row tile)
CFG_W = dataclasses.replace(CFG, sliding_window=128, index_topk=512)
SCALE = f32(HD ** -0.5)
NO_SINK = -1e30            # exp(sink - m) = 0: the sink vanishes

G_ = dsv4.golden


# ------------------------------------------------------------------ own rounding

def bf16_bits(x):
    """fp32 -> bf16 (round to nearest even on the bit pattern) -> fp32."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    return r.view(np.float32)


def bf(x):
    return np.asarray(x, np.float32).astype(BF16)


def exp_f32(x):
    return np.exp(np.asarray(x, np.float32).astype(F64)).astype(np.float32)


def onehot(shape, dim, value=1.0):
    a = np.zeros(shape + (HD,), np.float32)
    a[..., dim] = value
    return a


# ------------------------------------------------------------------ input makers

def weights(seed=0, cfg=CFG):
    r = np.random.default_rng(seed)
    Hh, HDh, Gg, O = cfg.num_attention_heads, cfg.head_dim, cfg.o_groups, cfg.o_lora_rank
    return {
        "wo_a": bf(r.uniform(-1, 1, (Gg, O, Hh // Gg * HDh)) / 16),
        "wo_b": r.integers(-127, 128, (cfg.hidden_size, Gg * O)).astype(np.int8),
        "wo_b_scale": np.full(cfg.hidden_size, 1e-3, np.float32),
    }


def identity_rope(T, r=R):
    return bf(np.ones((T, r))), bf(np.zeros((T, r)))


def prefill(T, idx, lens, *, ori_kv, kv_overlay, cmp_kv, ori_block_table, cmp_block_table,
            q=None, sink=None, num_tokens=None, cfg=CFG, w=None):
    cos, sin = identity_rope(T, cfg.qk_rope_head_dim)
    Hh, HDh = cfg.num_attention_heads, cfg.head_dim
    return dict(
        q=bf(np.zeros((T, Hh, HDh)) if q is None else q), ori_kv=bf(ori_kv),
        ori_block_table=np.asarray(ori_block_table, np.int32), kv_overlay=bf(kv_overlay),
        cmp_kv=bf(cmp_kv), cmp_block_table=np.asarray(cmp_block_table, np.int32),
        cmp_sparse_indices=np.asarray(idx, np.int32), cmp_sparse_lens=np.asarray(lens, np.int32),
        attn_sink=np.full(Hh, NO_SINK if sink is None else sink, np.float32),
        freqs_cos=cos, freqs_sin=sin, **(w or weights(cfg=cfg)),
        num_tokens=T if num_tokens is None else num_tokens)


def decode(B, S, idx, *, ori_kv, mtp_kv_overlay, cmp_kv, ori_block_table, cmp_block_table,
           q=None, sink=None, cfg=CFG, w=None):
    T = B * S
    cos, sin = identity_rope(T, cfg.qk_rope_head_dim)
    Hh, HDh = cfg.num_attention_heads, cfg.head_dim
    return dict(
        q=bf(np.zeros((T, Hh, HDh)) if q is None else q), ori_kv=bf(ori_kv),
        ori_block_table=np.asarray(ori_block_table, np.int32), mtp_kv_overlay=bf(mtp_kv_overlay),
        cmp_kv=bf(cmp_kv), cmp_block_table=np.asarray(cmp_block_table, np.int32),
        cmp_sparse_indices=np.asarray(idx, np.int32),
        attn_sink=np.full(Hh, NO_SINK if sink is None else sink, np.float32),
        freqs_cos=cos, freqs_sin=sin, **(w or weights(cfg=cfg)))


def swa_args(d):
    """decode() inputs in decode_sparse_attn_swa's argument set."""
    return {k: v for k, v in d.items() if k not in ("cmp_kv", "cmp_block_table")}


def run(fn, inputs, cfg=CFG):
    return fn(**inputs, config=cfg, stages=True)


def rows(*pairs, K, T):
    """Index rows: pairs (t, [raw, ...]); everything else -1."""
    idx = np.full((T, K), -1, np.int32)
    for t, r in pairs:
        idx[t, :len(r)] = r
    return idx


# ===================================================== §3.3 / §4 addressing examples

def micro_prefill(idx_row, lens_row, num_tokens=6):
    """T = 8, BLOCK = 16. Ring: 2 pages, table [1]. Compressed: 4 pages, table [2, 0, 3]
    (48 slots). Every row is the one-hot 127 except the three the §3.3 row should gather."""
    T, K = 8, WIN + 32
    ori_kv = onehot((2, 16, 1), 127)
    kv_overlay = onehot((T,), 127)
    cmp_kv = onehot((4, 16, 1), 127)
    kv_overlay[2] = onehot((), 0)               # overlay u = 2
    ori_kv[1, 5, 0] = onehot((), 1)             # ring slot 5 -> ori_block_table[0] = 1, row 5
    cmp_kv[0, 4, 0] = onehot((), 2)             # c = 20 -> cmp_block_table[1] = 0, row 4
    idx = rows((2, idx_row), (7, [WIN + 2]), K=K, T=T)
    lens = np.zeros(T, np.int32)
    lens[2], lens[7] = lens_row, 1
    return prefill(T, idx, lens, ori_kv=ori_kv, kv_overlay=kv_overlay, cmp_kv=cmp_kv,
                   ori_block_table=[1], cmp_block_table=[2, 0, 3], num_tokens=num_tokens)


def test_prefill_addressing_micro_example():
    # overlay u=2 | empty | ring 5 | overlay u=7 >= num_tokens | compressed c=20 |
    # compressed c=48 >= capacity | column 6 >= L = 6 (ring 7, never read)
    T = 8
    inputs = micro_prefill([WIN + 2, -1, 5, WIN + 7, WIN + T + 20, WIN + T + 48, 7], 6)
    out = run(G_.prefill_sparse_attn, inputs)
    O = out["stages"]["O"]
    want = np.zeros((H, HD), np.float32)
    want[:, :3] = f32(1) / f32(3)
    np.testing.assert_array_equal(O[2], want)
    # token 7 has a valid row but 7 >= num_tokens: zero; so are the tokens with lens 0
    for t in (0, 1, 3, 4, 5, 6, 7):
        assert not O[t].any() and not out["attn_out"][t].astype(np.float32).any(), t
    assert out["attn_out"].dtype == BF16 and out["attn_out"].shape == (T, D)


def micro_decode():
    """B = 4, S = 1, BLOCK = 16, permuted tables. Token 3 (b = 3): ring page
    ori_block_table[3, 0] = 1; compressed logical page 2 -> cmp_block_table[3, 2] = 14."""
    B, T = 4, 4
    ori_kv = onehot((4, 16, 1), 127)
    ov = onehot((T,), 127)
    cmp_kv = onehot((16, 16, 1), 127)
    ori_kv[1, 7, 0] = onehot((), 0)
    ori_kv[1, 5, 0] = onehot((), 3)
    ov[3] = onehot((), 1)
    cmp_kv[14, 12, 0] = onehot((), 2)
    tables = dict(ori_block_table=[[2], [3], [0], [1]],
                  cmp_block_table=[[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [9, 5, 14, 2]])
    return B, dict(ori_kv=ori_kv, mtp_kv_overlay=ov, cmp_kv=cmp_kv, **tables)


def test_decode_addressing_micro_example():
    # ring 7 | overlay s'=0 | compressed c = 44 (page 2, row 12) | invalid
    B, caches = micro_decode()
    c44 = WIN + 1 + 44
    for fn, K in ((G_.decode_sparse_attn, WIN + 32), (G_.decode_sparse_attn_hca, 384)):
        out = run(fn, decode(B, 1, rows((3, [7, WIN, c44, -1]), K=K, T=B), **caches))
        O = out["stages"]["O"]
        want = np.zeros((H, HD), np.float32)
        want[:, :3] = f32(1) / f32(3)
        np.testing.assert_array_equal(O[3], want)
        assert not O[:3].any() and not out["attn_out"][:3].astype(np.float32).any()
    # SWA: the same row attends the ring row and the overlay row; the compressed index
    # is ignored (its page would not even be looked up)
    d = decode(B, 1, rows((3, [7, WIN, c44, -1]), K=WIN, T=B), **caches)
    O = run(G_.decode_sparse_attn_swa, swa_args(d))["stages"]["O"]
    want = np.zeros((H, HD), np.float32)
    want[:, :2] = 0.5
    np.testing.assert_array_equal(O[3], want)


def test_duplicates_twice_in_csa_once_in_swa():
    # §7.4: row [5, 5, WIN, compressed, -1, ...]
    B, caches = micro_decode()
    row = [5, 5, WIN, WIN + 1 + 44, -1]
    O = run(G_.decode_sparse_attn, decode(B, 1, rows((3, row), K=WIN + 32, T=B), **caches))["stages"]["O"]
    np.testing.assert_array_equal(O[3, :, [3, 1, 2]],
                                  np.array([[0.5] * H, [0.25] * H, [0.25] * H], np.float32))
    d = decode(B, 1, rows((3, row), K=WIN, T=B), **caches)
    O = run(G_.decode_sparse_attn_swa, swa_args(d))["stages"]["O"]
    np.testing.assert_array_equal(O[3, :, [3, 1, 2]], np.array([[0.5] * H, [0.5] * H, [0] * H], np.float32))


def test_hca_reads_every_column():
    # §6.3: a valid index past the module's TOPK (column 300 of 384) is attended
    B, caches = micro_decode()
    idx = rows((3, [7]), K=384, T=B)
    idx[3, 300] = WIN
    O = run(G_.decode_sparse_attn_hca, decode(B, 1, idx, **caches))["stages"]["O"]
    assert O[3, 0, 0] == 0.5 and O[3, 0, 1] == 0.5


# ============================================================ against float64

def ref_attention(q, kv_rows, sink):
    """Dense float64 softmax over the gathered rows (one logit per row) plus the sink
    logit with a zero value vector. q [H, HD], kv_rows [n, HD]."""
    s = (q.astype(F64) @ kv_rows.astype(F64).T) * float(SCALE)
    m = np.maximum(s.max(axis=1), sink)
    e = np.exp(s - m[:, None])
    den = e.sum(axis=1) + np.exp(sink - m)
    p = e / den[:, None]
    return p @ kv_rows.astype(F64), p @ np.abs(kv_rows.astype(F64))


def check_dense(O, q, gathered, sink):
    for t, kv in enumerate(gathered):
        if kv is None:
            assert not O[t].any(), t
            continue
        ref, mag = ref_attention(q[t].astype(np.float32), kv, sink.astype(F64))
        # each probability is rounded to bf16 once (2^-9); fp32 sums add far less
        assert np.all(np.abs(O[t] - ref) <= 2.0 ** -8 * mag + 1e-7), t


def random_pools(r, T, pages_ori, pages_cmp, block):
    return (bf(r.uniform(-1, 1, (pages_ori, block, 1, HD))), bf(r.uniform(-1, 1, (T, HD))),
            bf(r.uniform(-1, 1, (pages_cmp, block, 1, HD))))


def test_prefill_matches_dense_float64():
    # window 128, T = 16: PAD = 256, so a list may need two tiles; holes, duplicates,
    # overlay rows >= num_tokens, compressed slots >= capacity, lens past PAD
    r = np.random.default_rng(1)
    T, n_tok, K, cap = 16, 13, 640, 3 * 128
    ori_kv, ov, cmp_kv = random_pools(r, T, 2, 4, 128)
    ori_tbl, cmp_tbl = np.array([1]), np.array([3, 0, 2])
    q = bf(r.uniform(-1, 1, (T, H, HD)) * 2)
    sink = r.normal(size=H).astype(np.float32)
    idx = np.full((T, K), -1, np.int32)
    lens = r.integers(-3, 400, T).astype(np.int32)
    lens[4] = 1000
    kinds = r.integers(0, 4, (T, K))
    idx = np.where(kinds == 0, r.integers(0, 128, (T, K)),                       # ring
                   np.where(kinds == 1, 128 + r.integers(0, T, (T, K)),           # overlay
                            np.where(kinds == 2, 128 + T + r.integers(0, cap + 100, (T, K)), -1)))
    idx[5, :20] = 7                                                                # duplicates
    inputs = prefill(T, idx, lens, ori_kv=ori_kv, kv_overlay=ov, cmp_kv=cmp_kv, q=q, sink=sink,
                     ori_block_table=ori_tbl, cmp_block_table=cmp_tbl, num_tokens=n_tok, cfg=CFG_W)
    O = run(G_.prefill_sparse_attn, inputs, CFG_W)["stages"]["O"]
    o32, ov32, c32 = (np.asarray(a).astype(np.float32) for a in (ori_kv, ov, cmp_kv))
    gathered = []
    for t in range(T):
        sel = []
        for raw in idx[t, :max(0, min(int(lens[t]), 256))] if t < n_tok else []:
            if 0 <= raw < 128:
                sel.append(o32[ori_tbl[0], raw, 0])
            elif 128 <= raw < 128 + T and raw - 128 < n_tok:
                sel.append(ov32[raw - 128])
            elif raw >= 128 + T and raw - 128 - T < cap:
                c = raw - 128 - T
                sel.append(c32[cmp_tbl[c // 128], c % 128, 0])
        gathered.append(np.array(sel) if sel else None)
    assert sum(g is not None and len(g) > 128 for g in gathered) >= 3     # two-tile lists
    check_dense(O, q, gathered, sink)


@pytest.mark.parametrize("kernel", ["decode_sparse_attn", "decode_sparse_attn_hca",
                                    "decode_sparse_attn_swa"])
def test_decode_matches_dense_float64(kernel):
    r = np.random.default_rng(2)
    B, S = 3, 2
    T = B * S
    K = {"decode_sparse_attn": 640, "decode_sparse_attn_hca": 384, "decode_sparse_attn_swa": 128}[kernel]
    ori_kv, ov, cmp_kv = random_pools(r, T, B, 4 * B, 128)
    ori_tbl = np.array([[2], [0], [1]])
    cmp_tbl = np.arange(4 * B).reshape(B, 4)[:, ::-1].copy()
    kinds = r.integers(0, 4, (T, K))
    idx = np.where(kinds == 0, r.integers(0, 128, (T, K)),
                   np.where(kinds == 1, 128 + r.integers(0, S, (T, K)),
                            np.where(kinds == 2, 128 + S + r.integers(0, 4 * 128, (T, K)), -1)))
    idx[1] = -1                                        # a token with nothing to attend
    idx[2, 130:] = -1                                  # positional tiles 2.. empty
    q = bf(r.uniform(-1, 1, (T, H, HD)) * 2)
    sink = r.normal(size=H).astype(np.float32)
    d = decode(B, S, idx, ori_kv=ori_kv, mtp_kv_overlay=ov, cmp_kv=cmp_kv, q=q, sink=sink,
               ori_block_table=ori_tbl, cmp_block_table=cmp_tbl, cfg=CFG_W)
    if kernel == "decode_sparse_attn_swa":
        d = swa_args(d)
    O = run(getattr(G_, kernel), d, CFG_W)["stages"]["O"]
    o32, ov32, c32 = (np.asarray(a).astype(np.float32) for a in (ori_kv, ov, cmp_kv))
    gathered = []
    for t in range(T):
        b = t // S
        sel = []
        raws = idx[t]
        if kernel == "decode_sparse_attn_swa":          # sets, ring first, compressed ignored
            raws = sorted(set(int(x) for x in raws if 0 <= x < 128 + S))
        for raw in raws:
            if 0 <= raw < 128:
                sel.append(o32[ori_tbl[b, 0], raw, 0])
            elif 128 <= raw < 128 + S:
                sel.append(ov32[b * S + raw - 128])
            elif raw >= 128 + S:
                c = raw - 128 - S
                sel.append(c32[cmp_tbl[b, c // 128], c % 128, 0])
        gathered.append(np.array(sel) if sel else None)
    check_dense(O, q, gathered, sink)


def test_sink_is_an_unscaled_logit_without_value():
    # q = 0: n rows of weight 1, the sink adds exp(sink) to the denominator only
    T = 8
    inputs = micro_prefill([WIN + 2, 5, WIN + T + 20], 3)
    for sink in (0.0, 2.0, -1.5):
        inputs["attn_sink"] = np.full(H, sink, np.float32)
        O = run(G_.prefill_sparse_attn, inputs)["stages"]["O"]
        want = 1.0 / (3.0 + np.exp(sink))
        np.testing.assert_allclose(O[2, :, :3], want, rtol=3e-7)
        assert not O[2, :, 3:].any()


# ====================================================== tiling and rounding rules

def tile_emulation(s, tiles, sink):
    """§2.2-2.4 for one-hot value rows: s [n] scores (fp32) of the rows, tiles = lists of
    row numbers. Returns the output weight of each row (the O entry of its dimension)."""
    m = l = None
    o = np.zeros(len(s), np.float32)
    for tile in tiles:
        mj = max(s[i] for i in tile)
        e = {i: exp_f32(s[i] - mj) for i in tile}
        lj = f32(0)
        oj = np.zeros(len(s), np.float32)
        for i in tile:
            lj = f32(lj + e[i])
            oj[i] = bf16_bits(e[i])
        if m is None:
            m, l, o = mj, lj, oj
        else:
            mn = max(m, mj)
            a, b = exp_f32(m - mn), exp_f32(mj - mn)
            l = f32(f32(a * l) + f32(b * lj))
            o = (o * a + oj * b).astype(np.float32)
            m = mn
    return o / f32(l + exp_f32(f32(sink) - m))


def partition_case():
    """Window 128: ring slots 5, 6, 7 are one-hot rows (dims 0, 1, 2); slot 5's score is the
    largest. Index row [5, -1 x 127, 6, 7]."""
    r = np.random.default_rng(3)
    T = 8
    q = np.zeros((T, H, HD), np.float32)
    q[..., 0] = r.uniform(3, 5, (T, H))
    q[..., 1:3] = r.uniform(-2, 2, (T, H, 2))
    q = bf(q)
    ring = np.zeros((1, 128, 1, HD), np.float32)
    for i, slot in enumerate((5, 6, 7)):
        ring[0, slot, 0, i] = 1.0
    row = [5] + [-1] * 127 + [6, 7]
    scores = (np.asarray(q).astype(np.float32)[..., :3] * SCALE).astype(np.float32)
    return T, q, ring, row, scores


def test_prefill_tiles_the_compacted_list():
    T, q, ring, row, s = partition_case()
    idx = np.full((T, 640), -1, np.int32)
    idx[:, :130] = row
    inputs = prefill(T, idx, np.full(T, 130), ori_kv=ring, kv_overlay=np.zeros((T, HD)),
                     cmp_kv=np.zeros((1, 128, 1, HD)), ori_block_table=[0], cmp_block_table=[0],
                     q=q, sink=0.0, cfg=CFG_W)
    O = run(G_.prefill_sparse_attn, inputs, CFG_W)["stages"]["O"][..., :3]
    compact = np.array([[tile_emulation(s[t, h], [[0, 1, 2]], 0.0) for h in range(H)] for t in range(T)])
    column = np.array([[tile_emulation(s[t, h], [[0], [1, 2]], 0.0) for h in range(H)] for t in range(T)])
    np.testing.assert_allclose(O, compact, rtol=3e-7)
    assert np.max(np.abs(column - compact) / compact) > 1e-4        # the partitions differ
    # the decode goldens tile by column position: the same row there is two tiles
    ori = np.tile(ring, (T, 1, 1, 1))
    d = decode(T, 1, np.pad(np.array([row] * T), ((0, 0), (0, 510)), constant_values=-1),
               ori_kv=ori, mtp_kv_overlay=np.zeros((T, HD)), cmp_kv=np.zeros((T, 128, 1, HD)),
               ori_block_table=np.arange(T)[:, None], cmp_block_table=np.arange(T)[:, None],
               q=q, sink=0.0, cfg=CFG_W)
    O = run(G_.decode_sparse_attn, d, CFG_W)["stages"]["O"][..., :3]
    np.testing.assert_allclose(O, column, rtol=3e-7)


def test_prefill_tiles_hold_128_rows():
    # 130 gathered rows: ring slots 0..127 (all the one-hot 0) then overlay rows 0, 1
    # (one-hot 1, 2, with larger scores): tiles rows 0..127 and 128..129, not one tile
    T, q, _, _, _ = partition_case()
    ring = onehot((1, 128, 1), 0)
    ov = np.zeros((T, HD), np.float32)
    ov[0, 1], ov[1, 2] = 1.0, 1.0
    q = np.asarray(q).astype(np.float32)
    q[..., 0] = -q[..., 0]
    q = bf(q)
    idx = np.full((T, 640), -1, np.int32)
    idx[:, :130] = list(range(128)) + [128, 129]
    inputs = prefill(T, idx, np.full(T, 130), ori_kv=ring, kv_overlay=ov,
                     cmp_kv=np.zeros((1, 128, 1, HD)), ori_block_table=[0], cmp_block_table=[0],
                     q=q, sink=0.0, cfg=CFG_W)
    O = run(G_.prefill_sparse_attn, inputs, CFG_W)["stages"]["O"][..., :3]
    s = (np.asarray(q).astype(np.float32)[..., :3] * SCALE).astype(np.float32)
    s130 = np.concatenate([np.repeat(s[..., :1], 128, axis=-1), s[..., 1:]], axis=-1)

    def weights_of(tiles):
        w = np.array([[tile_emulation(s130[t, h], tiles, 0.0) for h in range(H)] for t in range(T)])
        return np.stack([w[..., :128].sum(axis=-1), w[..., 128], w[..., 129]], axis=-1)

    two = weights_of([list(range(128)), [128, 129]])
    one = weights_of([list(range(130))])
    np.testing.assert_allclose(O, two, rtol=3e-6)
    assert np.max(np.abs(one - two) / two) > 1e-4


def test_l_sums_fp32_exps_pv_uses_bf16():
    # one tile of six one-hot rows: O[d_i] = bf16(e_i) / sum(e_j), e_j in fp32
    r = np.random.default_rng(4)
    T = 8
    q = np.zeros((T, H, HD), np.float32)
    q[..., :6] = r.uniform(-8, 8, (T, H, 6))
    q = bf(q)
    ring = np.zeros((1, 128, 1, HD), np.float32)
    for i in range(6):
        ring[0, i, 0, i] = 1.0
    idx = np.full((T, 640), -1, np.int32)
    idx[:, :6] = np.arange(6)
    inputs = prefill(T, idx, np.full(T, 6), ori_kv=ring, kv_overlay=np.zeros((T, HD)),
                     cmp_kv=np.zeros((1, 128, 1, HD)), ori_block_table=[0], cmp_block_table=[0],
                     q=q, cfg=CFG_W)
    O = run(G_.prefill_sparse_attn, inputs, CFG_W)["stages"]["O"][..., :6].astype(F64)
    s = (np.asarray(q).astype(np.float32)[..., :6] * SCALE).astype(np.float32)
    e = exp_f32(s - s.max(axis=-1, keepdims=True)).astype(F64)
    eb = bf16_bits(e).astype(F64)
    pinned = eb / e.sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(O, pinned, rtol=1e-6)
    for wrong in (eb / eb.sum(axis=-1, keepdims=True), e / e.sum(axis=-1, keepdims=True)):
        assert np.max(np.abs(O - wrong) / wrong) > 1e-4


def test_all_invalid_tokens_are_exact_zero_rows():
    B, caches = micro_decode()
    w = weights(5)
    for fn, K in ((G_.decode_sparse_attn, WIN + 32), (G_.decode_sparse_attn_hca, 384),
                  (G_.decode_sparse_attn_swa, WIN)):
        idx = np.full((B, K), -1, np.int32)
        idx[0, :3] = [1, 2, WIN]
        idx[2, :2] = [WIN + 1 + 5, -7]             # compressed + negative: SWA attends nothing
        d = decode(B, 1, idx, **caches, q=bf(np.full((B, H, HD), 0.5)), sink=0.0, w=w)
        out = run(fn, swa_args(d) if fn is G_.decode_sparse_attn_swa else d)
        a = out["attn_out"].astype(np.float32)
        assert a[0].any()
        zero_rows = (1, 2, 3) if fn is G_.decode_sparse_attn_swa else (1, 3)
        for t in zero_rows:
            assert same_bits(out["attn_out"][t], np.zeros(D, BF16)), (fn.__name__, t)
            assert not out["stages"]["O"][t].any() and not out["stages"]["q8"][t].any()


def test_prefill_num_tokens_and_overlay_skip():
    r = np.random.default_rng(6)
    T, K = 8, WIN + 32
    ori_kv, ov, cmp_kv = random_pools(r, T, 1, 1, 16)
    idx = np.full((T, K), -1, np.int32)
    for t in range(T):
        idx[t, :3] = [t % 16, WIN + t, WIN + 5]          # overlay row 5 in every list
    base = prefill(T, idx, np.full(T, 3), ori_kv=ori_kv, kv_overlay=ov, cmp_kv=cmp_kv,
                   ori_block_table=[0], cmp_block_table=[0], q=bf(r.uniform(-1, 1, (T, H, HD))),
                   sink=0.0, num_tokens=5)
    out = G_.prefill_sparse_attn(**base, config=CFG)["attn_out"]
    assert not out[5:].astype(np.float32).any() and out[:5].astype(np.float32).all(axis=1).any()
    # overlay u = 5 >= num_tokens is skipped: the same as an empty slot
    idx2 = idx.copy()
    idx2[:, 2] = -1
    same = G_.prefill_sparse_attn(**dict(base, cmp_sparse_indices=idx2), config=CFG)["attn_out"]
    assert same_bits(out, same)
    # with num_tokens = T it is attended (and rows 5.. are computed)
    full = G_.prefill_sparse_attn(**dict(base, num_tokens=T), config=CFG)["attn_out"]
    assert not same_bits(full[:5], out[:5]) and full[5:].astype(np.float32).any()
    # num_tokens = 0: everything zero
    none = G_.prefill_sparse_attn(**dict(base, num_tokens=0), config=CFG)["attn_out"]
    assert not none.astype(np.float32).any()


def test_prefill_lens_clamp():
    # window 128, T = 8: PAD = 256; the column at 300 lies past PAD
    r = np.random.default_rng(7)
    T, K = 8, 640
    ori_kv, ov, cmp_kv = random_pools(r, T, 1, 1, 128)
    idx = np.full((T, K), -1, np.int32)
    idx[:, :4] = [3, 9, 128 + 1, 77]
    idx[:, 300] = 40
    base = prefill(T, idx, np.full(T, 4), ori_kv=ori_kv, kv_overlay=ov, cmp_kv=cmp_kv,
                   ori_block_table=[0], cmp_block_table=[0], q=bf(r.uniform(-1, 1, (T, H, HD))),
                   sink=0.0, cfg=CFG_W)

    def out(lens):
        return G_.prefill_sparse_attn(**dict(base, cmp_sparse_lens=np.asarray(lens, np.int32)),
                                      config=CFG_W)["attn_out"]

    four = out(np.full(T, 4))
    huge = out(np.array([10**6, 256, 257, 640, 4, 4, 4, 4]))
    assert same_bits(huge, four)                      # column 300 is never read
    neg = out(np.array([-5, 0, 4, 4, 4, 4, 4, 4]))
    assert not neg[:2].astype(np.float32).any() and same_bits(neg[2:], four[2:])
    two = out(np.full(T, 2))                          # lens cuts the list
    assert not same_bits(two, four)


def test_inverse_rope_is_the_spec_formula():
    inputs = dsv4.specs.decode_sparse_attn_hca(B=2, S=2, seed=3, config=CFG)
    out = run(G_.decode_sparse_attn_hca, inputs)
    O, Ob = out["stages"]["O"], out["stages"]["Ob"].astype(np.float32)
    N = HD - R
    assert same_bits(Ob[..., :N], bf16_bits(O[..., :N]))
    c = np.asarray(inputs["freqs_cos"]).astype(np.float32)[:, None, :R // 2]
    s = np.asarray(inputs["freqs_sin"]).astype(np.float32)[:, None, :R // 2]
    xe, xo = O[..., N::2], O[..., N + 1::2]
    ye = bf16_bits(f32(xe * c) + f32(xo * s))
    yo = bf16_bits(f32(xo * c) - f32(xe * s))
    assert same_bits(Ob[..., N::2], ye) and same_bits(Ob[..., N + 1::2], yo)
    assert not same_bits(ye, bf16_bits(xe))            # the rotation did something
    # columns R/2.. of the tables are never read
    junk = dict(inputs, freqs_cos=np.asarray(inputs["freqs_cos"]).copy(),
                freqs_sin=np.asarray(inputs["freqs_sin"]).copy())
    junk["freqs_cos"][:, R // 2:] = 7
    junk["freqs_sin"][:, R // 2:] = -7
    assert same_bits(G_.decode_sparse_attn_hca(**junk, config=CFG)["attn_out"], out["attn_out"])


# ===================================================== grouped int8 projection

def identity_attention(v, cfg, w):
    """Prefill in which token t attends only overlay row v[t] with the sink switched off
    and identity rope tables: Ob[t, h] = v[t] for every head."""
    T = v.shape[0]
    idx = np.full((T, cfg.sliding_window + cfg.index_topk), -1, np.int32)
    idx[:, 0] = cfg.sliding_window + np.arange(T)
    return prefill(T, idx, np.ones(T), ori_kv=np.zeros((1, 16, 1, cfg.head_dim)), kv_overlay=v,
                   cmp_kv=np.zeros((1, 16, 1, cfg.head_dim)), ori_block_table=[0],
                   cmp_block_table=[0], cfg=cfg, w=w)


def test_quant_scale_is_reciprocal_times_127():
    # amax = 1.0546875 and 0.52734375 = amax / 2: 0.52734375 * sq lands on 63.5 from
    # below with sq = (1 / amax) * 127, from above with sq = 127 / amax
    A, x = f32(1.0546875), f32(0.52734375)
    sq_rec, sq_div = f32(f32(1) / A) * f32(127), f32(127) / A
    assert np.rint(x * sq_rec) == 63 and np.rint(x * sq_div) == 64
    w = weights(8)
    wo_a = np.zeros((G, OL, 2 * HD), np.float32)
    wo_a[0, 0, 0], wo_a[0, 1, 0] = A, x                # o_r[t, 0] = [A, x, 0, ...]
    wo_a[1, 0, 0] = 1.0
    wo_b = np.zeros((D, G * OL), np.int8)
    wo_b[0, 1] = 1                                     # out[t, 0] = q8[t, 0, 1] * sdq[t, 0]
    w.update(wo_a=bf(wo_a), wo_b=wo_b, wo_b_scale=np.ones(D, np.float32))
    v = onehot((2,), 0)
    out = run(G_.prefill_sparse_attn, identity_attention(v, CFG, w))
    st = out["stages"]
    np.testing.assert_array_equal(st["o_r"][:, 0, :2], [[A, x]] * 2)
    assert st["q8"][0, 0, 0] == 127 and st["q8"][0, 0, 1] == 63
    assert st["sdq"][0, 0] == f32(1) / sq_rec and st["sdq"][0, 0] != f32(1) / sq_div
    assert out["attn_out"][0, 0].astype(np.float32) == bf16_bits(f32(63) * (f32(1) / sq_rec))


def test_groups_are_dequantised_separately_in_order():
    # four groups of one head; out[t, 0] = ((P0 s0 + P1 s1) + P2 s2) + P3 s3 with
    # P0 s0 = P1 s1 = 2^-5, P2 s2 = (1 + 2^-8) 2^19, P3 = 0: in this order the two small
    # terms add to one ulp of the big one and the bf16 result rounds up; added after the
    # big term each would be a tie to even and vanish (1 + 2^-8 -> 1.0)
    cfg = dataclasses.replace(CFG, o_groups=4)
    wo_a = np.zeros((4, OL, HD), np.float32)
    wo_b = np.zeros((D, 4 * OL), np.int8)
    for g in (0, 1):                                   # amax 127/32: sq = 32, sdq = 2^-5
        wo_a[g, 0, 0], wo_a[g, 1, 0] = 127 / 32, 1 / 32
        wo_b[0, g * OL + 1] = 1                        # P = 1
    wo_a[2, :33, 0], wo_a[2, 33, 0] = 127, 48          # amax 127: sq = 1, q8 = o_r
    wo_b[0, 2 * OL:2 * OL + 32], wo_b[0, 2 * OL + 32], wo_b[0, 2 * OL + 33] = 127, 80, 1
    w = {"wo_a": bf(wo_a), "wo_b": wo_b, "wo_b_scale": np.full(D, 2.0 ** -19, np.float32)}
    out = run(G_.prefill_sparse_attn, identity_attention(onehot((1,), 0), cfg, w), cfg)
    st = out["stages"]
    assert 32 * 127 * 127 + 127 * 80 + 48 == (1 + 2 ** -8) * 2 ** 19
    sdq_eps = f32(1) / (f32(f32(1) / f32(1e-4)) * f32(127))          # the all-zero group
    np.testing.assert_array_equal(st["sdq"][0], [2.0 ** -5, 2.0 ** -5, 1.0, sdq_eps])
    assert not st["q8"][0, 3].any()
    assert out["attn_out"][0, 0].astype(np.float32) == 1.0078125
    assert not out["attn_out"][0, 1:].astype(np.float32).any()


def test_projection_is_per_group_int8_exact():
    # float64 re-derivation of §2.6 from the Ob stage, with the golden's own o_r
    inputs = dsv4.specs.decode_sparse_attn(B=2, S=1, seed=4, config=CFG)
    out = run(G_.decode_sparse_attn, inputs)
    st = out["stages"]
    T = 2
    x = st["Ob"].astype(np.float32).reshape(T, G, -1).astype(F64)
    wa = np.asarray(inputs["wo_a"]).astype(np.float32).astype(F64)
    o_r = np.einsum("tgk,grk->tgr", x, wa)
    np.testing.assert_allclose(st["o_r"], o_r, rtol=1e-5, atol=1e-7 * np.abs(o_r).max())
    amax = np.maximum(np.abs(st["o_r"]).max(axis=-1), f32(1e-4))
    sq = (f32(1) / amax) * f32(127)
    assert same_bits(st["sdq"], f32(1) / sq)
    assert same_bits(st["q8"], np.rint(st["o_r"] * sq[..., None]).astype(np.int8))
    acc = np.zeros((T, D), np.float32)
    wb = np.asarray(inputs["wo_b"]).astype(np.int64)
    for g in range(G):
        p = st["q8"][:, g].astype(np.int64) @ wb[:, g * OL:(g + 1) * OL].T
        acc = acc + p.astype(np.float32) * st["sdq"][:, g:g + 1]
    assert same_bits(out["attn_out"].astype(np.float32),
                     bf16_bits(acc * np.asarray(inputs["wo_b_scale"]).astype(np.float32)))


# ========================================================= index validation

def test_prefill_index_errors():
    T = 8
    good = micro_prefill([WIN + 2, -1, 5, WIN + 7, WIN + T + 20, WIN + T + 48, 7], 6)
    G_.prefill_sparse_attn(**good, config=CFG)
    # the skip rules are not errors; nor is a -1 in an unused table slot
    G_.prefill_sparse_attn(**dict(good, cmp_block_table=np.array([2, 0, -1], np.int32)), config=CFG)
    with pytest.raises(ValueError,
                       match=r"ori_block_table\[0\] = -1 is outside \[0, 2\) \(pages of ori_kv\)"):
        G_.prefill_sparse_attn(**dict(good, ori_block_table=np.array([-1], np.int32)), config=CFG)
    with pytest.raises(ValueError, match=r"cmp_block_table\[1\] = 4 is outside \[0, 4\) .*"
                                         r"cmp_sparse_indices\[2, 4\] = 44"):
        G_.prefill_sparse_attn(**dict(good, cmp_block_table=np.array([2, 4, 3], np.int32)), config=CFG)
    # ring slot 10 with 8-row pages and a one-entry table: page 1 does not exist
    small = dict(good, ori_kv=bf(np.zeros((3, 8, 1, HD))), cmp_kv=bf(np.zeros((4, 8, 1, HD))))
    small["cmp_sparse_indices"] = good["cmp_sparse_indices"].copy()
    small["cmp_sparse_indices"][2, 1] = 10
    with pytest.raises(ValueError, match=r"cmp_sparse_indices\[2, 1\] = 10 addresses ring page 1 "
                                         r">= ori_block_table width 1"):
        G_.prefill_sparse_attn(**small, config=CFG)
    # the first bad position is named
    two = dict(good, ori_block_table=np.array([9], np.int32))
    two["cmp_sparse_indices"] = good["cmp_sparse_indices"].copy()
    two["cmp_sparse_indices"][1, :2] = [3, 4]
    two["cmp_sparse_lens"] = good["cmp_sparse_lens"].copy()
    two["cmp_sparse_lens"][1] = 2
    with pytest.raises(ValueError, match=r"ori_block_table\[0\] = 9 .* cmp_sparse_indices\[1, 0\] = 3"):
        G_.prefill_sparse_attn(**two, config=CFG)
    for n in (-1, T + 1):
        with pytest.raises(ValueError, match="num_tokens"):
            G_.prefill_sparse_attn(**dict(good, num_tokens=n), config=CFG)
    # nothing is written before the check
    buf = np.full((T, D), 3, BF16)
    with pytest.raises(ValueError):
        G_.prefill_sparse_attn(**dict(good, ori_block_table=np.array([5], np.int32)), config=CFG,
                               attn_out=buf)
    assert (buf.astype(np.float32) == 3).all()


def test_decode_index_errors():
    B, caches = micro_decode()
    idx = rows((3, [7, WIN, WIN + 1 + 44]), K=WIN + 32, T=B)
    d = decode(B, 1, idx, **caches)
    G_.decode_sparse_attn(**d, config=CFG)
    bad = dict(d, ori_block_table=np.array([[2], [3], [0], [-1]], np.int32))
    with pytest.raises(ValueError, match=r"ori_block_table\[3, 0\] = -1 is outside \[0, 4\) "
                                         r"\(pages of ori_kv\)"):
        G_.decode_sparse_attn(**bad, config=CFG)
    bad = dict(d, cmp_block_table=np.array([[0, 1, 2, 3]] * 3 + [[9, 5, 16, 2]], np.int32))
    with pytest.raises(ValueError, match=r"cmp_block_table\[3, 2\] = 16 is outside \[0, 16\) "
                                         r"\(pages of cmp_kv\)"):
        G_.decode_sparse_attn_hca(
            **dict(bad, cmp_sparse_indices=rows((3, [7, WIN, WIN + 1 + 44]), K=384, T=B)), config=CFG)
    big = idx.copy()
    big[3, 5] = WIN + 1 + 4 * 16                       # compressed page 4 of a 4-wide table
    with pytest.raises(ValueError, match=r"cmp_sparse_indices\[3, 5\] = 81 addresses compressed "
                                         r"page 4 >= cmp_block_table width 4"):
        G_.decode_sparse_attn(**dict(d, cmp_sparse_indices=big), config=CFG)
    # a -1 in a table slot no index reaches is legal; raw < 0 is just invalid
    ok = dict(d, cmp_block_table=np.array([[-1] * 4] * 3 + [[9, 5, 14, -1]], np.int32))
    ok["cmp_sparse_indices"] = idx.copy()
    ok["cmp_sparse_indices"][0, :3] = [-5, -1, -100]
    G_.decode_sparse_attn(**ok, config=CFG)
    # T must be a multiple of B
    with pytest.raises(ValueError, match=r"T = 4 .* B = 3"):
        G_.decode_sparse_attn(**dict(d, ori_block_table=np.array([[0], [1], [2]], np.int32)), config=CFG)
    # SWA: compressed indices are ignored, not checked; ring pages are
    s = swa_args(decode(B, 1, rows((3, [7, WIN, 10**6]), K=WIN, T=B), **caches))
    G_.decode_sparse_attn_swa(**s, config=CFG)
    with pytest.raises(ValueError, match=r"ori_block_table\[3, 0\] = 4 is outside \[0, 4\)"):
        G_.decode_sparse_attn_swa(**dict(s, ori_block_table=np.array([[0], [1], [2], [4]], np.int32)),
                                  config=CFG)
    with pytest.raises(ValueError, match=r"T = 4 .* B = 3"):
        G_.decode_sparse_attn_swa(**dict(s, ori_block_table=np.array([[0], [1], [2]], np.int32)),
                                  config=CFG)


def test_swa_refuses_more_than_128_tokens():
    inputs = dsv4.specs.decode_sparse_attn_swa(B=2, S=65, seed=1, config=CFG)
    with pytest.raises(ValueError, match=r"T = 130 .*\(T <= 128\)"):
        G_.decode_sparse_attn_swa(**inputs, config=CFG)
    inputs = dsv4.specs.decode_sparse_attn_swa(B=2, S=64, seed=1, config=CFG)
    G_.decode_sparse_attn_swa(**inputs, config=CFG)


# ====================================================================== builders

def test_prefill_fixture():
    for ratio, last_len in ((4, 160), (128, 129), (0, 128)):
        d = dsv4.specs.prefill_sparse_attn(T=128, compress_ratio=ratio)
        idx, lens = d["cmp_sparse_indices"], d["cmp_sparse_lens"]
        assert idx.shape == (128, 640) and lens[127] == last_len and d["num_tokens"] == 128
        for t in (0, 50, 103, 127):
            n_c = 0 if ratio == 0 else min(dsv4.FLASH.index_topk, 128 // ratio, (t + 1) // ratio)
            want = np.concatenate([128 + np.arange(t + 1), 256 + np.arange(n_c)])
            assert np.array_equal(idx[t, :lens[t]], want) and (idx[t, lens[t]:] == -1).all()
        assert d["ori_kv"].shape == (1, 128, 1, 512) and d["cmp_kv"].shape == (256, 128, 1, 512)
        assert np.array_equal(d["cmp_block_table"], np.arange(32))
        cos, sin = dsv4.rope_tables(dsv4.FLASH, ratio)
        assert same_bits(d["freqs_cos"], cos[:128]) and same_bits(d["freqs_sin"], sin[:128])
    q = np.asarray(d["q"]).astype(np.float32)
    assert np.abs(q).max() <= 0.0251 and q.std() > 0.01          # (U - 0.5) * 0.05, bf16
    with pytest.raises(ValueError, match=r"\{0, 4, 128\}"):
        dsv4.specs.prefill_sparse_attn(T=8, compress_ratio=16)
    d = dsv4.specs.prefill_sparse_attn(T=16, compress_ratio=4, num_tokens=10, config=CFG)
    assert (d["cmp_sparse_lens"][10:] == 0).all() and (d["cmp_sparse_indices"][10:] == -1).all()


def test_weight_quantisation_per_row():
    d = dsv4.specs.decode_sparse_attn(B=2, S=1, seed=5, config=CFG)
    wb, sc = np.asarray(d["wo_b"]), d["wo_b_scale"]
    assert wb.shape == (D, G * OL) and wb.dtype == np.int8 and sc.shape == (D,)
    assert (np.abs(wb.astype(np.int32)).max(axis=1) == 127).all()
    assert d["wo_a"].shape == (G, OL, 2 * HD) and d["wo_a"].dtype == BF16
    assert np.abs(np.asarray(d["wo_a"]).astype(np.float32)).max() <= 0.5 / 16


def test_decode_fixtures():
    flash = dsv4.FLASH
    csa = dsv4.specs.decode_sparse_attn(B=2, S=1, compress_ratio=4, seed=1, config=CFG_W)
    idx = csa["cmp_sparse_indices"]
    assert idx.shape == (2, 640) and (idx[:, :128] == np.arange(128)).all()
    assert (idx[:, 128:] == 129 + np.arange(512)).all() and (csa["valid_block_mask"] == 1).all()
    short = dsv4.specs.decode_sparse_attn(B=2, S=1, short_window=True, seed=1, config=CFG_W)
    assert (short["cmp_sparse_indices"][:, :17] == np.arange(17)).all()
    assert (short["cmp_sparse_indices"][:, 17:] == -1).all()
    assert (short["valid_block_mask"] == [1, 0, 0, 0, 0]).all()
    ov = dsv4.specs.decode_sparse_attn(B=2, S=1, overlay_replacement=True, seed=1, config=CFG_W)
    assert list(ov["cmp_sparse_indices"][0, :18]) == list(range(16)) + [128, -1]
    o = np.asarray(ov["mtp_kv_overlay"]).astype(np.float32)
    assert (o[:, 0] == 4).all() and not o[:, 1:].any()
    cr = dsv4.specs.decode_sparse_attn(B=2, S=1, compress_ratio=0, causal_regression=True, seed=1,
                                       config=CFG_W)
    assert (np.asarray(cr["q"][0]).astype(np.float32) == 1).all()
    assert (np.asarray(cr["ori_kv"][0, 127, 0]).astype(np.float32) == 8).all()

    hca = dsv4.specs.decode_sparse_attn_hca(B=2, S=1, seed=1, config=CFG_W)
    idx = hca["cmp_sparse_indices"]
    assert idx.shape == (2, 384) and (idx[:, 128] == -1).all()
    cv = flash.max_position_embeddings // 128
    assert (idx[:, 129:129 + cv] == 129 + np.arange(cv)).all() and (idx[:, 129 + cv:] == -1).all()
    hov = dsv4.specs.decode_sparse_attn_hca(B=2, S=1, overlay_replacement=True, seed=1, config=CFG_W)
    assert hov["cmp_sparse_indices"][0, 16] == -1 and hov["cmp_sparse_indices"][0, 128] == 128
    R2 = R // 2
    for start in (0, 8192):
        h = dsv4.specs.decode_sparse_attn_hca(B=2, S=1, start_pos=start, seed=1, config=CFG_W)
        ang = (f32(R2 * (start + 1) + 3) * f32(1e-3)).astype(F64)
        assert h["freqs_cos"][1, 3] == bf(np.cos(ang)) and h["freqs_sin"][1, 3 + R2] == bf(np.sin(ang))

    swa = dsv4.specs.decode_sparse_attn_swa(B=2, S=2, overlay_replacement=True, seed=1, config=CFG_W)
    assert swa["cmp_sparse_indices"].shape == (4, 128) and swa["win_bias"].shape == (4, 256)
    zero = swa["win_bias"] == 0
    assert (zero[:, :16]).all() and not zero[:, 16:128].any()
    assert [list(np.flatnonzero(zero[t, 128:])) for t in range(4)] == [[0], [0], [2], [2]]
    assert "cmp_kv" in swa and "cmp_block_table" in swa

    at = dsv4.specs.decode_sparse_attn(B=2, S=1, start_pos=8192, seed=1, config=CFG_W)
    cos, _ = dsv4.rope_tables(CFG_W, 4)
    assert same_bits(at["freqs_cos"], cos[8192:8194])
    assert same_bits(at["q"], csa["q"])
    again = dsv4.specs.decode_sparse_attn(B=2, S=1, compress_ratio=4, seed=1, config=CFG_W)
    other = dsv4.specs.decode_sparse_attn(B=2, S=1, compress_ratio=4, seed=2, config=CFG_W)
    assert same_bits(again["cmp_kv"], csa["cmp_kv"]) and not same_bits(other["cmp_kv"], csa["cmp_kv"])
    assert csa["ori_kv"].shape == (2, 128, 1, HD) and csa["cmp_kv"].shape == (64, 128, 1, HD)
    assert (csa["cmp_block_table"] == np.arange(64).reshape(2, 32)).all()


@pytest.mark.parametrize("kernel", ["prefill_sparse_attn", "decode_sparse_attn",
                                    "decode_sparse_attn_hca", "decode_sparse_attn_swa"])
def test_stages_and_output_buffer(kernel):
    params = {"prefill_sparse_attn": dict(T=8)}.get(kernel, dict(B=2, S=2))
    inputs = getattr(dsv4.specs, kernel)(**params, seed=9, config=CFG)
    fn = getattr(G_, kernel)
    out = fn(**inputs, config=CFG, stages=True)
    T = out["attn_out"].shape[0]
    st = out["stages"]
    assert (st["O"].dtype, st["O"].shape) == (np.float32, (T, H, HD))
    assert (st["Ob"].dtype, st["o_r"].shape, st["q8"].dtype, st["sdq"].shape) == \
        (BF16, (T, G, OL), np.int8, (T, G))
    buf = np.zeros((T, D), BF16)
    again = fn(**inputs, config=CFG, attn_out=buf)
    assert again["attn_out"] is buf and same_bits(buf, out["attn_out"])
    assert "stages" not in again
    assert set(dsv4.specs.COMPARATORS[kernel]) == {"attn_out"} and dsv4.specs.CASES[kernel]
