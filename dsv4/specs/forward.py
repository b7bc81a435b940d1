"""Inputs of the multi-layer forward (spec chapter 06 §10.2, §10.3): every layer's tensors
drawn by the layer builders (dsv4.specs.decode_layer / prefill_layer) at their own seed,
stacked along axis 1 as pypto-lib's forward drivers take them, plus the head weights.

Unlike pypto-lib's smoke fixture, each layer's caches and states are its own draws (not
one pool tiled over the layers) and the prefill metadata is the packed layer's own
(dsv4.prefill_metadata per kind), so the forward is a golden comparison, not a smoke run.
"""
import numpy as np

from ..compare import ratio_reldiff
from ..config import DECODE_START_POS, get_config
from ..forward import _PREFILL_META, _SHARED_DECODE, _SHARED_PREFILL, _group, schedule
from ..golden.numerics import bf16_rne
from . import layers as _layers
from . import mtp as _mtp
from .hc import HC_BASE, HC_SCALE
from .layers import _rank_seed, _rep
from ._common import normal


def _layer_seed(seed, L):
    return _rank_seed(seed, 1000 + L) if L else int(seed)


def _head(R, seed, c):
    """hc_head_fn N(0,1) 0.0519, pypto-lib's head scale and base, final_norm_w 1 + 0.1 N
    (bf16); replicated over the ranks."""
    HC = c.hc_mult
    return {"hc_head_fn": _rep(normal(seed, "hc_head_fn", (HC, c.hc_dim)) * np.float32(0.0519), R),
            "hc_head_scale": _rep(HC_SCALE[:1], R),
            "hc_head_base": _rep(HC_BASE[:HC], R),
            "final_norm_w": _rep(bf16_rne(1 + np.float32(0.1) * normal(
                seed, "final_norm_w", (c.hidden_size,))), R)}


def _stack(build, sched, shared, skip=()):
    """The layers' dicts (build(L)) stacked along axis 1, one layer in memory at a time:
    every-layer tensors over all layers, csa_* / hca_* over that kind's layers (one
    stand-in block, layer 0's, when the layers have none of that kind)."""
    out = {}
    for L, _, _ in sched:
        d = build(L)
        if L == sched[0][0]:
            out["x_hc"] = d["x_hc"]
            out.update({n: d[n] for n in shared})
        for name, a in d.items():
            if name in shared or name in skip or name in ("layer_id", "x_hc") \
                    or not isinstance(a, np.ndarray):
                continue
            g = _group(name)
            Ls = [M for M, k, _ in sched if g == "fwd" or k == g] or [sched[0][0]]
            if L not in Ls:
                continue
            n = a.shape[1]
            if name not in out:
                out[name] = np.empty((a.shape[0], len(Ls) * n, *a.shape[2:]), a.dtype)
            j = Ls.index(L)
            out[name][:, j * n:(j + 1) * n] = a
        del d
    return out


def decode_fwd(start_pos=DECODE_START_POS, layers=None, *, n_ranks=2, n_local_experts=None,
               seed=0, config=None):
    """Stacked inputs of `layers` layers (default all of the config) at start_pos: layer L
    from dsv4.specs.decode_layer(start_pos, L, seed = a seed derived from (seed, L));
    metadata, tables, x_hc and input_ids from layer 0 (the same for every layer at one
    start_pos); the head weights of §10.3."""
    c = get_config(config)
    sched = schedule(layers, c)
    out = _stack(lambda L: _layers.decode_layer(start_pos, L, n_ranks=n_ranks,
                                                n_local_experts=n_local_experts,
                                                seed=_layer_seed(seed, L), config=c),
                 sched, _SHARED_DECODE)
    out.update(_head(n_ranks, seed, c))
    return out


def prefill_fwd(chunk_lens=(128,), start_positions=None, layers=None, *, n_ranks=2,
                n_local_experts=None, seed=0, config=None):
    """Stacked inputs of `layers` layers for a packed batch: layer L from
    dsv4.specs.prefill_layer(L, chunk_lens, start_positions, seed derived from (seed, L));
    x_hc, input_ids and the tables from layer 0; chunk_lens and start_positions as given
    (the forward computes each kind's metadata); the head weights of §10.3."""
    c = get_config(config)
    sched = schedule(layers, c)
    out = _stack(lambda L: _layers.prefill_layer(L, chunk_lens, start_positions, n_ranks=n_ranks,
                                                 n_local_experts=n_local_experts,
                                                 seed=_layer_seed(seed, L), config=c),
                 sched, _SHARED_PREFILL, skip=_PREFILL_META)
    out["chunk_lens"] = np.asarray(chunk_lens, np.int64)
    out["start_positions"] = (None if start_positions is None
                              else np.asarray(start_positions, np.int64))
    out.update(_head(n_ranks, seed, c))
    return out


# pypto-lib has no golden for the forward: its output gets the layers' x_next budget
# (§5.4, §6.9), which each layer's output (the x_next stage) must meet too
_X_NEXT = ratio_reldiff(diff_thd=0.01, pct_thd=0.05)
# the caches get the layers' comparators for them, the logits the LM head's
COMPARATORS = {
    "decode_fwd": {"hidden_out": _X_NEXT, "logits": _mtp.COMPARATORS["lm_head"]["logits"],
                   **{n: c for n, c in _layers.COMPARATORS["decode_layer"].items()
                      if n != "x_next"}},
    "prefill_fwd": {"x_out": _layers.packed_valid_rows(_X_NEXT),
                    "logits": _layers.packed_valid_rows(_mtp.COMPARATORS["lm_head"]["logits"]),
                    **{n: c for n, c in _layers.COMPARATORS["prefill_layer"].items()
                       if n != "x_next"}},
}
# the first four layers (SWA, SWA, CSA, HCA) of the config, 2 ranks x 4 local experts
CASES = {
    "decode_fwd": {"4 layers": dict(layers=4, n_local_experts=4)},
    "prefill_fwd": {"4 layers": dict(chunk_lens=(128,), layers=4, n_local_experts=4)},
}
