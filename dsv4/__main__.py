"""python -m dsv4 check [kernel ...]: the golden check of every kernel.

For each kernel and each of its deployment cases: build seeded inputs, run
the C kernel and the NumPy golden, compare every output with pypto-lib's
comparator, print one table. Exits 1 if any output fails.
"""
import argparse
import sys

from . import _kernels, get_isa, get_num_threads, set_num_threads
from .check import check


def _table(rows):
    head = ("kernel", "case", "shape", "outputs", "C ms", "golden ms", "speed-up")
    cells = [head] + rows
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([line(head), line(tuple("-" * w for w in widths))] + [line(r) for r in rows])


def cmd_check(args):
    names = args.kernels or list(_kernels.KERNELS)
    unknown = [n for n in names if n not in _kernels.KERNELS]
    if unknown:
        print(f"unknown kernel(s): {', '.join(unknown)}; known: {', '.join(_kernels.KERNELS)}")
        return 2
    if args.threads:
        set_num_threads(args.threads)
    print(f"dsv4 check: seed {args.seed}, {get_num_threads()} threads, isa {get_isa()}\n")
    rows, failed = [], []
    for name in names:
        for r in check(name, seed=args.seed, repeat=args.repeat, config=args.config):
            verdicts = " ".join(f"{o}:{'PASS' if res.passed else 'FAIL'}"
                                for o, res in r.report.results.items())
            shape = " ".join(f"{k}={v}" for k, v in r.params.items())
            rows.append((name, r.case, shape, verdicts, f"{r.c_ms:.2f}", f"{r.golden_ms:.1f}",
                         f"{r.speedup:.1f}x"))
            if not r.passed:
                failed.append(r)
            print(_table(rows[-1:]).splitlines()[-1] if len(rows) > 1 else _table(rows), flush=True)
    print("\n" + _table(rows))
    for r in failed:
        print("\n" + str(r))
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m dsv4", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="compare every kernel with its golden")
    c.add_argument("kernels", nargs="*", help="kernel names (default: all)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--repeat", type=int, default=3, help="timing runs per case (median)")
    c.add_argument("--threads", type=int, default=0)
    c.add_argument("--config", default=None, help="preset: demo, flash (default), pro")
    sub.add_parser("list", help="list the kernels")
    args = ap.parse_args(argv)
    if args.cmd == "list":
        for name, k in _kernels.KERNELS.items():
            print(f"{name:28s} {k.__doc__.splitlines()[0][:90]}")
        return 0
    return cmd_check(args)


if __name__ == "__main__":
    sys.exit(main())
