"""Goldens of the multi-layer forward (spec chapter 06 §10): dsv4.forward's driver over
the golden layers, hc_head, rms_norm and lm_head (the schedule and the stacked layout
are described in dsv4.forward)."""
from .. import forward as _forward


def _ops():
    from .hc import hc_head
    from .layers import decode_layer
    from .mtp import lm_head
    from .qkv import rms_norm
    return decode_layer, hc_head, rms_norm, lm_head


def _prefill_ops():
    from .layers import prefill_layer
    return (prefill_layer, *_ops()[1:])


decode_fwd = _forward.make("decode_fwd", _ops, _forward.DECODE_DOC
                           + "\n    NumPy golden: every layer is dsv4.golden.decode_layer.", __name__)
prefill_fwd = _forward.make("prefill_fwd", _prefill_ops, _forward.PREFILL_DOC
                            + "\n    NumPy golden: every layer is dsv4.golden.prefill_layer.", __name__)
