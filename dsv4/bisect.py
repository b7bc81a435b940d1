"""Stage bisection: find the first step where an NPU kernel departs from dsv4.

    result = dsv4.bisect.bisect("decode_attention_csa", inputs, npu_stages)
    result.first_failure        # 'q': the first dumped stage, in computation order, that fails
    print(result)               # one row per stage: comparator, PASS/FAIL, bad/allowed

`npu_stages` holds the intermediates dumped from the NPU, keyed by the stage names of
dsv4.golden.<kernel>(..., stages=True) (each golden's docstring lists them, with shapes);
any subset will do, and outputs may be given there or in `npu_outputs`. The golden runs
with stages=True on `inputs` (on copies of the states and caches the kernel updates, so
`inputs` is not changed) and every given tensor is compared with the golden's, in the
order the golden computes them: its stages in their order, then the outputs that are not
stages. The first stage that fails is where the NPU departs, up to the stages that were
not dumped between it and the last passing one, which the report names.

Comparator of each tensor, the first rule that applies:

1. An output of the kernel (also when it appears among the stages, e.g. qkv_proj_rope's
   qr): pypto-lib's comparator for that output, specs.COMPARATORS[kernel].
2. An output of a leaf kernel the kernel runs, under the same name: that leaf's
   comparator. A block's x_mixed, post, comb (hc_pre), x_normed (rms_norm), q, kv, qr,
   qr_scale (qkv_proj_rope) and attn_out (its sparse attention); moe's x_mixed, post,
   comb (hc_pre), x_norm, x_norm_i8, x_norm_scale, indices, weights (gate) and sh
   (expert_shared); decode_layer's block stages.
3. Otherwise by dtype and role:
   * int8 codes (q8, hq, ...): every code within +-1, pypto-lib's rule for qr
     (ratio_allclose(atol=1, rtol=0, max_error_ratio=0));
   * int32 sums of int8 products (q_i32): ratio_allclose(atol=max|golden|/128,
     rtol=1/128, max_error_ratio=0.005), since one code off by one upstream moves a sum
     by up to 127;
   * other integers (indices, counts, lengths): exact. Index rows with no dumped or
     golden values to pair them with are compared exactly, so a legal tie swap shows as
     a failure there;
   * floating point (bf16, fp32): ratio_allclose(atol=1e-4, rtol=1/128,
     max_error_ratio=0.005, same_inf=True): the bf16-level tolerance pypto-lib gives bf16
     outputs, with an infinity equal to the golden's (an empty state row) matching.

As compare_outputs does, NaN and Inf must first sit where the golden has them.
Comparators that pair indices with values (the gate's indices with weights, the indexers'
topk_idxs with score) read the NPU's values when they were dumped, else the golden's.

reference="c" takes the reference values from the C kernel dsv4.<kernel>(..., stages=True)
where it has them (the attention blocks' stages, the layers' x_attn, every output; same
names as the golden's) and from the golden for the rest. When every given name is one of
the C kernel's, the golden does not run and the order is the C kernel's (its stages, then
its outputs).
"""
import html
import inspect

import numpy as np

from . import golden, specs
from ._kernels import KERNELS
from .check import fresh
from .compare import Report, allclose, compare_outputs, ratio_allclose

__all__ = ["bisect", "Bisection", "StageResult", "comparator_for"]

VALUES = ratio_allclose(atol=1e-4, rtol=1 / 128, max_error_ratio=0.005, same_inf=True)
CODES = ratio_allclose(atol=1, rtol=0, max_error_ratio=0)
EXACT = allclose(atol=0, rtol=0)
# int32 stages that are sums of int8 products, not indices
ACCUMULATORS = ("q_i32",)

_FRONT = ("hc_pre", "rms_norm", "qkv_proj_rope")
LEAVES = {
    "decode_attention_swa": _FRONT + ("decode_sparse_attn_swa",),
    "decode_attention_hca": _FRONT + ("decode_sparse_attn_hca",),
    "decode_attention_csa": _FRONT + ("decode_sparse_attn",),
    "prefill_attention_swa": _FRONT + ("prefill_sparse_attn",),
    "prefill_attention_hca": _FRONT + ("prefill_sparse_attn",),
    "prefill_attention_csa": _FRONT + ("prefill_sparse_attn",),
    "decode_layer": _FRONT + ("decode_sparse_attn",),
    "moe": ("hc_pre", "gate", "expert_shared"),
}


def comparator_for(kernel, name, expected):
    """The comparator bisect uses for tensor `name` of `kernel` (rules in the module doc);
    `expected` is the reference tensor."""
    own = specs.COMPARATORS.get(kernel, {})
    if name in own:
        return own[name]
    for leaf in LEAVES.get(kernel, ()):
        if name in specs.COMPARATORS[leaf]:
            return specs.COMPARATORS[leaf][name]
    dtype = np.asarray(expected).dtype
    if dtype == np.int8:
        return CODES
    if dtype.kind in "iu":
        if name in ACCUMULATORS:
            top = float(np.abs(np.asarray(expected, np.float64)).max(initial=0.0))
            return ratio_allclose(atol=max(top / 128, 1.0), rtol=1 / 128, max_error_ratio=0.005)
        return EXACT
    return VALUES


class StageResult:
    """One compared tensor: its name, whether it is a stage or an output, where the
    reference came from ("golden" or "c"), and the comparator's CompareResult."""

    def __init__(self, index, name, kind, reference, result):
        self.index, self.name, self.kind, self.reference = index, name, kind, reference
        self.result = result

    @property
    def passed(self):
        return self.result.passed

    def __bool__(self):
        return self.passed

    def __repr__(self):
        return (f"<StageResult #{self.index} {self.name} ({self.kind}, vs {self.reference}): "
                f"{'PASS' if self.passed else 'FAIL'}>")


class Bisection:
    """What bisect found. `stages` lists every compared tensor in computation order,
    `first_failure` names the first that fails (None if all pass), `order` is the whole
    computation order (compared or not), `report` the compare.Report of the compared ones;
    bisection[name] is that tensor's CompareResult."""

    def __init__(self, kernel, reference, order, stages):
        self.kernel, self.reference, self.order, self.stages = kernel, reference, order, stages
        self.report = Report({s.name: s.result for s in stages})

    @property
    def passed(self):
        return all(s.passed for s in self.stages)

    def __bool__(self):
        return self.passed

    def __getitem__(self, name):
        return self.report[name]

    @property
    def failed(self):
        return [s.name for s in self.stages if not s.passed]

    @property
    def first_failure(self):
        return next((s.name for s in self.stages if not s.passed), None)

    @property
    def not_dumped(self):
        given = {s.name for s in self.stages}
        return [n for n in self.order if n not in given]

    def window(self):
        """(last passing compared tensor before the first failure or None, the tensors
        between them that were not compared). None if nothing fails."""
        first = self.first_failure
        if first is None:
            return None
        given = {s.name: s for s in self.stages}
        i = self.order.index(first)
        last = next((n for n in reversed(self.order[:i]) if n in given), None)
        j = self.order.index(last) + 1 if last is not None else 0
        return last, [n for n in self.order[j:i] if n not in given]

    def _headline(self):
        ref = "the C kernel" if self.reference == "c" else "the golden"
        head = f"bisect {self.kernel} against {ref}: "
        first = self.first_failure
        if first is None:
            return head + f"all {len(self.stages)} compared tensors pass"
        pos = self.order.index(first) + 1
        return head + (f"first departure at '{first}' (step {pos} of {len(self.order)} in "
                       f"computation order); {len(self.failed)} of {len(self.stages)} fail")

    def _narrowing(self):
        w = self.window()
        if w is None:
            return ""
        last, between = w
        where = f"after '{last}' (last passing)" if last else "before any compared tensor"
        tail = f"; dump {', '.join(between)} to narrow it" if between else ""
        return f"the departure lies {where} and at or before '{self.first_failure}'{tail}"

    def _rows(self):
        by_name = {s.name: s for s in self.stages}
        rows = []
        for i, name in enumerate(self.order, 1):
            s = by_name.get(name)
            if s is None:
                rows.append((str(i), name, "", "not dumped", "", "", "", ""))
                continue
            r = s.result
            err = "-" if r.max_abs_err is None else f"{r.max_abs_err:.6g}"
            rows.append((str(i), name, s.kind, "PASS" if s.passed else "FAIL",
                         f"{r.bad}/{r.allowed}", err, s.reference, r.comparator))
        return rows

    def __str__(self):
        head = ("#", "name", "kind", "result", "bad/allowed", "max abs err", "vs", "comparator")
        rows = self._rows()
        widths = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]
        lines = [self._headline()]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip()
                  for x in [head] + rows]
        note = self._narrowing()
        if note:
            lines += [note, "", self[self.first_failure].message]
        return "\n".join(lines)

    def __repr__(self):
        return (f"<Bisection {self.kernel}: first_failure={self.first_failure!r}, "
                f"{len(self.stages)} compared, failed={self.failed}>")

    def _repr_html_(self):
        head = ("#", "name", "kind", "result", "bad/allowed", "max abs err", "vs", "comparator")
        first = self.first_failure
        body = []
        for row in self._rows():
            style = {"FAIL": ' style="background:#fdd"',
                     "not dumped": ' style="color:#888"'}.get(row[3], "")
            cells = [html.escape(c) for c in row]
            if row[1] == first:
                cells[1] = f"<b>{cells[1]}</b>"
            body.append(f"<tr{style}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        out = [f"<p>{html.escape(self._headline())}</p>", "<table><tr>"
               + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(body) + "</table>"]
        note = self._narrowing()
        if note:
            out += [f"<p>{html.escape(note)}</p>", self[first]._repr_html_()]
        return "".join(out)


def _run(fn, kernel, inputs, config, stages):
    params = inspect.signature(fn).parameters
    kw = fresh(kernel, inputs)
    if config is not None and "config" in params:
        kw["config"] = config
    if stages and "stages" in params:
        kw["stages"] = True
    out = fn(**kw)
    st = out.pop("stages", {}) if isinstance(out, dict) else {}
    return out, {k: v for k, v in st.items() if isinstance(v, np.ndarray)}


def bisect(kernel, inputs, npu_stages, *, npu_outputs=None, config=None, reference="golden"):
    """Compare the NPU's intermediates `npu_stages` (and outputs `npu_outputs`) of `kernel`
    on `inputs` with the reference's, stage by stage in computation order.

    Names are the golden's stage and output names (dsv4.golden.<kernel>.__doc__); an
    unknown name raises ValueError listing the valid ones. reference="golden" (default)
    or "c" (the C kernel's stages and outputs where it has them). Returns a Bisection;
    .first_failure names the first tensor that departs.
    """
    if kernel not in KERNELS or not hasattr(golden, kernel):
        raise ValueError(f"bisect: unknown kernel {kernel!r}; kernels: {', '.join(KERNELS)}")
    if reference not in ("golden", "c"):
        raise ValueError(f"bisect: reference must be 'golden' or 'c', got {reference!r}")
    npu = {k: np.asarray(v) for k, v in (npu_stages or {}).items()}
    twice = sorted(set(npu) & set(npu_outputs or {}))
    if twice:
        raise ValueError(f"bisect: {twice} given both in npu_stages and in npu_outputs")
    npu.update({k: np.asarray(v) for k, v in (npu_outputs or {}).items()})
    if not npu:
        raise ValueError("bisect: nothing to compare (npu_stages and npu_outputs are empty)")

    c_out, c_st = ({}, {})
    if reference == "c":
        c_out, c_st = _run(KERNELS[kernel], kernel, inputs, config, stages=True)
    need_golden = reference == "golden" or not set(npu) <= set(c_out) | set(c_st)
    g_out, g_st = _run(getattr(golden, kernel), kernel, inputs, config, stages=True) \
        if need_golden else ({}, {})

    order = list(g_st) + [n for n in c_st if n not in g_st]
    order += [n for n in list(g_out) + list(c_out) if n not in order]
    unknown = [n for n in npu if n not in order]
    if unknown:
        raise ValueError(f"bisect: {kernel} has no stage or output {unknown}; valid names, in "
                         f"computation order: {', '.join(order)}")

    ref, source = {}, {}
    for name in order:
        if name in c_st or name in c_out:
            ref[name], source[name] = (c_st.get(name) if name in c_st else c_out[name]), "c"
        else:
            ref[name], source[name] = (g_st.get(name) if name in g_st else g_out[name]), "golden"
    outputs = set(g_out) | set(c_out)
    given = [n for n in order if n in npu]
    cmps = {n: comparator_for(kernel, n, ref[n]) for n in given}
    report = compare_outputs({**ref, **npu}, {n: ref[n] for n in given}, cmps, inputs=inputs)
    stages = [StageResult(order.index(n) + 1, n, "output" if n in outputs else "stage",
                          source[n], report[n]) for n in given]
    return Bisection(kernel, reference, order, stages)
