"""The KV-compressor goldens (spec chapter 04 §4.2-§4.7, §4.11), checked on a small model
(D = 256, head dim 64, RoPE 16; FLASH's max_position_embeddings, pages and tables)
against a float64 re-derivation written here: the projections of every token are
recomputed in float64 and each compressed row is rebuilt from the positions its window
should contain, addressed by the spec's literal row numbers, never by the golden's own
state. On top of the worked examples of §4.11 this covers what pypto-lib's fixtures do
not: warm states, windows completing inside and across calls, rolling state pools that
wrap, decode steps against one prefill chunk, in-place updates, and calls that must
raise before writing anything.

Only the pooling tests call dsv4.golden.numerics (its softmax_pool helpers are what
they test); bf16 rounding is done here on the bit pattern.
"""
import dataclasses
import re

import ml_dtypes
import numpy as np
import pytest

import dsv4
from conftest import same_bits
from dsv4.compare import ratio_allclose
from dsv4.golden import numerics
from dsv4.specs import compressor as SC

BF16 = np.dtype(ml_dtypes.bfloat16)
f32 = np.float32
F64 = np.float64
NEG = f32(-3.4028234663852886e38)

CFG = dataclasses.replace(dsv4.FLASH, hidden_size=256, head_dim=64, qk_rope_head_dim=16)
D, HD, RD = 256, 64, 16
ND = HD - RD
EPS = 1e-6
MAXS = 16384

G = dsv4.golden
S = dsv4.specs


# ------------------------------------------------------------------ own rounding

def bf16_bits(x):
    """fp32 -> bf16 (round to nearest even on the bit pattern) -> fp32."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    return r.view(np.float32)


def wide(a):
    return np.asarray(a).astype(np.float32).astype(F64)


def rand_x(seed, shape, lo=0.0, hi=1.0):
    v = np.random.default_rng(seed).uniform(lo, hi, shape).astype(np.float32)
    return v.astype(BF16)


# ------------------------------------------------------- float64 re-derivation

def ref_pool(rows):
    """rows: list of (kv [HD], score [HD]) or None (a missing row: weight 0). Exact softmax."""
    rows = [r for r in rows if r is not None]
    kv = np.stack([wide(k) for k, _ in rows])
    sc = np.stack([wide(s) for _, s in rows])
    w = np.exp(sc - sc.max(axis=0))
    return (kv * w).sum(axis=0) / w.sum(axis=0)


def ref_finish(v, gamma, cos_row, sin_row):
    """RMSNorm with gamma, then interleaved RoPE on the last RD dims (float64)."""
    y = v / np.sqrt((v * v).mean() + EPS) * wide(gamma)
    a, b = y[ND::2].copy(), y[ND + 1::2].copy()
    c, s = wide(cos_row)[:RD // 2], wide(sin_row)[:RD // 2]
    y[ND::2], y[ND + 1::2] = a * c - b * s, a * s + b * c
    return y


class Tokens:
    """Float64 projections of every token fed so far, by absolute position."""

    def __init__(self, ins, R):
        self.wkv, self.wgate, self.ape, self.R = wide(ins["wkv"]), wide(ins["wgate"]), \
            wide(ins["ape"]), R
        self.K, self.Gp = {}, {}

    def add(self, x_row, p):
        x = wide(x_row)
        self.K[p] = self.wkv @ x
        self.Gp[p] = self.wgate @ x + self.ape[p % self.R]

    def half(self, p, back):
        """(kv, score) of position p: the front or back half (ratio 4) or the whole row."""
        if p not in self.K:
            return None
        sl = slice(HD, 2 * HD) if back else slice(0, HD)
        if self.R == 128:
            sl = slice(0, HD)
        return self.K[p][sl], self.Gp[p][sl]

    def entry(self, wp, gamma, table, rope_row=None, missing=None):
        """The compressed row of the window ending at wp, from the tokens' own projections."""
        R = self.R
        cur = wp + 1 - R
        rows = []
        if R == 4:
            rows += [self.half(q, False) if q >= 0 else None for q in range(cur - 4, cur)]
            rows += [self.half(q, True) for q in range(cur, wp + 1)]
        else:
            rows += [self.half(q, False) if q not in (missing or {}) else missing[q]
                     for q in range(cur, wp + 1)]
        cos_t, sin_t = table
        r = cur if rope_row is None else rope_row
        return ref_finish(ref_pool(rows), gamma, cos_t[r], sin_t[r])


def close_f32(actual, ref, rtol=1e-4, atol=1e-5):
    np.testing.assert_allclose(np.asarray(actual, F64), ref, rtol=rtol, atol=atol)


def close_bf16(actual, ref):
    """A bf16 row against a float64 one: within one bf16 step (plus a hair)."""
    a = np.asarray(actual).astype(np.float32).astype(F64)
    np.testing.assert_allclose(a, ref, rtol=2.0 ** -8, atol=1e-6)


def snapshot(*arrays):
    return [a.copy() for a in arrays]


# ---------------------------------------------------------------- decode helpers

PAGE = {4: 4, 128: 8}


def set_positions(ins, R, positions):
    """Per-request positions with pypto-lib's metadata (state rows through the builder's
    table, compressed rows through its cmp table, RoPE rows at the window starts)."""
    B = len(positions)
    pos = np.array(positions, np.int32)[:, None]
    ins["position_ids"] = pos
    ins["state_slot_mapping"] = SC.state_slot_mapping(pos, ins["compress_state_block_table"],
                                                      PAGE[R])
    cmp_table = SC.block_table(B, 32, 32, permuted=R == 128)
    ins["cmp_slot_mapping"] = SC.compressed_slot_mapping(pos, cmp_table, R)
    cos_t, sin_t = dsv4.rope_tables(CFG, R)
    rows = pos[:, 0] - pos[:, 0] % R
    ins["cos"] = cos_t[rows, :RD // 2].astype(np.float32)
    ins["sin"] = sin_t[rows, :RD // 2].astype(np.float32)
    return ins


def decode_call(kernel, ins, state, cache, positions, x, **kw):
    R = 4 if kernel.endswith("ratio4") else 128
    step = set_positions(dict(ins), R, positions)
    step["x"] = x
    step["compress_state"], step["cmp_kv_cache"] = state, cache
    return getattr(G, kernel)(**step, config=CFG, **kw), step


def rope_table(R):
    cos_t, sin_t = dsv4.rope_tables(CFG, R)
    return cos_t.astype(np.float32), sin_t.astype(np.float32)


# ============================================================ §4.11.1 decode example

def test_decode_worked_example_two_calls():
    """§4.11.1: request 0, positions 0..5 already in the state; call A at 6 only writes
    state row 6; call B at 7 writes row 7 and pools rows 0..3 (front) and 4..7 (back) into
    compressed row 1 with RoPE position 4; position 11 pools rows 4..7 front, 8..11 back."""
    ins = S.decode_compressor_ratio4(B=1, start_pos=0, config=CFG)
    state, cache = ins["compress_state"], ins["cmp_kv_cache"]
    tok = Tokens(ins, 4)
    table = rope_table(4)
    for p in range(6):
        x = rand_x(100 + p, (1, 1, D))
        tok.add(x[0, 0], p)
        decode_call("decode_compressor_ratio4", ins, state, cache, [p], x)

    # call A: position 6
    x = rand_x(106, (1, 1, D))
    tok.add(x[0, 0], 6)
    before_state, before_cache = snapshot(state, cache)
    out, step = decode_call("decode_compressor_ratio4", ins, state, cache, [6], x)
    assert step["state_slot_mapping"][0, 0] == 6 and step["cmp_slot_mapping"][0, 0] == -1
    changed = np.argwhere((state != before_state).any(axis=2))
    assert changed.tolist() == [[1, 2]]                       # page 1, intra 2 = flat row 6
    row6 = state.reshape(-1, 4 * HD)[6]
    close_f32(row6[:2 * HD], tok.K[6], rtol=1e-5)
    close_f32(row6[2 * HD:], tok.Gp[6], rtol=1e-5)            # G + ape[2]
    assert not out["kv"].any()
    assert same_bits(cache, before_cache)

    # call B: position 7
    x = rand_x(107, (1, 1, D))
    tok.add(x[0, 0], 7)
    before_cache = cache.copy()
    out, step = decode_call("decode_compressor_ratio4", ins, state, cache, [7], x)
    assert step["state_slot_mapping"][0, 0] == 7 and step["cmp_slot_mapping"][0, 0] == 1
    flat = state.reshape(-1, 4 * HD)
    close_f32(flat[7, 2 * HD:], tok.Gp[7], rtol=1e-5)         # G + ape[3]
    # the pool from the spec's literal rows: 0..3 front (kv [0,HD), score [2HD,3HD)),
    # 4..7 back (kv [HD,2HD), score [3HD,4HD))
    rows = [(flat[r, :HD], flat[r, 2 * HD:3 * HD]) for r in range(4)]
    rows += [(flat[r, HD:2 * HD], flat[r, 3 * HD:]) for r in range(4, 8)]
    cos_t, sin_t = table
    assert same_bits(step["cos"][0], cos_t[4, :RD // 2])
    ref = ref_finish(ref_pool(rows), ins["norm_w"], cos_t[4], sin_t[4])
    close_f32(out["kv"][0, 0], ref)
    close_f32(out["kv"][0, 0], tok.entry(7, ins["norm_w"], table))
    assert same_bits(cache[0, 1, 0].astype(np.float32), bf16_bits(out["kv"][0, 0]))
    changed = np.argwhere((cache != before_cache).any(axis=(2, 3)))
    assert changed.tolist() == [[0, 1]]
    # the cold first window (position 3): no previous window, back halves of 0..3
    close_bf16(cache[0, 0, 0], tok.entry(3, ins["norm_w"], table))

    # continue to position 11: window 2 = front halves of 4..7, back halves of 8..11
    for p in range(8, 12):
        x = rand_x(100 + p, (1, 1, D))
        tok.add(x[0, 0], p)
        out, _ = decode_call("decode_compressor_ratio4", ins, state, cache, [p], x)
    rows = [(flat[r, :HD], flat[r, 2 * HD:3 * HD]) for r in range(4, 8)]
    rows += [(flat[r, HD:2 * HD], flat[r, 3 * HD:]) for r in range(8, 12)]
    ref = ref_finish(ref_pool(rows), ins["norm_w"], cos_t[8], sin_t[8])
    close_f32(out["kv"][0, 0], ref)
    close_f32(out["kv"][0, 0], tok.entry(11, ins["norm_w"], table))
    close_bf16(cache[0, 2, 0], ref)


def test_decode_worked_example_rolling_pool():
    """§4.11.1, position 8195: logical page 2048 -> physical 33 -> row 135; the previous
    window is rows 128..131, the current one rows 132..135; compressed slot 2048 is flat
    row 2048."""
    ins = S.decode_compressor_ratio4(B=1, start_pos=8195, history=True, config=CFG)
    assert ins["state_slot_mapping"][0, 0] == 135
    assert ins["cmp_slot_mapping"][0, 0] == 2048
    state, cache = ins["compress_state"], ins["cmp_kv_cache"]
    flat = state.reshape(-1, 4 * HD)
    # history filled exactly rows 128..134 (positions 8188..8194)
    filled = np.flatnonzero((flat[:, :2 * HD] != 0).any(axis=1))
    assert filled.tolist() == list(range(128, 135))
    x = ins["x"]
    out = G.decode_compressor_ratio4(**ins, config=CFG)
    tok = Tokens(ins, 4)
    tok.add(x[0, 0], 8195)
    close_f32(flat[135, :2 * HD], tok.K[8195], rtol=1e-5)
    rows = [(flat[r, :HD], flat[r, 2 * HD:3 * HD]) for r in range(128, 132)]
    rows += [(flat[r, HD:2 * HD], flat[r, 3 * HD:]) for r in range(132, 135)]
    rows += [tok.half(8195, True)]
    cos_t, sin_t = rope_table(4)
    ref = ref_finish(ref_pool(rows), ins["norm_w"], cos_t[8192], sin_t[8192])
    close_f32(out["kv"][0, 0], ref)
    close_bf16(cache[16, 0, 0], ref)                          # flat row 2048 = block 16, row 0


# ============================================================ §4.11.2 prefill example

def test_prefill_worked_example_two_chunks():
    """§4.11.2: chunk 1 = positions 0..5 (num_tokens 6) writes compressed row 0 from the
    back halves of tokens 0..3 and state rows 12..15, 80, 81; chunk 2 = positions 6..9
    pools state rows 12..15 (front), 80, 81 (back) and its tokens 0, 1 (back) into
    compressed row 1 with RoPE row 4, then writes state rows 82, 83, 148, 149."""
    ins = S.prefill_compressor_ratio4(T=8, start_pos=0, num_tokens=6, config=CFG)
    assert ins["cmp_slot_mapping"][:6].tolist() == [-1, -1, -1, 0, -1, -1]
    assert ins["state_slot_mapping"][:6].tolist() == [12, 13, 14, 15, 80, 81]
    # tokens 6, 7 lie beyond num_tokens: their (valid) mappings must be ignored entirely
    assert ins["cmp_slot_mapping"][7] == 1 and ins["state_slot_mapping"][7] == 83
    kvs, scs, cmp = ins["kv_state"], ins["score_state"], ins["cmp_kv"]
    tok = Tokens(ins, 4)
    for t in range(6):
        tok.add(ins["x"][t], t)
    G.prefill_compressor_ratio4(**ins, config=CFG)
    cos_t, sin_t = rope_table(4)
    ref0 = ref_finish(ref_pool([tok.half(q, True) for q in range(4)]), ins["norm_w"],
                      cos_t[0], sin_t[0])
    close_bf16(cmp[0, 0, 0], ref0)
    assert not cmp[0, 1:].astype(np.float32).any() and not cmp[1:].astype(np.float32).any()
    kf, sf = kvs.reshape(-1, 2 * HD), scs.reshape(-1, 2 * HD)
    written = [12, 13, 14, 15, 80, 81]
    assert np.flatnonzero(kf.any(axis=1)).tolist() == written
    assert np.flatnonzero(sf.any(axis=1)).tolist() == written
    for t, r in enumerate(written):
        close_f32(kf[r], tok.K[t], rtol=1e-5)
        close_f32(sf[r], tok.Gp[t], rtol=1e-5)

    # chunk 2; score of state row 12 (position 0, front) raised so that slot 0 dominates
    sf[12, :HD] += f32(3.0)
    c2 = S.prefill_compressor_ratio4(T=4, start_pos=6, config=CFG)
    assert c2["cmp_slot_mapping"].tolist() == [-1, 1, -1, -1]
    assert c2["state_slot_mapping"].tolist() == [82, 83, 148, 149]
    c2["x"] = rand_x(7, (4, D), -0.05, 0.05)
    c2.update(kv_state=kvs, score_state=scs, cmp_kv=cmp)
    for t in range(4):
        tok.add(c2["x"][t], 6 + t)
    before = kf[[12, 13, 14, 15, 80, 81]].copy(), sf[[12, 13, 14, 15, 80, 81]].copy()
    G.prefill_compressor_ratio4(**c2, config=CFG)
    rows = [(kf[r, :HD], sf[r, :HD]) for r in (12, 13, 14, 15)]
    rows += [(kf[r, HD:], sf[r, HD:]) for r in (80, 81)]
    rows += [tok.half(6, True), tok.half(7, True)]
    ref1 = ref_finish(ref_pool(rows), ins["norm_w"], cos_t[4], sin_t[4])
    close_bf16(cmp[0, 1, 0], ref1)
    # the boost matters (slot 0 is read): without it the row is measurably different
    plain = ref_finish(ref_pool([(wide(k), wide(s) - (3.0 if i == 0 else 0.0))
                                 for i, (k, s) in enumerate(rows)]),
                       ins["norm_w"], cos_t[4], sin_t[4])
    assert np.abs(plain - ref1).max() > 1e-2
    assert np.flatnonzero(kf.any(axis=1)).tolist() == [12, 13, 14, 15, 80, 81, 82, 83, 148, 149]
    for t, r in enumerate([82, 83, 148, 149]):
        close_f32(kf[r], tok.K[6 + t], rtol=1e-5)
        close_f32(sf[r], tok.Gp[6 + t], rtol=1e-5)
    assert same_bits(kf[[12, 13, 14, 15, 80, 81]], before[0])
    assert same_bits(sf[[12, 13, 14, 15, 80, 81]], before[1])
    assert not cmp[0, 2:].astype(np.float32).any()


def test_prefill_flag_decides_and_window0_skips_front():
    """Q11 / §4.2.4: in prefill the mapping alone asks for an entry. A token flagged at
    wp = 5 (not a window end) pools the window 2..5; being window 0 (wp < 7) its front
    slots are skipped although chunk tokens 0, 1 fall into them, so only the back halves
    of positions 2..5 count, rotated with RoPE row 2."""
    ins = S.prefill_compressor_ratio4(T=8, start_pos=0, config=CFG)
    ins["cmp_slot_mapping"][:] = -1
    ins["cmp_slot_mapping"][5] = 9
    G.prefill_compressor_ratio4(**ins, config=CFG)
    tok = Tokens(ins, 4)
    for t in range(8):
        tok.add(ins["x"][t], t)
    cos_t, sin_t = rope_table(4)
    ref = ref_finish(ref_pool([tok.half(q, True) for q in range(2, 6)]), ins["norm_w"],
                     cos_t[2], sin_t[2])
    close_bf16(ins["cmp_kv"][0, 9, 0], ref)
    with_front = ref_finish(ref_pool([tok.half(q, False) for q in (0, 1)]
                                     + [tok.half(q, True) for q in range(2, 6)]),
                            ins["norm_w"], cos_t[2], sin_t[2])
    assert np.abs(with_front - ref).max() > 1e-2
    assert np.flatnonzero(ins["cmp_kv"].astype(np.float32).any(axis=(2, 3)).ravel()).tolist() == [9]


def test_prefill128_flag_off_boundary_uses_slot_p_mod_128():
    """§4.7 step 2.3 taken literally for a token flagged off a window end (wp = 200, chunk
    100..227): slot i first holds the state row of position 73 + i, then chunk tokens
    p <= wp overwrite slot p mod 128. So slots 0..72 hold tokens 128..200, slots 73..99
    the (zero, never written) state rows of positions 146..172, slots 100..127 tokens
    100..127; the history rows 73..99 are overwritten and drop out."""
    ins = S.prefill_compressor_ratio128(T=128, start_pos=100, config=CFG)
    ins["cmp_slot_mapping"][:] = -1
    ins["cmp_slot_mapping"][100] = 4
    G.prefill_compressor_ratio128(**ins, config=CFG)
    tok = Tokens(ins, 128)
    for t in range(128):
        tok.add(ins["x"][t], 100 + t)
    zero = (np.zeros(HD), np.zeros(HD))
    rows = [tok.half(q, False) for q in range(128, 201)] + [zero] * 27 \
        + [tok.half(q, False) for q in range(100, 128)]
    cos_t, sin_t = rope_table(128)
    close_bf16(ins["cmp_kv"][0, 4, 0], ref_finish(ref_pool(rows), ins["norm_w"], cos_t[73],
                                                  sin_t[73]))


def test_prefill128_overlay_has_no_lower_bound():
    """§4.7 step 2.3 / Q12: every chunk token with p <= wp lands in slot p mod 128, even one
    far before the window. Chunk positions [10, 254, 255], entry at 255 (window 128..255):
    token 10 replaces slot 10 (the state row of position 138); slot 125 (position 253,
    never written) stays (kv 0, score 0)."""
    ins = S.prefill_compressor_ratio128(T=3, start_pos=253, config=CFG)
    assert ins["cmp_slot_mapping"].tolist() == [-1, -1, 1]
    ins["position_ids"][0] = 10
    ins["state_slot_mapping"][0] = -1
    tbl = ins["compress_state_block_table"]
    kf, sf = ins["kv_state"].reshape(-1, HD), ins["score_state"].reshape(-1, HD)
    rows = []
    for q in range(128, 256):
        r = int(tbl[q // 8]) * 8 + q % 8
        rows.append((kf[r].copy(), sf[r].copy()))
    G.prefill_compressor_ratio128(**ins, config=CFG)
    tok = Tokens(ins, 128)
    for t, p in enumerate([10, 254, 255]):
        tok.add(ins["x"][t], p)
    rows[10], rows[126], rows[127] = tok.half(10, False), tok.half(254, False), tok.half(255, False)
    assert not rows[125][0].any()
    cos_t, sin_t = rope_table(128)
    close_bf16(ins["cmp_kv"][0, 1, 0], ref_finish(ref_pool(rows), ins["norm_w"], cos_t[128],
                                                  sin_t[128]))


def test_prefill_window_beyond_max_positions_is_missing():
    """§4.6 row(q) = -1 for q >= max_position_embeddings: a token flagged at wp = MAXS + 2
    pools positions MAXS-1 .. MAXS+2 without touching the state table past its end (those
    positions are chunk tokens, laid over the missing rows)."""
    ins = S.prefill_compressor_ratio4(T=4, start_pos=MAXS - 4, config=CFG)
    ins["position_ids"][:] = [MAXS - 1, MAXS, MAXS + 1, MAXS + 2]
    ins["cmp_slot_mapping"][:] = [-1, -1, -1, 7]
    ins["state_slot_mapping"][:] = -1
    kf, sf = ins["kv_state"].reshape(-1, 2 * HD), ins["score_state"].reshape(-1, 2 * HD)
    tbl = ins["compress_state_block_table"]
    front = []
    for q in range(MAXS - 5, MAXS - 1):       # the previous window: history 16379, zero rows
        r = int(tbl[q // 4]) * 4 + q % 4
        front.append((kf[r, :HD].copy(), sf[r, :HD].copy()))
    G.prefill_compressor_ratio4(**ins, config=CFG)
    tok = Tokens(ins, 4)
    for t in range(4):
        tok.add(ins["x"][t], MAXS - 1 + t)
    cos_t, sin_t = rope_table(4)
    ref = ref_finish(ref_pool(front + [tok.half(MAXS - 1 + t, True) for t in range(4)]),
                     ins["norm_w"], cos_t[MAXS - 1], sin_t[MAXS - 1])
    close_bf16(ins["cmp_kv"][0, 7, 0], ref)


# ============================================================ pooling numerics

def _pool_inputs(n, seed):
    rng = np.random.default_rng(seed)
    kv = rng.standard_normal((n, 48)).astype(np.float32)
    sc = (rng.standard_normal((n, 48)) * 3).astype(np.float32)
    sc[1, :8] = -np.inf
    sc[2, 8:16] = NEG
    sc[: n // 2, 16:24] = -np.inf
    return kv, sc


def _ref_cols(kv, sc, rows=None):
    rows = range(kv.shape[0]) if rows is None else rows
    out = np.empty(kv.shape[1])
    for c in range(kv.shape[1]):
        out[c] = ref_pool([(kv[r, c:c + 1], sc[r, c:c + 1]) if sc[r, c] > -1e38 else None
                           for r in rows])[0]
    return out


@pytest.mark.parametrize("n", [8, 128])
def test_softmax_pool_batch_form_vs_float64(n):
    kv, sc = _pool_inputs(n, n)
    got = numerics.softmax_pool(kv, sc)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, _ref_cols(kv, sc), rtol=2e-6, atol=2e-6)


def test_softmax_pool_batch_form_divides():
    """p = e / Z with Z summed row by row, a true division (§4.2.3): with one-hot kv rows
    the pool returns p itself, compared bit for bit with that formula; multiplying by
    1 / Z gives other bits in some of these columns."""
    rng = np.random.default_rng(5)
    sc = (rng.standard_normal((8, 4096)) * 2).astype(np.float32)
    e = np.exp((sc - sc.max(axis=0)).astype(F64)).astype(np.float32)
    z = e[0]
    for r in range(1, 8):
        z = z + e[r]
    for r in (0, 5):
        kv = np.zeros((8, 4096), np.float32)
        kv[r] = 1.0
        got = numerics.softmax_pool(kv, sc)
        assert same_bits(got, e[r] / z)
        assert (got != e[r] * (f32(1) / z)).any()


def test_softmax_pool_corner_cases():
    """§4.2.3: 4 x -inf + 4 x NEG -> weights 0, 0, 0, 0, 1/4, 1/4, 1/4, 1/4; all -inf -> NaN."""
    rng = np.random.default_rng(1)
    kv = rng.standard_normal((8, 16)).astype(np.float32)
    sc = np.full((8, 16), NEG, np.float32)
    sc[:4] = -np.inf
    got = numerics.softmax_pool(kv, sc)
    np.testing.assert_allclose(got, wide(kv[4:]).mean(axis=0), rtol=1e-6, atol=1e-7)
    assert np.isnan(numerics.softmax_pool(kv, np.full((8, 16), -np.inf, np.float32))).all()


@pytest.mark.parametrize("skip_front", [False, True])
def test_softmax_pool_online_vs_float64(skip_front):
    kv, sc = _pool_inputs(8, 11)
    sc[7] = np.abs(sc[7])                         # slot 7 (the completing token) is finite
    order = [7, 4, 5, 6] if skip_front else [7, 0, 1, 2, 3, 4, 5, 6]
    got = numerics.softmax_pool_online(kv, sc, order)
    np.testing.assert_allclose(got, _ref_cols(kv, sc, order), rtol=2e-6, atol=2e-6)


# ============================================================ multi-call properties

def test_decode_ratio4_steps_warm_and_wrapping_pool():
    """Two requests stepping through positions 0..23 and 248..271 over a state full of
    stale random rows: every compressed row equals the float64 pool of the window's
    positions, where positions written in this run contribute their tokens and the
    others whatever sits at the spec's literal row (65 b + (q // 4 mod 65)) * 4 + q mod 4.
    Positions 260..271 wrap onto the request's first physical page."""
    ins = S.decode_compressor_ratio4(B=2, start_pos=0, config=CFG)
    rng = np.random.default_rng(3)
    state = rng.standard_normal(ins["compress_state"].shape).astype(np.float32)
    stale = state.reshape(-1, 4 * HD).copy()
    cache = ins["cmp_kv_cache"]
    tok = [Tokens(ins, 4), Tokens(ins, 4)]
    table = rope_table(4)
    starts = [0, 248]

    def literal_row(b, q):
        return (65 * b + (q // 4) % 65) * 4 + q % 4

    checked = 0
    for i in range(24):
        pos = [s + i for s in starts]
        x = rand_x(500 + i, (2, 1, D))
        for b in range(2):
            tok[b].add(x[b, 0], pos[b])
        out, step = decode_call("decode_compressor_ratio4", ins, state, cache, pos, x)
        for b in range(2):
            p = pos[b]
            assert step["state_slot_mapping"][b, 0] == literal_row(b, p)
            if (p + 1) % 4:
                assert not out["kv"][b].any()
                continue
            rows = []
            for j, q in enumerate(range(p - 7, p + 1)):
                back = j >= 4
                if q < 0:
                    rows.append(None)
                elif q in tok[b].K:
                    rows.append(tok[b].half(q, back))
                else:
                    r = stale[literal_row(b, q)]
                    rows.append((r[HD:2 * HD], r[3 * HD:]) if back else (r[:HD], r[2 * HD:3 * HD]))
            cos_t, sin_t = table
            ref = ref_finish(ref_pool(rows), ins["norm_w"], cos_t[p - 3], sin_t[p - 3])
            close_f32(out["kv"][b, 0], ref)
            c = p // 4
            close_bf16(cache[32 * b + c // 128, c % 128, 0], ref)
            checked += 1
    assert checked == 12


def test_decode_ratio128_steps_wrapping_pool():
    """One request stepping 380..660 over stale random state rows: window 2 (256..383)
    pools 124 stale rows and 4 new ones, window 3 only new rows, window 4 (512..639) the
    new rows that wrapped onto the first 16 physical pages, in permuted order
    (64 b + (7 (q // 8 mod 64) + 3) mod 64) * 8 + q mod 8."""
    ins = S.decode_compressor_ratio128(B=1, start_pos=0, config=CFG)
    rng = np.random.default_rng(4)
    state = rng.standard_normal(ins["compress_state"].shape).astype(np.float32)
    stale = state.reshape(-1, 2 * HD).copy()
    cache = ins["cmp_kv_cache"]
    tok = Tokens(ins, 128)
    cos_t, sin_t = rope_table(128)

    def literal_row(q):
        return ((7 * ((q // 8) % 64) + 3) % 64) * 8 + q % 8

    done = []
    for p in range(380, 661):
        x = rand_x(900 + p, (1, 1, D))
        tok.add(x[0, 0], p)
        out, step = decode_call("decode_compressor_ratio128", ins, state, cache, [p], x)
        assert step["state_slot_mapping"][0, 0] == literal_row(p)
        if (p + 1) % 128:
            continue
        rows = [tok.half(q, False) if q in tok.K else
                (stale[literal_row(q), :HD], stale[literal_row(q), HD:])
                for q in range(p - 127, p + 1)]
        ref = ref_finish(ref_pool(rows), ins["norm_w"], cos_t[p - 127], sin_t[p - 127])
        close_f32(out["kv"][0, 0], ref)
        c = p // 128
        close_bf16(cache[(7 * 0 + 3) % 32, c, 0], ref)        # cmp block (7 * 0 + 3) mod 32
        done.append(p)
    assert done == [383, 511, 639]


CHUNKS4 = [(0, 6), (6, 4), (10, 21), (31, 1), (32, 9)]
CHUNKS128 = [(0, 100), (100, 60), (160, 128), (288, 100)]


@pytest.mark.parametrize("R,chunks", [(4, CHUNKS4), (128, CHUNKS128)])
def test_prefill_chunks_windows_inside_and_across_calls(R, chunks):
    """A request fed in chunks whose edges cut windows: after every chunk each
    compressed row written so far equals the float64 pool over the full token
    sequence (windows completing inside a chunk and across chunks alike)."""
    kernel = f"prefill_compressor_ratio{R}"
    ins = getattr(S, kernel)(T=8, start_pos=0, config=CFG)
    kvs, scs, cmp = ins["kv_state"], ins["score_state"], ins["cmp_kv"]
    tok = Tokens(ins, R)
    table = rope_table(R)
    entries = []
    for i, (sp, n) in enumerate(chunks):
        c = getattr(S, kernel)(T=n, start_pos=sp, config=CFG)
        c["x"] = rand_x(40 + i, (n, D), -0.05, 0.05)
        c.update(kv_state=kvs, score_state=scs, cmp_kv=cmp)
        for t in range(n):
            tok.add(c["x"][t], sp + t)
        getattr(G, kernel)(**c, config=CFG)
        entries += [p for p in range(sp, sp + n) if (p + 1) % R == 0]
        for wp in entries:
            close_bf16(cmp[0, wp // R, 0], tok.entry(wp, ins["norm_w"], table))
    assert len(entries) == (10 if R == 4 else 3)
    assert not cmp[0, len(entries):].astype(np.float32).any()


def _matching_decode_prefill(R, n_tokens, chunks):
    """Feed the same tokens through decode steps and through prefill chunks, with the
    prefill state table as the decode table of a single request."""
    P = S.prefill_compressor_ratio4 if R == 4 else S.prefill_compressor_ratio128
    Dk = S.decode_compressor_ratio4 if R == 4 else S.decode_compressor_ratio128
    pf = P(T=8, start_pos=0, config=CFG)
    kvs, scs, cmp = pf["kv_state"], pf["score_state"], pf["cmp_kv"]
    x_all = rand_x(77, (n_tokens, D), -0.5, 0.5)
    for sp, n in chunks:
        c = P(T=n, start_pos=sp, config=CFG)
        c["x"] = x_all[sp:sp + n]
        c.update(kv_state=kvs, score_state=scs, cmp_kv=cmp)
        getattr(G, f"prefill_compressor_ratio{R}")(**c, config=CFG)

    dc = Dk(B=1, start_pos=0, config=CFG)
    dc["compress_state_block_table"] = pf["compress_state_block_table"][None, :]
    NB, PG, OD = kvs.shape
    state = np.zeros((NB, PG, 2 * OD), np.float32)
    if R == 4:
        state[..., OD:] = NEG
    cache = np.zeros_like(dc["cmp_kv_cache"])
    kvs_out = {}
    for p in range(n_tokens):
        out, _ = decode_call(f"decode_compressor_ratio{R}", dc, state, cache, [p],
                             x_all[p][None, None])
        if (p + 1) % R == 0:
            kvs_out[p] = out["kv"][0, 0].copy()
    return kvs, scs, cmp, state, cache, kvs_out


@pytest.mark.parametrize("R,n_tokens,chunks", [(4, 40, [(0, 40)]),
                                               (128, 256, [(0, 128), (128, 128)])])
def test_decode_steps_equal_one_prefill(R, n_tokens, chunks):
    """§4.11.3. The state rows agree to fp32 rounding only: decode projects one token at a
    time, prefill a whole chunk, and BLAS orders the 256-term sums differently. The
    compressed rows agree within the cache comparator ratio_allclose(1e-4, 1/128, 0), not
    bitwise: ratio 4 pools in batch form in decode and by the online recurrence in
    prefill, and both ratios start from the slightly different projections. (Where a
    window has missing rows the paths differ by design: prefill ratio 128 scores them 0,
    decode -inf; these windows are complete.)"""
    kvs, scs, cmp, state, cache, kv_rows = _matching_decode_prefill(R, n_tokens, chunks)
    OD = kvs.shape[-1]
    kf, sf, st = kvs.reshape(-1, OD), scs.reshape(-1, OD), state.reshape(-1, 2 * OD)
    written = np.flatnonzero(kf.any(axis=1))
    assert len(written) == n_tokens
    assert same_bits(np.flatnonzero(st[:, :OD].any(axis=1)), written)
    np.testing.assert_allclose(st[written, :OD], kf[written], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(st[written, OD:], sf[written], rtol=1e-5, atol=1e-6)
    n_entries = n_tokens // R
    blk = 0 if R == 4 else 3                 # the decode cmp table of ratio 128 is permuted
    dec, pre = cache[blk, :, 0], cmp.reshape(-1, HD)
    assert np.flatnonzero(cache.astype(np.float32).any(axis=(1, 2, 3))).tolist() == [blk]
    res = ratio_allclose(atol=1e-4, rtol=1 / 128, max_error_ratio=0.0)(dec[:n_entries],
                                                                      pre[:n_entries])
    assert res.passed, str(res)
    assert pre[:n_entries].astype(np.float32).any(axis=1).all()
    assert not pre[n_entries:].astype(np.float32).any()
    assert not dec[n_entries:].astype(np.float32).any()
    # decode's fp32 rows round to (nearly) the prefill rows
    for p, row in kv_rows.items():
        close_bf16(pre[p // R], row.astype(F64))


# ============================================================ sentinels and in-place

def test_decode_negative_mappings_and_missing_pages():
    """state_slot_mapping -1: nothing written (the pool then reads the stale row);
    cmp_slot_mapping -1: no kv and no cache row, but the state row is written; a -1 table
    entry: the row is missing (kv 0, score -inf)."""
    ins = S.decode_compressor_ratio4(B=2, start_pos=7, history=True, config=CFG)
    state, cache = ins["compress_state"], ins["cmp_kv_cache"]
    flat = state.reshape(-1, 4 * HD)
    ins["state_slot_mapping"][0, 0] = -1
    ins["cmp_slot_mapping"][1, 0] = -1
    ins["compress_state_block_table"][0, 0] = -1               # positions 0..3 of request 0
    before = flat.copy()
    cache_before = cache.copy()
    out = G.decode_compressor_ratio4(**ins, config=CFG)
    r1 = 65 * 4 + 7
    assert np.flatnonzero((flat != before).any(axis=1)).tolist() == [r1]
    assert not out["kv"][1].any()
    assert same_bits(cache[32:], cache_before[32:])
    # request 0: rows 0..3 missing, rows 4..6 history, row 7 stale (NEG scores)
    rows = [None] * 4 + [(before[r, HD:2 * HD], before[r, 3 * HD:]) for r in (4, 5, 6)] + [None]
    cos_t, sin_t = rope_table(4)
    ref = ref_finish(ref_pool(rows), ins["norm_w"], cos_t[4], sin_t[4])
    close_f32(out["kv"][0, 0], ref)


def test_prefill128_missing_rows_score_zero():
    """Q2: a missing state row in a prefill ratio-128 window is (kv 0, score 0), so it
    takes weight e^-m; a chunk token at or beyond num_tokens is ignored even with
    indices that would be out of range."""
    ins = S.prefill_compressor_ratio128(T=8, start_pos=120, config=CFG)
    tbl = ins["compress_state_block_table"]
    tbl[0] = -1                                                # positions 0..7 missing
    ins["num_tokens"] = 7
    ins["position_ids"][7] = -5
    ins["cmp_slot_mapping"][7] = 10 ** 9
    ins["state_slot_mapping"][7] = 10 ** 9
    G.prefill_compressor_ratio128(**ins, config=CFG)
    # position 127 is token 7, beyond num_tokens: no entry at all
    assert not ins["cmp_kv"].astype(np.float32).any()

    # with half the columns of the history scored low, the 8 zero-score rows weigh
    # differently per column, which RMSNorm cannot normalise away
    ins2 = S.prefill_compressor_ratio128(T=8, start_pos=120, config=CFG)
    tbl = ins2["compress_state_block_table"]
    tbl[0] = -1
    kf, sf = ins2["kv_state"].reshape(-1, HD), ins2["score_state"].reshape(-1, HD)
    hist = {}
    for q in range(8, 120):
        r = int(tbl[q // 8]) * 8 + q % 8
        sf[r, :HD // 2] -= f32(4.0)
        hist[q] = (kf[r].copy(), sf[r].copy())
    G.prefill_compressor_ratio128(**ins2, config=CFG)
    tok = Tokens(ins2, 128)
    for t in range(8):
        tok.add(ins2["x"][t], 120 + t)
    zero = (np.zeros(HD), np.zeros(HD))
    missing = {q: zero for q in range(8)}
    missing.update(hist)
    cos_t, sin_t = rope_table(128)
    ref = tok.entry(127, ins2["norm_w"], (cos_t, sin_t), missing=missing)
    close_bf16(ins2["cmp_kv"][0, 0, 0], ref)
    # scoring the missing rows -inf instead gives a different row
    alt = dict(missing)
    for q in range(8):
        alt[q] = None
    assert np.abs(tok.entry(127, ins2["norm_w"], (cos_t, sin_t), missing=alt) - ref).max() > 1e-3


KERNELS = ["decode_compressor_ratio4", "decode_compressor_ratio128", "prefill_compressor_ratio4",
           "prefill_compressor_ratio128"]
INOUT = {"decode_compressor_ratio4": ("compress_state", "cmp_kv_cache"),
         "decode_compressor_ratio128": ("compress_state", "cmp_kv_cache"),
         "prefill_compressor_ratio4": ("kv_state", "score_state", "cmp_kv"),
         "prefill_compressor_ratio128": ("kv_state", "score_state", "cmp_kv")}


def _small_inputs(kernel, **kw):
    if kernel.startswith("decode"):
        return getattr(S, kernel)(B=8, config=CFG, **kw)
    return getattr(S, kernel)(T=128, start_pos=kw.pop("start_pos", 256), config=CFG, **kw)


@pytest.mark.parametrize("kernel", KERNELS)
def test_in_place_and_output_order(kernel):
    ins = _small_inputs(kernel)
    kw = {}
    if kernel.startswith("decode"):
        kw["kv"] = np.full((8, 1, HD), 7.0, np.float32)
    out = getattr(G, kernel)(**ins, config=CFG, **kw)
    names = list(out)
    pure = ["kv"] if kernel.startswith("decode") else []
    assert names == pure + list(INOUT[kernel])
    for n in INOUT[kernel]:
        assert out[n] is ins[n]
    if pure:
        assert out["kv"] is kw["kv"]
        assert (kw["kv"] != 7.0).all(axis=2).any() and (kw["kv"] == 0).all(axis=2).any()
    # something was written in each state / cache
    fresh = _small_inputs(kernel)
    for n in INOUT[kernel]:
        assert not same_bits(out[n], fresh[n]), n


def _decode_errors(R):
    NB = 8 * (65 if R == 4 else 64)
    page = 4 if R == 4 else 8
    # b = 7 sits at 511 (ratio 4) / 127 (ratio 128) and completes a window
    last_page = (511 - 7) // 4 if R == 4 else (127 - 127) // 8
    return [
        ("x must be \\[B, 1, D\\]",
         lambda d: d.update({k: np.repeat(d[k], 2, axis=1) for k in
                             ("x", "position_ids", "cmp_slot_mapping", "state_slot_mapping")})),
        ("position_ids\\[7, 0\\] = -1 is negative",
         lambda d: d["position_ids"].__setitem__((7, 0), -1)),
        (f"state_slot_mapping\\[7, 0\\] = {NB * page} is outside",
         lambda d: d["state_slot_mapping"].__setitem__((7, 0), NB * page)),
        (f"compress_state_block_table\\[7, {last_page}\\] = {NB} is outside",
         lambda d: d["compress_state_block_table"].__setitem__((7, last_page), NB)),
        ("cmp_slot_mapping\\[7, 0\\] = 32768 is outside",
         lambda d: d["cmp_slot_mapping"].__setitem__((7, 0), 256 * 128)),
    ]


def _prefill_errors(R):
    NB = MAXS // (4 if R == 4 else 8)
    page = 4 if R == 4 else 8
    wp = 383                                         # the last entry of the chunk 256..383
    first_read = (wp - 7) // 4 if R == 4 else (wp - 127) // 8

    def bad_table(d):
        d["compress_state_block_table"][first_read] = NB

    def early_flag(d):
        d["position_ids"][5] = R - 2
        d["cmp_slot_mapping"][5] = 3

    return [
        ("num_tokens = 129 must be an integer", lambda d: d.update(num_tokens=129)),
        ("position_ids\\[127\\] = -1 is negative",
         lambda d: d["position_ids"].__setitem__(127, -1)),
        (f"state_slot_mapping\\[127\\] = {NB * page} is outside",
         lambda d: d["state_slot_mapping"].__setitem__(127, NB * page)),
        ("cmp_slot_mapping\\[127\\] = 32768 is outside",
         lambda d: d["cmp_slot_mapping"].__setitem__(127, 256 * 128)),
        (f"cmp_slot_mapping\\[5\\] = 3 asks for a compressed entry at "
         f"position_ids\\[5\\] = {R - 2}", early_flag),
        (f"compress_state_block_table\\[{first_read}\\] = {NB} is outside", bad_table),
        ("needs RoPE row", lambda d: d.update(freqs_cos=d["freqs_cos"][:200],
                                              freqs_sin=d["freqs_sin"][:200])),
        ("score_state is updated in place but is read-only",
         lambda d: d["score_state"].setflags(write=False)),
    ]


ERRORS = ([("decode_compressor_ratio4", m, f) for m, f in _decode_errors(4)]
          + [("decode_compressor_ratio128", m, f) for m, f in _decode_errors(128)]
          + [("prefill_compressor_ratio4", m, f) for m, f in _prefill_errors(4)]
          + [("prefill_compressor_ratio128", m, f) for m, f in _prefill_errors(128)])


@pytest.mark.parametrize("kernel,message,mutate", ERRORS,
                         ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(ERRORS)])
def test_error_leaves_states_untouched(kernel, message, mutate):
    """A bad index anywhere (here: in the last request / token, after others that would
    already have written) raises ValueError naming tensor and position, and every state
    and cache comes back bit-identical; the decode kv buffer too."""
    ins = _small_inputs(kernel)
    mutate(ins)
    before = {n: ins[n].copy() for n in INOUT[kernel]}
    kw = {}
    if kernel.startswith("decode"):
        kw["kv"] = np.full((8, 1, HD), 3.0, np.float32)
    with pytest.raises(ValueError, match=re.compile(message)):
        getattr(G, kernel)(**ins, config=CFG, **kw)
    for n in INOUT[kernel]:
        assert same_bits(ins[n], before[n]), n
    if kw:
        assert (kw["kv"] == 3.0).all()


@pytest.mark.parametrize("kernel", KERNELS)
def test_state_of_wrong_dtype_is_a_type_error(kernel):
    """An in-place argument of another dtype cannot be updated in place: TypeError, and
    the other states stay untouched."""
    ins = _small_inputs(kernel)
    first, *rest = INOUT[kernel]
    ins[first] = ins[first].astype(np.float64)
    before = {n: ins[n].copy() for n in rest}
    with pytest.raises(TypeError, match=f"{first} is updated in place and must be a"):
        getattr(G, kernel)(**ins, config=CFG)
    for n in rest:
        assert same_bits(ins[n], before[n])


def test_prefill128_rejects_more_than_128_tokens():
    """Q12: pypto-lib lays chunk tokens over slot p mod 128 with no lower bound, right only
    for chunks of at most 128 tokens; longer chunks are refused before any write."""
    ins = S.prefill_compressor_ratio128(T=129, start_pos=0, config=CFG)
    before = {n: ins[n].copy() for n in INOUT["prefill_compressor_ratio128"]}
    with pytest.raises(ValueError, match="x has T = 129 rows"):
        G.prefill_compressor_ratio128(**ins, config=CFG)
    for n, v in before.items():
        assert same_bits(ins[n], v)
    ins = S.prefill_compressor_ratio4(T=200, start_pos=0, config=CFG)    # ratio 4: any T
    G.prefill_compressor_ratio4(**ins, config=CFG)
    assert ins["cmp_kv"][0, :50].astype(np.float32).any(axis=(1, 2)).all()


def test_positions_nothing_dereferences_are_not_errors():
    """Decision 1 checks what is dereferenced: a decode token beyond max_position_embeddings
    that completes no window (its APE row is p mod R) and a prefill token there whose state
    row is not written are accepted; the state row and cache stay as they were."""
    ins = S.decode_compressor_ratio4(B=1, start_pos=0, config=CFG)
    ins["position_ids"][0, 0] = MAXS + 1
    ins["state_slot_mapping"][0, 0] = -1
    before = ins["compress_state"].copy()
    out = G.decode_compressor_ratio4(**ins, config=CFG)
    assert not out["kv"].any() and same_bits(ins["compress_state"], before)
    ins = S.prefill_compressor_ratio4(T=8, start_pos=0, config=CFG)
    ins["position_ids"][6:] = [MAXS + 5, MAXS + 6]
    ins["cmp_slot_mapping"][6:] = -1
    ins["state_slot_mapping"][6:] = -1
    G.prefill_compressor_ratio4(**ins, config=CFG)
    assert ins["cmp_kv"][0, 0].astype(np.float32).any()


# ============================================================ fixtures

def test_decode_fixture_metadata_tables():
    """§4.3.5's tables of the default decode metadata, literally."""
    d4 = S.decode_compressor_ratio4(config=CFG)
    assert d4["position_ids"][:, 0].tolist() == [8192, 0, 3, 7, 127, 128, 255, 511]
    assert d4["state_slot_mapping"][:, 0].tolist() == [132, 260, 523, 787, 1167, 1428, 1815, 2071]
    assert d4["cmp_slot_mapping"][:, 0].tolist() == [-1, -1, 8192, 12289, 16415, -1, 24639, 28799]
    cos_t, _ = rope_table(4)
    assert same_bits(d4["cos"], cos_t[[8192, 0, 0, 4, 124, 128, 252, 508], :RD // 2])
    st = d4["compress_state"]
    assert not st[..., :2 * HD].any() and (st[..., 2 * HD:] == NEG).all()

    d128 = S.decode_compressor_ratio128(config=CFG)
    assert d128["position_ids"][:, 0].tolist() == [8192, 127, 128, 255, 7, 10, 8192, 127]
    assert d128["state_slot_mapping"][:, 0].tolist() == [24, 871, 1432, 1767, 2079, 2642, 3096,
                                                         3943]
    assert d128["cmp_slot_mapping"][:, 0].tolist() == [-1, 4480, -1, 12673, -1, -1, -1, 29056]
    cos_t, _ = rope_table(128)
    assert same_bits(d128["cos"], cos_t[[8192, 0, 128, 128, 0, 0, 8192, 0], :RD // 2])
    assert not d128["compress_state"].any()


def test_decode_fixture_pools_one_row():
    """Q1: on the cold ratio-4 fixture each compressing request pools only its own back
    half; non-compressing requests leave kv 0; untouched NEG scores stay NEG."""
    ins = S.decode_compressor_ratio4(config=CFG)
    out = G.decode_compressor_ratio4(**ins, config=CFG)
    tok = Tokens(ins, 4)
    cos_t, sin_t = rope_table(4)
    for b, p in enumerate(ins["position_ids"][:, 0].tolist()):
        if (p + 1) % 4:
            assert not out["kv"][b].any()
            continue
        tok.add(ins["x"][b, 0], p)
        ref = ref_finish(tok.K[p][HD:], ins["norm_w"], cos_t[p - 3], sin_t[p - 3])
        close_f32(out["kv"][b, 0], ref)
    flat = out["compress_state"].reshape(-1, 4 * HD)
    untouched = np.ones(len(flat), bool)
    untouched[ins["state_slot_mapping"][:, 0]] = False
    assert (flat[untouched, 2 * HD:] == NEG).all()


@pytest.mark.parametrize("R", [4, 128])
def test_prefill_fixture_history(R):
    """Prefill fixtures: zero states but for the SL positions before start_pos, drawn
    independently for kv_state and score_state; a compressed row at every window end."""
    P = S.prefill_compressor_ratio4 if R == 4 else S.prefill_compressor_ratio128
    SL = 8 if R == 4 else 128
    ins = P(T=128, start_pos=300, config=CFG)
    tbl = ins["compress_state_block_table"]
    assert tbl.tolist() == [(17 * j + 3) % tbl.shape[0] for j in range(tbl.shape[0])]
    pg = 4 if R == 4 else 8
    rows = sorted(int(tbl[q // pg]) * pg + q % pg for q in range(300 - SL, 300))
    kf = ins["kv_state"].reshape(-1, ins["kv_state"].shape[-1])
    sf = ins["score_state"].reshape(-1, ins["score_state"].shape[-1])
    assert np.flatnonzero(kf.any(axis=1)).tolist() == rows
    assert np.flatnonzero(sf.any(axis=1)).tolist() == rows
    assert not np.array_equal(kf[rows], sf[rows])
    assert np.abs(kf[rows]).max() <= 0.025
    p = ins["position_ids"].astype(np.int64)
    flagged = np.flatnonzero(ins["cmp_slot_mapping"] >= 0)
    assert flagged.tolist() == np.flatnonzero((p + 1) % R == 0).tolist()
    assert (ins["cmp_slot_mapping"][flagged] == p[flagged] // R).all()
    assert np.abs(ins["x"].astype(np.float32)).max() <= 0.0501       # bf16(-0.05) = -0.05005
    again = P(T=128, start_pos=300, config=CFG)
    other = P(T=128, start_pos=300, seed=1, config=CFG)
    assert same_bits(again["x"], ins["x"]) and not same_bits(other["x"], ins["x"])


def test_cases_build_and_run():
    """Every CASES entry builds (FLASH sizes) and its golden runs with finite outputs."""
    for kernel in KERNELS:
        for case, params in S.CASES[kernel].items():
            ins = getattr(S, kernel)(**params)
            out = getattr(G, kernel)(**ins)
            for n, v in out.items():
                assert np.isfinite(v.astype(np.float32)).all(), (kernel, case, n)
            assert set(out) == set(S.COMPARATORS[kernel]), kernel


@pytest.mark.parametrize("kernel", ["decode_compressor_ratio4", "decode_compressor_ratio128"])
def test_window_beyond_the_table_reads_missing_rows(kernel):
    # positions the state table does not cover (>= max_position_embeddings) are missing
    # rows (kv 0, score -inf) for the golden and the C kernel alike (spec 4.3.3); a ratio-128
    # window is then missing entirely, and the pooled row is NaN in both (4.2.3)
    R = 4 if kernel.endswith("4") else 128
    d = _small_inputs(kernel)
    d["position_ids"][7, 0] = MAXS + R - 1
    c = dsv4.KERNELS[kernel](**{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in d.items()},
                             config=CFG)
    g = getattr(dsv4.golden, kernel)(**{k: (v.copy() if isinstance(v, np.ndarray) else v)
                                        for k, v in d.items()}, config=CFG)
    for name in dsv4.specs.COMPARATORS[kernel]:
        a, b = np.asarray(c[name]).astype(np.float32), np.asarray(g[name]).astype(np.float32)
        assert np.allclose(a, b, rtol=1 / 128, atol=1e-4, equal_nan=True), name
        assert np.array_equal(np.isnan(a), np.isnan(b)), name
    assert np.isnan(c["kv"][7]).any() == (R == 128)
