/* AVX2 + FMA forms of the shared vector helpers of avx512.h, bit for bit the same. A
 * 16-lane canonical vector is two __m256 halves (lanes 0-7, 8-15). Include only in x86-64
 * translation units; use from AVX2-targeted functions. */
#ifndef DSV4_AVX2_H
#define DSV4_AVX2_H
#if defined(__x86_64__)
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "core/dsv4.h"

#define DSV4_AVX2 __attribute__((target("avx2,fma")))

DSV4_AVX2 static inline __m256 dsv4_load_bf16x8(const uint16_t *p)
{
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

/* dsv4_f32_to_bf16 on 8 lanes, the 16-bit results in the low halves of the lanes */
DSV4_AVX2 static inline __m256i dsv4_bf16_bits8(__m256 v)
{
    __m256i u = _mm256_castps_si256(v);
    __m256i hi = _mm256_srli_epi32(u, 16);
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_and_si256(hi, _mm256_set1_epi32(1)),
                                                     _mm256_set1_epi32(0x7fff)));
    r = _mm256_srli_epi32(r, 16);
    /* both sides are below 2^31, so the signed compare is the unsigned one */
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                     _mm256_set1_epi32(0x7f800000));
    return _mm256_blendv_epi8(r, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
}

/* dsv4_round_bf16 on 8 lanes */
DSV4_AVX2 static inline __m256 dsv4_round_bf16x8(__m256 v)
{
    return _mm256_castsi256_ps(_mm256_slli_epi32(dsv4_bf16_bits8(v), 16));
}

/* round to nearest even, NaN kept quiet: dsv4_f32_to_bf16 on 8 lanes */
DSV4_AVX2 static inline void dsv4_store_bf16x8(uint16_t *p, __m256 v)
{
    __m256i b = dsv4_bf16_bits8(v);      /* 0 .. 0xffff: the unsigned pack keeps them */
    _mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(b),
                                                    _mm256_extracti128_si256(b, 1)));
}

/* lanes l < n of p, zero beyond (n <= 8), without reading past p + n */
DSV4_AVX2 static inline __m256 dsv4_load_f32x8_part(const float *p, int64_t n)
{
    if (n >= 8)
        return _mm256_loadu_ps(p);
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n < 0 ? 0 : n)),
                                         _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_maskload_ps(p, m);
}

/* dsv4_load_bf16x8 of lanes l < n (n <= 8), zero beyond */
DSV4_AVX2 static inline __m256 dsv4_load_bf16x8_part(const uint16_t *p, int64_t n)
{
    if (n >= 8)
        return dsv4_load_bf16x8(p);
    uint16_t b[8] = {0};
    if (n > 0)
        memcpy(b, p, (size_t)n * sizeof(uint16_t));
    return dsv4_load_bf16x8(b);
}

/* The canonical tree of a 16-lane sum held as lanes 0-7 (lo) and 8-15 (hi): lanes
 * l + (l + 8), then + 4, + 2, + 1, lower lane first, as reduce16 does on one register. */
DSV4_AVX2 static inline float dsv4_reduce16x2(__m256 lo, __m256 hi)
{
    __m256 h8 = _mm256_add_ps(lo, hi);
    __m128 h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
    __m128 h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
    return _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
}

/* out row q (stride ldo bytes) = lane q of the 8 vectors r */
DSV4_AVX2 static inline void dsv4_transpose8(const __m256 *r, void *out, int64_t ldo)
{
    __m256 t[8], u[8];
    for (int j = 0; j < 4; j++) {
        t[2 * j] = _mm256_unpacklo_ps(r[2 * j], r[2 * j + 1]);
        t[2 * j + 1] = _mm256_unpackhi_ps(r[2 * j], r[2 * j + 1]);
    }
    /* u[4h + c], 128-bit lane L: column 4L + c of rows 4h..4h+3 */
    for (int h = 0; h < 2; h++) {
        u[4 * h] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0x44);
        u[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0xee);
        u[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
        u[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xee);
    }
    char *o = out;
    for (int c = 0; c < 4; c++) {
        _mm256_storeu_ps((float *)(o + c * ldo), _mm256_permute2f128_ps(u[c], u[4 + c], 0x20));
        _mm256_storeu_ps((float *)(o + (4 + c) * ldo), _mm256_permute2f128_ps(u[c], u[4 + c], 0x31));
    }
}

/* dsv4_exp_f32 on 4 doubles holding fp32 values, before the final rounding */
DSV4_AVX2 static inline __m256d dsv4_exp_pd4(__m256d z)
{
    __m256d n = _mm256_round_pd(_mm256_mul_pd(z, _mm256_set1_pd(DSV4_EXP_LOG2E)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256d nn = _mm256_sub_pd(_mm256_setzero_pd(), n);
    __m256d r = _mm256_fmadd_pd(nn, _mm256_set1_pd(DSV4_EXP_LN2_HI), z);
    r = _mm256_fmadd_pd(nn, _mm256_set1_pd(DSV4_EXP_LN2_LO), r);
    __m256d p = _mm256_set1_pd(dsv4_exp_poly[0]);
    for (int i = 1; i < 12; i++)
        p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(dsv4_exp_poly[i]));
    /* z in [-120, 100] keeps |n| <= 174, so 2^n is a normal double built from its exponent
     * bits, and p * 2^n is exact, as ldexp and scalef are */
    __m256i e = _mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(n));
    e = _mm256_slli_epi64(_mm256_add_epi64(e, _mm256_set1_epi64x(1023)), 52);
    return _mm256_mul_pd(p, _mm256_castsi256_pd(e));
}

/* dsv4_exp_f32 on 8 lanes, bit for bit */
DSV4_AVX2 static inline __m256 dsv4_exp_f32x8(__m256 x)
{
    /* max and min return their second operand for a NaN x; the NaN is put back below */
    __m256 c = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-120.0f)), _mm256_set1_ps(100.0f));
    __m128 lo = _mm256_cvtpd_ps(dsv4_exp_pd4(_mm256_cvtps_pd(_mm256_castps256_ps128(c))));
    __m128 hi = _mm256_cvtpd_ps(dsv4_exp_pd4(_mm256_cvtps_pd(_mm256_extractf128_ps(c, 1))));
    __m256 e = _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
    return _mm256_blendv_ps(e, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}
#endif
#endif
