"""Attention blocks (spec chapter 06 §2-§4): the glue worked out by hand, C against golden
stage by stage, chained decode steps, and bad addresses that must change nothing.

The generic checks every kernel gets (deployment cases, thread counts, code paths,
dtypes, shapes, input buffers) are in test_kernels.py."""

import numpy as np
import pytest

import dsv4
from dsv4.check import fresh
from dsv4.compare import compare_outputs
from dsv4.golden.blocks import prefill_csa_rows, window_columns
from conftest import SMALL_ATTN, same_bits

DECODE = ["decode_attention_swa", "decode_attention_hca", "decode_attention_csa"]
PREFILL = ["prefill_attention_swa", "prefill_attention_hca", "prefill_attention_csa"]
BLOCKS = DECODE + PREFILL


# ---- the index rows, by hand -----------------------------------------------------------

def test_window_columns_by_hand():
    # spec §6.5.1 row 0 (p = 300): ring slots 45..127, 0..43, then the token itself
    pos = np.array([300])
    assert window_columns(pos, 0, 0, 1, 128).tolist() == list(range(45, 128)) + list(range(44)) + [128]
    # a young request: positions 0..5, its own slot 5 as the overlay
    assert window_columns(np.array([5]), 0, 0, 1, 128).tolist() == [0, 1, 2, 3, 4, 128]
    # p = 127: the ring is full, oldest first from slot 0; slot 127 is the token
    assert window_columns(np.array([127]), 0, 0, 1, 128).tolist() == list(range(127)) + [128]
    # two tokens per request: token 1 sees token 0's slot as overlay 128, itself as 129
    cols = window_columns(np.array([9, 10]), 0, 1, 2, 128)
    assert cols.tolist() == list(range(9)) + [128, 129]


def test_prefill_csa_rows_by_hand():
    # a tile starting at 300 (spec §6.5.1), 3 active rows; the indexer ranked slots
    # 80, 74, 3, 75 for every row (raw = slot + WIN + T = slot + 256)
    T, WIN, K, pad = 128, 128, 640, 384
    pos = np.concatenate([300 + np.arange(3), np.arange(3, T)])
    top = np.full((T, 256), -1, np.int64)
    top[:, :4] = np.array([80, 74, 3, 75]) + 256
    idx, lens = prefill_csa_rows(pos, 3, top, WIN, T, K, pad)
    # row 0: keys 173..300 (ring slots 45..127, 0..43, then itself as overlay 128); visible
    # compressed slots are those below 301 // 4 = 75: 74 and 3, in the indexer's order
    assert idx[0, :128].tolist() == list(range(45, 128)) + list(range(44)) + [128]
    assert idx[0, 128:131].tolist() == [74 + 256, 3 + 256, -1]
    assert lens[0] == 130
    # row 2 (p = 302): keys 175..302, the last three are rows 0..2; still 75 visible
    assert idx[2, 125:128].tolist() == [128, 129, 130]
    assert idx[2, :125].tolist() == list(range(47, 128)) + list(range(44))
    assert lens[2] == 130
    # row 3 onwards are padding
    assert (idx[3:] == -1).all() and (lens[3:] == 0).all()
    # a short pad cuts the compressed part
    _, lens = prefill_csa_rows(pos, 3, top, WIN, T, K, 129)
    assert lens[0] == 129


# ---- C against golden, stage by stage ----------------------------------------------------

def small_block(kernel, seed=5, **kw):
    if kernel.startswith("decode"):
        return getattr(dsv4.specs, kernel)(B=kw.pop("B", 3), seed=seed, config=SMALL_ATTN, **kw)
    return getattr(dsv4.specs, kernel)(T=kw.pop("T", 16), seed=seed, config=SMALL_ATTN, **kw)


LEAF = {"decode_attention_swa": "decode_sparse_attn_swa",
        "decode_attention_hca": "decode_sparse_attn_hca",
        "decode_attention_csa": "decode_sparse_attn", **{k: "prefill_sparse_attn" for k in PREFILL}}


def leaf_inputs(kernel, inputs, out):
    """The sparse-attention leaf's arguments as the block must have passed them: the
    block's q, kv, RoPE rows and index rows, the caches after its compressors."""
    st = out["stages"]
    R = SMALL_ATTN.qk_rope_head_dim
    cos, sin = dsv4.gather_rope_rows(inputs["freqs_cos"], inputs["freqs_sin"], inputs["position_ids"])
    d = dict(q=st["q"], ori_kv=inputs["kv_cache"], attn_sink=inputs["attn_sink"],
             freqs_cos=np.ascontiguousarray(cos[:, :R]), freqs_sin=np.ascontiguousarray(sin[:, :R]),
             wo_a=inputs["wo_a"], wo_b=inputs["wo_b"], wo_b_scale=inputs["wo_b_scale"])
    table = inputs["block_table"] if "block_table" in inputs else inputs["ori_block_table"]
    if kernel.startswith("decode"):
        d.update(ori_block_table=table, mtp_kv_overlay=st["kv"],
                 cmp_sparse_indices=st["sparse_indices"])
        if kernel != "decode_attention_swa":
            d.update(cmp_kv=out["cmp_kv"], cmp_block_table=inputs["cmp_block_table"])
        return d
    d.update(ori_block_table=table, kv_overlay=st["kv"], num_tokens=inputs["num_tokens"])
    if kernel == "prefill_attention_swa":      # no compressed cache: one zero page
        d.update(cmp_kv=np.zeros((1, 128, 1, st["kv"].shape[1]), st["kv"].dtype),
                 cmp_block_table=np.zeros(32, np.int32))
    else:
        d.update(cmp_kv=out["cmp_kv"], cmp_block_table=inputs["cmp_block_table"])
    if kernel == "prefill_attention_csa":
        d.update(cmp_sparse_indices=st["sparse_indices"], cmp_sparse_lens=st["sparse_lens"])
    else:
        d.update(cmp_sparse_indices=inputs["cmp_sparse_indices"],
                 cmp_sparse_lens=inputs["cmp_sparse_lens"])
    return d


@pytest.mark.parametrize("kernel", BLOCKS)
def test_stages_match_the_golden(kernel):
    inputs = small_block(kernel)
    c = dsv4.KERNELS[kernel](**fresh(kernel, inputs), config=SMALL_ATTN, stages=True)
    g = getattr(dsv4.golden, kernel)(**fresh(kernel, inputs), config=SMALL_ATTN, stages=True)
    assert set(c["stages"]) == set(g["stages"])
    cs, gs = c["stages"], g["stages"]
    # the index rows of decode SWA and HCA come from the positions alone
    if kernel in ("decode_attention_swa", "decode_attention_hca"):
        assert same_bits(cs["sparse_indices"], gs["sparse_indices"])
    for name in ("x_mixed", "x_normed", "q", "kv"):
        rep = compare_outputs({name: cs[name]}, {name: gs[name]},
                              {name: dsv4.compare.ratio_allclose(atol=1e-4, rtol=1 / 128)})
        assert rep, str(rep)
    # each implementation hands its sparse-attention leaf exactly its own stages: the block's
    # attn_out is the leaf's on them, bit for bit (small heads make C and golden attn_out
    # differ by an int8 step now and then, so they are compared as whole blocks elsewhere)
    leaf = LEAF[kernel]
    assert same_bits(dsv4.KERNELS[leaf](**leaf_inputs(kernel, inputs, c), config=SMALL_ATTN)["attn_out"],
                     cs["attn_out"])
    assert same_bits(getattr(dsv4.golden, leaf)(**leaf_inputs(kernel, inputs, g),
                                                config=SMALL_ATTN)["attn_out"], gs["attn_out"])
    # the stages are what the kernel computes either way
    plain = dsv4.KERNELS[kernel](**fresh(kernel, inputs), config=SMALL_ATTN)
    assert "stages" not in plain
    for name in plain:
        assert same_bits(plain[name], c[name]), name


@pytest.mark.parametrize("kernel", BLOCKS)
def test_write_back_lands_in_the_ring(kernel):
    # after the attention, each active token's kv is in its ring slot; no other row changed
    inputs = small_block(kernel)
    kw = fresh(kernel, inputs)
    before = kw["kv_cache"].copy()
    out = dsv4.KERNELS[kernel](**kw, config=SMALL_ATTN, stages=True)
    n = inputs.get("num_tokens", len(inputs["position_ids"]))
    slots = np.asarray(inputs["ori_slot_mapping"])[:n]
    ring = out["kv_cache"].reshape(-1, out["kv_cache"].shape[-1])
    for t, s in enumerate(slots):
        if s >= 0:
            assert same_bits(ring[s], out["stages"]["kv"][t])
    untouched = np.setdiff1d(np.arange(ring.shape[0]), slots[slots >= 0])
    assert same_bits(ring[untouched], before.reshape(ring.shape)[untouched])


# ---- chained calls ---------------------------------------------------------------------

def advance(inputs, step, R):
    """The same requests one position later (S = 1): positions, slots and lengths move on."""
    from dsv4.specs.compressor import compressed_slot_mapping, state_slot_mapping
    d = dict(inputs)
    pos = np.asarray(inputs["position_ids"]).astype(np.int64) + step
    d["position_ids"] = pos.astype(np.int32)
    d["ori_slot_mapping"] = (np.arange(len(pos)) * 128 + pos % 128).astype(np.int64)
    if "kv_seq_lens" in d:
        d["kv_seq_lens"] = (pos + 1).astype(np.int32)
    if R:
        b = np.arange(len(pos))
        page = 8 if R == 128 else 4
        st = np.asarray(inputs["compress_state_block_table"])
        d["state_slot_mapping"] = state_slot_mapping(pos[:, None], st, page).reshape(-1)
        d["cmp_slot_mapping"] = compressed_slot_mapping(
            pos[:, None], np.asarray(inputs["cmp_block_table"]), R).reshape(-1)
        if R == 4:
            d["inner_state_slot_mapping"] = state_slot_mapping(
                pos[:, None], np.asarray(inputs["inner_compress_state_block_table"]), 4).reshape(-1)
            d["idx_slot_mapping"] = compressed_slot_mapping(
                pos[:, None], np.asarray(inputs["idx_block_table"]), 4).reshape(-1)
        del b
    return d


@pytest.mark.parametrize("kernel,R,start", [("decode_attention_swa", 0, 125),
                                            ("decode_attention_hca", 128, 125),
                                            ("decode_attention_csa", 4, 5)])
def test_decode_steps_across_window_boundaries(kernel, R, start):
    # consecutive steps from `start`, crossing a compression window's end (and, for SWA and
    # HCA, the ring's wrap at 128); C and golden each carry their own caches forward
    inputs = small_block(kernel, B=2, start_pos=start)
    c_state = fresh(kernel, inputs)
    g_state = fresh(kernel, inputs)
    cmp = dsv4.specs.COMPARATORS[kernel]
    for step in range(5):
        d = advance(inputs, step, R)
        c = dsv4.KERNELS[kernel](**{**d, **{k: c_state[k] for k in dsv4.KERNELS[kernel].inouts}},
                                 config=SMALL_ATTN)
        g = getattr(dsv4.golden, kernel)(**{**d, **{k: g_state[k] for k in dsv4.KERNELS[kernel].inouts}},
                                         config=SMALL_ATTN)
        rep = compare_outputs(c, g, cmp, inputs=d)
        assert rep, f"step {step}: {rep}"
        for k in dsv4.KERNELS[kernel].inouts:
            c_state[k], g_state[k] = c[k], g[k]
    if R:
        # the compressed rows the steps completed went to the cache in both
        rep = compare_outputs({"cmp_kv": c_state["cmp_kv"]}, {"cmp_kv": g_state["cmp_kv"]},
                              {"cmp_kv": dsv4.compare.ratio_allclose(atol=1e-4, rtol=1 / 128)})
        assert rep, str(rep)


# ---- bad addresses change nothing ------------------------------------------------------

ADDRESSES = {
    "decode_attention_swa": ["ori_slot_mapping", "block_table", "position_ids"],
    "decode_attention_hca": ["ori_slot_mapping", "ori_block_table", "cmp_block_table",
                             "cmp_slot_mapping", "state_slot_mapping",
                             "compress_state_block_table", "position_ids"],
    "decode_attention_csa": ["ori_slot_mapping", "ori_block_table", "cmp_block_table",
                             "idx_block_table", "cmp_slot_mapping", "idx_slot_mapping",
                             "state_slot_mapping", "inner_state_slot_mapping", "position_ids"],
    "prefill_attention_swa": ["ori_slot_mapping", "block_table", "position_ids"],
    "prefill_attention_hca": ["ori_slot_mapping", "ori_block_table", "cmp_sparse_indices",
                              "cmp_slot_mapping", "state_slot_mapping", "position_ids"],
    "prefill_attention_csa": ["ori_slot_mapping", "ori_block_table", "cmp_block_table",
                              "cmp_slot_mapping", "idx_slot_mapping", "state_slot_mapping",
                              "inner_state_slot_mapping", "position_ids"],
}
CASES = [(k, name) for k, names in ADDRESSES.items() for name in names]


def poisoned(inputs, name):
    """inputs with one entry of `name` out of range, where the block reads or writes it."""
    bad = np.array(inputs[name], copy=True)
    flat = bad.reshape(-1)
    if name.endswith("slot_mapping"):
        flat[int(np.flatnonzero(flat >= 0)[0])] = 10 ** 9    # an entry that is written
    elif name == "cmp_sparse_indices":
        # a compressed slot on the second page, which HCA's table leaves unmapped (-1)
        T = bad.shape[0]
        assert np.asarray(inputs["cmp_block_table"])[1] < 0
        bad[0, int(inputs["cmp_sparse_lens"][0]) - 1] = 128 + T + 128
    else:
        flat[0] = 10 ** 6
    return dict(inputs, **{name: bad})


@pytest.mark.parametrize("kernel,name", CASES, ids=[f"{k}-{n}" for k, n in CASES])
def test_bad_address_raises_and_changes_nothing(kernel, name):
    # positions where windows complete, so that every slot mapping is written through
    if kernel.startswith("prefill"):
        inputs = small_block(kernel, T=8, start_pos=124)
    else:
        inputs = small_block(kernel, B=2, start_pos=[127, 3])
    bad = poisoned(inputs, name)
    for impl in (dsv4.KERNELS[kernel], getattr(dsv4.golden, kernel)):
        kw = fresh(kernel, bad)
        before = {k: kw[k].copy() for k in dsv4.KERNELS[kernel].inouts}
        with pytest.raises(ValueError):
            impl(**kw, config=SMALL_ATTN)
        for k, v in before.items():
            assert same_bits(kw[k], v), f"{impl.__module__}: {k} changed"


def test_prefill_then_decode_steps_share_the_ring():
    # a request prefilled (SWA tile of 10 tokens from 0), then decoded at positions 10 and
    # 11 on the ring the prefill left: the window ring is the one layout both phases share
    pre = small_block("prefill_attention_swa", T=16, start_pos=0, num_tokens=10)
    dec = small_block("decode_attention_swa", B=1, start_pos=10)
    for k in ("hc_attn_fn", "hc_attn_scale", "hc_attn_base", "attn_norm_w", "wq_a", "wq_b",
              "wq_b_scale", "wkv", "gamma_cq", "gamma_ckv", "freqs_cos", "freqs_sin",
              "attn_sink", "wo_a", "wo_b", "wo_b_scale"):
        dec[k] = pre[k]                                   # one layer's weights
    rings = {}
    for name, impl in (("C", dsv4.KERNELS), ("golden", dsv4.golden)):
        p = getattr(impl, "prefill_attention_swa") if name == "golden" else impl["prefill_attention_swa"]
        d = getattr(impl, "decode_attention_swa") if name == "golden" else impl["decode_attention_swa"]
        ring = fresh("prefill_attention_swa", pre)["kv_cache"]
        out = p(**dict(pre, kv_cache=ring), config=SMALL_ATTN, stages=True)
        prefill_kv = out["stages"]["kv"][:10]
        assert same_bits(ring.reshape(-1, ring.shape[-1])[:10], prefill_kv)
        xs = []
        for step in range(2):
            x = advance(dec, step, 0)
            x["kv_cache"] = ring                          # [1, 128, 1, HD]: the same page
            xs.append(d(**x, config=SMALL_ATTN)["x_out"])
        rings[name] = (ring, xs)
    cmp = dsv4.specs.COMPARATORS["decode_attention_swa"]
    for step in range(2):
        rep = compare_outputs({"x_out": rings["C"][1][step]}, {"x_out": rings["golden"][1][step]}, cmp)
        assert rep, f"step {step}: {rep}"
    rep = compare_outputs({"kv_cache": rings["C"][0]}, {"kv_cache": rings["golden"][0]}, cmp)
    assert rep, str(rep)


@pytest.mark.parametrize("kernel,params", [("decode_attention_csa", dict(B=2)),
                                           ("decode_attention_hca", dict(B=2)),
                                           ("prefill_attention_hca", dict(T=16, start_pos=120)),
                                           ("prefill_attention_csa", dict(T=16, start_pos=40))])
def test_demo_preset(kernel, params):
    inputs = getattr(dsv4.specs, kernel)(**params, config="demo")
    c = dsv4.KERNELS[kernel](**fresh(kernel, inputs), config="demo")
    g = getattr(dsv4.golden, kernel)(**fresh(kernel, inputs), config="demo")
    rep = compare_outputs(c, g, dsv4.specs.COMPARATORS[kernel], inputs=inputs)
    assert rep, str(rep)
