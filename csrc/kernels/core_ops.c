/* The numerics core as kernels of their own, so that each primitive can be
 * checked against its NumPy twin in dsv4.golden.numerics. */
#include <omp.h>
#include <stdio.h>

#include "core/avx2.h"
#include "core/avx512.h"
#include "core/gemm.h"
#include "kernels/kernels.h"

int dsv4_cast_prepare(void *p, struct dsv4_err *e, size_t *scratch)
{
    *scratch = 0;
    return DSV4_OK;
}

#if defined(__x86_64__)
/* the 16-lane exp over whole vectors; returns how many values it did */
DSV4_AVX512 static int64_t exp_avx512(const void *x, int64_t n, void *y)
{
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps((float *)y + i, dsv4_exp_f32x16(_mm512_loadu_ps((const float *)x + i)));
    return i;
}

DSV4_AVX2 static int64_t exp_avx2(const void *x, int64_t n, void *y)
{
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps((float *)y + i, dsv4_exp_f32x8(_mm256_loadu_ps((const float *)x + i)));
    return i;
}
#endif

int dsv4_cast(void *p, struct dsv4_err *e)
{
    const struct dsv4_cast_args *a = p;
    int64_t i0 = 0;
#if defined(__x86_64__)
    const enum dsv4_isa isa = dsv4_call_ops()->isa;
    if (a->variant == DSV4_CAST_EXP && isa >= DSV4_ISA_AVX512)
        i0 = exp_avx512(a->x, a->N, a->y);
    else if (a->variant == DSV4_CAST_EXP && isa >= DSV4_ISA_AVX2)
        i0 = exp_avx2(a->x, a->N, a->y);
#endif
    for (int64_t i = i0; i < a->N; i++) {
        switch (a->variant) {
        case DSV4_CAST_BF16:
            ((bf16_t *)a->y)[i] = dsv4_f32_to_bf16(((const float *)a->x)[i]);
            break;
        case DSV4_CAST_BF16_HAZ:
            ((bf16_t *)a->y)[i] = dsv4_f32_to_bf16_haz(((const float *)a->x)[i]);
            break;
        case DSV4_CAST_FP8:
            ((uint8_t *)a->y)[i] = dsv4_f32_to_fp8(((const float *)a->x)[i]);
            break;
        case DSV4_CAST_EXP:
            ((float *)a->y)[i] = dsv4_exp_f32(((const float *)a->x)[i]);
            break;
        default:
            ((float *)a->y)[i] = dsv4_fp8_to_f32(((const uint8_t *)a->x)[i]);
        }
    }
    return DSV4_OK;
}

int dsv4_quant_int8_prepare(void *p, struct dsv4_err *e, size_t *scratch)
{
    *scratch = 0;
    return DSV4_OK;
}

int dsv4_quant_int8(void *p, struct dsv4_err *e)
{
    const struct dsv4_quant_int8_args *a = p;
    const struct dsv4_ops *ops = dsv4_call_ops();
    for (int64_t m = 0; m < a->M; m++)
        a->scale[m] = dsv4_quant_row_i8(ops, a->x + m * a->N, a->N, a->y + m * a->N);
    return DSV4_OK;
}

/* ---- matmul --------------------------------------------------------------- */

struct mm_scratch { void *a; int32_t *rowsum; void *c; void *work[256]; };

static void mm_layout(const struct dsv4_matmul_args *a, int nth, struct dsv4_arena *ar,
                      struct mm_scratch *s)
{
    int64_t Mp = dsv4_round_up(a->M, DSV4_GEMM_MR);
    int i8 = a->variant != DSV4_MATMUL_BF16;
    size_t w = i8 ? dsv4_gemm_i8_work(a->K) : dsv4_gemm_bf16_work(a->K);
    s->a = dsv4_take(ar, i8 ? (size_t)Mp * dsv4_gemm_i8_lda(a->K) : (size_t)Mp * a->K * 4);
    s->rowsum = dsv4_take(ar, (size_t)Mp * sizeof(int32_t));
    s->c = dsv4_take(ar, (size_t)Mp * a->N * 4);
    for (int i = 0; i < nth; i++)
        s->work[i] = dsv4_take(ar, w);
}

static int mm_threads(void) { int n = dsv4_num_threads(); return n > 256 ? 256 : n; }

int dsv4_matmul_prepare(void *p, struct dsv4_err *e, size_t *scratch)
{
    struct dsv4_matmul_args *a = p;
    if (a->variant != DSV4_MATMUL_BF16 && a->K > 65536) {
        snprintf(e->msg, sizeof e->msg, "K = %lld exceeds 65536", (long long)a->K);
        return DSV4_EVALUE;
    }
    struct dsv4_arena ar = {0};
    struct mm_scratch s;
    mm_layout(a, mm_threads(), &ar, &s);
    *scratch = ar.used;
    return DSV4_OK;
}

int dsv4_matmul(void *p, struct dsv4_err *e)
{
    const struct dsv4_matmul_args *a = p;
    const struct dsv4_ops *ops = dsv4_call_ops();
    int nthr = mm_threads();
    struct dsv4_arena ar = {a->scratch, 0};
    struct mm_scratch s;
    mm_layout(a, nthr, &ar, &s);
    int64_t M = a->M, K = a->K, N = a->N, Mp = dsv4_round_up(M, DSV4_GEMM_MR);
    int i8 = a->variant != DSV4_MATMUL_BF16;

    if (i8) {
        dsv4_gemm_i8_prep_a(a->a, M, K, s.a, s.rowsum);
    } else {
        float *af = s.a;
        for (int64_t m = 0; m < Mp; m++)
            for (int64_t k = 0; k < K; k++)
                af[m * K + k] = m < M ? dsv4_bf16_to_f32(((const bf16_t *)a->a)[m * K + k]) : 0.0f;
    }
    int64_t units = (N + 63) / 64;
    #pragma omp parallel num_threads(nthr)
    {
        int ith = omp_get_thread_num(), nth = omp_get_num_threads();
        for (int64_t u = ith; u < units; u += nth) {
            int64_t n0 = u * 64, nc = N - n0 < 64 ? N - n0 : 64;
            if (a->variant == DSV4_MATMUL_I8_NT)
                dsv4_gemm_i8_nt(ops, s.a, s.rowsum, Mp, K, a->b, K, n0, nc, (int32_t *)s.c + n0, N);
            else if (i8)
                dsv4_gemm_i8(ops, s.a, s.rowsum, Mp, K, a->b, N, n0, nc, (int32_t *)s.c + n0, N,
                             s.work[ith]);
            else
                dsv4_gemm_bf16(ops, s.a, Mp, K, a->b, N, n0, nc, (float *)s.c + n0, N, s.work[ith]);
        }
    }
    memcpy(a->c, s.c, (size_t)M * N * 4);
    return DSV4_OK;
}

/* ---- rope ----------------------------------------------------------------- */

int dsv4_rope_prepare(void *p, struct dsv4_err *e, size_t *scratch)
{
    struct dsv4_rope_args *a = p;
    if (a->R % 2 || 2 * a->RW < a->R) {
        snprintf(e->msg, sizeof e->msg,
                 "x has %lld rope columns: expected an even number, at most 2 * %lld (cos columns)",
                 (long long)a->R, (long long)a->RW);
        return DSV4_EVALUE;
    }
    *scratch = (size_t)a->R * sizeof(float);
    return DSV4_OK;
}

int dsv4_rope(void *p, struct dsv4_err *e)
{
    const struct dsv4_rope_args *a = p;
    const struct dsv4_ops *ops = dsv4_call_ops();
    float *cs = a->scratch;
    int64_t R2 = a->R / 2;
    for (int64_t m = 0; m < a->M; m++) {
        dsv4_bf16_row_to_f32(ops, a->cos + m * a->RW, R2, cs);
        dsv4_bf16_row_to_f32(ops, a->sin + m * a->RW, R2, cs + R2);
        dsv4_rope_bf16(ops, a->x + m * a->R, cs, cs + R2, a->R, a->variant, a->y + m * a->R);
    }
    return DSV4_OK;
}
