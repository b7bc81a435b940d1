"""The C core on other code paths and on aarch64. Outside Python, tools/aarch64_check builds
tests/c/hash_outputs.c (hashes of core primitives and kernels on seeded inputs) natively
and for aarch64, and compares the native scalar path (1 and 2 threads), every other native
path the CPU has and the aarch64 build run under qemu-user. tools/aarch64_python runs whole
kernels through the Python binding: the extension cross-compiled and loaded by an aarch64
CPython under qemu-user, against the native scalar and best paths."""
import os
import pathlib
import re
import shutil
import subprocess

import pytest

import dsv4

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHECK = ROOT / "tools" / "aarch64_check"
PYTHON_CHECK = ROOT / "tools" / "aarch64_python"
CROSS = shutil.which("aarch64-linux-gnu-gcc") is not None and shutil.which("qemu-aarch64") is not None


@pytest.fixture(scope="module")
def check_output():
    """One run of the check: the native builds are part of the aarch64 one, so they are
    compiled once; native paths only where the cross tools are missing."""
    r = subprocess.run([str(CHECK)] + ([] if CROSS else ["--native"]), cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build tests/c/hash_outputs.c")
def test_native_paths_print_the_same_hashes(check_output):
    m = re.search(r"(\d+) outputs, the same in: (.*)", check_output)
    assert m and int(m.group(1)) >= 35, check_output
    want = ["scalar-2", "scalar-1"] + [f"{isa}-2" for isa in dsv4.available_isas() if isa != "scalar"]
    assert m.group(2).split()[:len(want)] == want, check_output


@pytest.mark.skipif(not CROSS, reason="needs aarch64-linux-gnu-gcc and qemu-aarch64 "
                                      "(Debian packages gcc-aarch64-linux-gnu and qemu-user)")
def test_aarch64_under_qemu_prints_the_native_hashes(check_output):
    assert "aarch64-2 aarch64-1" in check_output


@pytest.mark.skipif(not CROSS, reason="needs aarch64-linux-gnu-gcc and qemu-aarch64 "
                                      "(Debian packages gcc-aarch64-linux-gnu and qemu-user)")
@pytest.mark.skipif(not os.environ.get("DSV4_AARCH64_PYTHON"),
                    reason="about a minute: set DSV4_AARCH64_PYTHON=1 (.ci/run does)")
def test_aarch64_python_prints_the_native_hashes():
    # exit 2: the aarch64 CPython, NumPy or ml_dtypes could not be had (no root, no apt-get,
    # no network on the first run), which is this machine's lack, not the kernels' fault
    r = subprocess.run([str(PYTHON_CHECK)], cwd=ROOT, capture_output=True, text=True)
    if r.returncode == 2:
        pytest.skip("tools/aarch64_python cannot run here: "
                    + (r.stderr.strip().splitlines() or ["exit status 2"])[-1])
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"(\d+) outputs of (\d+) kernels, the same in: (.*)", r.stdout)
    assert m, r.stdout + r.stderr
    assert int(m.group(2)) == len(dsv4.KERNELS) <= int(m.group(1)), r.stdout
    assert m.group(3).split() == ["native-scalar", "native-best", "aarch64"], r.stdout
