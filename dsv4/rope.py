"""RoPE / YaRN cos-sin tables for DeepSeek-V4 (spec §3).

The kernels read real-valued tables ``[seqlen, dim]``: row ``p`` holds
``cos(p * inv_freq[i])`` for the ``dim/2`` rotary pairs, written twice
(columns ``h..dim-1`` repeat columns ``0..h-1``), and likewise for sin.

Rounding follows §0/§3.2: every elementwise step is a float32 operation; the
transcendental functions (``pow``, ``cos``, ``sin``) are evaluated in double
and rounded once to float32, which makes the result independent of the
platform's float32 SIMD math. Only then is the table cast to the requested
dtype (bf16 with round-to-nearest-even by default).
"""

from __future__ import annotations

import functools
import math
import numbers

import ml_dtypes
import numpy as np

from .config import get_config

_F32 = np.float32
_BF16 = np.dtype(ml_dtypes.bfloat16)

# Accepted spellings of the output dtype (compared after lower-casing).
_DTYPE_NAMES = {
    "bf16": _BF16,
    "bfloat16": _BF16,
    "torch.bfloat16": _BF16,
    "fp32": np.dtype(np.float32),
    "float32": np.dtype(np.float32),
    "torch.float32": np.dtype(np.float32),
    "fp16": np.dtype(np.float16),
    "float16": np.dtype(np.float16),
    "torch.float16": np.dtype(np.float16),
}
_DTYPES = (_BF16, np.dtype(np.float32), np.dtype(np.float16))

# Rows per chunk when filling a table: bounds the float64 temporaries
# (e.g. PRO's 1M-row table) to a few tens of MiB.
_CHUNK_ROWS = 1 << 16

# Tables kept by rope_tables(); a FLASH pair is 4 MiB, a PRO pair 256 MiB.
_CACHE_SIZE = 8


def _resolve_dtype(dtype) -> np.dtype:
    """Map a dtype name or numpy dtype to one of bf16 / fp32 / fp16."""
    if isinstance(dtype, str):
        resolved = _DTYPE_NAMES.get(dtype.lower())
    else:
        try:
            resolved = np.dtype(dtype)
        except TypeError:
            resolved = None
        if resolved not in _DTYPES:
            resolved = None
    if resolved is None:
        raise ValueError(
            f"dtype must be bf16, fp32 or fp16 (a name or a numpy dtype), got {dtype!r}"
        )
    return resolved


def _check_int(name: str, value, *, minimum: int, even: bool = False) -> int:
    """Validate an integer argument and return it as a Python int."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok:
        value = int(value)
        ok = value >= minimum and (not even or value % 2 == 0)
    if not ok:
        kind = "a positive even integer" if even else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return value


def _correction_dim(num_rotations: float, dim: int, base: float, original_seq_len: int) -> float:
    """YaRN: the (fractional) pair index whose wavelength makes
    ``num_rotations`` full turns over ``original_seq_len`` positions (double)."""
    return dim * math.log(original_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def _correction_range(dim: int, base: float, original_seq_len: int, beta_fast, beta_slow):
    """YaRN ramp limits ``(low, high)``; ``high`` is clamped to ``dim - 1``
    (not ``dim/2 - 1``), as in the reference."""
    low = math.floor(_correction_dim(beta_fast, dim, base, original_seq_len))
    high = math.ceil(_correction_dim(beta_slow, dim, base, original_seq_len))
    return max(low, 0), min(high, dim - 1)


def rope_profile(config, compress_ratio: int) -> tuple[float, int]:
    """Return ``(base, original_seq_len)`` of the RoPE profile of a layer.

    ``config`` is anything :func:`dsv4.config.get_config` accepts. A layer with
    ``compress_ratio == 0`` (sliding window) uses ``rope_theta`` and never YaRN
    (``original_seq_len = 0``); any other ratio uses ``compress_rope_theta``
    with ``original_max_position_embeddings`` (YaRN iff that is > 0).
    """
    cfg = get_config(config)
    if compress_ratio:
        return float(cfg.compress_rope_theta), int(cfg.original_max_position_embeddings)
    return float(cfg.rope_theta), 0


def inv_freq(dim, original_seq_len, base, factor, beta_fast, beta_slow) -> np.ndarray:
    """Per-pair inverse frequencies, steps 1-4 of §3.2.

    Returns a float32 array of shape ``[dim // 2]``. YaRN is applied iff
    ``original_seq_len > 0``: pairs below the ramp keep ``base**(-2i/dim)``,
    pairs above it are divided by ``factor``, pairs inside are blended.
    """
    dim = _check_int("dim", dim, minimum=1, even=True)
    half = dim // 2

    exponents = np.arange(0, dim, 2, dtype=_F32) / _F32(dim)  # exact for dim = 2^k
    # pow of the fp32 base in double, rounded once: platform-independent.
    powers = np.power(np.float64(_F32(base)), exponents.astype(np.float64)).astype(_F32)
    inv = _F32(1.0) / powers

    if original_seq_len > 0:
        low, high = _correction_range(dim, float(base), int(original_seq_len), beta_fast, beta_slow)
        if low == high:
            high += 0.001  # avoid 0/0 in the ramp
        ramp = (np.arange(half, dtype=_F32) - _F32(low)) / _F32(high - low)
        ramp = np.clip(ramp, _F32(0.0), _F32(1.0))
        smooth = _F32(1.0) - ramp
        # Same operation order as the reference: interpolated part first.
        inv = (inv / _F32(factor)) * (_F32(1.0) - smooth) + inv * smooth
    return inv.astype(_F32, copy=False)


def precompute_freqs_cos_sin(
    dim,
    seqlen,
    original_seq_len,
    base,
    factor,
    beta_fast,
    beta_slow,
    dtype="bf16",
) -> tuple[np.ndarray, np.ndarray]:
    """Build the RoPE cos/sin tables of §3.2.

    Args:
        dim: rotary width (positive even int); ``h = dim // 2`` pairs.
        seqlen: number of positions (rows), > 0.
        original_seq_len: YaRN original length; 0 disables YaRN.
        base, factor, beta_fast, beta_slow: RoPE base and YaRN parameters.
        dtype: ``"bf16"``/``"bfloat16"``/``"torch.bfloat16"``,
            ``"fp32"``/``"float32"``/``"torch.float32"``,
            ``"fp16"``/``"float16"``/``"torch.float16"`` (any case), or
            ``ml_dtypes.bfloat16`` / ``np.float32`` / ``np.float16``.

    Returns:
        ``(cos, sin)``, each of shape ``[seqlen, dim]`` and dtype ``dtype``;
        column ``j + h`` equals column ``j``. Fresh, writable arrays.

    Raises:
        ValueError: bad ``dim``, ``seqlen`` or ``dtype``.
    """
    dim = _check_int("dim", dim, minimum=1, even=True)
    seqlen = _check_int("seqlen", seqlen, minimum=1)
    out_dtype = _resolve_dtype(dtype)
    half = dim // 2

    inv = inv_freq(dim, original_seq_len, base, factor, beta_fast, beta_slow)
    cos = np.empty((seqlen, dim), dtype=out_dtype)
    sin = np.empty((seqlen, dim), dtype=out_dtype)
    for start in range(0, seqlen, _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, seqlen)
        positions = np.arange(start, stop, dtype=_F32)  # exact below 2^24
        angle = (positions[:, None] * inv[None, :]).astype(np.float64)  # one fp32 rounding
        # Round to fp32 first, then to the output dtype (two roundings, as torch).
        c = np.cos(angle).astype(_F32).astype(out_dtype)
        s = np.sin(angle).astype(_F32).astype(out_dtype)
        cos[start:stop, :half] = c
        cos[start:stop, half:] = c
        sin[start:stop, :half] = s
        sin[start:stop, half:] = s
    return cos, sin


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _cached_tables(dim, seqlen, original_seq_len, base, factor, beta_fast, beta_slow, dtype_name):
    cos, sin = precompute_freqs_cos_sin(
        dim, seqlen, original_seq_len, base, factor, beta_fast, beta_slow, dtype=dtype_name
    )
    return _read_only(cos), _read_only(sin)


def _read_only(table: np.ndarray) -> np.ndarray:
    # Freeze the owner and hand out a view of it: numpy refuses to make a view
    # writable again while its base is read-only.
    table.setflags(write=False)
    view = table.view()
    view.setflags(write=False)
    return view


def rope_tables(config=None, compress_ratio=0, max_seq_len=None, rope_dim=None, dtype="bf16"):
    """RoPE tables of one layer kind of a model (``build_deepseek_v4_rope_tables``).

    Args:
        config: anything :func:`dsv4.config.get_config` accepts (default FLASH).
        compress_ratio: 0 for sliding-window layers, 4 / 128 for compressed
            layers; selects the profile via :func:`rope_profile`.
        max_seq_len: rows; default ``config.max_position_embeddings``.
        rope_dim: columns; default ``config.qk_rope_head_dim``.
        dtype: as for :func:`precompute_freqs_cos_sin`.

    Returns:
        ``(freqs_cos, freqs_sin)``, each ``[max_seq_len, rope_dim]`` of ``dtype``
        (FLASH default: ``[16384, 64]`` bf16).

    The tables are deterministic, so they are computed once per distinct
    argument set and cached (``functools.lru_cache``, a few entries). Because
    every caller receives the same arrays, they are returned **read-only**:
    an in-place write raises instead of corrupting the cache. Use ``.copy()``
    for a writable table.
    """
    cfg = get_config(config)
    base, original_seq_len = rope_profile(cfg, compress_ratio)
    seqlen = cfg.max_position_embeddings if max_seq_len is None else max_seq_len
    dim = cfg.qk_rope_head_dim if rope_dim is None else rope_dim
    dim = _check_int("dim", dim, minimum=1, even=True)
    seqlen = _check_int("seqlen", seqlen, minimum=1)
    dtype_name = _resolve_dtype(dtype).name  # canonical, hashable cache key
    return _cached_tables(
        dim,
        seqlen,
        original_seq_len,
        base,
        float(cfg.rope_factor),
        int(cfg.beta_fast),
        int(cfg.beta_slow),
        dtype_name,
    )


def gather_rope_rows(freqs_cos, freqs_sin, position_ids):
    """Gather the table rows of absolute positions (``materialize_token_rope_tables``).

    Args:
        freqs_cos, freqs_sin: tables ``[L, dim]`` of the same shape, any dtype.
        position_ids: integers of any shape; flattened in C order to ``N``
            entries, each in ``[0, L)``.

    Returns:
        ``(cos_rows, sin_rows)``, each ``[N, dim]`` in the tables' dtype,
        fresh contiguous arrays.

    Raises:
        ValueError: tables of different shapes or not 2-D, non-integer
            ``position_ids``, or a position outside ``[0, L)`` (the message
            gives the first offending flat index, its value and ``L``).
    """
    freqs_cos = np.asarray(freqs_cos)
    freqs_sin = np.asarray(freqs_sin)
    if freqs_cos.ndim != 2 or freqs_cos.shape != freqs_sin.shape:
        raise ValueError(
            "freqs_cos and freqs_sin must be 2-D tables of one shape, got "
            f"{freqs_cos.shape} and {freqs_sin.shape}"
        )
    positions = np.asarray(position_ids).reshape(-1)
    if positions.size == 0:
        positions = positions.astype(np.int64)
    if positions.dtype.kind not in "iu":
        raise ValueError(f"position_ids must hold integers, got dtype {positions.dtype}")

    # Check before any cast, so a huge unsigned value is reported as given.
    length = freqs_cos.shape[0]
    bad = np.flatnonzero((positions < 0) | (positions >= length))
    if bad.size:
        first = int(bad[0])
        raise ValueError(
            f"position_ids[{first}] (flat index) = {int(positions[first])} is outside "
            f"the RoPE table of length {length}"
        )
    positions = positions.astype(np.int64, copy=False)
    return (
        np.ascontiguousarray(freqs_cos[positions]),
        np.ascontiguousarray(freqs_sin[positions]),
    )
