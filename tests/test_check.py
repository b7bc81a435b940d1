"""The mismatch-finding tools: dsv4.verify, dsv4.check and `python -m dsv4`."""
import importlib
import json
import subprocess
import sys

import numpy as np
import pytest

import dsv4
from dsv4.check import CheckResult
from dsv4.compare import compare_outputs

check_module = importlib.import_module("dsv4.check")    # dsv4.check is the function
main_module = importlib.import_module("dsv4.__main__")


@pytest.fixture(scope="module")
def qkv():
    inputs = dsv4.specs.qkv_proj_rope(T=8, seed=11)
    return inputs, {k: v.copy() for k, v in dsv4.qkv_proj_rope(**inputs).items()}


def test_verify_points_at_the_corrupted_rows(qkv):
    inputs, out = qkv
    assert dsv4.verify("qkv_proj_rope", out, inputs)
    bad = {k: v.copy() for k, v in out.items()}
    bad["kv"][3] = (bad["kv"][3].astype(np.float32) * 2 + 1).astype(bad["kv"].dtype)
    report = dsv4.verify("qkv_proj_rope", bad, inputs)
    assert not report
    assert not report["kv"] and report["q"] and report["qr"]
    assert report["kv"].bad_rows[0][0] == 3
    assert all(w["index"][0] == 3 for w in report["kv"].worst)
    assert report["kv"].mask[3].any() and not report["kv"].mask[[0, 1, 2, 4, 5, 6, 7]].any()
    assert "kv" in str(report)
    assert report["kv"].axes == ("T", "HD")                     # from the C kernel table
    assert np.flatnonzero(report["kv"].axis_counts["T"]).tolist() == [3]
    assert "(T=3, HD=" in str(report)


def test_verify_comparing_nothing_fails(qkv):
    inputs, _ = qkv
    report = dsv4.verify("qkv_proj_rope", {}, inputs)
    assert not report and report.results == {}
    assert "nothing compared" in str(report) and "q, kv, qr, qr_scale" in str(report)


def test_verify_rejects_an_unknown_output_name(qkv):
    inputs, out = qkv
    with pytest.raises(ValueError) as exc:
        dsv4.verify("qkv_proj_rope", {"q": out["q"], "kv_": out["kv"]}, inputs)
    msg = str(exc.value)
    assert "'kv_'" in msg and "its outputs: q, kv, qr, qr_scale" in msg


def test_verify_and_check_reject_an_unknown_kernel(qkv):
    inputs, out = qkv
    with pytest.raises(ValueError) as exc:
        dsv4.verify("qkv_proj_rop", out, inputs)
    assert "'qkv_proj_rop'" in str(exc.value) and "qkv_proj_rope" in str(exc.value)
    with pytest.raises(ValueError, match="unknown kernel 'nope'.*rms_norm"):
        dsv4.check("nope")
    with pytest.raises(ValueError, match="rms_norm has no case 'decoding'.*decode, prefill"):
        dsv4.check("rms_norm", "decoding")


def test_verify_warns_on_a_single_head_the_budget_absorbs(qkv):
    inputs, out = qkv
    bad = dict(out)
    q = out["q"].astype(np.float32)
    q[3, 5] += 0.5                             # one head of one token: 512 of 262144 elements
    bad["q"] = q.astype(out["q"].dtype)
    report = dsv4.verify("qkv_proj_rope", bad, inputs)
    r = report["q"]
    assert report and r.bad == 512 and r.allowed == 1311
    assert r.axes == ("T", "H", "HD")
    assert np.flatnonzero(r.axis_counts["H"]).tolist() == [5]
    assert [(h["axis"], h["index"]) for h in r.hotspots] == [("H", 5)]   # T: a row axis
    assert report.warned == ["q"] and "H=5 (512 of 512)" in report.warnings[0]
    assert "WARNING" in str(report)


def test_verify_golden_intermediates_with_axes():
    inputs = dsv4.specs.decode_sparse_attn(B=2, seed=1)
    ref = dsv4.golden.decode_sparse_attn(**inputs, stages=True)
    ob = ref["stages"]["Ob"].astype(np.float32)
    ob[:, 7] *= 1.1                            # head 7 of every token
    report = dsv4.verify("decode_sparse_attn", {"Ob": ob.astype(ref["stages"]["Ob"].dtype)}, inputs)
    r = report["Ob"]
    assert not r and r.axes == ("T", "H", "HD")  # named after q, of the same shape
    assert np.flatnonzero(r.axis_counts["H"]).tolist() == [7]
    assert r.comparator.startswith("ratio_allclose(atol=0.0001, rtol=0.0078125")
    with pytest.raises(ValueError, match="its intermediates: .*Ob"):
        dsv4.verify("decode_sparse_attn", {"ob": ob}, inputs)


def test_verify_against_the_golden():
    inputs = dsv4.specs.rms_norm(T=4, seed=2)
    g = dsv4.golden.rms_norm(**inputs)
    assert dsv4.verify("rms_norm", dsv4.rms_norm(**inputs), inputs, expected=g)
    report = dsv4.verify("rms_norm", dsv4.rms_norm(**inputs), inputs, expected={})
    assert not report and "not in the expected outputs" in str(report)


def test_golden_stages_locate_the_quantisation_input():
    inputs = dsv4.specs.qkv_proj_rope(T=2, seed=4)
    g = dsv4.golden.qkv_proj_rope(**inputs, stages=True)
    st = g["stages"]
    assert st["latent"].shape == (2, dsv4.FLASH.q_lora_rank)
    q, s = dsv4.golden.numerics.int8_quant_per_row(st["qn"])
    assert np.array_equal(q, g["qr"]) and np.array_equal(s, g["qr_scale"])


def test_check_reports_every_case():
    results = dsv4.check("hc_post", repeat=1)
    assert [r.case for r in results] == list(dsv4.specs.CASES["hc_post"])
    assert all(results) and all(r.c_ms > 0 and r.golden_ms > 0 for r in results)
    rec = results[0].record()
    assert rec["kernel"] == "hc_post" and rec["outputs"]["y"]["passed"] is True
    assert json.loads(json.dumps(rec)) == rec


def test_timing_warms_up_and_takes_the_median(monkeypatch):
    calls, clock = [], iter([0.0, 0.005, 1.0, 1.001, 2.0, 2.003])   # runs of 5, 1 and 3 ms
    monkeypatch.setattr(check_module.time, "perf_counter", lambda: next(clock))

    def fn(**kw):
        calls.append(kw)
        return {}
    out, ms = check_module._timed("rms_norm", fn, {"x": 1}, repeat=3, warmup=1)
    assert len(calls) == 4 and ms == pytest.approx(3.0)


def test_library_check_neither_sleeps_nor_warms_up_unasked(monkeypatch):
    slept, timed = [], []
    monkeypatch.setattr(check_module.time, "sleep", slept.append)
    real = check_module._timed
    monkeypatch.setattr(check_module, "_timed", lambda *a: timed.append(a[3:]) or real(*a))
    dsv4.check("rms_norm", "decode", repeat=1)
    assert slept == [] and timed == [(1, 0), (1, 0)]          # (repeat, warmup): C, golden
    dsv4.check("rms_norm", "decode", repeat=2, warmup=1, settle=0.01)
    assert slept == [0.01] and timed[2:] == [(2, 1), (2, 1)]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "dsv4", *args], capture_output=True, text=True)


def test_cli_table():
    run = run_cli("check", "rms_norm", "--kernel", "hc_post", "--case", "decode", "--repeat", "2")
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert "median of 2 timed run(s) after 1 warm-up run" in lines[1]
    head = lines[3]
    assert head.split() == ["kernel", "case", "params", "result", "outputs", "C", "ms", "golden",
                            "ms", "golden/C"]
    rows = lines[5:7]
    assert [r.split()[:2] for r in rows] == [["rms_norm", "decode"], ["hc_post", "decode"]]
    for col in ("result", "outputs"):       # left-aligned columns start at their header
        assert {r[head.index(col):].split()[0] for r in rows} <= {"PASS", "1/1"}
    end = len(head)                         # numbers are right-aligned to the header's end
    assert all(len(r) == end and r.endswith("x") for r in rows)
    assert lines[-1] == "2 passed, 0 failed"
    assert "[1/2] rms_norm decode" in run.stderr and "[2/2] hc_post decode" in run.stderr


def test_cli_json():
    run = run_cli("check", "-k", "rms_norm", "--case", "pre*", "--json", "--repeat", "1")
    assert run.returncode == 0, run.stderr
    records = json.loads(run.stdout)
    assert [(r["kernel"], r["case"]) for r in records] == [("rms_norm", "prefill")]
    rec = records[0]
    assert rec["params"] == {"T": 128} and rec["passed"] is True
    assert set(rec["outputs"]["x_normed"]) >= {"passed", "bad", "allowed"}
    assert rec["c_ms"] > 0 and rec["golden_ms"] > 0
    assert run.stderr == ""                 # one case: no progress line


def test_cli_usage_errors_exit_2():
    for args in (["check", "no_such_kernel"], ["check", "rms_norm", "--case", "nope"],
                 ["check", "--repeat", "0", "rms_norm"], ["check", "--bogus"]):
        run = run_cli(*args)
        assert run.returncode == 2, (args, run.stderr)
        assert "usage:" in run.stderr and run.stdout == ""
    assert "unknown kernel(s): no_such_kernel" in run_cli("check", "no_such_kernel").stderr


def test_cli_failure_exits_1(monkeypatch, capsys):
    e = {"x_normed": np.zeros(4, np.float32)}
    report = compare_outputs({"x_normed": np.ones(4, np.float32)}, e)

    def failing(kernel, case, **kw):
        return [CheckResult(kernel, case, {"T": 8}, report, 1.0, 2.0)]
    monkeypatch.setattr(main_module, "check", failing)
    assert main_module.main(["check", "rms_norm", "--case", "decode", "-q"]) == 1
    out = capsys.readouterr().out
    assert "FAIL x_normed" in out and "'x_normed' FAIL" in out and out.endswith("0 passed, 1 failed\n")
    assert main_module.main(["check", "rms_norm", "--case", "decode", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)[0]["passed"] is False


def test_cli_sleeps_once_per_case_before_timing(monkeypatch):
    seen = []

    def fake(kernel, case, **kw):
        seen.append((kw["settle"], kw["warmup"]))
        return [CheckResult(kernel, case, {}, compare_outputs({"y": 1.0}, {"y": 1.0}), 1.0, 2.0)]
    monkeypatch.setattr(main_module, "check", fake)
    assert main_module.main(["check", "rms_norm", "-q"]) == 0
    assert seen == [(main_module.SETTLE_S, 1)] * len(dsv4.specs.CASES["rms_norm"])


def test_cli_list():
    run = run_cli("list")
    assert run.returncode == 0 and all(k in run.stdout for k in dsv4.KERNELS)
