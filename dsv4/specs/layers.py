"""Inputs of the decoder layers decode_layer and prefill_layer (spec chapter 06 §5.3,
§6.6), built from the attention-block builders and the MoE builder with pypto-lib's
fixture rules, and their comparators (§5.4, §6.9).

Every tensor has a leading rank axis R = n_ranks. The quirks of pypto-lib's layer
fixtures are kept on purpose (§12 item 5):

* decode_layer takes the attention weights and the RoPE tables of the SWA block builder
  for every kind (so an HCA or CSA layer runs with the ratio-0 table and attn_sink 0),
  replicates every weight over the ranks and draws x_hc, kv_cache, cmp_kv and the CSA
  state pools per rank; tid2eid[v, k] = (v K + k) mod E_g; input_ids = arange(T).
* prefill_layer takes the active kind's attention weights and tables; the randomly
  initialised weights differ per rank (the int8 ones and idx_wq_b do not); every request
  with history (start > 0) gets the history of each cache and state pool from the block
  builder that owns it, at its own start position; tid2eid as in decode.

The MoE expert weights are the builder's, at n_local_experts per rank (FLASH default 32:
gigabytes; tests use a few). The caller's gate needs E_g = R n_local_experts >= K.
"""
import inspect
import zlib

import numpy as np

from ..compare import Comparator, ratio_allclose, ratio_reldiff
from ..config import DECODE_BATCH, DECODE_START_POS, get_config
from ..golden import layers as _golden
from ..golden.numerics import BF16, bf16_rne
from ..layers import TILE, layer_kind, prefill_metadata
from . import blocks as _blocks
from . import moe as _moe
from ._common import cached
from .attention import _centered
from .blocks import _CACHE, _STATE, _csa_state, _unit_rms

_KINDS = ("swa", "hca", "csa")
_MOE_WEIGHTS = ("hc_ffn_fn", "hc_ffn_scale", "hc_ffn_base", "norm_w", "gate_w", "gate_bias",
                "routed_w1", "routed_w1_scale", "routed_w3", "routed_w3_scale", "routed_w2",
                "routed_w2_scale", "shared_w1", "shared_w1_scale", "shared_w3",
                "shared_w3_scale", "shared_w2", "shared_w2_scale")


def _order(golden):
    """The layer's tensor arguments in order, layer_id last (the golden's signature)."""
    return [p.name for p in inspect.signature(golden).parameters.values()
            if p.kind == p.POSITIONAL_OR_KEYWORD]


def _rep(a, R):
    """R stacked copies of a (a fresh, writeable array)."""
    a = np.asarray(a)
    return np.ascontiguousarray(np.broadcast_to(a, (R, *a.shape)))


def _n_ranks(n_ranks):
    R = int(n_ranks)
    if R < 1:
        raise ValueError(f"n_ranks = {n_ranks} must be >= 1")
    return R


@cached
def _hash_table(V, K, E_g):
    """The layer tests' tid2eid: row v = (v K + k) mod E_g, k = 0..K-1 (int64, then int32)."""
    v = np.arange(V, dtype=np.int64)[:, None]
    return ((v * K + np.arange(K, dtype=np.int64)[None, :]) % E_g).astype(np.int32)


def _moe_part(T, R, layer_id, n_local_experts, seed, c):
    """The MoE weights of the MoE builder with the layer tests' tid2eid."""
    m = _moe.moe(T=T, n_ranks=R, layer_id=layer_id, n_local_experts=n_local_experts, seed=seed,
                 config=c)
    out = {name: m[name] for name in _MOE_WEIGHTS}
    E_g = m["gate_w"].shape[1]
    out["tid2eid"] = _rep(_hash_table(c.vocab_size, c.num_experts_per_tok, E_g), R)
    return out


# ------------------------------------------------------------------------ decode

def decode_layer(start_pos=DECODE_START_POS, layer_id=10, *, n_ranks=2, n_local_experts=None,
                 seed=0, config=None):
    """§5.3 fixture: the three decode block builders at the same start_pos (default 8192
    for all DECODE_BATCH = 8 requests; None = each kind's canonical start set) and the MoE
    builder for layer_id, on R = n_ranks ranks.

    Attention weights, hc_attn constants, RoPE tables, sinks, kv_cache history and the ring
    block_table come from the SWA builder for every kind; ori_slot_mapping, position_ids and
    kv_seq_lens from the active kind (kv_seq_lens from HCA for an SWA layer); hca_* from the
    HCA builder; csa_*, cmp_kv, idx_kv_cache and their tables from the CSA builder. Weights
    and idx_kv_cache are replicated over the ranks; x_hc, kv_cache, cmp_kv and the CSA
    state pools are drawn per rank (rank 0 = the block builders' own draw); the HCA state
    is zero. tid2eid[v, k] = (v K + k) mod E_g, input_ids = arange(T) on every rank.
    Needs 0 <= layer_id < num_hidden_layers."""
    c = get_config(config)
    layer_id = int(layer_id)
    if not 0 <= layer_id < c.num_hidden_layers:
        raise ValueError(f"layer_id = {layer_id} is outside [0, {c.num_hidden_layers}) (the "
                         f"hidden layers of {c.name})")
    kind = layer_kind(layer_id, c)
    R = _n_ranks(n_ranks)
    B = DECODE_BATCH
    swa, hca, csa = (getattr(_blocks, f"decode_attention_{k}")(B, start_pos, seed=seed, config=c)
                     for k in _KINDS)
    active = {"swa": swa, "hca": hca, "csa": csa}[kind]
    eps = c.rms_norm_eps

    def per_rank(rank0, draw):
        """rank 0: the block builder's value; rank r: the same distribution under the
        tensor name prefixed with "rank<r>:"."""
        return np.stack([rank0] + [draw(f"rank{r}:") for r in range(1, R)])

    starts = csa["position_ids"]
    HD2, IHD2 = 2 * c.head_dim, 2 * c.index_head_dim
    d = {
        # as the SWA builder draws them: x_hc U(-1, 1) bf16, unit-RMS ring rows
        "x_hc": per_rank(swa["x_hc"], lambda p: bf16_rne(
            _centered(seed, p + "x_hc", swa["x_hc"].shape, 2.0))),
        "kv_cache": per_rank(swa["kv_cache"], lambda p: _unit_rms(
            seed, p + "kv_cache", swa["kv_cache"].shape, eps)),
        "block_table": _rep(swa["block_table"], R),
        "ori_slot_mapping": _rep(active["ori_slot_mapping"], R),
        "position_ids": _rep(active["position_ids"], R),
        "kv_seq_lens": _rep(active.get("kv_seq_lens", hca["kv_seq_lens"]), R),
        "hca_cmp_slot_mapping": _rep(hca["cmp_slot_mapping"], R),
        "hca_state_slot_mapping": _rep(hca["state_slot_mapping"], R),
        "hca_compress_state": _rep(hca["compress_state"], R),
        "hca_compress_state_block_table": _rep(hca["compress_state_block_table"], R),
        "csa_compress_state": per_rank(csa["compress_state"], lambda p: _csa_state(
            seed, p + "compress_state", starts, csa["compress_state_block_table"], HD2)),
        "csa_inner_compress_state": per_rank(csa["inner_compress_state"], lambda p: _csa_state(
            seed, p + "inner_compress_state", starts, csa["inner_compress_state_block_table"],
            IHD2)),
        "cmp_kv": per_rank(csa["cmp_kv"], lambda p: _unit_rms(
            seed, p + "cmp_kv", csa["cmp_kv"].shape, eps)),
        "idx_kv_cache": _rep(csa["idx_kv_cache"], R),
        "input_ids": _rep(np.arange(B, dtype=np.int64), R),
        "layer_id": layer_id,
    }
    for name in ("hc_attn_fn", "hc_attn_scale", "hc_attn_base", "attn_norm_w", "wq_a", "wq_b",
                 "wq_b_scale", "wkv", "gamma_cq", "gamma_ckv", "freqs_cos", "freqs_sin",
                 "attn_sink", "wo_a", "wo_b", "wo_b_scale"):
        d[name] = _rep(swa[name], R)
    for name in ("cmp_wkv", "cmp_wgate", "cmp_ape", "cmp_norm_w"):
        d["hca_" + name] = _rep(hca[name], R)
    for name in ("cmp_wkv", "cmp_wgate", "cmp_ape", "cmp_norm_w", "compress_state_block_table",
                 "idx_wq_b", "idx_wq_b_scale", "weights_proj", "hadamard_idx", "inner_wkv",
                 "inner_wgate", "inner_ape", "inner_norm_w", "inner_compress_state_block_table",
                 "cmp_slot_mapping", "idx_slot_mapping", "state_slot_mapping",
                 "inner_state_slot_mapping"):
        d["csa_" + name] = _rep(csa[name], R)
    d["cmp_block_table"] = _rep(csa["cmp_block_table"], R)
    d["idx_block_table"] = _rep(csa["idx_block_table"], R)
    d.update(_moe_part(B, R, layer_id, n_local_experts, seed, c))
    return {name: d[name] for name in _order(_golden.decode_layer)}


# ----------------------------------------------------------------------- prefill

def _rank_seed(seed, r):
    """Rank 0 draws at `seed` (the block builders' own values); rank r >= 1 at a seed
    derived from (seed, r)."""
    if r == 0:
        return int(seed)
    return (int(seed) * 1_000_003 + zlib.crc32(f"rank{r}".encode())) % 2**31


def _prefill_blocks(start, n, seed, c):
    return {k: getattr(_blocks, f"prefill_attention_{k}")(TILE, start, n, seed=seed, config=c)
            for k in _KINDS}


# weights pypto-lib's builders compute once (quantised, or from a fixed generator): the
# same on every rank; every other weight is drawn per rank
_SHARED_PREFILL_WEIGHTS = {"wq_b", "wq_b_scale", "wo_b", "wo_b_scale", "csa_idx_wq_b",
                           "csa_idx_wq_b_scale"}
# packed per-request tensor -> (owning kind, None = the layer's; the block builders' name)
_PACKED = {
    "kv_cache": (None, "kv_cache"),
    "ori_block_table": (None, "ori_block_table"),
    "cmp_kv": (None, "cmp_kv"),
    "cmp_block_table": (None, "cmp_block_table"),
    "idx_kv_cache": (None, "idx_kv_cache"),
    "idx_block_table": (None, "idx_block_table"),
    "hca_cmp_kv_state": ("hca", "cmp_kv_state"),
    "hca_cmp_score_state": ("hca", "cmp_score_state"),
    "hca_compress_state_block_table": ("hca", "compress_state_block_table"),
    "csa_cmp_kv_state": ("csa", "cmp_kv_state"),
    "csa_cmp_score_state": ("csa", "cmp_score_state"),
    "csa_compress_state_block_table": ("csa", "compress_state_block_table"),
    "csa_inner_kv_state": ("csa", "inner_kv_state"),
    "csa_inner_score_state": ("csa", "inner_score_state"),
    "csa_inner_compress_state_block_table": ("csa", "inner_compress_state_block_table"),
}
_HISTORY = {"kv_cache", "cmp_kv", "idx_kv_cache", "hca_cmp_kv_state", "hca_cmp_score_state",
            "csa_cmp_kv_state", "csa_cmp_score_state", "csa_inner_kv_state",
            "csa_inner_score_state"}


def _template(tpl, kind, name):
    """The start-0 value of a packed per-request tensor (§6.6 table sources)."""
    active = tpl[kind]
    if name in ("ori_block_table", "kv_cache"):
        return active.get(name, active.get("block_table"))
    if name in ("cmp_kv", "cmp_block_table"):
        return active.get(name, tpl["csa"][name])
    return tpl["csa"][name]                                   # idx_kv_cache, idx_block_table


def prefill_layer(layer_id=2, chunk_lens=(128, 192), start_positions=None, *, n_ranks=2,
                  n_local_experts=None, seed=0, config=None):
    """§6.6 fixture: a packed batch of requests with chunk_lens new tokens after
    start_positions (default 0) tokens of context, on R = n_ranks ranks.

    Metadata from dsv4.prefill_metadata. Attention weights and RoPE tables of the active
    kind's block builder (start 0, a full tile), hca_* and csa_* weights from the HCA and
    CSA builders, drawn per rank (rank 0 = the builders' own draw) except the int8 wq_b,
    wo_b and idx_wq_b, which every rank shares. x_hc: zeros, the chunk rows of every
    request U(-0.05, 0.05) bf16 (per rank); input_ids of rank k: (packed row + k) mod V on
    chunk rows, 0 on padding. Caches, states and tables per request, replicated over the
    ranks: the start-0 template (zero caches and states) for a request without history;
    for a request starting at s > 0 the history of kv_cache, cmp_kv, idx_kv_cache (from the
    layer kind's builder at s, where it has them) and of the hca_* / csa_* state pools
    (from the HCA / CSA builder at s, whatever the layer kind). tid2eid as decode_layer.

    Like pypto-lib's builder, a request with history needs start + 128 <= 1027 (the CSA
    builder places the csa_* pool history), and a CSA layer seq_len <= 1027."""
    c = get_config(config)
    kind = layer_kind(layer_id, c)
    layer_id = int(layer_id)
    R = _n_ranks(n_ranks)
    meta = prefill_metadata(chunk_lens, start_positions, layer_id=layer_id, n_ranks=R, config=c)
    lens = meta["chunk_lens"][0].astype(np.int64)
    offsets = meta["chunk_offsets"][0].astype(np.int64)
    starts = meta["seq_lens"][0].astype(np.int64) - lens
    batch, total = lens.size, meta["position_ids"].shape[1]

    ranks = [_prefill_blocks(0, TILE, _rank_seed(seed, r), c) for r in range(R)]
    tpl = ranks[0]
    history = {}
    for r, s in enumerate(starts.tolist()):
        if s > 0 and s not in history:
            try:
                history[s] = _prefill_blocks(s, TILE, seed, c)
            except ValueError as e:
                raise ValueError(f"prefill_layer builder: request {r} starts at {s}; pypto-lib's "
                                 f"fixture builds its cache and state history with every block "
                                 f"builder at (start, 128 tokens), which needs start <= 899 "
                                 f"(spec 06 §6.5): {e}") from e

    d = dict(meta)
    weights = {name: (kind, name) for name in (
        "hc_attn_fn", "hc_attn_scale", "hc_attn_base", "attn_norm_w", "wq_a", "wq_b",
        "wq_b_scale", "wkv", "gamma_cq", "gamma_ckv", "freqs_cos", "freqs_sin", "attn_sink",
        "wo_a", "wo_b", "wo_b_scale")}
    weights.update({"hca_" + n: ("hca", n) for n in ("cmp_wkv", "cmp_wgate", "cmp_ape",
                                                    "cmp_norm_w")})
    weights.update({"csa_" + n: ("csa", n) for n in (
        "cmp_wkv", "cmp_wgate", "cmp_ape", "cmp_norm_w", "idx_wq_b", "idx_wq_b_scale",
        "inner_wkv", "inner_wgate", "inner_ape", "inner_norm_w")})
    weights.update({"csa_hadamard_idx": ("csa", "hadamard_idx"),
                    "csa_weights_proj": ("csa", "idx_weights_proj")})
    for name, (k, src) in weights.items():
        if name in _SHARED_PREFILL_WEIGHTS:
            d[name] = _rep(tpl[k][src], R)
        else:
            d[name] = np.stack([ranks[r][k][src] for r in range(R)])

    HC, D = c.hc_mult, c.hidden_size
    x_hc = np.zeros((R, total, HC, D), BF16)
    ids = np.zeros((R, total), np.int64)
    for r, (n, base) in enumerate(zip(lens.tolist(), offsets.tolist())):
        x_hc[:, base:base + n] = bf16_rne(_centered(seed, f"x_hc:{r}", (R, n, HC, D), 0.1))
        rows = np.arange(base, base + n, dtype=np.int64)
        ids[:, base:base + n] = (rows[None, :] + np.arange(R)[:, None]) % c.vocab_size
    d["x_hc"], d["input_ids"] = x_hc, ids

    for name, (owner, child) in _PACKED.items():
        src_kind = kind if owner is None else owner
        blocks = []
        for r, s in enumerate(starts.tolist()):
            v = None
            if name in _HISTORY and s > 0:
                v = history[s][src_kind].get(child)
            if v is None:
                v = _template(tpl, src_kind, child) if owner is None else tpl[owner][child]
            blocks.append(np.asarray(v))
        cnt = blocks[0].shape[0]
        # the FLASH pools reach a GiB: start from untouched zero pages, copy what is not zero
        out = np.zeros((R, batch * cnt, *blocks[0].shape[1:]), blocks[0].dtype)
        for r, v in enumerate(blocks):
            if v.any():
                out[:, r * cnt:(r + 1) * cnt] = v
        d[name] = out

    d.update(_moe_part(TILE, R, layer_id, n_local_experts, seed, c))
    d["layer_id"] = layer_id
    return {name: d[name] for name in _order(_golden.prefill_layer)}


# ------------------------------------------------------------------ comparators

class _PackedValidRows(Comparator):
    """`inner` on the valid rows of a packed [R, total, ...] output only: rows
    [chunk_offsets[r], chunk_offsets[r] + chunk_lens[r]) of every request r (rank 0's copy
    of both, from the inputs), all ranks together. Without those inputs every row."""

    def __init__(self, inner):
        super().__init__(f"packed_valid_rows({inner.desc})", None)
        self.inner = inner

    def __call__(self, actual, expected, *, name="", actual_outputs=None, expected_outputs=None,
                 inputs=None, atol=None, rtol=None):
        inputs = inputs or {}
        a, e = np.asarray(actual), np.asarray(expected)
        lens, offsets = inputs.get("chunk_lens"), inputs.get("chunk_offsets")
        kw = dict(name=name, actual_outputs=actual_outputs, expected_outputs=expected_outputs,
                  inputs=inputs, atol=atol, rtol=rtol)
        if lens is None or offsets is None or a.shape != e.shape or a.ndim < 2:
            return self.inner(a, e, **kw)
        lens, offsets = (np.asarray(v).reshape(-1, np.shape(v)[-1])[0].astype(np.int64)
                         for v in (lens, offsets))
        mask = np.zeros(a.shape[1], bool)
        for n, base in zip(lens.tolist(), offsets.tolist()):
            mask[base:base + n] = True
        res = self.inner(a[:, mask], e[:, mask], **kw)
        res.message += (f"\n  the {int(mask.sum())} valid rows of {a.shape[1]} compared "
                        f"(chunk_lens rows from each chunk_offsets)")
        return res


def packed_valid_rows(cmp):
    """`cmp` applied to the valid (non-padding) rows of a packed prefill output."""
    return _PackedValidRows(cmp)


_KV_CACHE = ratio_allclose(atol=1e-4, rtol=1 / 128)

# pypto-lib checks x_next and kv_cache; the other caches and states the layer updates get
# the attention blocks' comparators for them
COMPARATORS = {
    "decode_layer": {"x_next": ratio_reldiff(diff_thd=0.01, pct_thd=0.05),
                     "kv_cache": _KV_CACHE,
                     "hca_compress_state": _STATE, "csa_compress_state": _STATE,
                     "csa_inner_compress_state": _STATE, "cmp_kv": _CACHE,
                     "idx_kv_cache": _CACHE},
    "prefill_layer": {"x_next": packed_valid_rows(ratio_reldiff(diff_thd=0.01, pct_thd=0.05)),
                      "kv_cache": _KV_CACHE,
                      **{f"{kind}_{pool}": _STATE for kind, pool in (
                          ("hca", "cmp_kv_state"), ("hca", "cmp_score_state"),
                          ("csa", "cmp_kv_state"), ("csa", "cmp_score_state"),
                          ("csa", "inner_kv_state"), ("csa", "inner_score_state"))},
                      "cmp_kv": _CACHE, "idx_kv_cache": _CACHE},
}

# pypto-lib's runs at reduced expert counts: 4 local experts per rank (E_g = 8 >= K = 6;
# the full 32 per rank are gigabytes)
CASES = {
    "decode_layer": {"layer10": dict(layer_id=10, n_local_experts=4),
                     "layer0": dict(layer_id=0, n_local_experts=4)},
    "prefill_layer": {"layer2": dict(layer_id=2, chunk_lens=(128, 192), n_local_experts=4)},
}
