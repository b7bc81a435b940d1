"""Output buffers for goldens, so that a golden, like the C kernel, can write into
pypto-lib's pre-allocated output tensors."""
import functools
import inspect

import numpy as np


def writes_outputs(*names, inouts=()):
    """The decorated golden returns a dict with `names`; it also accepts each name as a
    keyword-only buffer, which is filled in place and returned.

    `inouts` names the arguments the golden updates in place (states, caches). When
    buffers are given, the golden runs on copies of those and the originals are updated
    only after every buffer has been checked, so a bad buffer changes nothing."""
    def deco(fn):
        sig = inspect.signature(fn)
        params = list(sig.parameters.values())
        first_kw = next((i for i, p in enumerate(params) if p.kind == p.KEYWORD_ONLY), len(params))
        bufs = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in names]

        @functools.wraps(fn)
        def golden(*args, **kwargs):
            given = {n: kwargs.pop(n) for n in names if kwargs.get(n) is not None}
            for n in names:
                kwargs.pop(n, None)
            originals = {}
            if given and inouts:
                bound = sig.bind(*args, **kwargs)
                for n in inouts:
                    if isinstance(bound.arguments.get(n), np.ndarray):
                        originals[n] = bound.arguments[n]
                        bound.arguments[n] = originals[n].copy()
                args, kwargs = bound.args, bound.kwargs
            out = fn(*args, **kwargs)
            for n, buf in given.items():
                if not isinstance(buf, np.ndarray) or buf.shape != out[n].shape or buf.dtype != out[n].dtype:
                    raise ValueError(f"{fn.__name__}: output '{n}' must be a {out[n].dtype} array of shape "
                                     f"{out[n].shape}, got {getattr(buf, 'dtype', type(buf).__name__)} "
                                     f"{getattr(buf, 'shape', '')}")
            for n, buf in given.items():
                buf[...] = out[n]
                out[n] = buf
            for n, orig in originals.items():
                np.copyto(orig, out.get(n, bound.arguments[n]))
                if n in out:
                    out[n] = orig
            return out

        golden.__signature__ = sig.replace(parameters=params[:first_kw] + bufs + params[first_kw:])
        golden.outputs = names
        return golden
    return deco
