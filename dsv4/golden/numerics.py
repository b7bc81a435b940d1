"""The rounding points of every golden, defined once (spec chapter 01 §0).

Every function takes and returns NumPy arrays and computes in float32 unless
its name says otherwise; constants are float32 before they meet an array, so
that the result does not depend on NumPy's scalar promotion rules.
"""
import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
F32 = np.float32

INT8_SCALE_MAX = F32(127.0)
INT8_AMAX_EPS = F32(1e-4)


def f32(x):
    """Widen (exactly) or round to float32."""
    return np.asarray(x).astype(np.float32)


def bf16_rne(x):
    """fp32 -> bfloat16, round to nearest, ties to even (torch's `.to(bfloat16)`)."""
    return np.asarray(x, dtype=np.float32).astype(BF16)


def bf16_haz(x):
    """fp32 -> bfloat16, round to nearest, ties away from zero.

    pypto-lib's "to device bf16" trick: add 0x8000 to the int32 view of the
    bits, clear the low half. Used only by hc_pre's x_mixed and hc_head's y.
    NaN stays NaN.
    """
    x = np.asarray(x, dtype=np.float32)
    u = x.view(np.uint32)
    r = ((u + np.uint32(0x8000)) >> np.uint32(16)).astype(np.uint16)
    out = r.view(BF16)
    return np.where(np.isnan(x), bf16_rne(x), out)


def round_bf16(x):
    """fp32 -> bf16 (RNE) -> fp32: the golden's `.to(torch.bfloat16).float()`."""
    return bf16_rne(x).astype(np.float32)


def fp8_e4m3fn(x):
    """fp32 -> float8_e4m3fn, round to nearest even; beyond the finite range -> NaN."""
    return np.asarray(x, dtype=np.float32).astype(FP8)


def rsqrt(v):
    """torch.rsqrt on the CPU: a rounded sqrt, then a rounded division."""
    return F32(1.0) / np.sqrt(f32(v))


def rms_inv(v, eps):
    """1 / sqrt(mean(v^2, last axis) + eps), keepdims. The mean is sum / n in fp32."""
    v = f32(v)
    ms = np.sum(v * v, axis=-1, keepdims=True, dtype=np.float32) / F32(v.shape[-1])
    return rsqrt(ms + F32(eps))


def rms_norm(v, weight, eps):
    """(v * rms_inv(v)) * weight, the order torch evaluates `x * inv * w` in."""
    v = f32(v)
    return (v * rms_inv(v, eps)) * f32(weight)


def int8_quant_per_row(v, clamp=False):
    """Per-row int8 quantisation over the last axis (§0.4).

    Returns (q int8, scale fp32 with a trailing axis of 1). The scale factor is
    computed as torch computes `127 / amax`: reciprocal, then multiply. The
    stored dequant scale is 1/sq, not amax/127. clamp=True clamps the int32
    codes to +-127 first, as the goldens that clamp do: a NaN code (int32's
    minimum) then becomes -127 instead of 0.
    """
    v = f32(v)
    amax = np.maximum(np.max(np.abs(v), axis=-1, keepdims=True), INT8_AMAX_EPS)
    sq = (F32(1.0) / amax) * INT8_SCALE_MAX
    i32 = np.rint(v * sq).astype(np.int32)          # half to even; NaN -> int32's minimum
    if clamp:
        i32 = np.clip(i32, -127, 127)
    # int32 -> fp16 -> int8: the identity here, since |i32| <= 127 (§0.4)
    assert np.all(np.abs(i32) <= 127)
    q = i32.astype(np.float16).astype(np.int8)
    return q, F32(1.0) / sq


def int8_quant_per_column(w):
    """Per-output-column int8 quantisation of a [K, N] weight (the builders' wq_b).

    Returns (w_i8 [K, N], scale fp32 [N]), with the clamp the weight path has.
    """
    w = f32(w)
    amax = np.maximum(np.max(np.abs(w), axis=0), INT8_AMAX_EPS)
    sq = (F32(1.0) / amax) * INT8_SCALE_MAX
    i32 = np.clip(np.rint(w * sq).astype(np.int32), -127, 127)
    return i32.astype(np.int8), F32(1.0) / sq        # in [-127, 127]: exact


def matmul_bf16(a, b):
    """bf16 x bf16 -> fp32, fp32 accumulation (order is BLAS's)."""
    return np.matmul(f32(a), f32(b))


def matmul_i8(a, b):
    """int8 x int8 -> int32, exact.

    BLAS in float32 is exact while every partial sum is an integer of at most 2^24: a
    product of two int8 is at most 2^14 in magnitude, so a dot product of 1024 of them
    is; longer ones are summed in int32 over 1024-long slices of k (float32 GEMMs run
    about twice as fast as float64 ones, and their operands take half the memory).
    """
    a, b = a.astype(np.float32), b.astype(np.float32)
    out = None
    for k0 in range(0, max(a.shape[-1], 1), _I8_SLICE):
        part = np.matmul(a[..., k0:k0 + _I8_SLICE], b[..., k0:k0 + _I8_SLICE, :]).astype(np.int32)
        out = part if out is None else np.add(out, part, out=out)
    return out


_I8_SLICE = 2**24 // (128 * 128)


def rope_interleaved(v, cos, sin, inverse=False):
    """Interleaved RoPE on the last axis of v (§0.5), rounded to bf16.

    Pair i is (v[..., 2i], v[..., 2i+1]) and turns by column i of cos/sin,
    which broadcast against v's leading axes. Only the first R/2 columns of
    cos/sin are read. inverse=True turns by the negative angle.
    """
    v = f32(v)
    half = v.shape[-1] // 2
    c, s = f32(cos)[..., :half], f32(sin)[..., :half]
    a, b = v[..., 0::2], v[..., 1::2]
    if not inverse:
        even, odd = a * c - b * s, a * s + b * c
    else:
        even, odd = a * c + b * s, b * c - a * s
    out = np.empty(v.shape, dtype=BF16)
    out[..., 0::2] = bf16_rne(even)
    out[..., 1::2] = bf16_rne(odd)
    return out


def exp32(z):
    """fp32 exp, computed in double and rounded once (the C kernels do the same)."""
    return np.exp(f32(z).astype(np.float64)).astype(np.float32)


def sigmoid(z):
    """torch.sigmoid on the CPU: 1 / (1 + exp(-z)), each step rounded to fp32."""
    return F32(1.0) / (F32(1.0) + exp32(-f32(z)))


def softmax_last(z):
    """torch.softmax over a short last axis: exp(z - max), a sequential sum, then
    multiplication by the reciprocal of the sum (not a division)."""
    z = f32(z)
    e = exp32(z - np.max(z, axis=-1, keepdims=True))
    s = e[..., 0]
    for j in range(1, e.shape[-1]):
        s = s + e[..., j]
    return e * (F32(1.0) / s)[..., None]


def chunked_sum_sq(v, chunk):
    """Sum of squares over the last axis: chunk sums (inner order free), added
    sequentially from chunk 0."""
    n = v.shape[-1]
    acc = np.zeros(v.shape[:-1], np.float32)
    for k0 in range(0, n, chunk):
        c = v[..., k0:k0 + chunk]
        acc = acc + np.sum(c * c, axis=-1, dtype=np.float32)
    return acc


def chunked_matvec(v, w, chunk):
    """v [T, K] @ w[M, K].T with K cut into chunks whose partial products are
    added sequentially from chunk 0 (the order pypto-lib's HC goldens fix)."""
    acc = np.zeros((v.shape[0], w.shape[0]), np.float32)
    for k0 in range(0, v.shape[-1], chunk):
        acc = acc + np.matmul(v[:, k0:k0 + chunk], w[:, k0:k0 + chunk].T)
    return acc


def log1p32(z):
    """fp32 log1p, computed in double and rounded once (as exp32)."""
    return np.log1p(f32(z).astype(np.float64)).astype(np.float32)


def sqrtsoftplus(z):
    """The router score sqrt(softplus(z)) in its log1p form (spec chapter 05 §2.4):
    sqrt(max(z, 0) + log1p(exp(-|z|))), every step rounded to fp32. Unlike the
    naive log(1 + exp(-|z|)) it keeps the negative tail (about exp(z)) alive."""
    z = f32(z)
    sp = np.maximum(z, F32(0.0)) + log1p32(exp32(-np.abs(z)))
    return np.sqrt(sp)


def swiglu(gate, up, limit):
    """silu(gate) * up with pypto-lib's clamps (chapter 05 §2.3): if limit > 0, gate is
    clamped from above only and up on both sides. silu(g) = g / (1 + exp(-g)), a
    true division as torch's CPU F.silu does (not g * sigmoid(g))."""
    g, u = f32(gate), f32(up)
    if limit > 0:
        lim = F32(limit)
        g = np.minimum(g, lim)
        u = np.clip(u, -lim, lim)
    with np.errstate(over="ignore"):        # exp(-g) -> inf for g < -88: silu -> -0
        e = exp32(-g)
    return (g / (F32(1.0) + e)) * u


def rope_interleaved_f32(v, cos, sin):
    """Interleaved RoPE on the last axis of v like rope_interleaved, but the rotated
    pairs stay fp32 (no rounding): v'[2i] = a cos_i - b sin_i, v'[2i+1] = a sin_i + b cos_i,
    each product rounded to fp32 before the add (spec chapter 04 §4.2.6)."""
    v = f32(v)
    half = v.shape[-1] // 2
    c, s = f32(cos)[..., :half], f32(sin)[..., :half]
    a, b = v[..., 0::2], v[..., 1::2]
    even, odd = a * c - b * s, a * s + b * c
    return np.stack([even, odd], axis=-1).reshape(even.shape[:-1] + (2 * half,))


def softmax_pool(kv, score, sum_chunk=16):
    """Softmax pooling over axis 0, per column, batch form (spec chapter 04 §4.2.3):
    m = max_r s, e_r = exp(s_r - m), Z = ((e_0 + e_1) + ...) sequential, p_r = e_r / Z (a
    true division), out = sum_r kv_r * p_r. The final sum runs over chunks of `sum_chunk`
    rows, each summed sequentially, then the chunk sums sequentially (torch's order for
    8 and 128 rows). Rows scored -inf get weight 0; an all -inf column gives NaN."""
    kv, s = f32(kv), f32(score)
    m = np.max(s, axis=0)
    with np.errstate(invalid="ignore"):           # -inf - -inf in an all -inf column
        e = exp32(s - m)
    z = e[0]
    for r in range(1, e.shape[0]):
        z = z + e[r]
    with np.errstate(invalid="ignore"):
        prod = kv * (e / z)
    out = None
    for r0 in range(0, prod.shape[0], sum_chunk):
        acc = prod[r0]
        for r in range(r0 + 1, min(r0 + sum_chunk, prod.shape[0])):
            acc = acc + prod[r]
        out = acc if out is None else out + acc
    return out


def softmax_pool_online(kv, score, order):
    """Softmax pooling over axis 0 as an online recurrence (spec chapter 04 §4.2.4):
    start with row order[0] (m = s, l = exp(s - s), o = kv), then fold in the rows
    order[1:] one by one (m' = max(m, s), a = exp(m - m'), b = exp(s - m'),
    l = a l + b, o = o a + kv b); return o / l. A row scored -inf adds nothing."""
    kv, s = f32(kv), f32(score)
    i0 = order[0]
    m = s[i0]
    l = exp32(m - m)
    o = kv[i0]
    for j in order[1:]:
        mn = np.maximum(m, s[j])
        alpha = exp32(m - mn)
        beta = exp32(s[j] - mn)
        l = alpha * l + beta
        o = o * alpha + kv[j] * beta
        m = mn
    return o / l


def topk_desc(scores, k):
    """Indices of the k largest entries of the 1-D `scores`, score descending and, among
    equal scores, index ascending (dsv4's deterministic top-k order, spec chapter 04
    §4.15). -0.0 and 0.0 count as equal; NaN sorts last."""
    return np.argsort(-f32(scores), kind="stable")[:k]
