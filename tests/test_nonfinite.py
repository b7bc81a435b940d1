"""NaN and Inf flow through every C kernel exactly as through its golden (spec README,
contract 6): a NaN or an Inf planted in a float input lands on the same output elements,
on every code path, and the integer outputs (int8 codes, indices) agree as they do on
finite inputs."""
import functools
import inspect

import ml_dtypes
import numpy as np
import pytest

import dsv4
from dsv4.check import fresh
from dsv4.compare import compare_outputs
from conftest import same_bits, small_params
from conftest import SMALL, SMALL_ATTN
from test_kernels import SMALL_LAYER_CASES

FLOATS = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.float8_e4m3fn))
# the layers' smallest cases of SMALL_LAYER_CASES' kinds: one CSA decode step, one short
# CSA request crossing a compression boundary
LAYER_CASES = {"decode_layer": dict(SMALL_LAYER_CASES["decode_layer"], start_pos=7),
               "prefill_layer": dict(layer_id=2, chunk_lens=(9,), n_local_experts=4),
               "prefill_mtp": dict(num_tokens=9, n_local_experts=4)}


def inputs_of(kernel):
    """Small seeded inputs of `kernel` and the config they are built for: read-only arrays
    the caller replaces, never writes (the states and caches go through `fresh`)."""
    inputs, cfg = _inputs_of(kernel)
    return dict(inputs), cfg


@functools.lru_cache(maxsize=2)
def _inputs_of(kernel):
    if kernel in LAYER_CASES:
        cfg = SMALL
        params = LAYER_CASES[kernel]
    else:
        cfg = SMALL_ATTN
        params = small_params(kernel)
    takes_config = "config" in inspect.signature(getattr(dsv4, kernel)).parameters
    inputs = getattr(dsv4.specs, kernel)(**params, seed=11, config=cfg)
    for v in inputs.values():
        if isinstance(v, np.ndarray):
            v.setflags(write=False)
    return inputs, {"config": cfg} if takes_config else {}


def float_inputs(kernel):
    inputs, _ = inputs_of(kernel)
    return [n for n, v in inputs.items() if isinstance(v, np.ndarray) and v.dtype in FLOATS and v.size]


# the layers run the blocks and the MoE, whose every input is planted above: here the
# hidden state, one input of each stage kind and the caches the two attention calls share
LAYER_INPUTS = ("x_hc", "wq_a", "kv_cache", "cmp_kv", "csa_compress_state", "csa_cmp_kv_state",
                "gate_w", "routed_w2_scale", "shared_w1_scale", "norm_w", "hc_ffn_fn",
                "hidden_states", "prev_hidden_states", "e_proj_w_scale", "mtp_hc_head_fn",
                "mtp_norm_w")
# the blocks: what their own glue reads (the hidden state, the RoPE rows it gathers, the
# caches and states it addresses, the sink) and one weight of each leaf
BLOCK_INPUTS = ("x_hc", "hc_attn_fn", "wq_a", "wkv", "freqs_cos", "freqs_sin", "kv_cache", "cmp_kv",
                "idx_kv_cache", "compress_state", "cmp_kv_state", "cmp_score_state",
                "inner_compress_state", "inner_kv_state", "cmp_wkv", "idx_wq_b_scale", "attn_sink",
                "wo_b_scale")


def planted(kernel, name):
    if kernel in LAYER_CASES:
        return name in LAYER_INPUTS
    return "attention_" not in kernel or name in BLOCK_INPUTS


CASES = [(k, n) for k in sorted(dsv4.KERNELS) for n in float_inputs(k) if planted(k, n)]


def plant(a, seed):
    """A copy of `a` with NaN at one element and +Inf, -Inf (not in fp8) at two others,
    each in the first row, where every kernel reads (cache rows beyond it may be unread)."""
    a = a.copy()
    flat = a.reshape(-1)
    row = flat.size // a.shape[0] if a.ndim > 1 else flat.size
    at = np.random.default_rng(seed).choice(row, size=min(3, row), replace=False)
    kinds = [np.nan] if a.dtype == ml_dtypes.float8_e4m3fn else [np.nan, np.inf, -np.inf]
    for i, v in zip(at, kinds):
        flat[i] = v
    return a


def run(fn, kernel, inputs, cfg):
    with np.errstate(all="ignore"):
        out = fn(**fresh(kernel, inputs), **cfg)
    out.pop("stages", None)
    return out


def nonfinite(x):
    x = np.asarray(x).astype(np.float32)
    return np.isnan(x).sum(), np.isposinf(x).sum(), np.isneginf(x).sum()


@pytest.mark.parametrize("kernel,name", CASES, ids=[f"{k}-{n}" for k, n in CASES])
def test_nan_and_inf_reach_the_same_elements(kernel, name):
    inputs, cfg = inputs_of(kernel)
    inputs[name] = plant(inputs[name], seed=len(name))
    c = run(dsv4.KERNELS[kernel], kernel, inputs, cfg)
    g = run(getattr(dsv4.golden, kernel), kernel, inputs, cfg)
    floats = {o: v for o, v in g.items() if np.asarray(v).dtype.kind not in "biu"}
    ints = {o: v for o, v in g.items() if o not in floats}
    for o in floats:
        if same_bits(c[o], g[o]):
            continue                    # most caches: NaN and Inf at the same places, and more
        a, e = (np.asarray(x).astype(np.float32) for x in (c[o], g[o]))
        for what, test in (("NaN", np.isnan), ("+Inf", np.isposinf), ("-Inf", np.isneginf)):
            differ = test(a) != test(e)
            if differ.any():
                bad = np.argwhere(differ)
                raise AssertionError(
                    f"{name} planted: {what} of '{o}' differs at {len(bad)} elements, first "
                    f"{tuple(bad[0])}: C {a[tuple(bad[0])]}, golden {e[tuple(bad[0])]}")
    # int outputs keep the kernel's own comparator (its off-by-one allowances)
    cmp = {o: f for o, f in dsv4.specs.COMPARATORS[kernel].items() if o in ints}
    if ints:
        report = compare_outputs(c, ints, cmp, inputs=inputs)
        assert report, f"{name} planted:\n{report}"


@pytest.mark.parametrize("kernel", sorted(dsv4.KERNELS))
def test_planted_values_reach_the_outputs(kernel):
    """The test above is not vacuous: for every kernel some planted input makes some
    output non-finite in the golden."""
    inputs, cfg = inputs_of(kernel)
    reached = []
    for name in float_inputs(kernel):
        kw = dict(inputs, **{name: plant(inputs[name], seed=len(name))})
        g = run(getattr(dsv4.golden, kernel), kernel, kw, cfg)
        if any(sum(nonfinite(v)) for v in g.values() if np.asarray(v).dtype.kind not in "biu"):
            reached.append(name)
            break
    assert reached, f"no planted NaN/Inf reached an output of {kernel}"


def need(name):
    if name not in dsv4.available_isas():
        pytest.skip(f"this CPU has no {name} path")


# the first two float inputs of each leaf (activations or states, then a weight): the
# paths share every other input's code with these
LEAVES = [(k, n) for k, n in CASES if k not in LAYER_CASES and "attention_" not in k
          and n in float_inputs(k)[:2]]


@pytest.mark.parametrize("simd", ["avx2", "avx512"])
@pytest.mark.parametrize("kernel,name", LEAVES, ids=[f"{k}-{n}" for k, n in LEAVES])
def test_nonfinite_same_bits_scalar_and_simd(kernel, name, simd, isa):
    need(simd)
    inputs, cfg = inputs_of(kernel)
    inputs[name] = plant(inputs[name], seed=len(name))
    isa("scalar")
    ref = run(dsv4.KERNELS[kernel], kernel, inputs, cfg)
    isa(simd)
    out = run(dsv4.KERNELS[kernel], kernel, inputs, cfg)
    for o in ref:
        # every bit but a NaN's sign and payload: where a planted NaN meets one an
        # operation makes (0 * Inf), which of the two survives is the hardware's choice
        assert same_bits(canonical(ref[o]), canonical(out[o])), o


def canonical(x):
    x = np.array(x)
    if x.dtype.kind not in "biu":
        x[np.isnan(x.astype(np.float32))] = np.nan
    return x
