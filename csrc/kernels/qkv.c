/* rms_norm and the Q/KV projection with RoPE (spec chapter 01 §4, §5). */
#include <omp.h>
#include <stdio.h>

#include "core/gemm.h"
#include "kernels/kernels.h"

/* ---- rms_norm ------------------------------------------------------------ */

int dsv4_rms_norm_prepare(void *p, struct dsv4_err *e, size_t *scratch)
{
    struct dsv4_rms_norm_args *a = p;
    *scratch = (size_t)dsv4_num_threads() * a->D * sizeof(float);
    return DSV4_OK;
}

int dsv4_rms_norm(void *p, struct dsv4_err *e)
{
    const struct dsv4_rms_norm_args *a = p;
    const struct dsv4_ops *ops = dsv4_call_ops();
    #pragma omp parallel num_threads(dsv4_num_threads())
    {
        float *row = (float *)a->scratch + (size_t)omp_get_thread_num() * a->D;
        int ith = omp_get_thread_num(), nth = omp_get_num_threads();
        for (int64_t t = ith; t < a->T; t += nth) {
            dsv4_bf16_row_to_f32(ops, a->x + t * a->D, a->D, row);
            float inv = dsv4_rms_inv(ops, row, a->D, a->rms_norm_eps);
            for (int64_t d = 0; d < a->D; d++)
                a->x_normed[t * a->D + d] =
                    dsv4_f32_to_bf16((row[d] * inv) * dsv4_bf16_to_f32(a->norm_w[d]));
        }
    }
    return DSV4_OK;
}

/* ---- qkv_proj_rope --------------------------------------------------------- */

#define GEMM_COLS 64    /* columns per GEMM work unit */

struct qkv_scratch {
    float *xf;          /* [Mp, D]  normalised input, fp32 */
    float *lat;         /* [Mp, Q]  x @ wq_a */
    float *kvf;         /* [Mp, HD] x @ wkv */
    int8_t *qa;         /* [Mp, lda] qr, padded for the int8 GEMM */
    int32_t *qsum;      /* [Mp] */
    struct qkv_thread { void *gemm; int32_t *acc; float *row; } th[256];
};

static void qkv_layout(const struct dsv4_qkv_proj_rope_args *a, struct dsv4_arena *ar,
                       struct qkv_scratch *s)
{
    int64_t Mp = dsv4_round_up(a->T, DSV4_GEMM_MR);
    int64_t R = a->qk_rope_head_dim;
    size_t gw = dsv4_gemm_bf16_work(a->D);
    if (dsv4_gemm_i8_work(a->Q) > gw)
        gw = dsv4_gemm_i8_work(a->Q);
    s->xf = dsv4_take(ar, (size_t)Mp * a->D * sizeof(float));
    s->lat = dsv4_take(ar, (size_t)Mp * a->Q * sizeof(float));
    s->kvf = dsv4_take(ar, (size_t)Mp * a->HD * sizeof(float));
    s->qa = dsv4_take(ar, (size_t)Mp * dsv4_gemm_i8_lda(a->Q));
    s->qsum = dsv4_take(ar, (size_t)Mp * sizeof(int32_t));
    for (int i = 0; i < a->nth; i++) {
        s->th[i].gemm = dsv4_take(ar, gw);
        s->th[i].acc = dsv4_take(ar, (size_t)Mp * a->HD * sizeof(int32_t));
        /* one fp32 row of the widest of Q, HD, D, plus cos/sin */
        int64_t w = a->Q > a->HD ? a->Q : a->HD;
        w = w > a->D ? w : a->D;
        s->th[i].row = dsv4_take(ar, (size_t)(w + R) * sizeof(float));
    }
}

int dsv4_qkv_proj_rope_prepare(void *p, struct dsv4_err *e, size_t *scratch)
{
    struct dsv4_qkv_proj_rope_args *a = p;
    int64_t R = a->qk_rope_head_dim;
    if (a->variant == DSV4_QKV_PLAIN) {
        a->B = 1;
        a->S = a->T;
        a->start_pos = 0;
    } else if (a->variant == DSV4_QKV_DECODE) {
        if (a->T != a->B * a->S) {
            snprintf(e->msg, sizeof e->msg,
                     "argument 'rope_cos' has %lld rows; expected one per token, B*S = %lld (from 'x')",
                     (long long)a->T, (long long)(a->B * a->S));
            return DSV4_EVALUE;
        }
        a->start_pos = 0;
    } else {
        a->T = a->B * a->S;
        if (a->start_pos < 0 || a->start_pos + a->S > a->P) {
            snprintf(e->msg, sizeof e->msg,
                     "start_pos = %lld: positions start_pos..start_pos+S-1 = %lld..%lld must lie "
                     "in the rope tables freqs_cos/freqs_sin of %lld rows",
                     (long long)a->start_pos, (long long)a->start_pos,
                     (long long)(a->start_pos + a->S - 1), (long long)a->P);
            return DSV4_EVALUE;
        }
    }
    if (R <= 0 || R % 2 || R >= a->HD) {
        snprintf(e->msg, sizeof e->msg,
                 "qk_rope_head_dim = %lld must be even and in (0, head_dim = %lld)",
                 (long long)R, (long long)a->HD);
        return DSV4_EVALUE;
    }
    if (a->RW != R) {
        snprintf(e->msg, sizeof e->msg,
                 "the rope tables have %lld columns; expected qk_rope_head_dim = %lld",
                 (long long)a->RW, (long long)R);
        return DSV4_EVALUE;
    }
    if (a->HHD % a->HD) {
        snprintf(e->msg, sizeof e->msg,
                 "argument 'wq_b' has %lld columns; expected a multiple of head_dim = %lld (from 'wkv')",
                 (long long)a->HHD, (long long)a->HD);
        return DSV4_EVALUE;
    }
    /* the unsigned-by-signed int8 GEMM sums up to 4 products of 255*127 per step */
    if (a->Q > 65536) {
        snprintf(e->msg, sizeof e->msg, "q_lora_rank = %lld exceeds 65536", (long long)a->Q);
        return DSV4_EVALUE;
    }
    a->H = a->HHD / a->HD;
    a->nth = dsv4_num_threads();
    if (a->nth > 256)
        a->nth = 256;
    struct dsv4_arena ar = {0};
    struct qkv_scratch s;
    qkv_layout(a, &ar, &s);
    *scratch = ar.used;
    return DSV4_OK;
}

/* cos/sin of token t, first R/2 columns, widened */
static void rope_row(const struct dsv4_ops *ops, const struct dsv4_qkv_proj_rope_args *a, int64_t t,
                     float *cs)
{
    /* prefill: every batch row uses positions start_pos..; otherwise one row per token */
    int64_t R2 = a->qk_rope_head_dim / 2;
    int64_t pos = a->variant == DSV4_QKV_PREFILL ? a->start_pos + t % a->S : t;
    dsv4_bf16_row_to_f32(ops, a->rope_cos + pos * a->RW, R2, cs);
    dsv4_bf16_row_to_f32(ops, a->rope_sin + pos * a->RW, R2, cs + R2);
}

int dsv4_qkv_proj_rope(void *p, struct dsv4_err *e)
{
    const struct dsv4_qkv_proj_rope_args *a = p;
    const struct dsv4_ops *ops = dsv4_call_ops();
    struct dsv4_arena ar = {a->scratch, 0};
    struct qkv_scratch s;
    qkv_layout(a, &ar, &s);

    const int64_t T = a->T, D = a->D, Q = a->Q, HD = a->HD, R = a->qk_rope_head_dim;
    const int64_t N = HD - R, Mp = dsv4_round_up(T, DSV4_GEMM_MR);
    const float eps = a->rms_norm_eps;

    #pragma omp parallel num_threads(a->nth)
    {
        const int ith = omp_get_thread_num(), nth = omp_get_num_threads();
        struct qkv_thread *th = &s.th[ith];

        /* 1. input rows (zero rows pad the GEMM tile) */
        for (int64_t t = ith; t < Mp; t += nth) {
            float *xr = s.xf + t * D;
            if (t >= T) {
                memset(xr, 0, (size_t)D * sizeof(float));
                continue;
            }
            dsv4_bf16_row_to_f32(ops, a->x + t * D, D, xr);
            if (a->variant != DSV4_QKV_PLAIN) {
                float inv = dsv4_rms_inv(ops, xr, D, eps);
                for (int64_t d = 0; d < D; d++)
                    xr[d] = dsv4_round_bf16((xr[d] * inv) * a->norm_w[d]);
            }
        }
        #pragma omp barrier

        /* 2. the two bf16 projections, split by column blocks */
        const int64_t uq = (Q + GEMM_COLS - 1) / GEMM_COLS, ukv = (HD + GEMM_COLS - 1) / GEMM_COLS;
        for (int64_t u = ith; u < uq + ukv; u += nth) {
            int64_t n0 = (u < uq ? u : u - uq) * GEMM_COLS, n = u < uq ? Q : HD;
            int64_t nc = n - n0 < GEMM_COLS ? n - n0 : GEMM_COLS;
            if (u < uq)
                dsv4_gemm_bf16(ops, s.xf, Mp, D, a->wq_a, Q, n0, nc, s.lat + n0, Q, th->gemm);
            else
                dsv4_gemm_bf16(ops, s.xf, Mp, D, a->wkv, HD, n0, nc, s.kvf + n0, HD, th->gemm);
        }
        #pragma omp barrier

        /* 3. per token: q latent norm + int8 quant; kv norm + RoPE */
        for (int64_t t = ith; t < T; t += nth) {
            float *row = th->row, *cs = th->row + (Q > HD ? Q : HD);
            const float *lat = s.lat + t * Q;
            float inv = dsv4_rms_inv(ops, lat, Q, eps);
            for (int64_t j = 0; j < Q; j++) {
                row[j] = (lat[j] * inv) * dsv4_bf16_to_f32(a->gamma_cq[j]);
                if (a->variant != DSV4_QKV_PLAIN)
                    row[j] = dsv4_round_bf16(row[j]);
            }
            a->qr_scale[t] = dsv4_quant_row_i8(ops, row, Q, a->qr + t * Q);

            const float *kvf = s.kvf + t * HD;
            inv = dsv4_rms_inv(ops, kvf, HD, eps);
            for (int64_t d = 0; d < HD; d++)
                row[d] = (kvf[d] * inv) * dsv4_bf16_to_f32(a->gamma_ckv[d]);
            for (int64_t d = 0; d < N; d++)
                a->kv[t * HD + d] = dsv4_f32_to_bf16(row[d]);
            rope_row(ops, a, t, cs);
            dsv4_rope_bf16(ops, row + N, cs, cs + R / 2, R, 0, a->kv + t * HD + N);
        }
        #pragma omp barrier
        if (ith == 0)
            dsv4_gemm_i8_prep_a(a->qr, T, Q, s.qa, s.qsum);
        #pragma omp barrier

        /* 4. per head: int8 GEMM, dequant, head RMSNorm, RoPE */
        for (int64_t h = ith; h < a->H; h += nth) {
            dsv4_gemm_i8(ops, s.qa, s.qsum, Mp, Q, a->wq_b, a->HHD, h * HD, HD, th->acc, HD,
                         th->gemm);
            float *row = th->row, *cs = th->row + HD;
            for (int64_t t = 0; t < T; t++) {
                const int32_t *qi = th->acc + t * HD;
                const float *ws = a->wq_b_scale + h * HD;
                float sc = a->qr_scale[t];
                for (int64_t d = 0; d < HD; d++)
                    row[d] = ((float)qi[d] * sc) * ws[d];
                float inv = dsv4_rms_inv(ops, row, HD, eps);
                for (int64_t d = 0; d < HD; d++)
                    row[d] = row[d] * inv;
                bf16_t *out = a->q + (t * a->H + h) * HD;
                for (int64_t d = 0; d < N; d++)
                    out[d] = dsv4_f32_to_bf16(row[d]);
                rope_row(ops, a, t, cs);
                dsv4_rope_bf16(ops, row + N, cs, cs + R / 2, R, 0, out + N);
            }
        }
    }
    return DSV4_OK;
}
