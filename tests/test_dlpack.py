"""DLPack tensors in, torch tensors out: every dsv4.<kernel> on torch CPU tensors
gives the NumPy call's bits, without copying, updating InOut tensors in place."""
import dataclasses
import inspect

import ml_dtypes
import numpy as np
import pytest

import dsv4
from dsv4.check import fresh
from conftest import same_bits, to_numpy, to_torch

BF16, FP8 = np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.float8_e4m3fn)
SMALL_CFG = dataclasses.replace(
    dsv4.FLASH, hidden_size=256, q_lora_rank=128, num_attention_heads=4, head_dim=96,
    qk_rope_head_dim=32, o_groups=2, o_lora_rank=64)
LAYERS = {"decode_layer": dict(layer_id=0, n_local_experts=4),
          "prefill_mtp": dict(num_tokens=5, n_local_experts=4),
          "prefill_layer": dict(layer_id=0, chunk_lens=(5,), n_local_experts=4)}


@pytest.fixture
def torch():
    return pytest.importorskip("torch", reason="torch is an optional extra (dsv4[torch])")


def small(kernel, seed=1, **params):
    p = dict(LAYERS.get(kernel) or next(iter(dsv4.specs.CASES[kernel].values())), **params)
    p.update({"T": 3} if "T" in p else {})
    p.update({"B": 2} if "B" in p else {})
    inputs = getattr(dsv4.specs, kernel)(**p, seed=seed, config=SMALL_CFG)
    takes_config = "config" in inspect.signature(dsv4.KERNELS[kernel]).parameters
    return inputs, ({"config": SMALL_CFG} if takes_config else {})


def flat(out, prefix=""):
    for k, v in out.items():
        if isinstance(v, dict):
            yield from flat(v, prefix + k + ".")
        else:
            yield prefix + k, v


@pytest.mark.parametrize("kernel", sorted(dsv4.KERNELS))
def test_torch_in_torch_out_same_bits(torch, kernel):
    inputs, cfg = small(kernel)
    takes_stages = "stages" in inspect.signature(dsv4.KERNELS[kernel]).parameters
    extra = {**cfg, **({"stages": True} if takes_stages else {})}
    want = dsv4.KERNELS[kernel](**fresh(kernel, inputs), **extra)
    tin = {k: to_torch(torch, v) for k, v in inputs.items()}
    got = dsv4.KERNELS[kernel](**tin, **extra)
    got_flat, want_flat = dict(flat(got)), dict(flat(want))
    assert got_flat.keys() == want_flat.keys()
    for name, w in want_flat.items():
        g = got_flat[name]
        assert isinstance(g, torch.Tensor), name
        assert same_bits(to_numpy(torch, g), w), name
    for name in dsv4.KERNELS[kernel].inouts:
        assert got[name] is tin[name], name      # the caller's tensor, updated
        assert same_bits(to_numpy(torch, tin[name]), want[name]), name


def test_inout_tensor_updated_in_place(torch):
    kernel = "decode_compressor_ratio4"
    inputs, cfg = small(kernel, start_pos=8195, history=True)     # a window closes: both written
    tin = {k: to_torch(torch, v) for k, v in inputs.items()}
    state, cache = tin["compress_state"], tin["cmp_kv_cache"]
    ptrs = (state.data_ptr(), cache.data_ptr())
    before = (state.clone(), cache.clone())
    out = dsv4.decode_compressor_ratio4(**tin, **cfg)
    assert out["compress_state"] is state and out["cmp_kv_cache"] is cache
    assert (state.data_ptr(), cache.data_ptr()) == ptrs
    assert not torch.equal(state, before[0])
    assert not torch.equal(cache.view(torch.int16), before[1].view(torch.int16))
    want = dsv4.decode_compressor_ratio4(**fresh(kernel, inputs), **cfg)
    assert same_bits(to_numpy(torch, state), want["compress_state"])
    assert same_bits(to_numpy(torch, cache), want["cmp_kv_cache"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float8_e4m3fn", "int8", "int32"])
def test_contiguous_tensor_is_not_copied(torch, dtype):
    from dsv4._kernels import _as_numpy
    t = torch.zeros(3, 5, dtype=getattr(torch, dtype))
    a = _as_numpy("x", t, torch)
    assert a.ctypes.data == t.data_ptr() and a.shape == (3, 5)
    assert a.dtype.name == dtype
    a[1, 2] = 1
    assert t[1, 2].item() == 1


def test_output_buffer_passed_in_is_filled_and_returned(torch):
    inputs, _ = small("rms_norm")
    buf = torch.empty(inputs["x"].shape, dtype=torch.bfloat16)
    ptr = buf.data_ptr()
    out = dsv4.rms_norm(x=to_torch(torch, inputs["x"]), norm_w=to_torch(torch, inputs["norm_w"]),
                        x_normed=buf)
    assert out["x_normed"] is buf and buf.data_ptr() == ptr
    assert same_bits(to_numpy(torch, buf), dsv4.rms_norm(**inputs)["x_normed"])


def test_outputs_share_memory_with_the_result(torch):
    inputs, _ = small("rms_norm")
    out = dsv4.rms_norm(**{k: to_torch(torch, v) for k, v in inputs.items()})
    y = out["x_normed"]
    assert y.dtype == torch.bfloat16 and tuple(y.shape) == inputs["x"].shape and y.is_contiguous()


def test_mixed_numpy_and_torch_gives_torch(torch):
    inputs, _ = small("rms_norm")
    out = dsv4.rms_norm(x=inputs["x"], norm_w=to_torch(torch, inputs["norm_w"]))
    assert isinstance(out["x_normed"], torch.Tensor)
    assert same_bits(to_numpy(torch, out["x_normed"]), dsv4.rms_norm(**inputs)["x_normed"])


def test_tensor_requiring_grad_is_read(torch):
    inputs, _ = small("rms_norm")
    x = to_torch(torch, inputs["x"]).float().requires_grad_(True).to(torch.bfloat16)
    out = dsv4.rms_norm(x=x, norm_w=to_torch(torch, inputs["norm_w"]))
    assert same_bits(to_numpy(torch, out["x_normed"]), dsv4.rms_norm(**inputs)["x_normed"])


def test_bad_tensors_name_the_argument(torch):
    inputs, _ = small("rms_norm")
    w = to_torch(torch, inputs["norm_w"])
    with pytest.raises(TypeError, match="argument 'x' must be a CPU tensor, got one on meta"):
        dsv4.rms_norm(x=torch.empty(3, 256, dtype=torch.bfloat16, device="meta"), norm_w=w)
    # strict as with NumPy: no silent copy of a non-contiguous tensor, no silent cast
    x_t = to_torch(torch, np.ascontiguousarray(inputs["x"].T)).t()
    with pytest.raises(ValueError, match="argument 'x' must be a C-contiguous"):
        dsv4.rms_norm(x=x_t, norm_w=w)
    with pytest.raises(TypeError, match="argument 'x' must have dtype bfloat16"):
        dsv4.rms_norm(x=to_torch(torch, inputs["x"]).float(), norm_w=w)


def test_failed_call_leaves_inout_tensors_unchanged(torch):
    kernel = "decode_compressor_ratio4"
    inputs, cfg = small(kernel, start_pos=8195, history=True)
    tin = {k: to_torch(torch, v) for k, v in inputs.items()}
    tin["cmp_slot_mapping"][0] = 10 ** 9         # outside the cache
    before = tin["compress_state"].clone(), tin["cmp_kv_cache"].clone()
    with pytest.raises(ValueError, match="cmp_slot_mapping"):
        dsv4.decode_compressor_ratio4(**tin, **cfg)
    assert torch.equal(tin["compress_state"], before[0])
    assert torch.equal(tin["cmp_kv_cache"].view(torch.int16), before[1].view(torch.int16))


def test_golden_takes_torch_tensors(torch):
    golden = dsv4.golden.rms_norm
    assert "x_normed" in inspect.signature(golden).parameters
    inputs, _ = small("rms_norm")
    buf = torch.empty(inputs["x"].shape, dtype=torch.bfloat16)
    out = golden(to_torch(torch, inputs["x"]), to_torch(torch, inputs["norm_w"]), x_normed=buf)
    assert out["x_normed"] is buf
    assert same_bits(to_numpy(torch, buf), dsv4.golden.rms_norm(**inputs)["x_normed"])


# ---- without torch ---------------------------------------------------------------

class Capsule:
    """A DLPack producer that is not torch (as jax or cupy arrays are)."""

    def __init__(self, a):
        self.a = a

    def __dlpack__(self, **kw):
        return self.a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


def test_any_dlpack_producer_gives_numpy():
    inputs, _ = small("rms_norm")
    x = inputs["x"].view(np.int16)       # NumPy exports no bf16: cross as int16 and fail
    with pytest.raises(TypeError, match="argument 'x' must have dtype bfloat16"):
        dsv4.rms_norm(x=Capsule(x), norm_w=inputs["norm_w"])
    kernel = "decode_compressor_ratio4"
    inputs, cfg = small(kernel)
    state = inputs["compress_state"].copy()
    out = dsv4.decode_compressor_ratio4(**dict(inputs, compress_state=Capsule(state)), **cfg)
    want = dsv4.decode_compressor_ratio4(**fresh(kernel, inputs), **cfg)
    assert isinstance(out["compress_state"], np.ndarray)
    assert np.shares_memory(out["compress_state"], state)      # read and updated in place
    assert same_bits(state, want["compress_state"])


def test_numpy_calls_unchanged():
    inputs, _ = small("rms_norm")
    out = dsv4.rms_norm(**inputs)
    assert type(out["x_normed"]) is np.ndarray
    assert "DLPack" in dsv4.rms_norm.__doc__
    assert list(inspect.signature(dsv4.rms_norm).parameters) == ["x", "norm_w", "x_normed", "config"]
