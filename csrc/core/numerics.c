/* Row primitives in dsv4's canonical order; plain C that the compiler may
 * vectorise freely, because the order is spelled out lane by lane. */
#include <math.h>

#include "core/avx2.h"
#include "core/avx512.h"
#include "core/dsv4.h"

#define LANES 16

static float tree16(float acc[LANES])
{
    for (int w = LANES / 2; w >= 1; w /= 2)
        for (int l = 0; l < w; l++)
            acc[l] = acc[l] + acc[l + w];
    return acc[0];
}

static float dot_scalar(const float *a, const float *b, int64_t n)
{
    float acc[LANES] = {0};
    int64_t k = 0;
    for (; k + LANES <= n; k += LANES)
        for (int l = 0; l < LANES; l++)
            acc[l] += a[k + l] * b[k + l];
    /* The tail is zero-padded to a full vector so that every ISA sees the same adds. */
    if (k < n)
        for (int l = 0; l < LANES; l++) {
            float x = k + l < n ? a[k + l] : 0.0f, y = k + l < n ? b[k + l] : 0.0f;
            acc[l] += x * y;
        }
    return tree16(acc);
}

#if defined(__x86_64__)
#include <immintrin.h>
__attribute__((target("avx512f,avx512vl"))) static float reduce16(__m512 acc);

/* Register blocks of named accumulators (arrays of __m512 end up on the stack). */
#define DOT4X4_ROW(i, OP)                                                                  \
    do {                                                                                   \
        __m512 xv = _mm512_maskz_loadu_ps(m, X + (i) * ldx + k);                           \
        a##i##0 = OP(xv, w0, a##i##0);                                                     \
        a##i##1 = OP(xv, w1, a##i##1);                                                     \
        a##i##2 = OP(xv, w2, a##i##2);                                                     \
        a##i##3 = OP(xv, w3, a##i##3);                                                     \
    } while (0)
#define DOT4X4_OUT(i)                                                                      \
    do {                                                                                   \
        out[(i) * ldo] = reduce16(a##i##0);                                                \
        out[(i) * ldo + 1] = reduce16(a##i##1);                                            \
        out[(i) * ldo + 2] = reduce16(a##i##2);                                            \
        out[(i) * ldo + 3] = reduce16(a##i##3);                                            \
    } while (0)
#define DOT4X4_DECL                                                                        \
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, \
           a12 = a00, a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00,     \
           a31 = a00, a32 = a00, a33 = a00
/* Lane l of the register is acc[l] above; the reduction is the same tree. */
__attribute__((target("avx512f,avx512vl"))) static float dot_avx512(const float *a, const float *b,
                                                                    int64_t n)
{
    __m512 acc = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + LANES <= n; k += LANES)
        acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k)));
    if (k < n) {
        __mmask16 m = (__mmask16)((1u << (n - k)) - 1);
        acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, a + k),
                                               _mm512_maskz_loadu_ps(m, b + k)));
    }
    return reduce16(acc);
}
#endif

#if defined(__x86_64__)
__attribute__((target("avx512f,avx512vl"))) static float reduce16(__m512 acc)
{
    __m256 h8 = _mm256_add_ps(_mm512_castps512_ps256(acc),
                              _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1)));
    __m128 h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
    __m128 h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
    return _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
}

/* Eight dot products sharing x: independent chains, each in the canonical order. */
__attribute__((target("avx512f,avx512vl"))) static void dot8_avx512(const float *x, const float *W,
                                                                    int64_t ldw, int64_t n, float *out)
{
    __m512 acc[8];
    for (int r = 0; r < 8; r++)
        acc[r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + LANES <= n; k += LANES) {
        __m512 xv = _mm512_loadu_ps(x + k);
        for (int r = 0; r < 8; r++)
            acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(xv, _mm512_loadu_ps(W + r * ldw + k)));
    }
    if (k < n) {
        __mmask16 m = (__mmask16)((1u << (n - k)) - 1);
        __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
        for (int r = 0; r < 8; r++)
            acc[r] = _mm512_add_ps(acc[r], _mm512_mul_ps(xv, _mm512_maskz_loadu_ps(m, W + r * ldw + k)));
    }
    for (int r = 0; r < 8; r++)
        out[r] = reduce16(acc[r]);
}
#endif

#if defined(__x86_64__)
/* 4 x-rows by 4 w-rows: each w chunk is loaded once for four tokens. */
#define MULADD_OP(x, w, a) _mm512_add_ps(a, _mm512_mul_ps(x, w))
__attribute__((target("avx512f,avx512vl"))) static void dot4x4_avx512(
    const float *X, int64_t ldx, const float *W, int64_t ldw, int64_t n, float *out, int64_t ldo)
{
    DOT4X4_DECL;
    for (int64_t k = 0; k < n; k += LANES) {
        /* the tail is zero-padded to a full vector, as in dot_scalar */
        __mmask16 m = n - k >= LANES ? (__mmask16)0xffff : (__mmask16)((1u << (n - k)) - 1);
        __m512 w0 = _mm512_maskz_loadu_ps(m, W + k), w1 = _mm512_maskz_loadu_ps(m, W + ldw + k);
        __m512 w2 = _mm512_maskz_loadu_ps(m, W + 2 * ldw + k);
        __m512 w3 = _mm512_maskz_loadu_ps(m, W + 3 * ldw + k);
        DOT4X4_ROW(0, MULADD_OP);
        DOT4X4_ROW(1, MULADD_OP);
        DOT4X4_ROW(2, MULADD_OP);
        DOT4X4_ROW(3, MULADD_OP);
    }
    DOT4X4_OUT(0);
    DOT4X4_OUT(1);
    DOT4X4_OUT(2);
    DOT4X4_OUT(3);
}
#endif

#if defined(__x86_64__)
/* The AVX2 forms hold the 16 lanes of each sum in two registers, lanes 0-7 and 8-15; a
 * partial last vector reads as zero beyond n, as in dot_scalar. */
DSV4_AVX2 static float dot_avx2(const float *a, const float *b, int64_t n)
{
    __m256 lo = _mm256_setzero_ps(), hi = lo;
    for (int64_t k = 0; k < n; k += LANES) {
        lo = _mm256_add_ps(lo, _mm256_mul_ps(dsv4_load_f32x8_part(a + k, n - k),
                                             dsv4_load_f32x8_part(b + k, n - k)));
        hi = _mm256_add_ps(hi, _mm256_mul_ps(dsv4_load_f32x8_part(a + k + 8, n - k - 8),
                                             dsv4_load_f32x8_part(b + k + 8, n - k - 8)));
    }
    return dsv4_reduce16x2(lo, hi);
}

/* Four dot products sharing x: independent chains, each in the canonical order. */
DSV4_AVX2 static void dot4_avx2(const float *x, const float *W, int64_t ldw, int64_t n, float *out)
{
    __m256 l0 = _mm256_setzero_ps(), h0 = l0, l1 = l0, h1 = l0, l2 = l0, h2 = l0, l3 = l0, h3 = l0;
    for (int64_t k = 0; k < n; k += LANES) {
        __m256 xl = dsv4_load_f32x8_part(x + k, n - k), xh = dsv4_load_f32x8_part(x + k + 8, n - k - 8);
        l0 = _mm256_add_ps(l0, _mm256_mul_ps(xl, dsv4_load_f32x8_part(W + k, n - k)));
        h0 = _mm256_add_ps(h0, _mm256_mul_ps(xh, dsv4_load_f32x8_part(W + k + 8, n - k - 8)));
        l1 = _mm256_add_ps(l1, _mm256_mul_ps(xl, dsv4_load_f32x8_part(W + ldw + k, n - k)));
        h1 = _mm256_add_ps(h1, _mm256_mul_ps(xh, dsv4_load_f32x8_part(W + ldw + k + 8, n - k - 8)));
        l2 = _mm256_add_ps(l2, _mm256_mul_ps(xl, dsv4_load_f32x8_part(W + 2 * ldw + k, n - k)));
        h2 = _mm256_add_ps(h2, _mm256_mul_ps(xh, dsv4_load_f32x8_part(W + 2 * ldw + k + 8, n - k - 8)));
        l3 = _mm256_add_ps(l3, _mm256_mul_ps(xl, dsv4_load_f32x8_part(W + 3 * ldw + k, n - k)));
        h3 = _mm256_add_ps(h3, _mm256_mul_ps(xh, dsv4_load_f32x8_part(W + 3 * ldw + k + 8, n - k - 8)));
    }
    out[0] = dsv4_reduce16x2(l0, h0);
    out[1] = dsv4_reduce16x2(l1, h1);
    out[2] = dsv4_reduce16x2(l2, h2);
    out[3] = dsv4_reduce16x2(l3, h3);
}

/* 2 x-rows by 2 w-rows: each w chunk is loaded once for two tokens. */
DSV4_AVX2 static void dot2x2_avx2(const float *X, int64_t ldx, const float *W, int64_t ldw,
                                  int64_t n, float *out, int64_t ldo)
{
    __m256 l00 = _mm256_setzero_ps(), h00 = l00, l01 = l00, h01 = l00, l10 = l00, h10 = l00,
           l11 = l00, h11 = l00;
    for (int64_t k = 0; k < n; k += LANES) {
        __m256 wl0 = dsv4_load_f32x8_part(W + k, n - k), wh0 = dsv4_load_f32x8_part(W + k + 8, n - k - 8);
        __m256 wl1 = dsv4_load_f32x8_part(W + ldw + k, n - k);
        __m256 wh1 = dsv4_load_f32x8_part(W + ldw + k + 8, n - k - 8);
        __m256 xl = dsv4_load_f32x8_part(X + k, n - k), xh = dsv4_load_f32x8_part(X + k + 8, n - k - 8);
        l00 = _mm256_add_ps(l00, _mm256_mul_ps(xl, wl0));
        h00 = _mm256_add_ps(h00, _mm256_mul_ps(xh, wh0));
        l01 = _mm256_add_ps(l01, _mm256_mul_ps(xl, wl1));
        h01 = _mm256_add_ps(h01, _mm256_mul_ps(xh, wh1));
        xl = dsv4_load_f32x8_part(X + ldx + k, n - k);
        xh = dsv4_load_f32x8_part(X + ldx + k + 8, n - k - 8);
        l10 = _mm256_add_ps(l10, _mm256_mul_ps(xl, wl0));
        h10 = _mm256_add_ps(h10, _mm256_mul_ps(xh, wh0));
        l11 = _mm256_add_ps(l11, _mm256_mul_ps(xl, wl1));
        h11 = _mm256_add_ps(h11, _mm256_mul_ps(xh, wh1));
    }
    out[0] = dsv4_reduce16x2(l00, h00);
    out[1] = dsv4_reduce16x2(l01, h01);
    out[ldo] = dsv4_reduce16x2(l10, h10);
    out[ldo + 1] = dsv4_reduce16x2(l11, h11);
}
#endif

static void dot_f32_rows_scalar(const float *x, const float *W, int64_t ldw, int64_t M, int64_t n,
                                float *out)
{
    for (int64_t m = 0; m < M; m++)
        out[m] = dot_scalar(x, W + m * ldw, n);
}

static void dot_f32_grid_scalar(const float *X, int64_t ldx, int64_t NX, const float *W,
                                int64_t ldw, int64_t M, int64_t n, float *out, int64_t ldo)
{
    for (int64_t i = 0; i < NX; i++)
        dot_f32_rows_scalar(X + i * ldx, W, ldw, M, n, out + i * ldo);
}

#if defined(__x86_64__)
__attribute__((target("avx512f,avx512vl"))) static void dot_f32_rows_avx512(
    const float *x, const float *W, int64_t ldw, int64_t M, int64_t n, float *out)
{
    int64_t m = 0;
    for (; m + 8 <= M; m += 8)
        dot8_avx512(x, W + m * ldw, ldw, n, out + m);
    for (; m < M; m++)
        out[m] = dot_avx512(x, W + m * ldw, n);
}

__attribute__((target("avx512f,avx512vl"))) static void dot_f32_grid_avx512(
    const float *X, int64_t ldx, int64_t NX, const float *W, int64_t ldw, int64_t M, int64_t n,
    float *out, int64_t ldo)
{
    int64_t i0 = 0;
    for (; i0 + 4 <= NX; i0 += 4) {
        int64_t m = 0;
        for (; m + 4 <= M; m += 4)
            dot4x4_avx512(X + i0 * ldx, ldx, W + m * ldw, ldw, n, out + i0 * ldo + m, ldo);
        for (int64_t i = i0; i < i0 + 4; i++)
            dot_f32_rows_avx512(X + i * ldx, W + m * ldw, ldw, M - m, n, out + i * ldo + m);
    }
    for (int64_t i = i0; i < NX; i++)
        dot_f32_rows_avx512(X + i * ldx, W, ldw, M, n, out + i * ldo);
}

DSV4_AVX2 static void dot_f32_rows_avx2(const float *x, const float *W, int64_t ldw, int64_t M,
                                        int64_t n, float *out)
{
    int64_t m = 0;
    for (; m + 4 <= M; m += 4)
        dot4_avx2(x, W + m * ldw, ldw, n, out + m);
    for (; m < M; m++)
        out[m] = dot_avx2(x, W + m * ldw, n);
}

DSV4_AVX2 static void dot_f32_grid_avx2(const float *X, int64_t ldx, int64_t NX, const float *W,
                                        int64_t ldw, int64_t M, int64_t n, float *out, int64_t ldo)
{
    int64_t i0 = 0;
    for (; i0 + 2 <= NX; i0 += 2) {
        int64_t m = 0;
        for (; m + 2 <= M; m += 2)
            dot2x2_avx2(X + i0 * ldx, ldx, W + m * ldw, ldw, n, out + i0 * ldo + m, ldo);
        for (int64_t i = i0; i < i0 + 2; i++)
            dot_f32_rows_avx2(X + i * ldx, W + m * ldw, ldw, M - m, n, out + i * ldo + m);
    }
    for (int64_t i = i0; i < NX; i++)
        dot_f32_rows_avx2(X + i * ldx, W, ldw, M, n, out + i * ldo);
}
#endif

float dsv4_sum_sq(const struct dsv4_ops *o, const float *v, int64_t n)
{
    return o->dot_f32(v, v, n);
}

float dsv4_rms_inv(const struct dsv4_ops *o, const float *v, int64_t n, float eps)
{
    float mean = dsv4_sum_sq(o, v, n) / (float)n;
    return 1.0f / sqrtf(mean + eps);
}

#if defined(__x86_64__)
/* The same max (a NaN anywhere makes amax NaN, as torch's amax) and the same per-element
 * rounding as the scalar loop, so the same bytes. */
__attribute__((target("avx512f,avx512vl,avx512bw"))) static float quant_row_i8_avx512(
    const float *v, int64_t n, int8_t *q)
{
    __m512 am = _mm512_set1_ps(1e-4f);
    __mmask16 nan = 0;
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) {
        __m512 x = _mm512_loadu_ps(v + k);
        nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
        am = _mm512_max_ps(_mm512_abs_ps(x), am);
    }
    float amax = nan ? NAN : _mm512_reduce_max_ps(am);
    for (; k < n; k++)
        amax = dsv4_max_nan(amax, fabsf(v[k]));
    float sq = (1.0f / amax) * 127.0f;
    const __m512 s = _mm512_set1_ps(sq);
    for (k = 0; k + 16 <= n; k += 16) {
        __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(v + k), s),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __mmask16 ok = _mm512_cmp_ps_mask(r, r, _CMP_ORD_Q);
        _mm_storeu_si128((__m128i *)(q + k), _mm512_cvtepi32_epi8(_mm512_maskz_cvtps_epi32(ok, r)));
    }
    for (; k < n; k++) {
        float r = nearbyintf(v[k] * sq);
        q[k] = r == r ? (int8_t)(int32_t)r : 0;
    }
    return 1.0f / sq;
}
#endif

#if defined(__x86_64__)
/* quant_row_i8_avx512 on 8 lanes: the unordered compare catches a NaN the max would drop */
DSV4_AVX2 static float quant_row_i8_avx2(const float *v, int64_t n, int8_t *q)
{
    const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 am = _mm256_set1_ps(1e-4f), nan = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) {
        __m256 x = _mm256_loadu_ps(v + k);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
        am = _mm256_max_ps(_mm256_and_ps(x, absm), am);
    }
    /* the max of non-NaN values is the same in any order */
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(am), _mm256_extractf128_ps(am, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    float amax = _mm256_movemask_ps(nan) ? NAN : _mm_cvtss_f32(m4);
    for (; k < n; k++)
        amax = dsv4_max_nan(amax, fabsf(v[k]));
    float sq = (1.0f / amax) * 127.0f;
    const __m256 s = _mm256_set1_ps(sq);
    for (k = 0; k + 8 <= n; k += 8) {
        __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(v + k), s),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256i ok = _mm256_castps_si256(_mm256_cmp_ps(r, r, _CMP_ORD_Q));
        __m256i qi = _mm256_and_si256(_mm256_cvtps_epi32(r), ok);
        /* |q| <= 127: the saturating packs keep every value */
        __m128i h = _mm_packs_epi32(_mm256_castsi256_si128(qi), _mm256_extracti128_si256(qi, 1));
        _mm_storel_epi64((__m128i *)(q + k), _mm_packs_epi16(h, h));
    }
    for (; k < n; k++) {
        float r = nearbyintf(v[k] * sq);
        q[k] = r == r ? (int8_t)(int32_t)r : 0;
    }
    return 1.0f / sq;
}
#endif

static float quant_row_i8_scalar(const float *v, int64_t n, int8_t *q)
{
    float amax = 1e-4f;                 /* INT8_AMAX_EPS, as fp32 */
    for (int64_t k = 0; k < n; k++)
        amax = dsv4_max_nan(amax, fabsf(v[k]));
    /* torch's `127 / amax` is reciprocal-then-multiply (§0.2) */
    float sq = (1.0f / amax) * 127.0f;
    for (int64_t k = 0; k < n; k++) {
        float r = nearbyintf(v[k] * sq);            /* half to even */
        /* |r| <= 127 for finite input (§0.4), so int32 -> fp16 -> int8 is the identity;
         * NaN goes to INT32_MIN -> -inf -> 0 there */
        q[k] = r == r ? (int8_t)(int32_t)r : 0;
    }
    return 1.0f / sq;
}

/* pairs i0 .. n/2 - 1: the portable form, and the vector forms' last pairs */
static void rope_bf16_pairs(const float *v, const float *cos, const float *sin, int64_t i0,
                            int64_t n, int inverse, bf16_t *y)
{
    for (int64_t i = i0; i < n / 2; i++) {
        float a = v[2 * i], b = v[2 * i + 1], c = cos[i], s = sin[i];
        float e, o;
        if (!inverse) {
            e = a * c - b * s;
            o = a * s + b * c;
        } else {
            e = a * c + b * s;
            o = b * c - a * s;
        }
        y[2 * i] = dsv4_f32_to_bf16(e);
        y[2 * i + 1] = dsv4_f32_to_bf16(o);
    }
}

static void rope_bf16_scalar(const float *v, const float *cos, const float *sin, int64_t n,
                             int inverse, bf16_t *y)
{
    rope_bf16_pairs(v, cos, sin, 0, n, inverse, y);
}

#if defined(__x86_64__)
/* 8 pairs at a time: p1 = v * c, p2 = (v with each pair swapped) * s, then per lane the
 * sum or difference of the two products, as the scalar form forms it */
DSV4_AVX512 static void rope_bf16_avx512(const float *v, const float *cos, const float *sin,
                                         int64_t n, int inverse, bf16_t *y)
{
    const __m512i dup = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __mmask16 odd = 0xaaaa;
    int64_t i = 0;
    for (; 2 * i + 16 <= n; i += 8) {
        __m512 x = _mm512_loadu_ps(v + 2 * i);
        __m512 c = _mm512_permutexvar_ps(dup, _mm512_castps256_ps512(_mm256_loadu_ps(cos + i)));
        __m512 sn = _mm512_permutexvar_ps(dup, _mm512_castps256_ps512(_mm256_loadu_ps(sin + i)));
        __m512 p1 = _mm512_mul_ps(x, c), p2 = _mm512_mul_ps(_mm512_permute_ps(x, 0xb1), sn);
        /* forward: even a*c - b*s, odd a*s + b*c; inverse: even a*c + b*s, odd b*c - a*s */
        __m512 r = inverse ? _mm512_mask_sub_ps(_mm512_add_ps(p1, p2), odd, p1, p2)
                           : _mm512_mask_add_ps(_mm512_sub_ps(p1, p2), odd, p2, p1);
        dsv4_store_bf16x16(y + 2 * i, r);
    }
    rope_bf16_pairs(v, cos, sin, i, n, inverse, y);
}
#endif

#if defined(__x86_64__)
/* rope_bf16_avx512 on 4 pairs at a time, the same products, sums and differences */
DSV4_AVX2 static void rope_bf16_avx2(const float *v, const float *cos, const float *sin,
                                     int64_t n, int inverse, bf16_t *y)
{
    const __m256i dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
    int64_t i = 0;
    for (; 2 * i + 8 <= n; i += 4) {
        __m256 x = _mm256_loadu_ps(v + 2 * i);
        __m256 c = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(cos + i)), dup);
        __m256 sn = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(sin + i)), dup);
        __m256 p1 = _mm256_mul_ps(x, c), p2 = _mm256_mul_ps(_mm256_permute_ps(x, 0xb1), sn);
        __m256 r = inverse ? _mm256_blend_ps(_mm256_add_ps(p1, p2), _mm256_sub_ps(p1, p2), 0xaa)
                           : _mm256_blend_ps(_mm256_sub_ps(p1, p2), _mm256_add_ps(p2, p1), 0xaa);
        dsv4_store_bf16x8(y + 2 * i, r);
    }
    rope_bf16_pairs(v, cos, sin, i, n, inverse, y);
}
#endif

#if defined(__x86_64__)
__attribute__((target("avx512f,avx512vl"))) static void bf16_row_to_f32_avx512(const bf16_t *x, int64_t n, float *y)
{
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) {
        __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x + k)));
        _mm512_storeu_ps(y + k, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
    }
    for (; k < n; k++)
        y[k] = dsv4_bf16_to_f32(x[k]);
}
#endif

#if defined(__x86_64__)
DSV4_AVX2 static void bf16_row_to_f32_avx2(const bf16_t *x, int64_t n, float *y)
{
    int64_t k = 0;
    for (; k + 8 <= n; k += 8)
        _mm256_storeu_ps(y + k, dsv4_load_bf16x8(x + k));
    for (; k < n; k++)
        y[k] = dsv4_bf16_to_f32(x[k]);
}
#endif

static void bf16_row_to_f32_scalar(const bf16_t *x, int64_t n, float *y)
{
    for (int64_t k = 0; k < n; k++)
        y[k] = dsv4_bf16_to_f32(x[k]);
}

const double dsv4_exp_poly[12] = {
    1.0 / 39916800, 1.0 / 3628800, 1.0 / 362880, 1.0 / 40320, 1.0 / 5040, 1.0 / 720,
    1.0 / 120,      1.0 / 24,      1.0 / 6,      1.0 / 2,     1.0,        1.0,
};

float dsv4_exp_f32(float x)
{
    if (x != x)
        return x;
    double z = x < -120.0f ? -120.0f : x > 100.0f ? 100.0f : x;
    double n = nearbyint(z * DSV4_EXP_LOG2E);
    double r = fma(-n, DSV4_EXP_LN2_HI, z);
    r = fma(-n, DSV4_EXP_LN2_LO, r);
    double p = dsv4_exp_poly[0];
    for (int i = 1; i < 12; i++)
        p = fma(p, r, dsv4_exp_poly[i]);
    return (float)ldexp(p, (int)n);
}

/* float8 e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities,
 * S.1111.111 is NaN, 448 the largest finite value. */
uint8_t dsv4_f32_to_fp8(float f)
{
    uint32_t u = dsv4_f32_bits(f);
    uint8_t sign = (uint8_t)((u >> 24) & 0x80);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u)
        return sign | 0x7f;
    if (a < 0x3c800000u) {                         /* below 2^-6: subnormal grid of 2^-9 */
        float m = nearbyintf(dsv4_bits_f32(a) * 512.0f);
        return sign | (uint8_t)m;                  /* m == 8 is the smallest normal, 0x08 */
    }
    uint32_t r = a - ((127u - 7u) << 23);          /* rebias the exponent */
    r = (r + 0x7ffffu + ((r >> 20) & 1u)) >> 20;   /* keep 3 mantissa bits, ties to even */
    return sign | (uint8_t)(r > 0x7e ? 0x7f : r);  /* past 448 (infinity too) is NaN */
}

float dsv4_fp8_to_f32(uint8_t c)
{
    int e = (c >> 3) & 15, m = c & 7;
    float v;
    if (e == 15 && m == 7)
        v = NAN;
    else if (e == 0)
        v = ldexpf((float)m, -9);
    else
        v = ldexpf((float)(8 + m), e - 10);
    return (c & 0x80) ? -v : v;
}

uint32_t dsv4_low16(const float *v, int64_t rows, int64_t n, int64_t ld)
{
    uint32_t low = 0;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t k = 0; k < n; k++)
            low |= dsv4_f32_bits(v[r * ld + k]);
    return low & 0xffffu;
}

/* O[h, d] = sum over i ascending of P[h, i] * V[i, d], fused steps (exact products for
 * bf16-valued operands). One accumulation chain per output element, in i order. Columns of V
 * in blocks of PV_DB, each block in the lanes and kept in cache for all heads. */
#define PV_DB 32
static inline __attribute__((always_inline)) void pv_block(const float *P, int64_t ldh,
                                                         int64_t ldi, int64_t H, const float *V,
                                                         int64_t n, int64_t HD, int64_t d0,
                                                         float *O, const int fused)
{
    for (int64_t h = 0; h < H; h++) {
        float acc[PV_DB] = {0};
        for (int64_t i = 0; i < n; i++) {
            const float p = P[h * ldh + i * ldi], *v = V + i * HD + d0;
            for (int j = 0; j < PV_DB; j++)
                acc[j] = fused ? fmaf(p, v[j], acc[j]) : acc[j] + p * v[j];
        }
        memcpy(O + h * HD + d0, acc, sizeof acc);
    }
}

/* columns d0 .. HD - 1 one by one, past the last full block of a vector form */
static inline __attribute__((always_inline)) void pv_cols(const float *P, int64_t ldh,
                                                        int64_t ldi, int64_t H, const float *V,
                                                        int64_t n, int64_t HD, int64_t d0,
                                                        float *O, const int fused)
{
    for (int64_t h = 0; h < H; h++)
        for (int64_t d = d0; d < HD; d++) {
            float acc = 0.0f;
            for (int64_t i = 0; i < n; i++)
                acc = fused ? fmaf(P[h * ldh + i * ldi], V[i * HD + d], acc)
                            : acc + P[h * ldh + i * ldi] * V[i * HD + d];
            O[h * HD + d] = acc;
        }
}

static inline __attribute__((always_inline)) void pv_lanes(
    const float *P, int64_t ldh, int64_t ldi, int64_t H, const float *V, int64_t n, int64_t HD,
    float *O, const int fused)
{
    int64_t d0 = 0;
    for (; d0 + PV_DB <= HD; d0 += PV_DB)
        pv_block(P, ldh, ldi, H, V, n, HD, d0, O, fused);
    pv_cols(P, ldh, ldi, H, V, n, HD, d0, O, fused);
}

static void pv_scalar(const float *P, int64_t ldh, int64_t ldi, int64_t H, const float *V,
                      int64_t n, int64_t HD, float *O)
{
    /* P's bits are checked where one of its strides is 1; else the fused steps throughout */
    uint32_t low = ldh == 1 ? dsv4_low16(P, n, H, ldi) : ldi == 1 ? dsv4_low16(P, H, n, ldh) : 1;
    if (dsv4_unfused_try(low | dsv4_low16(V, n, HD, HD))) {
        pv_lanes(P, ldh, ldi, H, V, n, HD, O, 0);
        if (dsv4_unfused_exact())
            return;
    }
    pv_lanes(P, ldh, ldi, H, V, n, HD, O, 1);
}

#if defined(__x86_64__)
__attribute__((target("avx512f,avx512vl"))) static void pv_avx512(
    const float *P, int64_t ldh, int64_t ldi, int64_t H, const float *V, int64_t n, int64_t HD,
    float *O)
{
    int64_t d0 = 0;
    /* four heads share each row of V: 16 chains in flight and a quarter of the V loads */
    for (; d0 + 64 <= HD; d0 += 64) {
        int64_t h = 0;
        for (; h + 4 <= H; h += 4) {
            __m512 acc[4][4];
            for (int r = 0; r < 4; r++)
                for (int c = 0; c < 4; c++)
                    acc[r][c] = _mm512_setzero_ps();
            const float *p = P + h * ldh;
            for (int64_t i = 0; i < n; i++) {
                const float *v = V + i * HD + d0;
                __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
                __m512 v2 = _mm512_loadu_ps(v + 32), v3 = _mm512_loadu_ps(v + 48);
                for (int r = 0; r < 4; r++) {
                    __m512 pi = _mm512_set1_ps(p[r * ldh + i * ldi]);
                    acc[r][0] = _mm512_fmadd_ps(pi, v0, acc[r][0]);
                    acc[r][1] = _mm512_fmadd_ps(pi, v1, acc[r][1]);
                    acc[r][2] = _mm512_fmadd_ps(pi, v2, acc[r][2]);
                    acc[r][3] = _mm512_fmadd_ps(pi, v3, acc[r][3]);
                }
            }
            for (int r = 0; r < 4; r++)
                for (int c = 0; c < 4; c++)
                    _mm512_storeu_ps(O + (h + r) * HD + d0 + 16 * c, acc[r][c]);
        }
        for (; h < H; h++) {
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            const float *p = P + h * ldh;
            for (int64_t i = 0; i < n; i++) {
                __m512 pi = _mm512_set1_ps(p[i * ldi]);
                const float *v = V + i * HD + d0;
                a0 = _mm512_fmadd_ps(pi, _mm512_loadu_ps(v), a0);
                a1 = _mm512_fmadd_ps(pi, _mm512_loadu_ps(v + 16), a1);
                a2 = _mm512_fmadd_ps(pi, _mm512_loadu_ps(v + 32), a2);
                a3 = _mm512_fmadd_ps(pi, _mm512_loadu_ps(v + 48), a3);
            }
            float *o = O + h * HD + d0;
            _mm512_storeu_ps(o, a0);
            _mm512_storeu_ps(o + 16, a1);
            _mm512_storeu_ps(o + 32, a2);
            _mm512_storeu_ps(o + 48, a3);
        }
    }
    pv_cols(P, ldh, ldi, H, V, n, HD, d0, O, 1);
}
#endif

#if defined(__x86_64__)
/* two heads share each row of V: 8 chains of 8 lanes in flight */
DSV4_AVX2 static void pv_avx2(const float *P, int64_t ldh, int64_t ldi, int64_t H, const float *V,
                              int64_t n, int64_t HD, float *O)
{
    int64_t d0 = 0;
    for (; d0 + 32 <= HD; d0 += 32)
        for (int64_t h = 0; h < H; h += 2) {
            const int64_t h1 = h + 1 < H ? h + 1 : h;    /* an odd last head runs twice */
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0,
                   b3 = a0;
            const float *p = P + h * ldh, *q = P + h1 * ldh;
            for (int64_t i = 0; i < n; i++) {
                const float *v = V + i * HD + d0;
                __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8);
                __m256 v2 = _mm256_loadu_ps(v + 16), v3 = _mm256_loadu_ps(v + 24);
                __m256 pi = _mm256_set1_ps(p[i * ldi]), qi = _mm256_set1_ps(q[i * ldi]);
                a0 = _mm256_fmadd_ps(pi, v0, a0);
                a1 = _mm256_fmadd_ps(pi, v1, a1);
                a2 = _mm256_fmadd_ps(pi, v2, a2);
                a3 = _mm256_fmadd_ps(pi, v3, a3);
                b0 = _mm256_fmadd_ps(qi, v0, b0);
                b1 = _mm256_fmadd_ps(qi, v1, b1);
                b2 = _mm256_fmadd_ps(qi, v2, b2);
                b3 = _mm256_fmadd_ps(qi, v3, b3);
            }
            float *o = O + h * HD + d0, *o1 = O + h1 * HD + d0;
            _mm256_storeu_ps(o1, b0);
            _mm256_storeu_ps(o1 + 8, b1);
            _mm256_storeu_ps(o1 + 16, b2);
            _mm256_storeu_ps(o1 + 24, b3);
            _mm256_storeu_ps(o, a0);
            _mm256_storeu_ps(o + 8, a1);
            _mm256_storeu_ps(o + 16, a2);
            _mm256_storeu_ps(o + 24, a3);
        }
    pv_cols(P, ldh, ldi, H, V, n, HD, d0, O, 1);
}
#endif

void dsv4_numerics_ops(struct dsv4_ops *o)
{
    o->dot_f32 = dot_scalar;
    o->dot_f32_rows = dot_f32_rows_scalar;
    o->dot_f32_grid = dot_f32_grid_scalar;
    o->pv = pv_scalar;
    o->quant_row_i8 = quant_row_i8_scalar;
    o->rope_bf16 = rope_bf16_scalar;
    o->bf16_row_to_f32 = bf16_row_to_f32_scalar;
#if defined(__x86_64__)
    if (o->isa >= DSV4_ISA_AVX512) {
        o->dot_f32 = dot_avx512;
        o->dot_f32_rows = dot_f32_rows_avx512;
        o->dot_f32_grid = dot_f32_grid_avx512;
        o->pv = pv_avx512;
        o->quant_row_i8 = quant_row_i8_avx512;
        o->rope_bf16 = rope_bf16_avx512;
        o->bf16_row_to_f32 = bf16_row_to_f32_avx512;
    } else if (o->isa >= DSV4_ISA_AVX2) {
        o->dot_f32 = dot_avx2;
        o->dot_f32_rows = dot_f32_rows_avx2;
        o->dot_f32_grid = dot_f32_grid_avx2;
        o->pv = pv_avx2;
        o->quant_row_i8 = quant_row_i8_avx2;
        o->rope_bf16 = rope_bf16_avx2;
        o->bf16_row_to_f32 = bf16_row_to_f32_avx2;
    }
#endif
}
