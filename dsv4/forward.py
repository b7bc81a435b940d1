"""The multi-layer forward (spec chapter 06 §10): every decoder layer of the schedule, then
hc_head and the final RMSNorm, and optionally the LM head.

    decode_fwd    one decode step through layers 0 .. n-1 (decode_layer each)
    prefill_fwd   a packed batch of prefill chunks through layers 0 .. n-1 (prefill_layer each)

dsv4.decode_fwd runs each layer as one C call (dsv4.decode_layer, GIL released) and
dsv4.golden.decode_fwd each as the NumPy golden layer; this module holds the schedule
and the driver both share. Layer L's kind is config.compress_ratios[L] (0 SWA, 4 CSA,
128 HCA; FLASH: SWA, SWA, then CSA and HCA alternating, CSA last), and its MoE uses
layer_id = L (hash routing below num_hash_layers).

Weights, caches and states come in pypto-lib's stacked layout (§10.2): a per-layer
tensor [R, X, ...] of decode_layer / prefill_layer is stacked as [R, n X, ...] along its
first axis after the rank axis: n = the stacked layers for the tensors every layer has,
the number of CSA (HCA) layers among them for the csa_* (hca_*) tensors and idx_kv_cache;
layer L uses block L, resp. its ordinal among the CSA (HCA) layers. The stacks hold the
first `stacked_layers` layers of the schedule (default: hc_attn_scale's length / 3,
i.e. every layer the stack was built for), so a prefix of the model can be stacked alone.
Metadata, block tables, RoPE tables and input_ids are shared by every layer.

Instead of (or on top of) stacks, `layer_weights(L)` may return layer L's own tensors in
decode_layer / prefill_layer's names and shapes ([R, X, ...], e.g. np.memmap views of
one file per layer): then only one layer's weights need to be in memory at a time. It is
called once per layer to check shapes before anything runs, and once to run it, so it
should be cheap (open a memmap, do not read it).

A call that raises changes no cache or state: before the first layer runs, each layer's
tensors are checked against those of the first layer of its kind, and that layer's
arguments are checked by the C kernel's own validation (slot mappings, block tables,
positions, shapes), without computing anything.

RoPE (§10.4.1): rope="pypto" (default) feeds freqs_cos / freqs_sin to every layer, as
pypto-lib's forward drivers and decode_layer fixtures do; rope="model" gives the CSA and
HCA layers the compress tables (dsv4.rope_tables(config, ratio), YaRN) of as many rows,
as the model and the standalone blocks do.
"""
import inspect

import numpy as np

from .config import get_config
from .layers import KINDS, prefill_metadata
from .rope import rope_tables

ROPE = ("pypto", "model")

# shared by every layer: metadata, tables and ids (the slot mappings and block tables
# carry hca_ / csa_ prefixes but are not per-layer)
_SHARED_DECODE = ("freqs_cos", "freqs_sin", "block_table", "ori_slot_mapping",
                  "hca_cmp_slot_mapping", "hca_state_slot_mapping", "csa_cmp_slot_mapping",
                  "csa_idx_slot_mapping", "csa_state_slot_mapping",
                  "csa_inner_state_slot_mapping", "position_ids", "kv_seq_lens",
                  "hca_compress_state_block_table", "csa_compress_state_block_table",
                  "csa_inner_compress_state_block_table", "cmp_block_table", "idx_block_table",
                  "input_ids")
# prefill: the packed metadata is computed per kind from the batch (dsv4.prefill_metadata)
_PREFILL_META = ("seq_lens", "chunk_lens", "chunk_offsets", "chunk_tile_offsets",
                 "position_ids", "ori_slot_mapping", "cmp_sparse_indices", "cmp_sparse_lens",
                 "hca_cmp_slot_mapping", "hca_state_slot_mapping", "csa_cmp_slot_mapping",
                 "csa_idx_slot_mapping", "csa_state_slot_mapping",
                 "csa_inner_state_slot_mapping")
_SHARED_PREFILL = ("freqs_cos", "freqs_sin", "ori_block_table", "cmp_block_table",
                   "idx_block_table", "hca_compress_state_block_table",
                   "csa_compress_state_block_table", "csa_inner_compress_state_block_table",
                   "input_ids")
_HEAD = ("hc_head_fn", "hc_head_scale", "hc_head_base", "final_norm_w")


def _group(name):
    """'csa', 'hca' or 'fwd': the stack a per-layer tensor belongs to."""
    if name.startswith("csa_") or name == "idx_kv_cache":
        return "csa"
    if name.startswith("hca_"):
        return "hca"
    return "fwd"


def schedule(n_layers=None, config=None):
    """[(L, kind, ordinal)] for layers 0 .. n_layers - 1 (default all of the config):
    ordinal = L for SWA, else the layer's index among the CSA (HCA) layers, i.e. its
    block in the csa_* (hca_*) stacks."""
    cfg = get_config(config)
    n = cfg.num_hidden_layers if n_layers is None else int(n_layers)
    if not 1 <= n <= cfg.num_hidden_layers:
        raise ValueError(f"layers = {n_layers} must be in [1, {cfg.num_hidden_layers}] (the "
                         f"hidden layers of {cfg.name})")
    count = {"csa": 0, "hca": 0}
    out = []
    for L in range(n):
        ratio = cfg.compress_ratios[L]
        if ratio not in KINDS:
            raise ValueError(f"layer {L} of {cfg.name} has compress ratio {ratio}; only 0, 4 "
                             f"and 128 have attention blocks")
        kind = KINDS[ratio]
        if kind == "swa":
            out.append((L, kind, L))
        else:
            out.append((L, kind, count[kind]))
            count[kind] += 1
    return out


class _Layers:
    """Layer L's tensors from the stacks and layer_weights."""

    def __init__(self, kern, names, stacked, layer_weights, stacked_layers, cfg):
        self.kern, self.names, self.stacked, self.lazy = kern, names, stacked, layer_weights
        self.cfg = cfg
        if stacked_layers is None:
            s = stacked.get("hc_attn_scale")
            stacked_layers = (np.shape(s)[-1] // 3 if s is not None and np.ndim(s) == 2
                              else cfg.num_hidden_layers)
        self.n_stacked = int(stacked_layers)
        sched = schedule(min(max(self.n_stacked, 1), cfg.num_hidden_layers), cfg)
        self.count = {"fwd": self.n_stacked,
                      "csa": sum(k == "csa" for _, k, _ in sched),
                      "hca": sum(k == "hca" for _, k, _ in sched)}
        for g in ("csa", "hca"):
            # stacks of SWA layers only may still carry one CSA / HCA block: the
            # tensors an SWA layer's C call takes but does not read
            if self.count[g] == 0 and any(_group(n) == g for n in stacked):
                self.count[g] = 1
        for name, a in stacked.items():
            n = self.count[_group(name)]
            if np.ndim(a) < 2 or n == 0 or np.shape(a)[1] % n:
                raise ValueError(f"{kern}: stacked '{name}' has shape {np.shape(a)}: its axis 1 "
                                 f"must hold {n} equal blocks (the {_group(name).upper()} "
                                 f"layers among the {self.n_stacked} stacked layers)")
        # an SWA layer's C call still takes csa_* / hca_* tensors (unread): those of the
        # first CSA / HCA layer of the config
        full = schedule(None, cfg)
        self.first = {k: next((L for L, kk, _ in full if kk == k), None) for k in ("csa", "hca")}
        self.ordinal = {L: o for L, _, o in full}
        self.kind = {L: k for L, k, _ in full}

    def _block(self, name, L):
        a = self.stacked[name]
        g = _group(name)
        i = L if g == "fwd" else self.ordinal[L]
        if g != "fwd" and self.kind[L] != g:
            i = 0
        n = self.count[g]
        if i >= n:
            return None
        x = a.shape[1] // n
        return a[:, i * x:(i + 1) * x]

    def tensors(self, L):
        """{name: array} of layer L's per-layer tensors."""
        own = dict(self.lazy(L)) if self.lazy is not None else {}
        unknown = sorted(set(own) - set(self.names))
        if unknown:
            raise TypeError(f"{self.kern}: layer_weights({L}) returned unknown tensor(s) "
                            f"{unknown}; per-layer tensors are {sorted(self.names)}")
        out = {}
        for name in self.names:
            g = _group(name)
            if name in own:
                out[name] = own[name]
                continue
            if name in self.stacked and L < self.n_stacked:
                b = self._block(name, L)
                if b is not None:
                    out[name] = b
                    continue
            if g != "fwd" and self.kind[L] != g and self.first[g] is not None \
                    and self.first[g] != L:
                # unread by this layer's kind: any layer of that kind has the shape
                v = self.tensors(self.first[g]).get(name)
                if v is not None:
                    out[name] = v
                    continue
            raise TypeError(f"{self.kern}: layer {L} ({self.kind[L].upper()}) needs "
                            f"'{name}': pass it stacked (covering layer {L}) or return it "
                            f"from layer_weights({L})")
        return out


def _contiguous(kw):
    """C-contiguous copies of the views that are not (a stacked slice with R > 1)."""
    return {k: (np.ascontiguousarray(v) if isinstance(v, np.ndarray) else v)
            for k, v in kw.items()}


def _rope(kw, kind, rope, cfg, cache):
    if rope == "pypto" or kind == "swa":
        return kw
    ratio = next(r for r, k in KINDS.items() if k == kind)
    if ratio not in cache:
        cos, sin = kw["freqs_cos"], kw["freqs_sin"]
        c, s = rope_tables(cfg, compress_ratio=ratio, max_seq_len=cos.shape[-2],
                           rope_dim=cos.shape[-1], dtype=cos.dtype)
        R = cos.shape[0]
        cache[ratio] = (np.ascontiguousarray(np.broadcast_to(c, (R, *c.shape))),
                        np.ascontiguousarray(np.broadcast_to(s, (R, *s.shape))))
    return {**kw, "freqs_cos": cache[ratio][0], "freqs_sin": cache[ratio][1]}


def run(kern, ops, x_hc, given, *, layers, layer_weights, stacked_layers, rope, lm_head_weight,
        stages, config, prefill, forced=None):
    """The forward driver: `ops` = (layer, hc_head, rms_norm, lm_head) functions, C or golden.
    With `forced` (each layer's output [layers, ...]), layer L runs on forced[L - 1]
    instead of its predecessor's output, on copies of its caches, and the driver returns
    {"x_next": the layers' outputs}."""
    layer_fn, hc_head, rms_norm, lm_head = ops
    cfg = get_config(config)
    if rope not in ROPE:
        raise ValueError(f"{kern}: rope = {rope!r} must be one of {ROPE}")
    args = [p.name for p in inspect.signature(layer_fn).parameters.values()
            if p.kind == p.POSITIONAL_OR_KEYWORD and p.name not in ("x_hc", "layer_id")]
    shared_names = (_SHARED_PREFILL if prefill else _SHARED_DECODE)
    meta_names = _PREFILL_META if prefill else ()
    per_layer = [n for n in args if n not in shared_names and n not in meta_names]
    for name in (*shared_names, *_HEAD):
        if given.get(name) is None:
            raise TypeError(f"{kern}: missing argument '{name}'")
    stacked = {n: given[n] for n in per_layer if given.get(n) is not None}
    src = _Layers(kern, per_layer, stacked, layer_weights, stacked_layers, cfg)
    sched = schedule(layers if layers is not None else
                     (src.n_stacked if layer_weights is None else None), cfg)
    if layer_weights is None and len(sched) > src.n_stacked:
        raise ValueError(f"{kern}: layers = {len(sched)} but the stacks hold "
                         f"{src.n_stacked} layers")
    x = np.asarray(x_hc)
    R = x.shape[0] if x.ndim == 4 else -1
    shared = {n: given[n] for n in shared_names}
    meta = {}
    if prefill:
        batch = dict(chunk_lens=given["chunk_lens"], start_positions=given.get("start_positions"))
        for kind in {k for _, k, _ in sched}:
            L = next(L for L, k, _ in sched if k == kind)
            meta[kind] = prefill_metadata(**batch, layer_id=L, n_ranks=R, config=cfg)

    def layer_args(L, kind, tensors, cache):
        kw = {**shared, **meta.get(kind, {}), **tensors}
        return _rope(kw, kind, rope, cfg, cache)

    # check every layer before the first one runs
    first, rope_cache = {}, {}
    for L, kind, _ in sched:
        t = src.tensors(L)
        if kind not in first:
            from . import _kernels
            check = _kernels.KERNELS[kern.replace("_fwd", "_layer")].validate
            kw = _contiguous(layer_args(L, kind, t, rope_cache))
            try:
                check(x_hc=np.ascontiguousarray(x), **kw, layer_id=L, config=cfg)
            except (TypeError, ValueError) as err:
                raise type(err)(f"{kern}: layer {L} ({kind.upper()}): {err}") from None
            first[kind] = (L, {n: (np.shape(a), np.asarray(a[:0]).dtype if np.ndim(a) else None)
                               for n, a in t.items()})
        else:
            L0, want = first[kind]
            for n, a in t.items():
                got = (np.shape(a), np.asarray(a[:0]).dtype if np.ndim(a) else None)
                if got != want[n]:
                    raise ValueError(f"{kern}: layer {L} ('{n}' {got[1]} {list(got[0])}) "
                                     f"disagrees with layer {L0}, the first {kind.upper()} "
                                     f"layer ({want[n][1]} {list(want[n][0])})")
        del t

    per_layer_out = []
    for L, kind, _ in sched:
        t = src.tensors(L)
        kw = layer_args(L, kind, t, rope_cache)
        ckw = _contiguous(kw)
        if forced is not None:
            x_in = x if L == 0 else np.ascontiguousarray(forced[L - 1])
            ckw = {n: (v.copy() if n in _INOUTS[kern] and v is t.get(n) else v)
                   for n, v in ckw.items()}
            per_layer_out.append(layer_fn(x_hc=x_in, **ckw, layer_id=L, config=cfg)["x_next"])
            continue
        out = layer_fn(x_hc=x, **ckw, layer_id=L, config=cfg)
        for n, v in t.items():          # write back the caches a copy stood in for
            if ckw[n] is not v and isinstance(v, np.ndarray) and v.flags.writeable \
                    and n in out:
                np.copyto(v, out[n])
        x = out["x_next"]
        if stages:
            per_layer_out.append(x)
        del t, kw, ckw, out

    if forced is not None:
        per_layer_out = np.stack(per_layer_out)
        if hc_head is None:
            return {"x_next": per_layer_out}
        x = np.ascontiguousarray(forced[len(sched) - 1])      # the head on the given output
    x_head = np.stack([hc_head(x[r], given["hc_head_fn"][r], given["hc_head_scale"][r],
                               given["hc_head_base"][r], config=cfg)["y"] for r in range(R)])
    hidden = np.stack([rms_norm(x_head[r], given["final_norm_w"][r], config=cfg)["x_normed"]
                       for r in range(R)])
    if prefill:                         # padding rows stay zero, as in x_next
        valid = _valid_rows(meta[sched[0][1]], x.shape[1])
        hidden[:, ~valid] = 0
    name = "x_out" if prefill else "hidden_out"
    if forced is not None:
        return {"x_next": per_layer_out, name: hidden}
    result = {name: hidden}
    if lm_head_weight is not None:
        result["logits"] = lm_head(hidden, lm_head_weight)["logits"]
    for n in per_layer:
        if n in given and n in _INOUTS[kern]:
            result[n] = given[n]
    if stages:
        result["stages"] = {"x_next": np.stack(per_layer_out), "x_head": x_head, name: hidden}
    return result


def each_layer(kern, inputs, x_next, *, golden=False, config=None, layers=None,
               layer_weights=None, stacked_layers=None, rope="pypto"):
    """Each layer on the input the forward under test gave it: layer L of `inputs`
    (dsv4.<kern>'s arguments) run on x_next[L - 1] (layer 0 on x_hc), on copies of its
    caches; returns [layers, ...] like the x_next stage. Comparing x_next[L] with this
    charges each layer only for its own error: chained outputs drift apart from layer to
    layer even when every layer is within its comparator (a bf16 residual stream of
    many layers amplifies a rounding difference)."""
    return on_given_inputs(kern, inputs, x_next, golden=golden, config=config, layers=layers,
                           layer_weights=layer_weights, stacked_layers=stacked_layers,
                           rope=rope, head=False)["x_next"]


def on_given_inputs(kern, inputs, x_next, *, golden=False, config=None, layers=None,
                    layer_weights=None, stacked_layers=None, rope="pypto", head=True):
    """each_layer's x_next and, with head, the forward's output (hidden_out / x_out) of
    hc_head and the final norm on the last given layer output: what a forward that took
    the same inputs should have produced, step by step."""
    from . import _kernels, golden as _golden
    prefill = kern == "prefill_fwd"
    layer = kern.replace("_fwd", "_layer")
    ns = _golden if golden else _kernels.KERNELS
    get = (lambda n: getattr(ns, n)) if golden else (lambda n: ns[n])
    ops = (get(layer), get("hc_head") if head else None, get("rms_norm"), None)
    given = dict(inputs)
    x_hc = given.pop("x_hc")
    n = layers if layers is not None else np.shape(x_next)[0]
    return run(kern, ops, x_hc, given, layers=n, layer_weights=layer_weights,
               stacked_layers=stacked_layers, rope=rope, lm_head_weight=None, stages=False,
               config=config, prefill=prefill, forced=x_next)


def _valid_rows(meta, total):
    lens, offsets = meta["chunk_lens"][0], meta["chunk_offsets"][0]
    valid = np.zeros(total, bool)
    for n, base in zip(lens.tolist(), offsets.tolist()):
        valid[base:base + n] = True
    return valid


_INOUTS = {
    "decode_fwd": ("kv_cache", "hca_compress_state", "csa_compress_state",
                   "csa_inner_compress_state", "cmp_kv", "idx_kv_cache"),
    "prefill_fwd": ("hca_cmp_kv_state", "hca_cmp_score_state", "csa_cmp_kv_state",
                    "csa_cmp_score_state", "csa_inner_kv_state", "csa_inner_score_state",
                    "kv_cache", "cmp_kv", "idx_kv_cache"),
}


def make(kern, ops, doc, module="dsv4"):
    """dsv4.<kern> or dsv4.golden.<kern>: `ops()` gives (layer, hc_head, rms_norm, lm_head)."""
    prefill = kern == "prefill_fwd"
    layer = ops()[0]
    P = inspect.Parameter
    args = [p.name for p in inspect.signature(layer).parameters.values()
            if p.kind == p.POSITIONAL_OR_KEYWORD and p.name not in ("x_hc", "layer_id")
            and p.name not in (_PREFILL_META if prefill else ())]
    names = (*args, *_HEAD, "lm_head_weight")
    params = [P("x_hc", P.POSITIONAL_OR_KEYWORD)]
    if prefill:
        params += [P("chunk_lens", P.POSITIONAL_OR_KEYWORD),
                   P("start_positions", P.POSITIONAL_OR_KEYWORD, default=None)]
    params += [P(n, P.KEYWORD_ONLY, default=None) for n in names]
    params += [P("layers", P.KEYWORD_ONLY, default=None),
               P("layer_weights", P.KEYWORD_ONLY, default=None),
               P("stacked_layers", P.KEYWORD_ONLY, default=None),
               P("rope", P.KEYWORD_ONLY, default="pypto"),
               P("stages", P.KEYWORD_ONLY, default=False),
               P("config", P.KEYWORD_ONLY, default=None)]
    sig = inspect.Signature(params)

    def forward(*a, **kw):
        try:
            b = sig.bind(*a, **kw)
        except TypeError as err:
            raise TypeError(f"{kern}: {err}") from None
        b.apply_defaults()
        g = dict(b.arguments)
        opts = {k: g.pop(k) for k in ("layers", "layer_weights", "stacked_layers", "rope",
                                       "stages", "config", "lm_head_weight")}
        return run(kern, ops(), g.pop("x_hc"), g, **opts, prefill=prefill)

    forward.__signature__ = sig
    forward.__name__ = forward.__qualname__ = kern
    forward.__doc__ = doc
    forward.__module__ = module
    out = "x_out" if prefill else "hidden_out"
    forward.outputs = (out, "logits")
    forward.inouts = _INOUTS[kern]
    forward.stages = ("x_next", "x_head")
    return forward


def axes(kern):
    """Axis names of the forward's outputs, caches (the layer's, stacked on axis 1) and
    stages."""
    from ._kernels import TABLE
    layer = kern.replace("_fwd", "_layer")
    rows = "total" if kern == "prefill_fwd" else "T"
    out = {a["name"]: tuple(a["dims"].split(",")) for a in TABLE[layer]["args"]
           if a["name"] in _INOUTS[kern]}
    out.update({"x_out" if kern == "prefill_fwd" else "hidden_out": ("R", rows, "D"),
                "logits": ("R", rows, "V"), "x_head": ("R", rows, "D"),
                "x_next": ("layer", "R", rows, "HC", "D")})
    return out


_DOC = """{what}

    x_hc [R, {rows}, HC, D] bf16 is the residual stream entering layer 0 (no embedding).{batch}
    Every other tensor is keyword-only, in pypto-lib's names: the per-layer ones of
    {layer} stacked along axis 1 (module dsv4.forward: stacked_layers, the csa_* / hca_*
    stacks), the shared metadata and tables of {layer}, and hc_head_fn [R, HC, HC D],
    hc_head_scale [R, 1], hc_head_base [R, HC], final_norm_w [R, D]; lm_head_weight
    [R, V / R, D] bf16 (optional) adds logits [R, {rows}, V] fp32 (lm_head, the shards in
    rank order).

    layers: run layers 0 .. layers - 1 (default: every stacked layer, or every layer of
    the config with layer_weights). layer_weights: a callable L -> {{name: layer L's
    tensor}} in {layer}'s names and shapes (e.g. np.memmap views), used before the
    stacks. rope: "pypto" (default, freqs_cos / freqs_sin for every layer) or "model" (the
    compress tables for CSA and HCA layers). A call that raises changes no cache.

    Returns {out} [R, {rows}, D] bf16 (hc_head then the final RMSNorm{pad}), logits if
    lm_head_weight is given, and the stacked caches and states, updated in place.
    Stages (stages=True): x_next [layers, R, {rows}, HC, D] bf16, every layer's output
    (compare each with {layer}'s x_next comparator to find the first layer that departs),
    x_head [R, {rows}, D] bf16 (hc_head's output), {out}.
"""

DECODE_DOC = _DOC.format(
    what="One decode step through the layer schedule (spec chapter 06 §10): per layer "
         "decode_layer, then hc_head and the final RMSNorm.",
    rows="T", batch="", layer="decode_layer", out="hidden_out", pad="")
PREFILL_DOC = _DOC.format(
    what="A packed batch of prefill chunks through the layer schedule (spec chapter 06 "
         "§10): per layer prefill_layer, then hc_head and the final RMSNorm.",
    rows="total",
    batch="\n    Packed as prefill_layer's: chunk_lens new tokens per request after "
          "start_positions\n    (default 0); the per-kind metadata comes from "
          "dsv4.prefill_metadata.",
    layer="prefill_layer", out="x_out", pad="; padding rows zero")


def _c_ops():
    from . import _kernels
    k = _kernels.KERNELS
    return k["decode_layer"], k["hc_head"], k["rms_norm"], k["lm_head"]


def _c_prefill_ops():
    from . import _kernels
    k = _kernels.KERNELS
    return k["prefill_layer"], k["hc_head"], k["rms_norm"], k["lm_head"]


decode_fwd = make("decode_fwd", _c_ops, DECODE_DOC + "\n    C kernels; golden: dsv4.golden.decode_fwd.")
prefill_fwd = make("prefill_fwd", _c_prefill_ops,
                   PREFILL_DOC + "\n    C kernels; golden: dsv4.golden.prefill_fwd.")
