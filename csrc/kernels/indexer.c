/* The lightning indexer (spec chapter 04 §4.10): decode_indexer, prefill_indexer.
 * The inner indexer-key compressor (compressor.c) commits this call's keys; the query is
 * the W8A8 up-projection of qr, RoPE on each head's last dims (rounded to bf16), bf16 of
 * the rest, times the Hadamard matrix; queries and keys are int8 per row and scored
 * exactly in int32, then dequantised, relu'd and weighted per head. */
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

#include "core/gemm.h"
#include "kernels/kernels.h"

#define COLS 64
#define HEAD_CHUNK 16               /* the head sum: chunks of 16 heads, in order */
#define NEG (-3.4028234663852886e38f)

struct query_scratch {
    int8_t *qa, *ka;                /* query rows [Np*H, lda] and key rows [slots, HD] */
    int32_t *qsum, *qi, *s32;       /* rowsum of qa; Q32 [Np, HHD]; scores [N*H, slots] */
    float *qdq, *kdq, *wt, *xf, *row;
    int8_t *qra;                    /* qr padded for the GEMM */
    int32_t *qrsum;
    void *work;                     /* per thread GEMM panels */
};

static void query_layout(const struct dsv4_indexer_query *q, int64_t D, int64_t HD, int64_t slots,
                         struct dsv4_arena *ar, struct query_scratch *s)
{
    const int64_t Np = dsv4_gemm_i8_rows(q->N), NH = dsv4_gemm_i8_rows(q->N * q->H);
    const int nth = dsv4_num_threads();
    size_t w = dsv4_gemm_i8_work(q->QL) > dsv4_gemm_bf16_work(D) ? dsv4_gemm_i8_work(q->QL)
                                                                 : dsv4_gemm_bf16_work(D);
    s->qra = dsv4_take(ar, (size_t)Np * dsv4_gemm_i8_lda(q->QL));
    s->qrsum = dsv4_take(ar, (size_t)Np * sizeof(int32_t));
    s->qi = dsv4_take(ar, (size_t)Np * q->HHD * sizeof(int32_t));
    s->qa = dsv4_take(ar, (size_t)NH * dsv4_gemm_i8_lda(HD));
    s->qsum = dsv4_take(ar, (size_t)NH * sizeof(int32_t));
    s->qdq = dsv4_take(ar, (size_t)NH * sizeof(float));
    s->ka = dsv4_take(ar, (size_t)(slots + 1) * HD);
    s->kdq = dsv4_take(ar, (size_t)(slots + 1) * sizeof(float));
    s->s32 = dsv4_take(ar, (size_t)NH * (slots + 1) * sizeof(int32_t));
    s->xf = dsv4_take(ar, (size_t)Np * D * sizeof(float));
    s->wt = dsv4_take(ar, (size_t)Np * q->H * sizeof(float));
    s->row = dsv4_take(ar, (size_t)nth * 2 * HD * sizeof(float));
    s->work = dsv4_take(ar, (size_t)nth * w);
}

static int check_query(const struct dsv4_indexer_query *q, int64_t N, int64_t HD, int64_t rd,
                       struct dsv4_err *e)
{
    if (q->N != N || q->H != q->index_n_heads || HD != q->index_head_dim ||
        q->HHD != q->H * HD || q->H % DSV4_GEMM_MR || HD % 4 || 2 * q->R2q != rd) {
        snprintf(e->msg, sizeof e->msg,
                 "qr has %lld rows for %lld tokens, weights_proj %lld heads, hadamard %lld wide, "
                 "wq_b %lld columns, cos %lld columns; expected one row per token, "
                 "index_n_heads = %lld (a multiple of 8), index_head_dim = %lld, heads * head "
                 "dim columns and qk_rope_head_dim / 2",
                 (long long)q->N, (long long)N, (long long)q->H, (long long)HD, (long long)q->HHD,
                 (long long)q->R2q, (long long)q->index_n_heads, (long long)q->index_head_dim);
        return DSV4_EVALUE;
    }
    if (q->QL > 65536) {
        snprintf(e->msg, sizeof e->msg, "qr has %lld columns, more than 65536", (long long)q->QL);
        return DSV4_EVALUE;
    }
    return DSV4_OK;
}

/* idx_block_table entries that slots 0..slots-1 of request row b (-1: 1-D table) read */
static int check_idx_table(const struct dsv4_indexer_query *q, int64_t b, int64_t slots,
                           int64_t CBLK, int64_t NC, struct dsv4_err *e)
{
    if (slots <= 0)
        return DSV4_OK;
    int64_t need = (slots - 1) / CBLK + 1;
    if (need > q->NBT) {
        snprintf(e->msg, sizeof e->msg,
                 "idx_block_table has %lld columns but slot %lld needs block column %lld",
                 (long long)q->NBT, (long long)(slots - 1), (long long)(need - 1));
        return DSV4_EVALUE;
    }
    for (int64_t j = 0; j < need; j++) {
        int64_t v = q->idx_block_table[(b < 0 ? 0 : b) * q->NBT + j];
        if (v < 0 || v >= NC) {
            if (b < 0)
                snprintf(e->msg, sizeof e->msg,
                         "idx_block_table[%lld] = %lld is outside [0, %lld) (blocks of idx_kv_cache)",
                         (long long)j, (long long)v, (long long)NC);
            else
                snprintf(e->msg, sizeof e->msg,
                         "idx_block_table[%lld, %lld] = %lld is outside [0, %lld) (blocks of "
                         "idx_kv_cache)",
                         (long long)b, (long long)j, (long long)v, (long long)NC);
            return DSV4_EVALUE;
        }
    }
    return DSV4_OK;
}

/* q8 rows (token n, head h) -> s->qa, qdq; head weights -> s->wt */
static void build_queries(const struct dsv4_indexer_query *q, const bf16_t *x, int64_t D,
                          int64_t HD, int64_t rd, const bf16_t *Hm, const struct query_scratch *s)
{
    const int64_t N = q->N, H = q->H, HHD = q->HHD, nd = HD - rd, R2 = rd / 2;
    const int64_t Np = dsv4_gemm_i8_rows(N), lda = dsv4_gemm_i8_lda(HD);
    const int nth = dsv4_num_threads();
    const struct dsv4_ops *ops = dsv4_call_ops();
    dsv4_gemm_i8_prep_a(q->qr, N, q->QL, s->qra, s->qrsum);
    for (int64_t n = 0; n < Np; n++)
        for (int64_t d = 0; d < D; d++)
            s->xf[n * D + d] = n < N ? dsv4_bf16_to_f32(x[n * D + d]) : 0.0f;
    const int64_t uq = (HHD + COLS - 1) / COLS;
    #pragma omp parallel num_threads(nth)
    {
        const int ith = omp_get_thread_num(), nt = omp_get_num_threads();
        size_t w = dsv4_gemm_i8_work(q->QL) > dsv4_gemm_bf16_work(D) ? dsv4_gemm_i8_work(q->QL)
                                                                     : dsv4_gemm_bf16_work(D);
        void *work = (char *)s->work + (size_t)ith * w;
        for (int64_t u = ith; u < uq + 1; u += nt) {
            if (u == uq) {                            /* head weights (x . weights_proj) */
                dsv4_gemm_bf16(ops, s->xf, Np, D, q->weights_proj, H, 0, H, s->wt, H, work);
                continue;
            }
            int64_t n0 = u * COLS, nc = HHD - n0 < COLS ? HHD - n0 : COLS;
            dsv4_gemm_i8(ops, s->qra, s->qrsum, Np, q->QL, q->wq_b, HHD, n0, nc, s->qi + n0, HHD,
                         work);
        }
        #pragma omp barrier
        float *v = s->row + (size_t)ith * 2 * HD, *r = v + HD;
        for (int64_t u = ith; u < N * H; u += nt) {
            int64_t n = u / H, h = u % H;
            const int32_t *qi = s->qi + n * HHD + h * HD;
            const float *ws = q->wq_b_scale + h * HD;
            for (int64_t d = 0; d < HD; d++)
                v[d] = ((float)qi[d] * q->qr_scale[n]) * ws[d];
            for (int64_t d = 0; d < nd; d++)
                v[d] = dsv4_round_bf16(v[d]);
            for (int64_t i = 0; i < R2; i++) {
                float a = v[nd + 2 * i], b = v[nd + 2 * i + 1];
                float c = q->cos[n * q->R2q + i], sn = q->sin[n * q->R2q + i];
                v[nd + 2 * i] = dsv4_round_bf16(a * c - b * sn);
                v[nd + 2 * i + 1] = dsv4_round_bf16(a * sn + b * c);
            }
            for (int64_t j = 0; j < HD; j++)                /* v . H, row vector on the left */
                r[j] = 0.0f;
            for (int64_t i = 0; i < HD; i++)
                for (int64_t j = 0; j < HD; j++)
                    r[j] = r[j] + v[i] * dsv4_bf16_to_f32(Hm[i * HD + j]);
            int8_t *qa = s->qa + u * lda;
            memset(qa, 0, (size_t)lda);
            s->qdq[u] = dsv4_quant_row_i8(ops, r, HD, qa);
            int32_t sum = 0;
            for (int64_t d = 0; d < HD; d++)
                sum += qa[d];
            s->qsum[u] = sum;
        }
    }
    for (int64_t u = N * H; u < dsv4_gemm_i8_rows(N * H); u++) {
        memset(s->qa + u * lda, 0, (size_t)lda);
        s->qsum[u] = 0;
    }
    for (int64_t i = 0; i < N * H; i++)
        s->wt[i] = s->wt[i] * q->index_weights_scale;
}

/* key rows of slots 0..slots-1 (bf16 cache rows) -> int8 rows s->ka and kdq */
static void build_keys(const struct dsv4_indexer_query *q, const bf16_t *cache, int64_t b,
                       int64_t slots, int64_t CBLK, int64_t HD, const struct query_scratch *s)
{
    const struct dsv4_ops *ops = dsv4_call_ops();
    #pragma omp parallel num_threads(dsv4_num_threads())
    {
        float *row = s->row + (size_t)omp_get_thread_num() * 2 * HD;
        #pragma omp for schedule(static)
        for (int64_t c = 0; c < slots; c++) {
            int64_t blk = q->idx_block_table[(b < 0 ? 0 : b) * q->NBT + c / CBLK];
            dsv4_bf16_row_to_f32(ops, cache + (blk * CBLK + c % CBLK) * HD, HD, row);
            s->kdq[c] = dsv4_quant_row_i8(ops, row, HD, s->ka + c * HD);
        }
    }
}

/* S32 of query rows [r0, r0 + rows) against the keys, in parallel over key columns */
static void score_int(const struct query_scratch *s, int64_t r0, int64_t rows, int64_t slots,
                      int64_t HD)
{
    const int64_t lda = dsv4_gemm_i8_lda(HD), units = (slots + COLS - 1) / COLS;
    const struct dsv4_ops *ops = dsv4_call_ops();
    #pragma omp parallel for schedule(static) num_threads(dsv4_num_threads())
    for (int64_t u = 0; u < units; u++) {
        int64_t n0 = u * COLS, nc = slots - n0 < COLS ? slots - n0 : COLS;
        dsv4_gemm_i8_nt(ops, s->qa + r0 * lda, s->qsum + r0, rows, HD, s->ka, HD, n0, nc,
                        s->s32 + r0 * slots + n0, slots);
    }
}

/* sum over heads of term(h): chunks of 16 heads, each in order, then the chunks in order */
/* torch.relu keeps a NaN; fmaxf alone would drop it */
static inline float relu(float x) { return x != x ? x : fmaxf(x, 0.0f); }

#define HEAD_SUM(H, term, out)                                                              \
    do {                                                                                    \
        float tot_ = 0.0f;                                                                  \
        for (int64_t h0_ = 0; h0_ < (H); h0_ += HEAD_CHUNK) {                               \
            float acc_ = 0.0f;                                                              \
            for (int64_t h = h0_; h < h0_ + HEAD_CHUNK && h < (H); h++)                     \
                acc_ = h == h0_ ? (term) : acc_ + (term);                                   \
            tot_ = h0_ ? tot_ + acc_ : acc_;                                                \
        }                                                                                   \
        (out) = tot_;                                                                       \
    } while (0)

struct ranked { float s; int32_t c; };

static int by_score(const void *x, const void *y)
{
    const struct ranked *a = x, *b = y;
    int an = a->s != a->s, bn = b->s != b->s;
    if (an != bn)
        return an - bn;                            /* NaN last, as the golden's argsort */
    if (!an && a->s != b->s)
        return a->s > b->s ? -1 : 1;              /* score descending */
    return a->c < b->c ? -1 : a->c > b->c;         /* then slot ascending */
}

static void top_k(const float *sc, int64_t vis, int64_t k, int64_t offset, int32_t *out,
                  struct ranked *buf)
{
    for (int64_t c = 0; c < vis; c++)
        buf[c] = (struct ranked){sc[c], (int32_t)c};
    qsort(buf, (size_t)vis, sizeof *buf, by_score);
    for (int64_t i = 0; i < k; i++)
        out[i] = (int32_t)(buf[i].c + offset);
}

/* ---- decode -------------------------------------------------------------------------- */

static int64_t decode_vis(const struct dsv4_decode_indexer_args *a, int64_t b)
{
    int64_t v = a->q.kv_seq_lens[b] / 4, p = (a->c.position_ids[b] + 1) / 4;
    v = v < p ? v : p;
    return v < a->q.SL ? v : a->q.SL;
}

int dsv4_decode_indexer_prepare(void *p, struct dsv4_err *e, size_t *scratch)
{
    struct dsv4_decode_indexer_args *a = p;
    struct dsv4_indexer_query *q = &a->q;
    size_t inner = 0;
    a->c.variant = 4;
    a->c.keep_kv = 1;
    q->cos = a->c.cos;
    q->sin = a->c.sin;
    q->R2q = a->c.R2;
    if (dsv4_decode_compressor_prepare(&a->c, e, &inner))
        return DSV4_EVALUE;
    if (check_query(q, a->c.B * a->c.S, a->c.HD, 2 * a->c.R2, e))
        return DSV4_EVALUE;
    q->SL = q->max_position_embeddings / 4;
    int64_t most = 0;
    for (int64_t b = 0; b < a->c.B; b++) {
        if (q->kv_seq_lens[b] < 0) {
            snprintf(e->msg, sizeof e->msg, "kv_seq_lens[%lld] = %d is negative", (long long)b,
                     q->kv_seq_lens[b]);
            return DSV4_EVALUE;
        }
        int64_t v = decode_vis(a, b);
        if (check_idx_table(q, b, v, a->c.CBLK, a->c.NC, e))
            return DSV4_EVALUE;
        most = v > most ? v : most;
    }
    struct dsv4_arena ar = {0};
    struct query_scratch s;
    query_layout(q, a->c.D, a->c.HD, most, &ar, &s);
    dsv4_take(&ar, (size_t)(most + 1) * sizeof(struct ranked));
    dsv4_take(&ar, (size_t)(most + 1) * sizeof(float));
    dsv4_take(&ar, inner);
    *scratch = ar.used;
    return DSV4_OK;
}

int dsv4_decode_indexer(void *p, struct dsv4_err *e)
{
    struct dsv4_decode_indexer_args *a = p;
    struct dsv4_indexer_query *q = &a->q;
    int64_t most = 0;
    for (int64_t b = 0; b < a->c.B; b++)
        most = decode_vis(a, b) > most ? decode_vis(a, b) : most;
    struct dsv4_arena ar = {a->scratch, 0};
    struct query_scratch s;
    query_layout(q, a->c.D, a->c.HD, most, &ar, &s);
    struct ranked *rk = dsv4_take(&ar, (size_t)(most + 1) * sizeof(struct ranked));
    float *sc = dsv4_take(&ar, (size_t)(most + 1) * sizeof(float));
    a->c.scratch = dsv4_take(&ar, 0);

    const int64_t B = a->c.B, H = q->H, HD = a->c.HD, SL = q->SL;
    build_queries(q, a->c.x, a->c.D, HD, 2 * a->c.R2, a->c.hadamard, &s);
    if (dsv4_decode_compressor(&a->c, e))
        return DSV4_EVALUE;
    for (int64_t i = 0; i < B * SL; i++) {
        q->score[i] = NEG;
        q->topk_idxs[i] = -1;
    }
    for (int64_t b = 0; b < B; b++) {
        int64_t v = decode_vis(a, b);
        if (v <= 0)
            continue;
        build_keys(q, a->c.cmp_kv_cache, b, v, a->c.CBLK, HD, &s);
        score_int(&s, b * H, H, v, HD);
        const int32_t *s32 = s.s32 + b * H * v;
        for (int64_t c = 0; c < v; c++) {
            float tot;
            HEAD_SUM(H, (relu((float)s32[h * v + c] * s.qdq[b * H + h]) * s.wt[b * H + h]), tot);
            sc[c] = tot * s.kdq[c];
            q->score[b * SL + c] = sc[c];
        }
        int64_t k = q->index_topk < v ? q->index_topk : v;
        top_k(sc, v, k, q->offset, q->topk_idxs + b * SL, rk);
    }
    return DSV4_OK;
}

/* ---- prefill ------------------------------------------------------------------------- */

static int64_t prefill_vis(const struct dsv4_prefill_indexer_args *a, int64_t t)
{
    int64_t v = (a->c.position_ids[t] + 1) / 4;
    return v < a->q.SL ? v : a->q.SL;
}

static int64_t prefill_most(const struct dsv4_prefill_indexer_args *a)
{
    int64_t most = 0;
    for (int64_t t = 0; t < a->c.num_tokens; t++)
        most = prefill_vis(a, t) > most ? prefill_vis(a, t) : most;
    return most;
}

int dsv4_prefill_indexer_prepare(void *p, struct dsv4_err *e, size_t *scratch)
{
    struct dsv4_prefill_indexer_args *a = p;
    struct dsv4_indexer_query *q = &a->q;
    size_t inner = 0;
    a->c.variant = 4;
    a->c.kv_out = NULL;
    if (dsv4_prefill_compressor_prepare(&a->c, e, &inner))
        return DSV4_EVALUE;
    if (check_query(q, a->c.T, a->c.HD, a->c.RW, e))
        return DSV4_EVALUE;
    q->SL = 2 * a->c.CBLK;                            /* the prefill score cap: two cache blocks */
    for (int64_t t = 0; t < a->c.T; t++)
        if (a->c.position_ids[t] < 0) {
            snprintf(e->msg, sizeof e->msg, "position_ids[%lld] = %d is negative", (long long)t,
                     a->c.position_ids[t]);
            return DSV4_EVALUE;
        }
    int64_t most = prefill_most(a);
    if (check_idx_table(q, -1, most, a->c.CBLK, a->c.NC, e))
        return DSV4_EVALUE;
    struct dsv4_arena ar = {0};
    struct query_scratch s;
    query_layout(q, a->c.D, a->c.HD, most, &ar, &s);
    dsv4_take(&ar, (size_t)(most + 1) * sizeof(struct ranked));
    dsv4_take(&ar, inner);
    *scratch = ar.used;
    return DSV4_OK;
}

int dsv4_prefill_indexer(void *p, struct dsv4_err *e)
{
    struct dsv4_prefill_indexer_args *a = p;
    struct dsv4_indexer_query *q = &a->q;
    const int64_t most = prefill_most(a);
    struct dsv4_arena ar = {a->scratch, 0};
    struct query_scratch s;
    query_layout(q, a->c.D, a->c.HD, most, &ar, &s);
    struct ranked *rk = dsv4_take(&ar, (size_t)(most + 1) * sizeof(struct ranked));
    a->c.scratch = dsv4_take(&ar, 0);

    const int64_t T = a->c.T, H = q->H, HD = a->c.HD, SL = q->SL, n = a->c.num_tokens;
    if (dsv4_prefill_compressor(&a->c, e))
        return DSV4_EVALUE;
    for (int64_t i = 0; i < T * SL; i++) {
        q->score[i] = NEG;
        q->topk_idxs[i] = -1;
    }
    if (most <= 0)
        return DSV4_OK;
    build_queries(q, a->c.x, a->c.D, HD, a->c.RW, a->c.hadamard, &s);
    build_keys(q, a->c.cmp_kv, -1, most, a->c.CBLK, HD, &s);
    score_int(&s, 0, dsv4_gemm_i8_rows(T * H), most, HD);
    const int64_t topk = q->index_topk < SL ? q->index_topk : SL;
    const int64_t offset = q->sliding_window + T;
    for (int64_t t = 0; t < T; t++) {
        int64_t v = prefill_vis(a, t);
        float *row = q->score + t * SL;
        for (int64_t c = 0; c < most; c++) {
            if (c >= v)
                continue;                               /* stays NEG */
            float tot;
            HEAD_SUM(H, (relu(((float)s.s32[(t * H + h) * most + c] * s.qdq[t * H + h]) * s.kdq[c])
                          * s.wt[t * H + h]), tot);
            row[c] = tot;
        }
        int64_t k = topk < v ? topk : v;
        if (t < n && k > 0)
            top_k(row, most, k, offset, q->topk_idxs + t * SL, rk);
    }
    return DSV4_OK;
}
