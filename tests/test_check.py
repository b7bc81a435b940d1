"""The mismatch-finding tools: dsv4.verify, dsv4.check and `python -m dsv4`."""
import subprocess
import sys

import numpy as np

import dsv4


def test_verify_points_at_the_corrupted_rows():
    inputs = dsv4.specs.qkv_proj_rope(T=8, seed=11)
    out = {k: v.copy() for k, v in dsv4.qkv_proj_rope(**inputs).items()}
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


def test_verify_against_the_golden():
    inputs = dsv4.specs.rms_norm(T=4, seed=2)
    g = dsv4.golden.rms_norm(**inputs)
    assert dsv4.verify("rms_norm", dsv4.rms_norm(**inputs), inputs, expected=g)


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


def test_cli_check_and_list():
    run = subprocess.run([sys.executable, "-m", "dsv4", "check", "rms_norm", "--repeat", "1"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "x_normed:PASS" in run.stdout and "2 passed, 0 failed" in run.stdout
    run = subprocess.run([sys.executable, "-m", "dsv4", "check", "no_such_kernel"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "unknown kernel" in run.stdout
    run = subprocess.run([sys.executable, "-m", "dsv4", "list"], capture_output=True, text=True)
    assert run.returncode == 0 and all(k in run.stdout for k in dsv4.KERNELS)
