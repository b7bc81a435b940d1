/* AVX-512 forms of the bf16 conversions in dsv4.h, bit for bit the same.
 * Include only in x86-64 translation units; use from AVX512-targeted functions. */
#ifndef DSV4_AVX512_H
#define DSV4_AVX512_H
#if defined(__x86_64__)
#include <immintrin.h>
#include <stdint.h>

#include "core/dsv4.h"

#define DSV4_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

DSV4_AVX512 static inline __m512 dsv4_load_bf16x16(const uint16_t *p)
{
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

/* dsv4_f32_to_bf16 on 16 lanes, the 16-bit results in the low halves of the lanes */
DSV4_AVX512 static inline __m512i dsv4_bf16_bits16(__m512 v)
{
    __m512i u = _mm512_castps_si512(v);
    __m512i hi = _mm512_srli_epi32(u, 16);
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_and_si512(hi, _mm512_set1_epi32(1)),
                                                     _mm512_set1_epi32(0x7fff)));
    r = _mm512_srli_epi32(r, 16);
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                            _mm512_set1_epi32(0x7f800000));
    return _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
}

/* dsv4_round_bf16 on 16 lanes */
DSV4_AVX512 static inline __m512 dsv4_round_bf16x16(__m512 v)
{
    return _mm512_castsi512_ps(_mm512_slli_epi32(dsv4_bf16_bits16(v), 16));
}

/* round to nearest even, NaN kept quiet: dsv4_f32_to_bf16 on 16 lanes */
DSV4_AVX512 static inline void dsv4_store_bf16x16(uint16_t *p, __m512 v)
{
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(dsv4_bf16_bits16(v)));
}

/* out row q (stride ldo bytes) = lane q of the 16 vectors r */
DSV4_AVX512 static inline void dsv4_transpose16(const __m512i *r, void *out, int64_t ldo)
{
    __m512i t[16], u[16];
    for (int j = 0; j < 8; j++) {
        t[2 * j] = _mm512_unpacklo_epi32(r[2 * j], r[2 * j + 1]);
        t[2 * j + 1] = _mm512_unpackhi_epi32(r[2 * j], r[2 * j + 1]);
    }
    /* u[4j + c], 128-bit lane L: column 4L + c of rows 4j..4j+3 */
    for (int j = 0; j < 4; j++) {
        u[4 * j] = _mm512_unpacklo_epi64(t[4 * j], t[4 * j + 2]);
        u[4 * j + 1] = _mm512_unpackhi_epi64(t[4 * j], t[4 * j + 2]);
        u[4 * j + 2] = _mm512_unpacklo_epi64(t[4 * j + 1], t[4 * j + 3]);
        u[4 * j + 3] = _mm512_unpackhi_epi64(t[4 * j + 1], t[4 * j + 3]);
    }
    char *o = out;
    for (int c = 0; c < 4; c++) {
        __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44);
        __m512i v1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xee);
        __m512i v2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
        __m512i v3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xee);
        _mm512_storeu_si512(o + (0 + c) * ldo, _mm512_shuffle_i32x4(v0, v2, 0x88));
        _mm512_storeu_si512(o + (4 + c) * ldo, _mm512_shuffle_i32x4(v0, v2, 0xdd));
        _mm512_storeu_si512(o + (8 + c) * ldo, _mm512_shuffle_i32x4(v1, v3, 0x88));
        _mm512_storeu_si512(o + (12 + c) * ldo, _mm512_shuffle_i32x4(v1, v3, 0xdd));
    }
}

/* dsv4_exp_f32 on 8 doubles holding fp32 values, before the final rounding */
DSV4_AVX512 static inline __m512d dsv4_exp_pd8(__m512d z)
{
    __m512d n = _mm512_roundscale_pd(_mm512_mul_pd(z, _mm512_set1_pd(DSV4_EXP_LOG2E)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512d nn = _mm512_sub_pd(_mm512_setzero_pd(), n);
    __m512d r = _mm512_fmadd_pd(nn, _mm512_set1_pd(DSV4_EXP_LN2_HI), z);
    r = _mm512_fmadd_pd(nn, _mm512_set1_pd(DSV4_EXP_LN2_LO), r);
    __m512d p = _mm512_set1_pd(dsv4_exp_poly[0]);
    for (int i = 1; i < 12; i++)
        p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(dsv4_exp_poly[i]));
    return _mm512_scalef_pd(p, n);
}

/* dsv4_exp_f32 on 16 lanes, bit for bit */
DSV4_AVX512 static inline __m512 dsv4_exp_f32x16(__m512 x)
{
    __m512 c = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-120.0f)), _mm512_set1_ps(100.0f));
    __m256 lo = _mm512_cvtpd_ps(dsv4_exp_pd8(_mm512_cvtps_pd(_mm512_castps512_ps256(c))));
    __m256 hi = _mm512_cvtpd_ps(dsv4_exp_pd8(
        _mm512_cvtps_pd(_mm512_castps512_ps256(_mm512_shuffle_f32x4(c, c, 0xee)))));
    __m512 e = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(lo)),
                                                   _mm256_castps_pd(hi), 1));
    return _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
}
#endif
#endif
