"""Each attention block against the sum of its leaf kernels.

    python benchmarks/blocks.py [block ...] [--repeat 9] [--threads N] [--markdown]

The leaves are timed inside the golden block's own composition (dsv4.golden.blocks):
each leaf it calls (hc_pre, rms_norm, qkv_proj_rope, the compressor, the indexer, the
sparse attention, hc_post) is replaced by the C kernel of the same name and timed on its
own, so their sum is what the block costs as separate C calls, with the Python glue
between them left out. The block is one C call, glue included. Each run times both; the
ratio block / leaves is the median of the runs' ratios, and a block slower than its
leaves' sum plus 10 % is flagged (exit status 1). The composed run must give the C
block's bits (checked on every run), or the two times would not be of the same work.
"""
import argparse
import contextlib
import statistics
import sys
import time

import numpy as np

import dsv4
from dsv4.check import fresh
from dsv4.golden import blocks

BLOCKS = [n for n in sorted(dsv4.KERNELS) if "_attention_" in n]
# the leaf modules the golden blocks call through
MODULES = (blocks.attention, blocks.compressor, blocks.hc, blocks.indexer, blocks.qkv)


@contextlib.contextmanager
def c_leaves(times):
    """The golden leaves replaced by their C kernels; each call's seconds appended to
    times[name]."""
    saved = []
    for mod in MODULES:
        for name in dsv4.KERNELS:
            if callable(getattr(mod, name, None)):
                saved.append((mod, name, getattr(mod, name)))
                setattr(mod, name, timed(name, dsv4.KERNELS[name], times))
    try:
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def timed(name, fn, times):
    def call(*args, **kw):
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        times.setdefault(name, []).append(time.perf_counter() - t0)
        return out
    return call


def same_outputs(a, b):
    return set(a) == set(b) and all(
        np.array_equal(np.asarray(a[k]).view(np.uint8), np.asarray(b[k]).view(np.uint8))
        for k in a)


def measure(name, inputs, repeat):
    """(block ms, leaves' sum ms, median of the per-run ratios block / leaves, {leaf: ms}),
    medians over `repeat` runs. Each run times both, in alternating order, so that the
    ratio of a pair does not move with the machine's speed from one second to the next."""
    block, golden = dsv4.KERNELS[name], getattr(dsv4.golden, name)
    want = block(**fresh(name, inputs))                  # warm-up too
    block_s, sums, ratios, per_leaf = [], [], [], {}

    def time_block():
        kw = fresh(name, inputs)
        t0 = time.perf_counter()
        block(**kw)
        block_s.append(time.perf_counter() - t0)

    def time_leaves():
        times = {}
        with c_leaves(times):
            got = golden(**fresh(name, inputs))
        if not same_outputs(want, got):
            raise SystemExit(f"{name}: the C leaves composed do not give the C block's bits")
        sums.append(sum(map(sum, times.values())))
        for leaf, t in times.items():
            per_leaf.setdefault(leaf, []).append(sum(t))

    for i in range(repeat):
        for step in (time_block, time_leaves)[::1 if i % 2 == 0 else -1]:
            step()
        ratios.append(block_s[-1] / sums[-1])
    ms = lambda s: statistics.median(s) * 1e3
    return (ms(block_s), ms(sums), statistics.median(ratios),
            {leaf: ms(t) for leaf, t in per_leaf.items()})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("blocks", nargs="*", metavar="block", help=", ".join(BLOCKS))
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = ap.parse_args(argv)
    for name in args.blocks:
        if name not in BLOCKS:
            ap.error(f"unknown block {name!r}; one of {', '.join(BLOCKS)}")
    if args.threads:
        dsv4.set_num_threads(args.threads)
    print(f"# dsv4 {dsv4.__version__}: {dsv4.get_num_threads()} threads, isa {dsv4.get_isa()}, "
          f"median of {args.repeat}", flush=True)
    rows, slow = [], 0
    for name in args.blocks or BLOCKS:
        for case, params in dsv4.specs.CASES[name].items():
            inputs = getattr(dsv4.specs, name)(**params)
            b, s, r, leaves = measure(name, inputs, args.repeat)
            over = r > 1.1
            slow += over
            rows.append((name, case, b, s, r))
            print(f"{name:22s} {case:8s} block {b:8.2f} ms  leaves {s:8.2f} ms  "
                  f"block/leaves {r:5.2f}{'  SLOWER THAN LEAVES + 10 %' if over else ''}  ("
                  + ", ".join(f"{k} {v:.2f}" for k, v in leaves.items()) + ")", flush=True)
    if args.markdown:
        print("\n| block | case | C block ms | sum of C leaves ms | block / leaves (median of runs) |\n"
              "|---|---|---:|---:|---:|")
        for name, case, b, s, r in rows:
            print(f"| `{name}` | {case} | {b:.2f} | {s:.2f} | {r:.2f} |")
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
