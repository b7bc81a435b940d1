"""Output buffers for goldens, so that a golden, like the C kernel, can write into
pypto-lib's pre-allocated output tensors."""
import functools
import inspect

import numpy as np


def writes_outputs(*names):
    """The decorated golden returns a dict with `names`; it also accepts each name as a
    keyword-only buffer, which is filled in place and returned."""
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
            out = fn(*args, **kwargs)
            for n, buf in given.items():
                if not isinstance(buf, np.ndarray) or buf.shape != out[n].shape or buf.dtype != out[n].dtype:
                    raise ValueError(f"{fn.__name__}: output '{n}' must be a {out[n].dtype} array of shape "
                                     f"{out[n].shape}, got {getattr(buf, 'dtype', type(buf).__name__)} "
                                     f"{getattr(buf, 'shape', '')}")
                buf[...] = out[n]
                out[n] = buf
            return out

        golden.__signature__ = sig.replace(parameters=params[:first_kw] + bufs + params[first_kw:])
        golden.outputs = names
        return golden
    return deco
