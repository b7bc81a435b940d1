import dataclasses

import ml_dtypes
import numpy as np
import pytest

import dsv4

# every code path, slowest first; the vector ones are compared with scalar bit for bit
PATHS = ("scalar", "avx2", "avxvnni", "avx512", "amx")
SIMD = PATHS[1:]

# FLASH with small attention dims: the leaves' numerics are checked at full size elsewhere
SMALL_ATTN = dataclasses.replace(
    dsv4.FLASH, hidden_size=256, q_lora_rank=128, num_attention_heads=4, head_dim=96,
    qk_rope_head_dim=32, o_groups=2, o_lora_rank=64)
# a small model for the blocks, layers and forward: SMALL_ATTN with a small MoE and indexer
SMALL = dataclasses.replace(
    SMALL_ATTN, name="small", moe_intermediate_size=128, n_routed_experts=8, index_n_heads=8,
    vocab_size=4096, max_position_embeddings=2048)


@pytest.fixture
def threads():
    """Set the kernel thread count for one test; restored afterwards."""
    before = dsv4.get_num_threads()
    yield dsv4.set_num_threads
    dsv4.set_num_threads(before)


@pytest.fixture
def isa():
    """Switch the SIMD path for one test; restored afterwards."""
    before = dsv4.get_isa()
    yield dsv4.set_isa
    dsv4.set_isa(before)


def small_params(kernel, params=None):
    """Builder arguments of a small case of `kernel`: `params` (default: its first deployment
    case, dsv4.specs.CASES) with T = 3, B = 2 and S at most 3."""
    params = dict(params or next(iter(dsv4.specs.CASES[kernel].values())))
    if "T" in params:
        params["T"] = 3
    if "B" in params:
        params["B"] = 2
    if "S" in params:
        params["S"] = min(params["S"], 3)
    return params


def same_bits(a, b):
    """Arrays equal bit for bit (NaN payloads included)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.hasobject or a.dtype.itemsize not in (1, 2, 4, 8):
        return np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
    bits = np.dtype(f"u{a.dtype.itemsize}")     # compared in place, no copy
    return bool(np.array_equal(a.view(bits), b.view(bits)))


def to_torch(torch, a):
    """A torch tensor holding a copy of `a` (bf16/fp8 through same-width ints); non-arrays as given."""
    if not isinstance(a, np.ndarray):
        return a
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    if a.dtype == ml_dtypes.float8_e4m3fn:
        return torch.from_numpy(a.view(np.uint8).copy()).view(torch.float8_e4m3fn)
    return torch.from_numpy(a.copy())


def to_numpy(torch, t):
    """The NumPy view of a CPU tensor, bf16 and fp8 as ml_dtypes."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    return t.numpy()
