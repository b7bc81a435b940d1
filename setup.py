"""Builds the one C extension, dsv4._C, from csrc/."""
import glob
import os

import numpy as np
from setuptools import Extension, setup

cflags = [
    "-std=c11", "-O3", "-fopenmp",
    # Every fp32 operation rounds once, in the order the source gives.
    "-ffp-contract=off", "-fno-fast-math",
    "-Wall", "-Wextra", "-Wno-unused-parameter",
]
if os.environ.get("DSV4_WERROR"):
    cflags.append("-Werror")
ldflags = ["-fopenmp"]

# DSV4_SANITIZE=address,undefined (any -fsanitize= list): an instrumented build for
# tests (.ci/sanitize). Python is not instrumented, so it needs the ASan runtime
# preloaded; -O1 keeps the reports' stacks readable, and no sanitizer recovers.
# -fno-wrapv: Python's own CFLAGS bring -fwrapv, under which UBSan ignores signed overflow.
sanitize = os.environ.get("DSV4_SANITIZE", "").strip()
if sanitize:
    san = ["-fsanitize=" + sanitize, "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g",
           "-fno-wrapv"]
    cflags = [f for f in cflags if f != "-O3"] + ["-O1"] + san
    ldflags += san

ext = Extension(
    "dsv4._C",
    sources=sorted(glob.glob("csrc/*.c") + glob.glob("csrc/core/*.c") + glob.glob("csrc/kernels/*.c")),
    include_dirs=["csrc", np.get_include()],
    depends=sorted(glob.glob("csrc/**/*.h", recursive=True)),
    extra_compile_args=cflags,
    extra_link_args=ldflags,
)

setup(ext_modules=[ext])
