"""The multi-layer forward: time, per-layer agreement and peak memory.

    python benchmarks/forward.py demo [--decode] [--prefill] [--golden]
    python benchmarks/forward.py flash DIR [--layers 4] [--experts 32] [--prefill]

demo: the DEMO config's 8 layers (dsv4.specs.decode_fwd / prefill_fwd, 2 ranks x 4 local
experts): C and, with --golden, the NumPy golden; each C layer's x_next checked with the
layer comparator against the golden layer on the same input (dsv4.forward.each_layer),
and against the chained golden forward.

flash: the first --layers layers of FLASH (default 4: SWA, SWA, CSA, HCA) with 2 ranks x
--experts local experts, every layer's tensors written once to DIR as raw files (about
1.7 GB per layer at 32 experts) and read back as np.memmap through layer_weights, so only
the layer being run is mapped. Reports the time of each layer (the C decode_layer /
prefill_layer call), the whole forward, and the peak resident memory of the process.
"""
import argparse
import inspect
import json
import os
import resource
import sys
import time

import numpy as np

import dsv4
from dsv4 import forward as F
from dsv4.specs.forward import _head, _layer_seed


def fresh(kern, d):
    """Copies of the caches the forward updates; the weights (gigabytes) are shared."""
    inouts = getattr(dsv4, kern).inouts
    return {k: (v.copy() if k in inouts else v) for k, v in d.items()}


def peak_rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def demo(args):
    for kern in [k for k, on in (("decode_fwd", args.decode), ("prefill_fwd", args.prefill))
                 if on]:
        t = time.perf_counter()
        build = getattr(dsv4.specs, kern)
        d = (build(1000, n_local_experts=4, config="demo") if kern == "decode_fwd"
             else build((128,), n_local_experts=4, config="demo"))
        print(f"{kern}: inputs built in {time.perf_counter() - t:.1f} s", flush=True)
        runs = {}
        for name, fn in (("C", getattr(dsv4, kern)),
                         *((("golden", getattr(dsv4.golden, kern)),) if args.golden else ())):
            t = time.perf_counter()
            runs[name] = fn(**fresh(kern, d), config="demo", stages=True)
            print(f"  {name}: {time.perf_counter() - t:.2f} s", flush=True)
        if "golden" in runs:
            layer = kern.replace("_fwd", "_layer")
            cmp = dsv4.specs.COMPARATORS[layer]["x_next"]
            meta = {} if kern == "decode_fwd" else dsv4.prefill_metadata(
                (128,), layer_id=0, config="demo")
            cx = runs["C"]["stages"]["x_next"]
            # each golden layer on the C forward's input to it, and the chained outputs
            own = dsv4.forward.each_layer(kern, d, cx, golden=True, config="demo")
            for L in range(cx.shape[0]):
                for what, want in (("own input", own[L]),
                                   ("chained", runs["golden"]["stages"]["x_next"][L])):
                    r = cmp(cx[L], want, name=f"x_next[{L}] {what}", inputs=meta)
                    print(f"  layer {L}: {' '.join(r.message.splitlines()[0].split()[:4])} "
                          f"{r.message.splitlines()[2].strip()}")
            name = "hidden_out" if kern == "decode_fwd" else "x_out"
            r = dsv4.specs.COMPARATORS[kern][name](runs["C"][name], runs["golden"][name],
                                                    name=name, inputs=meta)
            print(f"  {r.message.splitlines()[0]}")


def write_layers(dirname, kern, n, experts, prefill):
    """Layer L's per-layer tensors as DIR/<kern>/<L>/<name>.raw plus an index; built one
    layer at a time so only one is ever in memory."""
    root = os.path.join(dirname, kern)
    index_path = os.path.join(root, "index.json")
    if os.path.exists(index_path):
        return root, json.load(open(index_path))
    shared_names = F._SHARED_PREFILL if prefill else F._SHARED_DECODE
    skip = set(shared_names) | set(F._PREFILL_META) | {"x_hc", "layer_id"}
    index, shared = {}, None
    for L, _, _ in F.schedule(n, "flash"):
        t = time.perf_counter()
        d = (dsv4.specs.prefill_layer(L, (128,), n_local_experts=experts,
                                      seed=_layer_seed(0, L), config="flash") if prefill else
             dsv4.specs.decode_layer(8192, L, n_local_experts=experts, seed=_layer_seed(0, L),
                                     config="flash"))
        os.makedirs(os.path.join(root, str(L)), exist_ok=True)
        for name, a in d.items():
            if name in skip or not isinstance(a, np.ndarray):
                continue
            np.ascontiguousarray(a).tofile(os.path.join(root, str(L), name + ".raw"))
            index.setdefault(str(L), {})[name] = (str(a.dtype), list(a.shape))
        if shared is None:
            shared = {k: d[k] for k in (*shared_names, "x_hc")}
            np.savez(os.path.join(root, "shared.npz"),
                     **{k: v.view(f"u{v.dtype.itemsize}") if v.dtype.kind == "V" or
                        str(v.dtype) == "bfloat16" else v for k, v in shared.items()})
            index["shared"] = {k: (str(v.dtype), list(v.shape)) for k, v in shared.items()}
        del d
        print(f"  layer {L} written in {time.perf_counter() - t:.1f} s", flush=True)
    json.dump(index, open(index_path, "w"))
    return root, index


def _dtype(name):
    import ml_dtypes
    return np.dtype(getattr(ml_dtypes, name) if hasattr(ml_dtypes, name) else name)


def flash(args):
    kern = "prefill_fwd" if args.prefill else "decode_fwd"
    print(f"{kern}: FLASH, {args.layers} layers, 2 ranks x {args.experts} experts", flush=True)
    root, index = write_layers(args.dir, kern, args.layers, args.experts, args.prefill)
    sh = np.load(os.path.join(root, "shared.npz"))
    shared = {k: sh[k].view(_dtype(index["shared"][k][0])) for k in index["shared"]}
    size = sum(os.path.getsize(os.path.join(root, L, f)) for L in index if L != "shared"
               for f in os.listdir(os.path.join(root, L)))
    print(f"  {size / 2**30:.2f} GiB of per-layer tensors on disk; peak RSS before the "
          f"forward {peak_rss_gib():.2f} GiB", flush=True)

    def layer_weights(L):
        return {name: np.memmap(os.path.join(root, str(L), name + ".raw"), dtype=_dtype(dt),
                                mode="r+", shape=tuple(shape))
                for name, (dt, shape) in index[str(L)].items()}

    times = []
    layer = dsv4.prefill_layer if args.prefill else dsv4.decode_layer

    def timed_layer(**kw):
        t = time.perf_counter()
        out = layer(**kw)
        times.append(time.perf_counter() - t)
        return out
    timed_layer.__signature__ = inspect.signature(layer)     # the driver reads the names
    ops = (timed_layer, dsv4.hc_head, dsv4.rms_norm, dsv4.lm_head)
    extra = {}
    if args.prefill:
        extra = {"chunk_lens": np.array([128])}
    R = shared["x_hc"].shape[0]
    head = _head(R, 0, dsv4.get_config("flash"))
    given = {**{k: v for k, v in shared.items() if k != "x_hc"}, **head, **extra}
    t = time.perf_counter()
    out = F.run(kern, ops, shared["x_hc"], given, layers=args.layers, layer_weights=layer_weights,
                stacked_layers=None, rope="pypto", lm_head_weight=None, stages=False,
                config="flash", prefill=args.prefill)
    total = time.perf_counter() - t
    name = "x_out" if args.prefill else "hidden_out"
    print(f"  {name} {out[name].shape}, finite: {bool(np.isfinite(out[name].astype(np.float32)).all())}")
    for (L, kind, _), s in zip(F.schedule(args.layers, "flash"), times):
        print(f"  layer {L} ({kind.upper()}): {s * 1e3:.0f} ms")
    print(f"  forward {total:.2f} s (layers {sum(times):.2f} s); peak RSS {peak_rss_gib():.2f} GiB")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    d = sub.add_parser("demo")
    d.add_argument("--decode", action="store_true")
    d.add_argument("--prefill", action="store_true")
    d.add_argument("--golden", action="store_true", help="also run and compare the golden")
    f = sub.add_parser("flash")
    f.add_argument("dir")
    f.add_argument("--layers", type=int, default=4)
    f.add_argument("--experts", type=int, default=32)
    f.add_argument("--prefill", action="store_true")
    args = ap.parse_args(argv)
    if args.what == "demo":
        if not (args.decode or args.prefill):
            args.decode = args.prefill = True
        demo(args)
    else:
        flash(args)


if __name__ == "__main__":
    sys.exit(main())
