"""Inputs of the MTP projection and the LM head, with pypto-lib's distributions and
comparators (spec chapter 06 §8.1, §9)."""
import numpy as np

from ..compare import Comparator, allclose, ratio_allclose, ratio_reldiff
from ..config import get_config
from ..golden.numerics import bf16_rne, int8_quant_per_row
from . import blocks as _blocks
from ._common import cached, normal, rng


def _proj_weight(seed, name, D, factor):
    """factor * U(0,1) / sqrt(D) -> bf16 -> int8 per output row (clamped), scale = 1/sq."""
    w = bf16_rne(np.float32(factor) * rng(seed, name).random((D, D), dtype=np.float32)
                 / np.float32(D ** 0.5))
    q, scale = int8_quant_per_row(w, clamp=True)
    return q, scale.reshape(D)


@cached
def _proj_weights(seed, D, factor):
    return _proj_weight(seed, "e_proj_w", D, factor) + _proj_weight(seed, "h_proj_w", D, factor)


def _projection(T, seed, c, factor):
    D, HC = c.hidden_size, c.hc_mult
    e_w, e_s, h_w, h_s = _proj_weights(seed, D, factor)
    ones = np.ones(D, np.float32)
    return {
        "hidden_states": bf16_rne(normal(seed, "hidden_states", (T, D))),
        "prev_hidden_states": bf16_rne(normal(seed, "prev_hidden_states", (T, HC, D))),
        "enorm_w": ones.copy(), "hnorm_w": ones.copy(),
        "e_proj_w": e_w, "e_proj_w_scale": e_s, "e_proj_smooth": ones.copy(),
        "h_proj_w": h_w, "h_proj_w_scale": h_s, "h_proj_smooth": ones.copy(),
    }


def mtp_projection(T=8, *, seed=0, config=None):
    """hidden_states [T, D], prev_hidden_states [T, HC, D] ~ N(0,1) (bf16); unit norms and
    smooths; e/h_proj_w the per-row int8 of 0.25 U(0,1) / sqrt(D) (bf16), scale = 1/sq."""
    return _projection(T, seed, get_config(config), 0.25)


@cached
def _lm_head_weight(seed, tp, VS, D):
    # one shard at a time, so that the fp32 draw of the whole vocabulary never exists at once
    w = np.empty((tp, VS, D), bf16_rne(np.float32(0)).dtype)
    for p in range(tp):
        w[p] = bf16_rne(normal(seed, f"lm_head_weight/{p}", (VS, D)) / np.float32(D ** 0.5))
    return w


def lm_head(T=8, tp=2, vocab_size=None, *, seed=0, config=None):
    """hidden_states [tp, T, D] ~ N(0,1) * 0.1 (bf16); lm_head_weight [tp, V/tp, D] ~
    N(0,1) / sqrt(D) (bf16): the vocabulary V (default the config's vocab_size) in tp
    contiguous shards, one per tensor-parallel rank (pypto-lib: tp = 2, 4 or 8)."""
    c = get_config(config)
    D, V = c.hidden_size, int(vocab_size or c.vocab_size)
    if tp < 1 or V % tp:
        raise ValueError(f"lm_head: tp = {tp} must be >= 1 and divide the vocabulary size {V}")
    return {
        "hidden_states": bf16_rne(normal(seed, "hidden_states", (tp, T, D)) * np.float32(0.1)),
        "lm_head_weight": _lm_head_weight(seed, tp, V // tp, D),
    }


def _prefill_mtp_projection(R, T, seed, c):
    """Every rank its own draws: hidden rows, prev stacks and the int8 weights of U(0,1) /
    sqrt(D) (no 0.25 factor in the MTP block's builder)."""
    from .layers import _rank_seed
    ranks = [_projection(T, _rank_seed(seed, r), c, 1.0) for r in range(R)]
    return {name: np.stack([d[name] for d in ranks]) for name in ranks[0]}


def prefill_mtp(start_pos=0, num_tokens=128, *, n_ranks=2, n_local_experts=None, seed=0,
                config=None):
    """pypto-lib's MTP block fixture (spec 06 §8.2) on R = n_ranks ranks, one tile of 128
    rows: per rank the projection inputs, the SWA block builder's attention inputs (drawn per
    rank; the int8 weights shared) at start_pos with num_tokens active rows, the MoE
    builder's weights with the layer tests' tid2eid, input_ids[r] = roll(arange(128), r)
    with the rows from num_tokens on -1, and the head: mtp_hc_head_fn ~ 0.0519 N(0,1),
    scale 0.076099, hc_head's base, mtp_norm_w = bf16(1 + 0.1 N(0,1))."""
    from .hc import HC_BASE, HC_SCALE
    from .layers import _SHARED_PREFILL_WEIGHTS, _moe_part, _n_ranks, _rank_seed, _rep
    from ..layers import TILE
    c = get_config(config)
    R, T, n = _n_ranks(n_ranks), TILE, int(num_tokens)
    HC, D = c.hc_mult, c.hidden_size
    blocks = [_blocks.prefill_attention_swa(T, start_pos, n, seed=_rank_seed(seed, r), config=c)
              for r in range(R)]
    d = _prefill_mtp_projection(R, T, seed, c)
    for name in blocks[0]:
        if name in ("x_hc", "num_tokens"):
            continue
        key = "ori_block_table" if name == "block_table" else name
        d[key] = (_rep(blocks[0][name], R) if name in _SHARED_PREFILL_WEIGHTS
                  else np.stack([b[name] for b in blocks]))
    d.update(_moe_part(T, R, c.num_hidden_layers, n_local_experts, seed, c))
    ids = np.stack([np.roll(np.arange(T, dtype=np.int64), r) for r in range(R)])
    ids[:, n:] = -1
    d["input_ids"] = ids
    d["mtp_hc_head_fn"] = normal(seed, "mtp_hc_head_fn", (R, HC, HC * D)) * np.float32(0.0519)
    d["mtp_hc_head_scale"] = np.full((R, 1), HC_SCALE[0], np.float32)
    d["mtp_hc_head_base"] = _rep(HC_BASE[:HC], R)
    d["mtp_norm_w"] = bf16_rne(normal(seed, "mtp_norm_w", (R, D)) * np.float32(0.1) + np.float32(1))
    d["num_tokens"] = n
    return d


class _ValidTokens(Comparator):
    """pypto-lib's valid_ratio_reldiff: `inner` on the rows [:, :num_tokens] of an [R, T, ...]
    output (num_tokens from the inputs; without it every row)."""

    def __init__(self, inner):
        super().__init__(f"valid_tokens({inner.desc})", None)
        self.inner = inner

    def __call__(self, actual, expected, *, name="", actual_outputs=None, expected_outputs=None,
                 inputs=None, atol=None, rtol=None, axes=None):
        a, e = np.asarray(actual), np.asarray(expected)
        n = (inputs or {}).get("num_tokens")
        kw = dict(name=name, actual_outputs=actual_outputs, expected_outputs=expected_outputs,
                  inputs=inputs, atol=atol, rtol=rtol, axes=axes)
        if n is None or a.shape != e.shape or a.ndim < 2:
            return self.inner(a, e, **kw)
        n = int(n)
        res = self.inner(a[:, :n], e[:, :n], **kw)
        res.message += f"\n  the first {n} rows of {a.shape[1]} compared (num_tokens)"
        return res


COMPARATORS = {
    # near-zero cancellation of the two W8A8 terms leaves relative outliers (pypto-lib's note)
    "mtp_projection": {
        "hidden_states_out": ratio_allclose(atol=1e-3, rtol=1e-3, max_error_ratio=0.05)},
    # pypto-lib gives lm_head no comparator: run_jit's default allclose, rtol = atol = 1e-3
    "lm_head": {"logits": allclose(atol=1e-3, rtol=1e-3)},
    # kv_cache is an InOut pypto-lib does not check: here the outputs' rule, since its rows
    # come, like them, from the projection's output (whose int8 codes move with a sum order)
    "prefill_mtp": {"hidden_out": _ValidTokens(ratio_reldiff(diff_thd=0.02, pct_thd=0.05)),
                    "pre_hc_hidden_out": _ValidTokens(ratio_reldiff(diff_thd=0.02, pct_thd=0.05)),
                    "kv_cache": ratio_reldiff(diff_thd=0.02, pct_thd=0.05)},
}

CASES = {
    "mtp_projection": {"decode": dict(T=8), "prefill": dict(T=128)},
    "lm_head": {"decode": dict(T=8), "prefill": dict(T=128)},
    # 2 ranks x 4 local experts, as the layers' cases (pypto-lib's 32 are 1.6 GB of weights)
    "prefill_mtp": {"start0": dict(n_local_experts=4)},
}
