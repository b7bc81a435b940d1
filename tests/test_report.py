"""Reports as people read them: named axes, per-axis counts, hotspot warnings, HTML, plots."""
import importlib.util
import io
import os
import runpy
import sys
from html.parser import HTMLParser

import numpy as np
import pytest

from dsv4.compare import (axis_names, compare_outputs, error_distribution, ratio_allclose,
                          ratio_reldiff, topk_pair_compare)

f32 = np.float32
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
needs_mpl = pytest.mark.skipif(not HAVE_MPL, reason="matplotlib not installed (pip install 'dsv4[plot]')")
AXES = {"y": "T,H,D"}


def tensor(shape=(8, 16, 32), seed=0):
    return np.random.default_rng(seed).uniform(0.5, 1.5, shape).astype(f32)


def one_head(e, t=3, h=5, delta=0.5):
    """`e` with head h of token t off by `delta`: 32 bad of 4096, within a 1 % budget."""
    a = e.copy()
    a[t, h] += delta
    return a


CMP = ratio_allclose(atol=1e-4, rtol=1 / 128, max_error_ratio=0.01)


def report_for(a, e, cmp=CMP, axes=AXES):
    return compare_outputs({"y": a}, {"y": e}, {"y": cmp}, axes=axes)


# ------------------------------------------------------------- axis names

def test_axis_names_from_dims_and_fallback():
    assert axis_names("T,H,HD", 3) == ("T", "H", "HD")
    assert axis_names(("T", "H"), 2) == ("T", "H")
    assert axis_names("NC,CBLK,1,HD", 4) == ("NC", "CBLK", "axis2", "HD")
    assert axis_names("T,_", 2) == ("T", "axis1")
    assert axis_names("IHD,IHD", 2) == ("IHD", "IHD_1")
    assert axis_names("T,H", 3) == ("axis0", "axis1", "axis2")   # rank differs: not these axes
    assert axis_names(None, 2) == ("axis0", "axis1")


def test_coordinates_are_named_by_the_axes():
    e = tensor()
    r = report_for(one_head(e, delta=0.5), e)["y"]
    assert r.axes == ("T", "H", "D")
    assert all(w["index"][:2] == (3, 5) for w in r.worst)
    assert r.where((3, 5, 17)) == "(T=3, H=5, D=17)"
    assert "shape=(8, 16, 32) [T, H, D]" in r.message
    assert f"max abs err 0.5 at {r.where(r.max_abs_err_index)}" in r.message
    assert r.max_abs_err_index[:2] == (3, 5)
    unnamed = report_for(one_head(e), e, axes=None)["y"]
    assert unnamed.axes == ("axis0", "axis1", "axis2")
    assert str(unnamed.worst[0]["index"]) in unnamed.message and "T=" not in unnamed.message


def test_wrapped_comparators_get_the_axes():
    from dsv4.compare import Comparator
    from dsv4.specs.blocks import valid_rows        # overrides __call__, passes no axes on
    e = tensor()
    first = Comparator("first_rows", lambda a, e, ctx, outs, at, rt: CMP(a[:4], e[:4], name=ctx["name"]))
    for cmp, inputs in ((first, None), (valid_rows(CMP), {"num_tokens": 4})):
        r = compare_outputs({"y": one_head(e)}, {"y": e}, {"y": cmp}, inputs=inputs, axes=AXES)["y"]
        assert r.total == 4 * 16 * 32 and r.axes == ("T", "H", "D")
        assert "(T=3, H=5, D=" in r.message and r.axis_counts["H"][5] == 32


def test_per_axis_counts():
    e = tensor()
    a = one_head(e)
    a[6, 1, 7] += 1.0
    r = report_for(a, e)["y"]
    assert r.bad == 33
    assert r.axis_counts["T"].tolist() == [0, 0, 0, 32, 0, 0, 1, 0]
    assert r.axis_counts["H"][5] == 32 and r.axis_counts["H"][1] == 1 and r.axis_counts["H"].sum() == 33
    assert r.axis_counts["D"].sum() == 33 and r.axis_counts["D"][7] == 2
    lines = r.message.splitlines()
    i = lines.index("  bad per axis (slices holding bad elements / length, busiest first):")
    assert lines[i + 1].split()[:4] == ["T", "2/8", "T=3:", "32,"]
    assert lines[i + 2].split()[:2] == ["H", "2/16"]


# ------------------------------------------------------------------ hotspots

def test_single_head_within_the_budget_warns():
    e = tensor()
    rep = report_for(one_head(e), e)
    r = rep["y"]
    assert rep and r.passed and r.bad == 32 and r.allowed == 41      # the budget absorbs it
    assert [(h["axis"], h["index"], h["set"]) for h in r.hotspots] == [("H", 5, "bad")]
    assert r.verdict == "WARN" and rep.warned == ["y"]
    assert len(rep.warnings) == 1 and "in H=5 (32 of 32)" in rep.warnings[0]
    text = str(rep)
    assert "WARNING: 'y' passes" in text
    assert [line.split()[:2] for line in text.splitlines()[1:2]] == [["y", "WARN"]]


def test_spread_errors_do_not_warn():
    e = tensor()
    a = e.copy()
    flat = np.random.default_rng(1).choice(e.size, 32, replace=False)
    a.reshape(-1)[flat] += 0.5                      # as many bad elements, scattered
    r = report_for(a, e)["y"]
    assert r and r.bad == 32 and r.hotspots == [] and r.warnings == []
    assert r.verdict == "PASS"


def test_few_errors_do_not_warn():
    e = tensor()
    a = e.copy()
    a[3, 5, :7] += 0.5                              # 7 < 8 elements, all in one head
    r = report_for(a, e)["y"]
    assert r and r.bad == 7 and r.warnings == []


def test_an_even_split_over_a_short_axis_is_not_a_hotspot():
    e = tensor((2, 64))
    a = e.copy()
    a[:, 10:18] += 0.5                              # both groups alike: 8 bad in each
    r = report_for(a, e, ratio_allclose(atol=1e-4, rtol=1 / 128, max_error_ratio=0.2),
                   {"y": "G,D"})["y"]
    assert r and r.bad == 16 and r.axis_counts["G"].tolist() == [8, 8]
    assert r.hotspots == []                         # columns 10..17 hold 2 each: under 8


def test_row_axes_are_not_searched():
    e = tensor()
    a = e.copy()
    flat = np.random.default_rng(2).choice(16 * 32, 32, replace=False)
    a[3].reshape(-1)[flat] += 0.5                   # 32 bad, all in token 3, spread over H and D
    assert report_for(a, e)["y"].warnings == []    # T is a row axis
    assert report_for(a, e, axes=None)["y"].warnings == []     # so is an unnamed leading axis
    r = report_for(a, e, axes={"y": "G,H,D"})["y"]
    assert [(h["axis"], h["index"]) for h in r.hotspots] == [("G", 3)]
    r = report_for(one_head(e), e, axes=None)["y"]
    assert [(h["axis"], h["index"]) for h in r.hotspots] == [("axis1", 5)]


def test_near_misses_in_one_head_warn():
    e = tensor()
    a = e.copy()
    a[3, 5] *= f32(1.004)       # error 0.004|e|: under the tolerance 1e-4 + |e|/128, over a quarter of it
    r = report_for(a, e)["y"]
    assert r and r.bad == 0
    assert [(h["axis"], h["index"], h["set"]) for h in r.hotspots] == [("H", 5, "near miss")]
    assert "near misses" in r.warnings[0]


def test_reldiff_near_misses_warn():
    e = tensor()
    a = e.copy()
    a[:, 9] *= f32(1.005)       # every token, head 9: rdiff 0.005 against diff_thd 0.01
    r = report_for(a, e, ratio_reldiff(diff_thd=0.01, pct_thd=0.05))["y"]
    assert r and r.bad == 0 and [h["axis"] for h in r.hotspots] == ["H"]
    assert r.hotspots[0]["index"] == 9 and r.hotspots[0]["count"] == 8 * 32


def test_a_failing_result_carries_counts_but_no_warning():
    e = tensor()
    a = e.copy()
    a[3] += 0.5                                      # a whole token: over the budget
    r = report_for(a, e)["y"]
    assert not r and r.warnings == [] and r.verdict == "FAIL"
    assert r.axis_counts["T"].tolist() == [0, 0, 0, 512, 0, 0, 0, 0]


def test_comparators_without_a_mask_have_no_counts():
    e = tensor((4, 4))
    r = compare_outputs({"y": e + 1}, {"y": e}, {"y": error_distribution()}, axes={"y": "T,D"})["y"]
    assert r and r.axis_counts == {} and r.warnings == []
    idx = np.tile(np.arange(12), (10, 1))
    bad = idx.copy()
    bad[4, 2], bad[4, 3] = bad[4, 3], bad[4, 2]
    vals = np.tile(np.linspace(1, 0, 12, dtype=f32), (10, 1))
    out = vals.copy()
    out[4, 2], out[4, 3] = vals[4, 3], vals[4, 2]   # the swap breaks the order of the values
    r = compare_outputs({"i": bad, "v": out}, {"i": idx, "v": vals},
                        {"i": topk_pair_compare("v")}, axes={"i": "T,K"})["i"]
    assert not r and r.axis_counts["T"].tolist() == [0, 0, 0, 0, 2, 0, 0, 0, 0, 0]


# ----------------------------------------------------------------------- HTML

class Tables(HTMLParser):
    """Every <table> as {class: [table, ...]}, a table as [[cell text, ...], ...] (header first)."""

    def __init__(self, text):
        super().__init__()
        self.tables, self.cls, self.row, self.cell = {}, None, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.cls = dict(attrs).get("class")
            self.tables.setdefault(self.cls, []).append([])
        elif tag == "tr":
            self.row = []
        elif tag in ("td", "th"):
            self.cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.row.append(self.cell.strip())
            self.cell = None
        elif tag == "tr":
            self.tables[self.cls][-1].append(self.row)

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def test_report_html():
    e = tensor()
    a = one_head(e)
    a[7, 2, 30] += 1.0
    fail = e.copy()
    fail[0, 0, 0] = np.nan
    rep = compare_outputs({"y": a, "z": fail, "w": e}, {"y": e, "z": e, "w": e},
                          {"y": CMP, "z": CMP, "w": CMP}, axes={"y": "T,H,D", "z": "T,H,D"})
    page = rep._repr_html_()
    t = Tables(page).tables
    summary = t["dsv4-summary"][0]
    assert summary[0] == ["output", "result", "bad / allowed", "elements", "max abs err", "at", "comparator"]
    rows = {r[0]: r for r in summary[1:]}
    assert rows["y"][1:5] == ["WARN", "33 / 41", "4096", "1"] and rows["y"][5] == "(T=7, H=2, D=30)"
    assert rows["z"][1] == "FAIL" and rows["w"][1] == "PASS" and rows["w"][5] == ""
    assert len(t["dsv4-worst"]) == 2                    # the warned and the failed output
    worst = t["dsv4-worst"][0]
    assert worst[0][:3] == ["T", "H", "D"] and worst[0][3:6] == ["actual", "expected", "abs_err"]
    assert worst[1][:3] == ["7", "2", "30"]
    assert all(r[:2] == ["3", "5"] for r in worst[2:])
    axes = t["dsv4-axes"][0]
    assert axes[0] == ["axis", "length", "slices with bad", "busiest slices (bad)"]
    assert axes[1][:3] == ["T", "8", "2"] and axes[1][3].startswith("T=3: 32, T=7: 1")
    assert axes[2][:3] == ["H", "16", "2"] and axes[2][3].startswith("H=5: 32")
    assert "WARNING: &#x27;y&#x27; passes" in page and "H=5 (32 of 33)" in page
    assert page.count('class="dsv4-result"') == 2          # the warned and the failed output
    single = Tables(rep["y"]._repr_html_()).tables
    assert single["dsv4-worst"] == [worst]


def test_report_text_is_aligned():
    e = tensor()
    rep = compare_outputs({"y": one_head(e), "longer_name": e}, {"y": e, "longer_name": e},
                          {"y": CMP}, axes=AXES)
    lines = str(rep).splitlines()
    col = lines[0].index("result")
    assert [line[col:col + 4] for line in lines[1:3]] == ["WARN", "PASS"]
    assert lines[3] == "2/2 outputs passed; warnings: y"


def test_empty_report_fails():
    rep = compare_outputs({}, {})
    assert not rep and "nothing compared" in str(rep) and "nothing compared" in rep._repr_html_()


# ---------------------------------------------------------------------- plots

def test_error_histogram_uses_the_error_distribution_buckets():
    e = np.ones(10, f32)
    a = e.copy()
    a[1] = 1.002      # rdiff 0.002: bucket 1e-3..3e-3
    a[2] = 1.2        # 0.167: > 0.05
    a[3] = np.inf
    r = compare_outputs({"y": a}, {"y": e}, {"y": error_distribution()})["y"]
    labels, counts = r.error_histogram()
    assert labels == ["<=0.001", "0.001-0.003", "0.003-0.005", "0.005-0.01", "0.01-0.03",
                      "0.03-0.05", ">0.05", "NaN/Inf"]
    assert counts == [7, 1, 0, 0, 0, 0, 1, 1]


def test_plot_axes_rule():
    e = tensor()
    r = report_for(one_head(e), e)["y"]
    assert r.plot_axes() == [0, 1]                  # T and H vary, D does not
    a = e.copy()
    a[:, :, 4] += 0.5                               # column D=4 of every token and head
    r = report_for(a, e, ratio_allclose(atol=1e-4, rtol=1 / 128, max_error_ratio=0.05))["y"]
    assert r.plot_axes() == [0, 2]                  # D; then T and H tie, the earlier wins
    a = e.copy()
    a[2, :, 9] *= f32(1.001)                        # no bad element: the error decides
    r = report_for(a, e)["y"]
    assert r.bad == 0 and r.plot_axes() == [0, 2]


@needs_mpl
def test_plot_draws_heatmap_and_histogram():
    import matplotlib
    matplotlib.use("Agg")
    e = tensor()
    fail = e.copy()
    fail[:, 3] += 1.0                               # head 3 of every token: fails
    rep = compare_outputs({"y": one_head(e), "q": fail}, {"y": e, "q": e}, {"y": CMP, "q": CMP},
                          axes={"y": "T,H,D", "q": "T,H,D"})
    fig = rep.plot()                                # the failing output only
    heat, hist, cbar = fig.axes
    assert heat.get_title() == "q FAIL: max |actual - expected| over D"
    assert (heat.get_ylabel(), heat.get_xlabel()) == ("T (8)", "H (16)")
    img = heat.get_images()[0].get_array()
    assert img.shape == (8, 16) and np.allclose(img[:, 3], 1.0) and img[:, 4].max() == 0
    assert hist.get_title() == "q: floored rel-diff, error_distribution buckets"
    labels, counts = rep["q"].error_histogram()
    assert [t.get_text() for t in hist.get_xticklabels()] == labels
    assert [b.get_height() for b in hist.patches] == counts and sum(counts) == e.size
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=50)
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
    both = rep.plot(["q", "y"])
    titles = [ax.get_title() for ax in both.axes]
    assert "y WARN: max |actual - expected| over D" in titles and len(both.axes) == 6
    one = rep["y"].plot()
    assert one.axes[0].get_title().startswith("y WARN")


@needs_mpl
def test_plot_low_ranks():
    r1 = compare_outputs({"v": np.array([1, 2, 9], f32)}, {"v": np.array([1, 2, 3], f32)},
                         axes={"v": "K"})
    ax = r1.plot().axes[0]
    assert ax.get_xlabel() == "K (3)" and ax.get_title().startswith("v FAIL")
    r0 = compare_outputs({"s": np.float32(2)}, {"s": np.float32(1)})
    assert "scalar" in r0.plot().axes[0].texts[0].get_text()


def test_plot_needs_a_name_when_nothing_failed():
    e = tensor((2, 2))
    rep = compare_outputs({"y": e}, {"y": e})
    with pytest.raises(ValueError, match="report.plot\\('y'\\)"):
        rep.plot()
    with pytest.raises(ValueError, match="no output 'nope'.*it has y"):
        rep.plot("nope")


def test_plot_without_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    e = tensor((2, 2))
    rep = compare_outputs({"y": e + 1}, {"y": e})
    with pytest.raises(ImportError, match=r"dsv4\[plot\]"):
        rep.plot()


# ------------------------------------------------------------------- example

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "find_mismatch.py")


def test_worked_example(capsys):
    if HAVE_MPL:
        import matplotlib
        matplotlib.use("Agg")
    g = runpy.run_path(EXAMPLE, run_name="__main__")
    report = g["report"]
    assert report and report.warned == ["Ob"]
    assert np.flatnonzero(report["Ob"].axis_counts["H"]).tolist() == [g["HEAD"]]
    assert np.flatnonzero(report["Ob"].axis_counts["T"]).tolist() == list(g["TOKENS"])
    out = capsys.readouterr().out
    assert "heads with bad elements: [5]" in out and "H=5" in out
    if HAVE_MPL:
        with open(g["png"], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    else:
        assert g["png"] is None and "dsv4[plot]" in out
