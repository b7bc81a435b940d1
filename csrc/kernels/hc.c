/* Hyper-connection kernels: hc_pre, hc_post, hc_head (spec chapter 01 §6-§8).
 * Work is split by token; each token's values are computed by one thread in
 * the golden's order. */
#include <math.h>
#include <omp.h>
#include <stdio.h>

#include "kernels/kernels.h"
#include "core/avx2.h"
#include "core/avx512.h"

#define RMS_K_CHUNK 512
#define LINEAR_K_CHUNK 256
#define MAX_HC 16

static float exp32(float z) { return (float)exp((double)z); }
static float sigmoid32(float z) { return 1.0f / (1.0f + exp32(-z)); }

#define TB 4                                   /* tokens sharing one pass over fn */
#define MAX_MIX ((2 + MAX_HC) * MAX_HC)

/* mix[i*M + m] = (chunked x_i . fn[m]) * rsqrt(chunked ss_i / K + eps) for the NX <= TB
 * tokens whose K values are the rows of xf. Chunk sums are added in order, per token. */
static void hc_mix(const struct dsv4_ops *ops, const float *xf, int64_t NX, const float *fn,
                   int64_t M, int64_t K, float eps, float *mix)
{
    float part[TB * MAX_MIX], r[TB];
    for (int64_t i = 0; i < NX; i++) {
        float ss = 0.0f;
        for (int64_t k0 = 0; k0 < K; k0 += RMS_K_CHUNK)
            ss = ss + dsv4_sum_sq(ops, xf + i * K + k0,
                                  K - k0 < RMS_K_CHUNK ? K - k0 : RMS_K_CHUNK);
        r[i] = 1.0f / sqrtf(ss * (1.0f / (float)K) + eps);
    }
    for (int64_t j = 0; j < NX * M; j++)
        mix[j] = 0.0f;
    for (int64_t k0 = 0; k0 < K; k0 += LINEAR_K_CHUNK) {
        dsv4_dot_f32_grid(ops, xf + k0, K, NX, fn + k0, K, M,
                          K - k0 < LINEAR_K_CHUNK ? K - k0 : LINEAR_K_CHUNK, part, M);
        for (int64_t j = 0; j < NX * M; j++)
            mix[j] = mix[j] + part[j];
    }
    for (int64_t i = 0; i < NX; i++)
        for (int64_t m = 0; m < M; m++)
            mix[i * M + m] = mix[i * M + m] * r[i];
}

static int check_hc(int64_t HC, int64_t D, int64_t K, const char *fn, const char *x,
                    struct dsv4_err *e)
{
    if (HC > MAX_HC || K != HC * D) {
        snprintf(e->msg, sizeof e->msg,
                 "argument '%s' has %lld columns; expected HC * D = %lld * %lld (from '%s'), HC <= %d",
                 fn, (long long)K, (long long)HC, (long long)D, x, MAX_HC);
        return DSV4_EVALUE;
    }
    return DSV4_OK;
}

/* ---- hc_pre --------------------------------------------------------------- */

int dsv4_hc_pre_prepare(void *p, struct dsv4_err *e, size_t *scratch)
{
    struct dsv4_hc_pre_args *a = p;
    if (check_hc(a->HC, a->D, a->K, "hc_fn", "x", e))
        return DSV4_EVALUE;
    if (a->MIX != (2 + a->HC) * a->HC) {
        snprintf(e->msg, sizeof e->msg, "argument 'hc_fn' has %lld rows; expected (2 + HC) * HC = %lld (HC from 'x')",
                 (long long)a->MIX, (long long)((2 + a->HC) * a->HC));
        return DSV4_EVALUE;
    }
    if (a->hc_sinkhorn_iters < 1) {
        snprintf(e->msg, sizeof e->msg, "hc_sinkhorn_iters = %lld must be >= 1",
                 (long long)a->hc_sinkhorn_iters);
        return DSV4_EVALUE;
    }
    a->HC2 = a->HC * a->HC;
    *scratch = (size_t)dsv4_num_threads() * (TB * a->K + TB * a->MIX + a->D) * sizeof(float);
    return DSV4_OK;
}

/* softmax over each row (+eps), a column pass, then (iters-1) row/column pairs */
static void sinkhorn(float *c, int64_t n, int64_t iters, float eps)
{
    for (int64_t i = 0; i < n; i++) {
        float *row = c + i * n, m = row[0], s = 0.0f;
        for (int64_t j = 1; j < n; j++)
            m = dsv4_max_nan(m, row[j]);
        for (int64_t j = 0; j < n; j++) {
            row[j] = exp32(row[j] - m);
            s = j ? s + row[j] : row[j];
        }
        float r = 1.0f / s;
        for (int64_t j = 0; j < n; j++)
            row[j] = row[j] * r + eps;
    }
    for (int64_t it = 0; it < iters; it++) {
        if (it > 0)
            for (int64_t i = 0; i < n; i++) {
                float s = c[i * n];
                for (int64_t j = 1; j < n; j++)
                    s = s + c[i * n + j];
                for (int64_t j = 0; j < n; j++)
                    c[i * n + j] = c[i * n + j] / (s + eps);
            }
        for (int64_t j = 0; j < n; j++) {
            float s = c[j];
            for (int64_t i = 1; i < n; i++)
                s = s + c[i * n + j];
            for (int64_t i = 0; i < n; i++)
                c[i * n + j] = c[i * n + j] / (s + eps);
        }
    }
}

int dsv4_hc_pre(void *p, struct dsv4_err *e)
{
    const struct dsv4_hc_pre_args *a = p;
    const struct dsv4_ops *ops = dsv4_call_ops();
    const int64_t HC = a->HC, D = a->D, K = a->K, MIX = a->MIX, nb = (a->T + TB - 1) / TB;
    #pragma omp parallel num_threads(dsv4_num_threads())
    {
        int ith = omp_get_thread_num(), nth = omp_get_num_threads();
        float *xf = (float *)a->scratch + (size_t)ith * (TB * K + TB * MIX + D);
        float *mixes = xf + TB * K, *y = mixes + TB * MIX;
        for (int64_t b = ith; b < nb; b += nth) {
            int64_t t0 = b * TB, nx = a->T - t0 < TB ? a->T - t0 : TB;
            dsv4_bf16_row_to_f32(ops, a->x + t0 * K, nx * K, xf);
            hc_mix(ops, xf, nx, a->hc_fn, MIX, K, a->rms_norm_eps, mixes);
            for (int64_t i = 0; i < nx; i++) {
                int64_t t = t0 + i;
                const float *mix = mixes + i * MIX, *xt = xf + i * K;
                float pre[MAX_HC];
                for (int64_t h = 0; h < HC; h++) {
                    pre[h] = sigmoid32(mix[h] * a->hc_scale[0] + a->hc_base[h]) + a->hc_eps;
                    a->post[t * HC + h] =
                        2.0f * sigmoid32(mix[HC + h] * a->hc_scale[1] + a->hc_base[HC + h]);
                }
                float *c = a->comb + t * a->HC2;
                for (int64_t m = 0; m < a->HC2; m++)
                    c[m] = mix[2 * HC + m] * a->hc_scale[2] + a->hc_base[2 * HC + m];
                sinkhorn(c, HC, a->hc_sinkhorn_iters, a->hc_eps);
                /* stream collapse, sequential from zero */
                for (int64_t d = 0; d < D; d++)
                    y[d] = 0.0f;
                for (int64_t h = 0; h < HC; h++)
                    for (int64_t d = 0; d < D; d++)
                        y[d] = y[d] + xt[h * D + d] * pre[h];
                for (int64_t d = 0; d < D; d++)
                    a->x_mixed[t * D + d] = dsv4_f32_to_bf16_haz(y[d]);
            }
        }
    }
    return DSV4_OK;
}

/* ---- hc_post --------------------------------------------------------------- */

int dsv4_hc_post_prepare(void *p, struct dsv4_err *e, size_t *scratch)
{
    struct dsv4_hc_post_args *a = p;
    if (a->HC > MAX_HC || a->HC2 != a->HC * a->HC) {
        snprintf(e->msg, sizeof e->msg, "argument 'comb' has %lld columns; expected HC * HC = %lld (HC from 'residual'), HC <= %d",
                 (long long)a->HC2, (long long)(a->HC * a->HC), MAX_HC);
        return DSV4_EVALUE;
    }
    *scratch = 0;
    return DSV4_OK;
}

#if defined(__x86_64__)
/* 16 columns d0..d0+15 of every output stream of token t, in the scalar order */
DSV4_AVX512 static void hc_post_x16(const struct dsv4_hc_post_args *a, int64_t t, int64_t d0)
{
    const int64_t HC = a->HC, D = a->D;
    __m512 x = dsv4_load_bf16x16(a->x + t * D + d0), r[MAX_HC];
    for (int64_t i = 0; i < HC; i++)
        r[i] = dsv4_load_bf16x16(a->residual + (t * HC + i) * D + d0);
    for (int64_t o = 0; o < HC; o++) {
        __m512 acc = _mm512_mul_ps(x, _mm512_set1_ps(a->post[t * HC + o]));
        for (int64_t i = 0; i < HC; i++)
            acc = _mm512_add_ps(acc, _mm512_mul_ps(r[i], _mm512_set1_ps(a->comb[t * a->HC2 + i * HC + o])));
        dsv4_store_bf16x16(a->y + (t * HC + o) * D + d0, acc);
    }
}

/* hc_post_x16 on 8 columns */
DSV4_AVX2 static void hc_post_x8(const struct dsv4_hc_post_args *a, int64_t t, int64_t d0)
{
    const int64_t HC = a->HC, D = a->D;
    __m256 x = dsv4_load_bf16x8(a->x + t * D + d0), r[MAX_HC];
    for (int64_t i = 0; i < HC; i++)
        r[i] = dsv4_load_bf16x8(a->residual + (t * HC + i) * D + d0);
    for (int64_t o = 0; o < HC; o++) {
        __m256 acc = _mm256_mul_ps(x, _mm256_set1_ps(a->post[t * HC + o]));
        for (int64_t i = 0; i < HC; i++)
            acc = _mm256_add_ps(acc, _mm256_mul_ps(r[i], _mm256_set1_ps(a->comb[t * a->HC2 + i * HC + o])));
        dsv4_store_bf16x8(a->y + (t * HC + o) * D + d0, acc);
    }
}
#endif

static void hc_post_x1(const struct dsv4_hc_post_args *a, int64_t t, int64_t d)
{
    const int64_t HC = a->HC, D = a->D;
    float x = dsv4_bf16_to_f32(a->x[t * D + d]);
    for (int64_t o = 0; o < HC; o++) {
        float acc = x * a->post[t * HC + o];
        for (int64_t i = 0; i < HC; i++)
            acc = acc + dsv4_bf16_to_f32(a->residual[(t * HC + i) * D + d]) * a->comb[t * a->HC2 + i * HC + o];
        a->y[(t * HC + o) * D + d] = dsv4_f32_to_bf16(acc);
    }
}

#define POST_BLOCK 512

int dsv4_hc_post(void *p, struct dsv4_err *e)
{
    const struct dsv4_hc_post_args *a = p;
    const int64_t D = a->D, nb = (D + POST_BLOCK - 1) / POST_BLOCK;
    const enum dsv4_isa isa = dsv4_call_ops()->isa;
    const int avx = isa >= DSV4_ISA_AVX512, avx2 = isa >= DSV4_ISA_AVX2;
    #pragma omp parallel for schedule(static) num_threads(dsv4_num_threads())
    for (int64_t u = 0; u < a->T * nb; u++) {
        int64_t t = u / nb, d = (u % nb) * POST_BLOCK, end = d + POST_BLOCK < D ? d + POST_BLOCK : D;
#if defined(__x86_64__)
        if (avx)
            for (; d + 16 <= end; d += 16)
                hc_post_x16(a, t, d);
        if (avx2)
            for (; d + 8 <= end; d += 8)
                hc_post_x8(a, t, d);
#endif
        for (; d < end; d++)
            hc_post_x1(a, t, d);
    }
    (void)avx;
    (void)avx2;
    return DSV4_OK;
}

/* ---- hc_head --------------------------------------------------------------- */

int dsv4_hc_head_prepare(void *p, struct dsv4_err *e, size_t *scratch)
{
    struct dsv4_hc_head_args *a = p;
    if (check_hc(a->HC, a->D, a->K, "hc_head_fn", "x_hc", e))
        return DSV4_EVALUE;
    if (a->HC & (a->HC - 1)) {
        snprintf(e->msg, sizeof e->msg,
                 "argument 'x_hc' has HC = %lld streams; the pairwise collapse needs a power of two",
                 (long long)a->HC);
        return DSV4_EVALUE;
    }
    *scratch = (size_t)dsv4_num_threads() * (TB * a->K + TB * a->HC) * sizeof(float);
    return DSV4_OK;
}

int dsv4_hc_head(void *p, struct dsv4_err *e)
{
    const struct dsv4_hc_head_args *a = p;
    const struct dsv4_ops *ops = dsv4_call_ops();
    const int64_t HC = a->HC, D = a->D, K = a->K, nb = (a->T + TB - 1) / TB;
    #pragma omp parallel num_threads(dsv4_num_threads())
    {
        int ith = omp_get_thread_num(), nth = omp_get_num_threads();
        float *xf = (float *)a->scratch + (size_t)ith * (TB * K + TB * HC), *mixes = xf + TB * K;
        for (int64_t b = ith; b < nb; b += nth) {
            int64_t t0 = b * TB, nx = a->T - t0 < TB ? a->T - t0 : TB;
            dsv4_bf16_row_to_f32(ops, a->x_hc + t0 * K, nx * K, xf);
            hc_mix(ops, xf, nx, a->hc_head_fn, HC, K, a->rms_norm_eps, mixes);
            for (int64_t i = 0; i < nx; i++) {
                const float *xt = xf + i * K;
                float pre[MAX_HC], terms[MAX_HC];
                for (int64_t h = 0; h < HC; h++)
                    pre[h] = sigmoid32(mixes[i * HC + h] * a->hc_head_scale[0] + a->hc_head_base[h]) +
                             a->hc_eps;
                for (int64_t d = 0; d < D; d++) {
                    for (int64_t h = 0; h < HC; h++)
                        terms[h] = xt[h * D + d] * pre[h];
                    for (int64_t w = HC; w > 1; w /= 2)       /* pairwise: (t0+t1) + (t2+t3) */
                        for (int64_t j = 0; j < w / 2; j++)
                            terms[j] = terms[2 * j] + terms[2 * j + 1];
                    a->y[(t0 + i) * D + d] = dsv4_f32_to_bf16_haz(terms[0]);
                }
            }
        }
    }
    return DSV4_OK;
}
