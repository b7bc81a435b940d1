"""Every public kernel against its golden, and the checks every kernel must pass:
bad input, untouched inputs, thread count and ISA independence, symmetric names."""
import dataclasses
import functools
import inspect
import platform

import ml_dtypes
import numpy as np
import pytest

import dsv4
from dsv4._families import FAMILIES, NAMES
from dsv4.check import fresh
from dsv4.compare import compare_outputs
from conftest import PATHS, SIMD, SMALL, SMALL_ATTN, same_bits, small_params

KERNELS = sorted(dsv4.KERNELS)


def c_vs_golden(kernel, inputs, **kw):
    c = dsv4.KERNELS[kernel](**fresh(kernel, inputs), **kw)
    g = getattr(dsv4.golden, kernel)(**fresh(kernel, inputs), **kw)
    assert set(c) == set(g) - {"stages"}
    report = compare_outputs(c, g, dsv4.specs.COMPARATORS[kernel], inputs=inputs)
    assert report, str(report)
    return c, g


# ---- C vs golden: small and odd shapes (tests/test_deployment.py: the deployment cases)

ODD = [
    ("rms_norm", dict(T=1)), ("rms_norm", dict(T=37)),
    ("qkv_proj_rope", dict(T=1)), ("qkv_proj_rope", dict(T=3)), ("qkv_proj_rope", dict(T=37)),
    ("decode_qkv_proj_rope", dict(B=3, S=1)), ("decode_qkv_proj_rope", dict(B=2, S=5)),
    ("prefill_qkv_proj_rope", dict(B=1, S=1, start_pos=0)),
    ("prefill_qkv_proj_rope", dict(B=2, S=37, start_pos=128)),
    ("prefill_qkv_proj_rope", dict(B=1, S=128, start_pos=8000)),
    ("prefill_qkv_proj_rope", dict(B=1, S=64, start_pos=8192 - 64)),
    ("hc_pre", dict(T=1)), ("hc_pre", dict(T=37)),
    ("hc_post", dict(T=1)), ("hc_post", dict(T=37)),
    ("hc_head", dict(T=1)), ("hc_head", dict(T=3)), ("hc_head", dict(T=37)),
    ("mtp_projection", dict(T=1)), ("mtp_projection", dict(T=37)),
    ("lm_head", dict(T=1, tp=1, vocab_size=1000)), ("lm_head", dict(T=37, tp=4, vocab_size=1000)),
]


@pytest.mark.parametrize("kernel,params", ODD, ids=[f"{k}-{p}" for k, p in ODD])
def test_odd_shapes(kernel, params):
    c_vs_golden(kernel, getattr(dsv4.specs, kernel)(**params, seed=7))


def test_prefill_positions_follow_start_pos():
    # the same tokens at another start_pos: only the rope columns may change
    a = dsv4.specs.prefill_qkv_proj_rope(B=1, S=16, start_pos=0, seed=5)
    b = dict(a, start_pos=128)
    oa, ob = dsv4.prefill_qkv_proj_rope(**a), dsv4.prefill_qkv_proj_rope(**b)
    N = dsv4.FLASH.nope_head_dim
    assert same_bits(oa["q"][..., :N], ob["q"][..., :N])
    assert not np.array_equal(oa["q"][..., N:], ob["q"][..., N:])
    # and equal to the per-token kernel given the gathered rows
    d = {k: v for k, v in b.items() if k not in ("freqs_cos", "freqs_sin", "start_pos")}
    d["rope_cos"] = np.ascontiguousarray(b["freqs_cos"][128:144])
    d["rope_sin"] = np.ascontiguousarray(b["freqs_sin"][128:144])
    od = dsv4.decode_qkv_proj_rope(**d)
    for name in ob:
        assert same_bits(ob[name], od[name]), name


@pytest.mark.parametrize("kernel", KERNELS)
def test_small_config(kernel):
    cfg = SMALL_ATTN
    params = {k: v for k, v in next(iter(dsv4.specs.CASES[kernel].values())).items()}
    params.update({"T": 5} if "T" in params else {})
    if kernel in SMALL_LAYER_CASES:
        # the layers on a small MoE too (tests/test_layers.py runs every kind)
        cfg, params = SMALL, SMALL_LAYER_CASES[kernel]
    inputs = getattr(dsv4.specs, kernel)(**params, seed=1, config=cfg)
    takes_config = "config" in inspect.signature(getattr(dsv4, kernel)).parameters
    c_vs_golden(kernel, inputs, **({"config": cfg} if takes_config else {}))


# ---- determinism ---------------------------------------------------------------

# the layers' smallest cases: a sliding-window, hash-routed layer; one short request
SMALL_CASES = {"decode_layer": dict(layer_id=0, n_local_experts=4, start_pos=1000),
               "prefill_layer": dict(layer_id=0, chunk_lens=(5,), n_local_experts=4),
               "lm_head": dict(T=8, vocab_size=2 * 500),
               "prefill_mtp": dict(num_tokens=5, n_local_experts=4)}


@functools.lru_cache(maxsize=None)
def _small_inputs(kernel, seed):
    params = small_params(kernel, SMALL_CASES.get(kernel))
    if kernel in SMALL_LAYER_CASES:
        # a layer's FLASH weights are a gigabyte: its inputs carry the small model, so
        # every call made with them runs on it
        return read_only(dict(getattr(dsv4.specs, kernel)(**params, seed=seed, config=SMALL),
                              config=SMALL))
    return read_only(getattr(dsv4.specs, kernel)(**params, seed=seed))


def read_only(inputs):
    for v in inputs.values():
        if isinstance(v, np.ndarray):
            v.setflags(write=False)
    return inputs


def small_inputs(kernel, seed=7):
    """Built once per module (FLASH weights take seconds to draw): the arrays are read-only,
    but the states and caches the kernel updates are the caller's own copies."""
    return {k: (v.copy() if k in dsv4.KERNELS[kernel].inouts else v)
            for k, v in _small_inputs(kernel, seed).items()}


@pytest.fixture(scope="module", autouse=True)
def _drop_small_inputs():
    yield
    _small_inputs.cache_clear()
    _layer_inputs.cache_clear()
    tiled_inputs.cache_clear()
    _scalar_ref.clear()


# the layers compose blocks and the MoE, whose paths the other kernels' cases cover at full
# size: their path and thread checks run a small model (CSA and hash-routed, the most glue)
SMALL_LAYER_CASES = {"decode_layer": dict(start_pos=1000, layer_id=2, n_local_experts=4),
                     "prefill_layer": dict(layer_id=2, chunk_lens=(130, 7), n_local_experts=4),
                     "prefill_mtp": dict(start_pos=300, num_tokens=77, n_local_experts=4)}


@functools.lru_cache(maxsize=None)
def _layer_inputs(kernel, seed):
    return read_only(getattr(dsv4.specs, kernel)(**SMALL_LAYER_CASES[kernel], seed=seed,
                                                  config=SMALL))


def path_inputs(kernel, seed):
    """Inputs for the thread and code-path checks, and the config to run them with (a
    layer's built once per module, read-only but for the caller's own states and caches)."""
    if kernel in SMALL_LAYER_CASES:
        inputs = _layer_inputs(kernel, seed)
        return ({k: (v.copy() if k in dsv4.KERNELS[kernel].inouts else v) for k, v in inputs.items()},
                {"config": SMALL})
    params = SMALL_CASES.get(kernel) or next(iter(dsv4.specs.CASES[kernel].values()))
    return getattr(dsv4.specs, kernel)(**params, seed=seed), {}


@pytest.mark.parametrize("kernel", KERNELS)
def test_same_bits_for_any_thread_count(kernel, threads):
    inputs, cfg = path_inputs(kernel, seed=7)
    runs = []
    unpinned = dsv4._C._unpinned_reads()
    for n in (1, 2, 3):
        threads(n)
        runs.append(dsv4.KERNELS[kernel](**fresh(kernel, inputs), **cfg))
    for other in runs[1:]:
        for name in runs[0]:
            assert same_bits(runs[0][name], other[name]), name
    # a call takes its code path and thread count once, on the calling thread, and passes
    # them into its parallel regions; the region's other threads have no copy, so a read
    # there sees the global setting, which a set_isa() from another Python thread can change
    # mid-call (the paths give the same bits, so the outputs cannot show it). The C core
    # counts such reads.
    assert dsv4._C._unpinned_reads() == unpinned, "a setting read inside a parallel region"




def need(name):
    if name not in dsv4.available_isas():
        pytest.skip(f"this CPU has no {name}")


_scalar_ref = {}


def assert_simd_matches_scalar(kernel, inputs, simd, isa, key=None, **kw):
    """`key` names the inputs, so that the paths of one kernel share one scalar run."""
    need(simd)
    ref = _scalar_ref.get(key) if key is not None else None
    if ref is None:
        isa("scalar")
        ref = dsv4.KERNELS[kernel](**fresh(kernel, inputs), **kw)
        _scalar_ref.clear()
        _scalar_ref[key] = ref
    isa(simd)
    out = dsv4.KERNELS[kernel](**fresh(kernel, inputs), **kw)
    for name in ref:
        assert same_bits(ref[name], out[name]), name


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("kernel", KERNELS)
def test_same_bits_scalar_and_simd(kernel, simd, isa):
    if kernel in SMALL_LAYER_CASES:
        inputs, cfg = path_inputs(kernel, seed=7)
        assert_simd_matches_scalar(kernel, inputs, simd, isa, key=(kernel, "path"), **cfg)
    else:
        assert_simd_matches_scalar(kernel, small_inputs(kernel), simd, isa, key=(kernel, "small"))


# 16 tokens or more, with the deployment's K, is where the int8 GEMMs run on AMX tiles; 8
# requests or more, where the weight-row projections fill whole 8-token blocks
TILED = {"decode_compressor_ratio4": dict(B=8, S=1),
         "decode_compressor_ratio128": dict(B=8, S=1),
         "decode_indexer_compressor": dict(B=8, S=1),
         "prefill_sparse_attn": dict(T=16, compress_ratio=4),
         "expert_shared": dict(T=16),
         "expert_routed": dict(T=16, n_local_experts=4),
         "moe": dict(T=16, n_ranks=2, layer_id=10, n_local_experts=4),
         "decode_indexer": dict(B=16, S=1),
         "prefill_indexer": dict(T=16, start_pos=0),
         "qkv_proj_rope": dict(T=16),
         "prefill_qkv_proj_rope": dict(B=1, S=16, start_pos=0)}


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("kernel", TILED)
def test_same_bits_scalar_and_simd_at_tile_sizes(kernel, simd, isa):
    assert_simd_matches_scalar(kernel, tiled_inputs(kernel), simd, isa, key=(kernel, "tiled"))


@functools.lru_cache(maxsize=1)
def tiled_inputs(kernel):
    return read_only(getattr(dsv4.specs, kernel)(**TILED[kernel], seed=7))


# The bf16 weight-row GEMM runs in 32-row panels and 256-wide k-blocks, 8 tokens at a time;
# here with partial panels (72 rows), a partial k-block whose width is no multiple of 8 or
# 16 (196), token blocks past 32 (40) and an odd token count (9)
PANEL = dataclasses.replace(SMALL_ATTN, head_dim=98, o_lora_rank=72)


@pytest.mark.parametrize("T", [40, 9])
@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("kernel", ["prefill_sparse_attn", "prefill_compressor_ratio4",
                                    "prefill_compressor_ratio128"])
def test_same_bits_scalar_and_simd_in_the_panel_gemm(kernel, simd, T, isa):
    cfg = PANEL
    params = dict(next(iter(dsv4.specs.CASES[kernel].values())), T=T)
    inputs = getattr(dsv4.specs, kernel)(**params, seed=4, config=cfg)
    takes_config = "config" in inspect.signature(getattr(dsv4, kernel)).parameters
    need(simd)
    run = dsv4.KERNELS[kernel]
    kw = {"config": cfg} if takes_config else {}
    isa("scalar")
    ref = run(**fresh(kernel, inputs), **kw)
    isa(simd)
    out = run(**fresh(kernel, inputs), **kw)
    for name in ref:
        assert same_bits(ref[name], out[name]), name


@pytest.mark.parametrize("kernel", KERNELS)
def test_inputs_unchanged(kernel):
    inputs, cfg = path_inputs(kernel, seed=7) if kernel in SMALL_LAYER_CASES else (small_inputs(kernel), {})
    before = {k: np.copy(v) for k, v in inputs.items()}
    dsv4.KERNELS[kernel](**fresh(kernel, inputs), **cfg)
    getattr(dsv4.golden, kernel)(**fresh(kernel, inputs), **cfg)
    for k in inputs:
        assert same_bits(np.asarray(inputs[k]), before[k]), k


# ---- one name, four places -------------------------------------------------------

def test_every_kernel_has_one_family():
    # dsv4.golden and dsv4.specs take their names from this registry
    assert len(set(NAMES)) == len(NAMES)
    assert set(KERNELS) <= set(NAMES)
    for family, names in FAMILIES.items():
        for name in names:
            assert callable(getattr(dsv4, name)), name
            assert getattr(dsv4.golden, name).__module__ == f"dsv4.golden.{family}", name
            assert getattr(dsv4.specs, name).__module__ == f"dsv4.specs.{family}", name


@pytest.mark.parametrize("kernel", KERNELS)
def test_names_are_symmetric(kernel):
    c = inspect.signature(getattr(dsv4, kernel))
    g = inspect.signature(getattr(dsv4.golden, kernel))
    # a golden may return stages where the C kernel does not; where both do, both say so
    assert list(c.parameters) == [p for p in g.parameters if p != "stages" or "stages" in c.parameters]
    assert callable(getattr(dsv4.specs, kernel))
    assert kernel in dsv4.specs.COMPARATORS and kernel in dsv4.specs.CASES
    outs, inouts = getattr(dsv4, kernel).outputs, getattr(dsv4, kernel).inouts
    assert set(outs) <= set(dsv4.specs.COMPARATORS[kernel]) <= set(outs) | set(inouts)


def doc_section(doc, title, indent):
    """{name: description} of the `name : description` lines of a numpydoc section."""
    lines = doc.split("\n")
    start = lines.index(title) + 2
    entries = {}
    for line in lines[start:]:
        if not line.strip():
            break
        if line.startswith(" " * indent) and not line.startswith(" " * (indent + 1)):
            name, sep, text = line.strip().partition(" : ")
            if sep:
                entries[name] = text
    return entries


def doc_array(text):
    """(dtype name, dims) of a documented array 'bfloat16 [T, D]...'; dims None if flat."""
    dtype, _, rest = text.partition(" [")
    dims = rest.partition("]")[0].split(", ")
    return dtype, None if "any shape" in rest else dims


@pytest.mark.parametrize("kernel", KERNELS)
def test_docstring_describes_the_golden_and_the_inputs(kernel):
    # the docstring is generated from the kernel table: check it against what the table
    # does not make, the golden's signature and outputs and the input builder's arrays
    inputs, cfg = path_inputs(kernel, seed=7) if kernel in SMALL_LAYER_CASES else (small_inputs(kernel), {})
    doc = getattr(dsv4, kernel).__doc__
    params, returns = doc_section(doc, "Parameters", 0), doc_section(doc, "Returns", 4)
    golden = getattr(dsv4.golden, kernel)
    assert set(params) == set(inspect.signature(golden).parameters) - {"stages"}
    kw = fresh(kernel, inputs)
    out = golden(**kw, **cfg)
    inouts = {k for k, v in out.items() if any(v is x for x in kw.values())}
    assert {k for k, t in params.items() if "(updated in place)" in t} == inouts
    assert {k for k, t in returns.items() if t == "the argument itself, updated"} == inouts
    arrays = dict(inputs)
    arrays.update((k, v) for k, v in out.items() if k not in inouts and k != "stages")
    assert set(returns) - {"stages"} == set(arrays) - set(inputs) | inouts
    sizes = {}
    for name, v in arrays.items():
        text = params.get(name) if name in inputs else returns.get(name)
        assert text is not None, f"'{name}' is not documented"
        if not isinstance(v, np.ndarray):
            assert text.split(",")[0] in ("int", "float"), (name, text)
            continue
        dtype, dims = doc_array(text)
        assert dtype == v.dtype.name, (name, text, v.dtype)
        if dims is None:
            continue
        assert len(dims) == v.ndim, (name, text, v.shape)
        for d, n in zip(dims, v.shape):
            if d.isdigit():
                assert int(d) == n, (name, text, v.shape)
            elif d != "_":
                # one symbol, one size, in every argument and output
                assert sizes.setdefault(d, (n, name))[0] == n, (name, d, n, sizes[d])


# ---- bad input --------------------------------------------------------------------

def flat_args(kernel):
    return {a["name"] for a in dsv4._kernels.TABLE[kernel]["args"] if a["flat"]}


def free_last_dim(kernel, name):
    """True if the argument's last dimension is tied to nothing else (e.g. an index width)."""
    args = dsv4._kernels.TABLE[kernel]["args"]
    last = next(a for a in args if a["name"] == name)["dims"].split(",")[-1]
    if last == "_":
        return True
    if last.isdigit():
        return False
    return sum(last in a["dims"].split(",") for a in args if a["role"] != "unused") == 1


def first_array(kernel, inputs):
    sig = inspect.signature(getattr(dsv4, kernel))
    return next(n for n in sig.parameters if isinstance(inputs.get(n), np.ndarray))


@pytest.mark.parametrize("kernel", KERNELS)
def test_wrong_dtype_names_the_argument(kernel):
    inputs = small_inputs(kernel)
    for name, v in inputs.items():
        if not isinstance(v, np.ndarray):
            continue
        wrong = np.float64 if v.dtype != np.float64 else np.float32
        bad = dict(inputs, **{name: np.zeros(v.shape, wrong)})     # refused before it is read
        with pytest.raises(TypeError, match=rf"'{name}'.*{np.dtype(v.dtype).name}.*float"):
            dsv4.KERNELS[kernel](**bad)


@pytest.mark.parametrize("kernel", KERNELS)
def test_wrong_shape_names_the_argument(kernel):
    inputs = small_inputs(kernel)
    for name, v in inputs.items():
        if not isinstance(v, np.ndarray):
            continue
        grown = np.zeros(v.shape[:-1] + (v.shape[-1] + 1,), v.dtype)
        if not free_last_dim(kernel, name):
            with pytest.raises(ValueError, match=rf"'{name}'"):
                dsv4.KERNELS[kernel](**dict(inputs, **{name: grown}))
        if name in flat_args(kernel):
            continue
        with pytest.raises(ValueError, match=rf"'{name}'.*rank {v.ndim}"):
            dsv4.KERNELS[kernel](**dict(inputs, **{name: v[None]}))


@pytest.mark.parametrize("kernel", KERNELS)
def test_non_contiguous_is_refused(kernel):
    inputs = small_inputs(kernel)
    name = first_array(kernel, inputs)
    v = inputs[name]
    strided = np.repeat(v, 2, axis=-1)[..., ::2]
    assert not strided.flags.c_contiguous
    with pytest.raises(ValueError, match=rf"'{name}'.*C-contiguous"):
        dsv4.KERNELS[kernel](**dict(inputs, **{name: strided}))


@pytest.mark.parametrize("kernel", KERNELS)
def test_missing_and_unknown_arguments(kernel):
    inputs = small_inputs(kernel)
    name = first_array(kernel, inputs)
    with pytest.raises(TypeError, match=rf"^{kernel}: .*'{name}'"):
        dsv4.KERNELS[kernel](**{k: v for k, v in inputs.items() if k != name})
    with pytest.raises(TypeError, match="bogus"):
        dsv4.KERNELS[kernel](**inputs, bogus=1)
    with pytest.raises(TypeError, match="list"):
        dsv4.KERNELS[kernel](**dict(inputs, **{name: inputs[name].tolist()}))


def test_a_wrong_first_argument_is_named():
    # x binds D first, so the disagreement shows up at wq_a: both must be named
    d = small_inputs("qkv_proj_rope")
    x = d["x"][:, :-1].copy()
    D = d["x"].shape[1]
    with pytest.raises(ValueError, match=rf"'x' and 'wq_a' disagree on D: {D - 1} in 'x', {D} in 'wq_a'"):
        dsv4.qkv_proj_rope(**dict(d, x=x))


def test_related_dims_are_checked():
    d = small_inputs("qkv_proj_rope")
    with pytest.raises(ValueError, match="'wq_b' has 32767 columns.*multiple of head_dim"):
        dsv4.qkv_proj_rope(**dict(d, wq_b=d["wq_b"][:, :-1].copy(), wq_b_scale=d["wq_b_scale"][:-1].copy()))
    with pytest.raises(ValueError, match="columns.*qk_rope_head_dim"):
        dsv4.qkv_proj_rope(**dict(d, rope_cos=d["rope_cos"][:, :32].copy(), rope_sin=d["rope_sin"][:, :32].copy()))
    dec = small_inputs("decode_qkv_proj_rope")
    with pytest.raises(ValueError, match="'rope_cos'.*B\\*S"):
        dsv4.decode_qkv_proj_rope(**dict(dec, rope_cos=dec["rope_cos"][:-1].copy(), rope_sin=dec["rope_sin"][:-1].copy()))


@pytest.mark.parametrize("start_pos", [-1, 8192 - 2, 8192, 10**6])
def test_start_pos_out_of_range(start_pos):
    d = dsv4.specs.prefill_qkv_proj_rope(B=1, S=3, seed=0)
    for fn in (dsv4.prefill_qkv_proj_rope, dsv4.golden.prefill_qkv_proj_rope):
        with pytest.raises(ValueError, match=f"start_pos = {start_pos}"):
            fn(**dict(d, start_pos=start_pos))


def test_start_pos_must_be_an_integer():
    d = dsv4.specs.prefill_qkv_proj_rope(B=1, S=3, seed=0)
    with pytest.raises(TypeError, match="start_pos"):
        dsv4.prefill_qkv_proj_rope(**dict(d, start_pos=1.5))
    out = dsv4.prefill_qkv_proj_rope(**dict(d, start_pos=np.asarray(5, np.int32)))
    ref = dsv4.prefill_qkv_proj_rope(**dict(d, start_pos=5))
    assert same_bits(out["q"], ref["q"])


def test_wq_b_scale_in_pypto_layout():
    # PR #374 stores wq_b_scale as [256, 128]; any shape of H*HD elements is accepted
    d = dsv4.specs.prefill_qkv_proj_rope(B=1, S=2, seed=0)
    flat = dsv4.prefill_qkv_proj_rope(**d)
    tiled = dsv4.prefill_qkv_proj_rope(**dict(d, wq_b_scale=d["wq_b_scale"].reshape(256, 128)))
    assert same_bits(flat["q"], tiled["q"])


def test_unused_selectors_are_accepted_and_checked():
    d = small_inputs("decode_qkv_proj_rope")
    sel = np.zeros((32, 64), ml_dtypes.bfloat16)
    out = dsv4.decode_qkv_proj_rope(**d, even_select_t=sel, odd_select_t=sel)
    assert same_bits(out["q"], dsv4.decode_qkv_proj_rope(**d)["q"])
    with pytest.raises(TypeError, match="even_select_t"):
        dsv4.decode_qkv_proj_rope(**d, even_select_t=sel.astype(np.float32))


def test_config_by_name_and_bad_config():
    d = small_inputs("rms_norm")
    assert same_bits(dsv4.rms_norm(**d, config="flash")["x_normed"], dsv4.rms_norm(**d)["x_normed"])
    with pytest.raises(ValueError, match="nope"):
        dsv4.rms_norm(**d, config="nope")


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f
                         if line.startswith("flags")), None)
    except OSError:
        return None


def test_isa_levels_are_ordered():
    # listed from the slowest; each vector level needs the one it builds on
    names = dsv4.available_isas()
    assert names[0] == "scalar" and names == tuple(n for n in PATHS if n in names), names
    for level, base in (("avxvnni", "avx2"), ("avx512", "avx2"), ("amx", "avx512")):
        assert level not in names or base in names, (level, names)


def test_isa_levels_follow_the_cpu_flags():
    flags = cpu_flags()
    if flags is None or platform.machine() != "x86_64":
        pytest.skip("needs /proc/cpuinfo of an x86-64 CPU")
    names = dsv4.available_isas()
    want = {"avx2": {"avx2", "fma"}, "avxvnni": {"avx2", "fma", "avx_vnni"},
            "avx512": {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}}
    for level, need in want.items():
        assert (level in names) == (need <= flags), (level, sorted(need - flags))
    if "amx" in names:   # AMX also needs the kernel's permission, which the flags do not show
        assert {"amx_tile", "amx_int8"} <= flags


def test_set_num_threads_rejects_nonsense():
    with pytest.raises(ValueError, match="n must be"):
        dsv4.set_num_threads(0)
    with pytest.raises(ValueError, match="isa"):
        dsv4.set_isa("sse9")


# ---- output buffers (pypto-lib's pre-allocated outputs) ----------------------------

@pytest.mark.parametrize("kernel", KERNELS)
def test_output_buffers_are_written_in_place(kernel):
    inputs, cfg = path_inputs(kernel, seed=7) if kernel in SMALL_LAYER_CASES else (small_inputs(kernel), {})
    for impl in (dsv4.KERNELS[kernel], getattr(dsv4.golden, kernel)):
        ref = impl(**fresh(kernel, inputs), **cfg)
        bufs = {k: np.zeros_like(v) for k, v in ref.items() if k in dsv4.KERNELS[kernel].outputs}
        # a pypto-lib tensor dict holds the zeroed outputs beside the inputs
        out = impl(**fresh(kernel, inputs), **bufs, **cfg)
        for name, buf in bufs.items():
            assert out[name] is buf, name
            assert same_bits(buf, ref[name]), name       # the values of a call without buffers


GUARD = 256      # bytes each side of a view; a multiple of every dtype's alignment


def guarded(v, seed):
    """A copy of v inside a larger buffer whose bytes around it hold a seeded pattern."""
    raw = np.resize(np.random.default_rng(seed).integers(0, 256, 4093, dtype=np.uint8),
                    v.nbytes + 2 * GUARD)
    view = raw[GUARD:GUARD + v.nbytes].view(v.dtype).reshape(v.shape)
    view[...] = v
    return view, raw


def changed(a, b):
    """Per element of a: whether its bits differ from b's."""
    bits = np.dtype(f"u{a.dtype.itemsize}")
    return np.ascontiguousarray(a).view(bits) != np.ascontiguousarray(b).view(bits)


@pytest.mark.parametrize("kernel", KERNELS)
def test_no_write_outside_outputs_and_written_rows(kernel):
    # every output and every state or cache is a view into a larger patterned buffer: the
    # call writes no byte outside the views, and in a state or cache only elements the
    # golden writes too
    inputs, cfg = path_inputs(kernel, seed=7) if kernel in SMALL_LAYER_CASES else (small_inputs(kernel), {})
    fn = dsv4.KERNELS[kernel]
    ref = fn(**fresh(kernel, inputs), **cfg)
    gold = getattr(dsv4.golden, kernel)(**fresh(kernel, inputs), **cfg)
    views, raws = {}, {}
    for i, name in enumerate(fn.outputs + fn.inouts):
        v = np.zeros_like(ref[name]) if name in fn.outputs else inputs[name]
        views[name], raws[name] = guarded(v, seed=i)
    pristine = {k: r.copy() for k, r in raws.items()}
    out = fn(**dict(inputs, **views), **cfg)
    for name, raw in raws.items():
        assert out[name] is views[name], name
        assert same_bits(raw[:GUARD], pristine[name][:GUARD]), f"'{name}': wrote before the view"
        assert same_bits(raw[-GUARD:], pristine[name][-GUARD:]), f"'{name}': wrote after the view"
        assert same_bits(views[name], ref[name]), f"'{name}': not the values of a call without views"
    for name in fn.inouts:
        stray = changed(views[name], inputs[name]) & ~changed(gold[name], inputs[name])
        assert not stray.any(), (f"'{name}': {stray.sum()} elements the golden leaves alone were "
                                 f"written, first at {np.argwhere(stray)[0].tolist()}")


@pytest.mark.parametrize("kernel", [k for k in KERNELS if dsv4.KERNELS[k].outputs])
def test_bad_output_buffers(kernel):
    inputs = small_inputs(kernel)
    ref = dsv4.KERNELS[kernel](**fresh(kernel, inputs))
    name = dsv4.KERNELS[kernel].outputs[0]
    v = ref[name]
    with pytest.raises(ValueError, match=f"'{name}'"):
        dsv4.KERNELS[kernel](**inputs, **{name: np.zeros(v.shape[:-1] + (v.shape[-1] + 1,), v.dtype)})
    with pytest.raises(TypeError, match=f"'{name}'"):
        dsv4.KERNELS[kernel](**inputs, **{name: np.zeros(v.shape, np.float64)})
    ro = np.zeros_like(v)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match=f"'{name}' is read-only"):
        dsv4.KERNELS[kernel](**inputs, **{name: ro})
    with pytest.raises(ValueError, match=f"'{name}'"):
        getattr(dsv4.golden, kernel)(**inputs, **{name: np.zeros(v.shape, np.float64)})


def test_output_may_not_overlap_an_input():
    inputs = dsv4.specs.hc_post(T=2, seed=0)
    alias = inputs["residual"]                      # same shape and dtype as y
    before = alias.copy()
    with pytest.raises(ValueError, match="'y' overlaps argument 'residual'"):
        dsv4.hc_post(**inputs, y=alias)
    assert same_bits(alias, before)


@pytest.mark.parametrize("simd", ["avx2", "avx512"])
def test_vector_bf16_store_matches_scalar_on_special_values(simd, isa):
    need(simd)
    # NaN, infinities, ties and overflow go through the vector bf16 rounding of hc_post
    d = dsv4.specs.hc_post(T=2, seed=1)
    x = d["x"].astype(np.float32)
    special = np.array([np.nan, np.inf, -np.inf, 1.00390625, -1.00390625, 3.0e38, -0.0, 1e-40],
                       np.float32)
    x[0, :special.size] = special
    x[0, 8:10] = [1.0, -1.0]
    d["x"] = x.astype(ml_dtypes.bfloat16)
    d["post"] = np.full_like(d["post"], 1.0)
    d["post"][0, 1] = 1.00390625          # x * post = +-1.00390625: a bf16 tie, to even
    d["comb"] = np.zeros_like(d["comb"])
    isa("scalar")
    ref = dsv4.hc_post(**d)["y"]
    isa(simd)
    assert same_bits(dsv4.hc_post(**d)["y"], ref)
    y = ref.astype(np.float32)
    assert np.isnan(y[0, 0, 0]) and y[0, 0, 1] == np.inf
    assert y[0, 1, 8] == 1.0 and y[0, 1, 9] == -1.0


# ---- states and caches (pypto-lib's InOut tensors) ------------------------------------

INOUT_KERNELS = [k for k in KERNELS if dsv4.KERNELS[k].inouts]


@pytest.mark.parametrize("kernel", INOUT_KERNELS)
def test_inout_arguments(kernel):
    inputs = small_inputs(kernel)
    kw = fresh(kernel, inputs)
    out = dsv4.KERNELS[kernel](**kw)
    for name in dsv4.KERNELS[kernel].inouts:
        assert out[name] is kw[name], name             # updated in place and returned
    ro = fresh(kernel, inputs)
    name = dsv4.KERNELS[kernel].inouts[0]
    ro[name].setflags(write=False)
    with pytest.raises(ValueError, match=f"'{name}' is read-only"):
        dsv4.KERNELS[kernel](**ro)


@pytest.mark.parametrize("kernel", [k for k in INOUT_KERNELS if dsv4.KERNELS[k].outputs])
def test_bad_output_buffer_leaves_states_untouched(kernel):
    inputs = small_inputs(kernel)
    name = dsv4.KERNELS[kernel].outputs[0]
    for impl in (dsv4.KERNELS[kernel], getattr(dsv4.golden, kernel)):
        kw = fresh(kernel, inputs)
        before = {k: kw[k].copy() for k in dsv4.KERNELS[kernel].inouts}
        with pytest.raises((ValueError, TypeError), match=name):
            impl(**kw, **{name: np.zeros((1,), np.float64)})
        for k in before:
            assert same_bits(kw[k], before[k]), k
