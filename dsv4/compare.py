"""Comparators: check an NPU (or C) output against a golden output and say where it differs.

The pass/fail rules are those of pypto-lib ``golden/validation.py`` (spec chapter 1, §2.4).
Every array is widened to float32 first (exact for bf16, fp8, fp16 and int8) and every
constant is rounded to float32 before it meets an array, as torch does, so the decision
on each element is the reference decision.  Every comparator returns a CompareResult that
names the failing elements, not just a verdict.
"""
import numpy as np

__all__ = ["CompareResult", "Report", "allclose", "ratio_allclose", "ratio_reldiff",
           "topk_pair_compare", "error_distribution", "compare_outputs"]

_F = np.float32
_MAX_ROWS = 10


def _f32(x):
    # ml_dtypes arrays (bf16, fp8) have dtype kind 'V'; astype widens them exactly.
    return np.asarray(x).astype(np.float32)


def _coord(flat, shape):
    return tuple(int(i) for i in np.unravel_index(int(flat), shape)) if shape else ()


def _g(v):
    return "-" if v is None else f"{v:.6g}"


class CompareResult:
    """Outcome of one comparison. ``bool(result)`` is the verdict; ``str(result)`` explains it."""

    def __init__(self, name="", comparator="", passed=False, bad=0, allowed=0, total=0,
                 worst=None, bad_rows=None, mask=None, message="", max_abs_err=None,
                 max_abs_err_index=None, stats=None):
        self.name, self.comparator, self.passed = name, comparator, bool(passed)
        self.bad, self.allowed, self.total = int(bad), int(allowed), int(total)
        self.worst, self.bad_rows, self.mask = worst or [], bad_rows or [], mask
        self.message, self.stats = message, stats or {}
        self.max_abs_err, self.max_abs_err_index = max_abs_err, max_abs_err_index

    def __bool__(self):
        return self.passed

    def __str__(self):
        return self.message

    def __repr__(self):
        return (f"<CompareResult {self.name or '?'}: {'PASS' if self.passed else 'FAIL'} "
                f"bad={self.bad}/{self.total} allowed={self.allowed} by {self.comparator}>")

    def _repr_html_(self):
        head = (f"<b>{self.name or 'output'}</b> {'PASS' if self.passed else '<b>FAIL</b>'} "
                f"&mdash; {self.comparator}: bad {self.bad}/{self.total}, allowed {self.allowed}, "
                f"max abs err {_g(self.max_abs_err)}")
        if not self.worst:
            return f"<p>{head}</p>"
        keys = list(self.worst[0])
        rows = "".join("<tr>" + "".join(f"<td>{w[k]}</td>" for k in keys) + "</tr>" for w in self.worst)
        return (f"<p>{head}</p><table><tr>" + "".join(f"<th>{k}</th>" for k in keys)
                + f"</tr>{rows}</table>")


def _bad_rows(mask):
    if mask is None or mask.ndim == 0 or not mask.any():
        return []
    counts = mask.reshape(mask.shape[0], -1).sum(axis=1)
    rows = np.flatnonzero(counts)
    rows = rows[np.argsort(-counts[rows], kind="stable")][:_MAX_ROWS]
    return [(int(r), int(counts[r])) for r in rows]


def _make(ctx, passed, notes, *, mask=None, allowed=0, a=None, e=None, d=None, tol=None,
          key=None, extra=None, max_show=10, counts=True, show_max=True, hide=(), stats=None):
    """Assemble a CompareResult: count bad elements, pick the worst, write the message."""
    total = ctx["total"]
    # numpy returns scalars for 0-d operands; keep arrays so .flat and .shape work
    mask, d = (None if x is None else np.asarray(x) for x in (mask, d))
    bad = int(mask.sum()) if mask is not None else 0
    worst = []
    if bad:
        flat = np.flatnonzero(mask)
        if key is not None:  # worst first; NaN counts as the worst of all
            k = key.reshape(-1)[flat]
            flat = flat[np.argsort(-np.where(np.isnan(k), np.inf, k), kind="stable")]
        tol_b = np.broadcast_to(_F(0) if tol is None else tol, mask.shape)
        for f in flat[:max_show]:
            w = {"index": _coord(f, mask.shape), "actual": float(a.flat[f]),
                 "expected": float(e.flat[f]), "abs_err": float(d.flat[f]), "tol": float(tol_b.flat[f])}
            for name, src in (extra or {}).items():
                w[name] = src(f) if callable(src) else float(src.flat[f])
            worst.append(w)
    max_err = max_idx = None
    if show_max and d is not None and d.size and not np.isnan(d).all():
        i = int(np.nanargmax(d))
        max_err, max_idx = float(d.flat[i]), _coord(i, d.shape)
    rows = _bad_rows(mask)

    label = f"'{ctx['name']}'" if ctx["name"] else "output"
    lines = [f"{label} {'PASS' if passed else 'FAIL'}  {ctx['comparator']}",
             f"  shape={ctx['shape']} dtype={ctx['dtype']}"]
    if counts:
        pct = lambda n: f"{n / total:.4%}" if total else "n/a"
        lines.append(f"  bad {bad}/{total} ({pct(bad)}), allowed {allowed} ({pct(allowed)})")
    lines += ["  " + n for n in notes]
    if max_err is not None:
        tol_txt = "" if tol is None else f" (tol {float(np.broadcast_to(tol, d.shape)[max_idx]):.6g})"
        lines.append(f"  max abs err {max_err:.6g} at {max_idx}{tol_txt}")
    if worst:
        lines.append(f"  worst {len(worst)} of {bad} bad:")
        for w in worst:
            rest = "  ".join(f"{k}={v if isinstance(v, str) else _g(v)}"
                             for k, v in w.items() if k != "index" and k not in hide)
            lines.append(f"    {w['index']}  {rest}")
    if rows:
        lines.append("  bad rows (axis 0, row: count): " + ", ".join(f"{r}: {c}" for r, c in rows))
    return CompareResult(ctx["name"], ctx["comparator"], passed, bad, allowed, total, worst, rows,
                         mask, "\n".join(lines), max_err, max_idx, stats)


class Comparator:
    """A named comparator; call it as cmp(actual, expected, *, name=..., ...)."""

    def __init__(self, desc, run):
        self.desc, self._run = desc, run
        self.__name__ = desc  # the label pypto-style harnesses print

    def __repr__(self):
        return self.desc

    def __call__(self, actual, expected, *, name="", actual_outputs=None, expected_outputs=None,
                 inputs=None, atol=None, rtol=None):
        a, e = np.asarray(actual), np.asarray(expected)
        ctx = {"name": name, "comparator": self.desc, "shape": a.shape, "dtype": str(a.dtype),
               "total": int(a.size)}
        if a.shape != e.shape:
            return _make(ctx, False, [f"shape mismatch: actual {a.shape} vs expected {e.shape}"],
                         counts=False)
        with np.errstate(all="ignore"):  # inf-inf, x/0 etc. are handled by the rules themselves
            return self._run(a, e, ctx, actual_outputs or {}, atol, rtol)


def _nonfinite_fail(ctx, a, e, max_show):
    bad = ~np.isfinite(a)
    notes = [f"illegal values in actual: NaN={int(np.isnan(a).sum())} Inf={int(np.isinf(a).sum())}"
             " (any NaN/Inf in actual fails)"]
    d = np.abs(a - e)
    return _make(ctx, False, notes, mask=bad, a=a, e=e, d=d, key=d, max_show=max_show)


def allclose(atol=1e-5, rtol=1e-5, max_show=10):
    """torch.allclose on fp32-widened values: a == e, or finite |a-e| <= atol + |rtol*e|. NaN never passes."""
    for arg, v in (("atol", atol), ("rtol", rtol)):
        if not v >= 0:
            raise ValueError(f"{arg} must be >= 0, got {v}")

    def run(a, e, ctx, outs, _atol, _rtol):
        a, e = _f32(a), _f32(e)
        d = np.abs(a - e)
        tol = _F(atol) + np.abs(_F(rtol) * e)
        bad = ~((a == e) | (np.isfinite(d) & (d <= tol)))
        return _make(ctx, not bad.any(), [f"atol={atol} rtol={rtol}, every element must pass"],
                     mask=bad, a=a, e=e, d=d, tol=tol, key=d, max_show=max_show)
    return Comparator(f"allclose(atol={atol}, rtol={rtol})", run)


def ratio_allclose(atol=None, rtol=None, max_error_ratio=0.005, max_show=10, same_inf=False):
    """Bad iff |a-e| > atol + rtol*|e| (strict); pass iff #bad <= round(max_error_ratio*numel).

    NaN/Inf in actual fails outright; NaN in expected compares false, so it is never bad.
    atol/rtol of None take the harness values passed at call time (else 1e-5).
    same_inf=True (dsv4's, for states that mark empty rows -inf): an infinity equal to the
    expected one matches.
    """
    if not 0.0 <= max_error_ratio <= 1.0:
        raise ValueError(f"max_error_ratio must be in [0, 1], got {max_error_ratio}")

    def run(a, e, ctx, outs, h_atol, h_rtol):
        at = atol if atol is not None else (h_atol if h_atol is not None else 1e-5)
        rt = rtol if rtol is not None else (h_rtol if h_rtol is not None else 1e-5)
        a, e = _f32(a), _f32(e)
        if same_inf:
            same = np.isinf(a) & (a == e)
            a, e = np.where(same, _F(0), a), np.where(same, _F(0), e)
        if not np.isfinite(a).all():
            return _nonfinite_fail(ctx, a, e, max_show)
        d = np.abs(a - e)
        tol = _F(at) + _F(rt) * np.abs(e)
        bad = d > tol
        threshold = round(max_error_ratio * a.size)  # Python round: exact halves go to even
        note = f"atol={at} rtol={rt}; allowed = round({max_error_ratio} * {a.size}) = {threshold}"
        return _make(ctx, int(bad.sum()) <= threshold, [note], mask=bad, allowed=threshold,
                     a=a, e=e, d=d, tol=tol, key=d, max_show=max_show)
    extra = ", same_inf=True" if same_inf else ""
    return Comparator(f"ratio_allclose(atol={atol}, rtol={rtol}, max_error_ratio={max_error_ratio}{extra})",
                      run)


def _floored_rdiff(a, e, d, thd):
    # The floor 2^-14/thd keeps near-zero values from exploding; below thd the plain
    # absolute difference is used, so a point is bad only if both measures exceed thd.
    floor = _F((1.0 / (1 << 14)) / thd)
    den = np.maximum(np.maximum(np.abs(a), np.abs(e)), floor) + _F(1e-9)
    return np.where(d < _F(thd), d, d / den)


def ratio_reldiff(diff_thd=0.01, pct_thd=0.05, max_diff_hd=float("inf"), max_show=10):
    """Bad iff floored rdiff > diff_thd; pass iff #bad <= round(pct_thd*numel) and worst bad rdiff < max_diff_hd."""
    if not 0.0 < diff_thd:
        raise ValueError(f"diff_thd must be > 0, got {diff_thd}")
    if not 0.0 <= pct_thd <= 1.0:
        raise ValueError(f"pct_thd must be in [0, 1], got {pct_thd}")
    if not 0.0 < max_diff_hd:
        raise ValueError(f"max_diff_hd must be > 0, got {max_diff_hd}")

    def run(a, e, ctx, outs, _atol, _rtol):
        a, e = _f32(a), _f32(e)
        if not np.isfinite(a).all():
            return _nonfinite_fail(ctx, a, e, max_show)
        d = np.abs(a - e)
        rdiff = _floored_rdiff(a, e, d, diff_thd)
        bad = rdiff > _F(diff_thd)
        n, threshold = int(bad.sum()), round(pct_thd * a.size)
        worst = float(rdiff[bad].max()) if n else 0.0
        notes = [f"allowed = round({pct_thd} * {a.size}) = {threshold}",
                 f"worst bad rdiff {worst:.6g} (must be < max_diff_hd={max_diff_hd})"]
        if worst >= max_diff_hd:
            notes.append("FAILED on the single-point cap max_diff_hd")
        return _make(ctx, n <= threshold and worst < max_diff_hd, notes, mask=bad, allowed=threshold,
                     a=a, e=e, d=d, tol=_F(diff_thd), key=rdiff, extra={"rdiff": rdiff},
                     max_show=max_show)
    return Comparator(f"ratio_reldiff(diff_thd={diff_thd}, pct_thd={pct_thd}, max_diff_hd={max_diff_hd})", run)


def topk_pair_compare(vals_name, dim=-1, descending=True, max_show=10):
    """Top-k index check: a differing index is legal iff the actual values stay ordered around it.

    For a mismatch at position p along ``dim``: v[p-1] >= v[p] >= v[p+1] (<= when ascending),
    compared exactly, using the actual output ``vals_name``. Expected values are never read.
    """
    order = "descending" if descending else "ascending"

    def run(ai, ei, ctx, outs, _atol, _rtol):
        if vals_name not in outs:
            return _make(ctx, False, [f"values output '{vals_name}' not found in actual outputs "
                                      f"{list(outs)}"], counts=False)
        v = _f32(outs[vals_name])
        if v.shape != ai.shape:
            return _make(ctx, False, [f"idx/vals shape mismatch: idx={ai.shape} vs vals={v.shape}"],
                         counts=False)
        nd = ai.ndim
        dp = dim + nd if dim < 0 else dim
        if not 0 <= dp < nd:
            return _make(ctx, False, [f"dim={dim} out of range for shape {ai.shape}"], counts=False)
        mism = ai != ei
        vm = np.moveaxis(v, dp, -1)
        k = vm.shape[-1]
        ok = np.ones(vm.shape, dtype=bool)
        if k >= 2:  # with k < 2 there is no neighbour, so every mismatch is legal
            pair = vm[..., :-1] >= vm[..., 1:] if descending else vm[..., :-1] <= vm[..., 1:]
            ok[..., 1:] &= pair   # pair (p-1, p)
            ok[..., :-1] &= pair  # pair (p, p+1)
        bad = mism & ~np.moveaxis(ok, -1, dp)
        n_mism, n_bad = int(mism.sum()), int(bad.sum())
        note = (f"{n_mism} index mismatch(es), {n_mism - n_bad} legal tie swap(s), {n_bad} where "
                f"'{vals_name}' breaks {order} order")

        def window(f):
            c = list(_coord(f, v.shape))
            p = c[dp]
            c[dp] = slice(max(0, p - 1), min(k, p + 2))
            return "[" + ", ".join(f"{x:.6g}" for x in v[tuple(c)].tolist()) + "]"
        a64, e64 = ai.astype(np.float64), ei.astype(np.float64)
        return _make(ctx, n_bad == 0, [note], mask=bad, a=a64, e=e64, d=np.abs(a64 - e64),
                     extra={"score": v, "window": window}, max_show=max_show, show_max=False,
                     hide=("abs_err", "tol"))
    return Comparator(f"topk_pair_compare(vals_name={vals_name!r}, dim={dim}, descending={descending})", run)


def error_distribution(diff_thds=(1e-3, 3e-3, 5e-3, 1e-2, 3e-2, 5e-2),
                       quantiles=(0.5, 0.9, 0.99, 0.999, 0.9999, 1.0), always_pass=True):
    """Measurement only: rel-L2, cosine, bad fractions per threshold and percentiles, in the message.

    Passes, except with always_pass=False when actual holds NaN/Inf.
    """
    diff_thds, quantiles = tuple(diff_thds), tuple(quantiles)
    if not all(t > 0 for t in diff_thds):
        raise ValueError(f"diff_thds must all be > 0, got {diff_thds}")
    if not all(0.0 <= q <= 1.0 for q in quantiles):
        raise ValueError(f"quantiles must be in [0, 1], got {quantiles}")

    def pct(label, x, stats):
        x = x[np.isfinite(x)]
        if x.size == 0:
            return f"{label}: (no finite values)"
        qv = np.quantile(x, quantiles) if quantiles else []
        stats[label] = {q: float(v) for q, v in zip(quantiles, qv)}
        return f"{label}: " + "  ".join(f"p{q * 100:g}={v:.3g}" for q, v in zip(quantiles, qv))

    def run(a, e, ctx, outs, _atol, _rtol):
        a, e = _f32(a).reshape(-1), _f32(e).reshape(-1)
        notes, stats = [], {}
        if not np.isfinite(a).all():
            if not always_pass:
                return _nonfinite_fail(ctx, a.reshape(ctx["shape"]), e.reshape(ctx["shape"]), 10)
            notes.append(f"illegal values in actual: NaN={int(np.isnan(a).sum())} "
                         f"Inf={int(np.isinf(a).sum())}")
        d = np.abs(a - e)
        na, ne = np.linalg.norm(a), np.linalg.norm(e)
        stats["rel_l2"] = float(np.linalg.norm(d) / max(ne, _F(1e-12))) if a.size else 0.0
        stats["cosine"] = float(np.dot(a, e) / (max(na, _F(1e-8)) * max(ne, _F(1e-8)))) if a.size else 1.0
        notes.append(f"rel-L2 = {stats['rel_l2']:.4%}  cosine = {stats['cosine']:.7f}  numel={a.size}")
        stats["frac_gt"] = {}
        for thd in diff_thds:
            r = _floored_rdiff(a, e, d, thd)
            bad = r > _F(thd)
            frac = float(bad.sum()) / a.size if a.size else 0.0
            worst = float(r[bad].max()) if bad.any() else 0.0
            stats["frac_gt"][thd] = (frac, worst)
            notes.append(f"diff_thd={thd:.0e}  frac>thd={frac:.4%}  worst={worst:.3g}")
        notes.append(pct("rel-diff percentiles", d / np.maximum(np.maximum(np.abs(a), np.abs(e)), _F(1e-6)), stats))
        notes.append(pct("abs-diff percentiles", d, stats))
        em = np.abs(e)
        stats["golden_abs_mean"] = float(em.mean()) if em.size else 0.0
        notes.append(f"|golden| mean={stats['golden_abs_mean']:.4g}")
        notes.append(pct("|golden| percentiles", em, stats))
        return _make(ctx, True, notes, d=d.reshape(ctx["shape"]), counts=False, stats=stats)
    return Comparator(f"error_distribution(diff_thds={diff_thds}, always_pass={always_pass})", run)


def _nan_inf_parity(a, e, ctx, max_show=10):
    """Fail unless NaN, +Inf and -Inf sit at the same positions in actual and expected."""
    if a.dtype.kind in "biu" and e.dtype.kind in "biu":
        return None
    # float64 stays as is so that huge finite values are not turned into Inf by the check
    af, ef = (x if x.dtype.kind in "fc" else _f32(x) for x in (a, e))
    bad = ((np.isnan(af) != np.isnan(ef)) | (np.isposinf(af) != np.isposinf(ef))
           | (np.isneginf(af) != np.isneginf(ef)))
    if not bad.any():
        return None
    note = (f"NaN/Inf positions differ at {int(bad.sum())} element(s): actual NaN={int(np.isnan(af).sum())} "
            f"Inf={int(np.isinf(af).sum())}, expected NaN={int(np.isnan(ef).sum())} Inf={int(np.isinf(ef).sum())}")
    a32, e32 = _f32(a), _f32(e)
    with np.errstate(all="ignore"):
        d = np.abs(a32 - e32)
    return _make(ctx, False, [note], mask=bad, a=a32, e=e32, d=d, max_show=max_show, show_max=False,
                 hide=("tol",))


class Report:
    """Results of compare_outputs, one CompareResult per expected output, in order."""

    def __init__(self, results):
        self.results = results

    @property
    def passed(self):
        return all(r.passed for r in self.results.values())

    @property
    def failed(self):
        return [n for n, r in self.results.items() if not r.passed]

    def __bool__(self):
        return self.passed

    def __getitem__(self, name):
        return self.results[name]

    def __repr__(self):
        return f"<Report {'PASS' if self.passed else 'FAIL'}: {len(self.results)} outputs, failed={self.failed}>"

    def __str__(self):
        head = ("output", "comparator", "result", "bad/allowed", "max abs err")
        rows = [(n, r.comparator, "PASS" if r.passed else "FAIL", f"{r.bad}/{r.allowed}",
                 _g(r.max_abs_err)) for n, r in self.results.items()]
        widths = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip() for x in [head] + rows]
        fails = self.failed
        lines.append(f"{len(self.results) - len(fails)}/{len(self.results)} outputs passed"
                     + (f"; failed: {fails}" if fails else ""))
        return "\n".join(lines + ["", *(self.results[n].message for n in fails)]).rstrip()

    def raise_if_failed(self):
        if not self.passed:
            raise AssertionError(str(self))


def compare_outputs(actual, expected, comparators=None, *, inputs=None, atol=1e-5, rtol=1e-5):
    """Compare every output of ``expected`` (in order): NaN/Inf parity, then its comparator.

    Outputs without an entry in ``comparators`` use allclose(atol, rtol). A comparator may
    also be a plain pypto-style callable returning (ok, detail).
    """
    comparators = comparators or {}
    default = allclose(atol, rtol)
    results = {}
    for name, exp in expected.items():
        cmp = comparators.get(name) or default
        label = getattr(cmp, "__name__", repr(cmp))
        e = np.asarray(exp)
        ctx = {"name": name, "comparator": label, "shape": e.shape, "dtype": str(e.dtype),
               "total": int(e.size)}
        if name not in actual:
            results[name] = _make(ctx, False, [f"missing from actual outputs (have {list(actual)})"],
                                  counts=False)
            continue
        a = np.asarray(actual[name])
        ctx.update(shape=a.shape, dtype=str(a.dtype))
        parity = _nan_inf_parity(a, e, ctx) if a.shape == e.shape else None
        if parity is not None:
            results[name] = parity
            continue
        kw = {"name": name} if isinstance(cmp, Comparator) else {}  # plain callables lack name=
        res = cmp(a, e, actual_outputs=actual, expected_outputs=expected, inputs=inputs or {},
                  atol=atol, rtol=rtol, **kw)
        if isinstance(res, tuple):  # (ok, detail) from a plain callable
            ok, detail = res
            res = CompareResult(name, label, ok, total=a.size,
                                message=f"'{name}' {'PASS' if ok else 'FAIL'}  {label}\n{detail}".rstrip())
        results[name] = res
    return Report(results)
