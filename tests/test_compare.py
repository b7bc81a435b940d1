"""Hand-worked checks of the comparator rules (spec chapter 1, §2.4)."""
import os
import sys

import ml_dtypes
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dsv4.compare import (CompareResult, Report, allclose, compare_outputs, error_distribution,  # noqa: E402
                          ratio_allclose, ratio_reldiff, topk_pair_compare)

f32 = np.float32
BF16 = ml_dtypes.bfloat16


def arr(*v, dtype=np.float32):
    return np.array(v, dtype=dtype)


# ---------------------------------------------------------------- allclose

def test_allclose_boundary_is_inclusive():
    # tol = 0.25 + 0.5*1 = 0.75, all exact in fp32
    cmp = allclose(atol=0.25, rtol=0.5)
    assert cmp(arr(1.75), arr(1.0))
    r = cmp(arr(1.875), arr(1.0))
    assert not r and r.bad == 1 and r.allowed == 0


def test_allclose_uses_fp32_constants():
    # |f32(0.1) - 0| equals f32(0.1) = tol; in double it would exceed 0.1
    assert allclose(atol=0.1, rtol=0.0)(arr(0.1), arr(0.0))


def test_allclose_equal_values_and_nan():
    cmp = allclose()
    assert cmp(arr(np.inf, -np.inf, 2.0), arr(np.inf, -np.inf, 2.0))
    r = cmp(arr(np.nan, 1.0), arr(np.nan, 1.0))
    assert not r and r.bad == 1 and r.mask.tolist() == [True, False]
    assert not cmp(arr(np.inf), arr(1e30))


def test_allclose_ignores_harness_tolerances():
    assert not allclose(atol=0.0, rtol=0.0)(arr(1.5), arr(1.0), atol=1.0, rtol=1.0)


# ---------------------------------------------------------- ratio_allclose

def test_ratio_allclose_strict_greater_at_boundary():
    cmp = ratio_allclose(atol=0.25, rtol=0.5, max_error_ratio=0.0)
    r = cmp(arr(1.75, -0.75), arr(1.0, -1.5))  # d = 0.75 = tol both times
    assert r and r.bad == 0
    r = cmp(arr(1.7500001), arr(1.0))  # one fp32 ulp beyond
    assert not r and r.bad == 1


def test_ratio_allclose_fp32_tolerance():
    cmp = ratio_allclose(atol=0.1, rtol=0.0, max_error_ratio=0.0)
    assert cmp(arr(0.1), arr(0.0))  # d == f32(0.1) == tol, not >


def test_ratio_allclose_threshold_banker_rounding():
    cmp = ratio_allclose(atol=0.0, rtol=0.0)  # default max_error_ratio 0.005
    e100 = np.zeros(100, f32)
    a = e100.copy(); a[7] = 1
    r = cmp(a, e100)
    assert not r and r.allowed == 0 and r.bad == 1  # round(0.5) == 0
    e300 = np.zeros(300, f32)
    a = e300.copy(); a[[3, 9]] = 1
    r = cmp(a, e300)
    assert r and r.allowed == 2 and r.bad == 2  # round(1.5) == 2
    a[11] = 1
    assert not cmp(a, e300)
    e500 = np.zeros(500, f32)
    a = e500.copy(); a[:3] = 1
    r = cmp(a, e500)
    assert not r and r.allowed == 2  # round(2.5) == 2


def test_ratio_allclose_nan_inf_in_actual_fail():
    cmp = ratio_allclose(atol=1.0, rtol=1.0, max_error_ratio=1.0)
    for bad in (np.nan, np.inf, -np.inf):
        r = cmp(arr(1.0, bad), arr(1.0, 1.0))
        assert not r and r.mask.tolist() == [False, True]
        assert "NaN" in r.message and r.worst[0]["index"] == (1,)


def test_ratio_allclose_nan_in_expected_not_counted():
    r = ratio_allclose(atol=0.0, rtol=0.0, max_error_ratio=0.0)(arr(5.0, 1.0), arr(np.nan, 1.0))
    assert r and r.bad == 0


def test_ratio_allclose_harness_defaults():
    cmp = ratio_allclose(max_error_ratio=0.0)
    a, e = arr(1.5), arr(1.0)
    assert not cmp(a, e)  # falls back to 1e-5
    assert cmp(a, e, atol=0.5, rtol=0.0)
    assert cmp(a, e, atol=0.0, rtol=0.5)
    assert not ratio_allclose(atol=0.25, max_error_ratio=0.0)(a, e, atol=0.5, rtol=0.0)


def test_ratio_allclose_repr_and_result_protocol():
    cmp = ratio_allclose(atol=1e-4, rtol=1 / 128)
    assert repr(cmp) == "ratio_allclose(atol=0.0001, rtol=0.0078125, max_error_ratio=0.005)"
    r = cmp(arr(1.0), arr(3.0), name="q")
    assert isinstance(r, CompareResult) and r.comparator == repr(cmp) and r.name == "q"
    assert str(r) == r.message and "FAIL" in r.message and "'q'" in r.message
    assert "q" in repr(r) and "\n" not in repr(r)
    assert "<table class=\"dsv4-worst\">" in r._repr_html_()


def test_bf16_inputs():
    cmp = ratio_allclose(atol=1e-4, rtol=1 / 128, max_error_ratio=0.0)
    e = np.array([1.0, 1.0], dtype=BF16)
    assert cmp(np.array([1.0078125, 1.0], dtype=BF16), e)  # d = 2^-7 < tol = 1e-4 + 2^-7
    r = cmp(np.array([1.015625, 1.0], dtype=BF16), e)
    assert not r and r.worst[0]["actual"] == 1.015625 and r.worst[0]["abs_err"] == 0.015625
    assert "bfloat16" in r.message


def test_fp8_inputs_widen_exactly():
    a = np.array([0.4375], dtype=ml_dtypes.float8_e4m3fn)
    r = ratio_allclose(atol=0.0, rtol=0.0, max_error_ratio=0.0)(a, np.array([0.5], f32))
    assert not r and r.worst[0]["abs_err"] == 0.0625


def test_int8_inputs():
    cmp = ratio_allclose(atol=1.0, rtol=0.0, max_error_ratio=0.0)
    e = np.array([126, -128, 0], np.int8)
    assert cmp(np.array([127, -127, 1], np.int8), e)  # every d == 1, not > 1
    r = cmp(np.array([127, -128, 2], np.int8), e)
    assert not r and r.worst[0]["index"] == (2,) and r.worst[0]["abs_err"] == 2.0
    assert allclose(atol=1.0, rtol=0.0)(np.array([127], np.int8), np.array([126], np.int8))


def test_worst_points_3d_coordinates_and_mask():
    e = np.zeros((2, 3, 4), f32)
    a = e.copy()
    a[1, 2, 3] = 3.0
    a[0, 1, 2] = -1.0
    a[1, 0, 0] = 2.0
    r = ratio_allclose(atol=0.5, rtol=0.0, max_error_ratio=0.0, max_show=2)(a, e)
    assert not r and r.bad == 3 and r.total == 24
    assert [w["index"] for w in r.worst] == [(1, 2, 3), (1, 0, 0)]
    w = r.worst[0]
    assert (w["actual"], w["expected"], w["abs_err"], w["tol"]) == (3.0, 0.0, 3.0, 0.5)
    assert r.mask.shape == a.shape and r.mask.sum() == 3 and r.mask[0, 1, 2]
    assert r.max_abs_err == 3.0 and r.max_abs_err_index == (1, 2, 3)
    assert "(1, 2, 3)" in r.message


def test_bad_rows_counting():
    e = np.zeros((5, 4), f32)
    a = e.copy()
    a[3, :3] = 1
    a[1, 0] = 1
    a[4, 1:3] = 1
    r = allclose()(a, e)
    assert r.bad_rows == [(3, 3), (4, 2), (1, 1)]
    e = np.zeros((12, 2), f32)
    a = e.copy(); a[:, 0] = 1
    r = allclose()(a, e)
    assert r.bad_rows == [(i, 1) for i in range(10)]
    assert allclose()(arr(2.0).reshape(()), arr(1.0).reshape(())).bad_rows == []
    assert allclose()(e, e).bad_rows == []


def test_shape_mismatch_is_a_failed_result():
    for cmp in (allclose(), ratio_allclose(), ratio_reldiff(), error_distribution()):
        r = cmp(np.zeros((2, 3)), np.zeros((3, 2)))
        assert not r and "shape mismatch" in r.message and "(2, 3)" in r.message


# ----------------------------------------------------------- ratio_reldiff

def test_reldiff_absolute_and_relative_both_needed():
    cmp = ratio_reldiff(diff_thd=0.01, pct_thd=0.0)
    assert cmp(arr(0.005), arr(0.0))        # d < diff_thd: rdiff = d
    assert cmp(arr(100.5), arr(100.0))      # d = 0.5 but relative 0.005
    r = cmp(arr(0.02), arr(0.0))            # both large
    assert not r and r.bad == 1


def test_reldiff_threshold_rounded_to_fp32():
    # f32(0.25 - 1e-12) == 0.25; a=4, e=3 gives rdiff = 1/4 = 0.25 exactly, which is not > 0.25
    r = ratio_reldiff(diff_thd=0.25 - 1e-12, pct_thd=0.0)(arr(4.0), arr(3.0))
    assert r and r.bad == 0


def test_reldiff_floor_rule():
    # |a|,|e| = 0.005 lie below the floor 2^-14/0.01 = 0.006103515625, so den uses the floor:
    # rdiff = 0.01 / (0.006103515625 + 1e-9) = 1.6384 (2.0 without the floor)
    a, e = arr(0.005), arr(-0.005)
    r = ratio_reldiff(diff_thd=0.01, pct_thd=1.0, max_diff_hd=1.7)(a, e)
    assert r and r.bad == 1
    assert r.worst[0]["rdiff"] == pytest.approx(1.6384, rel=1e-5)
    assert not ratio_reldiff(diff_thd=0.01, pct_thd=1.0, max_diff_hd=1.6)(a, e)


def test_reldiff_count_condition():
    e = np.full(20, 2.0, f32)
    a = e.copy(); a[4] = 4.0
    cmp = ratio_reldiff(diff_thd=0.01, pct_thd=0.05)  # round(0.05*20) = 1 allowed
    r = cmp(a, e)
    assert r and r.bad == 1 and r.allowed == 1
    a[9] = 4.0
    r = cmp(a, e)
    assert not r and r.bad == 2 and r.bad_rows == [(4, 1), (9, 1)]


def test_reldiff_max_diff_hd_condition_is_strict():
    # a=4, e=2: d=2, den=4 (+1e-9 vanishes in fp32), rdiff = 0.5 exactly
    a, e = arr(4.0), arr(2.0)
    r = ratio_reldiff(diff_thd=0.01, pct_thd=1.0, max_diff_hd=0.5)(a, e)
    assert not r and "max_diff_hd" in r.message and r.worst[0]["rdiff"] == 0.5
    assert ratio_reldiff(diff_thd=0.01, pct_thd=1.0, max_diff_hd=0.5000001)(a, e)


def test_reldiff_nan_inf():
    cmp = ratio_reldiff(pct_thd=1.0)
    assert not cmp(arr(np.inf, 1.0), arr(1.0, 1.0))
    assert not cmp(arr(np.nan, 1.0), arr(1.0, 1.0))
    r = ratio_reldiff(pct_thd=0.0)(arr(3.0, 1.0), arr(np.nan, 1.0))
    assert r and r.bad == 0


# -------------------------------------------------------- topk_pair_compare

def _topk(cmp, a, e, v):
    return cmp(np.array(a), np.array(e), actual_outputs={"vals": np.array(v, f32)},
               expected_outputs={"vals": np.full(np.shape(v), np.nan, f32)})


def test_topk_equal_indices_pass_even_if_unsorted():
    assert _topk(topk_pair_compare("vals"), [[1, 2, 3]], [[1, 2, 3]], [[0, 5, 9]])


def test_topk_legal_tie_swap_passes():
    r = _topk(topk_pair_compare("vals"), [[7, 3, 5]], [[3, 7, 5]], [[2, 2, 1]])
    assert r and r.bad == 0 and "2 legal" in r.message


def test_topk_real_miss_fails():
    r = _topk(topk_pair_compare("vals"), [[9, 7, 4, 5]], [[9, 7, 3, 5]], [[4, 3, 1, 2]])
    assert not r and r.bad == 1 and r.worst[0]["index"] == (0, 2)
    assert r.worst[0]["actual"] == 4 and r.worst[0]["expected"] == 3
    assert r.mask.tolist() == [[False, False, True, False]]


def test_topk_left_neighbour_checked():
    # position 1 differs; 3 >= 2 holds on the right but 1 >= 3 fails on the left
    r = _topk(topk_pair_compare("vals"), [[4, 8, 6]], [[4, 9, 6]], [[1, 3, 2]])
    assert not r and [w["index"] for w in r.worst] == [(0, 1)]
    assert r.worst[0]["score"] == 3.0 and r.worst[0]["window"] == "[1, 3, 2]"


def test_topk_exact_comparison_no_tolerance():
    cmp = topk_pair_compare("vals")
    assert not _topk(cmp, [[7, 3]], [[3, 7]], [[1.0, 1.0000001]])


def test_topk_k_below_two_always_legal():
    assert _topk(topk_pair_compare("vals"), [[1], [5]], [[2], [6]], [[0.0], [1.0]])


def test_topk_ascending():
    a, e, v = [[7, 3, 5]], [[3, 7, 5]], [[1, 1, 2]]
    assert _topk(topk_pair_compare("vals", descending=False), a, e, v)
    r = _topk(topk_pair_compare("vals"), a, e, v)  # 1 >= 2 breaks descending at position 1
    assert not r and [w["index"] for w in r.worst] == [(0, 1)]


def test_topk_dim_zero():
    a, e, v = [[7], [3], [5]], [[3], [7], [5]], [[2], [2], [1]]
    assert _topk(topk_pair_compare("vals", dim=0), a, e, v)
    assert _topk(topk_pair_compare("vals", dim=1), a, e, v)  # k = 1 along dim 1
    r = _topk(topk_pair_compare("vals", dim=0), a, e, [[2], [1], [2]])
    assert not r and r.worst[0]["index"] == (1, 0)


def test_topk_misconfigurations_fail():
    cmp = topk_pair_compare("vals")
    r = cmp(np.array([1, 2]), np.array([2, 1]), actual_outputs={"other": np.zeros(2)})
    assert not r and "'vals'" in r.message and "not found" in r.message
    r = cmp(np.array([1, 2]), np.array([2, 1]), actual_outputs={"vals": np.zeros(3)})
    assert not r and "shape" in r.message
    r = topk_pair_compare("vals", dim=2)(np.array([1, 2]), np.array([1, 2]),
                                         actual_outputs={"vals": np.zeros(2)})
    assert not r and "dim=2" in r.message
    assert repr(cmp) == "topk_pair_compare(vals_name='vals', dim=-1, descending=True)"


# ------------------------------------------------------- error_distribution

def test_error_distribution_measures_and_passes():
    r = error_distribution()(arr(3.0, 4.5), arr(3.0, 4.0))
    assert r and r.bad == 0 and r.mask is None
    assert r.stats["rel_l2"] == pytest.approx(0.1)
    assert r.stats["frac_gt"][1e-2] == (0.5, pytest.approx(0.5 / 4.5, rel=1e-6))
    assert "rel-L2 = 10.0000%" in r.message
    assert error_distribution()(arr(1.0, 0.0), arr(0.0, 1.0)).stats["cosine"] == 0.0


def test_error_distribution_nan_handling():
    a, e = arr(np.nan, 1.0), arr(1.0, 1.0)
    r = error_distribution()(a, e)
    assert r and "NaN=1" in r.message
    r = error_distribution(always_pass=False)(a, e)
    assert not r and r.bad == 1
    assert error_distribution(always_pass=False)(e, e)


# ------------------------------------------------------ argument validation

@pytest.mark.parametrize("make, arg, value", [
    (lambda: ratio_allclose(max_error_ratio=1.5), "max_error_ratio", "1.5"),
    (lambda: ratio_allclose(max_error_ratio=-0.1), "max_error_ratio", "-0.1"),
    (lambda: ratio_reldiff(diff_thd=0.0), "diff_thd", "0.0"),
    (lambda: ratio_reldiff(pct_thd=2), "pct_thd", "2"),
    (lambda: ratio_reldiff(max_diff_hd=0), "max_diff_hd", "0"),
    (lambda: allclose(atol=-1e-3), "atol", "-0.001"),
    (lambda: error_distribution(quantiles=(0.5, 1.5)), "quantiles", "1.5"),
])
def test_invalid_arguments_raise(make, arg, value):
    with pytest.raises(ValueError) as exc:
        make()
    assert arg in str(exc.value) and value in str(exc.value)


def test_boundary_arguments_accepted():
    assert ratio_allclose(max_error_ratio=0.0) and ratio_allclose(max_error_ratio=1.0)
    assert ratio_reldiff(pct_thd=0.0) and ratio_reldiff(pct_thd=1.0)


# ---------------------------------------------------------- compare_outputs

def test_compare_outputs_reports_every_failure():
    e = {"x": np.zeros((2, 2), f32), "y": np.ones(4, f32), "z": np.arange(3, dtype=f32)}
    a = {"x": np.array([[0, 0], [0, 0.5]], f32), "y": np.ones(4, f32), "z": np.array([0, 1, 7], f32)}
    rep = compare_outputs(a, e, {"y": ratio_allclose(atol=1e-4, rtol=1 / 128)})
    assert isinstance(rep, Report) and not rep
    assert list(rep.results) == ["x", "y", "z"]
    assert rep["y"] and not rep["x"] and not rep["z"]
    assert rep["x"].worst[0]["index"] == (1, 1) and rep["z"].worst[0]["index"] == (2,)
    with pytest.raises(AssertionError) as exc:
        rep.raise_if_failed()
    text = str(exc.value)
    assert "'x' FAIL" in text and "'z' FAIL" in text and "'y' FAIL" not in text
    assert text == str(rep)
    lines = str(rep).splitlines()
    assert lines[0].split() == ["output", "result", "bad/allowed", "max", "abs", "err", "at", "comparator"]
    assert any(line.startswith("y ") and "PASS" in line for line in lines)


def test_compare_outputs_passes_and_uses_harness_tolerances():
    a, e = {"x": arr(1.5)}, {"x": arr(1.0)}
    assert not compare_outputs(a, e)
    rep = compare_outputs(a, e, atol=0.5, rtol=0.0)
    assert rep and rep.passed
    rep.raise_if_failed()
    assert compare_outputs(a, e, {"x": ratio_allclose(max_error_ratio=0.0)}, atol=0.5, rtol=0.0)


def test_compare_outputs_nan_parity():
    a = {"x": arr(1.0, np.nan, 2.0, 3.0)}
    e = {"x": arr(1.0, 5.0, np.nan, 3.0)}
    r = compare_outputs(a, e, {"x": error_distribution()})["x"]
    assert not r and r.bad == 2 and [w["index"] for w in r.worst] == [(1,), (2,)]
    assert "NaN/Inf positions differ at 2" in r.message
    # +Inf against -Inf at the same position is a parity mismatch too
    r = compare_outputs({"x": arr(np.inf)}, {"x": arr(-np.inf)})["x"]
    assert not r and "NaN/Inf" in r.message
    r = compare_outputs({"x": arr(2.0, np.inf)}, {"x": arr(2.0, 1.0)}, {"x": error_distribution()})["x"]
    assert not r and r.worst[0]["index"] == (1,)
    assert not compare_outputs({"x": arr(-np.inf)}, {"x": arr(1.0)}, {"x": error_distribution()})
    # matching positions pass the parity check and reach the comparator
    same = {"x": arr(1.0, np.nan, np.inf)}
    assert compare_outputs(same, same, {"x": error_distribution()})
    assert not compare_outputs(same, same, {"x": ratio_allclose()})


def test_compare_outputs_missing_and_shape():
    rep = compare_outputs({"a": np.zeros(3)}, {"a": np.zeros(2), "b": np.zeros(2)})
    assert not rep["a"] and "shape mismatch" in rep["a"].message
    assert not rep["b"] and "missing" in rep["b"].message
    assert "'b'" in str(rep)


def test_compare_outputs_topk_and_plain_callable():
    def plain(actual, expected, *, actual_outputs, expected_outputs, inputs, rtol, atol):
        return bool((actual == expected).all()), "    differs"
    a = {"idx": np.array([[7, 3, 5]]), "vals": arr(2, 2, 1).reshape(1, 3), "p": arr(1.0)}
    e = {"idx": np.array([[3, 7, 5]]), "vals": arr(2, 2, 1).reshape(1, 3), "p": arr(2.0)}
    rep = compare_outputs(a, e, {"idx": topk_pair_compare("vals"), "p": plain})
    assert rep["idx"] and rep["vals"] and not rep["p"]
    assert "differs" in str(rep) and rep.failed == ["p"]
