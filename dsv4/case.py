"""pypto-lib case directories: read them, write golden outputs into them.

pypto-lib's harness saves a case as ``in/<name>.pt`` (inputs, scalars as 0-d
tensors, the initial value of each InOut tensor) and ``out/<name>.pt`` (the
golden outputs), one ``torch.save`` file per tensor; its ``golden_data``
replay reads ``out/`` back. This module reads and writes those files
without torch: a ``torch.save`` file is a zip holding a pickle
(``data.pkl``) that names raw storages (``data/<key>``).

    inputs, outputs = dsv4.case.load_case("build/data")
    dsv4.case.save_outputs("build/data", dsv4.qkv_proj_rope(**inputs))

``python -m dsv4 golden PATH --kernel NAME`` does both around a kernel call.
"""
import argparse
import collections
import dataclasses
import inspect
import io
import json
import math
import pickle
import struct
import sys
import time
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

__all__ = ["load_case", "save_outputs", "load_tensor", "save_tensor", "golden_main",
           "add_golden_parser", "run_golden"]

# torch's typed storage classes (the pickle names them) and dtypes (by name)
_STORAGES = {
    "FloatStorage": np.dtype(np.float32), "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "ByteStorage": np.dtype(np.uint8), "CharStorage": np.dtype(np.int8),
    "ShortStorage": np.dtype(np.int16), "IntStorage": np.dtype(np.int32),
    "LongStorage": np.dtype(np.int64), "BoolStorage": np.dtype(np.bool_),
}
_DTYPES = {
    "float32": np.float32, "float64": np.float64, "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16, "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2, "uint8": np.uint8, "int8": np.int8,
    "int16": np.int16, "int32": np.int32, "int64": np.int64, "bool": np.bool_,
    "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
}
_DTYPES = {k: np.dtype(v) for k, v in _DTYPES.items()}
_TORCH_NAME = {v: k for k, v in _DTYPES.items()}
_STORAGE_OF = {v: k for k, v in _STORAGES.items()}


# ---- reading -------------------------------------------------------------------

class _StorageType:
    """What the pickle's storage class stands for: a dtype (None: untyped bytes)."""

    def __init__(self, name, dtype):
        self.name, self.dtype = name, dtype


class _Dtype:
    def __init__(self, dtype):
        self.dtype = dtype


class _Storage:
    def __init__(self, raw, dtype, big_endian):
        self.raw, self.dtype, self.big_endian = raw, dtype, big_endian

    def typed(self, dtype):
        """The bytes as `dtype` elements, in native order."""
        if self.big_endian and dtype.itemsize > 1:
            # byte-swapped in place once; torch only ever reads a storage as one dtype
            whole = self.raw[: self.raw.size // dtype.itemsize * dtype.itemsize]
            whole.view(f"u{dtype.itemsize}").byteswap(inplace=True)
            self.big_endian = False
        return self.raw[: self.raw.size // dtype.itemsize * dtype.itemsize].view(dtype)


def _tensor(storage, offset, size, stride, dtype):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor must be built on a storage record")
    try:
        offset = int(offset)
        size = tuple(int(s) for s in size)
        stride = tuple(int(s) for s in stride)
    except (TypeError, ValueError):
        raise pickle.UnpicklingError("tensor offset, size and stride must be integers") from None
    if dtype is None:
        raise pickle.UnpicklingError("an untyped storage needs the tensor's dtype")
    flat = storage.typed(dtype)
    if (len(size) != len(stride) or offset < 0 or any(s < 0 for s in size)
            or any(s < 0 for s in stride)):
        raise ValueError(f"bad tensor view: offset {offset}, size {size}, stride {stride}")
    n = math.prod(size)
    if n == 0:
        return np.zeros(size, dtype)
    last = offset + sum((s - 1) * st for s, st in zip(size, stride))
    if last >= flat.size:
        raise ValueError(f"tensor view (offset {offset}, size {size}, stride {stride}) reads "
                         f"past its storage of {flat.size} elements")
    contiguous = all(st == c for s, st, c in zip(size, stride, _contiguous_strides(size)) if s != 1)
    if contiguous:
        return flat[offset:offset + n].reshape(size)
    view = np.lib.stride_tricks.as_strided(flat[offset:], size, [st * dtype.itemsize for st in stride])
    return np.array(view, order="C")       # kernels need C order


def _rebuild_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return _tensor(storage, offset, size, stride, getattr(storage, "dtype", None))


def _rebuild_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    if not isinstance(dtype, _Dtype):
        raise pickle.UnpicklingError("_rebuild_tensor_v3 needs a torch dtype")
    return _tensor(storage, offset, size, stride, dtype.dtype)


def _allowed(module, name):
    """The only globals a tensor file may name; everything else is refused."""
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
        return _rebuild_v2
    if module == "torch._utils" and name == "_rebuild_tensor_v3":
        return _rebuild_v3
    if module == "collections" and name == "OrderedDict":
        return collections.OrderedDict
    if module == "torch" and name in _STORAGES:
        return _StorageType(name, _STORAGES[name])
    if module in ("torch", "torch.storage") and name == "UntypedStorage":
        return _StorageType(name, None)
    if module == "torch" and name in _DTYPES:
        return _Dtype(_DTYPES[name])
    return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, zf, prefix, big_endian):
        super().__init__(file)
        self._zf, self._prefix, self._big = zf, prefix, big_endian
        self._storages = {}

    def find_class(self, module, name):
        obj = _allowed(module, name)
        if obj is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a tensor file")
        return obj

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, stype, key, _location, numel = pid
        key = str(key)
        if key not in self._storages:
            itemsize = 1 if stype.dtype is None else stype.dtype.itemsize
            name = f"{self._prefix}data/{key}"
            try:
                info = self._zf.getinfo(name)
            except KeyError:
                raise ValueError(f"storage record {name} is missing") from None
            nbytes = int(numel) * itemsize
            if info.file_size != nbytes:
                raise ValueError(f"storage record {name} holds {info.file_size} bytes, "
                                 f"the pickle says {nbytes}")
            raw = np.empty(nbytes, np.uint8)
            if nbytes and _read_record(self._zf, info, raw) != nbytes:
                raise ValueError(f"storage record {name} is truncated")
            self._storages[key] = _Storage(raw, stype.dtype, self._big)
        return self._storages[key]


def _read_record(zf, info, out):
    """Read a record's bytes into `out`; returns the count read."""
    if info.compress_type != zipfile.ZIP_STORED:
        with zf.open(info) as f:
            return f.readinto(memoryview(out))
    # torch stores storages uncompressed: read them straight from the file,
    # several times faster than zipfile's chunked, CRC-checking reader
    f = zf.fp
    f.seek(info.header_offset)
    head = f.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise ValueError(f"bad zip local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    f.seek(info.header_offset + 30 + name_len + extra_len)
    return f.readinto(memoryview(out))


def load_tensor(path):
    """Read a ``torch.save`` file without torch.

    Returns what was saved with every tensor as a C-contiguous NumPy array
    (bf16 and fp8 as ml_dtypes types, 0-d for scalars). Only tensors,
    dicts, lists and tuples are read: the pickle may name nothing but
    torch's tensor-rebuild functions, storage types and dtypes, and
    ``collections.OrderedDict``; anything else raises
    ``pickle.UnpicklingError`` before it can run.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a torch.save zip file (the legacy format of torch < 1.6 "
                         "or _use_new_zipfile_serialization=False is not read)")
    with zipfile.ZipFile(path) as zf:
        pkls = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise ValueError(f"{path}: expected one <archive>/data.pkl record, found {len(pkls)}")
        prefix = pkls[0][: -len("data.pkl")]
        try:
            order = zf.read(prefix + "byteorder").decode().strip()
        except KeyError:
            order = "little"        # files written before the record existed
        if order not in ("little", "big"):
            raise ValueError(f"{path}: unknown byteorder record {order!r}")
        with zf.open(pkls[0]) as f:
            return _Unpickler(io.BytesIO(f.read()), zf, prefix, order == "big").load()


def _case_dir(path):
    # PATH may be the directory holding in/ and out/, or pypto-lib's work dir above data/
    p = Path(path)
    if (p / "in").is_dir() or (p / "out").is_dir():
        return p
    if (p / "data" / "in").is_dir():
        return p / "data"
    return None


def _read_dir(d):
    tensors = {}
    for f in sorted(d.glob("*.pt")):
        obj = load_tensor(f)
        if not isinstance(obj, np.ndarray):
            raise ValueError(f"{f}: holds a {type(obj).__name__}, not one tensor")
        tensors[f.stem] = obj
    return tensors


def load_case(path):
    """Read a pypto-lib case directory: returns ``(inputs, outputs)``, dicts of arrays.

    ``path`` holds ``in/`` and ``out/`` (pypto-lib's ``golden_data``
    directory), or is the work directory above it (``data/in``). Inputs
    include scalars (0-d arrays) and the initial value of each InOut
    tensor; ``outputs`` is empty when there is no ``out/``. torch is not
    needed.
    """
    d = _case_dir(path)
    if d is None:
        raise FileNotFoundError(f"{path}: no in/ or out/ (nor data/in/) directory")
    inputs = _read_dir(d / "in") if (d / "in").is_dir() else {}
    outputs = _read_dir(d / "out") if (d / "out").is_dir() else {}
    return inputs, outputs


# ---- writing -------------------------------------------------------------------

def _contiguous_strides(shape):
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(s, 1)            # torch's rule for empty dims
    return tuple(reversed(strides))


def _p_int(n):
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if 0 <= n < 65536:
        return b"M" + struct.pack("<H", n)
    if -2 ** 31 <= n < 2 ** 31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _p_str(s):
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _p_global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _p_ints(values):
    return b"(" + b"".join(_p_int(int(v)) for v in values) + b"t"


def _tensor_pickle(a):
    """Protocol-2 pickle of one tensor, opcode for opcode what torch.save writes."""
    storage = _STORAGE_OF.get(a.dtype)
    if storage is None:     # dtypes without a typed storage class (fp8, uint16..)
        rebuild, stype, numel = "_rebuild_tensor_v3", _p_global("torch.storage", "UntypedStorage"), a.nbytes
    else:
        rebuild, stype, numel = "_rebuild_tensor_v2", _p_global("torch", storage), a.size
    out = [b"\x80\x02", _p_global("torch._utils", rebuild), b"(",
           b"(", _p_str("storage"), stype, _p_str("0"), _p_str("cpu"), _p_int(numel), b"t", b"Q",
           _p_int(0), _p_ints(a.shape), _p_ints(_contiguous_strides(a.shape)), b"\x89",
           _p_global("collections", "OrderedDict"), b")R"]
    if storage is None:
        out.append(_p_global("torch", _TORCH_NAME[a.dtype]))
    out.append(b"tR.")
    return b"".join(out)


def save_tensor(path, array):
    """Write one array as a file that ``torch.load(path, weights_only=True)`` reads
    as the same tensor (dtype, shape, values). torch is not needed."""
    a = np.asarray(array)
    if a.dtype not in _TORCH_NAME:
        raise TypeError(f"{path}: no torch dtype for {a.dtype}")
    if not a.flags.c_contiguous or not a.dtype.isnative:
        a = np.array(a, dtype=a.dtype.newbyteorder("="), order="C")
    path = Path(path)
    prefix = path.stem or "archive"
    records = [("data.pkl", _tensor_pickle(a)), (".format_version", b"1"),
               (".storage_alignment", b"64"), ("byteorder", sys.byteorder.encode()),
               ("data/0", a.reshape(-1).view(np.uint8)), ("version", b"3\n")]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in records:
            info = zipfile.ZipInfo(f"{prefix}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            if name == "data/0":
                # torch aligns storages to 64 bytes (for mmap) with an "FB" extra field
                zip64 = len(data) * 1.05 > zipfile.ZIP64_LIMIT
                start = zf.fp.tell() + 30 + len(info.filename.encode()) + 4 + (20 if zip64 else 0)
                pad = -start % 64
                info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
                data = memoryview(data)
            zf.writestr(info, data)
    return path


def save_outputs(path, outputs):
    """Write each array of ``outputs`` as ``out/<name>.pt`` under the case directory
    ``path``, in the layout pypto-lib's ``golden_data`` replay reads; returns the
    paths written. torch is not needed; ``torch.load`` reads the files."""
    d = _case_dir(path) or Path(path)
    bad = [k for k, v in outputs.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise TypeError(f"outputs {bad} are not NumPy arrays")
    (d / "out").mkdir(parents=True, exist_ok=True)
    return [save_tensor(d / "out" / f"{name}.pt", a) for name, a in outputs.items()]


# ---- python -m dsv4 golden -------------------------------------------------------

def _config(text):
    """A preset name, or a JSON file of DeepSeekV4Config fields; fields it leaves
    out come from the preset named by its "base" key (default flash)."""
    from .config import DeepSeekV4Config, get_config
    if text is None:
        return None
    p = Path(text)
    if not p.is_file():
        return get_config(text)
    fields = json.loads(p.read_text())
    base = get_config(fields.pop("base", None))
    names = {f.name for f in dataclasses.fields(DeepSeekV4Config)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ValueError(f"{p}: unknown config fields {unknown}")
    return dataclasses.replace(base, **{"name": p.stem, **fields})


def _add_arguments(p):
    p.add_argument("path", help="case directory with in/ (pypto-lib's golden_data dir, or its work dir)")
    p.add_argument("--kernel", required=True, help="dsv4 kernel name, e.g. qkv_proj_rope")
    p.add_argument("--golden", choices=("c", "numpy"), default="c",
                   help="c: dsv4.<kernel> (default); numpy: dsv4.golden.<kernel>")
    p.add_argument("--config", default=None,
                   help="preset (demo, flash, pro) or a JSON file of config fields (default flash)")
    p.add_argument("--out", default=None, help="directory to write out/*.pt under (default: the case)")


def add_golden_parser(subparsers):
    """Add the ``golden`` subcommand; run it with ``run_golden(args)``."""
    p = subparsers.add_parser(
        "golden", help="write golden outputs (out/*.pt) for a pypto-lib case directory",
        description="Read a pypto-lib case (in/*.pt), run a dsv4 kernel on it, write out/*.pt "
                    "for pypto-lib's golden_data replay.")
    _add_arguments(p)
    return p


def _err(msg):
    print(f"dsv4 golden: {msg}", file=sys.stderr)


def run_golden(args):
    from . import golden
    from ._kernels import KERNELS, TABLE
    if args.kernel not in KERNELS:
        _err(f"unknown kernel {args.kernel!r}; known: {', '.join(KERNELS)}")
        return 2
    kernel = KERNELS[args.kernel]
    fn = kernel if args.golden == "c" else getattr(golden, args.kernel)
    try:
        config = _config(args.config)
        t0 = time.perf_counter()
        inputs, _ = load_case(args.path)
    except (OSError, ValueError, TypeError, pickle.UnpicklingError) as e:
        _err(str(e))
        return 2
    t_load = time.perf_counter() - t0

    params = inspect.signature(kernel).parameters
    results = set(kernel.outputs) | set(kernel.inouts)
    wanted = [n for n, p in params.items() if p.kind != p.KEYWORD_ONLY]
    missing = [n for n in wanted if params[n].default is inspect.Parameter.empty and n not in inputs]
    if missing:
        _err(f"{args.kernel} needs {', '.join(missing)}, not in {Path(args.path) / 'in'} "
             f"(it holds {', '.join(inputs) or 'nothing'})")
        return 2
    dropped = [n for n in inputs if n not in wanted and n in results]
    unused = [n for n in inputs if n not in wanted and n not in results]
    scalars = {s["name"] for s in TABLE[args.kernel]["scalars"]}
    kw = {n: (inputs[n].item() if n in scalars else inputs[n]) for n in wanted if n in inputs}
    if config is not None:
        if "config" not in params:
            _err(f"{args.kernel} takes no config")
            return 2
        kw["config"] = config

    t0 = time.perf_counter()
    try:
        out = fn(**kw)
    except (ValueError, TypeError) as e:
        _err(f"{args.kernel}: {e}")
        return 1
    t_run = time.perf_counter() - t0
    out = {k: v for k, v in out.items() if k in results}

    t0 = time.perf_counter()
    written = save_outputs(args.out or args.path, out)
    t_save = time.perf_counter() - t0

    which = f"dsv4.{args.kernel}" if args.golden == "c" else f"dsv4.golden.{args.kernel}"
    print(f"{which} on {args.path}: read {len(inputs)} tensors in {t_load * 1e3:.1f} ms, "
          f"ran in {t_run * 1e3:.1f} ms")
    if dropped:
        print(f"  outputs found among the inputs, not passed: {', '.join(dropped)}")
    if unused:
        print(f"  not arguments of {args.kernel}, ignored: {', '.join(unused)}")
    for f, (name, a) in zip(written, out.items()):
        print(f"  wrote {f}  {_TORCH_NAME[a.dtype]} {list(a.shape)}")
    print(f"  {len(written)} file{'s' * (len(written) != 1)} written in {t_save * 1e3:.1f} ms")
    return 0


def golden_main(argv=None):
    """``python -m dsv4 golden PATH --kernel NAME [--golden numpy|c] [--config ...]``."""
    p = argparse.ArgumentParser(prog="python -m dsv4 golden",
                                description="Write golden outputs for a pypto-lib case directory.")
    _add_arguments(p)
    return run_golden(p.parse_args(argv))
