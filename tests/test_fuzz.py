"""The binding under random bad input. Every public kernel is called with arguments
mutated from small valid inputs; each call either works or raises TypeError/ValueError,
a call that raises leaves every in-place argument as it was, and input that can never be
valid (a wrong dtype, rank or layout, an alias of a written buffer) is refused.

Seeded and replayable: DSV4_FUZZ_SEED (default 0) picks the sequence, DSV4_FUZZ_ITERS
(default 200) the mutated calls per kernel; a failure names the seed, the call and the
mutations. Also here: repeated calls, failing ones included, hold no memory.
"""
import dataclasses
import functools
import gc
import inspect
import os
import sys
import zlib

import ml_dtypes
import numpy as np
import pytest

import dsv4
from dsv4._kernels import TABLE
from conftest import same_bits, small_params

SEED = int(os.environ.get("DSV4_FUZZ_SEED", "0"))
ITERS = int(os.environ.get("DSV4_FUZZ_ITERS", "200"))

# small enough that a call takes milliseconds, large enough for every builder's tiling
TINY = dataclasses.replace(
    dsv4.FLASH, name="tiny", hidden_size=128, q_lora_rank=128, num_attention_heads=2,
    head_dim=64, qk_rope_head_dim=16, o_groups=2, o_lora_rank=32, moe_intermediate_size=128,
    n_routed_experts=8, index_n_heads=8, index_head_dim=32, index_topk=8, vocab_size=256,
    max_position_embeddings=512, sliding_window=16)

# builder parameters where a kernel's small case (conftest.small_params) will not do: the
# start positions complete a window, so caches are written
PARAMS = {
    "prefill_qkv_proj_rope": dict(B=1, S=3, start_pos=4),
    "expert_routed": dict(T=3, n_local_experts=2),
    "prefill_sparse_attn": dict(T=5, compress_ratio=4),
    "decode_compressor_ratio4": dict(B=2, S=1, start_pos=3),
    "decode_compressor_ratio128": dict(B=2, S=1, start_pos=127),
    "prefill_compressor_ratio4": dict(T=5, start_pos=0),
    "prefill_compressor_ratio128": dict(T=5, start_pos=124),
    "decode_indexer_compressor": dict(B=2, S=1, start_pos=3),
    "prefill_indexer_compressor": dict(T=5, start_pos=0),
    "decode_indexer": dict(B=2, S=1, start_pos=3), "prefill_indexer": dict(T=5, start_pos=0),
    "prefill_attention_swa": dict(T=5, start_pos=0), "prefill_attention_hca": dict(T=5, start_pos=124),
    "prefill_attention_csa": dict(T=5, start_pos=0),
    "decode_layer": dict(layer_id=2, n_local_experts=4, start_pos=100),
    "prefill_layer": dict(layer_id=2, chunk_lens=(5,), n_local_experts=4),
    "prefill_mtp": dict(num_tokens=5, n_local_experts=4),
}
KERNELS = sorted(dsv4.KERNELS)

WRONG_DTYPES = [np.float64, np.float32, np.float16, np.int8, np.uint8, np.int16, np.int32,
                np.int64, np.uint64, np.bool_, np.complex64, ml_dtypes.bfloat16,
                ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, object]
NOT_ARRAYS = [0, 1.5, True, "x", b"x", [], [1, 2], (3,), {}, object(), np.float32(1.0)]
INTS = [-1, 0, 1, 2, 3, 127, 128, 4096, -2**31, 2**31, 2**62, 2**63 - 1, 2**63, -2**63,
        -2**63 - 1, 10**30, True, np.int32(5), np.uint64(2**64 - 1), np.array(3),
        1.5, float("nan"), float("inf"), "3", np.array([3]), None]
CONFIG_INTS = [-2**62, -1, 0, 1, 3, 7, 2**31, 2**62]
CONFIG_FLOATS = [float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 1e-45, 1e30]
CONFIG_FIELDS = {f.name for f in dataclasses.fields(dsv4.DeepSeekV4Config)}
# config fields whose value sets a loop count: a huge one is a long call, not a bug
LOOP_COUNTS = {"hc_sinkhorn_iters"}
# 0 makes the config's index_weights_scale divide by zero before any kernel runs
NONZERO = {"index_n_heads", "index_head_dim"}
# sizes the kernels do not bound yet: max_position_embeddings < 4 * index_topk reads past
# the indexer's rows (decode CSA), huge values run out of memory
UNBOUNDED = {"max_position_embeddings", "index_topk"}


def takes_config(kernel):
    return "config" in inspect.signature(dsv4.KERNELS[kernel]).parameters


@functools.lru_cache(maxsize=None)
def base(kernel):
    """The valid inputs, read-only so that no call can change them, and the outputs."""
    params = PARAMS[kernel] if kernel in PARAMS else small_params(kernel)
    inputs = getattr(dsv4.specs, kernel)(**params, seed=5, config=TINY)
    inputs = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in inputs.items()}
    for v in inputs.values():
        if isinstance(v, np.ndarray):
            v.setflags(write=False)
    kw = {"config": TINY} if takes_config(kernel) else {}
    outs = dsv4.KERNELS[kernel](**writable(kernel, inputs), **kw)
    return inputs, {k: outs[k] for k in dsv4.KERNELS[kernel].outputs}


def writable(kernel, inputs):
    return {k: (v.copy() if k in dsv4.KERNELS[kernel].inouts else v) for k, v in inputs.items()}


class Call:
    """One mutated call: its arguments, config, what was done, and whether it must raise."""

    def __init__(self, kernel, rng):
        self.kernel, self.rng = kernel, rng
        inputs, self.ref = base(kernel)
        self.kw = writable(kernel, inputs)
        self.config = TINY
        self.what = []
        self.must_raise = False
        self.harmless = True      # every mutation keeps the call valid and its results
        self.used = set()         # arguments mutated already: one mutation each
        self.spec = {a["name"]: a for a in TABLE[kernel]["args"] if a["role"] != "stage"}
        self.written = set(dsv4.KERNELS[kernel].inouts) | set(dsv4.KERNELS[kernel].outputs)

    def pick(self, seq):
        return seq[self.rng.integers(len(seq))]

    def note(self, text, must_raise=False, harmless=False):
        self.what.append(text)
        self.must_raise |= must_raise
        self.harmless &= harmless

    def valid(self, name):
        """The valid value of array argument `name` (an output: a zeroed buffer)."""
        if name in self.ref:
            return np.zeros_like(self.ref[name])
        v = self.kw.get(name)
        if v is None:       # an optional argument not given: the shape the table asks for
            dims = self.spec[name]["dims"].split(",")
            return np.zeros([1] * len(dims), dsv4_dtype(self.spec[name]["dtype"]))
        return v

    def set(self, name, value):
        if value is None:
            self.kw.pop(name, None)
        else:
            self.kw[name] = value

    # ---- mutations of one array argument ------------------------------------------
    def mutate_array(self, name):
        self.used.add(name)
        v = np.asarray(self.valid(name))
        a = self.spec[name]
        dims = a["dims"].split(",")
        flat = a["flat"]             # any shape holding the right number of elements
        kind = self.pick(["dtype", "rank", "off_by_one", "layout", "zero_size", "none",
                          "not_array", "read_only", "alias", "offset_view"])
        if kind == "dtype":
            dt = np.dtype(self.pick([d for d in WRONG_DTYPES if np.dtype(d) != v.dtype]))
            with np.errstate(invalid="ignore", over="ignore"):
                w = v.astype(dt) if dt != object else v.astype(np.float64).astype(object)
            self.set(name, w)
            self.note(f"{name}: dtype {dt}", must_raise=True)
        elif kind == "rank" and v.ndim:
            w = v[None] if self.rng.random() < 0.5 else (
                v.reshape((-1,) + v.shape[2:]) if v.ndim > 1 else np.asarray(v[0]))
            w = w.copy()
            self.set(name, w)
            same = flat and w.size == v.size
            self.note(f"{name}: shape {v.shape} -> {w.shape}", must_raise=not flat, harmless=same)
        elif kind == "off_by_one" and v.ndim:
            ax = int(self.rng.integers(v.ndim))
            shape = list(v.shape)
            shape[ax] += self.pick([-1, 1])
            # np.resize repeats the data: index arrays keep plausible values
            self.set(name, np.resize(v, shape))
            axis = dims[ax] if ax < len(dims) else "_"
            must = flat or axis.isdigit() or (shape[ax] == 0 and axis != "_")
            self.note(f"{name}: shape {v.shape} -> {tuple(shape)}", must_raise=must)
        elif kind == "layout":
            w = self.relayout(v)
            self.set(name, w)
            bad = not (w.flags.c_contiguous and w.flags.aligned and w.dtype.isnative)
            self.note(f"{name}: strides {w.strides}, aligned {w.flags.aligned}, {w.dtype.str}",
                      must_raise=bad, harmless=not bad and w.shape == v.shape)
        elif kind == "zero_size" and v.ndim:
            ax = int(self.rng.integers(v.ndim))
            shape = list(v.shape)
            shape[ax] = 0
            self.set(name, np.zeros(shape, v.dtype))
            axis = dims[ax] if ax < len(dims) else "_"
            self.note(f"{name}: zero-size {tuple(shape)}", must_raise=flat or axis != "_")
        elif kind == "none":
            self.set(name, None)
            self.note(f"{name}: None", must_raise=not a["optional"] and name not in self.ref)
        elif kind == "not_array":
            obj = self.pick(NOT_ARRAYS + [v.tolist() if v.size < 64 else v.flat[0].item()])
            self.kw[name] = obj
            self.note(f"{name}: {type(obj).__name__} {obj!r:.40}", must_raise=True)
        elif kind == "read_only":
            w = v.copy()
            w.setflags(write=False)
            self.set(name, w)
            self.note(f"{name}: read-only", must_raise=name in self.written,
                      harmless=name not in self.written)
        elif kind == "alias":
            self.alias(name, v)
        else:
            # a C-contiguous view into the middle of a larger buffer is as good as a copy
            raw = np.zeros(v.nbytes + 128, np.uint8)
            w = raw[64:64 + v.nbytes].view(v.dtype).reshape(v.shape)
            w[...] = v
            self.set(name, w)
            self.note(f"{name}: a view at byte 64 of a larger buffer", harmless=True)

    def relayout(self, v):
        choice = self.rng.integers(5)
        if choice == 0 and v.ndim:
            ax = int(self.rng.integers(v.ndim))
            idx = (slice(None),) * ax + (slice(None, None, 2),)
            return np.repeat(v, 2, axis=ax)[idx]                       # strided
        if choice == 1 and v.ndim > 1:
            return np.asfortranarray(v)
        if choice == 2 and v.ndim:
            return v[::-1].copy()[::-1]                                 # negative strides
        if choice == 3 and v.dtype.itemsize > 1:
            raw = np.zeros(v.nbytes + 1, np.uint8)[1:]
            w = raw.view(v.dtype).reshape(v.shape)                     # misaligned
            w[...] = v
            return w
        try:
            return v.astype(v.dtype.newbyteorder())                    # byte-swapped
        except (TypeError, ValueError):
            return v.T

    def alias(self, name, v):
        """A buffer the kernel writes sharing memory with another argument."""
        arrays = [n for n in self.spec if n != name and isinstance(self.kw.get(n), np.ndarray)]
        if not arrays:
            return
        arrays = [n for n in arrays if n not in self.used]
        if not arrays:
            return
        if name in self.written:
            other = self.pick(arrays)
        else:
            targets = sorted(n for n in self.written - self.used if n in self.kw or n in self.ref)
            if not targets:
                return
            name, other = self.pick(targets), name
            v = np.asarray(self.valid(name))
        o = self.kw.get(other)
        if not isinstance(o, np.ndarray) or not o.nbytes or not v.nbytes:
            return
        if o.shape == v.shape and o.dtype == v.dtype and self.rng.random() < 0.5:
            w = o.copy()
            self.kw[name] = self.kw[other] = w                         # the same array twice
            self.used |= {name, other}
            self.note(f"{name} is {other}", must_raise=True)
            return
        # two views of one buffer overlapping by at least one element
        off = int(self.rng.integers(max(1, o.nbytes // 16))) * 16
        buf = np.zeros(max(o.nbytes, off + v.nbytes) + 16, np.uint8)
        wv = buf[off:off + v.nbytes].view(v.dtype).reshape(v.shape)
        wo = buf[:o.nbytes].view(o.dtype).reshape(o.shape)
        wv[...] = v
        wo[...] = o
        self.kw[name], self.kw[other] = wv, wo
        self.used |= {name, other}
        self.note(f"{name} overlaps {other} from byte {off}", must_raise=True)

    # ---- mutations of scalars and of the config --------------------------------------
    def mutate_scalar(self, name):
        value = self.pick(INTS)
        self.set(name, value)
        self.note(f"{name} = {value!r}")

    def mutate_config(self, field):
        old = getattr(self.config, field)
        if field == "compress_ratios":
            i = self.kw.get("layer_id")
            i = i if isinstance(i, int) else 2
            ratios = list(old)
            ratios[i % len(ratios)] = self.pick([-1, 0, 4, 7, 128, 2**62])
            value = tuple(ratios)
        elif isinstance(old, float):
            value = self.pick(CONFIG_FLOATS)
        else:
            value = self.pick([x for x in CONFIG_INTS if (field not in LOOP_COUNTS or x < 2**31)
                               and (field not in NONZERO or x != 0)])
        self.config = dataclasses.replace(self.config, **{field: value})
        self.note(f"config.{field} = {value!r}")


def dsv4_dtype(name):
    return {"bfloat16": ml_dtypes.bfloat16, "float8_e4m3fn": ml_dtypes.float8_e4m3fn}.get(name, name)


def config_fields(kernel):
    fields = []
    for s in TABLE[kernel]["scalars"]:
        if s["per_layer"]:
            fields.append(s["name"] + "s")
        elif s["from_config"] and s["name"] in CONFIG_FIELDS - UNBOUNDED:
            fields.append(s["name"])
    if any(s["name"] == "index_weights_scale" for s in TABLE[kernel]["scalars"]):
        fields += ["index_n_heads", "index_head_dim"]
    return fields


def make_call(kernel, i):
    rng = np.random.default_rng([SEED, zlib.crc32(kernel.encode()), i])
    c = Call(kernel, rng)
    arrays = list(c.spec)
    scalars = [s["name"] for s in TABLE[kernel]["scalars"] if not s["from_config"]]
    fields = config_fields(kernel)
    n = 0 if i == 0 else 1 if rng.random() < 0.7 else int(rng.integers(2, 4))
    for _ in range(n):
        r, free = rng.random(), [a for a in arrays if a not in c.used]
        if free and (r < 0.8 or not (scalars or fields)):
            c.mutate_array(c.pick(free))
        elif scalars and (r < 0.9 or not fields):
            c.mutate_scalar(c.pick(scalars))
        elif fields:
            c.mutate_config(c.pick(fields))
    return c


def unchanged(a, b):
    if (a.flags.c_contiguous and b.flags.c_contiguous and a.shape == b.shape
            and a.dtype == b.dtype and not a.dtype.hasobject):
        return np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))
    return same_bits(a, b)


def run(c):
    """Make the call; return None or a message saying what went wrong."""
    fn = dsv4.KERNELS[c.kernel]
    kw = dict(c.kw, **({"config": c.config} if takes_config(c.kernel) else {}))
    if dsv4.KERNELS[c.kernel].stages and c.rng.random() < 0.2:
        kw["stages"] = True
    # every argument the call may write: states, caches and given output buffers; those
    # not mutated still hold the valid inputs
    inputs = base(c.kernel)[0]
    before = {n: (v.copy() if n in c.used else inputs[n]) for n, v in c.kw.items()
              if n in c.written and isinstance(v, np.ndarray)}
    try:
        out = fn(**kw)
    except (TypeError, ValueError) as e:
        if c.harmless:
            return f"raised {type(e).__name__}: {e}"
        for n, v in before.items():
            if not unchanged(c.kw[n], v):
                return f"raised {type(e).__name__} ({e}) but wrote '{n}'"
        return None
    except BaseException as e:       # noqa: BLE001 - MemoryError, SystemError, ...: all failures
        return f"raised {type(e).__name__}: {e}"
    if c.must_raise:
        return "accepted it"
    if c.harmless:
        for n, v in c.ref.items():
            if not same_bits(out[n], v):
                return f"output '{n}' differs from the unmutated call's"
    return None


@pytest.mark.parametrize("kernel", KERNELS)
def test_fuzz(kernel):
    inputs, _ = base(kernel)
    pristine = {k: v.copy() for k, v in inputs.items() if isinstance(v, np.ndarray)}
    failures = []
    for i in range(ITERS):
        c = make_call(kernel, i)
        msg = run(c)
        if msg:
            failures.append(f"DSV4_FUZZ_SEED={SEED} call {i}: {'; '.join(c.what)}: {msg}")
    for k, v in pristine.items():
        assert unchanged(inputs[k], v), f"an input changed: {k}"
    assert not failures, f"{len(failures)} of {ITERS} calls:\n" + "\n".join(failures[:20])


def bad_values(a, v, written):
    """(exception, what, value) for each way argument `a` with valid value `v` can be wrong."""
    wrong = np.float64 if v.dtype != np.float64 else np.float32
    cases = [(TypeError, "dtype", v.astype(wrong)), (TypeError, "a float", 1.5),
             (TypeError, "a list", [0, 1])]
    if not a["flat"]:
        cases.append((ValueError, "rank", v[None]))
    ax = next((i for i in reversed(range(v.ndim)) if v.shape[i] > 1), None)
    if ax is not None:
        idx = (slice(None),) * ax + (slice(None, None, 2),)
        cases.append((ValueError, "strides", np.repeat(v, 2, axis=ax)[idx]))
    if v.dtype.itemsize > 1:
        raw = np.zeros(v.nbytes + 1, np.uint8)[1:]
        cases.append((ValueError, "alignment", raw.view(v.dtype).reshape(v.shape)))
    if not a["optional"] and a["role"] != "out":
        cases.append((TypeError, "missing", None))
    if a["name"] in written:
        ro = v.copy()
        ro.setflags(write=False)
        cases.append((ValueError, "read-only", ro))
    return cases


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_argument_refuses_bad_input(kernel):
    # each way each argument can be wrong, one at a time: the exact exception, naming the
    # argument, and nothing written
    inputs, ref = base(kernel)
    fn = dsv4.KERNELS[kernel]
    cfg = {"config": TINY} if takes_config(kernel) else {}
    written = set(fn.inouts) | set(fn.outputs)
    states = writable(kernel, inputs)      # every call raises, so one copy serves them all
    for a in TABLE[kernel]["args"]:
        name = a["name"]
        v = ref.get(name, inputs.get(name))
        if a["role"] == "stage" or v is None:
            continue
        cases = bad_values(a, v, written)
        if name in written:             # sharing memory with the first array argument
            first = next(n for n, x in inputs.items() if isinstance(x, np.ndarray) and n != name)
            o = inputs[first]
            off = o.nbytes // 32 * 16                # inside o, aligned for any dtype
            buf = np.zeros(max(o.nbytes, off + v.nbytes), np.uint8)
            alias = dict(zip((name, first), (buf[off:off + v.nbytes].view(v.dtype).reshape(v.shape),
                                             buf[:o.nbytes].view(o.dtype).reshape(o.shape))))
            cases.append((ValueError, f"overlapping '{first}'", alias))
        for kind, what, value in cases:
            kw = dict(states, **(value if isinstance(value, dict) else {name: value}))
            if value is None:
                del kw[name]
            try:
                fn(**kw, **cfg)
            except kind as e:
                assert f"'{name}'" in str(e), f"'{name}' ({what}): {e}"
            else:
                pytest.fail(f"'{name}' ({what}) was accepted")
        for n in fn.inouts:
            assert unchanged(states[n], inputs[n]), f"a call with a bad '{name}' wrote '{n}'"


# ---- no memory held by repeated calls ------------------------------------------------

def asan_loaded():
    with open("/proc/self/maps") as f:
        return "libasan" in f.read()


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def leak_calls():
    """Calls that succeed, and calls that raise at each stage of the binding."""
    d = dsv4.specs.rms_norm(T=64, seed=1)                     # x_normed: 512 kB
    buf = np.zeros((64, 4096), ml_dtypes.bfloat16)
    x32 = dict(d, x=d["x"].astype(np.float32))
    p = dict(dsv4.specs.prefill_qkv_proj_rope(B=1, S=3, seed=0, config=TINY), start_pos=10**6)
    h = dsv4.specs.hc_pre(T=8, seed=2)
    comb = np.zeros((8, 15), np.float32)
    m = dsv4.specs.moe(T=3, n_ranks=2, layer_id=0, n_local_experts=4, seed=1, config=TINY)
    m["tid2eid"] = np.zeros_like(m["tid2eid"])                # every route to expert 0
    c = writable("prefill_compressor_ratio4", base("prefill_compressor_ratio4")[0])
    ro = dict(c, cmp_kv=c["cmp_kv"].copy())
    ro["cmp_kv"].setflags(write=False)

    def one_round():
        dsv4.rms_norm(**d)
        dsv4.rms_norm(**d, x_normed=buf)
        dsv4.hc_pre(**h)                                       # three outputs allocated
        dsv4.prefill_compressor_ratio4(**c, config=TINY)       # states updated in place
        for kw, kind, fn in [
                (x32, TypeError, dsv4.rms_norm),               # argument check
                (dict(d, x_normed=buf[:, :-1]), ValueError, dsv4.rms_norm),   # output check
                (dict(p, config=TINY), ValueError, dsv4.prefill_qkv_proj_rope),  # prepare()
                (dict(h, comb=comb), ValueError, dsv4.hc_pre),  # the last output refused
                (dict(m, config=TINY), ValueError, dsv4.moe),   # the kernel, after allocating
                (dict(ro, config=TINY), ValueError, dsv4.prefill_compressor_ratio4)]:
            with pytest.raises(kind):
                fn(**kw)
    return one_round


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/statm")
def test_repeated_calls_hold_no_memory():
    if asan_loaded():
        pytest.skip("ASan keeps freed memory in quarantine; run LSan for leaks there")
    one_round = leak_calls()
    for _ in range(30):                  # warm-up: the scratch, allocator pools, caches
        one_round()
    gc.collect()
    before = rss_bytes()
    n = 200
    for _ in range(n):
        one_round()
    gc.collect()
    grown = rss_bytes() - before
    # a 512 kB output leaked per round would be 100 MB; a small object per call, ~1 MB
    assert grown < 8 << 20, f"resident memory grew by {grown / 2**20:.1f} MiB over {n} rounds"


def test_calls_keep_no_reference_to_their_arguments():
    d = {k: v.copy() for k, v in dsv4.specs.hc_post(T=4, seed=3).items()}
    y = np.zeros((4, 4, 4096), ml_dtypes.bfloat16)
    refs = {k: sys.getrefcount(v) for k, v in d.items()}
    ry = sys.getrefcount(y)
    for _ in range(10):
        dsv4.hc_post(**d, y=y)
        with pytest.raises(ValueError):
            dsv4.hc_post(**d, y=y[:, :, :-1])
        with pytest.raises(TypeError):
            dsv4.hc_post(**dict(d, post=d["post"].astype(np.float64)), y=y)
    assert {k: sys.getrefcount(v) for k, v in d.items()} == refs
    assert sys.getrefcount(y) == ry
