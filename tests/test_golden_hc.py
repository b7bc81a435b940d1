"""Hyper-connection goldens (dsv4.golden.hc_*) and C kernels (dsv4.hc_*) checked
against the spec (chapter 01 §0.1-0.2, §6, §7, §8): the spec's own numbers,
hand-made exact cases and independent float64 re-derivations, never the code
against itself.
"""
import dataclasses

import numpy as np
import pytest

import dsv4
from dsv4.golden.hc import sinkhorn
from dsv4.golden.numerics import BF16, bf16_haz, bf16_rne, softmax_last

F = np.float32
CFG16 = dataclasses.replace(dsv4.FLASH, hidden_size=16)   # HC=4, K=64, MIX=24
CFG64 = dataclasses.replace(dsv4.FLASH, hidden_size=64)   # K=256
EPS64 = float(F(1e-6))                                    # f32(1e-6), as torch adds it

PRE = [pytest.param(dsv4.golden.hc_pre, id="golden"), pytest.param(dsv4.hc_pre, id="C")]
POST = [pytest.param(dsv4.golden.hc_post, id="golden"), pytest.param(dsv4.hc_post, id="C")]
HEAD = [pytest.param(dsv4.golden.hc_head, id="golden"), pytest.param(dsv4.hc_head, id="C")]

# §6.2 Sinkhorn micro-example: logits, and the numbers the spec lists
L_MICRO = np.array([[0, 0, 0, 0], [1, 0, 0, 0], [2, 0, 0, 0], [3, 0, 0, 0]], np.float32)
SPEC_SOFTMAX_EPS = np.array([[0.250001] * 4,
                             [0.47536793] + [0.1748787] * 3,
                             [0.7112355] + [0.09625612] * 3,
                             [0.8700496] + [0.04331816] * 3])
SPEC_FIRST_COLUMN_PASS = np.array([[0.10838249] + [0.4429069] * 3,
                                   [0.20608541] + [0.30981866] * 3,
                                   [0.30834067] + [0.1705293] * 3,
                                   [0.37719104] + [0.07674334] * 3])
SPEC_COMB = np.array([0.05245151, 0.31584916, 0.31584916, 0.31584916,
                      0.13078989, 0.2897364, 0.2897364, 0.2897364,
                      0.2902854, 0.2365712, 0.2365712, 0.2365712,
                      0.5264723, 0.15784225, 0.15784225, 0.15784225])


def bf16(a):
    return np.asarray(a, np.float32).astype(BF16)


def f(a):
    return np.asarray(a).astype(np.float32)


def sigmoid64(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def sinkhorn64(L, iters, eps):
    """§6.2 steps 7-9 in float64: softmax + eps, a column pass, (iters-1) row/column pairs."""
    L = np.asarray(L, np.float64)
    e = np.exp(L - L.max(-1, keepdims=True))
    c = e / e.sum(-1, keepdims=True) + eps
    c = c / (c.sum(-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdims=True) + eps)
        c = c / (c.sum(-2, keepdims=True) + eps)
    return c


def bf16_ulp(y):
    """One bf16 ulp at |y| (8 significant bits), y != 0."""
    return 2.0 ** (np.floor(np.log2(np.abs(y))) - 7)


def pre_f32_spec(b):
    """§0.2/§6.2 step 4 at mix = 0, emulated step by step in fp32:
    f32(f32(1 / f32(1 + f32(exp(-b)))) + f32(1e-6))."""
    e = F(np.exp(-np.float64(F(b))))
    return F(F(F(1.0) / F(F(1.0) + e)) + F(1e-6))


# a bias whose pre weight (at mix = 0) is exactly 0.5: sigmoid(B_HALF) + 1e-6 rounds to 0.5
B_HALF = F(-4e-6)


def zero_mix_inputs(T, cfg, hc_base, x=None, seed=0):
    """hc_fn = 0, so every mix logit is 0 and the logits equal hc_base."""
    K, MIX = cfg.hc_dim, cfg.mix_hc
    if x is None:
        x = bf16(np.random.default_rng(seed).standard_normal((T, cfg.hc_mult, cfg.hidden_size)))
    return dict(x=x, hc_fn=np.zeros((MIX, K), np.float32),
                hc_scale=np.array([0.3, -0.7, 1.0], np.float32),
                hc_base=np.asarray(hc_base, np.float32))


# ---- 1. the Sinkhorn micro-example of §6.2 -----------------------------------------------

def test_sinkhorn_micro_example_spec_numbers():
    np.testing.assert_allclose(softmax_last(L_MICRO) + F(1e-6), SPEC_SOFTMAX_EPS, rtol=1e-6, atol=0)
    first = sinkhorn(L_MICRO[None], 1, 1e-6)[0]          # softmax+eps, then one column pass
    np.testing.assert_allclose(first, SPEC_FIRST_COLUMN_PASS, rtol=1e-6, atol=0)
    comb = sinkhorn(L_MICRO[None], 20, 1e-6)
    assert comb.dtype == np.float32 and comb.shape == (1, 4, 4)
    np.testing.assert_allclose(comb.reshape(16), SPEC_COMB, rtol=1e-6, atol=0)
    # "Row sums ~ 0.999999, column sums ~ 0.99999905. The eps keeps them just under 1."
    rows, cols = comb[0].astype(np.float64).sum(1), comb[0].astype(np.float64).sum(0)
    np.testing.assert_allclose(rows, 0.999999, atol=1.5e-7)
    np.testing.assert_allclose(cols, 0.99999905, atol=1e-7)
    assert (rows < 1).all() and (cols < 1).all()


@pytest.mark.parametrize("kernel", PRE)
def test_hc_pre_micro_example_through_full_kernel(kernel):
    base = np.zeros(24, np.float32)
    base[:4] = [0.5, -1.0, 2.0, -3.0]
    base[4:8] = [1.0, -0.25, 0.0, 3.0]
    base[8:24] = L_MICRO.reshape(16)
    inp = zero_mix_inputs(3, CFG16, base)
    out = kernel(**inp, config=CFG16)
    assert out["comb"].shape == (3, 16) and out["comb"].dtype == np.float32
    np.testing.assert_allclose(out["comb"], np.tile(SPEC_COMB, (3, 1)), rtol=1e-6, atol=0)
    np.testing.assert_allclose(out["post"], np.tile(2 * sigmoid64(base[4:8]), (3, 1)), rtol=1e-6, atol=0)
    # x_mixed = sum_h x_h * (sigmoid(base_h) + 1e-6), within one bf16 ulp
    pre = sigmoid64(base[:4]) + EPS64
    y = np.einsum("thd,h->td", f(inp["x"]).astype(np.float64), pre)
    xm = f(out["x_mixed"]).astype(np.float64)
    assert out["x_mixed"].dtype == BF16 and xm.shape == (3, 16)
    assert (np.abs(xm - y) <= bf16_ulp(y)).all()
    # with one Sinkhorn iteration, comb is the spec's "after the first column pass"
    one = kernel(**inp, config=dataclasses.replace(CFG16, hc_sinkhorn_iters=1))
    np.testing.assert_allclose(one["comb"][0], SPEC_FIRST_COLUMN_PASS.reshape(16), rtol=1e-6, atol=0)


# ---- 2. Sinkhorn against float64 -------------------------------------------------------------

def test_sinkhorn_float64_convergence_and_recipe():
    L = np.random.default_rng(11).standard_normal((64, 4, 4)).astype(np.float32)
    # the exact float64 iteration (no eps) converges to a doubly stochastic matrix
    conv = sinkhorn64(L, 3000, 0.0)
    np.testing.assert_allclose(conv.sum(-1), 1, atol=1e-9)
    np.testing.assert_allclose(conv.sum(-2), 1, atol=1e-9)
    g = sinkhorn(L, 20, 1e-6)
    assert g.dtype == np.float32
    g64 = g.astype(np.float64)
    assert np.abs(g64.sum(-2) - 1).max() < 1e-5        # columns are normalised last
    assert np.abs(g64.sum(-1) - 1).max() < 1e-3
    # the same 20-iteration recipe in float64
    np.testing.assert_allclose(g64, sinkhorn64(L, 20, EPS64), rtol=0, atol=1e-6)
    # and near the converged matrix
    np.testing.assert_allclose(g64, conv, rtol=0, atol=1e-3)


def test_hc_pre_comb_c_matches_float64_sinkhorn():
    L = np.random.default_rng(12).standard_normal((8, 4, 4)).astype(np.float32)
    for k in range(len(L)):
        base = np.concatenate([np.zeros(8, np.float32), L[k].reshape(16)])
        comb = dsv4.hc_pre(**zero_mix_inputs(1, CFG16, base, seed=k), config=CFG16)["comb"][0]
        np.testing.assert_allclose(comb, sinkhorn64(L[k], 20, EPS64).reshape(16), rtol=0, atol=1e-6)


# ---- 3. hc_pre mixing re-derived in float64 ---------------------------------------------------

@pytest.mark.parametrize("kernel", PRE)
def test_hc_pre_mixing_float64(kernel):
    rng = np.random.default_rng(3)
    T, HC, D = 6, 4, 64
    x = bf16(rng.standard_normal((T, HC, D)) * 0.5)
    hc_fn = (rng.standard_normal((24, HC * D)) * 0.0519).astype(np.float32)
    hc_scale = np.array([1.0, 1.5, 0.5], np.float32)
    hc_base = dsv4.specs.hc.HC_BASE.copy()
    out = kernel(x=x, hc_fn=hc_fn, hc_scale=hc_scale, hc_base=hc_base, config=CFG64)

    # §6.2 steps 1-5, 6, 11 in float64
    xf = f(x).astype(np.float64).reshape(T, HC * D)
    r = 1.0 / np.sqrt((xf ** 2).sum(1) / (HC * D) + EPS64)
    mix = (xf @ hc_fn.astype(np.float64).T) * r[:, None]
    s, b = hc_scale.astype(np.float64), hc_base.astype(np.float64)
    pre = sigmoid64(mix[:, :4] * s[0] + b[:4]) + EPS64
    post = 2 * sigmoid64(mix[:, 4:8] * s[1] + b[4:8])
    logits = (mix[:, 8:] * s[2] + b[8:]).reshape(T, 4, 4)
    y = np.einsum("thd,th->td", f(x).astype(np.float64), pre)

    assert np.ptp(mix[:, 4:8] * s[1]) > 0.5            # the mix really moves the weights
    np.testing.assert_allclose(out["post"], post, rtol=1e-5, atol=0)
    xm = f(out["x_mixed"]).astype(np.float64)
    assert (np.abs(xm - y) <= bf16_ulp(y)).all()
    np.testing.assert_allclose(out["comb"], sinkhorn64(logits, 20, EPS64).reshape(T, 16),
                               rtol=0, atol=1e-5)


# ---- 4. ties away from zero in x_mixed ----------------------------------------------------------

def test_bf16_haz_worked_examples_golden_and_c():
    # §0.1 worked example: 1.00390625 (0x3F808000) is a tie; -1.00390625 likewise;
    # 1.01171875 (0x3F818000) is a tie whose even neighbour is the upper one.
    v = np.array([1.00390625, -1.00390625, 1.01171875, -1.01171875], np.float32)
    want = np.array([1.0078125, -1.0078125, 1.015625, -1.015625], np.float32)
    assert (f(bf16_haz(v)) == want).all()
    assert (f(dsv4._C.cast_bf16_haz(x=v)["y"]) == want).all()
    assert (f(bf16_rne(v)) == [1.0, -1.0, 1.015625, -1.015625]).all()   # RNE differs on the first two


def test_pre_weight_half_is_exact():
    # precondition of the tie tests: the bias B_HALF gives pre = sigmoid + 1e-6 = 0.5 exactly
    assert pre_f32_spec(B_HALF) == F(0.5)
    # post with that bias, 2 * sigmoid(B_HALF), is just under 1
    out = dsv4.hc_pre(**zero_mix_inputs(1, CFG16, np.full(24, B_HALF)), config=CFG16)
    assert F(1) - out["post"][0, 0] < 1e-5


@pytest.mark.parametrize("kernel", PRE)
def test_hc_pre_x_mixed_ties_away_from_zero(kernel):
    # pre = 0.5 for every stream (hc_fn = 0, base = B_HALF), so y = 0.5 * (x0 + x1) exactly
    x = np.zeros((1, 4, 16), np.float32)
    cols = {  # d: (x0, x1, expected x_mixed)
        0: (2.0, 2.0 ** -7, 1.0078125),            # y = 1.00390625, tie -> away (RNE: 1.0)
        1: (-2.0, -(2.0 ** -7), -1.0078125),       # negative tie -> away (RNE: -1.0)
        2: (2.0, 3 * 2.0 ** -7, 1.015625),         # y = 1.01171875, both rules go up
        3: (2.0, 2.0 ** -8, 1.0),                  # y = 1.001953125, not a tie
        4: (2.0 ** -9, 2.0 ** -17, 2.0 ** -10 + 2.0 ** -17),  # tie at 2^-10 -> away
    }
    for d, (a, b_, _) in cols.items():
        x[0, 0, d], x[0, 1, d] = a, b_
    want = np.zeros(16, np.float32)
    for d, (_, _, e) in cols.items():
        want[d] = e
    out = kernel(**zero_mix_inputs(1, CFG16, np.full(24, B_HALF), x=bf16(x)), config=CFG16)
    assert (f(out["x_mixed"])[0] == want).all(), f(out["x_mixed"])[0]
    # RNE would have given something else on the ties 0, 1, 4
    exact = F(0.5) * f(bf16(x))[0, :2].sum(0)
    assert (f(bf16_rne(exact))[[0, 1, 4]] != want[[0, 1, 4]]).all()


@pytest.mark.parametrize("kernel", PRE)
def test_hc_pre_collapse_is_sequential(kernel):
    # pre = 0.5 on all four streams; terms t = [1, 2^-24, 2^-24, -1]
    # sequential ((t0 + t1) + t2) + t3 = 0 (each 1 + 2^-24 ties back to 1);
    # pairwise (t0 + t1) + (t2 + t3) would give 2^-24, the exact sum is 2^-23
    x = np.zeros((1, 4, 16), np.float32)
    x[0, :, 0] = [2.0, 2.0 ** -23, 2.0 ** -23, -2.0]
    x[0, :, 1] = [-2.0, -(2.0 ** -23), -(2.0 ** -23), 2.0]
    # terms [2^-24, -1, 1, 2^-24]: sequential 2^-24 - 1 (exact), + 1 -> 2^-24, + 2^-24 -> 2^-23;
    # pairwise would give (2^-24 - 1) + 1 -> 2^-24
    x[0, :, 2] = [2.0 ** -23, -2.0, 2.0, 2.0 ** -23]
    out = kernel(**zero_mix_inputs(1, CFG16, np.full(24, B_HALF), x=bf16(x)), config=CFG16)
    xm = f(out["x_mixed"])[0]
    assert xm[0] == 0 and xm[1] == 0
    assert xm[2] == F(2.0 ** -23)


# ---- 5. hc_post by hand ---------------------------------------------------------------------------

@pytest.mark.parametrize("kernel", POST)
def test_hc_post_exact_powers_of_two(kernel):
    rng = np.random.default_rng(5)
    T, HC, D = 2, 4, 16
    x = rng.integers(-3, 4, (T, D)).astype(np.float32)
    res = rng.integers(-3, 4, (T, HC, D)).astype(np.float32)
    post = rng.choice([0.25, 0.5, 1.0, 2.0], (T, HC)).astype(np.float32)
    comb = rng.choice([0.0, 0.125, 0.25, 0.5, 1.0], (T, HC * HC)).astype(np.float32)
    # y[t, o] = x[t] post[t, o] + sum_i res[t, i] comb[t, 4i + o]; every value a multiple of
    # 1/8 below 2^5, so float64, fp32 and bf16 all hold it exactly
    c = comb.astype(np.float64).reshape(T, HC, HC)          # [t, i, o]
    want = (x[:, None, :] * post[:, :, None].astype(np.float64)
            + np.einsum("tid,tio->tod", res.astype(np.float64), c))
    transposed = (x[:, None, :] * post[:, :, None].astype(np.float64)
                  + np.einsum("tid,toi->tod", res.astype(np.float64), c))
    assert not np.array_equal(want, transposed)               # the case tells the layouts apart
    out = kernel(x=bf16(x), residual=bf16(res), post=post, comb=comb)
    assert out["y"].dtype == BF16 and out["y"].shape == (T, HC, D)
    assert (f(out["y"]).astype(np.float64) == want).all()


@pytest.mark.parametrize("kernel", POST)
def test_hc_post_rounds_ties_to_even(kernel):
    # §7.2 step 3: y = bf16(acc) with RNE (unlike hc_pre/hc_head, which round ties away)
    T, HC, D = 1, 4, 16
    x = np.zeros((T, D), np.float32)
    res = np.zeros((T, HC, D), np.float32)
    x[0, :4] = [1.0, -1.0, 1.0, 1.0]
    res[0, 0, :4] = [2.0 ** -8, -(2.0 ** -8), 3 * 2.0 ** -8, 2.0 ** -9]
    # acc = 1.00390625 (tie), -1.00390625 (tie), 1.01171875 (tie, even is up), 1.001953125
    comb = np.zeros((T, HC, HC), np.float32)
    comb[0, 0, :] = 1.0
    out = kernel(x=bf16(x), residual=bf16(res), post=np.ones((T, HC), np.float32),
                 comb=comb.reshape(T, 16))
    for o in range(HC):
        assert (f(out["y"])[0, o, :4] == [1.0, -1.0, 1.015625, 1.0]).all()
        assert (f(out["y"])[0, o, 4:] == 0).all()


@pytest.mark.parametrize("kernel", POST)
def test_hc_post_comb_is_input_row_output_column(kernel):
    rng = np.random.default_rng(6)
    T, HC, D = 3, 4, 16
    perm = [1, 2, 3, 0]                                        # output o reads input perm[o]
    comb = np.zeros((T, HC, HC), np.float32)
    for o, i in enumerate(perm):
        comb[:, i, o] = 1.0
    res = bf16(rng.standard_normal((T, HC, D)))
    out = kernel(x=bf16(rng.standard_normal((T, D))), residual=res,
                 post=np.zeros((T, HC), np.float32), comb=comb.reshape(T, 16))
    for o, i in enumerate(perm):
        assert (f(out["y"][:, o]) == f(res[:, i])).all(), (o, i)


# ---- 6. hc_head ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel", HEAD)
def test_hc_head_pairwise_collapse(kernel):
    # hc_head_fn = 0 and base = B_HALF: pre = 0.5 on every stream, terms exact
    x = np.zeros((1, 4, 16), np.float32)
    x[0, :, 0] = [2.0, 2.0 ** -23, 2.0 ** -23, -2.0]          # terms [1, 2^-24, 2^-24, -1]
    x[0, :, 1] = -x[0, :, 0]
    x[0, :, 2] = [2.0, 2.0 ** -7, 0.0, 0.0]                    # 1.00390625: tie -> away
    x[0, :, 3] = -x[0, :, 2]
    t = F(0.5) * x[0, :, 0]
    sequential = ((t[0] + t[1]) + t[2]) + t[3]
    pairwise = (t[0] + t[1]) + (t[2] + t[3])
    assert sequential == 0 and pairwise == F(2.0 ** -24)       # the case separates the orders
    out = kernel(x_hc=bf16(x), hc_head_fn=np.zeros((4, 64), np.float32),
                 hc_head_scale=np.array([0.076099], np.float32),
                 hc_head_base=np.full(4, B_HALF, np.float32), config=CFG16)
    y = f(out["y"])[0]
    assert out["y"].dtype == BF16 and out["y"].shape == (1, 16)
    assert y[0] == F(2.0 ** -24) and y[1] == -F(2.0 ** -24)
    assert y[2] == F(1.0078125) and y[3] == F(-1.0078125)
    assert (y[4:] == 0).all()


@pytest.mark.parametrize("T", [1, 3, 8, 37])
def test_hc_head_any_T_c_vs_golden(T):
    inp = dsv4.specs.hc_head(T=T, seed=T)
    assert inp["x_hc"].shape == (T, 4, 4096)
    c, g = dsv4.hc_head(**inp)["y"], dsv4.golden.hc_head(**inp)["y"]
    assert c.shape == g.shape == (T, 4096)
    res = dsv4.specs.COMPARATORS["hc_head"]["y"](c, g, name="y")
    assert res, str(res)


# ---- 7. bad input -------------------------------------------------------------------------------

def _pre_ok(T=2):
    return zero_mix_inputs(T, CFG16, np.zeros(24, np.float32))


def test_hc_pre_bad_hc_fn_columns():
    inp = _pre_ok()
    for k in (63, 65, 128):
        inp["hc_fn"] = np.zeros((24, k), np.float32)
        with pytest.raises(ValueError, match="hc_fn"):
            dsv4.hc_pre(**inp, config=CFG16)


def test_hc_post_bad_comb_columns():
    B = lambda *s: np.zeros(s, BF16)  # noqa: E731
    with pytest.raises(ValueError, match="comb"):
        dsv4.hc_post(x=B(2, 16), residual=B(2, 4, 16), post=np.zeros((2, 4), np.float32),
                     comb=np.zeros((2, 15), np.float32))


def test_hc_head_bad_scale_shape():
    with pytest.raises(ValueError, match="hc_head_scale"):
        dsv4.hc_head(x_hc=np.zeros((2, 4, 16), BF16), hc_head_fn=np.zeros((4, 64), np.float32),
                     hc_head_scale=np.zeros(2, np.float32), hc_head_base=np.zeros(4, np.float32),
                     config=CFG16)


def test_float64_x_is_a_type_error():
    inp = _pre_ok()
    inp["x"] = f(inp["x"]).astype(np.float64)
    with pytest.raises(TypeError, match="'x'"):
        dsv4.hc_pre(**inp, config=CFG16)
    with pytest.raises(TypeError, match="'x'"):
        dsv4.hc_post(x=np.zeros((2, 16)), residual=np.zeros((2, 4, 16), BF16),
                     post=np.zeros((2, 4), np.float32), comb=np.zeros((2, 16), np.float32))
    with pytest.raises(TypeError, match="'x_hc'"):
        dsv4.hc_head(x_hc=np.zeros((2, 4, 16)), hc_head_fn=np.zeros((4, 64), np.float32),
                     hc_head_scale=np.zeros(1, np.float32), hc_head_base=np.zeros(4, np.float32),
                     config=CFG16)
