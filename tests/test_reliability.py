"""Memory safety and thread safety of the binding: sizes that once overflowed a fixed
array, and settings changed by one thread while others call kernels; the default thread
count; Ctrl-C during a call."""
import dataclasses
import os
import shutil
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


def test_isa_switch_while_other_threads_call_kernels(isa, threads):
    # the paths give the same bits, so a switch mid-call would not show in the outputs:
    # the C core counts the reads of the setting that could see one (test_kernels.py)
    threads(2)
    inputs = dsv4.specs.rms_norm(T=37, seed=3)
    ref = dsv4.rms_norm(**inputs)["x_normed"]
    stop = threading.Event()
    failures = []
    before = dsv4._C._unpinned_reads()

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
    assert dsv4._C._unpinned_reads() == before


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


# ---- OpenMP waiting -------------------------------------------------------------------

@pytest.mark.parametrize("overrides,policy,spin", [
    ({}, "PASSIVE", "0"),                                  # dsv4's default: sleep at once
    ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE", None),       # the caller's choice is kept
    ({"GOMP_SPINCOUNT": "1000"}, "PASSIVE", "1000"),
])
def test_openmp_waits_passively_unless_told(overrides, policy, spin):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(overrides, OMP_DISPLAY_ENV="VERBOSE")
    code = "import os, dsv4; print(os.environ.get('OMP_WAIT_POLICY'))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    if "GOMP_SPINCOUNT" not in run.stderr:
        pytest.skip("the OpenMP runtime is not libgomp: it does not display its wait settings")
    assert f"OMP_WAIT_POLICY = '{policy}'" in run.stderr
    if spin is not None:
        assert f"GOMP_SPINCOUNT = '{spin}'" in run.stderr
    # the process environment is the caller's again after the import
    assert run.stdout.strip() == str(overrides.get("OMP_WAIT_POLICY"))


# ---- the default thread count ---------------------------------------------------------

def run_threads(overrides, cpus=None):
    env = {k: v for k, v in os.environ.items() if k not in ("DSV4_NUM_THREADS", "OMP_NUM_THREADS")}
    env.update(overrides)
    cmd = [sys.executable, "-c", "import dsv4; print(dsv4.get_num_threads())"]
    if cpus is not None:
        cmd = ["taskset", "-c", cpus] + cmd
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


needs_taskset = pytest.mark.skipif(not shutil.which("taskset") or not hasattr(os, "sched_getaffinity"),
                                   reason="needs taskset (util-linux) and sched_getaffinity")


@needs_taskset
@pytest.mark.parametrize("overrides,expected", [
    ({}, 1),                                                  # the affinity mask: one CPU
    ({"DSV4_NUM_THREADS": "3"}, 3),
    ({"OMP_NUM_THREADS": "3"}, 3),                            # left to OpenMP
    ({"DSV4_NUM_THREADS": "2", "OMP_NUM_THREADS": "3"}, 2),   # dsv4's own variable wins
])
def test_default_threads_follow_affinity_and_environment(overrides, expected):
    run = run_threads(overrides, cpus="0")
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) == expected


@pytest.mark.parametrize("value", ["x", "0", "-1", "1025", "2.5", "99999999999999999999"])
def test_bad_dsv4_num_threads_raises_at_import(value):
    run = run_threads({"DSV4_NUM_THREADS": value})
    assert run.returncode != 0
    assert "ValueError: environment variable DSV4_NUM_THREADS" in run.stderr
    assert "[1, 1024]" in run.stderr and repr(value) in run.stderr


def fake_cgroups(tmp_path, v2=None, v1=None, member="/a/b", root="/"):
    """A mountinfo and a /proc/self/cgroup naming cgroup trees under tmp_path; v2 and v1
    map a directory relative to the cgroup's mount to cpu.max or (quota, period)."""
    mountinfo = [f"25 1 0:22 / {tmp_path}/other rw - tmpfs tmpfs rw"]
    cgroup = ["5:memory:/elsewhere"]
    if v2 is not None:
        mountinfo.append(f"30 25 0:26 {root} {tmp_path}/unified rw,nosuid - cgroup2 cgroup2 rw")
        cgroup.append(f"0::{member}")
        for d, text in v2.items():
            (tmp_path / "unified" / d).mkdir(parents=True, exist_ok=True)
            (tmp_path / "unified" / d / "cpu.max").write_text(text + "\n")
    if v1 is not None:
        mountinfo.append(f"31 25 0:27 {root} {tmp_path}/cpu rw - cgroup cgroup rw,cpu,cpuacct")
        cgroup.append(f"4:cpu,cpuacct:{member}")
        for d, (quota, period) in v1.items():
            (tmp_path / "cpu" / d).mkdir(parents=True, exist_ok=True)
            (tmp_path / "cpu" / d / "cpu.cfs_quota_us").write_text(f"{quota}\n")
            (tmp_path / "cpu" / d / "cpu.cfs_period_us").write_text(f"{period}\n")
    (tmp_path / "mountinfo").write_text("\n".join(mountinfo) + "\n")
    (tmp_path / "cgroup").write_text("\n".join(cgroup) + "\n")
    return str(tmp_path / "mountinfo"), str(tmp_path / "cgroup")


@pytest.mark.parametrize("v2,v1,expected", [
    ({"a/b": "max 100000"}, None, None),
    ({"a/b": "150000 100000"}, None, 2),                       # 1.5 CPUs: rounded up
    ({"a/b": "max 100000", "a": "100000 100000"}, None, 1),    # a parent's quota caps too
    ({"a/b": "400000 100000", ".": "200000 100000"}, None, 2),
    ({"a/b": "50000 100000"}, None, 1),                        # half a CPU: still one thread
    (None, {"a/b": (-1, 100000)}, None),                       # v1: -1 is no quota
    (None, {"a/b": (250000, 100000)}, 3),
    (None, {"a/b": (-1, 100000), "a": (300000, 100000)}, 3),
    ({"a/b": "200000 100000"}, {"a/b": (100000, 100000)}, 1),  # both hierarchies: the smaller
    (None, None, None),
])
def test_cgroup_cpu_limit(tmp_path, v2, v1, expected):
    from dsv4._threads import cgroup_cpu_limit
    assert cgroup_cpu_limit(*fake_cgroups(tmp_path, v2, v1)) == expected


def test_cgroup_cpu_limit_in_a_cgroup_namespace(tmp_path):
    # the mount's root is the process's own cgroup: its files are at the mount point
    files = fake_cgroups(tmp_path, v2={".": "300000 100000"}, member="/docker/c1", root="/docker/c1")
    from dsv4._threads import cgroup_cpu_limit
    assert cgroup_cpu_limit(*files) == 3
    assert cgroup_cpu_limit(str(tmp_path / "missing"), files[1]) is None


def test_default_threads_are_capped_by_the_quota(monkeypatch):
    from dsv4 import _threads
    cpus = len(os.sched_getaffinity(0))
    monkeypatch.setattr(_threads, "cgroup_cpu_limit", lambda: None)
    assert _threads.default_num_threads() == cpus
    monkeypatch.setattr(_threads, "cgroup_cpu_limit", lambda: 1)
    assert _threads.default_num_threads() == 1
    monkeypatch.setattr(_threads, "cgroup_cpu_limit", lambda: cpus + 5)
    assert _threads.default_num_threads() == cpus
    set_to = []
    _threads.threads_from_environment(set_to.append, {})
    _threads.threads_from_environment(set_to.append, {"OMP_NUM_THREADS": "7"})
    _threads.threads_from_environment(set_to.append, {"OMP_NUM_THREADS": "7", "DSV4_NUM_THREADS": "5"})
    assert set_to == [cpus, 5]


# ---- Ctrl-C during a call --------------------------------------------------------------

SIGINT_CHILD = """
import dataclasses, json, os, signal, threading, time
import dsv4
from dsv4.check import fresh
cfg = dataclasses.replace(
    dsv4.FLASH, hidden_size=256, q_lora_rank=128, num_attention_heads=4, head_dim=96,
    qk_rope_head_dim=32, o_groups=2, o_lora_rank=64, moe_intermediate_size=128,
    n_routed_experts=8, index_n_heads=8, vocab_size=4096, max_position_embeddings=2048)
inputs = dsv4.specs.prefill_layer(layer_id=2, chunk_lens=(600, 7), n_local_experts=4, seed=1,
                                  config=cfg)
ref = dsv4.prefill_layer(**fresh("prefill_layer", inputs), config=cfg)
before = {k: inputs[k].view("u1") for k in dsv4.prefill_layer.inouts}

def attempt():
    kw = fresh("prefill_layer", inputs)
    sent = []
    def interrupt():
        # the first cache or state byte the kernel writes says it runs (with the GIL
        # released, so this thread does too): a fixed delay would miss the call on a busy
        # machine
        while not any((kw[k].view("u1") != v).any() for k, v in before.items()):
            time.sleep(0.0002)
        sent.append(time.perf_counter() - t0)
        os.kill(os.getpid(), signal.SIGINT)
    timer = threading.Thread(target=interrupt, daemon=True)
    result = {"returned": False, "interrupted": False}
    t0 = time.perf_counter()
    timer.start()
    try:
        dsv4.prefill_layer(**kw, config=cfg)
        result["returned"] = True
    except KeyboardInterrupt:
        result["interrupted"] = True
    result["ended"] = time.perf_counter() - t0
    try:
        timer.join()
        time.sleep(0.05)
    except KeyboardInterrupt:          # the signal came after the call: not this case
        return None
    result["sent"] = sent[0]
    result["states"] = {k: kw[k].tobytes() == ref[k].tobytes() for k in dsv4.prefill_layer.inouts}
    result["changed"] = {k: kw[k].tobytes() != inputs[k].tobytes() for k in dsv4.prefill_layer.inouts}
    return result

for _ in range(10):
    result = attempt()
    if result is not None:
        break
print(json.dumps(result))
"""


def test_ctrl_c_during_a_call_raises_after_it_and_completes_the_states():
    # the GIL is released while the kernel runs, so Python sees the SIGINT only when the
    # call returns: the kernel finishes (every state and cache written as by an
    # uninterrupted call), then KeyboardInterrupt is raised before the next statement
    import json
    run = subprocess.run([sys.executable, "-c", SIGINT_CHILD], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    r = json.loads(run.stdout.splitlines()[-1])
    assert r["sent"] < r["ended"], r          # the signal came while the call ran
    assert r["interrupted"] and not r["returned"], r
    assert all(r["states"].values()), r["states"]
    assert any(r["changed"].values()), r      # the call does write states
