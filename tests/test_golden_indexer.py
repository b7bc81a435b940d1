"""The lightning-indexer goldens (spec chapter 04 §4.8-§4.10): decode_indexer_compressor,
prefill_indexer_compressor, decode_indexer, prefill_indexer.

Checked on a small config against float64 re-derivations written here (bf16 rounding on
the bit pattern, int8 with np.rint, no dsv4.golden.numerics), on hand-built inputs whose
outcome is known (ties, all-equal keys, committed keys read back), for the fp8 weight
grid against an independent e4m3 rounding and ml_dtypes, and for the in-place contract:
states and caches are updated in place, only where the metadata says, and a call that
raises leaves them bit-identical.
"""
import dataclasses
import inspect

import ml_dtypes
import numpy as np
import pytest

import dsv4
from conftest import same_bits
from dsv4.check import fresh
from dsv4.compare import compare_outputs
from dsv4.specs import indexer as sp

BF16 = np.dtype(ml_dtypes.bfloat16)
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
F64 = np.float64
NEG = np.float32(-3.4028234663852886e38)

CFG = dataclasses.replace(dsv4.FLASH, hidden_size=256, q_lora_rank=128, index_n_heads=4,
                          index_head_dim=32, qk_rope_head_dim=16, index_topk=8,
                          max_position_embeddings=2048, sliding_window=16)
D, H, HD, R = 256, 4, 32, 16
ND = HD - R
EPS = 1e-6
RATIO = 4

G = dsv4.golden


# ------------------------------------------------------------ own rounding

def bf16r(x):
    """float64 -> fp32 -> bf16 (round to nearest even on the bits) -> float64."""
    u = np.asarray(x, F64).astype(np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    return r.view(np.float32).astype(F64)


def w(a):
    return np.asarray(a).astype(np.float32).astype(F64)


def q8_ref(v):
    """Per-row int8 as §4.2.8 defines it: amax floored at fp32(1e-4), sq = fp32(fp32(1 / amax)
    * 127) (reciprocal, then multiply), q = rint(fp32(v * sq)) (ties to even), dq = fp32(1 / sq).
    The scale's rounding is part of the contract: bf16 keys sit on a coarse grid, so
    v * 127 / amax hits exact .5 ties often, and the exact quotient would break them
    differently. Returns float64 arrays (q, dq)."""
    v32 = np.asarray(v, F64).astype(np.float32)
    amax = np.maximum(np.abs(v32).max(axis=-1, keepdims=True), np.float32(1e-4))
    sq = (np.float32(1) / amax) * np.float32(127)
    return np.rint(v32 * sq).astype(F64), (np.float32(1) / sq).astype(F64)


def e4m3_ref(x):
    """Round float64 to float8 e4m3fn by hand: 3 mantissa bits, min normal 2^-6, subnormal
    step 2^-9, ties to even, |x| > 448 after rounding -> NaN."""
    x = np.asarray(x, F64)
    ax = np.abs(x)
    e = np.floor(np.log2(np.where(ax > 0, ax, 1.0)))
    q = np.exp2(np.maximum(e, -6.0) - 3.0)
    r = np.sign(x) * np.round(ax / q) * q          # np.round: half to even
    return np.where(np.abs(r) > 448.0, np.nan, r)


def copy_inputs(inp):
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in inp.items()}


def snapshot(inp):
    return {k: v.copy() for k, v in inp.items() if isinstance(v, np.ndarray)}


def same_arrays(a, b):
    return all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)


def close(actual, expected, atol, rtol):
    a = np.asarray(actual).astype(np.float32).astype(F64)
    return np.abs(a - expected) <= atol + rtol * np.abs(expected)


# ------------------------------------------------------ float64 references

def ref_finish(pooled, norm_w, cos, sin, hadamard):
    """RMSNorm with gamma, interleaved RoPE of the last R dims, bf16, then v · H."""
    y = pooled / np.sqrt((pooled ** 2).mean() + EPS) * w(norm_w)
    c, s = w(cos)[:R // 2], w(sin)[:R // 2]
    a, b = y[ND::2].copy(), y[ND + 1::2].copy()
    y[ND::2], y[ND + 1::2] = a * c - b * s, a * s + b * c
    return bf16r(y) @ w(hadamard)


def ref_pool(kv, sc):
    m = sc.max(axis=0)
    e = np.exp(sc - m)
    return (kv * (e / e.sum(axis=0))).sum(axis=0)


def ref_decode_compressor(inp, state_key="compress_state", table_key="compress_state_block_table",
                          pre=""):
    """§4.8 in float64. Returns (state after the call, {b: (cache row, key)})."""
    x = w(inp["x"])[:, 0]
    K, Gs = x @ w(inp[pre + "wkv"]).T, x @ w(inp[pre + "wgate"]).T
    ape = w(inp[pre + "ape"])
    state = inp[state_key].astype(F64).copy()
    PAGE = state.shape[1]
    OD = 2 * HD
    table = inp[table_key]
    keys = {}
    for b in range(x.shape[0]):
        p = int(inp["position_ids"][b, 0])
        r = int(inp["inner_state_slot_mapping"][b, 0])
        if r >= 0:
            state[r // PAGE, r % PAGE] = np.concatenate([K[b], Gs[b] + ape[p % 4]])
        if p % 4 != 3:
            continue
        kv = np.zeros((8, HD))
        sc = np.full((8, HD), -np.inf)
        for j in range(8):
            q = p - 7 + j
            if q < 0 or table[b, q // PAGE] < 0:
                continue
            row = state[table[b, q // PAGE], q % PAGE]
            c0 = 0 if j < 4 else HD
            kv[j], sc[j] = row[c0:c0 + HD], row[OD + c0:OD + c0 + HD]
        k = ref_finish(ref_pool(kv, sc), inp[pre + "norm_w"], inp["cos"][b], inp["sin"][b],
                       inp["hadamard"])
        keys[b] = (int(inp["idx_slot_mapping"][b, 0]), k)
    return state, keys


def ref_prefill_compressor(inp, n, pre="", ks="kv_state", ss="score_state",
                           tk="inner_compress_state_block_table"):
    """§4.9 in float64 (pooling as a plain softmax). Returns (kv_state, score_state,
    [(cache row, key)] in write order)."""
    x = w(inp["x"])
    K, Gs = x @ w(inp[pre + "wkv"]).T, x @ w(inp[pre + "wgate"]).T
    pos = inp["position_ids"].astype(np.int64)
    Gp = Gs + w(inp[pre + "ape"])[pos % 4]
    kvs, scs = inp[ks].astype(F64), inp[ss].astype(F64)
    kvf, scf = kvs.reshape(-1, 2 * HD), scs.reshape(-1, 2 * HD)
    table = inp[tk]
    MAXS = CFG.max_position_embeddings

    def row(q):
        if q < 0 or q >= MAXS or table[q // 4] < 0:
            return -1
        return table[q // 4] * 4 + q % 4
    keys = []
    for t0 in range(n):
        dst = int(inp["idx_slot_mapping"][t0])
        if dst < 0:
            continue
        wp = int(pos[t0])
        src = {}
        for q in range(wp - 7, wp + 1):                # state first ...
            if q <= wp - 4 and wp < 7:
                continue
            r = row(q)
            if r >= 0:
                h = slice(0, HD) if q <= wp - 4 else slice(HD, 2 * HD)
                src[q] = (kvf[r, h], scf[r, h])
        for t in range(n):                             # ... then this chunk's tokens
            q = int(pos[t])
            if wp - 7 <= q <= wp and not (q <= wp - 4 and wp < 7):
                h = slice(0, HD) if q <= wp - 4 else slice(HD, 2 * HD)
                src[q] = (K[t, h], Gp[t, h])
        kv = np.array([v[0] for v in src.values()])
        sc = np.array([v[1] for v in src.values()])
        cur = wp - 3
        keys.append((dst, ref_finish(ref_pool(kv, sc), inp[pre + "norm_w"],
                                     inp["freqs_cos"][cur], inp["freqs_sin"][cur],
                                     inp["hadamard"])))
    for t in range(n):
        r = int(inp["inner_state_slot_mapping"][t])
        if r >= 0:
            kvf[r], scf[r] = K[t], Gp[t]
    return kvs, scs, keys


def ref_query(inp, cos, sin):
    """Q = (qr · wq_b) * qr_scale * wq_b_scale, RoPE per head, bf16, · H: [N, H, HD]."""
    N = inp["qr"].shape[0]
    Qi = inp["qr"].astype(np.int64) @ inp["wq_b"].astype(np.int64)
    Q = (Qi * w(inp["qr_scale"]).reshape(N, 1) * w(inp["wq_b_scale"])).reshape(N, H, HD)
    c, s = w(cos)[:, None, :R // 2], w(sin)[:, None, :R // 2]
    a, b = Q[..., ND::2].copy(), Q[..., ND + 1::2].copy()
    Q[..., ND::2], Q[..., ND + 1::2] = a * c - b * s, a * s + b * c
    return bf16r(Q) @ w(inp["hadamard"])


def ref_scores(Qr_t, Wt_t, keys, decode):
    """Scores of one token against keys [C, HD] in float64 (decode or prefill order)."""
    q8, qdq = q8_ref(Qr_t)                            # [H, HD], [H, 1]
    k8, kdq = q8_ref(keys)                            # [C, HD], [C, 1]
    S = q8 @ k8.T
    if decode:
        return (np.maximum(S * qdq, 0) * Wt_t[:, None]).sum(axis=0) * kdq[:, 0]
    return (np.maximum(S * qdq * kdq[:, 0], 0) * Wt_t[:, None]).sum(axis=0)


def check_scores(score, ref, offset, topk, k_cap):
    """score [n] golden (fp32) vs ref [n] float64; topk [>= k] golden indices + offset.

    Scores: the rare int8 flip (a product at a .5 boundary in fp32 vs float64) moves a
    score slightly, so 99 % must agree to 1e-4 relative and all to 1/128. Top-k: the
    golden's order is its own scores descending, ties by slot ascending; its set equals
    the reference's top-k except where reference scores are within tolerance of the
    k-th one."""
    tight = close(score, ref, 1e-6, 1e-4)
    assert tight.mean() >= 0.99, f"{(~tight).sum()} of {tight.size} scores off by > 1e-4"
    assert close(score, ref, 1e-5, 1 / 128).all()
    k = min(k_cap, len(ref))
    got = topk[:k].astype(np.int64) - offset
    assert (topk[k:] == -1).all()
    sg = score[got]
    assert (sg[:-1] >= sg[1:]).all()
    ties = sg[:-1] == sg[1:]
    assert (got[:-1][ties] < got[1:][ties]).all()
    want = np.argsort(-ref, kind="stable")[:k]
    kth = np.sort(ref)[::-1][k - 1]
    for c in set(got) ^ set(want):
        assert abs(ref[c] - kth) <= 1e-3 * abs(kth) + 1e-6, f"slot {c} wrongly in/out of top-k"


# ======================================================== API and registration

SIGS = {
    "decode_indexer_compressor": (
        "x compress_state compress_state_block_table wkv wgate ape norm_w cos sin hadamard "
        "idx_kv_cache position_ids idx_slot_mapping inner_state_slot_mapping | kv config stages",
        ("kv", "compress_state", "idx_kv_cache")),
    "prefill_indexer_compressor": (
        "x kv_state score_state inner_compress_state_block_table wkv wgate ape norm_w freqs_cos "
        "freqs_sin hadamard idx_kv_cache idx_block_table position_ids idx_slot_mapping "
        "inner_state_slot_mapping num_tokens | kv config stages",
        ("kv", "kv_state", "score_state", "idx_kv_cache")),
    "decode_indexer": (
        "x qr qr_scale wq_b wq_b_scale weights_proj cos sin hadamard inner_kv "
        "inner_compress_state inner_compress_state_block_table inner_wkv inner_wgate inner_ape "
        "inner_norm_w idx_kv_cache idx_block_table position_ids idx_slot_mapping "
        "inner_state_slot_mapping kv_seq_lens offset | score topk_idxs config stages",
        ("score", "topk_idxs", "inner_kv", "inner_compress_state", "idx_kv_cache")),
    "prefill_indexer": (
        "x qr qr_scale wq_b wq_b_scale weights_proj cos sin freqs_cos freqs_sin hadamard "
        "inner_kv_state inner_score_state inner_compress_state_block_table inner_wkv "
        "inner_wgate inner_ape inner_norm_w idx_kv_cache idx_block_table position_ids "
        "idx_slot_mapping inner_state_slot_mapping num_tokens | score topk_idxs config stages",
        ("score", "topk_idxs", "inner_kv_state", "inner_score_state", "idx_kv_cache")),
}


@pytest.mark.parametrize("kernel", list(SIGS))
def test_signature_outputs_and_registration(kernel):
    fn = getattr(G, kernel)
    params = inspect.signature(fn).parameters
    pos = [n for n, p in params.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
    kw = [n for n, p in params.items() if p.kind == p.KEYWORD_ONLY]
    spec, outs = SIGS[kernel]
    want_pos, want_kw = (s.split() for s in spec.split("|"))
    assert pos == want_pos and kw == want_kw
    scalar = {"num_tokens": None, "offset": 128}
    for n in pos:
        assert params[n].default is (inspect.Parameter.empty if n not in scalar else scalar[n])
    assert kernel in dsv4.specs.COMPARATORS and kernel in dsv4.specs.CASES
    inp = getattr(dsv4.specs, kernel)(**next(iter(dsv4.specs.CASES[kernel].values())),
                                      config=None)
    assert list(inp) == [n for n in pos if n in inp] and set(inp) == set(pos)
    out = fn(**inp)
    assert tuple(out) == outs
    for n in outs:
        if n in inp:
            assert out[n] is inp[n]                     # InOut: the argument itself
    report = compare_outputs(out, out, dsv4.specs.COMPARATORS[kernel])
    assert report.passed, str(report)


# ====================================================== fp8 weight grid, Hadamard

def test_fp8_e4m3fn_matches_hand_rounding_and_ml_dtypes():
    rng = np.random.default_rng(0)
    grid = np.array(sorted({float(v) for v in
                            np.arange(256, dtype=np.uint8).view(FP8).astype(np.float32)
                            if np.isfinite(v)}))
    mids = (grid[1:] + grid[:-1]) / 2                # exact ties -> even mantissa
    x = np.concatenate([rng.standard_normal(20000) * np.exp2(rng.integers(-12, 9, 20000)),
                        grid, mids, [447.9, 448.0, 464.0, 470.0, 500.0, -464.0, 2.0 ** -10]])
    x = x.astype(np.float32)
    got = dsv4.golden.numerics.fp8_e4m3fn(x)
    assert got.dtype == FP8
    ref = e4m3_ref(x.astype(F64))
    g = got.astype(np.float32).astype(F64)
    assert np.array_equal(np.isnan(g), np.isnan(ref))
    assert np.array_equal(g[~np.isnan(g)], ref[~np.isnan(ref)])
    # 464 is the tie between 448 (even mantissa) and 480 (the NaN code): it goes to 448;
    # anything above overflows to NaN (e4m3fn has no infinity)
    assert g[-7:-4].tolist() == [448.0, 448.0, 448.0] and np.isnan(g[-4]) and np.isnan(g[-3])
    assert g[-2] == -448.0 and g[-1] == 0.0            # half the subnormal step: tie to 0
    assert np.array_equal(got.view(np.uint8), x.astype(FP8).view(np.uint8))


def test_fp8_grid_int8_weight_vs_float64():
    """The quantisation of gen_shared_weight: per-block power-of-two scale, e4m3 grid, int8
    per row, rescaled std — re-derived in float64 with the hand e4m3 rounding."""
    rng = np.random.default_rng(1)
    W = (rng.standard_normal((256, 384)) * np.exp(0.56 * rng.standard_normal((256, 1))))
    W = W.astype(np.float32)
    w8, sc = sp.fp8_grid_int8_weight(W, 0.108)
    assert w8.dtype == np.int8 and sc.dtype == np.float32 and sc.shape == (256,)
    Wq = np.empty_like(W, F64)
    for i in range(2):
        for j in range(3):
            blk = W[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].astype(F64)
            s = 2.0 ** np.ceil(np.log2(np.abs(blk).max() / 448.0))
            assert 224.0 < np.abs(blk).max() / s <= 448.0
            Wq[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = e4m3_ref(blk / s) * s
    # the per-row step amax / 127 is an fp32 value and the division is rounded to fp32 before
    # rint (the grid values make exact .5 ties common, so both roundings matter)
    sc32 = (np.abs(Wq).max(axis=1, keepdims=True) / 127.0).astype(np.float32)
    q = np.clip(np.rint((Wq / sc32).astype(np.float32)), -127, 127)
    assert np.array_equal(w8, q)
    assert (np.abs(w8) == 127).any(axis=1).all()
    deq = w8.astype(F64) * sc[:, None]
    assert deq.std(ddof=1) == pytest.approx(0.108, rel=1e-5)
    # ~200 distinct levels and a zero spike, as the docstring of gen_shared_weight says
    assert 100 < len(np.unique(w8)) <= 255


def test_hadamard_sylvester_vs_float64():
    h = sp.hadamard_sylvester(128)
    assert h.dtype == BF16 and h.shape == (128, 128)
    hf = h.astype(F64)
    assert set(np.unique(hf)) == {-0.08837890625, 0.08837890625}
    assert np.array_equal(hf, hf.T)
    np.testing.assert_array_equal(hf @ hf.T, 128 * 0.08837890625 ** 2 * np.eye(128))
    ref = np.array([[(-1) ** bin(i & j).count("1") for j in range(128)] for i in range(128)])
    np.testing.assert_array_equal(np.sign(hf), ref)


def test_key_rotation_is_row_vector_times_h():
    """v · H with a random non-symmetric H (the decode fixture): a transposed H would be far
    off. The key of a degenerate (one finite row) window is known in closed form."""
    inp = sp.decode_indexer_compressor(B=8, seed=3, config=CFG)
    Hm = w(inp["hadamard"])
    assert not np.allclose(Hm, Hm.T)
    out = G.decode_indexer_compressor(**copy_inputs(inp), config=CFG)
    x = w(inp["x"])[:, 0]
    for b in np.flatnonzero(inp["idx_slot_mapping"][:, 0] >= 0):
        back = x[b] @ w(inp["wkv"])[HD:].T          # pooled == own back half (quirk Q1)
        k = ref_finish(back, inp["norm_w"], inp["cos"][b], inp["sin"][b], inp["hadamard"])
        assert close(out["kv"][b, 0], k, 1e-3, 1 / 128).all()
        kt = ref_finish(back, inp["norm_w"], inp["cos"][b], inp["sin"][b], inp["hadamard"].T)
        assert not close(out["kv"][b, 0], kt, 1e-3, 1 / 128).all()


# =========================================================== compressors vs float64

def warm_decode_state(inp, seed):
    """Random finite states (kv and scores), so that every window pools 8 rows."""
    rng = np.random.default_rng(seed)
    key = "compress_state" if "compress_state" in inp else "inner_compress_state"
    inp[key] = (rng.standard_normal(inp[key].shape) * 0.5).astype(np.float32)
    return inp


@pytest.mark.parametrize("start_pos,warm", [(None, False), (None, True), (1023, True),
                                            (259, True)])
def test_decode_indexer_compressor_vs_float64(start_pos, warm):
    inp = sp.decode_indexer_compressor(B=8, start_pos=start_pos, seed=4, config=CFG)
    if warm:
        inp = warm_decode_state(inp, 5)
    before = snapshot(inp)
    args = copy_inputs(inp)
    out = G.decode_indexer_compressor(**args, config=CFG)
    state, keys = ref_decode_compressor(inp)
    st = out["compress_state"]
    assert st is args["compress_state"]
    neg = state < -1e38
    assert np.array_equal(st[neg], np.full(neg.sum(), NEG))     # untouched NEG stays NEG
    np.testing.assert_allclose(st[~neg], state[~neg], rtol=1e-5, atol=1e-6)
    assert keys, "the case must commit keys"
    kv = out["kv"]
    assert kv.dtype == np.float32 and kv.shape == (8, 1, HD)
    cache = out["idx_kv_cache"]
    written = np.zeros(cache.shape[:2], bool)
    for b in range(8):
        if b in keys and keys[b][0] >= 0:
            row, k = keys[b]
            assert close(kv[b, 0], k, 2e-3, 1 / 128).all()
            assert close(cache[row // 128, row % 128, 0], k, 2e-3, 1 / 128).all()
            assert np.array_equal(cache[row // 128, row % 128, 0].view(np.uint16),
                                  kv[b, 0].astype(BF16).view(np.uint16))
            written[row // 128, row % 128] = True
        else:
            assert not kv[b].any()
    assert np.array_equal(cache[~written].view(np.uint16),
                          before["idx_kv_cache"][~written].view(np.uint16))


@pytest.mark.parametrize("start_pos,n", [(0, 128), (202, 128), (202, 50), (3, 9)])
def test_prefill_indexer_compressor_vs_float64(start_pos, n):
    inp = sp.prefill_indexer_compressor(T=128, start_pos=start_pos, num_tokens=n, seed=6,
                                        config=CFG)
    inp["num_tokens"] = n
    before = snapshot(inp)
    args = copy_inputs(inp)
    out = G.prefill_indexer_compressor(**args, config=CFG)
    kvs, scs, keys = ref_prefill_compressor(inp, n)
    np.testing.assert_allclose(out["kv_state"], kvs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["score_state"], scs, rtol=1e-5, atol=1e-6)
    assert out["kv_state"] is args["kv_state"] and out["score_state"] is args["score_state"]
    assert len(keys) == sum(((start_pos + t + 1) % 4 == 0) for t in range(n))
    kv, cache = out["kv"], out["idx_kv_cache"]
    assert kv.dtype == BF16 and kv.shape == (32, HD)
    flat = cache.reshape(-1, HD)
    for i, (dst, k) in enumerate(keys):
        assert close(flat[dst], k, 2e-3, 1 / 128).all()
        assert np.array_equal(kv[i].view(np.uint16), flat[dst].view(np.uint16))
    assert not kv[len(keys):].astype(np.float32).any()
    rows = [d for d, _ in keys]
    mask = np.ones(flat.shape[0], bool)
    mask[rows] = False
    assert np.array_equal(flat[mask].view(np.uint16),
                          before["idx_kv_cache"].reshape(-1, HD)[mask].view(np.uint16))
    assert np.array_equal(inp["idx_block_table"], before["idx_block_table"])


# ======================================================= indexers vs float64

def ref_decode_indexer(inp):
    state, keys = ref_decode_compressor(inp, "inner_compress_state",
                                        "inner_compress_state_block_table", "inner_")
    cache = w(inp["idx_kv_cache"]).reshape(-1, HD)
    for b, (row, k) in keys.items():
        if row >= 0:
            cache[row] = bf16r(k)
    Qr = ref_query(inp, inp["cos"], inp["sin"])
    Wt = (w(inp["x"])[:, 0] @ w(inp["weights_proj"])) * (HD ** -0.5 * H ** -0.5)
    out = {}
    for b in range(Qr.shape[0]):
        p = int(inp["position_ids"][b, 0])
        vis = min(int(inp["kv_seq_lens"][b]) // 4, (p + 1) // 4, CFG.max_position_embeddings // 4)
        if vis <= 0:
            continue
        c = np.arange(vis)
        kr = cache[inp["idx_block_table"][b, c // 128] * 128 + c % 128]
        out[b] = ref_scores(Qr[b], Wt[b], kr, decode=True)
    return out, keys


@pytest.mark.parametrize("start_pos,warm,lens_delta,permuted", [
    (None, False, 0, False), (None, True, 0, True), (1003, True, -37, True), (403, True, 5, False)])
def test_decode_indexer_vs_float64(start_pos, warm, lens_delta, permuted):
    inp = sp.decode_indexer(B=8, start_pos=start_pos, seed=7, config=CFG)
    if warm:
        inp = warm_decode_state(inp, 8)
    if permuted:                                      # keys gathered through the table
        inp["idx_block_table"] = sp.block_table(8, 64, permuted=True)
        inp["idx_slot_mapping"] = sp.compressed_slot_mapping(inp["position_ids"],
                                                             inp["idx_block_table"])
    inp["kv_seq_lens"] = np.maximum(inp["kv_seq_lens"] + lens_delta, 0).astype(np.int32)
    inp["offset"] = 129
    out = G.decode_indexer(**copy_inputs(inp), config=CFG)
    ref, keys = ref_decode_indexer(inp)
    score, topk = out["score"], out["topk_idxs"]
    SL = CFG.max_position_embeddings // 4
    assert score.shape == (8, 1, SL) and topk.shape == (8, 1, SL) and topk.dtype == np.int32
    assert keys and ref
    for b in range(8):
        if b not in ref:
            assert (score[b] == NEG).all() and (topk[b] == -1).all()
            continue
        v = len(ref[b])
        assert (score[b, 0, v:] == NEG).all()
        check_scores(score[b, 0, :v], ref[b], 129, topk[b, 0], CFG.index_topk)


def ref_prefill_indexer(inp, n):
    kvs, scs, keys = ref_prefill_compressor(inp, n, "inner_", "inner_kv_state",
                                            "inner_score_state")
    cache = w(inp["idx_kv_cache"]).reshape(-1, HD)
    for row, k in keys:
        cache[row] = bf16r(k)
    T = inp["x"].shape[0]
    vis = np.minimum((inp["position_ids"].astype(np.int64) + 1) // 4, 256)
    MV = int(vis[:n].max()) if n else 0
    if MV <= 0:
        return vis, None
    Qr = ref_query(inp, inp["cos"], inp["sin"])
    Wt = (w(inp["x"]) @ w(inp["weights_proj"])) * (HD ** -0.5 * H ** -0.5)
    c = np.arange(MV)
    kr = cache[inp["idx_block_table"][c // 128] * 128 + c % 128]
    return vis, np.array([ref_scores(Qr[t], Wt[t], kr, decode=False) for t in range(T)])


@pytest.mark.parametrize("start_pos,n", [(0, 128), (512, 128), (300, 77), (0, 2)])
def test_prefill_indexer_vs_float64(start_pos, n):
    inp = sp.prefill_indexer(T=128, start_pos=start_pos, num_tokens=n, seed=9, config=CFG)
    out = G.prefill_indexer(**copy_inputs(inp), config=CFG)
    vis, ref = ref_prefill_indexer(inp, n)
    score, topk = out["score"], out["topk_idxs"]
    assert score.shape == (128, 256) and topk.shape == (128, 256)
    if ref is None:                                   # nobody sees a slot (Q: MV == 0)
        assert (score == NEG).all() and (topk == -1).all()
        return
    MV = ref.shape[1]
    assert (score[:, MV:] == NEG).all()
    offset = CFG.sliding_window + 128
    for t in range(128):
        v = min(max(int(vis[t]), 0), MV)
        assert (score[t, v:MV] == NEG).all()
        if v == 0:
            assert (topk[t] == -1).all()
            continue
        if t < n:
            check_scores(score[t, :v], ref[t, :v], offset, topk[t], min(CFG.index_topk, 256))
        else:                                         # scored but no top-k (quirk Q15)
            assert close(score[t, :v], ref[t, :v], 1e-5, 1 / 128).all()
            assert (topk[t] == -1).all()


# ========================================================== top-k ties and misses

def test_topk_ties_order_and_comparator():
    """All history keys equal -> equal scores -> slots in ascending order. Swapping
    equal-score entries passes topk_pair_compare; putting a worse slot first fails."""
    inp = sp.decode_indexer(B=8, seed=10, config=CFG)
    inp["idx_kv_cache"][:] = inp["idx_kv_cache"][0, 0, 0]
    inp["offset"] = 128                               # the comparator pairs with WIN = 128
    out = G.decode_indexer(**copy_inputs(inp), config=CFG)
    cmp = dsv4.specs.COMPARATORS["decode_indexer"]
    b = 7                                             # p = 255: 64 visible slots, slot 63 new
    p = int(inp["position_ids"][b, 0])
    v = (p + 1) // 4
    row = out["score"][b, 0, :v]
    assert inp["idx_slot_mapping"][b, 0] >= 0 and (out["score"][b, 0, v:] == NEG).all()
    assert (row[:v - 1] == row[0]).all() and row[v - 1] != row[0]
    top = out["topk_idxs"][b, 0, :CFG.index_topk].astype(np.int64) - 128
    if row[v - 1] > row[0]:                           # the new key first, then ties ascending
        assert top.tolist() == [v - 1] + list(range(CFG.index_topk - 1))
    else:
        assert top.tolist() == list(range(CFG.index_topk))

    def run(topk):
        return compare_outputs({**out, "topk_idxs": topk}, out, cmp)["topk_idxs"]
    i = 1 if row[v - 1] > row[0] else 0
    swapped = out["topk_idxs"].copy()
    swapped[b, 0, [i, i + 1]] = swapped[b, 0, [i + 1, i]]
    assert (swapped != out["topk_idxs"]).sum() == 2
    assert run(swapped).passed                        # legal tie swap
    lower = out["topk_idxs"].copy()                   # a tied slot outside the top-k: also legal
    lower[b, 0, CFG.index_topk - 1] = 128 + v - 2
    assert run(lower).passed
    miss = out["topk_idxs"].copy()                    # the odd one out moved: a real miss
    if row[v - 1] > row[0]:
        miss[b, 0, [0, 3]] = miss[b, 0, [3, 0]]
    else:
        miss[b, 0, 2] = 128 + v - 1
    assert not run(miss).passed


def test_topk_miss_detected_on_fixture():
    inp = sp.decode_indexer(B=8, seed=11, config=CFG)
    inp["offset"] = 128
    out = G.decode_indexer(**copy_inputs(inp), config=CFG)
    cmp = dsv4.specs.COMPARATORS["decode_indexer"]
    b = 0                                             # p = 1024: 256 visible slots, top-8 of them
    top = out["topk_idxs"][b, 0, :8] - 128
    sc = out["score"][b, 0]
    assert (np.diff(sc[top]) <= 0).all()
    rest = np.setdiff1d(np.arange(256), top)
    assert sc[rest].max() <= sc[top].min()
    bad = out["topk_idxs"].copy()
    bad[b, 0, 3] = int(rest[np.argmin(sc[rest])]) + 128   # a real miss in the middle
    assert not compare_outputs({**out, "topk_idxs": bad}, out, cmp)["topk_idxs"].passed
    # prefill: the same rule with -inf for padding
    pinp = sp.prefill_indexer(T=128, start_pos=0, seed=11, config=CFG)
    pout = G.prefill_indexer(**copy_inputs(pinp), config=CFG)
    pcmp = dict(dsv4.specs.COMPARATORS["prefill_indexer"])
    pcmp["topk_idxs"] = sp.topk_paired(CFG.sliding_window, 256, invalid_neg_inf=True,
                                       plus_tokens=True)           # WIN + T of CFG
    assert compare_outputs(pout, pout, pcmp).passed
    top = pout["topk_idxs"][:, :8]
    sc = np.take_along_axis(pout["score"], np.clip(top - 144, 0, 255), axis=1)
    strict = np.flatnonzero((top >= 0).all(axis=1) & (np.diff(sc, axis=1) < 0).all(axis=1))
    t = int(strict[-1])                               # a token with 8 distinct top scores
    bad = pout["topk_idxs"].copy()
    bad[t, [0, 7]] = bad[t, [7, 0]]
    assert not compare_outputs({**pout, "topk_idxs": bad}, pout, pcmp)["topk_idxs"].passed
    bad = pout["topk_idxs"].copy()
    bad[t, 5] = -1                                    # a dropped entry pairs with -inf
    assert not compare_outputs({**pout, "topk_idxs": bad}, pout, pcmp)["topk_idxs"].passed


# ====================================================== in-place and errors

def _decode_bad_cases():
    def big_slot(d):
        d["idx_slot_mapping"][4, 0] = d["idx_kv_cache"].shape[0] * 128
    def big_state_row(d):
        key = "inner_state_slot_mapping"
        d[key][7, 0] = 10 ** 6
    def table_entry(d):
        tk = ("compress_state_block_table" if "compress_state_block_table" in d
              else "inner_compress_state_block_table")
        p = int(d["position_ids"][7, 0])           # request 7 (p = 255) pools its own page
        assert p % 4 == 3
        d[tk][7, p // 4] = 10 ** 6
    def neg_pos(d):
        d["position_ids"][5, 0] = -1
    def two_tokens(d):
        d["x"] = np.repeat(d["x"], 2, axis=1)
    return {"idx_slot_mapping": big_slot, "inner_state_slot_mapping": big_state_row,
            "block_table": table_entry, "position_ids": neg_pos, "S": two_tokens}


@pytest.mark.parametrize("kernel", ["decode_indexer_compressor", "decode_indexer"])
@pytest.mark.parametrize("case", list(_decode_bad_cases()))
def test_decode_errors_leave_inputs_untouched(kernel, case):
    inp = getattr(sp, kernel)(B=8, seed=12, config=CFG)
    _decode_bad_cases()[case](inp)
    before = snapshot(inp)
    with pytest.raises(ValueError) as e:
        getattr(G, kernel)(**inp, config=CFG)
    assert kernel in str(e.value)
    word = {"S": "S = 2"}.get(case, case)
    assert word in str(e.value)
    assert same_arrays(before, snapshot(inp))


@pytest.mark.parametrize("case", ["idx_block_table", "idx_block_table_neg", "kv_seq_lens",
                                  "inner_kv"])
def test_decode_indexer_errors_leave_inputs_untouched(case):
    inp = sp.decode_indexer(B=8, seed=13, config=CFG)
    if case == "idx_block_table":
        inp["idx_block_table"][0, 1] = inp["idx_kv_cache"].shape[0]   # p = 1024 needs block 1
    elif case == "idx_block_table_neg":
        inp["idx_block_table"][7, 0] = -1
    elif case == "kv_seq_lens":
        inp["kv_seq_lens"][3] = -4
    else:
        inp["inner_kv"] = np.zeros((8, 1, HD + 1), np.float32)
    before = snapshot(inp)
    with pytest.raises(ValueError, match=case.removesuffix("_neg")):
        G.decode_indexer(**inp, config=CFG)
    assert same_arrays(before, snapshot(inp))


def _widen_table(inp, name, extra):
    """The same table with `extra` more pages, all -1 (missing)."""
    t = inp[name]
    pad = np.full(t.shape[:-1] + (extra,), -1, t.dtype)
    return {**inp, name: np.concatenate([t, pad], axis=-1)}


# §4.3.3: a pooled position whose state page lies beyond the table is a missing row, the same
# as a -1 entry; C and golden agree on it, and with the main compressor's rule (FLASH shapes:
# the C indexer needs a multiple of 8 heads)
@pytest.mark.parametrize("kernel", ["decode_indexer_compressor", "decode_indexer",
                                    "prefill_indexer_compressor", "prefill_indexer"])
def test_positions_beyond_the_state_table_are_missing_rows(kernel):
    decode = kernel.startswith("decode")
    inp = (getattr(sp, kernel)(B=8, seed=21) if decode
           else getattr(sp, kernel)(T=128, start_pos=0, seed=21))
    name = ("compress_state_block_table" if "compress_state_block_table" in inp
            else "inner_compress_state_block_table")
    state = next(v for k, v in inp.items() if k.endswith(("compress_state", "kv_state")))
    pages = 2048                                      # a table shorter than the RoPE tables
    inp[name] = np.ascontiguousarray(inp[name][..., :pages])
    end = pages * state.shape[1]                      # first position beyond the table
    if decode:                                        # windows ending 3 rows past it and inside
        inp["position_ids"][:, 0] = end + 3 - 4 * (np.arange(8) % 2)
    else:                                             # the last window ends 3 rows past it
        inp["position_ids"] = (end + 3 - 127 + np.arange(128)).astype(inp["position_ids"].dtype)
    wide = _widen_table(inp, name, 4)
    outs = {}
    for label, d in (("short", inp), ("wide", wide)):
        outs[label, "golden"] = getattr(G, kernel)(**fresh(kernel, d))
        outs[label, "C"] = dsv4.KERNELS[kernel](**fresh(kernel, d))
    for impl in ("golden", "C"):
        for out in outs["short", impl]:
            assert same_bits(outs["short", impl][out], outs["wide", impl][out]), (impl, out)
    report = compare_outputs(outs["short", "C"], outs["short", "golden"],
                             dsv4.specs.COMPARATORS[kernel], inputs=inp)
    assert report.passed, str(report)


def test_decode_indexer_ignores_table_beyond_visible_slots():
    inp = sp.decode_indexer(B=8, seed=13, config=CFG)
    assert list(inp["position_ids"][:, 0]) == [1024, 0, 3, 7, 15, 16, 127, 255]
    inp["idx_block_table"][1:, 1:] = -1               # the others (at most 64 slots) see block 0
    inp["idx_block_table"][0, 2:] = 10 ** 6            # request 0 (256 slots) needs blocks 0..1
    # the same bits as with the table cut to the blocks anyone sees (the C kernel needs
    # index_n_heads a multiple of 8: CFG's 4 heads are the golden's alone)
    cut = dict(inp, idx_block_table=np.ascontiguousarray(inp["idx_block_table"][:, :2]))
    wide, short = G.decode_indexer(**inp, config=CFG), G.decode_indexer(**cut, config=CFG)
    assert set(wide) == set(short)
    for name in short:
        assert same_bits(wide[name], short[name]), name


@pytest.mark.parametrize("kernel", ["prefill_indexer_compressor", "prefill_indexer"])
@pytest.mark.parametrize("case", ["idx_slot_mapping", "inner_state_slot_mapping",
                                  "block_table", "early_flag", "num_tokens", "position_ids",
                                  "idx_block_table"])
def test_prefill_errors_leave_inputs_untouched(kernel, case):
    inp = getattr(sp, kernel)(T=128, start_pos=256, seed=14, config=CFG)
    if case == "idx_slot_mapping":
        inp["idx_slot_mapping"][127] = inp["idx_kv_cache"].shape[0] * 128
    elif case == "inner_state_slot_mapping":
        inp["inner_state_slot_mapping"][120] = inp["inner_compress_state_block_table"].shape[0] * 4
    elif case == "block_table":
        t = inp["inner_compress_state_block_table"]
        inp["inner_compress_state_block_table"] = t.copy()
        inp["inner_compress_state_block_table"][(256 + 127) // 4] = t.shape[0]
    elif case == "early_flag":
        inp["position_ids"][5] = 2                   # flagged token 3 keeps its slot
        inp["idx_slot_mapping"][5] = 7
    elif case == "num_tokens":
        inp["num_tokens"] = 129
    elif case == "position_ids":
        inp["position_ids"][100] = -3
    else:
        if kernel == "prefill_indexer_compressor":
            inp["idx_block_table"][:] = 10 ** 6       # not read (quirk Q18): no error
            getattr(G, kernel)(**inp, config=CFG)
            return
        inp["idx_block_table"][0] = -1
    before = snapshot(inp)
    with pytest.raises(ValueError) as e:
        getattr(G, kernel)(**inp, config=CFG)
    word = {"block_table": "inner_compress_state_block_table", "early_flag": "Q11"}.get(case, case)
    assert word in str(e.value) and kernel in str(e.value)
    assert same_arrays(before, snapshot(inp))


def test_read_only_or_wrong_dtype_state_is_refused():
    inp = sp.decode_indexer_compressor(B=8, seed=15, config=CFG)
    inp["compress_state"].setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        G.decode_indexer_compressor(**inp, config=CFG)
    inp = sp.prefill_indexer(T=16, seed=15, config=CFG)
    inp["idx_kv_cache"] = inp["idx_kv_cache"].astype(np.float32)
    with pytest.raises(TypeError, match="idx_kv_cache"):
        G.prefill_indexer(**inp, config=CFG)


# ================================================================ multi-call

def test_decode_steps_equal_one_prefill_chunk():
    """§4.11.3: tokens 0..11 fed one decode step at a time (state carried) and as one prefill
    chunk commit the same keys (up to rounding), and the same state content per position."""
    pre = sp.prefill_indexer_compressor(T=12, start_pos=0, seed=16, config=CFG)
    dec = sp.decode_indexer_compressor(B=1, start_pos=0, seed=16, config=CFG)
    for k in ("wkv", "wgate", "ape", "norm_w", "hadamard"):
        dec[k] = pre[k]
    pout = G.prefill_indexer_compressor(**copy_inputs(pre), config=CFG)
    state, cache = dec["compress_state"], dec["idx_kv_cache"]
    table = dec["compress_state_block_table"]
    cos_t, sin_t = dsv4.rope_tables(CFG, 4)
    keys = []
    for p in range(12):
        step = dict(dec, x=pre["x"][p][None, None], position_ids=np.array([[p]], np.int32))
        step["inner_state_slot_mapping"] = sp.state_slot_mapping(step["position_ids"], table)
        step["idx_slot_mapping"] = sp.compressed_slot_mapping(step["position_ids"],
                                                              sp.block_table(1, 64))
        c0 = p - p % 4
        step["cos"] = cos_t[c0:c0 + 1, :R // 2].astype(np.float32)
        step["sin"] = sin_t[c0:c0 + 1, :R // 2].astype(np.float32)
        out = G.decode_indexer_compressor(**step, config=CFG)
        assert out["compress_state"] is state and out["idx_kv_cache"] is cache
        if p % 4 == 3:
            keys.append(out["kv"][0, 0].copy())
        else:
            assert not out["kv"].any()
    pk = pout["kv"][:3].astype(np.float32)
    for i, k in enumerate(keys):
        assert close(pk[i], k.astype(F64), 2e-3, 1 / 128).all()
        row = sp.compressed_slot_mapping(np.array([[4 * i + 3]]), sp.block_table(1, 64))[0, 0]
        assert np.array_equal(cache.reshape(-1, HD)[row].view(np.uint16),
                              k.astype(BF16).view(np.uint16))
    # state content: decode merged [kv | score] == prefill kv_state next to score_state
    for p in range(12):
        dr = sp.state_slot_mapping(np.array([[p]]), table)[0, 0]
        pr = pre["inner_state_slot_mapping"][p]
        merged = state.reshape(-1, 4 * HD)[dr]
        np.testing.assert_allclose(merged[:2 * HD], pout["kv_state"].reshape(-1, 2 * HD)[pr],
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(merged[2 * HD:], pout["score_state"].reshape(-1, 2 * HD)[pr],
                                   rtol=1e-5, atol=1e-6)


def test_prefill_two_chunks_equal_one_chunk():
    """§4.11.2: positions 0..5 then 6..9 (state and cache carried) commit the same keys and
    leave the same state as one chunk 0..9."""
    full = sp.prefill_indexer_compressor(T=10, start_pos=0, seed=17, config=CFG)
    one = G.prefill_indexer_compressor(**copy_inputs(full), config=CFG)
    split = copy_inputs(full)
    kv_state, score_state, cache = split["kv_state"], split["score_state"], split["idx_kv_cache"]
    for lo, hi in ((0, 6), (6, 10)):
        part = dict(split, x=full["x"][lo:hi], position_ids=full["position_ids"][lo:hi],
                    idx_slot_mapping=full["idx_slot_mapping"][lo:hi],
                    inner_state_slot_mapping=full["inner_state_slot_mapping"][lo:hi],
                    num_tokens=hi - lo)
        out = G.prefill_indexer_compressor(**part, config=CFG)
        assert out["kv_state"] is kv_state and out["idx_kv_cache"] is cache
    assert (full["idx_slot_mapping"] >= 0).sum() == 2
    for row in full["idx_slot_mapping"][full["idx_slot_mapping"] >= 0]:
        a, e = cache.reshape(-1, HD)[row], one["idx_kv_cache"].reshape(-1, HD)[row]
        assert close(a, w(e), 2e-3, 1 / 128).all()
    np.testing.assert_allclose(kv_state, one["kv_state"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(score_state, one["score_state"], rtol=1e-5, atol=1e-6)


def test_decode_indexer_scores_the_key_it_commits_and_carries_state():
    """Quirk Q22: the key committed in this call is read back from the bf16 cache and
    scored; a second call at p + 4 sees it again (state carried through the inner state)."""
    inp = sp.decode_indexer(B=8, seed=18, config=CFG)
    b = 3                                             # p = 7: commits slot 1, sees slots 0, 1
    out = G.decode_indexer(**inp, config=CFG)
    row = inp["idx_slot_mapping"][b, 0]
    assert row >= 0 and out["idx_kv_cache"] is inp["idx_kv_cache"]
    key = inp["idx_kv_cache"].reshape(-1, HD)[row]
    assert np.array_equal(key.view(np.uint16), inp["inner_kv"][b, 0].astype(BF16).view(np.uint16))
    Qr = ref_query(inp, inp["cos"], inp["sin"])
    Wt = (w(inp["x"])[:, 0] @ w(inp["weights_proj"])) * (HD ** -0.5 * H ** -0.5)
    keys = w(inp["idx_kv_cache"]).reshape(-1, HD)[inp["idx_block_table"][b, 0] * 128 + np.arange(2)]
    ref = ref_scores(Qr[b], Wt[b], keys, decode=True)
    assert close(out["score"][b, 0, :2], ref, 1e-5, 1 / 128).all()
    # four more steps: position 11 pools positions 4..11, of which 4..7 come from call 1
    state_after_1 = inp["inner_compress_state"].copy()
    cos_t, sin_t = dsv4.rope_tables(CFG, 4)
    for p in range(8, 12):
        inp["position_ids"] = inp["position_ids"] + 1
        inp["kv_seq_lens"] = inp["kv_seq_lens"] + 1
        pos = inp["position_ids"]
        inp["inner_state_slot_mapping"] = sp.state_slot_mapping(
            pos, inp["inner_compress_state_block_table"])
        inp["idx_slot_mapping"] = sp.compressed_slot_mapping(pos, inp["idx_block_table"])
        inp["cos"] = cos_t[pos[:, 0], :R // 2].astype(np.float32)
        inp["sin"] = sin_t[pos[:, 0], :R // 2].astype(np.float32)
        ref_state, ref_keys = ref_decode_compressor(inp, "inner_compress_state",
                                                    "inner_compress_state_block_table", "inner_")
        out = G.decode_indexer(**inp, config=CFG)
        np.testing.assert_allclose(inp["inner_compress_state"][ref_state > -1e38],
                                   ref_state[ref_state > -1e38], rtol=1e-5, atol=1e-6)
    assert not np.array_equal(state_after_1, inp["inner_compress_state"])
    assert int(inp["position_ids"][b, 0]) == 11
    assert close(inp["inner_kv"][b, 0], ref_keys[b][1], 2e-3, 1 / 128).all()
    assert (out["score"][b, 0, :3] != NEG).all() and (out["score"][b, 0, 3:] == NEG).all()


def test_builders_fresh_states_and_cached_weights():
    a = sp.decode_indexer(B=8, seed=19, config=CFG)
    b = sp.decode_indexer(B=8, seed=19, config=CFG)
    for k in ("inner_compress_state", "idx_kv_cache", "inner_kv"):
        assert a[k] is not b[k] and a[k].flags.writeable
        assert a[k].tobytes() == b[k].tobytes()
    assert a["wq_b"] is b["wq_b"] and not a["wq_b"].flags.writeable
    c = sp.decode_indexer(B=8, seed=20, config=CFG)
    assert c["x"].tobytes() != a["x"].tobytes()
    p = sp.prefill_indexer(T=128, start_pos=200, seed=19, config=CFG)
    hist = p["idx_kv_cache"].reshape(-1, HD)
    assert hist[:50].astype(np.float32).any(axis=1).all() and not hist[50:].astype(np.float32).any()
    nz = p["inner_kv_state"].reshape(-1, 2 * HD).any(axis=1)
    assert nz.sum() == 8 and not np.array_equal(p["inner_kv_state"], p["inner_score_state"])
    with pytest.raises(ValueError):
        sp.prefill_indexer(T=128, start_pos=1000, config=CFG)
    with pytest.raises(ValueError):
        sp.decode_indexer(B=8, S=2, config=CFG)
