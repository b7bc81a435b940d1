"""C-kernel behaviour of the MoE family that the generic tests do not reach:
routing validation, capacity, receive-buffer tails, no partial writes."""
import dataclasses

import numpy as np
import pytest

import dsv4
from conftest import same_bits


# routing and capacity do not depend on the widths: a small model, carried in the inputs
SMALL_MOE = dataclasses.replace(dsv4.FLASH, hidden_size=256, moe_intermediate_size=128)


def small_moe(**kw):
    return dict(dsv4.specs.moe(T=4, n_ranks=2, n_local_experts=4, seed=3, config=SMALL_MOE, **kw),
                config=SMALL_MOE)


@pytest.mark.parametrize("fn", [dsv4.gate, dsv4.golden.gate])
def test_gate_rejects_bad_hash_lookups(fn):
    d = dsv4.specs.gate(T=4, layer_id=0, seed=1)
    bad = dict(d, input_ids=d["input_ids"].copy())
    bad["input_ids"][2] = d["tid2eid"].shape[0]
    with pytest.raises(ValueError, match=r"input_ids\[2\]"):
        fn(**bad)
    bad = dict(d, tid2eid=d["tid2eid"].copy())
    bad["tid2eid"][d["input_ids"][1], 3] = d["gate_w"].shape[0]
    with pytest.raises(ValueError, match="tid2eid"):
        fn(**bad)
    # score layers never read the table
    fn(**dict(bad, layer_id=10))


def test_gate_inactive_rows():
    d = dsv4.specs.gate(T=6, layer_id=10, num_tokens=4, seed=2)
    out = dsv4.gate(**d)
    full = dsv4.gate(**dict(d, num_tokens=None))
    assert np.all(out["indices"][4:] == 0) and np.all(out["weights"][4:] == 0)
    assert np.all(out["x_norm_scale"][4:] == 0)
    assert same_bits(out["x_norm_i8"], full["x_norm_i8"]) and same_bits(out["x_norm"], full["x_norm"])
    assert same_bits(out["indices"][:4], full["indices"][:4])
    np.testing.assert_allclose(out["weights"][:4].sum(-1), dsv4.FLASH.routed_scaling_factor, rtol=1e-6)
    for n in (-3, 0):
        assert np.all(dsv4.gate(**dict(d, num_tokens=n))["indices"] == 0)


def test_gate_topk_is_stable_on_ties():
    d = dsv4.specs.gate(T=2, layer_id=10, seed=4)
    # identical router rows for experts 5 and 9 and no bias: equal scores, lower id first
    d["gate_w"] = d["gate_w"].copy()
    d["gate_w"][9] = d["gate_w"][5]
    d["gate_w"][[5, 9]] *= 40          # make them the two best
    d["gate_bias"] = np.zeros_like(d["gate_bias"])
    for fn in (dsv4.gate, dsv4.golden.gate):
        idx = fn(**d)["indices"]
        assert list(idx[0, :2]) == [5, 9], idx[0]


def test_expert_routed_counts_and_tails():
    d = dsv4.specs.expert_routed(T=8, n_local_experts=4, seed=5)
    counts = d["recv_expert_count"][:, 0]
    M = d["recv_x"].shape[1]
    # garbage beyond the counts must not reach any output
    noisy = {k: v.copy() for k, v in d.items()}
    for e, c in enumerate(counts):
        noisy["recv_scale_dq"][e, c:] = np.nan
        noisy["recv_weights"][e, c:] = np.inf
        noisy["recv_x"][e, c:] = 127
    a, b = dsv4.expert_routed(**d)["recv_y"], dsv4.expert_routed(**noisy)["recv_y"]
    assert same_bits(a, b)
    for e, c in enumerate(counts):
        assert not a[e, c:].astype(np.float32).any() and not np.signbit(a[e, c:].astype(np.float32)).any()
    for bad in (-1, M + 1):
        cnt = d["recv_expert_count"].copy()
        cnt[2, 0] = bad
        with pytest.raises(ValueError, match=r"recv_expert_count\[2, 0\]"):
            dsv4.expert_routed(**dict(d, recv_expert_count=cnt))


def test_moe_capacity_overflow_writes_nothing():
    d = small_moe(layer_id=0)
    # every token of both ranks picks expert 0 twice: 2 * (2 * 4) = 16 rows > R*T = 8
    tid = d["tid2eid"].copy()
    tid[:, :, 0] = 0
    tid[:, :, 1] = 0
    d["tid2eid"] = tid
    buf = np.full(d["x_hc"].shape, 7, d["x_hc"].dtype)
    before = buf.copy()
    with pytest.raises(ValueError, match="expert 0 .*receive buffer holds R \\* T = 8"):
        dsv4.moe(**d, x_next=buf)
    assert same_bits(buf, before)
    with pytest.raises(ValueError, match="expert 0"):
        dsv4.golden.moe(**d)
    # a duplicate that still fits is routed twice, as the golden does
    d["tid2eid"][:, :, 1] = d["tid2eid"][:, :, 2]
    out = dsv4.moe(**dict(d, num_tokens=1))
    ref = dsv4.golden.moe(**dict(d, num_tokens=1))
    assert dsv4.specs.COMPARATORS["moe"]["x_next"](out["x_next"], ref["x_next"])


def test_moe_rejects_inconsistent_expert_counts():
    d = small_moe(layer_id=10)
    d["gate_w"] = np.ascontiguousarray(d["gate_w"][:, :6])
    d["gate_bias"] = np.ascontiguousarray(d["gate_bias"][:, :6])
    with pytest.raises(ValueError, match="R \\* E_l"):
        dsv4.moe(**d)


def test_moe_inactive_tokens_are_the_residual_mix():
    d = small_moe(layer_id=10, num_tokens=2)
    out = dsv4.moe(**d)["x_next"]
    # rows from num_tokens on: hc_post of a zero FFN output
    for r in range(2):
        hp = dsv4.hc_pre(d["x_hc"][r], d["hc_ffn_fn"][r], d["hc_ffn_scale"][r], d["hc_ffn_base"][r])
        zero = np.zeros((4, d["x_hc"].shape[-1]), d["x_hc"].dtype)
        ref = dsv4.hc_post(zero, d["x_hc"][r], hp["post"], hp["comb"])["y"]
        assert same_bits(out[r, 2:], ref[2:])
        assert not same_bits(out[r, :2], ref[:2])


def test_moe_rank_outputs_depend_on_own_tokens_only():
    d = small_moe(layer_id=10)
    out = dsv4.moe(**d)["x_next"]
    other = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in d.items()}
    other["x_hc"][1] = other["x_hc"][1][::-1]         # rank 1's tokens change
    out2 = dsv4.moe(**other)["x_next"]
    assert same_bits(out[0], out2[0])
