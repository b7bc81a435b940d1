"""python -m dsv4 check [kernel ...]: the golden check of every kernel.

For each kernel and each of its deployment cases: build seeded inputs, run
the C kernel and the NumPy golden, compare every output with pypto-lib's
comparator, print one table (or, with --json, a list of records). Progress
goes to stderr. Exit status: 0 all passed, 1 a case failed, 2 bad usage.

python -m dsv4 golden PATH --kernel NAME: compute the outputs of a pypto-lib case
directory (in/*.pt) with dsv4 and write out/*.pt, so a pypto-lib run can skip its
torch golden.
"""
import argparse
import fnmatch
import json
import os
import sys

from . import _kernels, get_isa, get_num_threads, set_num_threads
from .case import add_golden_parser, run_golden
from .check import DRIVERS, KNOWN, cases, check

# the golden's BLAS threads spin for a while after a call; the C kernel is timed after
# they have gone idle, or it would be measuring the scheduler
SETTLE_S = 0.2


def _table(head, rows, right=()):
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]

    def line(r):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([line(head), line(tuple("-" * w for w in widths))] + [line(r) for r in rows])


def _outputs(report):
    res = report.results
    if not res:
        return "nothing compared"
    failed, warned = report.failed, report.warned
    parts = [f"{len(res) - len(failed)}/{len(res)} pass"]
    if failed:
        parts.append("FAIL " + " ".join(failed))
    if warned:
        parts.append("WARN " + " ".join(warned))
    return "; ".join(parts)


def _verdict(r):
    return "FAIL" if not r.passed else ("WARN" if r.report.warned else "PASS")


class _Progress:
    """One line on stderr: rewritten in place on a terminal, one line per case otherwise."""

    def __init__(self, total, quiet):
        self.total, self.on = total, not quiet and total > 1
        self.tty = sys.stderr.isatty()

    def __call__(self, i, text):
        if not self.on:
            return
        msg = f"[{i}/{self.total}] {text}"
        if self.tty:
            sys.stderr.write("\r\x1b[K" + msg)
        else:
            sys.stderr.write(msg + "\n")
        sys.stderr.flush()

    def done(self):
        if self.on and self.tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _plan(args, ap):
    names = [n for group in (args.kernels or []) + (args.kernel or []) for n in group.split(",") if n]
    names = list(dict.fromkeys(names)) or list(KNOWN)
    unknown = [n for n in names if n not in KNOWN]
    if unknown:
        ap.error(f"unknown kernel(s): {', '.join(unknown)}; known: {', '.join(KNOWN)}")
    patterns = [p for group in args.case or [] for p in group.split(",") if p]
    plan = [(k, c) for k in names for c in cases(k)
            if not patterns or any(fnmatch.fnmatchcase(c, p) for p in patterns)]
    if not plan:
        have = sorted({c for k in names for c in cases(k)})
        ap.error(f"no case matches --case {' '.join(patterns)}; the cases of the chosen kernels: "
                 f"{', '.join(have)}")
    return plan


def cmd_check(args, ap):
    plan = _plan(args, ap)
    if args.threads:
        set_num_threads(args.threads)
    if not args.json:
        print(f"dsv4 check: seed {args.seed}, {get_num_threads()} threads, isa {get_isa()}, "
              f"config {args.config or 'flash'}; {len(plan)} case(s)\n"
              f"times in ms: median of {args.repeat} timed run(s) after 1 warm-up run\n", flush=True)
    progress = _Progress(len(plan), args.quiet)
    results = []
    for i, (name, case) in enumerate(plan, 1):
        progress(i, f"{name} {case} ...")
        r = check(name, case, seed=args.seed, repeat=args.repeat, warmup=1, config=args.config,
                  settle=SETTLE_S)[0]
        results.append(r)
        progress(i, f"{name} {case} {_verdict(r)} C {r.c_ms:.2f} ms, golden {r.golden_ms:.1f} ms")
    progress.done()
    failed = [r for r in results if not r.passed]
    if args.json:
        # one record per line: greppable, and still one JSON document
        print("[\n" + ",\n".join(json.dumps(r.record()) for r in results) + "\n]")
        return 1 if failed else 0
    head = ("kernel", "case", "params", "result", "outputs", "C ms", "golden ms", "golden/C")
    rows = [(r.kernel, r.case, " ".join(f"{k}={v}" for k, v in r.params.items()), _verdict(r),
             _outputs(r.report), f"{r.c_ms:.2f}", f"{r.golden_ms:.1f}", f"{r.speedup:.1f}x")
            for r in results]
    print(_table(head, rows, right=(5, 6, 7)))
    warned = [r for r in results if r.passed and r.report.warned]
    for r in failed + warned:
        print("\n" + str(r))
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed"
          + (f" ({len(warned)} with warnings)" if warned else ""))
    return 1 if failed else 0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m dsv4", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="compare every kernel with its golden",
                       description="Compare every kernel (or the chosen ones) with its golden. "
                                   "Exit status 0: all passed, 1: a case failed, 2: bad usage.")
    c.add_argument("kernels", nargs="*", help="kernel names (default: all)")
    c.add_argument("--kernel", "-k", action="append", metavar="NAME",
                   help="a kernel to check (repeatable, or comma-separated)")
    c.add_argument("--case", "-c", action="append", metavar="PATTERN",
                   help="only the cases of this name or glob, e.g. decode or 'prefill*' (repeatable)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--repeat", type=int, default=3, help="timed runs per case, after one warm-up (median)")
    c.add_argument("--threads", type=int, default=0)
    c.add_argument("--config", default=None, help="preset: demo, flash (default), pro")
    c.add_argument("--json", action="store_true",
                   help="print a JSON list of per-case records instead of the table")
    c.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")
    sub.add_parser("list", help="list the kernels")
    add_golden_parser(sub)
    args = ap.parse_args(argv)
    if args.cmd == "golden":
        return run_golden(args)
    if args.cmd == "list":
        for name, k in {**_kernels.KERNELS, **DRIVERS}.items():
            print(f"{name:28s} {k.__doc__.splitlines()[0][:90]}")
        return 0
    if args.repeat < 1:
        c.error(f"--repeat must be >= 1, got {args.repeat}")
    return cmd_check(args, c)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:     # the reader left early (| head): not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
