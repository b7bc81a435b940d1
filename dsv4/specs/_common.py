"""Seeded tensor builders shared by the input specs.

Each tensor is drawn from its own generator, seeded by (seed, tensor name),
so adding a tensor to a kernel never changes the others' values.
"""
import collections
import functools
import math
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .._threads import default_num_threads
from ..golden.numerics import BF16, bf16_rne


def rng(seed, name):
    return np.random.default_rng([int(seed), zlib.crc32(name.encode())])


def uniform_bf16(seed, name, shape, lo, hi):
    """torch's bf16 `uniform_(lo, hi)`: 256 levels lo' + k (hi' - lo') / 256, k = 0..255."""
    lo_, hi_ = (np.float32(bf16_rne(np.float32(v)).astype(np.float32)) for v in (lo, hi))
    k = rng(seed, name).integers(0, 256, size=shape, dtype=np.int32).astype(np.float32)
    return bf16_rne(lo_ + k * ((hi_ - lo_) / np.float32(256)))


_BLOCK = 1 << 22


def normal(seed, name, shape):
    """N(0, 1) fp32. A large tensor is drawn in blocks of 4 Mi elements, each from its own
    generator, in parallel (NumPy releases the GIL): weights of a FLASH layer take seconds
    to draw, and the values do not depend on the thread count."""
    n = math.prod(shape)
    if n <= _BLOCK:
        return rng(seed, name).standard_normal(size=shape, dtype=np.float32)
    out = np.empty(shape, np.float32)
    flat = out.reshape(-1)

    def fill(i):
        rng(seed, f"{name}#{i // _BLOCK}").standard_normal(dtype=np.float32,
                                                          out=flat[i:i + _BLOCK])
    with ThreadPoolExecutor(default_num_threads()) as pool:
        list(pool.map(fill, range(0, n, _BLOCK)))
    return out


CACHE_BYTES = 2 << 30
_cache = collections.OrderedDict()      # (builder, args) -> (result, bytes), oldest first
_cache_lock = threading.Lock()


def cached(fn):
    """Cache a builder of large, deterministic weights; the arrays come back read-only.
    One cache for all builders, the least recently used results dropped beyond
    CACHE_BYTES: a test session or a notebook reuses the weights of the cases it ran
    last, and memory stays bounded however many it runs."""
    @functools.wraps(fn)
    def wrapper(*args):
        key = (fn.__module__, fn.__qualname__, args)
        with _cache_lock:
            hit = _cache.get(key)
            if hit is not None:
                _cache.move_to_end(key)
                return hit[0]
        out = fn(*args)
        arrays = out if isinstance(out, tuple) else (out,)
        for a in arrays:
            a.setflags(write=False)
        size = sum(a.nbytes for a in arrays)
        with _cache_lock:
            _cache[key] = (out, size)
            total = sum(n for _, n in _cache.values())
            while total > CACHE_BYTES and len(_cache) > 1:
                _, (_, n) = _cache.popitem(last=False)
                total -= n
        return out
    return wrapper


__all__ = ["BF16", "rng", "uniform_bf16", "normal", "cached"]
