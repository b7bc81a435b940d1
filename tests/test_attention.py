"""C-kernel behaviour of the sparse-attention family beyond the generic tests:
index validation before any write, the documented skip rules, random index sets."""
import dataclasses

import numpy as np
import pytest

import dsv4
from conftest import same_bits

CMP = dsv4.specs.COMPARATORS


def check(kernel, d, **kw):
    d = dict(d, **kw)
    c = dsv4.KERNELS[kernel](**d)["attn_out"]
    g = getattr(dsv4.golden, kernel)(**d)["attn_out"]
    r = CMP[kernel]["attn_out"](c, g)
    assert r, r
    return c, g


@pytest.mark.parametrize("kernel", ["decode_sparse_attn", "decode_sparse_attn_hca"])
def test_bad_block_tables_raise_before_writing(kernel):
    d = getattr(dsv4.specs, kernel)(B=2, S=1, seed=1)
    buf = np.full((2, d["wo_b"].shape[0]), 3, d["q"].dtype)
    for table, pool in (("ori_block_table", "ori_kv"), ("cmp_block_table", "cmp_kv")):
        for bad in (-1, d[pool].shape[0]):
            t = d[table].copy()
            t[1, 0] = bad
            before = buf.copy()
            with pytest.raises(ValueError, match=rf"{table}\[1, 0\] = {bad} is outside"):
                dsv4.KERNELS[kernel](**dict(d, **{table: t}), attn_out=buf)
            assert same_bits(buf, before)
            with pytest.raises(ValueError, match=table):
                getattr(dsv4.golden, kernel)(**dict(d, **{table: t}))


def test_decode_compressed_page_beyond_the_table():
    d = dsv4.specs.decode_sparse_attn(B=2, S=1, seed=2)
    idx = d["cmp_sparse_indices"].copy()
    W, S, CM, BLOCK = 128, 1, d["cmp_block_table"].shape[1], d["cmp_kv"].shape[1]
    idx[1, 200] = W + S + CM * BLOCK            # first slot past the table
    with pytest.raises(ValueError, match=r"cmp_sparse_indices\[1, 200\]"):
        dsv4.decode_sparse_attn(**dict(d, cmp_sparse_indices=idx))
    # a -1 in an unused table slot is legal
    d["cmp_block_table"] = d["cmp_block_table"].copy()
    d["cmp_block_table"][:, -1] = -1
    check("decode_sparse_attn", d)


def test_prefill_skip_rules_and_num_tokens():
    d = dsv4.specs.prefill_sparse_attn(T=16, compress_ratio=4, seed=3)
    idx, lens = d["cmp_sparse_indices"].copy(), d["cmp_sparse_lens"].copy()
    CAP = d["cmp_block_table"].shape[0] * d["cmp_kv"].shape[1]
    idx[5, 1] = 128 + 16 + CAP + 7              # compressed slot past the table: skipped
    idx[6, 0] = 128 + 15                        # overlay row 15 >= num_tokens: skipped
    lens[7] = -4                                # no index read
    d = dict(d, cmp_sparse_indices=idx, cmp_sparse_lens=lens)
    c, g = check("prefill_sparse_attn", d, num_tokens=12)
    assert not c[12:].astype(np.float32).any() and not c[7].astype(np.float32).any()
    for bad in (-1, 17):
        with pytest.raises(ValueError, match="num_tokens"):
            dsv4.prefill_sparse_attn(**dict(d, num_tokens=bad))
    t = d["ori_block_table"].copy()
    t[0] = 5
    idx[2, 0] = 3                                # a ring slot: its page is dereferenced
    with pytest.raises(ValueError, match=r"ori_block_table\[0\] = 5"):
        dsv4.prefill_sparse_attn(**dict(d, ori_block_table=t, cmp_sparse_indices=idx))


def test_decode_requests_must_divide_tokens():
    d = dsv4.specs.decode_sparse_attn(B=2, S=2, seed=4)
    with pytest.raises(ValueError, match="multiple of the 3 requests"):
        dsv4.decode_sparse_attn(**dict(d, ori_block_table=np.zeros((3, 1), np.int32),
                                        cmp_block_table=np.zeros((3, 32), np.int32)))


@pytest.mark.parametrize("seed", range(6))
def test_random_index_sets(seed):
    rng = np.random.default_rng(seed)
    d = dsv4.specs.decode_sparse_attn(B=2, S=2, seed=seed)
    T, K = d["cmp_sparse_indices"].shape
    hi = 128 + 2 + d["cmp_block_table"].shape[1] * d["cmp_kv"].shape[1]
    idx = rng.integers(-3, hi, size=(T, K)).astype(np.int32)
    idx[rng.random((T, K)) < 0.6] = -1           # holes, whole empty tiles, duplicates
    idx[0] = -1                                  # a token with nothing to attend
    d["cmp_sparse_indices"] = idx
    d["attn_sink"] = rng.standard_normal(d["attn_sink"].shape).astype(np.float32)
    c, _ = check("decode_sparse_attn", d)
    assert not c[0].astype(np.float32).any()
    sw = dsv4.specs.decode_sparse_attn_swa(B=2, S=2, seed=seed)
    sw["cmp_sparse_indices"] = rng.integers(-2, 131, size=sw["cmp_sparse_indices"].shape).astype(np.int32)
    check("decode_sparse_attn_swa", sw)
    pf = dsv4.specs.prefill_sparse_attn(T=24, compress_ratio=4, seed=seed)
    T, K = pf["cmp_sparse_indices"].shape
    pidx = rng.integers(-2, 128 + 24 + 4096 + 50, size=(T, K)).astype(np.int32)
    pidx[pidx < 128] = -1                        # the fixture's ring page is never filled
    pf["cmp_sparse_indices"] = pidx
    pf["cmp_sparse_lens"] = rng.integers(-5, 500, size=T).astype(np.int32)
    check("prefill_sparse_attn", pf, num_tokens=int(rng.integers(0, T + 1)))


def test_swa_window_wider_than_a_tile():
    cfg = dataclasses.replace(dsv4.FLASH, sliding_window=200)
    d = dsv4.specs.decode_sparse_attn_swa(B=2, S=1, seed=5, config=cfg)
    check("decode_sparse_attn_swa", d, config=cfg)
    big = dsv4.specs.decode_sparse_attn_swa(B=129, S=1, seed=5)
    with pytest.raises(ValueError, match="T = 129"):
        dsv4.decode_sparse_attn_swa(**big)
