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

ext = Extension(
    "dsv4._C",
    sources=sorted(glob.glob("csrc/*.c") + glob.glob("csrc/core/*.c") + glob.glob("csrc/kernels/*.c")),
    include_dirs=["csrc", np.get_include()],
    depends=sorted(glob.glob("csrc/**/*.h", recursive=True)),
    extra_compile_args=cflags,
    extra_link_args=["-fopenmp"],
)

setup(ext_modules=[ext])
