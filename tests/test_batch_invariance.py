"""Batch invariance of every public kernel: a token's outputs depend only on its own inputs
and the state it reads, never on T or on the other tokens of the call. The same tokens in
one call and in several (each with its share of the tokens, states and caches carried from
call to call in order) give the same bits in every output, state and cache.

How a call is split follows the kernel's contract:
  * per-token kernels and decode batches: every argument with a token (or request)
    dimension is sliced, in the table's symbols;
  * prefill chunks with state: each call is the builder's chunk at its own start position
    (its int32/int64 metadata: positions, slots, index rows), fed the one call's token
    data (float, bf16, int8);
  * prefill_sparse_attn, whose overlay is the whole chunk: T against T + padding rows
    beyond num_tokens.
The one calls have 40 tokens (or requests) and the split calls at most 14: the bf16
weight-row projections used to sum in another order from 32 tokens on.
"""
import dataclasses
import inspect

import numpy as np
import pytest

import dsv4
from dsv4._kernels import TABLE
from dsv4.check import fresh
from conftest import same_bits

CFG = dataclasses.replace(
    dsv4.FLASH, name="batch", hidden_size=128, q_lora_rank=128, num_attention_heads=2,
    head_dim=64, qk_rope_head_dim=16, o_groups=2, o_lora_rank=32, moe_intermediate_size=128,
    n_routed_experts=8, index_n_heads=8, index_head_dim=32, index_topk=8, vocab_size=256,
    max_position_embeddings=512, sliding_window=16)

N = 40                          # tokens (or requests) of the one call


def cuts(n):
    """The split calls: [0, 13), [13, 27), [27, 40) for n = 40."""
    return [0, n // 3, 2 * n // 3 + 1, n]


# the token symbols of each kernel's table and how many rows one unit of the split spans
TOKENS = {"T": 1}
DECODE = {"B": 1, "T": 1, "N": 1}
SLICED = {
    "rms_norm": (dict(T=N), TOKENS),
    "qkv_proj_rope": (dict(T=N), TOKENS),
    "decode_qkv_proj_rope": (dict(B=N, S=1), DECODE),
    "decode_qkv_proj_rope-mtp": (dict(B=N // 2, S=2), {"B": 1, "T": 2}),
    "prefill_qkv_proj_rope": (dict(B=N // 2, S=2, start_pos=5), {"B": 1, "T": 2}),
    "hc_pre": (dict(T=N), TOKENS),
    "hc_post": (dict(T=N), TOKENS),
    "hc_head": (dict(T=N), TOKENS),
    "gate": (dict(T=N, layer_id=10), TOKENS),
    "gate-hash": (dict(T=N, layer_id=0), TOKENS),
    "expert_shared": (dict(T=N), TOKENS),
    "moe": (dict(T=N, n_ranks=2, layer_id=10, n_local_experts=4), TOKENS),
    "moe-hash": (dict(T=N, n_ranks=2, layer_id=0, n_local_experts=4), TOKENS),
    "decode_sparse_attn": (dict(B=N, S=1, compress_ratio=4), DECODE),
    "decode_sparse_attn_hca": (dict(B=N, S=1, compress_ratio=128), DECODE),
    "decode_sparse_attn_swa": (dict(B=N, S=1, compress_ratio=0), DECODE),
    "decode_sparse_attn-mtp": (dict(B=N // 2, S=2, compress_ratio=4), {"B": 1, "T": 2}),
    "decode_sparse_attn_swa-mtp": (dict(B=N // 2, S=2, compress_ratio=0), {"B": 1, "T": 2}),
    "decode_compressor_ratio4": (dict(B=N, S=1, start_pos=263, history=True), DECODE),
    "decode_compressor_ratio128": (dict(B=N, S=1, start_pos=383, history=True), DECODE),
    "decode_indexer_compressor": (dict(B=N, S=1, start_pos=263), DECODE),
    "decode_indexer": (dict(B=N, S=1, start_pos=263), DECODE),
    "decode_attention_swa": (dict(B=N), DECODE),
    "decode_attention_hca": (dict(B=N), DECODE),
    "decode_attention_csa": (dict(B=N), DECODE),
    "decode_layer": (dict(layer_id=2, n_local_experts=4, start_pos=300), DECODE),
}


def kernel_of(case):
    return case.split("-")[0]


def token_axes(kernel, symbols):
    """{argument: (axis, symbol)} for every argument with a token dimension."""
    out = {}
    for a in TABLE[kernel]["args"]:
        dims = a["dims"].split(",") if a["dims"] else []
        for ax, d in enumerate(dims):
            if d in symbols:
                out[a["name"]] = (ax, d)
                break
    return out


def take(v, ax, lo, hi):
    return np.ascontiguousarray(v[(slice(None),) * ax + (slice(lo, hi),)])


def run(kernel, kw):
    takes_config = "config" in inspect.signature(dsv4.KERNELS[kernel]).parameters
    return dsv4.KERNELS[kernel](**kw, **({"config": CFG} if takes_config else {}))


def check_same(one, parts, names):
    bad = [n for n in names if not same_bits(one[n], parts[n])]
    assert not bad, f"differ between one call and the split calls: {bad}"


@pytest.mark.parametrize("case", list(SLICED))
def test_sliced_calls_give_the_same_bits(case):
    kernel = kernel_of(case)
    params, symbols = SLICED[case]
    inputs = getattr(dsv4.specs, kernel)(**params, seed=11, config=CFG)
    fn = dsv4.KERNELS[kernel]
    axes = token_axes(kernel, symbols)
    one = run(kernel, fresh(kernel, inputs))
    units = next(inputs[n].shape[ax] for n, (ax, d) in axes.items() if symbols[d] == 1)
    # caches and states pass from call to call; per-token in-place arrays are sliced
    carried = [k for k in fn.inouts if k not in axes]
    state = {k: np.copy(inputs[k]) for k in carried}
    pieces = []
    for lo, hi in zip(cuts(units), cuts(units)[1:]):
        kw = fresh(kernel, inputs)
        for name, (ax, d) in axes.items():
            if name in kw:
                kw[name] = take(kw[name], ax, lo * symbols[d], hi * symbols[d])
        if isinstance(kw.get("num_tokens"), int):
            kw["num_tokens"] = (hi - lo) * symbols["T"]
        kw.update(state)
        out = run(kernel, kw)
        state = {k: out[k] for k in carried}
        pieces.append(out)
    parts = {k: np.concatenate([p[k] for p in pieces], axes[k][0])
             for k in (*fn.outputs, *fn.inouts) if k in axes}
    parts.update(state)
    check_same(one, parts, list(fn.outputs) + list(fn.inouts))


# prefill chunks of one request: the start position of the one call
CHUNKED = {
    "prefill_compressor_ratio4": 6,
    "prefill_compressor_ratio128": 100,
    "prefill_indexer_compressor": 6,
    "prefill_indexer": 6,
    "prefill_attention_swa": 6,
    "prefill_attention_hca": 100,
    "prefill_attention_csa": 6,
}
# outputs in write order (one row per compressed entry written) and the slots that write
WRITE_ORDER = {"prefill_indexer_compressor": ("kv", "idx_slot_mapping")}


def slots_of(topk_idxs, T):
    return np.where(topk_idxs >= 0, topk_idxs - CFG.sliding_window - T, topk_idxs)


@pytest.mark.parametrize("kernel", list(CHUNKED))
def test_chunked_prefill_gives_the_same_bits(kernel):
    start = CHUNKED[kernel]
    build = getattr(dsv4.specs, kernel)
    fn = dsv4.KERNELS[kernel]
    inputs = build(T=N, start_pos=start, seed=11, config=CFG)
    axes = token_axes(kernel, {"T": 1, "N": 1})
    one = run(kernel, fresh(kernel, inputs))
    state = {k: np.copy(inputs[k]) for k in fn.inouts}
    pieces = []
    for lo, hi in zip(cuts(N), cuts(N)[1:]):
        # the chunk's own metadata, the one call's token data, the carried states
        kw = fresh(kernel, build(T=hi - lo, start_pos=start + lo, seed=11, config=CFG))
        for name, (ax, _) in axes.items():
            if name in kw and kw[name].dtype not in (np.int32, np.int64):
                kw[name] = take(inputs[name], ax, lo, hi)
        kw.update(state)
        out = run(kernel, kw)
        state = {k: out[k] for k in fn.inouts}
        if kernel == "prefill_indexer":           # slots are reported as WIN + T + slot
            out = dict(out, topk_idxs=slots_of(out["topk_idxs"], hi - lo))
        pieces.append((kw, out))
    if kernel == "prefill_indexer":
        one = dict(one, topk_idxs=slots_of(one["topk_idxs"], N))
    parts = {k: np.concatenate([p[k] for _, p in pieces], axes[k][0])
             for k in fn.outputs if k in axes}
    if kernel in WRITE_ORDER:
        # a call reports its first T / R entries (at least one): each piece's against the
        # one call's rows of the same entries
        name, slots = WRITE_ORDER[kernel]
        off, want, got = 0, [], []
        for kw, p in pieces:
            n = min(int((kw[slots] >= 0).sum()), len(p[name]))
            want.append(one[name][off:off + n])
            got.append(p[name][:n])
            off += int((kw[slots] >= 0).sum())
        one = dict(one, **{name: np.concatenate(want)})
        parts[name] = np.concatenate(got)
    parts.update(state)
    check_same(one, parts, list(fn.outputs) + list(fn.inouts))


def test_prefill_sparse_attn_padding_rows_change_nothing():
    """T = N against T = N + 8 with num_tokens = N: the compressed columns' raw indices
    move with the overlay width, every active token sees the same rows."""
    kernel, pad = "prefill_sparse_attn", 8
    inputs = dsv4.specs.prefill_sparse_attn(T=N, compress_ratio=4, seed=11, config=CFG)
    one = run(kernel, fresh(kernel, inputs))
    win = CFG.sliding_window
    kw = dict(inputs, num_tokens=N)
    for name, (ax, _) in token_axes(kernel, TOKENS).items():
        if name in kw:
            v = kw[name]
            kw[name] = np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
    idx = kw["cmp_sparse_indices"]
    kw["cmp_sparse_indices"] = np.where(idx >= win + N, idx + pad, idx).astype(idx.dtype)
    padded = run(kernel, kw)
    assert same_bits(one["attn_out"], padded["attn_out"][:N])


def test_expert_routed_rows_split():
    """Each expert's received rows in one call and in three, the counts cut to match."""
    inputs = dsv4.specs.expert_routed(T=N, n_local_experts=2, seed=11, config=CFG)
    one = run("expert_routed", dict(inputs))
    M, count = inputs["recv_x"].shape[1], inputs["recv_expert_count"]
    assert count.min() > M // 3, "every cut should fall inside some expert's rows"
    pieces = []
    for lo, hi in zip(cuts(M), cuts(M)[1:]):
        kw = dict(inputs, recv_expert_count=np.clip(count - lo, 0, hi - lo).astype(count.dtype))
        for name in ("recv_x", "recv_scale_dq", "recv_weights"):
            kw[name] = take(inputs[name], 1, lo, hi)
        pieces.append(run("expert_routed", kw)["recv_y"])
    assert same_bits(one["recv_y"], np.concatenate(pieces, 1))
