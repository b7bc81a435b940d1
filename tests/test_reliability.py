"""Memory safety and thread safety of the binding: sizes that once overflowed a fixed
array, and settings changed by one thread while others call kernels."""
import dataclasses
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import dsv4
from conftest import same_bits


@pytest.mark.parametrize("layer_id", [0, 10])
@pytest.mark.parametrize("k", [64, 65, 100])
def test_gate_with_more_experts_per_token_than_a_vector(k, layer_id):
    # the K chosen scores once lived in a 64-float stack array: K = 100 wrote past it
    cfg = dataclasses.replace(dsv4.FLASH, hidden_size=64, num_experts_per_tok=k, vocab_size=50)
    inputs = dsv4.specs.gate(T=5, layer_id=layer_id, n_experts=128, seed=1, config=cfg)
    assert inputs["tid2eid"].shape == (50, k)
    c = dsv4.gate(**inputs, config=cfg)
    g = dsv4.golden.gate(**inputs, config=cfg)
    assert same_bits(c["indices"], g["indices"])
    np.testing.assert_allclose(c["weights"], g["weights"], rtol=1e-6, atol=0)
    # the weights of a token sum to routed_scaling_factor, so none of them is garbage
    np.testing.assert_allclose(c["weights"].sum(axis=1), cfg.routed_scaling_factor, rtol=1e-4)


def test_set_num_threads_while_other_threads_call_kernels(threads):
    # the scratch is sized for the thread count when a call begins; another thread
    # changing it meanwhile once made the run use more threads than the scratch held
    inputs = dsv4.specs.hc_pre(T=37, seed=3)
    threads(1)
    ref = dsv4.hc_pre(**inputs)
    stop = threading.Event()
    failures, calls = [], [0]

    def worker():
        while not stop.is_set():
            try:
                out = dsv4.hc_pre(**inputs)
            except Exception as e:          # noqa: BLE001 - any exception is a failure here
                failures.append(repr(e))
                return
            calls[0] += 1
            if not all(same_bits(out[k], ref[k]) for k in ref):
                failures.append("different bits")
                return

    def toggler():
        n = 0
        while not stop.is_set():
            dsv4.set_num_threads(1 + n % 3)
            n += 1

    pool = [threading.Thread(target=worker) for _ in range(2)] + [threading.Thread(target=toggler)]
    for t in pool:
        t.start()
    time.sleep(2.0)
    stop.set()
    for t in pool:
        t.join()
    assert not failures, failures[:5]
    assert calls[0] > 10


def test_isa_switch_while_other_threads_call_kernels(isa):
    inputs = dsv4.specs.rms_norm(T=37, seed=3)
    ref = dsv4.rms_norm(**inputs)["x_normed"]
    stop = threading.Event()
    failures = []

    def worker():
        while not stop.is_set():
            out = dsv4.rms_norm(**inputs)["x_normed"]
            if not same_bits(out, ref):
                failures.append("different bits")
                return

    def toggler():
        names = dsv4.available_isas()
        n = 0
        while not stop.is_set():
            dsv4.set_isa(names[n % len(names)])
            n += 1

    pool = [threading.Thread(target=worker) for _ in range(2)] + [threading.Thread(target=toggler)]
    for t in pool:
        t.start()
    time.sleep(1.0)
    stop.set()
    for t in pool:
        t.join()
    assert not failures


@pytest.mark.parametrize("value,ok", [("scalar", True), ("avx2", True), ("auto", True),
                                      ("AVX9000", False), ("avx", False)])
def test_dsv4_isa_environment_variable(value, ok):
    if ok and value not in ("auto", *dsv4.available_isas()):
        pytest.skip(f"this CPU has no {value} path")
    code = "import dsv4; print(dsv4.get_isa())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "DSV4_ISA": value})
    if ok:
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == (value if value != "auto" else dsv4.available_isas()[-1])
    else:
        assert run.returncode != 0
        assert "DSV4_ISA" in run.stderr and repr(value) in run.stderr

