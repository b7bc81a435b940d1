"""Inputs of the hyper-connection kernels, with pypto-lib's distributions
(spec chapter 01 §6.3, §7.3, §8.3) and comparators (§9.2)."""
import numpy as np

from ..compare import allclose, ratio_allclose
from ..config import get_config
from ..golden.numerics import bf16_rne, sigmoid
from ._common import normal, rng

# the trained-model-like scales and biases pypto-lib's builders use
HC_SCALE = np.array([0.076099, 0.032597, 0.226994], np.float32)
HC_BASE = np.array([5.9166, -3.6223, -2.9324, -3.3124, -3.9100, -0.9384, -3.3256, -2.5240,
                    2.0706, -2.5728, 0.1424, -3.9453, -3.8859, 3.4634, -3.3799, -2.6077,
                    -2.7191, -2.4846, 2.0395, -0.5010, -3.5992, -2.7520, -3.3493, 3.1587],
                   np.float32)


def _streams(seed, name, T, c):
    return bf16_rne(normal(seed, name, (T, c.hc_mult, c.hidden_size)) * np.float32(0.05))


def hc_pre(T=8, *, seed=0, config=None):
    """x [T, HC, D] ~ N(0,1) * 0.05 (bf16), hc_fn [MIX, HC*D] ~ N(0,1) * 0.0519."""
    c = get_config(config)
    assert c.mix_hc == HC_BASE.size, "the fixed biases are for HC = 4"
    return {
        "x": _streams(seed, "x", T, c),
        "hc_fn": normal(seed, "hc_fn", (c.mix_hc, c.hc_dim)) * np.float32(0.0519),
        "hc_scale": HC_SCALE.copy(),
        "hc_base": HC_BASE.copy(),
    }


def hc_post(T=8, *, seed=0, config=None):
    """post = 2 sigmoid(N(0,1)); comb rows (U[0,1) + 0.1) normalised over the last axis."""
    c = get_config(config)
    HC = c.hc_mult
    comb = rng(seed, "comb").random((T, HC, HC), dtype=np.float32) + np.float32(0.1)
    comb = comb / comb.sum(axis=-1, keepdims=True, dtype=np.float32)
    return {
        "x": bf16_rne(normal(seed, "x", (T, c.hidden_size)) * np.float32(0.05)),
        "residual": _streams(seed, "residual", T, c),
        "post": np.float32(2.0) * sigmoid(normal(seed, "post", (T, HC))),
        "comb": comb.reshape(T, HC * HC),
    }


def hc_head(T=8, *, seed=0, config=None):
    """x_hc [T, HC, D] ~ N(0,1) * 0.05 (bf16), hc_head_fn [HC, HC*D] ~ N(0,1) * 0.0519."""
    c = get_config(config)
    HC = c.hc_mult
    return {
        "x_hc": _streams(seed, "x_hc", T, c),
        "hc_head_fn": normal(seed, "hc_head_fn", (HC, c.hc_dim)) * np.float32(0.0519),
        "hc_head_scale": HC_SCALE[:1].copy(),
        "hc_head_base": HC_BASE[:HC].copy(),
    }


COMPARATORS = {
    "hc_pre": {
        "x_mixed": ratio_allclose(atol=1e-4, rtol=1 / 128),
        "post": ratio_allclose(atol=2.5e-5, rtol=5e-3),
        "comb": ratio_allclose(atol=2.5e-5, rtol=5e-3),
    },
    # pypto-lib gives hc_post no comparator: run_jit's default allclose, rtol = atol = 1e-3
    "hc_post": {"y": allclose(atol=1e-3, rtol=1e-3)},
    "hc_head": {"y": ratio_allclose(atol=1e-4, rtol=1 / 128)},
}

CASES = {
    "hc_pre": {"decode": dict(T=8), "prefill": dict(T=128)},
    "hc_post": {"decode": dict(T=8), "prefill": dict(T=128)},
    "hc_head": {"decode": dict(T=8), "prefill": dict(T=128)},
}
