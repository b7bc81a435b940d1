"""Run a kernel and its golden on the same inputs and compare every output."""
import functools
import inspect
import statistics
import time
from dataclasses import dataclass

import numpy as np

from . import forward as _forward
from . import golden, specs
from ._kernels import KERNELS, TABLE
from .compare import CompareResult, Report, allclose, compare_outputs, ratio_allclose


# the multi-layer forward: Python drivers over the C layers, checked like a kernel
DRIVERS = {"decode_fwd": _forward.decode_fwd, "prefill_fwd": _forward.prefill_fwd}
KNOWN = [*KERNELS, *DRIVERS]


def _kernel(name):
    """dsv4.<name>; a ValueError naming the known kernels if there is none."""
    k = KERNELS.get(name) or DRIVERS.get(name)
    if k is None:
        raise ValueError(f"unknown kernel {name!r}; known: {', '.join(KNOWN)}")
    return k


def fresh(kernel, inputs):
    """`inputs` with private copies of the states and caches `kernel` updates in place."""
    inouts = _kernel(kernel).inouts
    return {k: (v.copy() if k in inouts else v) for k, v in inputs.items()}


def axes(kernel):
    """Axis names of each output, in-out and stage of a kernel: the C kernel table's
    symbolic dims, e.g. {"q": ("T", "H", "HD"), ...}."""
    _kernel(kernel)
    if kernel in DRIVERS:
        return _forward.axes(kernel)
    return {a["name"]: tuple(a["dims"].split(",")) for a in TABLE[kernel]["args"]
            if a["role"] in ("out", "inout", "stage")}


def _per_layer(kernel, actual, exp, names, cmps, inputs, config, use_golden):
    """A forward's x_next stage [layers, ...] as one entry per layer, x_next[L], each with
    the layer's x_next comparator and each against the layer run on the input the caller's
    forward gave it (dsv4.forward.each_layer): the first failing entry is the first layer
    that made an error of its own."""
    if kernel not in DRIVERS or "x_next" not in actual or "x_next" not in exp \
            or np.shape(actual["x_next"]) != np.shape(exp["x_next"]):
        return actual, exp
    a = actual.pop("x_next")
    exp.pop("x_next")
    own = _forward.on_given_inputs(kernel, inputs, a, golden=use_golden,
                                   **({} if config is None else {"config": config}))
    e = own.pop("x_next")
    # the output: the head on the given last layer output, if that is what it came from
    exp.update((n, v) for n, v in own.items() if n in actual)
    cmp = specs.COMPARATORS[kernel.replace("_fwd", "_layer")]["x_next"]
    for L in range(len(e)):
        actual[f"x_next[{L}]"], exp[f"x_next[{L}]"] = a[L], e[L]
        names[f"x_next[{L}]"], cmps[f"x_next[{L}]"] = names["x_next"][1:], cmp
    return actual, exp


def _timed(kernel, fn, kwargs, repeat, warmup=0):
    """Output and median milliseconds of `repeat` runs after `warmup` untimed ones."""
    for _ in range(max(0, warmup)):
        fn(**fresh(kernel, kwargs))   # first-call costs: page faults, caches, thread start
    times, out = [], None
    for _ in range(max(1, repeat)):
        kw = fresh(kernel, kwargs)          # every run starts from the same states
        t0 = time.perf_counter()
        out = fn(**kw)
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times) * 1e3


@dataclass
class CheckResult:
    kernel: str
    case: str
    params: dict
    report: Report
    c_ms: float
    golden_ms: float

    @property
    def passed(self):
        return self.report.passed

    @property
    def speedup(self):
        return self.golden_ms / self.c_ms if self.c_ms > 0 else float("inf")

    def __bool__(self):
        return self.passed

    def __str__(self):
        head = (f"{self.kernel} [{self.case}: {_fmt(self.params)}] "
                f"C {self.c_ms:.2f} ms, golden {self.golden_ms:.2f} ms ({self.speedup:.1f}x)")
        return head + "\n" + str(self.report)

    def _repr_html_(self):
        return f"<p>{self.kernel} [{self.case}]</p>" + self.report._repr_html_()

    def record(self):
        """A JSON-ready dict: kernel, case, params, passed, outputs, c_ms, golden_ms."""
        outs = {n: {"passed": r.passed, "bad": r.bad, "allowed": r.allowed, "total": r.total,
                    "max_abs_err": r.max_abs_err, "warnings": r.warnings}
                for n, r in self.report.results.items()}
        params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.params.items()}
        return {"kernel": self.kernel, "case": self.case, "params": params,
                "passed": self.passed, "outputs": outs,
                "c_ms": round(self.c_ms, 4), "golden_ms": round(self.golden_ms, 4)}


def _fmt(params):
    return " ".join(f"{k}={v}" for k, v in params.items())


def comparators(kernel):
    """pypto-lib's comparator for each output of `kernel`."""
    return specs.COMPARATORS[kernel]


def stage_comparator(dtype):
    """The comparator verify uses for an intermediate (pypto-lib compares none): its rule
    for bf16 activations (q, kv, attn_out) on floats, its qr rule (off by one, no outlier)
    on int8, equality on other integers."""
    dt = np.dtype(dtype)
    if dt.kind in "iub":
        return ratio_allclose(atol=1, rtol=0, max_error_ratio=0) if dt.itemsize == 1 else allclose(0, 0)
    return ratio_allclose(atol=1e-4, rtol=1 / 128)


def _stage_axes(kernel, shape, arrays):
    # a golden-only stage is named after the kernel arguments of its exact shape, if they agree
    dims = {a["dims"] for a in TABLE[kernel]["args"]
            if a["name"] in arrays and np.shape(arrays[a["name"]]) == tuple(shape)}
    return tuple(dims.pop().split(",")) if len(dims) == 1 else None


def verify(kernel, actual, inputs, *, expected=None, config=None, comparators=None,
           golden_layers=False):
    """Compare `actual` outputs (e.g. from an NPU) with dsv4's for the same inputs.

    `actual` maps names to arrays: outputs and updated states of the kernel, and also its
    intermediates (the `stages` of dsv4.<kernel> or dsv4.golden.<kernel>, stages=True), to
    find the stage where a result first departs.  `expected` defaults to the C kernel's
    outputs on `inputs` (run on copies of the states and caches, so `inputs` is not
    changed), and to the golden's for intermediates the C kernel does not return.

    Each output is checked with pypto-lib's comparator for it (intermediates with
    stage_comparator; `comparators` overrides either, by name).  The Report says which
    outputs fail, how many elements, where the worst are (coordinates named by the
    kernel table's axes), how the bad elements spread over each axis, and warns when a
    passing output hides its errors in one slice.  Comparing nothing fails; a name the
    kernel does not have raises ValueError.

    The forward (decode_fwd, prefill_fwd): a bf16 residual stream drifts from layer to
    layer, so its x_next stage [layers, ...] is checked layer by layer, x_next[L] against
    layer L run on the given x_next[L - 1] (dsv4.forward.on_given_inputs, with the layer's
    comparator; golden_layers=True runs the golden layers), and its output, given with x_next,
    against the head on the given last layer output: the first failing x_next[L] is the
    first layer with an error of its own.
    """
    fn = _kernel(kernel)
    if not actual:
        return Report({}, [f"no outputs given; {kernel} has {', '.join(fn.outputs + fn.inouts)}"])
    cfg = {} if config is None else {"config": config}
    known = fn.outputs + fn.inouts + fn.stages
    golden_stages = {}
    if any(n not in known for n in actual):
        g = getattr(golden, kernel)
        if "stages" in inspect.signature(g).parameters:
            golden_stages = g(**fresh(kernel, {**inputs, **cfg}), stages=True).get("stages", {})
    unknown = [n for n in actual if n not in known and n not in golden_stages]
    if unknown:
        stages = [s for s in dict.fromkeys([*fn.stages, *golden_stages]) if s not in fn.outputs]
        raise ValueError(f"{kernel} has no output {', '.join(map(repr, unknown))}; its outputs: "
                         f"{', '.join(fn.outputs + fn.inouts)}"
                         + (f"; its intermediates: {', '.join(stages)}" if stages else ""))
    if expected is None:
        want_stages = any(n in fn.stages for n in actual)
        expected = fn(**fresh(kernel, {**inputs, **cfg}), **({"stages": True} if want_stages else {}))
        expected.update(expected.pop("stages", {}))
        expected.update((k, v) for k, v in golden_stages.items() if k not in expected)
    exp = {n: expected[n] for n in actual if n in expected}

    names = axes(kernel)
    for n in exp:
        if n not in names:
            names[n] = _stage_axes(kernel, np.shape(exp[n]), {**inputs, **expected})
    cmps = dict(specs.COMPARATORS[kernel])
    cmps.update((n, stage_comparator(np.asarray(exp[n]).dtype)) for n in exp
                if n not in cmps and n not in fn.outputs + fn.inouts)
    cmps.update(comparators or {})
    actual, exp = _per_layer(kernel, dict(actual), exp, names, cmps, inputs, config,
                             golden_layers)
    report = compare_outputs(actual, exp, cmps, inputs=inputs, axes=names)
    for n in actual:
        if n not in exp:
            report.results[n] = CompareResult(
                n, "-", False, message=f"'{n}' FAIL  not in the expected outputs (have {list(expected)})")
    report.results = {n: report.results[n] for n in actual}
    return report


def cases(kernel):
    """The named deployment cases of a kernel (its builder arguments), as check() runs them."""
    _kernel(kernel)
    return specs.CASES[kernel]


def check(kernel, case=None, *, seed=0, config=None, repeat=3, warmup=0, settle=0.0, **params):
    """Build inputs, run dsv4.<kernel> and dsv4.golden.<kernel>, compare.

    `case` names one of specs.CASES[kernel] (default: all of them); keyword
    params override or replace the case's builder arguments. Times are the
    median of `repeat` runs after `warmup` untimed ones (`python -m dsv4 check`
    warms up once; a test that only wants the verdict need not pay for it);
    `settle` seconds of sleep before timing the C kernel let the golden's BLAS
    threads go idle (they spin for a while after a call, competing for cores).
    Returns a list of CheckResult.
    """
    known = cases(kernel)
    if case is not None and case not in known and not params:
        raise ValueError(f"{kernel} has no case {case!r}; its cases: {', '.join(known)}")
    if params:
        chosen = {case or "custom": {**known.get(case, {}), **params}}
    elif case is not None:
        chosen = {case: known[case]}
    else:
        chosen = known
    cfg = {} if config is None else {"config": config}
    run = _kernel(kernel)
    results = []
    for name, p in chosen.items():
        inputs = getattr(specs, kernel)(**p, seed=seed, **cfg)
        if settle > 0:
            time.sleep(settle)
        if kernel in DRIVERS:
            # a forward's outputs drift from layer to layer: each layer is checked on its
            # own input (verify's per-layer rule), the output on the last layer's
            c_out, c_ms = _timed(kernel, functools.partial(run, stages=True),
                                 {**inputs, **cfg}, repeat, warmup)
            _, g_ms = _timed(kernel, getattr(golden, kernel), {**inputs, **cfg}, repeat, warmup)
            out = c_out["stages"]
            report = verify(kernel, {"x_next": out["x_next"], run.outputs[0]: c_out[run.outputs[0]]},
                            inputs, config=config, expected={**out, **c_out}, golden_layers=True)
            results.append(CheckResult(kernel, name, p, report, c_ms, g_ms))
            continue
        c_out, c_ms = _timed(kernel, run, {**inputs, **cfg}, repeat, warmup)
        g_out, g_ms = _timed(kernel, getattr(golden, kernel), {**inputs, **cfg}, repeat, warmup)
        report = compare_outputs(c_out, g_out, comparators(kernel), inputs=inputs,
                                 axes=axes(kernel))
        results.append(CheckResult(kernel, name, p, report, c_ms, g_ms))
    return results
