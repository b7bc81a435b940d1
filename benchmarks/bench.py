"""Time every kernel's C implementation and its NumPy golden in one run.

    python benchmarks/bench.py [kernel ...] [--repeat 5] [--threads N] [--isa NAME[,NAME]]
                               [--markdown]

For each kernel and deployment case (dsv4.specs.CASES): median wall time of
the C kernel and of the golden over --repeat runs on the same inputs, and the
ratio golden / C. "C into buffers" times the C kernel writing into
pre-allocated outputs (as pypto-lib's goldens do), which leaves out the page
faults of fresh output memory. With several code paths (--isa scalar,avx2,avx512) the C
kernel is timed on each, on the same inputs, in turn round after round, beside one golden
time; each path's time is also given as the median of its ratios to the last path's.
"""
import argparse
import statistics
import sys
import time

import dsv4
from dsv4.check import fresh

# Full-size FLASH cases too slow to build for the tests (805 MB of routed expert weights per
# rank): pypto-lib's default EP deployment, 2 ranks x 32 local experts.
FULL = {"expert_routed": {"flash, 32 experts": dict(T=8)},
        "decode_layer": {"2 ranks x 32 experts": dict(layer_id=10, n_local_experts=32)},
        "prefill_layer": {"2 ranks x 32 experts": dict(layer_id=2, chunk_lens=(128, 192),
                                                       n_local_experts=32)},
        "prefill_mtp": {"2 ranks x 32 experts": dict(n_local_experts=32)}}


def median_ms(name, fn, kwargs, repeat):
    # NumPy's BLAS threads spin for a while after a golden; let them go idle so
    # that they do not take time slices from the kernel being timed.
    time.sleep(0.3)
    fn(**fresh(name, kwargs))         # warm-up: thread pool, page faults, caches
    times = []
    for _ in range(repeat):
        kw = fresh(name, kwargs)      # states and caches start the same every run
        t0 = time.perf_counter()
        fn(**kw)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def cases(name, no_full):
    out = dict(dsv4.specs.CASES[name])
    if not no_full:
        out.update(FULL.get(name, {}))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kernels", nargs="*")
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--isa", default=None,
                    help="code path(s), comma-separated: scalar, avx2, avx512, amx (default: the best)")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--no-full", action="store_true", help="skip the full-size FLASH cases")
    args = ap.parse_args(argv)
    if args.threads:
        dsv4.set_num_threads(args.threads)
    isas = args.isa.split(",") if args.isa else [dsv4.get_isa()]
    for isa in isas:
        dsv4.set_isa(isa)           # an unknown or missing path raises here, before any timing
    names = args.kernels or sorted(dsv4.KERNELS)
    print(f"# dsv4 {dsv4.__version__}: {dsv4.get_num_threads()} threads, isa {', '.join(isas)}, "
          f"median of {args.repeat}", flush=True)
    if len(isas) > 1:
        return by_path(names, isas, args)
    rows = []
    for name in names:
        for case, params in cases(name, args.no_full).items():
            inputs = getattr(dsv4.specs, name)(**params)
            kernel = dsv4.KERNELS[name]
            c_ms = median_ms(name, kernel, inputs, args.repeat)
            bufs = {k: v.copy() for k, v in kernel(**fresh(name, inputs)).items() if k in kernel.outputs}
            b_ms = median_ms(name, kernel, {**inputs, **bufs}, args.repeat)
            g_ms = median_ms(name, getattr(dsv4.golden, name), inputs, args.repeat)
            shape = " ".join(f"{k}={v}" for k, v in params.items())
            rows.append((name, case, shape, c_ms, b_ms, g_ms))
            print(f"{name:24s} {case:14s} {shape:26s} C {c_ms:9.2f} ms  into buffers {b_ms:9.2f} ms  "
                  f"golden {g_ms:9.2f} ms  x{g_ms / c_ms:6.1f}", flush=True)
    if args.markdown:
        print("\n| kernel | case | C ms | C into buffers ms | NumPy golden ms | golden / C |\n"
              "|---|---|---:|---:|---:|---:|")
        for name, case, shape, c, b, g in rows:
            print(f"| `{name}` | {case} ({shape}) | {c:.2f} | {b:.2f} | {g:.1f} | {g / c:.1f}x |")
    return 0


def paths_ms(name, kwargs, isas, repeat):
    """Each path's median time, and each path's median ratio to the last path's time in the
    same round: the paths are timed in turn, round after round, so that a drift of the
    machine's speed moves them together."""
    fn = dsv4.KERNELS[name]
    for isa in isas:                  # warm-up of each path
        dsv4.set_isa(isa)
        fn(**fresh(name, kwargs))
    times = [[] for _ in isas]
    for _ in range(repeat):
        for i, isa in enumerate(isas):
            dsv4.set_isa(isa)
            kw = fresh(name, kwargs)
            t0 = time.perf_counter()
            fn(**kw)
            times[i].append(time.perf_counter() - t0)
    ms = [statistics.median(t) * 1e3 for t in times]
    ratios = [statistics.median(a / b for a, b in zip(t, times[-1])) for t in times]
    return ms, ratios


def by_path(names, isas, args):
    """The C kernel on each code path and the golden, per case."""
    rows = []
    for name in names:
        for case, params in cases(name, args.no_full).items():
            inputs = getattr(dsv4.specs, name)(**params)
            c_ms, ratios = paths_ms(name, inputs, isas, args.repeat)
            g_ms = median_ms(name, getattr(dsv4.golden, name), inputs, args.repeat)
            rows.append((name, case, c_ms, ratios, g_ms))
            print(f"{name:24s} {case:14s} " + "  ".join(f"{i} {t:9.2f} ms" for i, t in zip(isas, c_ms))
                  + f"  golden {g_ms:9.2f} ms  " + " ".join(f"x{g_ms / t:.1f}" for t in c_ms)
                  + "  / " + isas[-1] + " " + " ".join(f"{r:.2f}" for r in ratios[:-1]),
                  flush=True)
    if args.markdown:
        last = isas[-1]
        print("\n| kernel | case | " + " | ".join(f"C {i} ms" for i in isas) + " | NumPy golden ms | "
              + " | ".join(f"golden / {i}" for i in isas) + " | "
              + " | ".join(f"{i} / {last}" for i in isas[:-1]) + " |\n|---|---|"
              + "---:|" * (3 * len(isas)))
        for name, case, c_ms, ratios, g in rows:
            print(f"| `{name}` | {case} | " + " | ".join(f"{t:.2f}" for t in c_ms) + f" | {g:.1f} | "
                  + " | ".join(f"{g / t:.1f}x" for t in c_ms) + " | "
                  + " | ".join(f"{r:.2f}" for r in ratios[:-1]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
