"""pypto-lib case directories: torch.save files read and written without torch,
and `python -m dsv4 golden` between them."""
import dataclasses
import hashlib
import inspect
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import dsv4
from dsv4.case import golden_main, load_case, load_tensor, save_outputs, save_tensor
from dsv4.check import fresh
from conftest import same_bits, to_numpy, to_torch

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent
BF16, FP8 = np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.float8_e4m3fn)

SMALL = dict(hidden_size=256, q_lora_rank=128, num_attention_heads=4, head_dim=96,
             qk_rope_head_dim=32, o_groups=2, o_lora_rank=64)
SMALL_CFG = dataclasses.replace(dsv4.FLASH, **SMALL)


def small_inputs(kernel, **params):
    p = dict(next(iter(dsv4.specs.CASES[kernel].values())))
    p.update({"T": 3} if "T" in p else {}, **({"B": 2} if "B" in p else {}), **params)
    return getattr(dsv4.specs, kernel)(**p, seed=4, config=SMALL_CFG)


def config_file(tmp_path):
    f = tmp_path / "small.json"
    f.write_text(json.dumps({"base": "flash", **SMALL}))
    return f


def expected_fixture_tensors():
    """What tests/data/make_fixtures.py put in tensors.pt, recomputed in NumPy."""
    k = np.arange(12)
    frac = (k / 8 - 0.5).reshape(3, 4)
    base = np.arange(10, dtype=np.int64)
    return {
        "float32": frac.astype(np.float32), "bfloat16": frac.astype(BF16),
        "float16": frac.astype(np.float16), "float8_e4m3fn": frac.astype(FP8),
        "int8": (k - 6).astype(np.int8).reshape(3, 4),
        "int32": (k * 1000003 - 6000000).astype(np.int32).reshape(3, 4),
        "int64": (k * 2 ** 40 - 3).reshape(3, 4),
        "bool": (k % 3 == 0).reshape(3, 4),
        "uint8": (k * 20 + 10).astype(np.uint8).reshape(3, 4),
        "view": np.arange(24, dtype=np.float32).reshape(4, 6)[1:, ::2],
        "transposed": np.arange(6, dtype=np.int32).reshape(2, 3).T,
        "scalar": np.array(1027, np.int32),
        "head": base[:5], "tail": base[5:],
    }


# ---- reading torch's files without torch -----------------------------------------

def test_fixture_every_dtype_view_and_scalar():
    got = load_tensor(DATA / "tensors.pt")
    want = expected_fixture_tensors()
    assert set(got) == set(want)
    for name, w in want.items():
        assert got[name].dtype == w.dtype, name
        assert same_bits(got[name], w), name
        assert got[name].flags.c_contiguous, name


def test_fixture_case_directory():
    inputs, outputs = load_case(DATA / "rms_norm")
    assert {k: (v.dtype, v.shape) for k, v in inputs.items()} == {
        "x": (BF16, (3, 64)), "norm_w": (BF16, (64,))}
    assert {k: (v.dtype, v.shape) for k, v in outputs.items()} == {"x_normed": (BF16, (3, 64))}
    # x_normed was computed by torch: dsv4 must pass pypto-lib's comparator against it
    report = dsv4.verify("rms_norm", outputs, inputs)
    assert report, str(report)


def test_case_dir_found_from_work_dir(tmp_path):
    shutil.copytree(DATA / "rms_norm", tmp_path / "data")
    a = load_case(tmp_path)
    b = load_case(tmp_path / "data")
    assert a[0].keys() == b[0].keys() == {"x", "norm_w"}
    with pytest.raises(FileNotFoundError, match="no in/"):
        load_case(tmp_path / "data" / "in")


# ---- writing, read back without torch -------------------------------------------

ALL = [np.float32, np.float64, np.float16, BF16, FP8, np.dtype(ml_dtypes.float8_e5m2), np.int8,
       np.int16, np.int32, np.int64, np.uint8, np.uint16, np.bool_]


@pytest.mark.parametrize("dtype", ALL, ids=[np.dtype(d).name for d in ALL])
@pytest.mark.parametrize("shape", [(), (0, 3), (2, 3, 5)])
def test_save_then_load(tmp_path, dtype, shape):
    a = (np.arange(int(np.prod(shape))) % 7 - 3).reshape(shape).astype(dtype)
    save_tensor(tmp_path / "t.pt", a)
    b = load_tensor(tmp_path / "t.pt")
    assert b.dtype == a.dtype and same_bits(a, b)


def test_save_non_contiguous_and_large_shape(tmp_path):
    a = np.arange(70000, dtype=np.int8)[::-1]       # negative stride; sizes past 16 bits
    save_tensor(tmp_path / "t.pt", a)
    assert same_bits(load_tensor(tmp_path / "t.pt"), np.ascontiguousarray(a))


def test_storage_aligned_to_64_bytes(tmp_path):
    save_tensor(tmp_path / "t.pt", np.ones((3, 5), np.float32))
    with open(tmp_path / "t.pt", "rb") as f, zipfile.ZipFile(f) as zf:
        info = zf.getinfo("t/data/0")
        f.seek(info.header_offset)
        head = f.read(30)
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0


def test_save_outputs_layout(tmp_path):
    shutil.copytree(DATA / "rms_norm" / "in", tmp_path / "in")
    x = np.ones((2, 4), BF16)
    written = save_outputs(tmp_path, {"x_normed": x, "n": np.array(3, np.int32)})
    assert written == [tmp_path / "out" / "x_normed.pt", tmp_path / "out" / "n.pt"]
    _, outputs = load_case(tmp_path)
    assert same_bits(outputs["x_normed"], x) and outputs["n"].shape == ()
    with pytest.raises(TypeError, match="not NumPy arrays"):
        save_outputs(tmp_path, {"stages": {}})


# ---- files that are wrong or hostile -------------------------------------------

def _zip_with_pickle(path, payload, extra=()):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("t/data.pkl", payload)
        for name, data in extra:
            zf.writestr(f"t/{name}", data)


class _System:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_pickle_calling_os_system_is_refused(tmp_path):
    marker = tmp_path / "ran"
    _zip_with_pickle(tmp_path / "evil.pt", pickle.dumps(_System(f"touch {marker}"), protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="system is not allowed"):
        load_tensor(tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize("module,name", [("builtins", "eval"), ("torch", "load"),
                                         ("torch._utils", "_rebuild_parameter"),
                                         ("collections", "namedtuple")])
def test_only_tensor_globals_are_allowed(tmp_path, module, name):
    payload = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X\x01\x00\x00\x00x\x85R."
    _zip_with_pickle(tmp_path / "t.pt", payload)
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        load_tensor(tmp_path / "t.pt")


def test_persistent_id_must_be_a_storage(tmp_path):
    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return ("module", "os") if obj == "x" else None
    import io
    buf = io.BytesIO()
    P(buf, protocol=2).dump(["x"])
    _zip_with_pickle(tmp_path / "t.pt", buf.getvalue())
    with pytest.raises(pickle.UnpicklingError, match="persistent id"):
        load_tensor(tmp_path / "t.pt")


def _edit_pickle(src, dst, old, new):
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w") as zo:
        for info in zi.infolist():
            data = zi.read(info)
            zo.writestr(info.filename, data.replace(old, new) if info.filename.endswith(".pkl") else data)


def test_view_past_its_storage_is_refused(tmp_path):
    save_tensor(tmp_path / "t.pt", np.zeros((2, 3), np.float32))
    # stride (3, 1) -> (3, 9): the last element would sit far past the 6 stored
    _edit_pickle(tmp_path / "t.pt", tmp_path / "bad.pt", b"(K\x03K\x01t", b"(K\x03K\x09t")
    with pytest.raises(ValueError, match="past its storage"):
        load_tensor(tmp_path / "bad.pt")


def test_storage_size_must_match(tmp_path):
    save_tensor(tmp_path / "t.pt", np.zeros((2, 3), np.float32))
    _edit_pickle(tmp_path / "t.pt", tmp_path / "bad.pt", b"cpuK\x06", b"cpuK\x60")
    with pytest.raises(ValueError, match="holds 24 bytes, the pickle says 384"):
        load_tensor(tmp_path / "bad.pt")


def test_not_a_zip(tmp_path):
    (tmp_path / "t.pt").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match="not a torch.save zip"):
        load_tensor(tmp_path / "t.pt")


def test_big_endian_record(tmp_path):
    a = (np.arange(6, dtype=np.float32) - 2.5).reshape(2, 3)
    b = np.arange(4).astype(BF16)
    for name, x in (("a", a), ("b", b)):
        save_tensor(tmp_path / f"{name}.pt", x)
        with zipfile.ZipFile(tmp_path / f"{name}.pt") as zi, \
                zipfile.ZipFile(tmp_path / f"{name}_be.pt", "w") as zo:
            for info in zi.infolist():
                data = zi.read(info)
                if info.filename.endswith("byteorder"):
                    data = b"big"
                elif info.filename.endswith("data/0"):
                    data = x.view(f"u{x.itemsize}").byteswap().tobytes()
                zo.writestr(info.filename, data)
        y = load_tensor(tmp_path / f"{name}_be.pt")
        assert y.dtype == x.dtype and same_bits(y, x)


# ---- python -m dsv4 golden ------------------------------------------------------

def test_golden_main_on_fixture(tmp_path, capsys):
    shutil.copytree(DATA / "rms_norm" / "in", tmp_path / "in")
    assert golden_main([str(tmp_path), "--kernel", "rms_norm"]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "x_normed.pt" in printed and "ms" in printed
    inputs, outputs = load_case(tmp_path)
    assert same_bits(outputs["x_normed"], dsv4.rms_norm(**inputs)["x_normed"])
    _, torch_made = load_case(DATA / "rms_norm")
    report = dsv4.verify("rms_norm", torch_made, inputs, expected=outputs)
    assert report, str(report)


def test_python_m_dsv4_golden(tmp_path):
    shutil.copytree(DATA / "rms_norm" / "in", tmp_path / "in")
    run = subprocess.run([sys.executable, "-m", "dsv4", "golden", str(tmp_path), "--kernel", "rms_norm"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    inputs, outputs = load_case(tmp_path)
    assert same_bits(outputs["x_normed"], dsv4.rms_norm(**inputs)["x_normed"])


def test_golden_main_numpy_golden_config_and_out(tmp_path):
    shutil.copytree(DATA / "rms_norm", tmp_path / "case")
    assert golden_main([str(tmp_path / "case"), "--kernel", "rms_norm", "--golden", "numpy",
                        "--config", "pro", "--out", str(tmp_path / "mine")]) == 0
    inputs, torch_made = load_case(tmp_path / "case")
    _, outputs = load_case(tmp_path / "mine")
    want = dsv4.golden.rms_norm(**inputs, config="pro")["x_normed"]
    assert same_bits(outputs["x_normed"], want)
    # the case's own out/ is left alone
    assert same_bits(torch_made["x_normed"], load_case(DATA / "rms_norm")[1]["x_normed"])


def test_golden_main_bad_config(tmp_path, capsys):
    shutil.copytree(DATA / "rms_norm" / "in", tmp_path / "in")
    assert golden_main([str(tmp_path), "--kernel", "rms_norm", "--config", "tiny"]) == 2
    assert "unknown config preset 'tiny'" in capsys.readouterr().err
    (tmp_path / "c.json").write_text('{"hidden_sise": 256}')
    assert golden_main([str(tmp_path), "--kernel", "rms_norm", "--config",
                        str(tmp_path / "c.json")]) == 2
    assert "unknown config fields ['hidden_sise']" in capsys.readouterr().err


def test_golden_main_writes_inouts_and_scalars_from_in(tmp_path, capsys):
    kernel = "prefill_compressor_ratio4"
    inputs = small_inputs(kernel)
    for name, a in inputs.items():
        (tmp_path / "in").mkdir(exist_ok=True)
        # pypto-lib stores scalars as 0-d tensors
        save_tensor(tmp_path / "in" / f"{name}.pt", np.array(a, np.int32) if np.isscalar(a) else a)
    save_tensor(tmp_path / "in" / "unrelated.pt", np.zeros(3, np.float32))
    assert golden_main([str(tmp_path), "--kernel", kernel, "--config",
                        str(config_file(tmp_path))]) == 0
    assert "unrelated" in capsys.readouterr().out
    _, outputs = load_case(tmp_path)
    want = dsv4.KERNELS[kernel](**fresh(kernel, inputs), config=SMALL_CFG)
    assert set(outputs) == set(want) == set(dsv4.KERNELS[kernel].inouts)
    for name in want:
        assert same_bits(outputs[name], want[name]), name
    # the call ran on the loaded copies: in/ still holds the initial states
    again, _ = load_case(tmp_path)
    for name in dsv4.KERNELS[kernel].inouts:
        assert same_bits(again[name], inputs[name]), name


def test_golden_main_drops_outputs_found_in_in(tmp_path, capsys):
    shutil.copytree(DATA / "rms_norm" / "in", tmp_path / "in")
    save_tensor(tmp_path / "in" / "x_normed.pt", np.full((3, 64), 7, BF16))
    assert golden_main([str(tmp_path), "--kernel", "rms_norm"]) == 0
    assert "not passed: x_normed" in capsys.readouterr().out
    inputs, outputs = load_case(tmp_path)
    assert same_bits(outputs["x_normed"], dsv4.rms_norm(inputs["x"], inputs["norm_w"])["x_normed"])


def test_golden_main_reports_missing_inputs(tmp_path, capsys):
    shutil.copytree(DATA / "rms_norm" / "in", tmp_path / "in")
    (tmp_path / "in" / "norm_w.pt").unlink()
    assert golden_main([str(tmp_path), "--kernel", "rms_norm"]) == 2
    err = capsys.readouterr().err
    assert "rms_norm needs norm_w" in err and "holds x" in err
    assert not (tmp_path / "out").exists()


def test_golden_main_bad_kernel_and_bad_data(tmp_path, capsys):
    shutil.copytree(DATA / "rms_norm" / "in", tmp_path / "in")
    assert golden_main([str(tmp_path), "--kernel", "no_such"]) == 2
    assert "unknown kernel 'no_such'" in capsys.readouterr().err
    save_tensor(tmp_path / "in" / "x.pt", np.zeros((3, 64), np.float32))    # wrong dtype
    assert golden_main([str(tmp_path), "--kernel", "rms_norm"]) == 1
    assert "argument 'x' must have dtype bfloat16" in capsys.readouterr().err


# ---- without torch ---------------------------------------------------------------

NO_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked")
sys.meta_path.insert(0, NoTorch())
"""


def digest(arrays):
    return {k: [str(a.dtype), list(a.shape), hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()]
            for k, a in sorted(arrays.items())}


def run_without_torch(code):
    """Run `code` in a fresh interpreter where torch cannot be imported; it may call
    digest(arrays) and print the result as JSON. Returns the last line of output."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    prelude = NO_TORCH + "import hashlib, json\nimport numpy as np\n" + inspect.getsource(digest)
    r = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True,
                       text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()[-1]


def test_reader_writer_and_golden_without_torch(tmp_path):
    shutil.copytree(DATA / "rms_norm" / "in", tmp_path / "in")
    out = run_without_torch(f"""
        from dsv4.case import golden_main, load_tensor
        try:
            import torch
            raise SystemExit("the block did not work")
        except ImportError:
            pass
        tensors = load_tensor({str(DATA / "tensors.pt")!r})
        assert golden_main([{str(tmp_path)!r}, "--kernel", "rms_norm"]) == 0
        assert not [m for m in sys.modules if m.split(".")[0] == "torch"]
        print(json.dumps(digest(tensors)))
        """)
    assert json.loads(out) == digest(expected_fixture_tensors())
    inputs, outputs = load_case(tmp_path)
    assert same_bits(outputs["x_normed"], dsv4.rms_norm(**inputs)["x_normed"])


# ---- torch's own files, and torch reading ours ----------------------------------

def _torch():
    return pytest.importorskip("torch", reason="torch is an optional extra (dsv4[torch])")


def torch_tensors(torch):
    g = torch.Generator().manual_seed(1)
    r = torch.randn(4, 6, generator=g)
    big = torch.randn(8, 8, generator=g)
    return {
        "f32": r, "bf16": r.to(torch.bfloat16), "f16": r.half(), "fp8": r.to(torch.float8_e4m3fn),
        "i8": (r * 40).to(torch.int8), "i32": (r * 1e6).int(), "i64": (r * 1e12).long(),
        "b": r > 0, "u8": (r.abs() * 60).to(torch.uint8),
        "bf16_view": big.to(torch.bfloat16)[2:6, 1::3], "f32_t": big.t(),
        "grad": r.clone().requires_grad_(True), "start_pos": torch.tensor(8192, dtype=torch.int32),
        "flag": torch.tensor(True), "empty": torch.zeros(0, 4, dtype=torch.bfloat16),
    }


def test_load_case_reads_torch_save_without_importing_torch(tmp_path):
    torch = _torch()
    tensors = torch_tensors(torch)
    (tmp_path / "in").mkdir()
    for name, t in tensors.items():
        torch.save(t, tmp_path / "in" / f"{name}.pt")
    want = {k: to_numpy(torch, t.detach().contiguous()) for k, t in tensors.items()}
    inputs, outputs = load_case(tmp_path)
    assert outputs == {}
    for name, w in want.items():
        assert inputs[name].dtype == w.dtype and same_bits(inputs[name], w), name
    out = run_without_torch(f"""
        from dsv4.case import load_case
        inputs, _ = load_case({str(tmp_path)!r})
        assert not [m for m in sys.modules if m.split(".")[0] == "torch"]
        print(json.dumps(digest(inputs)))
        """)
    assert json.loads(out) == digest(want)


def test_torch_loads_what_save_outputs_writes(tmp_path):
    torch = _torch()
    arrays = {k: to_numpy(torch, t.detach().contiguous()) for k, t in torch_tensors(torch).items()}
    arrays["f8_e5m2"] = np.linspace(-2, 2, 6).astype(ml_dtypes.float8_e5m2)
    save_outputs(tmp_path, arrays)
    for name, a in arrays.items():
        for mmap in (False, True):
            t = torch.load(tmp_path / "out" / f"{name}.pt", weights_only=True, mmap=mmap)
            assert tuple(t.shape) == a.shape and str(t.dtype) == "torch." + a.dtype.name, name
            if a.dtype == ml_dtypes.float8_e5m2:
                got = t.view(torch.uint8).numpy().view(a.dtype)
            else:
                got = to_numpy(torch, t)
            assert same_bits(got, a), name


def save_case_with_torch(torch, path, inputs):
    (path / "in").mkdir(parents=True)
    for name, a in inputs.items():
        t = torch.tensor(a, dtype=torch.int32) if np.isscalar(a) else to_torch(torch, a)
        torch.save(t, path / "in" / f"{name}.pt")


@pytest.mark.parametrize("kernel,params", [("qkv_proj_rope", {}),
                                           ("decode_sparse_attn", {"start_pos": 300})])
def test_round_trip_through_torch(tmp_path, kernel, params):
    torch = _torch()
    inputs = small_inputs(kernel, **params)
    save_case_with_torch(torch, tmp_path / "case", inputs)
    cfg = config_file(tmp_path)
    assert golden_main([str(tmp_path / "case"), "--kernel", kernel, "--config", str(cfg)]) == 0
    names = dsv4.KERNELS[kernel].outputs
    actual = {n: to_numpy(torch, torch.load(tmp_path / "case" / "out" / f"{n}.pt", weights_only=True))
              for n in names}
    direct = dsv4.KERNELS[kernel](**inputs, config=SMALL_CFG)
    for n in names:
        assert same_bits(actual[n], direct[n]), n
    # and the C outputs pass pypto-lib's comparators against the NumPy golden
    golden = getattr(dsv4.golden, kernel)(**inputs, config=SMALL_CFG)
    report = dsv4.verify(kernel, actual, inputs, expected=golden, config=SMALL_CFG)
    assert report, str(report)
