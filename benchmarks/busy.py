"""dsv4 beside other work: the slowdown a kernel call sees on a busy machine.

    python benchmarks/busy.py [kernel]          (default decode_attention_swa)

Two ratios, each against the same call alone (medians):
  busy        one other process spinning on a core (a second test job, a build)
  neighbour   right after a NumPy golden call in the same process (its BLAS pool
              spins for a while), measured on rms_norm, the shortest kernel
Run it with OMP_WAIT_POLICY=ACTIVE to see what passive waiting saves.
"""
import multiprocessing as mp
import statistics
import sys
import time

import dsv4
from dsv4.check import fresh


def median_ms(kernel, inputs, repeat=15):
    f = dsv4.KERNELS[kernel]
    f(**fresh(kernel, inputs))
    ts = []
    for _ in range(repeat):
        kw = fresh(kernel, inputs)
        t = time.perf_counter()
        f(**kw)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def spin(stop):
    while not stop.is_set():
        pass


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    kernel = argv[0] if argv else "decode_attention_swa"
    inputs = getattr(dsv4.specs, kernel)(seed=0)
    idle = median_ms(kernel, inputs)
    stop = mp.Event()
    p = mp.Process(target=spin, args=(stop,))
    p.start()
    time.sleep(0.5)
    try:
        busy = median_ms(kernel, inputs)
    finally:
        stop.set()
        p.join()
    r = dsv4.specs.rms_norm(seed=0)
    alone = median_ms("rms_norm", r, 50)
    m = dsv4.specs.moe(seed=0)
    dsv4.golden.moe(**m)
    del m
    after = median_ms("rms_norm", r, 50)
    print(f"{kernel}, {dsv4.get_num_threads()} threads: idle {idle:.2f} ms, one core busy "
          f"{busy:.2f} ms ({busy / idle:.1f}x)")
    print(f"rms_norm alone {alone:.3f} ms, after a NumPy golden {after:.3f} ms ({after / alone:.1f}x)")


if __name__ == "__main__":
    main()
