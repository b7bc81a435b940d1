"""Stage bisection: every golden's stages (same output bits, documented names), and
dsv4.bisect.bisect finding the stage where a dump first departs from the golden."""
import inspect
import re

import numpy as np
import pytest

import dsv4
from dsv4.bisect import bisect
from dsv4.check import fresh
from dsv4.golden.numerics import BF16, matmul_i8
from conftest import SMALL, same_bits, small_params


# builder arguments, under SMALL, where a kernel's small case (conftest.small_params) will not do
CASES = {
    "decode_qkv_proj_rope": dict(B=2, S=2), "prefill_qkv_proj_rope": dict(B=1, S=5, start_pos=7),
    "gate": dict(T=5, layer_id=10, num_tokens=4),
    "expert_routed": dict(T=4, n_local_experts=2),
    "moe": dict(T=4, n_ranks=2, layer_id=10, n_local_experts=4),
    "prefill_sparse_attn": dict(T=8), "decode_sparse_attn": dict(B=2, S=1),
    "decode_sparse_attn_hca": dict(B=2, S=1), "decode_sparse_attn_swa": dict(B=2, S=2),
    "decode_compressor_ratio4": dict(B=4, start_pos=7, history=True),
    "decode_compressor_ratio128": dict(B=4, start_pos=255, history=True),
    "prefill_compressor_ratio4": dict(T=16, start_pos=5),
    "prefill_compressor_ratio128": dict(T=16, start_pos=120),
    "decode_indexer_compressor": dict(B=4), "prefill_indexer_compressor": dict(T=16, start_pos=5),
    "decode_indexer": dict(B=4), "prefill_indexer": dict(T=16, start_pos=5),
    "prefill_attention_swa": dict(T=16),
    "prefill_attention_hca": dict(T=16), "prefill_attention_csa": dict(T=16),
    "decode_layer": dict(start_pos=1000, layer_id=2, n_local_experts=4),
    "prefill_layer": dict(layer_id=2, chunk_lens=(5,), n_local_experts=4),
    "prefill_mtp": dict(num_tokens=5, n_local_experts=4),
}
# bisect works on the kernels of the C table
GOLDENS = [k for k in dsv4.golden.__all__ if k in dsv4.KERNELS]


def inputs_of(kernel, seed=3):
    params = CASES[kernel] if kernel in CASES else small_params(kernel)
    return getattr(dsv4.specs, kernel)(**params, seed=seed, config=SMALL)


def config_kw(fn):
    return {"config": SMALL} if "config" in inspect.signature(fn).parameters else {}


def run_golden(kernel, inputs):
    fn = getattr(dsv4.golden, kernel)
    out = fn(**fresh(kernel, inputs), **config_kw(fn), stages=True)
    st = {k: v for k, v in out.pop("stages").items() if isinstance(v, np.ndarray)}
    return out, st


def perturb(v):
    """A wrong value everywhere, for every comparator: floats moved by a quarter plus one,
    int8 codes by 3, other integers by a quarter plus one."""
    if v.dtype == np.int8:
        return np.where(v > 0, v - 3, v + 3).astype(np.int8)
    if v.dtype.kind in "iu":
        return v + np.abs(v) // 4 + 1
    f = v.astype(np.float32)
    with np.errstate(invalid="ignore"):
        moved = f + np.abs(f) * np.float32(0.25) + np.float32(1)
    return np.where(np.isfinite(f), moved, f).astype(v.dtype)      # empty rows stay -inf


def broken_from(order, dump, stage):
    """The dump with `stage` and every tensor computed after it wrong, as a real bug
    propagates."""
    i = order.index(stage)
    return {n: (perturb(v) if order.index(n) >= i else v) for n, v in dump.items()}


def test_every_case_is_a_kernel():
    assert set(CASES) <= set(GOLDENS)


# ---- every golden: stages=True changes no bit, and its docstring names every stage ----

@pytest.mark.parametrize("kernel", GOLDENS)
def test_stages_keep_the_output_bits_and_are_documented(kernel):
    inputs = inputs_of(kernel)
    fn = getattr(dsv4.golden, kernel)
    plain = fn(**fresh(kernel, inputs), **config_kw(fn))
    out = fn(**fresh(kernel, inputs), **config_kw(fn), stages=True)
    assert "stages" not in plain and set(out) == set(plain) | {"stages"}
    for name, v in plain.items():
        a, b = np.ascontiguousarray(v), np.ascontiguousarray(out[name])
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name
    st = out["stages"]
    assert st and all(isinstance(v, (np.ndarray, list)) for v in st.values())
    doc = fn.__doc__
    assert "Stages" in doc
    for name in st:
        assert re.search(rf"\b{name}\b", doc), f"{kernel}: stage {name!r} is not in the docstring"
    # a stage that shares an output's name is that output
    for name in set(st) & set(plain):
        assert np.asarray(st[name]).tobytes() == np.asarray(out[name]).tobytes(), name


@pytest.mark.parametrize("kernel", [k for k in dsv4.KERNELS if dsv4.KERNELS[k].stages])
def test_c_stages_are_golden_stages(kernel):
    """The C kernel's stages carry the golden's names, and a dump of them passes bisect
    against the golden."""
    inputs = inputs_of(kernel)
    _, g_st = run_golden(kernel, inputs)
    c = dsv4.KERNELS[kernel](**fresh(kernel, inputs), config=SMALL, stages=True)
    c_st = c.pop("stages")
    assert set(c_st) <= set(g_st)
    res = bisect(kernel, inputs, c_st, npu_outputs=c, config=SMALL)
    assert [s.name for s in res.stages] == [n for n in res.order if n in c_st or n in c]
    if not kernel.endswith("_layer"):
        # Attention mixes tokens: one kv element whose bf16 rounding went the other way
        # upstream (allowed there) moves every attn_out row that reads it. So in an
        # attention block attn_out may fail only after an earlier stage differs in bits;
        # every other stage and every output passes.
        for s in res.stages:
            if s.passed:
                continue
            assert kernel.startswith(("decode_attention", "prefill_attention")) \
                and s.name == "attn_out", str(res)
            earlier = res.order[:res.order.index(s.name)]
            assert any(n in c_st and not same_bits(c_st[n], g_st[n]) for n in earlier), str(res)
        return
    # A layer's block stages hold R x T tokens: one token whose bf16 or int8 rounding went
    # the other way upstream (allowed there) moves all its later stages past a budget sized
    # for the whole tensor. So a stage may fail only on tokens that already differ in bits
    # in an earlier stage.
    moved = np.zeros(c_st["x_mixed"].shape[:2], bool)        # [R, T]
    for s in res.stages:
        if s.name not in c_st or c_st[s.name].shape[:2] != moved.shape:
            continue
        if not s.passed:
            bad = s.result.mask.reshape(*moved.shape, -1).any(axis=-1)
            assert not (bad & ~moved).any(), \
                f"{s.name} fails on tokens no earlier stage moved: {np.argwhere(bad & ~moved)[:5]}"
        a, b = np.ascontiguousarray(c_st[s.name]), np.ascontiguousarray(g_st[s.name])
        moved |= (a.view(np.uint8) != b.view(np.uint8)).reshape(*moved.shape, -1).any(axis=-1)


# ---- bisect: one kernel of each family ---------------------------------------------

FAMILIES = [
    ("qkv_proj_rope", "q_i32"),                 # an int32 sum of int8 products
    ("hc_pre", "comb_logits"),
    ("decode_compressor_ratio4", "pooled"),
    ("prefill_compressor_ratio4", "normed"),
    ("decode_indexer", "weights"),
    ("prefill_indexer", "q_rot"),
    ("decode_sparse_attn", "Ob"),
    ("moe", "routed_y"),
    ("decode_attention_csa", "compressed_kv"),
    ("prefill_attention_csa", "sparse_indices"),  # an index row: exact
]


@pytest.mark.parametrize("kernel,stage", FAMILIES, ids=[k for k, _ in FAMILIES])
def test_bisect_names_the_perturbed_stage(kernel, stage):
    inputs = inputs_of(kernel)
    outputs, dump = run_golden(kernel, inputs)
    before = {k: np.copy(v) for k, v in inputs.items() if isinstance(v, np.ndarray)}
    extra = {k: v for k, v in outputs.items() if k not in dump}

    clean = bisect(kernel, inputs, dump, npu_outputs=extra, config=SMALL)
    assert clean and clean.first_failure is None and not clean.failed
    assert [s.name for s in clean.stages] == clean.order        # everything, in order
    assert all(s.kind == ("output" if s.name in outputs else "stage") for s in clean.stages)
    assert "all" in str(clean) and "FAIL" not in str(clean)

    order = clean.order
    res = bisect(kernel, inputs, broken_from(order, {**dump, **extra}, stage), config=SMALL)
    assert not res and res.first_failure == stage
    i = order.index(stage)
    assert all(s.passed for s in res.stages if s.index <= i)      # earlier stages pass
    assert not res[stage].passed and res.stages[i].name == stage
    assert res.failed[0] == stage
    text = str(res)
    assert f"first departure at '{stage}'" in text and res[stage].message in text
    assert "<table>" in res._repr_html_() and f"<b>{stage}</b>" in res._repr_html_()
    # the golden ran on copies: the caller's states and caches are unchanged
    for k, v in before.items():
        assert np.asarray(inputs[k]).tobytes() == v.tobytes(), k


def test_undumped_stages_are_named_between_pass_and_failure():
    kernel, stage = "decode_attention_csa", "topk_idxs"
    inputs = inputs_of(kernel)
    _, dump = run_golden(kernel, inputs)
    order = list(dump)
    broken = broken_from(order, dump, stage)
    partial = {n: broken[n] for n in ("x_mixed", "qr", "attn_out")}
    res = bisect(kernel, inputs, partial, config=SMALL)
    assert [s.name for s in res.stages] == ["x_mixed", "qr", "attn_out"]
    assert res.first_failure == "attn_out"
    last, between = res.window()
    assert last == "qr" and between == order[order.index("qr") + 1:order.index("attn_out")]
    assert "topk_idxs" in res.not_dumped and "dump " in str(res)


def test_unknown_or_doubled_names_raise():
    inputs = inputs_of("hc_pre")
    outputs, dump = run_golden("hc_pre", inputs)
    with pytest.raises(ValueError, match=r"no stage or output \['mixes'\].*mix, pre, post"):
        bisect("hc_pre", inputs, {"mixes": dump["mix"]}, config=SMALL)
    with pytest.raises(ValueError, match="both"):
        bisect("hc_pre", inputs, {"post": dump["post"]}, npu_outputs={"post": outputs["post"]},
               config=SMALL)
    with pytest.raises(ValueError, match="unknown kernel"):
        bisect("hc_pre_v2", inputs, dump)
    with pytest.raises(ValueError, match="reference"):
        bisect("hc_pre", inputs, dump, config=SMALL, reference="npu")


# ---- the comparator rules ----------------------------------------------------------

def test_codes_may_be_off_by_one_and_their_sums_follow():
    """An NPU whose int8 qr differs by one code in a few places (pypto-lib allows it) passes
    qr, and the int32 sums q_i32 built from that qr pass too; a code off by two fails."""
    kernel = "qkv_proj_rope"
    inputs = inputs_of(kernel)
    _, dump = run_golden(kernel, inputs)
    qr = dump["qr"].copy()
    qr[0, :5] = np.where(qr[0, :5] < 127, qr[0, :5] + 1, qr[0, :5] - 1)
    npu = {"qr": qr, "q_i32": matmul_i8(qr, np.asarray(inputs["wq_b"]))}
    assert not np.array_equal(npu["q_i32"], dump["q_i32"])
    assert bisect(kernel, inputs, npu, config=SMALL)
    qr[1, 0] = qr[1, 0] + 2 if qr[1, 0] < 126 else qr[1, 0] - 2
    res = bisect(kernel, inputs, {"qr": qr}, config=SMALL)
    assert res.first_failure == "qr" and res["qr"].bad == 1


def test_index_rows_are_exact_and_values_bf16_close():
    kernel = "decode_attention_csa"
    inputs = inputs_of(kernel)
    _, dump = run_golden(kernel, inputs)
    idx = dump["sparse_indices"].copy()
    idx[0, 0] += 1
    assert bisect(kernel, inputs, {"sparse_indices": idx}, config=SMALL).first_failure == \
        "sparse_indices"
    # attn_out one bf16 ulp off everywhere: inside the bf16-level tolerance; two: not
    bits = dump["attn_out"].astype(np.float32).view(np.uint32)
    for ulps, ok in ((1, True), (2, False)):
        moved = (bits + np.uint32(ulps << 16)).view(np.float32).astype(BF16)
        assert bool(bisect(kernel, inputs, {"attn_out": moved}, config=SMALL)) == ok


def test_topk_pairs_read_the_dumped_values():
    """The gate's indices are paired with weights as pypto-lib does: two experts swapped
    are legal where the NPU's weights tie, not where they break the descending order."""
    kernel = "gate"
    inputs = inputs_of(kernel)
    _, dump = run_golden(kernel, inputs)
    idx, w = dump["indices"].copy(), dump["weights"].copy()
    assert w[0, 0] > w[0, 1] >= w[0, 2]
    idx[0, [0, 1]] = idx[0, [1, 0]]
    tie, broken = w.copy(), w.copy()
    tie[0, 1] = w[0, 0]
    broken[0, 1] = w[0, 0] * 2
    res = bisect(kernel, inputs, {"indices": idx, "weights": tie}, config=SMALL)
    assert res["indices"].passed and not res["weights"].passed    # a tie the golden lacks
    res = bisect(kernel, inputs, {"indices": idx, "weights": broken}, config=SMALL)
    assert res.first_failure == "indices" and res["indices"].bad == 2
    # without dumped weights the golden's pair with the indices
    assert bisect(kernel, inputs, {"indices": idx}, config=SMALL)["indices"].passed


# ---- reference="c" -----------------------------------------------------------------

def test_reference_c_uses_the_c_stages():
    kernel = "decode_attention_csa"
    inputs = inputs_of(kernel)
    c = dsv4.KERNELS[kernel](**fresh(kernel, inputs), config=SMALL, stages=True)
    dump = c.pop("stages")
    clean = bisect(kernel, inputs, dump, npu_outputs=c, config=SMALL, reference="c")
    assert clean and {s.reference for s in clean.stages} == {"c"}
    assert all(s.result.max_abs_err == 0 for s in clean.stages)    # its own bits
    res = bisect(kernel, inputs, broken_from(list(dump), dump, "q"), config=SMALL,
                 reference="c")
    assert res.first_failure == "q" and "against the C kernel" in str(res)


def test_reference_c_falls_back_to_the_golden():
    kernel = "decode_layer"
    inputs = inputs_of(kernel)
    _, dump = run_golden(kernel, inputs)
    names = ("x_normed", "sparse_indices", "x_attn", "moe_ffn")
    res = bisect(kernel, inputs, {n: dump[n] for n in names}, config=SMALL, reference="c")
    assert res and [(s.name, s.reference) for s in res.stages] == \
        [("x_normed", "c"), ("sparse_indices", "golden"), ("x_attn", "c"), ("moe_ffn", "golden")]
