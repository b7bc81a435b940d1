"""MTP projection, LM head and the MTP block (spec chapter 06 §8, §9): the goldens against
hand-worked cases, float64 re-derivations and their leaves, the C kernels against the goldens
with pypto-lib's comparators, and the C kernels' independence of threads, code path and
batch."""
import dataclasses

import numpy as np
import pytest

import dsv4
from dsv4.compare import compare_outputs
from dsv4.golden.numerics import BF16
from conftest import SIMD, SMALL, same_bits

F = np.float32
MTP = [pytest.param(dsv4.golden.mtp_projection, id="golden"), pytest.param(dsv4.mtp_projection, id="C")]
LM = [pytest.param(dsv4.golden.lm_head, id="golden"), pytest.param(dsv4.lm_head, id="C")]
# the FLASH hidden size, a vocabulary small enough for tests (the FLASH one is 1 GB of weights)
LM_CFG = dataclasses.replace(dsv4.FLASH, vocab_size=2 * 1000)


def mtp_inputs(hidden, prev, e_w, e_s, h_w, h_s):
    ones = np.ones(np.shape(hidden)[-1], F)
    return dict(hidden_states=np.asarray(hidden, F).astype(BF16),
                prev_hidden_states=np.asarray(prev, F).astype(BF16),
                enorm_w=ones, hnorm_w=ones.copy(), e_proj_w=np.asarray(e_w, np.int8),
                e_proj_w_scale=np.asarray(e_s, F), e_proj_smooth=ones.copy(),
                h_proj_w=np.asarray(h_w, np.int8), h_proj_w_scale=np.asarray(h_s, F),
                h_proj_smooth=ones.copy())


# ---- mtp_projection: the golden and the C kernel on cases worked out by hand ----------

@pytest.mark.parametrize("kernel", MTP)
def test_mtp_projection_hand_worked(kernel):
    # D = 4. hidden [1, -1, 1, -1]: mean square 1, every |v| = amax, codes +-127, and with
    # e_proj_w = 2 I, scale 1/2: e = 127 * (amax / 127) = 1 - 5e-7 -> +-1 in bf16.
    # prev lane 0 [2, 0, 0, 0] -> codes [127, 0, 0, 0], h = [2 - 1e-6, 0, 0, 0];
    # lane 1 [0, 0, 0, -4] -> codes [0, 0, 0, -127], h = [0, 0, 0, -2 + 1e-7] (h_proj_w = I).
    d = mtp_inputs([[1, -1, 1, -1]], [[[2, 0, 0, 0], [0, 0, 0, -4]]], 2 * np.eye(4), [0.5] * 4,
                   np.eye(4), [1.0] * 4)
    out = kernel(**d)["hidden_states_out"].astype(F)
    assert out.shape == (1, 2, 4)
    np.testing.assert_array_equal(out[0, 0], [3, -1, 1, -1])
    np.testing.assert_array_equal(out[0, 1], [1, -1, 1, -3])


@pytest.mark.parametrize("kernel", MTP)
def test_mtp_projection_weight_rows_are_outputs(kernel):
    # e_proj_w is [out, in]: output n reads row n. A one-hot hidden row (code 127 at k = 1)
    # picks column 1 of the weight: e[n] = w[n, 1] * amax * scale[n], amax = v rsqrt(v^2/D + eps)
    D = 8
    w = np.zeros((D, D), np.int8)
    w[:, 1] = np.arange(1, D + 1)
    hidden = np.zeros((1, D), F)
    hidden[0, 1] = np.sqrt(F(D))                  # mean square about 1
    d = mtp_inputs(hidden, np.zeros((1, 4, D), F), w, np.full(D, 1 / 64, F), np.zeros((D, D)),
                   np.ones(D, F))
    out = kernel(**d)["hidden_states_out"].astype(F)
    v = np.float64(np.sqrt(F(D)).astype(BF16).astype(F))
    amax = v / np.sqrt(v * v / D + 1e-6)
    want = np.arange(1, D + 1) * amax / 64
    for lane in range(4):       # zero prev rows add nothing, to every lane alike
        np.testing.assert_allclose(out[0, lane], want, rtol=2 ** -8)


def ref64(d, eps):
    """An independent float64 re-derivation: norm, per-row int8 (half to even), exact
    products, dequantisation, bf16 at the end."""
    def norm(x, w):
        x = x.astype(np.float64)
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w

    def quant(v):
        amax = np.maximum(np.abs(v).max(axis=-1, keepdims=True), 1e-4)
        return np.round(v * (127 / amax)), amax / 127
    hq, hs = quant(norm(d["hidden_states"].astype(F), d["enorm_w"]) * d["e_proj_smooth"])
    pq, ps = quant(norm(d["prev_hidden_states"].astype(F), d["hnorm_w"]) * d["h_proj_smooth"])
    e = hq @ d["e_proj_w"].T.astype(np.float64) * hs * d["e_proj_w_scale"]
    h = pq @ d["h_proj_w"].T.astype(np.float64) * ps * d["h_proj_w_scale"]
    return e[:, None, :] + h, hq, pq


def test_mtp_projection_golden_vs_float64():
    d = dsv4.specs.mtp_projection(T=4, seed=2, config=dataclasses.replace(dsv4.FLASH, hidden_size=256))
    g = dsv4.golden.mtp_projection(**d, stages=True)
    want, hq, pq = ref64(d, float(F(1e-6)))
    st = g["stages"]
    # codes: fp32 and float64 may round a value near .5 apart
    assert np.abs(st["hidden_i8"] - hq).max() <= 1 and np.mean(st["hidden_i8"] != hq) < 0.01
    assert np.abs(st["prev_i8"] - pq).max() <= 1 and np.mean(st["prev_i8"] != pq) < 0.01
    got = g["hidden_states_out"].astype(np.float64)
    # bf16 rounding, plus a code off by one: one weight step, far below 1 % of the typical
    # value; a wrong lane, row or weight orientation moves values by their whole size
    tol = 2 ** -8 * np.abs(want) + 0.01 * np.sqrt(np.mean(want ** 2))
    assert (np.abs(got - want) <= tol).all(), np.abs(got - want).max()


# ---- lm_head -------------------------------------------------------------------------

@pytest.mark.parametrize("kernel", LM)
def test_lm_head_shards_concatenate_in_rank_order(kernel):
    # one-hot hidden rows read one column of each shard: logits[o, t, p VS + v] = W[p, v, k]
    R, T, P, VS, D = 2, 3, 3, 5, 16
    w = (np.arange(P * VS * D, dtype=F).reshape(P, VS, D) % 97 - 48).astype(BF16)
    h = np.zeros((R, T, D), F)
    ks = np.array([[0, 5, 15], [7, 7, 2]])
    for o in range(R):
        for t in range(T):
            h[o, t, ks[o, t]] = 1.0
    out = kernel(hidden_states=h.astype(BF16), lm_head_weight=w)["logits"]
    assert out.shape == (R, T, P * VS) and out.dtype == F
    for o in range(R):
        for t in range(T):
            np.testing.assert_array_equal(out[o, t], w[:, :, ks[o, t]].astype(F).reshape(-1))


@pytest.mark.parametrize("kernel", LM)
def test_lm_head_vs_float64(kernel):
    d = dsv4.specs.lm_head(T=5, tp=2, vocab_size=64, seed=1, config=LM_CFG)
    out = kernel(**d)["logits"].astype(np.float64)
    h, w = (d[n].astype(np.float64) for n in ("hidden_states", "lm_head_weight"))
    want = np.concatenate([h @ w[p].T for p in range(2)], axis=-1)
    # fp32 sums of 4096 products of bf16 values
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-5)


# ---- C kernel against the golden, pypto-lib's comparators ---------------------------------

def c_vs_golden(kernel, inputs):
    c = getattr(dsv4, kernel)(**inputs)
    g = getattr(dsv4.golden, kernel)(**inputs)
    report = compare_outputs(c, g, dsv4.specs.COMPARATORS[kernel], inputs=inputs)
    assert report, str(report)
    return c, g


@pytest.mark.parametrize("T", [8, 128, 37])
def test_mtp_projection_c_vs_golden(T):
    c_vs_golden("mtp_projection", dsv4.specs.mtp_projection(T=T, seed=T))


@pytest.mark.parametrize("T", [8, 128, 37])
def test_lm_head_c_vs_golden(T):
    c, g = c_vs_golden("lm_head", dsv4.specs.lm_head(T=T, seed=T, config=LM_CFG))
    np.testing.assert_allclose(c["logits"], g["logits"], rtol=0, atol=1e-5)


def test_mtp_projection_other_presets():
    # DEMO has FLASH's hidden_size and rms_norm_eps, all mtp_projection reads: PRO only
    assert (dsv4.config.DEMO.hidden_size, dsv4.config.DEMO.rms_norm_eps) == \
        (dsv4.FLASH.hidden_size, dsv4.FLASH.rms_norm_eps)
    c_vs_golden("mtp_projection", dsv4.specs.mtp_projection(T=3, seed=1, config="pro"))


# ---- threads, code paths, batch ---------------------------------------------------------

# lm_head: 74 token rows take the panel GEMM, 6 the token-lane path
CASES = [("mtp_projection", dict(T=128)), ("lm_head", dict(T=37, tp=2, vocab_size=2 * 300)),
         ("lm_head", dict(T=3, tp=2, vocab_size=2 * 300))]
IDS = [f"{k}-T{p['T']}" for k, p in CASES]


@pytest.mark.parametrize("kernel,params", CASES, ids=IDS)
def test_same_bits_1_and_2_threads(kernel, params, threads):
    d = getattr(dsv4.specs, kernel)(**params, seed=4)
    threads(1)
    one = getattr(dsv4, kernel)(**d)
    threads(2)
    two = getattr(dsv4, kernel)(**d)
    for n in one:
        assert same_bits(one[n], two[n]), n


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("kernel,params", CASES, ids=IDS)
def test_same_bits_scalar_and_simd(kernel, params, simd, isa):
    if simd not in dsv4.available_isas():
        pytest.skip(f"this CPU has no {simd}")
    d = getattr(dsv4.specs, kernel)(**params, seed=5)
    isa("scalar")
    ref = getattr(dsv4, kernel)(**d)
    isa(simd)
    out = getattr(dsv4, kernel)(**d)
    for n in ref:
        assert same_bits(ref[n], out[n]), n


def test_mtp_projection_rows_do_not_depend_on_the_batch():
    d = dsv4.specs.mtp_projection(T=40, seed=6)
    full = dsv4.mtp_projection(**d)["hidden_states_out"]
    part = dsv4.mtp_projection(**dict(d, hidden_states=d["hidden_states"][5:8].copy(),
                                      prev_hidden_states=d["prev_hidden_states"][5:8].copy()))
    assert same_bits(part["hidden_states_out"], full[5:8])


def test_lm_head_rows_do_not_depend_on_the_batch():
    # 2 x 40 token rows in one call (the panel GEMM) against 1 x 3 of them (token lanes):
    # the same bits
    d = dsv4.specs.lm_head(T=40, tp=2, vocab_size=2 * 300, seed=7, config=LM_CFG)
    full = dsv4.lm_head(**d)["logits"]
    part = dsv4.lm_head(hidden_states=d["hidden_states"][1:, 10:13].copy(),
                        lm_head_weight=d["lm_head_weight"])["logits"]
    assert same_bits(part, full[1:, 10:13])


# ---- NaN and Inf, as pypto-lib's clamped quantisation gives them -------------------------

@pytest.mark.parametrize("kernel", MTP)
def test_mtp_projection_inf_in_a_row(kernel):
    # +Inf in e_proj_smooth[0] makes v[t, 0] infinite: amax = Inf, the row's factor 0, that
    # product NaN whose clamped code is -127 and the others 0, dequant scale Inf:
    # e[t, n] = -127 w[n, 0] * Inf, -Inf where w[n, 0] > 0, +Inf where < 0, NaN where 0
    # (torch's golden gives the same; the 0 code of an unclamped NaN would give NaN everywhere)
    d = dsv4.specs.mtp_projection(T=2, seed=8, config=dataclasses.replace(dsv4.FLASH, hidden_size=64))
    d["e_proj_smooth"] = d["e_proj_smooth"].copy()
    d["e_proj_smooth"][0] = np.inf
    d["prev_hidden_states"] = np.zeros_like(d["prev_hidden_states"])
    w = d["e_proj_w"].copy()
    w[:3, 0] = [5, -5, 0]
    d["e_proj_w"] = w
    with np.errstate(invalid="ignore", divide="ignore"):
        out = kernel(**d)["hidden_states_out"].astype(F)
    np.testing.assert_array_equal(out[:, :, :2], np.broadcast_to([-np.inf, np.inf], (2, 4, 2)))
    assert np.isnan(out[:, :, 2]).all()


def test_mtp_projection_inf_in_hidden_is_nan():
    # an Inf in a hidden row makes its sum of squares Inf and its factor 0: Inf * 0 = NaN
    d = dsv4.specs.mtp_projection(T=2, seed=8, config=dataclasses.replace(dsv4.FLASH, hidden_size=64))
    h = d["hidden_states"].astype(F)
    h[0, 5] = -np.inf
    d["hidden_states"] = h.astype(BF16)
    for kernel in (dsv4.mtp_projection, dsv4.golden.mtp_projection):
        with np.errstate(invalid="ignore", divide="ignore"):
            out = kernel(**d)["hidden_states_out"].astype(F)
        assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()


@pytest.mark.parametrize("kernel", MTP)
def test_mtp_projection_nan_row(kernel):
    # a NaN makes its row's scale NaN: every output of that token is NaN, the others finite
    d = dsv4.specs.mtp_projection(T=3, seed=9, config=dataclasses.replace(dsv4.FLASH, hidden_size=64))
    p = d["prev_hidden_states"].astype(F)
    p[1, 2, 7] = np.nan
    d["prev_hidden_states"] = p.astype(BF16)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = kernel(**d)["hidden_states_out"].astype(F)
    assert np.isnan(out[1, 2]).all()
    assert np.isfinite(np.delete(out.reshape(12, 64), 1 * 4 + 2, axis=0)).all()


# ---- bad input ---------------------------------------------------------------------------

def test_mtp_projection_bad_input():
    d = dsv4.specs.mtp_projection(T=2, seed=1, config=dataclasses.replace(dsv4.FLASH, hidden_size=64))
    with pytest.raises(TypeError, match="'e_proj_w'.*int8"):
        dsv4.mtp_projection(**dict(d, e_proj_w=d["e_proj_w"].astype(F)))
    with pytest.raises(ValueError, match="'h_proj_w'"):
        dsv4.mtp_projection(**dict(d, h_proj_w=np.zeros((64, 32), np.int8)))
    with pytest.raises(ValueError, match="'prev_hidden_states'.*'hidden_states'|'hidden_states'.*'prev_hidden_states'"):
        dsv4.mtp_projection(**dict(d, prev_hidden_states=d["prev_hidden_states"][:1].copy()))
    with pytest.raises(ValueError, match="'e_proj_w_scale'"):
        dsv4.mtp_projection(**dict(d, e_proj_w_scale=np.ones(65, F)))


def test_lm_head_bad_input():
    d = dsv4.specs.lm_head(T=2, tp=2, vocab_size=20, config=dataclasses.replace(dsv4.FLASH, hidden_size=64))
    with pytest.raises(ValueError, match="'lm_head_weight'.*D"):
        dsv4.lm_head(**dict(d, lm_head_weight=np.zeros((2, 10, 32), BF16)))
    with pytest.raises(TypeError, match="'lm_head_weight'.*bfloat16"):
        dsv4.lm_head(**dict(d, lm_head_weight=d["lm_head_weight"].astype(F)))
    with pytest.raises(ValueError, match="'logits'"):
        dsv4.lm_head(**d, logits=np.zeros((2, 2, 21), F))
    with pytest.raises(ValueError, match="tp = 3 .* 20"):
        dsv4.specs.lm_head(T=2, tp=3, vocab_size=20)


# ---- prefill_mtp: the composition ---------------------------------------------------------

def mtp_case(**kw):
    return dsv4.specs.prefill_mtp(**dict(dict(n_local_experts=4), **kw), seed=3, config=SMALL)


def fresh(d):
    return {k: (v.copy() if k == "kv_cache" else v) for k, v in d.items()}


def test_prefill_mtp_golden_is_its_leaves_in_order():
    # projection per rank -> SWA block per rank -> MoE at the MTP layer -> hc_head -> rms_norm,
    # each leaf golden called by hand on the previous one's output
    d = mtp_case(num_tokens=50, start_pos=200)
    g = dsv4.golden.prefill_mtp(**fresh(d), config=SMALL, stages=True)
    R, n, cfg = 2, 50, dict(config=SMALL)
    proj = [dsv4.golden.mtp_projection(**{k: d[k][r] for k in dsv4.golden.mtp._PROJ}, **cfg)
            ["hidden_states_out"] for r in range(R)]
    kv = d["kv_cache"].copy()
    attn = [dsv4.golden.prefill_attention_swa(
        x_hc=proj[r], **{k: (kv if k == "kv_cache" else d[k])[r] for k in dsv4.golden.mtp._ATTN},
        block_table=d["ori_block_table"][r], num_tokens=n, **cfg)["x_out"] for r in range(R)]
    pre = dsv4.golden.moe(x_hc=np.stack(attn), **{k: d[k] for k in dsv4.golden.mtp._MOE},
                          layer_id=SMALL.num_hidden_layers, num_tokens=n, **cfg)["x_next"]
    for r in range(R):
        head = dsv4.golden.hc_head(pre[r], d["mtp_hc_head_fn"][r], d["mtp_hc_head_scale"][r],
                                   d["mtp_hc_head_base"][r], **cfg)["y"]
        out = dsv4.golden.rms_norm(head, d["mtp_norm_w"][r], **cfg)["x_normed"]
        assert same_bits(g["hidden_out"][r], out), r
        assert same_bits(g["stages"]["projected"][r], proj[r])
    assert same_bits(g["pre_hc_hidden_out"], pre)
    assert same_bits(g["kv_cache"], kv)
    assert not np.array_equal(kv, d["kv_cache"])           # the ring was written



@pytest.mark.parametrize("kw", [dict(), dict(start_pos=300, num_tokens=77)],
                         ids=["start0-128", "start300-77"])
def test_prefill_mtp_c_vs_golden(kw):
    d = mtp_case(**kw)
    c = dsv4.prefill_mtp(**fresh(d), config=SMALL, stages=True)
    g = dsv4.golden.prefill_mtp(**fresh(d), config=SMALL, stages=True)
    cs, gs = c.pop("stages"), g.pop("stages")
    report = compare_outputs(c, g, dsv4.specs.COMPARATORS["prefill_mtp"], inputs=d)
    assert report, str(report)
    # the stages the C kernel returns hold the leaves' outputs at each step
    for name in ("projected", "x_attn", "x_head"):
        assert cs[name].shape == gs[name].shape, name
        bad = np.abs(cs[name].astype(F) - gs[name].astype(F)) > 0.02 * (1 + np.abs(gs[name].astype(F)))
        assert bad[:, :d["num_tokens"]].mean() < 0.01, name


def test_prefill_mtp_same_bits_threads_and_paths(threads, isa):
    d = mtp_case(num_tokens=77, start_pos=300)
    runs = []
    for n, path in ((1, "scalar"), (2, "scalar"), (2, dsv4.available_isas()[-1])):
        threads(n)
        isa(path)
        runs.append(dsv4.prefill_mtp(**fresh(d), config=SMALL, stages=True))
    for other in runs[1:]:
        for name in ("hidden_out", "pre_hc_hidden_out", "kv_cache"):
            assert same_bits(runs[0][name], other[name]), name


def test_prefill_mtp_bad_input_changes_nothing():
    d = mtp_case(num_tokens=20)
    kv = d["kv_cache"].copy()
    bad = dict(d, ori_slot_mapping=d["ori_slot_mapping"].copy())
    bad["ori_slot_mapping"][1, 3] = 10 ** 6                # outside the ring
    with pytest.raises(ValueError, match="rank 1.*ori_slot_mapping|ori_slot_mapping.*rank 1"):
        dsv4.prefill_mtp(**bad, config=SMALL)
    assert same_bits(d["kv_cache"], kv)
    with pytest.raises(ValueError, match="num_tokens"):
        dsv4.prefill_mtp(**dict(d, num_tokens=129), config=SMALL)
    with pytest.raises(ValueError, match="'mtp_hc_head_fn'"):
        dsv4.prefill_mtp(**dict(d, mtp_hc_head_fn=d["mtp_hc_head_fn"][:, :, :-1].copy()), config=SMALL)
    assert same_bits(d["kv_cache"], kv)
