"""Seeded tensor builders shared by the input specs.

Each tensor is drawn from its own generator, seeded by (seed, tensor name),
so adding a tensor to a kernel never changes the others' values.
"""
import functools
import zlib

import numpy as np

from ..golden.numerics import BF16, bf16_rne


def rng(seed, name):
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def uniform_bf16(seed, name, shape, lo, hi):
    """torch's bf16 `uniform_(lo, hi)`: 256 levels lo' + k (hi' - lo') / 256, k = 0..255."""
    lo_, hi_ = (np.float32(bf16_rne(np.float32(v)).astype(np.float32)) for v in (lo, hi))
    k = rng(seed, name).integers(0, 256, size=shape, dtype=np.int32).astype(np.float32)
    return bf16_rne(lo_ + k * ((hi_ - lo_) / np.float32(256)))


def normal(seed, name, shape):
    return rng(seed, name).standard_normal(size=shape, dtype=np.float32)


def cached(fn):
    """Cache a builder of large, deterministic weights; the arrays come back read-only."""
    @functools.lru_cache(maxsize=4)
    def build(*args):
        out = fn(*args)
        for a in (out if isinstance(out, tuple) else (out,)):
            a.setflags(write=False)
        return out

    @functools.wraps(fn)
    def wrapper(*args):
        return build(*args)
    return wrapper


__all__ = ["BF16", "rng", "uniform_bf16", "normal", "cached"]
