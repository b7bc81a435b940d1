"""Python faces of the C kernels, derived from the C kernel table.

dsv4._C.kernel_table() is the one source of truth for each kernel's
arguments: names, dtypes, symbolic shapes, which are outputs, which scalars
come from the model config. From it every dsv4.<kernel> gets an
introspectable signature and a docstring.

Every kernel also takes DLPack tensors (torch CPU tensors included) and
gives torch tensors back when given torch tensors; torch is never imported
here, only recognised when the caller has imported it.
"""
import functools
import inspect
import sys

import ml_dtypes
import numpy as np

from . import _C
from .config import get_config

P = inspect.Parameter

# NumPy's DLPack import has no bf16/fp8: those cross as same-width integers
_TORCH_AS_INT = {"bfloat16": ("int16", ml_dtypes.bfloat16),
                 "float8_e4m3fn": ("uint8", ml_dtypes.float8_e4m3fn),
                 "float8_e5m2": ("uint8", ml_dtypes.float8_e5m2)}
_INT_OF = {np.dtype(t): (np.dtype(i), name) for name, (i, t) in _TORCH_AS_INT.items()}


def _foreign(v):
    return hasattr(v, "__dlpack__") and not isinstance(v, (np.ndarray, np.generic))


def _as_numpy(name, v, torch):
    """A NumPy view (no copy) of the DLPack tensor `v`."""
    if torch is not None and isinstance(v, torch.Tensor):
        if v.device.type != "cpu":
            raise TypeError(f"argument '{name}' must be a CPU tensor, got one on {v.device}")
        v = v.detach()      # same storage; DLPack refuses tensors that require grad
        as_int = _TORCH_AS_INT.get(str(v.dtype).removeprefix("torch."))
        if as_int is not None:
            return np.from_dlpack(v.view(getattr(torch, as_int[0]))).view(as_int[1])
    try:
        return np.from_dlpack(v)
    except (BufferError, RuntimeError, TypeError, ValueError) as e:
        raise TypeError(f"argument '{name}': cannot be read through DLPack ({e})") from None


def _to_torch(a, torch):
    as_int = _INT_OF.get(a.dtype)
    if as_int is not None:
        return torch.from_numpy(a.view(as_int[0])).view(getattr(torch, as_int[1]))
    return torch.from_numpy(a)


def dlpack_io(fn):
    """Let `fn` take DLPack tensors for its array arguments.

    Each one is read as a NumPy view of the same memory (bf16/fp8 torch
    tensors through int16/uint8), so in-place updates reach the caller's
    tensor. If any argument is a torch tensor, arrays in the result come
    back as torch tensors: an argument returned (an InOut, or an output
    buffer passed in) as the caller's own object, the rest as tensors
    sharing the NumPy result's memory.
    """
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not any(map(_foreign, args)) and not any(map(_foreign, kwargs.values())):
            return fn(*args, **kwargs)
        torch = sys.modules.get("torch")
        bound = sig.bind(*args, **kwargs)
        given, torch_in = {}, False
        for name, v in bound.arguments.items():
            if _foreign(v):
                a = _as_numpy(name, v, torch)
                given[id(a)] = (a, v)       # the array is kept alive so its id stays unique
                bound.arguments[name] = a
                torch_in = torch_in or (torch is not None and isinstance(v, torch.Tensor))
        out = fn(*bound.args, **bound.kwargs)
        if not torch_in:
            return out

        def back(x):
            if isinstance(x, dict):
                return {k: back(y) for k, y in x.items()}
            if isinstance(x, np.ndarray):
                return given[id(x)][1] if id(x) in given else _to_torch(x, torch)
            return x
        return back(out)

    return call


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

    def arguments(args, kwargs):
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as err:            # name the kernel, as the C checks do
            raise TypeError(f"{row['name']}: {err}") from None
        kw = {k: v for k, v in bound.arguments.items()
              if v is not None and k not in ("config", "stages")}
        if from_config_any:
            cfg = get_config(bound.arguments.get("config"))
            kw.update((name, getattr(cfg, name)) for name in from_config)
            for name in per_layer:        # e.g. compress_ratio = compress_ratios[layer_id]
                values, i = getattr(cfg, name + "s"), kw.get("layer_id")
                ok = isinstance(i, (int, np.integer)) and 0 <= i < len(values)
                kw[name] = int(values[i]) if ok else -1     # the kernel names a bad layer_id
        return bound, kw

    @functools.wraps(raw)
    def kernel(*args, **kwargs):
        bound, kw = arguments(args, kwargs)
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
    lines += ["", "Arrays may also be DLPack tensors; given torch CPU tensors, it returns torch tensors",
              "(no copies where the layout allows; InOut tensors are updated in place)."]
    lines += ["", f"The NumPy golden is dsv4.golden.{row['name']}; inputs: dsv4.specs.{row['name']}."]
    kernel.__doc__ = "\n".join(lines)
    kernel.__signature__ = sig
    kernel.__name__ = kernel.__qualname__ = row["name"]
    kernel.__module__ = "dsv4"
    kernel.outputs = tuple(a["name"] for a in outs)
    kernel.inouts = tuple(a["name"] for a in inouts)
    kernel.stages = tuple(stage_names)

    def validate(*args, **kwargs):
        """Raise what the call would raise for these arguments; compute and write nothing."""
        raw(**arguments(args, kwargs)[1], _check_only=True)
    kernel.validate = validate
    return dlpack_io(kernel)


TABLE = {row["name"]: row for row in _C.kernel_table()}
KERNELS = {name: _make(row) for name, row in TABLE.items() if not row["internal"]}
CORE = {name: _make(row) for name, row in TABLE.items() if row["internal"]}
