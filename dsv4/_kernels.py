"""Python faces of the C kernels, derived from the C kernel table.

dsv4._C.kernel_table() is the one source of truth for each kernel's
arguments: names, dtypes, symbolic shapes, which are outputs, which scalars
come from the model config. From it every dsv4.<kernel> gets an
introspectable signature and a docstring.
"""
import functools
import inspect

import numpy as np

from . import _C
from .config import get_config

P = inspect.Parameter


def _describe(arg):
    return f"{arg['dtype']} [{arg['dims'].replace(',', ', ')}]"


def _make(row):
    raw = getattr(_C, row["name"])
    ins = [a for a in row["args"] if a["role"] not in ("out", "stage")]
    outs = [a for a in row["args"] if a["role"] == "out"]
    inouts = [a for a in row["args"] if a["role"] == "inout"]
    stage_names = [a["name"] for a in row["args"] if a["role"] == "stage"]
    from_config = [s["name"] for s in row["scalars"] if s["from_config"] and not s["per_layer"]]
    per_layer = [s["name"] for s in row["scalars"] if s["per_layer"]]
    user_scalars = [s for s in row["scalars"] if not s["from_config"]]
    from_config_any = from_config + per_layer

    params = [P(a["name"], P.POSITIONAL_OR_KEYWORD) for a in ins if not a["optional"]]
    params += [P(a["name"], P.POSITIONAL_OR_KEYWORD, default=None) for a in ins if a["optional"]]
    params += [P(s["name"], P.POSITIONAL_OR_KEYWORD,
                 default=s["default"] if s["has_default"] else P.empty) for s in user_scalars]
    params += [P(a["name"], P.KEYWORD_ONLY, default=None) for a in outs]
    if from_config_any:
        params.append(P("config", P.KEYWORD_ONLY, default=None))
    if stage_names:
        params.append(P("stages", P.KEYWORD_ONLY, default=False))
    sig = inspect.Signature(params)

    @functools.wraps(raw)
    def kernel(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        kw = {k: v for k, v in bound.arguments.items()
              if v is not None and k not in ("config", "stages")}
        if from_config_any:
            cfg = get_config(bound.arguments.get("config"))
            kw.update((name, getattr(cfg, name)) for name in from_config)
            for name in per_layer:        # e.g. compress_ratio = compress_ratios[layer_id]
                values, i = getattr(cfg, name + "s"), kw.get("layer_id")
                ok = isinstance(i, (int, np.integer)) and 0 <= i < len(values)
                kw[name] = int(values[i]) if ok else -1     # the kernel names a bad layer_id
        out = raw(**kw)
        if stage_names:
            # the kernel writes its intermediates either way: the same bits with or without
            st = {name: out.pop(name) for name in stage_names}
            if bound.arguments.get("stages"):
                out["stages"] = st
        return out

    lines = [row["doc"], "", "Parameters", "----------"]
    for a in ins:
        note = {"unused": " (optional, not read)", "inout": " (updated in place)"}.get(a["role"], "")
        flat = "; any shape with that many elements" if a["flat"] else ""
        lines.append(f"{a['name']} : {_describe(a)}{flat}{note}")
    for s in user_scalars:
        lines.append(f"{s['name']} : {s['type']}" + (f", default {s['default']}" if s["has_default"] else ""))
    if from_config:
        lines += ["config : str or DeepSeekV4Config, default 'flash'",
                  f"    Supplies {', '.join(from_config)}."]
    for a in outs:
        lines.append(f"{a['name']} : {_describe(a)}, optional")
    lines.append("    Output buffers to write in place (as pypto-lib's goldens do); allocated if not given.")
    lines += ["", "Returns", "-------", "dict"]
    lines += [f"    {a['name']} : {_describe(a)}" for a in outs]
    lines += [f"    {a['name']} : the argument itself, updated" for a in inouts]
    if stage_names:
        lines += ["    stages : dict, with stages=True: the intermediates "
                  + ", ".join(stage_names)]
    lines += ["", f"The NumPy golden is dsv4.golden.{row['name']}; inputs: dsv4.specs.{row['name']}."]
    kernel.__doc__ = "\n".join(lines)
    kernel.__signature__ = sig
    kernel.__name__ = kernel.__qualname__ = row["name"]
    kernel.__module__ = "dsv4"
    kernel.outputs = tuple(a["name"] for a in outs)
    kernel.inouts = tuple(a["name"] for a in inouts)
    kernel.stages = tuple(stage_names)
    return kernel


TABLE = {row["name"]: row for row in _C.kernel_table()}
KERNELS = {name: _make(row) for name, row in TABLE.items() if not row["internal"]}
CORE = {name: _make(row) for name, row in TABLE.items() if row["internal"]}
