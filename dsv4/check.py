"""Run a kernel and its golden on the same inputs and compare every output."""
import statistics
import time
from dataclasses import dataclass

from . import golden, specs
from ._kernels import KERNELS
from .compare import Report, compare_outputs


def fresh(kernel, inputs):
    """`inputs` with private copies of the states and caches `kernel` updates in place."""
    return {k: (v.copy() if k in KERNELS[kernel].inouts else v) for k, v in inputs.items()}


def _timed(kernel, fn, kwargs, repeat):
    # BLAS threads of a previous golden spin for a while; timing the kernel
    # while they do would measure the scheduler, not the kernel
    time.sleep(0.2)
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


def _fmt(params):
    return " ".join(f"{k}={v}" for k, v in params.items())


def comparators(kernel):
    """pypto-lib's comparator for each output of `kernel`."""
    return specs.COMPARATORS[kernel]


def verify(kernel, actual, inputs, *, expected=None, config=None):
    """Compare `actual` outputs (e.g. from an NPU) with dsv4's for the same inputs.

    `expected` defaults to the C kernel's outputs on `inputs` (run on copies of
    the states and caches, so `inputs` is not changed). Every output of
    `actual` is checked with pypto-lib's comparator for it; the Report says
    which outputs fail, how many elements, where the worst ones are and which
    rows hold them.
    """
    if expected is None:
        kw = dict(inputs)
        if config is not None:
            kw["config"] = config
        expected = KERNELS[kernel](**fresh(kernel, kw))
    expected = {k: v for k, v in expected.items() if k in actual}
    return compare_outputs(actual, expected, comparators(kernel), inputs=inputs)


def check(kernel, case=None, *, seed=0, config=None, repeat=3, **params):
    """Build inputs, run dsv4.<kernel> and dsv4.golden.<kernel>, compare.

    `case` names one of specs.CASES[kernel] (default: all of them); keyword
    params override or replace the case's builder arguments. Returns a list
    of CheckResult.
    """
    cases = specs.CASES[kernel]
    if params:
        chosen = {case or "custom": {**cases.get(case, {}), **params}}
    elif case is not None:
        chosen = {case: cases[case]}
    else:
        chosen = cases
    cfg = {} if config is None else {"config": config}
    results = []
    for name, p in chosen.items():
        inputs = getattr(specs, kernel)(**p, seed=seed, **cfg)
        c_out, c_ms = _timed(kernel, KERNELS[kernel], {**inputs, **cfg}, repeat)
        g_out, g_ms = _timed(kernel, getattr(golden, kernel), {**inputs, **cfg}, repeat)
        report = compare_outputs(c_out, g_out, comparators(kernel), inputs=inputs)
        results.append(CheckResult(kernel, name, p, report, c_ms, g_ms))
    return results
