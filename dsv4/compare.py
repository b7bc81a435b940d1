"""Comparators: check an NPU (or C) output against a golden output and say where it differs.

The pass/fail rules are those of pypto-lib ``golden/validation.py`` (spec chapter 1, §2.4).
Every array is widened to float32 first (exact for bf16, fp8, fp16 and int8) and every
constant is rounded to float32 before it meets an array, as torch does, so the decision
on each element is the reference decision.  Every comparator returns a CompareResult that
names the failing elements, not just a verdict.

Axes.  A result names its tensor's axes (``axes=`` of compare_outputs, e.g. "T,H,HD";
dsv4.verify takes them from the C kernel table, otherwise axis0, axis1, ...), counts the
bad elements of every slice of every axis (``axis_counts``) and prints coordinates as
``(T=3, H=5, HD=17)``.

Hotspots.  pypto-lib's budgets can absorb a fault confined to one slice (one head of 64
for one token of 8 is 0.2 % of q), so a *passing* result also looks for one: first among
its bad elements, then, if they show none, among its near misses (elements whose error
exceeds a quarter of the element tolerance; comparators without an element tolerance
have none).  Along each feature axis of length >= 2 (heads, groups, columns: every axis
but the row axes below), the slice holding the most of them is a hotspot when it holds
  * at least 8 of them,
  * at least half of them, and
  * them at a rate (per element of the slice) at least 8 times the rate in the rest.
Noise spread over the tensor does not meet the last condition; one wrong head or column
does.  Row axes are not searched: tokens, requests, sequence, ranks, experts, top-k
slots, key positions, cache and state blocks and slots (_ROW_AXES), the hyper-connection
copies HC, and the leading axis of a tensor without axis names.  There, harmless
differences gather too: a rounding flip in one token's norm or int8 scale moves that
whole token, and the HC copies carry different weights (dsv4's own C kernels show both
against the goldens).  A hotspot gives the result a warning (``warnings``) without
changing the verdict: the verdict stays pypto-lib's.
"""
import contextvars
import html

import numpy as np

__all__ = ["CompareResult", "Report", "allclose", "ratio_allclose", "ratio_reldiff",
           "topk_pair_compare", "error_distribution", "compare_outputs", "axis_names"]

_F = np.float32
_MAX_ROWS = 10
_TIGHT = 0.25        # near miss: error above this fraction of the element tolerance
_HOT_MIN = 8         # a hotspot holds at least this many elements of its set ...
_HOT_RATE = 8.0      # ... at this many times the rate of the rest of the tensor
_SHOW_SLICES = 5     # busiest slices listed per axis
_DIFF_THDS = (1e-3, 3e-3, 5e-3, 1e-2, 3e-2, 5e-2)   # pypto-lib's error_distribution buckets
# the kernel table's names of row axes (see Hotspots above)
_ROW_AXES = frozenset("T B S W M R E K SL ISL HC NB PAGE NC CBLK OB BLOCK CB NI CNB CPAGE "
                      "HNB HPAGE INB IPAGE".split())

# Comparators that wrap others (dsv4.specs) call them without axes, so compare_outputs
# hands the output's axis names down through this.
_AXES = contextvars.ContextVar("dsv4_compare_axes", default=None)


def _f32(x):
    # ml_dtypes arrays (bf16, fp8) have dtype kind 'V'; astype widens them exactly.
    return np.asarray(x).astype(np.float32, copy=False)


def _coord(flat, shape):
    return tuple(int(i) for i in np.unravel_index(int(flat), shape)) if shape else ()


def _g(v):
    return "-" if v is None else f"{v:.6g}"


def axis_names(axes, ndim):
    """Names for the `ndim` axes of a tensor: `axes` ("T,H,HD" or a sequence) when it has
    `ndim` entries, else axis0, axis1, ...  Literal sizes ("1") and "_" become axis<i>;
    a repeated name gets its position appended."""
    if isinstance(axes, str):
        axes = axes.split(",")
    given = [str(x).strip() for x in axes] if axes is not None else []
    if len(given) != ndim:
        given = [""] * ndim
    names = []
    for i, n in enumerate(given):
        if not n.isidentifier() or n.startswith("_"):
            n = f"axis{i}"
        if n in names:
            n = f"{n}_{i}"
        names.append(n)
    return tuple(names)


def _where(index, names):
    """Coordinates as (T=3, H=5) when the axes have names, else as a plain tuple."""
    if not names or tuple(names) == axis_names(None, len(names)) or len(index) != len(names):
        return str(tuple(index))
    return "(" + ", ".join(f"{n}={i}" for n, i in zip(names, index)) + ")"


def _per_axis(mask):
    """Set elements per index of each axis. Few set (bad elements of a whole cache): counted
    from their coordinates, one pass over `mask`; many: summed over the other axes."""
    idx = np.flatnonzero(mask)
    if idx.size > mask.size // 64:
        return [mask.sum(axis=tuple(j for j in range(mask.ndim) if j != k), dtype=np.int64)
                for k in range(mask.ndim)]
    coords = np.unravel_index(idx, mask.shape)
    return [np.bincount(c, minlength=n).astype(np.int64) for c, n in zip(coords, mask.shape)]


def _feature_axes(names):
    generic = tuple(names) == axis_names(None, len(names))
    return [n not in _ROW_AXES and not (generic and k == 0) for k, n in enumerate(names)]


def _hotspots(mask, names, counts=None):
    """Slices holding most of `mask`'s elements, by the rule in the module docstring."""
    n = int(mask.sum())
    if n < _HOT_MIN or mask.ndim == 0:
        return []
    found = []
    for name, c, searched in zip(names, counts or _per_axis(mask), _feature_axes(names)):
        if c.size < 2 or not searched:
            continue
        i = int(np.argmax(c))
        ci, per_slice = int(c[i]), mask.size // c.size
        rest = (n - ci) / (mask.size - per_slice)
        if ci >= _HOT_MIN and 2 * ci >= n and ci / per_slice >= _HOT_RATE * rest:
            found.append({"axis": name, "index": i, "count": ci, "of": n, "length": int(c.size)})
    return found


def _busiest(c, name, k=_SHOW_SLICES):
    idx = np.flatnonzero(c)
    idx = idx[np.argsort(-c[idx], kind="stable")]
    txt = ", ".join(f"{name}={int(i)}: {int(c[i])}" for i in idx[:k])
    return txt + (", ..." if idx.size > k else "")


class CompareResult:
    """Outcome of one comparison. ``bool(result)`` is the verdict; ``str(result)`` explains it.

    ``mask`` marks the bad elements, ``worst`` lists the worst of them, ``axes`` names the
    tensor's axes and ``axis_counts[axis]`` counts the bad elements in each of its slices.
    ``warnings`` holds the hotspots of a passing result (see the module docstring), which
    ``hotspots`` describes as dicts (axis, index, count, of, length, set).  ``plot()`` draws
    the error (needs matplotlib).
    """

    def __init__(self, name="", comparator="", passed=False, bad=0, allowed=0, total=0,
                 worst=None, bad_rows=None, mask=None, message="", max_abs_err=None,
                 max_abs_err_index=None, stats=None, axes=(), axis_counts=None, hotspots=None,
                 warnings=None, actual=None, expected=None):
        self.name, self.comparator, self.passed = name, comparator, bool(passed)
        self.bad, self.allowed, self.total = int(bad), int(allowed), int(total)
        self.worst, self.bad_rows, self.mask = worst or [], bad_rows or [], mask
        self.message, self.stats = message, stats or {}
        self.max_abs_err, self.max_abs_err_index = max_abs_err, max_abs_err_index
        self.axes, self.axis_counts = tuple(axes), axis_counts or {}
        self.hotspots, self.warnings = hotspots or [], warnings or []
        self.actual, self.expected = actual, expected   # the compared arrays, for plot()

    def __bool__(self):
        return self.passed

    def __str__(self):
        return self.message

    def __repr__(self):
        return (f"<CompareResult {self.name or '?'}: {self.verdict} "
                f"bad={self.bad}/{self.total} allowed={self.allowed} by {self.comparator}>")

    @property
    def verdict(self):
        """PASS, FAIL, or WARN (passes, with a hotspot)."""
        return "FAIL" if not self.passed else ("WARN" if self.warnings else "PASS")

    def where(self, index):
        """`index` as named coordinates, e.g. "(T=3, H=5, HD=17)"."""
        return _where(index, self.axes)

    def _repr_html_(self):
        return _result_html(self)

    def error(self):
        """|actual - expected| in float32, with 0 where both hold the same NaN or Inf and
        NaN where only one does.  None when the arrays were not kept."""
        if self.actual is None or self.expected is None:
            return None
        a, e = _f32(self.actual), _f32(self.expected)
        with np.errstate(all="ignore"):
            d = np.abs(a - e)
        same = (a == e) | (np.isnan(a) & np.isnan(e))
        return np.where(same, _F(0), np.where(np.isfinite(d), d, _F(np.nan)))

    def error_histogram(self, diff_thds=_DIFF_THDS):
        """(labels, counts): elements per bucket of pypto-lib's error_distribution
        (floored rel-diff at each threshold), plus one bucket of NaN/Inf mismatches."""
        if self.actual is None or self.expected is None:
            return [], []
        a, e = _f32(self.actual).reshape(-1), _f32(self.expected).reshape(-1)
        with np.errstate(all="ignore"):
            d = np.abs(a - e)
            same = (a == e) | (np.isnan(a) & np.isnan(e))
            fin = np.isfinite(d) | same
            d = np.where(same, _F(0), d)
            a, e, d = a[fin], e[fin], d[fin]
            gt = [int((_floored_rdiff(a, e, d, t) > _F(t)).sum()) for t in diff_thds]
        counts = [d.size - gt[0]] + [gt[i] - gt[i + 1] for i in range(len(gt) - 1)] + [gt[-1]]
        labels = ([f"<={diff_thds[0]:g}"]
                  + [f"{lo:g}-{hi:g}" for lo, hi in zip(diff_thds, diff_thds[1:])]
                  + [f">{diff_thds[-1]:g}"])
        return labels + ["NaN/Inf"], counts + [int((~fin).sum())]

    def plot_axes(self):
        """The two axes the heatmap of plot() shows (all of them when there are fewer).

        Those whose per-slice bad counts vary most (coefficient of variation, std/mean);
        with no bad element, the per-slice maximum error decides.  Ties go to the earlier
        axis; the two keep their order in the tensor.
        """
        nd = len(np.shape(self.actual if self.actual is not None else self.mask))
        if nd <= 2:
            return list(range(nd))
        if self.bad and len(self.axis_counts) == nd:
            per = [np.asarray(c, dtype=np.float64) for c in self.axis_counts.values()]
        else:
            d = self.error()
            if d is None:
                return [0, 1]
            per = [np.fmax.reduce(d, axis=tuple(j for j in range(nd) if j != k)).astype(np.float64)
                   for k in range(nd)]

        def spread(x):
            x = np.nan_to_num(x)
            return float(x.std() / x.mean()) if x.size > 1 and x.mean() > 0 else 0.0
        order = sorted(range(nd), key=lambda k: -spread(per[k]))
        return sorted(order[:2])

    def plot(self):
        """A matplotlib Figure: the error heatmap and histogram of this output."""
        fig = _figure(1)
        ax = fig.subplots(1, 2, squeeze=False)[0]
        _draw(self, fig, ax[0], ax[1])
        return fig


def _bad_rows(mask):
    if mask is None or mask.ndim == 0 or not mask.any():
        return []
    counts = mask.reshape(mask.shape[0], -1).sum(axis=1)
    rows = np.flatnonzero(counts)
    rows = rows[np.argsort(-counts[rows], kind="stable")][:_MAX_ROWS]
    return [(int(r), int(counts[r])) for r in rows]


def _make(ctx, passed, notes, *, mask=None, allowed=0, a=None, e=None, d=None, tol=None,
          key=None, extra=None, max_show=10, counts=True, show_max=True, hide=(), stats=None,
          near=None):
    """Assemble a CompareResult: count bad elements, pick the worst, find hotspots, write the message.

    `near` marks the near misses (see the module docstring), for comparators with an
    element tolerance: a mask, or a function that makes it (needed only when the output
    passes with no hotspot of bad elements).
    """
    total = ctx["total"]
    # numpy returns scalars for 0-d operands; keep arrays so .flat and .shape work
    mask, d = (None if x is None else np.asarray(x) for x in (mask, d))
    names = axis_names(ctx.get("axes") or _AXES.get(), len(ctx["shape"]))
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
    i = int(np.argmax(d)) if show_max and d is not None and d.size else None
    if i is not None and np.isnan(d.flat[i]):       # argmax stops at the first NaN
        i = None if np.isnan(d).all() else int(np.nanargmax(d))
    if i is not None:
        max_err, max_idx = float(d.flat[i]), _coord(i, d.shape)
        if max_err == 0:
            max_idx = None   # no place to point at
    rows = _bad_rows(mask)
    per_axis = {}
    if mask is not None and mask.ndim:
        if mask.shape != tuple(ctx["shape"]):
            names = axis_names(None, mask.ndim)
        per_axis = dict(zip(names, _per_axis(mask)))

    label = f"'{ctx['name']}'" if ctx["name"] else "output"
    hot, warnings = [], []
    if passed and per_axis:
        hot = [dict(h, set="bad") for h in _hotspots(mask, names, list(per_axis.values()))]
        if hot:
            what = f"its {bad} bad elements (allowed {allowed})"
        elif near is not None:
            near = np.asarray(near() if callable(near) else near) | mask
            hot = [dict(h, set="near miss") for h in _hotspots(near, names)]
            what = f"its {int(near.sum())} near misses (error > {_TIGHT:g} x tolerance)"
        if hot:
            spots = ", ".join(f"{h['axis']}={h['index']} ({h['count']} of {h['of']})" for h in hot)
            warnings.append(f"{label} passes, but {what} concentrate in {spots}: "
                            "a fault confined to one slice can hide inside the budget")

    named = "" if names == axis_names(None, len(names)) else f" [{', '.join(names)}]"
    lines = [f"{label} {'PASS' if passed else 'FAIL'}  {ctx['comparator']}",
             f"  shape={ctx['shape']}{named} dtype={ctx['dtype']}"]
    if counts:
        pct = lambda n: f"{n / total:.4%}" if total else "n/a"
        lines.append(f"  bad {bad}/{total} ({pct(bad)}), allowed {allowed} ({pct(allowed)})")
    lines += ["  " + n for n in notes]
    if max_idx is not None:
        tol_txt = "" if tol is None else f" (tol {float(np.broadcast_to(tol, d.shape)[max_idx]):.6g})"
        lines.append(f"  max abs err {max_err:.6g} at {_where(max_idx, names)}{tol_txt}")
    if worst:
        lines.append(f"  worst {len(worst)} of {bad} bad:")
        for w in worst:
            rest = "  ".join(f"{k}={v if isinstance(v, str) else _g(v)}"
                             for k, v in w.items() if k != "index" and k not in hide)
            lines.append(f"    {_where(w['index'], names)}  {rest}")
    if bad and len(per_axis) == 1:
        lines.append("  bad rows (axis 0, row: count): " + ", ".join(f"{r}: {c}" for r, c in rows))
    elif bad and per_axis:
        lines.append("  bad per axis (slices holding bad elements / length, busiest first):")
        w = max(len(n) for n in per_axis)
        for n, c in per_axis.items():
            frac = f"{int(np.count_nonzero(c))}/{c.size}"
            lines.append(f"    {n.ljust(w)}  {frac.ljust(11)} {_busiest(c, n)}")
    lines += ["  WARNING: " + x for x in warnings]
    return CompareResult(ctx["name"], ctx["comparator"], passed, bad, allowed, total, worst, rows,
                         mask, "\n".join(lines), max_err, max_idx, stats, axes=names,
                         axis_counts=per_axis, hotspots=hot, warnings=warnings)


class Comparator:
    """A named comparator; call it as cmp(actual, expected, *, name=..., ...)."""

    def __init__(self, desc, run):
        self.desc, self._run = desc, run
        self.__name__ = desc  # the label pypto-style harnesses print

    def __repr__(self):
        return self.desc

    def __call__(self, actual, expected, *, name="", actual_outputs=None, expected_outputs=None,
                 inputs=None, atol=None, rtol=None, axes=None):
        """`axes` names the tensor's axes ("T,H,HD" or a sequence) in coordinates and counts."""
        a, e = np.asarray(actual), np.asarray(expected)
        ctx = {"name": name, "comparator": self.desc, "shape": a.shape, "dtype": str(a.dtype),
               "total": int(a.size), "axes": axes}
        if a.shape != e.shape:
            return _make(ctx, False, [f"shape mismatch: actual {a.shape} vs expected {e.shape}"],
                         counts=False)
        with np.errstate(all="ignore"):  # inf-inf, x/0 etc. are handled by the rules themselves
            res = self._run(a, e, ctx, actual_outputs or {}, atol, rtol)
        if res.actual is None:
            res.actual, res.expected = a, e
        return res


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
                     mask=bad, a=a, e=e, d=d, tol=tol, key=d, max_show=max_show,
                     near=lambda: d > _F(_TIGHT) * tol)
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
        finite = np.isfinite(a).all()
        if same_inf and not finite:
            same = np.isinf(a) & (a == e)
            a, e = np.where(same, _F(0), a), np.where(same, _F(0), e)
            finite = np.isfinite(a).all()
        if not finite:
            return _nonfinite_fail(ctx, a, e, max_show)
        d = np.abs(a - e)
        tol = _F(at) + _F(rt) * np.abs(e)
        bad = d > tol
        threshold = round(max_error_ratio * a.size)  # Python round: exact halves go to even
        note = f"atol={at} rtol={rt}; allowed = round({max_error_ratio} * {a.size}) = {threshold}"
        return _make(ctx, int(bad.sum()) <= threshold, [note], mask=bad, allowed=threshold,
                     a=a, e=e, d=d, tol=tol, key=d, max_show=max_show,
                     near=lambda: d > _F(_TIGHT) * tol)
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
        tight = _TIGHT * diff_thd
        return _make(ctx, n <= threshold and worst < max_diff_hd, notes, mask=bad, allowed=threshold,
                     a=a, e=e, d=d, tol=_F(diff_thd), key=rdiff, extra={"rdiff": rdiff},
                     max_show=max_show, near=lambda: _floored_rdiff(a, e, d, tight) > _F(tight))
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


def error_distribution(diff_thds=_DIFF_THDS,
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
    if np.isfinite(af).all() and np.isfinite(ef).all():
        return None
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
    """Results of compare_outputs, one CompareResult per expected output, in order.

    ``bool(report)`` is True when at least one output was compared and every one passed.
    ``str(report)`` is a table plus the details of every failing or warned output (what
    pytest prints for ``assert report, report``); in Jupyter it shows as an HTML table.
    ``warnings`` lists the hotspots of passing outputs; ``plot()`` draws the errors.
    """

    def __init__(self, results, notes=()):
        self.results, self.notes = dict(results), list(notes)

    @property
    def passed(self):
        return bool(self.results) and all(r.passed for r in self.results.values())

    @property
    def failed(self):
        return [n for n, r in self.results.items() if not r.passed]

    @property
    def warned(self):
        """Outputs that pass but carry a warning."""
        return [n for n, r in self.results.items() if r.passed and r.warnings]

    @property
    def warnings(self):
        return [w for r in self.results.values() for w in r.warnings]

    def __bool__(self):
        return self.passed

    def __getitem__(self, name):
        return self.results[name]

    def __repr__(self):
        return (f"<Report {'PASS' if self.passed else 'FAIL'}: {len(self.results)} outputs, "
                f"failed={self.failed}, warned={self.warned}>")

    def _summary(self):
        if not self.results:
            return "nothing compared, which is a failure"
        fails, warned = self.failed, self.warned
        return (f"{len(self.results) - len(fails)}/{len(self.results)} outputs passed"
                + (f"; failed: {', '.join(fails)}" if fails else "")
                + (f"; warnings: {', '.join(warned)}" if warned else ""))

    def __str__(self):
        head = ("output", "result", "bad/allowed", "max abs err", "at", "comparator")
        rows = [(n, r.verdict, f"{r.bad}/{r.allowed}", _g(r.max_abs_err),
                 "" if r.max_abs_err_index is None else r.where(r.max_abs_err_index), r.comparator)
                for n, r in self.results.items()]
        lines = []
        if rows:
            widths = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]
            lines = ["  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip() for x in [head] + rows]
        lines += [self._summary(), *self.notes]
        shown = [n for n, r in self.results.items() if not r.passed or r.warnings]
        return "\n".join(lines + ["", *(self.results[n].message for n in shown)]).rstrip()

    def _repr_html_(self):
        return _report_html(self)

    def raise_if_failed(self):
        if not self.passed:
            raise AssertionError(str(self))

    def plot(self, name=None):
        """A matplotlib Figure with, per output, the error heatmap over its two most telling
        axes (CompareResult.plot_axes; the other axes reduced by max |actual - expected|) and
        the histogram of error_distribution's buckets.

        `name` (one output or a list) defaults to the failing outputs, else the warned ones.
        Needs matplotlib (pip install 'dsv4[plot]').
        """
        names = [name] if isinstance(name, str) else list(name or [])
        if not names:
            names = self.failed or self.warned
        if not names:
            raise ValueError(f"every output passed without a warning; name one to plot: "
                             f"report.plot({next(iter(self.results), 'name')!r})")
        unknown = [n for n in names if n not in self.results]
        if unknown:
            raise ValueError(f"no output {', '.join(map(repr, unknown))} in this report; "
                             f"it has {', '.join(self.results) or 'none'}")
        fig = _figure(len(names))
        for row, n in zip(fig.subplots(len(names), 2, squeeze=False), names):
            _draw(self.results[n], fig, row[0], row[1])
        return fig


def compare_outputs(actual, expected, comparators=None, *, inputs=None, atol=1e-5, rtol=1e-5,
                    axes=None):
    """Compare every output of ``expected`` (in order): NaN/Inf parity, then its comparator.

    Outputs without an entry in ``comparators`` use allclose(atol, rtol). A comparator may
    also be a plain pypto-style callable returning (ok, detail).  ``axes`` maps an output
    name to its axis names ("T,H,HD" or a sequence).  Comparing nothing is a failure.
    """
    comparators, axes = comparators or {}, axes or {}
    default = allclose(atol, rtol)
    results = {}
    for name, exp in expected.items():
        cmp = comparators.get(name) or default
        label = getattr(cmp, "__name__", repr(cmp))
        e = np.asarray(exp)
        ctx = {"name": name, "comparator": label, "shape": e.shape, "dtype": str(e.dtype),
               "total": int(e.size), "axes": axes.get(name)}
        if name not in actual:
            results[name] = _make(ctx, False, [f"missing from actual outputs (have {list(actual)})"],
                                  counts=False)
            continue
        a = np.asarray(actual[name])
        ctx.update(shape=a.shape, dtype=str(a.dtype))
        token = _AXES.set(axes.get(name))
        try:
            parity = _nan_inf_parity(a, e, ctx) if a.shape == e.shape else None
            if parity is not None:
                parity.actual, parity.expected = a, e
                results[name] = parity
                continue
            kw = {"name": name} if isinstance(cmp, Comparator) else {}  # plain callables lack name=
            res = cmp(a, e, actual_outputs=actual, expected_outputs=expected, inputs=inputs or {},
                      atol=atol, rtol=rtol, **kw)
        finally:
            _AXES.reset(token)
        if isinstance(res, tuple):  # (ok, detail) from a plain callable
            ok, detail = res
            res = CompareResult(name, label, ok, total=a.size,
                                message=f"'{name}' {'PASS' if ok else 'FAIL'}  {label}\n{detail}".rstrip(),
                                axes=axis_names(axes.get(name), a.ndim), actual=a, expected=e)
        results[name] = res
    notes = [] if expected else ["no expected outputs given"]
    return Report(results, notes)


# ------------------------------------------------------------------ HTML

_COLOR = {"PASS": "#1a7f37", "WARN": "#9a6700", "FAIL": "#cf222e"}


def _esc(x):
    return html.escape(str(x))


def _verdict_html(v):
    return f'<b style="color:{_COLOR[v]}">{v}</b>'


def _table(cls, head, rows):
    th = "".join(f"<th>{_esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _result_html(r):
    at = "" if r.max_abs_err_index is None else f" at {_esc(r.where(r.max_abs_err_index))}"
    parts = [f"<p><b>{_esc(r.name or 'output')}</b> {_verdict_html(r.verdict)} &mdash; "
             f"{_esc(r.comparator)}: bad {r.bad} of {r.total}, allowed {r.allowed}, "
             f"max abs err {_g(r.max_abs_err)}{at}</p>"]
    if r.warnings:
        parts.append('<ul class="dsv4-warnings">' + "".join(
            f'<li style="color:{_COLOR["WARN"]}">WARNING: {_esc(w)}</li>' for w in r.warnings) + "</ul>")
    if r.worst:
        keys = [k for k in r.worst[0] if k != "index"]
        idx_names = r.axes if len(r.axes) == len(r.worst[0]["index"]) else axis_names(
            None, len(r.worst[0]["index"]))
        rows = [[str(i) for i in w["index"]] + [_esc(w[k] if isinstance(w[k], str) else _g(w[k]))
                                               for k in keys] for w in r.worst]
        parts.append(f"<p>worst {len(r.worst)} of {r.bad} bad elements</p>"
                     + _table("dsv4-worst", [*idx_names, *keys], rows))
    if r.bad and r.axis_counts:
        rows = [[_esc(n), str(c.size), str(int(np.count_nonzero(c))), _esc(_busiest(c, n))]
                for n, c in r.axis_counts.items()]
        parts.append(_table("dsv4-axes", ["axis", "length", "slices with bad", "busiest slices (bad)"],
                            rows))
    parts.append(f"<details><summary>details</summary><pre>{_esc(r.message)}</pre></details>")
    return '<div class="dsv4-result">' + "".join(parts) + "</div>"


def _report_html(rep):
    verdict = "PASS" if rep.passed else "FAIL"
    rows = [[_esc(n), _verdict_html(r.verdict), f"{r.bad} / {r.allowed}", str(r.total),
             _g(r.max_abs_err), "" if r.max_abs_err_index is None else _esc(r.where(r.max_abs_err_index)),
             _esc(r.comparator)] for n, r in rep.results.items()]
    parts = [f"<p>{_verdict_html(verdict)} {_esc(rep._summary())}</p>"]
    parts += [f"<p>{_esc(n)}</p>" for n in rep.notes]
    if rows:
        parts.append(_table("dsv4-summary", ["output", "result", "bad / allowed", "elements",
                                             "max abs err", "at", "comparator"], rows))
    parts += [_result_html(r) for r in rep.results.values() if not r.passed or r.warnings]
    return '<div class="dsv4-report">' + "".join(parts) + "</div>"


# ------------------------------------------------------------------ plots

def _figure(rows):
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plot() needs matplotlib: pip install 'dsv4[plot]'") from exc
    # a bare Figure, not pyplot: no global figure list, shown once in Jupyter; savefig works
    return Figure(figsize=(12, 3.8 * rows), layout="constrained")


def _draw(r, fig, ax_map, ax_hist):
    label = r.name or "output"
    d = r.error()
    if d is None:
        for ax in (ax_map, ax_hist):
            ax.text(0.5, 0.5, f"{label}: nothing to plot (no arrays kept)\n{r.verdict}",
                    ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
        return
    missing = np.isnan(d)
    if missing.any():   # NaN/Inf against a number: drawn at the largest error
        finite_max = float(np.nanmax(d)) if not missing.all() else 1.0
        d = np.where(missing, _F(finite_max), d)
    names = r.axes if len(r.axes) == d.ndim else axis_names(None, d.ndim)
    note = " (NaN/Inf drawn at the max)" if missing.any() else ""
    if d.ndim >= 2:
        pick = r.plot_axes()
        others = tuple(k for k in range(d.ndim) if k not in pick)
        m = np.fmax.reduce(d, axis=others) if others else d
        im = ax_map.imshow(m, aspect="auto", interpolation="nearest", cmap="viridis")
        fig.colorbar(im, ax=ax_map, label="max |actual - expected|")
        over = f" over {', '.join(names[k] for k in others)}" if others else ""
        ax_map.set_title(f"{label} {r.verdict}: max |actual - expected|{over}{note}")
        ax_map.set_ylabel(f"{names[pick[0]]} ({d.shape[pick[0]]})")
        ax_map.set_xlabel(f"{names[pick[1]]} ({d.shape[pick[1]]})")
    elif d.ndim == 1:
        ax_map.plot(d, lw=0.8)
        if r.mask is not None and r.mask.shape == d.shape and r.mask.any():
            i = np.flatnonzero(r.mask)
            ax_map.plot(i, d[i], "r.", ms=4, label="bad")
            ax_map.legend()
        ax_map.set_title(f"{label} {r.verdict}: |actual - expected|{note}")
        ax_map.set_xlabel(f"{names[0]} ({d.shape[0]})")
        ax_map.set_ylabel("|actual - expected|")
    else:
        ax_map.text(0.5, 0.5, f"{label}: scalar, |actual - expected| = {float(d):.6g}",
                    ha="center", va="center", transform=ax_map.transAxes)
        ax_map.set_axis_off()
    labels, counts = r.error_histogram()
    bars = ax_hist.bar(range(len(counts)), counts, log=True, color="#4c72b0")
    ax_hist.bar_label(bars, labels=[str(c) if c else "" for c in counts], fontsize=8)
    ax_hist.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax_hist.margins(y=0.12)
    ax_hist.set_title(f"{label}: floored rel-diff, error_distribution buckets")
    ax_hist.set_xlabel("rel-diff bucket")
    ax_hist.set_ylabel("elements")
