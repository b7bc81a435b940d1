/* MTP input projection, LM head and the MTP block (spec chapter 06 §8, §9).
 *
 * mtp_projection: rows are normalised and quantised one per thread, then both int8
 * projections run as exact int32 GEMMs split by output columns, then each output row is
 * dequantised in the golden's order. lm_head: each logit is an fp32 sum over k in order
 * (the panel GEMM), work split by vocabulary panels. prefill_mtp runs the leaf kernels.
 * Every output value comes from one thread in one order, whatever the thread count or
 * code path.
 */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <string.h>

#include "core/avx512.h"
#include "core/gemm.h"
#include "kernels/kernels.h"

#define MTP_RMS_CHUNK 128
#define COLS 64                  /* GEMM columns per work unit */

/* ---- mtp_projection ---------------------------------------------------------- */

struct mtp_scratch {
    float *rows;                 /* per thread: one fp32 row of D */
    int8_t *q;                   /* [T + T*HC, D]: the hidden rows, then the prev rows */
    float *dq;                   /* [T + T*HC] dequant scales */
    int8_t *ea, *ha;             /* the codes prepared for the int8 GEMM */
    int32_t *esum, *hsum;
    int32_t *e, *h;              /* [Tp, D], [Pp, D] exact sums */
};

static void mtp_layout(const struct dsv4_mtp_projection_args *a, int nth, struct dsv4_arena *ar,
                       struct mtp_scratch *s)
{
    const int64_t T = a->T, D = a->D, NP = T * a->HC, lda = dsv4_gemm_i8_lda(D);
    const int64_t Tp = dsv4_gemm_i8_rows(T), Pp = dsv4_gemm_i8_rows(NP);
    s->rows = dsv4_take(ar, (size_t)nth * D * sizeof(float));
    s->q = dsv4_take(ar, (size_t)(T + NP) * D);
    s->dq = dsv4_take(ar, (size_t)(T + NP) * sizeof(float));
    s->ea = dsv4_take(ar, (size_t)Tp * lda);
    s->ha = dsv4_take(ar, (size_t)Pp * lda);
    s->esum = dsv4_take(ar, (size_t)Tp * sizeof(int32_t));
    s->hsum = dsv4_take(ar, (size_t)Pp * sizeof(int32_t));
    s->e = dsv4_take(ar, (size_t)Tp * D * sizeof(int32_t));
    s->h = dsv4_take(ar, (size_t)Pp * D * sizeof(int32_t));
}

/* One row: RMSNorm over 128-chunks, weight, smooth, then int8 codes; returns the dequant
 * scale. The golden clamps the int32 codes to +-127 before its int8 cast, so a product that
 * is NaN (a NaN in the row, or an Inf times the zero factor of an infinite amax) gives -127
 * there, not the 0 of dsv4_quant_row_i8. */
static float mtp_row(const struct dsv4_ops *ops, const bf16_t *x, const float *w,
                     const float *smooth, int64_t D, float eps, float *v, int8_t *q)
{
    dsv4_bf16_row_to_f32(ops, x, D, v);
    float ss = 0.0f;
    for (int64_t k0 = 0; k0 < D; k0 += MTP_RMS_CHUNK)
        ss = ss + dsv4_sum_sq(ops, v + k0, D - k0 < MTP_RMS_CHUNK ? D - k0 : MTP_RMS_CHUNK);
    const float inv = 1.0f / sqrtf(ss * (1.0f / (float)D) + eps);
    for (int64_t d = 0; d < D; d++)
        v[d] = ((v[d] * inv) * w[d]) * smooth[d];
    const float dq = dsv4_quant_row_i8(ops, v, D, q);
    if (!isfinite(dq))      /* amax NaN: every product NaN; amax Inf: NaN where v is infinite */
        for (int64_t d = 0; d < D; d++)
            if (isnan(dq) || isinf(v[d]))
                q[d] = -127;
    return dq;
}

int dsv4_mtp_projection_prepare(void *p, struct dsv4_err *e, size_t *scratch)
{
    struct dsv4_mtp_projection_args *a = p;
    /* the unsigned-by-signed int8 GEMM accumulates D * 255 * 128 in int32 */
    if (a->D > 65536) {
        snprintf(e->msg, sizeof e->msg, "hidden size %lld (from 'hidden_states') exceeds 65536",
                 (long long)a->D);
        return DSV4_EVALUE;
    }
    struct dsv4_arena ar = {0};
    struct mtp_scratch s;
    mtp_layout(a, dsv4_num_threads(), &ar, &s);
    *scratch = ar.used;
    return DSV4_OK;
}

int dsv4_mtp_projection(void *p, struct dsv4_err *e)
{
    const struct dsv4_mtp_projection_args *a = p;
    const int nth = dsv4_num_threads();
    const struct dsv4_ops *ops = dsv4_call_ops();
    struct dsv4_arena ar = {a->scratch, 0};
    struct mtp_scratch s;
    mtp_layout(a, nth, &ar, &s);
    const int64_t T = a->T, HC = a->HC, D = a->D, NP = T * HC;
    const int64_t Tp = dsv4_gemm_i8_rows(T), Pp = dsv4_gemm_i8_rows(NP), units = (D + COLS - 1) / COLS;
    int8_t *hq = s.q + T * D;
    const float *hdq = s.dq + T;

    #pragma omp parallel num_threads(nth)
    {
        const int ith = omp_get_thread_num(), nt = omp_get_num_threads();
        float *v = s.rows + (size_t)ith * D;
        for (int64_t r = ith; r < T + NP; r += nt)
            s.dq[r] = r < T ? mtp_row(ops, a->hidden_states + r * D, a->enorm_w, a->e_proj_smooth,
                                      D, a->rms_norm_eps, v, s.q + r * D)
                            : mtp_row(ops, a->prev_hidden_states + (r - T) * D, a->hnorm_w,
                                      a->h_proj_smooth, D, a->rms_norm_eps, v, s.q + r * D);
        #pragma omp barrier
        #pragma omp single
        {
            dsv4_gemm_i8_prep_a(s.q, T, D, s.ea, s.esum);
            dsv4_gemm_i8_prep_a(hq, NP, D, s.ha, s.hsum);
        }
        for (int64_t u = ith; u < 2 * units; u += nt) {
            const int64_t n0 = (u % units) * COLS, nc = D - n0 < COLS ? D - n0 : COLS;
            if (u < units)
                dsv4_gemm_i8_nt(ops, s.ea, s.esum, Tp, D, a->e_proj_w, D, n0, nc, s.e + n0, D);
            else
                dsv4_gemm_i8_nt(ops, s.ha, s.hsum, Pp, D, a->h_proj_w, D, n0, nc, s.h + n0, D);
        }
        #pragma omp barrier
        for (int64_t r = ith; r < NP; r += nt) {
            const int64_t t = r / HC;
            const int32_t *er = s.e + t * D, *hr = s.h + r * D;
            bf16_t *y = a->hidden_states_out + r * D;
            for (int64_t n = 0; n < D; n++) {
                const float ev = ((float)er[n] * s.dq[t]) * a->e_proj_w_scale[n];
                const float hv = ((float)hr[n] * hdq[r]) * a->h_proj_w_scale[n];
                y[n] = dsv4_f32_to_bf16(ev + hv);
            }
        }
    }
    return DSV4_OK;
}

/* ---- lm_head ------------------------------------------------------------------- */

#define LM_MAX_SHARDS 64
#define LM_LANES 16              /* up to this many token rows: one vector lane each */
#define LM_ROWS 64               /* vocabulary rows per work unit of the few-token path */
#define LM_KC 256                /* k per widened slice of the vector path */

/* Few tokens on AVX-512: each (token, row) sum is the fmaf chain over k in order that the
 * panel GEMM makes, with the tokens in the lanes (Xt [D][LM_LANES], zero past NX) and each
 * weight row's k-slices widened once (wf): the same bits without the panel's transposes.
 * Narrower paths take the panel GEMM for every token count, whose micro-kernels they have. */
#if defined(__x86_64__)
/* 8 weight rows at a time, 8 independent chains; their k-slices widened into wf [8][LM_KC] */
DSV4_AVX512 static void lm_rows_avx512(const struct dsv4_ops *ops, const float *Xt, int64_t NX,
                                       const bf16_t *W, int64_t nr, int64_t D, float *wf,
                                       float *out, int64_t ldo)
{
    float v[8][LM_LANES] __attribute__((aligned(64)));
    for (int64_t m = 0; m < nr; m += 8) {
        const int64_t rows = nr - m < 8 ? nr - m : 8;
        __m512 c[8];
        for (int i = 0; i < 8; i++)
            c[i] = _mm512_setzero_ps();
        for (int64_t k0 = 0; k0 < D; k0 += LM_KC) {
            const int64_t kn = D - k0 < LM_KC ? D - k0 : LM_KC;
            for (int64_t i = 0; i < 8; i++)   /* rows past nr: zero weights, never stored */
                if (i < rows)
                    dsv4_bf16_row_to_f32(ops, W + (m + i) * D + k0, kn, wf + i * LM_KC);
                else
                    memset(wf + i * LM_KC, 0, (size_t)kn * sizeof(float));
            for (int64_t k = 0; k < kn; k++) {
                const __m512 x = _mm512_load_ps(Xt + (k0 + k) * LM_LANES);
                for (int i = 0; i < 8; i++)
                    c[i] = _mm512_fmadd_ps(x, _mm512_set1_ps(wf[i * LM_KC + k]), c[i]);
            }
        }
        for (int i = 0; i < 8; i++)
            _mm512_store_ps(v[i], c[i]);
        for (int64_t i = 0; i < rows; i++)
            for (int64_t t = 0; t < NX; t++)
                out[t * ldo + m + i] = v[i][t];
    }
}
#endif

/* per thread: 8 widened k-slices */
static int64_t wf_floats(void) { return 8 * LM_KC; }

static int lm_lanes(const struct dsv4_ops *ops, int64_t NX)
{
    return NX <= LM_LANES && ops->isa >= DSV4_ISA_AVX512;
}

int dsv4_lm_head_prepare(void *p, struct dsv4_err *e, size_t *scratch)
{
    struct dsv4_lm_head_args *a = p;
    if (a->P > LM_MAX_SHARDS) {
        snprintf(e->msg, sizeof e->msg, "lm_head_weight has %lld shards; at most %d",
                 (long long)a->P, LM_MAX_SHARDS);
        return DSV4_EVALUE;
    }
    a->V = a->P * a->VS;
    const int64_t NX = a->R * a->T, nth = dsv4_num_threads();
    *scratch = lm_lanes(dsv4_call_ops(), NX)
                   ? (size_t)LM_LANES * a->D * sizeof(float) + (size_t)nth * wf_floats() * sizeof(float) + 2 * 64
                   : (size_t)NX * a->D * sizeof(float) + 64 +
                         dsv4_xwt_work(NX, a->VS, a->D, a->P, (int)nth);
    return DSV4_OK;
}

/* Every logit is an fp32 sum over k in order, whatever the token count and path (few
 * tokens on AVX-512 in lanes, otherwise the panel GEMM with the shards as its groups): a
 * token's logits do not depend on the batch. */
int dsv4_lm_head(void *p, struct dsv4_err *e)
{
    const struct dsv4_lm_head_args *a = p;
    const int64_t NX = a->R * a->T, D = a->D, VS = a->VS, V = a->V;
    const int nth = dsv4_num_threads();
    const struct dsv4_ops *ops = dsv4_call_ops();
    struct dsv4_arena ar = {a->scratch, 0};
#if defined(__x86_64__)
    if (lm_lanes(ops, NX)) {
        float *Xt = dsv4_take(&ar, (size_t)LM_LANES * D * sizeof(float));
        float *wf = dsv4_take(&ar, (size_t)nth * wf_floats() * sizeof(float));
        for (int64_t k = 0; k < D; k++)
            for (int64_t t = 0; t < LM_LANES; t++)
                Xt[k * LM_LANES + t] = t < NX ? dsv4_bf16_to_f32(a->hidden_states[t * D + k]) : 0.0f;
        const int64_t per = (VS + LM_ROWS - 1) / LM_ROWS, units = a->P * per;
        #pragma omp parallel for schedule(static) num_threads(nth)
        for (int64_t u = 0; u < units; u++) {
            const int64_t s = u / per, r0 = u % per * LM_ROWS, nr = VS - r0 < LM_ROWS ? VS - r0 : LM_ROWS;
            lm_rows_avx512(ops, Xt, NX, a->lm_head_weight + (s * VS + r0) * D, nr, D,
                           wf + (size_t)omp_get_thread_num() * wf_floats(), a->logits + s * VS + r0, V);
        }
        return DSV4_OK;
    }
#endif
    float *X = dsv4_take(&ar, (size_t)NX * D * sizeof(float));
    void *work = dsv4_take(&ar, dsv4_xwt_work(NX, VS, D, a->P, nth));
    struct dsv4_xwt_group g[LM_MAX_SHARDS];
    for (int64_t s = 0; s < a->P; s++)
        g[s] = (struct dsv4_xwt_group){X, a->lm_head_weight + s * VS * D, a->logits + s * VS};
    dsv4_bf16_row_to_f32(ops, a->hidden_states, NX * D, X);
    dsv4_xwt_groups(ops, g, a->P, D, NX, D, VS, D, V, work, nth);
    return DSV4_OK;
}

/* ---- prefill_mtp ------------------------------------------------------------------ */

#define AT(p, n) ((p) ? (p) + (n) : NULL)

/* rank r's projection: every tensor of proj is [R, ...] with rank 0 at the pointer */
static void proj_view(const struct dsv4_prefill_mtp_args *M, int64_t r, struct dsv4_mtp_projection_args *p)
{
    const struct dsv4_mtp_projection_args *a = &M->proj;
    const int64_t T = M->blk.T, HC = M->blk.HC, D = M->blk.D;
    *p = *a;
    p->T = T;
    p->HC = HC;
    p->D = D;
    p->rms_norm_eps = M->blk.rms_norm_eps;
    p->hidden_states = a->hidden_states + r * T * D;
    p->prev_hidden_states = a->prev_hidden_states + r * T * HC * D;
    p->enorm_w = a->enorm_w + r * D;
    p->hnorm_w = a->hnorm_w + r * D;
    p->e_proj_w = a->e_proj_w + r * D * D;
    p->e_proj_w_scale = a->e_proj_w_scale + r * D;
    p->e_proj_smooth = a->e_proj_smooth + r * D;
    p->h_proj_w = a->h_proj_w + r * D * D;
    p->h_proj_w_scale = a->h_proj_w_scale + r * D;
    p->h_proj_smooth = a->h_proj_smooth + r * D;
    p->hidden_states_out = AT(M->projected, r * T * HC * D);
}

/* rank r's sliding-window block over its projected rows, prepared (addresses checked) */
static int block_view(const struct dsv4_prefill_mtp_args *M, int64_t r, struct dsv4_attention_block_args *b,
                      struct dsv4_err *e, size_t *scratch)
{
    const struct dsv4_attention_block_args *a = &M->blk;
    const int64_t T = a->T;
    *b = *a;
    b->variant = DSV4_BLOCK_SWA | DSV4_BLOCK_PREFILL;
    b->B = 1;
    b->num_tokens = M->num_tokens;
    b->x_hc = AT(M->projected, r * T * a->HC * a->D);
    b->x_out = AT(M->x_attn, r * T * a->HC * a->D);
    b->hc_attn_fn = a->hc_attn_fn + r * a->MIX * a->HCD;
    b->hc_attn_scale = a->hc_attn_scale + r * 3;
    b->hc_attn_base = a->hc_attn_base + r * a->MIX;
    b->attn_norm_w = a->attn_norm_w + r * a->D;
    b->wq_a = a->wq_a + r * a->D * a->Q;
    b->wq_b = a->wq_b + r * a->Q * a->HHD;
    b->wq_b_scale = a->wq_b_scale + r * a->HHD;
    b->wkv = a->wkv + r * a->D * a->HD;
    b->gamma_cq = a->gamma_cq + r * a->Q;
    b->gamma_ckv = a->gamma_ckv + r * a->HD;
    b->freqs_cos = a->freqs_cos + r * a->MAXS * a->RW;
    b->freqs_sin = a->freqs_sin + r * a->MAXS * a->RW;
    b->kv_cache = a->kv_cache + r * a->OB * a->BLOCK * a->HD;
    b->ori_block_table = a->ori_block_table + r * a->OM;
    b->ori_slot_mapping = a->ori_slot_mapping + r * T;
    b->cmp_sparse_indices = a->cmp_sparse_indices + r * T * a->K;
    b->cmp_sparse_lens = a->cmp_sparse_lens + r * T;
    b->position_ids = a->position_ids + r * T;
    b->attn_sink = a->attn_sink + r * a->H;
    b->wo_a = a->wo_a + r * a->G * a->OL * a->OGI;
    b->wo_b = a->wo_b + r * a->D * a->GOL;
    b->wo_b_scale = a->wo_b_scale + r * a->D;
    struct dsv4_err in = {{0}};
    if (dsv4_attention_block_prepare(b, &in, scratch)) {
        char where[32];
        snprintf(where, sizeof where, "rank %lld", (long long)r);
        return dsv4_err_prefixed(e, where, &in);
    }
    return DSV4_OK;
}

static void moe_view(const struct dsv4_prefill_mtp_args *M, struct dsv4_moe_args *m)
{
    const struct dsv4_attention_block_args *a = &M->blk;
    *m = M->moe;
    m->R = M->R;
    m->T = a->T;
    m->HC = a->HC;
    m->D = a->D;
    m->MIX = a->MIX;
    m->HCD = a->HCD;
    m->layer_id = M->num_hidden_layers;        /* the MTP layer: score routing */
    m->num_tokens = M->num_tokens;
    m->rms_norm_eps = a->rms_norm_eps;
    m->hc_eps = a->hc_eps;
    m->hc_sinkhorn_iters = a->hc_sinkhorn_iters;
    m->x_hc = M->x_attn;
}

static void head_view(const struct dsv4_prefill_mtp_args *M, int64_t r, struct dsv4_hc_head_args *h,
                      struct dsv4_rms_norm_args *n)
{
    const struct dsv4_attention_block_args *a = &M->blk;
    const int64_t T = a->T, HC = a->HC, D = a->D;
    *h = M->head;
    h->T = T;
    h->HC = HC;
    h->D = D;
    h->K = a->HCD;
    h->rms_norm_eps = a->rms_norm_eps;
    h->hc_eps = a->hc_eps;
    h->x_hc = AT(M->moe.x_next, r * T * HC * D);
    h->hc_head_fn = M->head.hc_head_fn + r * HC * a->HCD;
    h->hc_head_scale = M->head.hc_head_scale + r;
    h->hc_head_base = M->head.hc_head_base + r * HC;
    h->y = AT(M->x_head, r * T * D);
    *n = (struct dsv4_rms_norm_args){.x = h->y, .norm_w = M->mtp_norm_w + r * D,
                                     .x_normed = AT(M->hidden_out, r * T * D), .T = T, .D = D,
                                     .rms_norm_eps = a->rms_norm_eps};
}

/* the kv_cache rows the blocks write (their first num_tokens slot mappings), kept to be put
 * back if the MoE fails on its data */
static size_t mtp_undo(const struct dsv4_prefill_mtp_args *M, char *buf, int restore)
{
    const struct dsv4_attention_block_args *a = &M->blk;
    const size_t row = (size_t)a->HD * sizeof(bf16_t);
    size_t used = 0;
    for (int64_t r = 0; r < M->R; r++)
        for (int64_t t = 0; t < M->num_tokens; t++) {
            int64_t slot = a->ori_slot_mapping[r * a->T + t];
            if (slot < 0)
                continue;
            char *p = (char *)(a->kv_cache + r * a->OB * a->BLOCK * a->HD) + slot * row;
            if (buf)
                memcpy(restore ? p : buf + used, restore ? buf + used : p, row);
            used += row;
        }
    return used;
}

static size_t max_size(size_t a, size_t b) { return a > b ? a : b; }

int dsv4_prefill_mtp_prepare(void *p, struct dsv4_err *e, size_t *scratch)
{
    struct dsv4_prefill_mtp_args *M = p;
    if (dsv4_resolve_num_tokens(&M->num_tokens, M->blk.T, e))
        return DSV4_EVALUE;
    size_t work = 0, n = 0;
    struct dsv4_mtp_projection_args pr;
    proj_view(M, 0, &pr);
    if (dsv4_mtp_projection_prepare(&pr, e, &n))
        return DSV4_EVALUE;
    work = max_size(work, n);
    struct dsv4_attention_block_args b;
    for (int64_t r = 0; r < M->R; r++) {
        if (block_view(M, r, &b, e, &n))
            return DSV4_EVALUE;
        work = max_size(work, n);
    }
    M->stage_size = dsv4_attention_block_stages(&b, NULL);
    struct dsv4_moe_args m;
    moe_view(M, &m);
    if (dsv4_moe_prepare(&m, e, &n))
        return DSV4_EVALUE;
    work = max_size(work, n);
    struct dsv4_hc_head_args h;
    struct dsv4_rms_norm_args rn;
    head_view(M, 0, &h, &rn);
    if (dsv4_hc_head_prepare(&h, e, &n))
        return DSV4_EVALUE;
    work = max_size(work, n);
    if (dsv4_rms_norm_prepare(&rn, e, &n))
        return DSV4_EVALUE;
    M->work_size = max_size(work, n);
    M->undo_size = mtp_undo(M, NULL, 0);
    *scratch = M->stage_size + M->undo_size + M->work_size + 3 * 64;
    return DSV4_OK;
}

int dsv4_prefill_mtp(void *p, struct dsv4_err *e)
{
    struct dsv4_prefill_mtp_args *M = p;
    struct dsv4_arena ar = {M->scratch, 0};
    void *stage = dsv4_take(&ar, M->stage_size);
    char *saved = dsv4_take(&ar, M->undo_size);
    void *work = dsv4_take(&ar, M->work_size);
    size_t n;
    for (int64_t r = 0; r < M->R; r++) {
        struct dsv4_mtp_projection_args pr;
        proj_view(M, r, &pr);
        pr.scratch = work;
        if (dsv4_mtp_projection(&pr, e))
            return DSV4_EVALUE;
    }
    mtp_undo(M, saved, 0);
    for (int64_t r = 0; r < M->R; r++) {
        struct dsv4_attention_block_args b;
        if (block_view(M, r, &b, e, &n))
            return DSV4_EVALUE;
        if (dsv4_attention_block_stages(&b, stage) > M->stage_size) {
            snprintf(e->msg, sizeof e->msg, "internal: a block's stages outgrow their buffer");
            return DSV4_EVALUE;
        }
        b.scratch = work;
        if (dsv4_attention_block(&b, e)) {
            mtp_undo(M, saved, 1);
            return DSV4_EVALUE;
        }
    }
    struct dsv4_moe_args m;
    moe_view(M, &m);
    if (dsv4_moe_prepare(&m, e, &n) || (m.scratch = work, dsv4_moe(&m, e))) {
        mtp_undo(M, saved, 1);               /* the ring rows the blocks wrote */
        return DSV4_EVALUE;
    }
    for (int64_t r = 0; r < M->R; r++) {
        struct dsv4_hc_head_args h;
        struct dsv4_rms_norm_args rn;
        head_view(M, r, &h, &rn);
        h.scratch = work;
        rn.scratch = work;
        if (dsv4_hc_head(&h, e) || dsv4_rms_norm(&rn, e))
            return DSV4_EVALUE;
    }
    return DSV4_OK;
}
