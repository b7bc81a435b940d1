"""The C core on other code paths, outside Python: tools/aarch64_check builds
tests/c/hash_outputs.c (hashes of core primitives and kernels on seeded inputs) natively
and for aarch64, and compares the native scalar path (1 and 2 threads), every other native
path the CPU has and the aarch64 build run under qemu-user."""
import pathlib
import re
import shutil
import subprocess

import pytest

import dsv4

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHECK = ROOT / "tools" / "aarch64_check"
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
