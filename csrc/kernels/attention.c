/* Sparse attention with the grouped int8 output projection (spec chapter 03):
 * prefill_sparse_attn, decode_sparse_attn (CSA), decode_sparse_attn_hca,
 * decode_sparse_attn_swa. One implementation; the variants differ only in how
 * a token's index row becomes tiles of KV rows:
 *   prefill   the gathered rows, compacted, cut into tiles of 128 (§3.4)
 *   CSA/HCA   positional tiles of 128 index columns, invalid columns masked (§5.3)
 *   SWA       the ring page and the overlay block, validity as sets (§7.4)
 * Every product is of two bf16 values, so exact in fp32: sums may run in any
 * fixed order; the tile partition and the bf16 rounding of probabilities are
 * the golden's.
 */
#include <math.h>
#include <omp.h>
#include <stdio.h>

#include "core/avx2.h"
#include "core/avx512.h"
#include "core/gemm.h"
#include "kernels/kernels.h"

#define TILE 128
#define COLS 64

int dsv4_resolve_num_tokens(int64_t *num_tokens, int64_t T, struct dsv4_err *e)
{
    if (*num_tokens == INT64_MAX)
        *num_tokens = T;
    if (*num_tokens < 0 || *num_tokens > T) {
        snprintf(e->msg, sizeof e->msg, "num_tokens = %lld is outside [0, T = %lld]",
                 (long long)*num_tokens, (long long)T);
        return DSV4_EVALUE;
    }
    return DSV4_OK;
}

/* ---- index decoding --------------------------------------------------------- */

/* Row of the KV row that raw index `raw` of token t addresses, or NULL if the
 * contract says to skip it. Ranges were checked by prepare(). */
static const bf16_t *kv_row(const struct dsv4_sparse_attn_args *a, int64_t t, int64_t raw)
{
    const int64_t WIN = a->sliding_window, HD = a->HD, BLOCK = a->BLOCK;
    const int64_t b = t / a->S;
    if (raw < 0)
        return NULL;
    if (raw < WIN) {
        int64_t page = a->ori_block_table[b * a->OM + raw / BLOCK];
        return a->ori_kv + (page * BLOCK + raw % BLOCK) * HD;
    }
    /* the overlay holds the whole chunk in prefill, the request's S tokens in decode */
    int64_t width = a->variant == DSV4_ATTN_PREFILL ? a->T : a->S;
    if (raw < WIN + width) {
        int64_t u = raw - WIN;
        if (a->variant == DSV4_ATTN_PREFILL)
            return u < a->num_tokens ? a->kv_overlay + u * HD : NULL;
        return a->kv_overlay + (b * a->S + u) * HD;
    }
    int64_t c = raw - WIN - width;
    if (a->variant == DSV4_ATTN_PREFILL && c >= a->CM * BLOCK)
        return NULL;                               /* beyond the table: skipped in prefill */
    int64_t page = a->cmp_block_table[b * a->CM + c / BLOCK];
    return a->cmp_kv + (page * BLOCK + c % BLOCK) * HD;
}

static int64_t prefill_len(const struct dsv4_sparse_attn_args *a, int64_t t)
{
    int64_t L = a->cmp_sparse_lens[t];
    L = L < a->PAD ? L : a->PAD;
    L = L < a->K ? L : a->K;
    return L > 0 ? L : 0;
}

static int bad_index(struct dsv4_err *e, const char *table, int64_t b, int64_t p, int64_t v,
                     int64_t n, const char *pool, int two_d)
{
    if (two_d)
        snprintf(e->msg, sizeof e->msg, "%s[%lld, %lld] = %lld is outside [0, %lld) (pages of %s)",
                 table, (long long)b, (long long)p, (long long)v, (long long)n, pool);
    else
        snprintf(e->msg, sizeof e->msg, "%s[%lld] = %lld is outside [0, %lld) (pages of %s)", table,
                 (long long)p, (long long)v, (long long)n, pool);
    return DSV4_EVALUE;
}

/* Every block-table entry a raw index would dereference must address a page. */
static int check_raw(const struct dsv4_sparse_attn_args *a, int64_t t, int64_t k, struct dsv4_err *e)
{
    const int64_t WIN = a->sliding_window, BLOCK = a->BLOCK, b = t / a->S;
    const int64_t raw = a->cmp_sparse_indices[t * a->K + k];
    const int two_d = a->variant != DSV4_ATTN_PREFILL;
    if (raw < 0)
        return DSV4_OK;
    if (raw < WIN) {
        int64_t p = raw / BLOCK;
        if (p >= a->OM) {
            snprintf(e->msg, sizeof e->msg,
                     "cmp_sparse_indices[%lld, %lld] = %lld is ring slot %lld, on page %lld of "
                     "ori_block_table, which has %lld",
                     (long long)t, (long long)k, (long long)raw, (long long)raw, (long long)p,
                     (long long)a->OM);
            return DSV4_EVALUE;
        }
        int64_t v = a->ori_block_table[b * a->OM + p];
        return v < 0 || v >= a->OB ? bad_index(e, "ori_block_table", b, p, v, a->OB, "ori_kv", two_d)
                                   : DSV4_OK;
    }
    if (a->variant == DSV4_ATTN_SWA)
        return DSV4_OK;                         /* SWA reads ring and overlay rows only */
    int64_t width = a->variant == DSV4_ATTN_PREFILL ? a->T : a->S;
    if (raw < WIN + width)
        return DSV4_OK;
    int64_t c = raw - WIN - width, p = c / BLOCK;
    if (p >= a->CM) {
        if (a->variant == DSV4_ATTN_PREFILL)
            return DSV4_OK;                     /* prefill skips slots beyond the table */
        snprintf(e->msg, sizeof e->msg,
                 "cmp_sparse_indices[%lld, %lld] = %lld is compressed slot %lld, on page %lld of "
                 "cmp_block_table, which has %lld",
                 (long long)t, (long long)k, (long long)raw, (long long)c, (long long)p, (long long)a->CM);
        return DSV4_EVALUE;
    }
    int64_t v = a->cmp_block_table[b * a->CM + p];
    return v < 0 || v >= a->CB ? bad_index(e, "cmp_block_table", b, p, v, a->CB, "cmp_kv", two_d)
                               : DSV4_OK;
}

/* ---- scratch ----------------------------------------------------------------- */

struct attn_thread {
    const bf16_t **rows;      /* a token's KV rows, tile after tile */
    int64_t *tile_end;        /* end of each tile in rows */
    float *q, *kt, *s, *o, *oj, *m, *l;
};

struct attn_scratch {
    float *ob;                /* [T, H*HD] attention output after inverse RoPE (bf16 values) */
    float *o_r;               /* [T, G, OL] first projection */
    int8_t *q8;               /* [G][Tp, lda(OL)] */
    int32_t *q8sum;           /* [G][Tp] */
    float *sdq;               /* [T, G] */
    void *xwt;                /* work of the first projection */
    int32_t *pbuf;            /* per thread: [Tp, COLS] */
    float *acc;               /* per thread: [Tp, COLS] */
    struct attn_thread th[256];
};

static int64_t max_rows(const struct dsv4_sparse_attn_args *a)
{
    return a->variant == DSV4_ATTN_SWA ? a->sliding_window + TILE : a->K;
}

static void attn_layout(const struct dsv4_sparse_attn_args *a, struct dsv4_arena *ar,
                        struct attn_scratch *s)
{
    const int64_t T = a->T, H = a->H, HD = a->HD, Tp = dsv4_gemm_i8_rows(T);
    const int64_t nrow = max_rows(a), ntile = nrow / TILE + 2;
    s->ob = dsv4_take(ar, (size_t)T * H * HD * sizeof(float));
    s->o_r = dsv4_take(ar, (size_t)T * a->G * a->OL * sizeof(float));
    s->q8 = dsv4_take(ar, (size_t)a->G * Tp * dsv4_gemm_i8_lda(a->OL));
    s->q8sum = dsv4_take(ar, (size_t)a->G * Tp * sizeof(int32_t));
    s->sdq = dsv4_take(ar, (size_t)T * a->G * sizeof(float));
    s->xwt = dsv4_take(ar, dsv4_xwt_work(T, a->OL, a->OGI, a->G, a->nth));
    s->pbuf = dsv4_take(ar, (size_t)a->nth * Tp * COLS * sizeof(int32_t));
    s->acc = dsv4_take(ar, (size_t)a->nth * Tp * COLS * sizeof(float));
    for (int i = 0; i < a->nth; i++) {
        struct attn_thread *th = &s->th[i];
        th->rows = dsv4_take(ar, (size_t)nrow * sizeof(bf16_t *));
        th->tile_end = dsv4_take(ar, (size_t)ntile * sizeof(int64_t));
        th->q = dsv4_take(ar, (size_t)dsv4_round_up(H, 32) * HD * sizeof(float));
        th->kt = dsv4_take(ar, (size_t)TILE * HD * sizeof(float));
        th->s = dsv4_take(ar, (size_t)H * TILE * sizeof(float));
        th->o = dsv4_take(ar, (size_t)H * HD * sizeof(float));
        th->oj = dsv4_take(ar, (size_t)H * HD * sizeof(float));
        th->m = dsv4_take(ar, (size_t)2 * H * sizeof(float));
        th->l = dsv4_take(ar, (size_t)2 * H * sizeof(float));
    }
}

int dsv4_sparse_attn_prepare(void *p, struct dsv4_err *e, size_t *scratch)
{
    struct dsv4_sparse_attn_args *a = p;
    const int64_t R = a->qk_rope_head_dim;
    if (a->variant == DSV4_ATTN_PREFILL) {
        a->B = 1;
        a->S = a->T;
        if (dsv4_resolve_num_tokens(&a->num_tokens, a->T, e))
            return DSV4_EVALUE;
        /* the columns a token may use: the padded width of window + compressed rows (§1.2) */
        int64_t WIN = a->sliding_window, mc = WIN + WIN / 2;
        mc = mc < a->index_topk ? mc : a->index_topk;
        mc = mc > 1 ? mc : 1;
        int64_t top = (WIN < a->T ? WIN : a->T) + mc;
        top = top < a->K ? top : a->K;
        a->PAD = (top + TILE - 1) / TILE * TILE;
    } else {
        if (a->T % a->B) {
            snprintf(e->msg, sizeof e->msg,
                     "q has T = %lld tokens, not a multiple of the %lld requests of ori_block_table",
                     (long long)a->T, (long long)a->B);
            return DSV4_EVALUE;
        }
        a->S = a->T / a->B;
        a->num_tokens = a->T;
    }
    if (a->variant == DSV4_ATTN_SWA && a->T > TILE) {
        snprintf(e->msg, sizeof e->msg,
                 "decode_sparse_attn_swa attends the step's overlay as one %d-row block; T = %lld "
                 "is larger",
                 TILE, (long long)a->T);
        return DSV4_EVALUE;
    }
    if (a->sliding_window > 4096 || a->sliding_window < 1) {
        snprintf(e->msg, sizeof e->msg, "sliding_window = %lld is outside [1, 4096]",
                 (long long)a->sliding_window);
        return DSV4_EVALUE;
    }
    if (R <= 0 || R % 2 || R >= a->HD || R > 512 || a->RW != R) {
        snprintf(e->msg, sizeof e->msg,
                 "the rope tables have %lld columns and head_dim is %lld; expected "
                 "qk_rope_head_dim = %lld columns, even and below head_dim",
                 (long long)a->RW, (long long)a->HD, (long long)R);
        return DSV4_EVALUE;
    }
    if (a->H % a->G || a->OGI != a->H / a->G * a->HD || a->GOL != a->G * a->OL) {
        snprintf(e->msg, sizeof e->msg,
                 "wo_a is [%lld, %lld, %lld] and wo_b has %lld columns; expected [G, O_LORA, "
                 "H/G * head_dim] with H = %lld heads (from 'q') and G * O_LORA columns",
                 (long long)a->G, (long long)a->OL, (long long)a->OGI, (long long)a->GOL,
                 (long long)a->H);
        return DSV4_EVALUE;
    }
    if (a->OL > 65536 || a->H > 4096 || a->G > 256) {
        snprintf(e->msg, sizeof e->msg,
                 "o_lora_rank %lld, %lld heads or %lld groups is too large (limits 65536, 4096, 256)",
                 (long long)a->OL, (long long)a->H, (long long)a->G);
        return DSV4_EVALUE;
    }
    for (int64_t t = 0; t < a->num_tokens && !a->trusted; t++) {
        int64_t L = a->variant == DSV4_ATTN_PREFILL ? prefill_len(a, t) : a->K;
        for (int64_t k = 0; k < L; k++)
            if (check_raw(a, t, k, e))
                return DSV4_EVALUE;
    }
    a->nth = dsv4_num_threads() > 256 ? 256 : dsv4_num_threads();
    struct dsv4_arena ar = {0};
    struct attn_scratch s;
    attn_layout(a, &ar, &s);
    *scratch = ar.used;
    return DSV4_OK;
}

/* The token's tiles of KV rows; returns the number of tiles (0: nothing to attend). */
static int64_t token_tiles(const struct dsv4_sparse_attn_args *a, int64_t t, struct attn_thread *th)
{
    const int32_t *idx = a->cmp_sparse_indices + t * a->K;
    int64_t n = 0, nt = 0;
    if (a->variant == DSV4_ATTN_PREFILL) {
        if (t >= a->num_tokens)
            return 0;
        int64_t L = prefill_len(a, t);
        for (int64_t k = 0; k < L; k++) {
            const bf16_t *r = kv_row(a, t, idx[k]);
            if (r)
                th->rows[n++] = r;
        }
        for (int64_t i = TILE; i < n; i += TILE)
            th->tile_end[nt++] = i;
        if (n)
            th->tile_end[nt++] = n;
        return nt;
    }
    if (a->variant == DSV4_ATTN_DECODE) {
        for (int64_t k0 = 0; k0 < a->K; k0 += TILE) {     /* masked columns leave no row */
            int64_t n0 = n;
            for (int64_t k = k0; k < k0 + TILE && k < a->K; k++) {
                const bf16_t *r = kv_row(a, t, idx[k]);
                if (r)
                    th->rows[n++] = r;
            }
            if (n > n0)                                   /* an all-masked tile is a no-op */
                th->tile_end[nt++] = n;
        }
        return nt;
    }
    /* SWA: sets of ring slots and of the request's overlay rows, each in physical order */
    const int64_t WIN = a->sliding_window, b = t / a->S;
    unsigned char ring[4096] = {0}, ov[TILE] = {0};
    for (int64_t k = 0; k < a->K; k++) {
        int64_t raw = idx[k];
        if (raw >= 0 && raw < WIN)
            ring[raw] = 1;
        else if (raw >= WIN && raw < WIN + a->S)
            ov[b * a->S + raw - WIN] = 1;
    }
    for (int64_t r0 = 0; r0 < WIN; r0 += TILE) {      /* ring slots, a tile per 128 */
        int64_t n0 = n;
        for (int64_t r = r0; r < r0 + TILE && r < WIN; r++)
            if (ring[r])
                th->rows[n++] = kv_row(a, t, r);
        if (n > n0)
            th->tile_end[nt++] = n;
    }
    int64_t n0 = n;
    for (int64_t r = 0; r < a->T; r++)
        if (ov[r])
            th->rows[n++] = a->kv_overlay + r * a->HD;
    if (n > n0)
        th->tile_end[nt++] = n;
    return nt;
}

/* Tile statistics (§2.2) of scores s[i * H + h], rows i < n: scaled in place, per head the
 * running max m and the fp32 sum l of e^(s - m) in row order; s becomes the bf16 values of
 * those probabilities (PV uses them, l the fp32 ones). */
static void softmax_scalar(float *s, int64_t n, int64_t H, float scale, float *m, float *l)
{
    for (int64_t h = 0; h < H; h++) {
        float mx = -INFINITY, sum = 0.0f;
        for (int64_t i = 0; i < n; i++) {
            s[i * H + h] = s[i * H + h] * scale;
            mx = dsv4_max_nan(mx, s[i * H + h]);
        }
        for (int64_t i = 0; i < n; i++) {
            float ex = dsv4_exp_f32(s[i * H + h] - mx);
            sum = sum + ex;
            s[i * H + h] = dsv4_round_bf16(ex);
        }
        m[h] = mx;
        l[h] = sum;
    }
}

#if defined(__x86_64__)
DSV4_AVX512 static void softmax_avx512(float *s, int64_t n, int64_t H, float scale, float *m, float *l)
{
    const __m512 sc = _mm512_set1_ps(scale);
    for (int64_t h = 0; h < H; h += 16) {
        const __mmask16 k = H - h >= 16 ? 0xffff : (__mmask16)((1u << (H - h)) - 1);
        __m512 mx = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
        for (int64_t i = 0; i < n; i++) {
            __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, s + i * H + h), sc);
            _mm512_mask_storeu_ps(s + i * H + h, k, v);
            mx = _mm512_mask_mov_ps(mx, _mm512_cmp_ps_mask(v, mx, _CMP_GT_OQ), v);
        }
        for (int64_t i = 0; i < n; i++) {
            __m512 ex = dsv4_exp_f32x16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + i * H + h), mx));
            sum = _mm512_add_ps(sum, ex);
            _mm512_mask_storeu_ps(s + i * H + h, k, dsv4_round_bf16x16(ex));
        }
        _mm512_mask_storeu_ps(m + h, k, mx);
        _mm512_mask_storeu_ps(l + h, k, sum);
    }
}

/* softmax_avx512 on 8 heads at a time */
DSV4_AVX2 static void softmax_avx2(float *s, int64_t n, int64_t H, float scale, float *m, float *l)
{
    const __m256 sc = _mm256_set1_ps(scale);
    for (int64_t h = 0; h < H; h += 8) {
        const __m256i k = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(H - h < 8 ? H - h : 8)),
                                             _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        __m256 mx = _mm256_set1_ps(-INFINITY), sum = _mm256_setzero_ps();
        for (int64_t i = 0; i < n; i++) {
            __m256 v = _mm256_mul_ps(_mm256_maskload_ps(s + i * H + h, k), sc);
            _mm256_maskstore_ps(s + i * H + h, k, v);
            mx = _mm256_blendv_ps(mx, v, _mm256_cmp_ps(v, mx, _CMP_GT_OQ));
        }
        for (int64_t i = 0; i < n; i++) {
            __m256 ex = dsv4_exp_f32x8(_mm256_sub_ps(_mm256_maskload_ps(s + i * H + h, k), mx));
            sum = _mm256_add_ps(sum, ex);
            _mm256_maskstore_ps(s + i * H + h, k, dsv4_round_bf16x8(ex));
        }
        _mm256_maskstore_ps(m + h, k, mx);
        _mm256_maskstore_ps(l + h, k, sum);
    }
}
#endif

/* ---- scores (§2.2): s[i * H + h] = q_h . k_i, fused steps over k in order ----------
 * The token's q as the score kernels read it: panels of 32 heads [H / 32][HD][32] (heads past
 * H zero), so that a row's k-th value meets 32 heads at once, in the vector lanes. */

static void qk_prep_scalar(const bf16_t *q, int64_t H, int64_t HD, float *qt)
{
    for (int64_t h0 = 0; h0 < H; h0 += 32) {
        float *panel = qt + (h0 / 32) * HD * 32;
        for (int64_t j = 0; j < 32; j++)
            for (int64_t k = 0; k < HD; k++)
                panel[k * 32 + j] = h0 + j < H ? dsv4_bf16_to_f32(q[(h0 + j) * HD + k]) : 0.0f;
    }
}

/* one row against one panel: c[j] = sum over k in order of kt[k] * panel[k][j] (fused = 0:
 * the product rounded on its own, the same bits for exact products, see dsv4_unfused_try) */
static inline __attribute__((always_inline)) void qk_row(const float *kt, const float *panel,
                                                       int64_t HD, float *c, const int fused)
{
    float acc[32] = {0};
    for (int64_t k = 0; k < HD; k++) {
        const float a = kt[k], *b = panel + k * 32;
        for (int j = 0; j < 32; j++)
            acc[j] = fused ? fmaf(a, b[j], acc[j]) : acc[j] + a * b[j];
    }
    memcpy(c, acc, sizeof acc);
}

static inline __attribute__((always_inline)) void qk_rows(const float *qt, const float *kt,
                                                        int64_t n, int64_t H, int64_t HD,
                                                        float *s, const int fused)
{
    for (int64_t i = 0; i < n; i++)
        for (int64_t p = 0; p < (H + 31) / 32; p++) {
            float c[32];
            qk_row(kt + i * HD, qt + p * HD * 32, HD, c, fused);
            const int64_t w = H - 32 * p < 32 ? H - 32 * p : 32;
            memcpy(s + i * H + 32 * p, c, (size_t)w * sizeof(float));
        }
}

/* both operands hold bf16 values (qk_prep_scalar, the bf16 rows of the tile) */
static void qk_scalar(const float *qt, const float *kt, int64_t n, int64_t H, int64_t HD, float *s)
{
    if (dsv4_unfused_try(0)) {
        qk_rows(qt, kt, n, H, HD, s, 0);
        if (dsv4_unfused_exact())
            return;
    }
    qk_rows(qt, kt, n, H, HD, s, 1);
}

#if defined(__x86_64__)
DSV4_AVX512 static void qk_prep_avx512(const bf16_t *q, int64_t H, int64_t HD, float *qt)
{
    const int64_t k16 = HD / 16 * 16;
    for (int64_t h0 = 0; h0 < H; h0 += 16) {
        const int64_t rows = H - h0 < 16 ? H - h0 : 16;
        float *panel = qt + (h0 / 32) * HD * 32 + h0 % 32;
        for (int64_t k = 0; k < k16; k += 16) {
            __m512i r[16];
            for (int j = 0; j < 16; j++)
                r[j] = j < rows ? _mm512_castps_si512(dsv4_load_bf16x16(q + (h0 + j) * HD + k))
                                : _mm512_setzero_si512();
            dsv4_transpose16(r, panel + k * 32, 32 * sizeof(float));
        }
        for (int64_t k = k16; k < HD; k++)
            for (int64_t j = 0; j < 16; j++)
                panel[k * 32 + j] = j < rows ? dsv4_bf16_to_f32(q[(h0 + j) * HD + k]) : 0.0f;
    }
    if (H % 32 && H % 32 <= 16)             /* the last panel's upper half */
        for (int64_t k = 0; k < HD; k++)
            memset(qt + (H / 32) * HD * 32 + k * 32 + 16, 0, 16 * sizeof(float));
}

/* qk_prep_avx512's panels, built with 8 x 8 transposes */
DSV4_AVX2 static void qk_prep_avx2(const bf16_t *q, int64_t H, int64_t HD, float *qt)
{
    const int64_t k8 = HD / 8 * 8;
    for (int64_t h0 = 0; h0 < H; h0 += 8) {
        const int64_t rows = H - h0 < 8 ? H - h0 : 8;
        float *panel = qt + (h0 / 32) * HD * 32 + h0 % 32;
        for (int64_t k = 0; k < k8; k += 8) {
            __m256 r[8];
            for (int j = 0; j < 8; j++)
                r[j] = j < rows ? dsv4_load_bf16x8(q + (h0 + j) * HD + k) : _mm256_setzero_ps();
            dsv4_transpose8(r, panel + k * 32, 32 * sizeof(float));
        }
        for (int64_t k = k8; k < HD; k++)
            for (int64_t j = 0; j < 8; j++)
                panel[k * 32 + j] = j < rows ? dsv4_bf16_to_f32(q[(h0 + j) * HD + k]) : 0.0f;
    }
    if (H % 32 && H % 32 <= 24)             /* the last panel's unwritten columns */
        for (int64_t k = 0; k < HD; k++)
            memset(qt + (H / 32) * HD * 32 + k * 32 + dsv4_round_up(H % 32, 8), 0,
                   (size_t)(32 - dsv4_round_up(H % 32, 8)) * sizeof(float));
}

/* 4 rows by 16 heads per register block; rows past n (up to the next multiple of 8) are
 * read, not stored */
DSV4_AVX2 static void qk_avx2(const float *qt, const float *kt0, int64_t n, int64_t H, int64_t HD,
                              float *s)
{
    float tile[4][16] __attribute__((aligned(32)));
    for (int64_t i0 = 0; i0 < n; i0 += 4) {
        const int ir = n - i0 < 4 ? (int)(n - i0) : 4;
        const float *kt = kt0 + i0 * HD;
        for (int64_t h0 = 0; h0 < H; h0 += 16) {
            const int64_t w = H - h0 < 16 ? H - h0 : 16;
            const float *b = qt + (h0 / 32) * HD * 32 + h0 % 32;
            __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00,
                   c21 = c00, c30 = c00, c31 = c00;
            for (int64_t k = 0; k < HD; k++) {
                __m256 b0 = _mm256_loadu_ps(b + k * 32), b1 = _mm256_loadu_ps(b + k * 32 + 8);
                __m256 ar = _mm256_set1_ps(kt[k]);
                c00 = _mm256_fmadd_ps(ar, b0, c00);
                c01 = _mm256_fmadd_ps(ar, b1, c01);
                ar = _mm256_set1_ps(kt[HD + k]);
                c10 = _mm256_fmadd_ps(ar, b0, c10);
                c11 = _mm256_fmadd_ps(ar, b1, c11);
                ar = _mm256_set1_ps(kt[2 * HD + k]);
                c20 = _mm256_fmadd_ps(ar, b0, c20);
                c21 = _mm256_fmadd_ps(ar, b1, c21);
                ar = _mm256_set1_ps(kt[3 * HD + k]);
                c30 = _mm256_fmadd_ps(ar, b0, c30);
                c31 = _mm256_fmadd_ps(ar, b1, c31);
            }
            _mm256_store_ps(tile[0], c00);
            _mm256_store_ps(tile[0] + 8, c01);
            _mm256_store_ps(tile[1], c10);
            _mm256_store_ps(tile[1] + 8, c11);
            _mm256_store_ps(tile[2], c20);
            _mm256_store_ps(tile[2] + 8, c21);
            _mm256_store_ps(tile[3], c30);
            _mm256_store_ps(tile[3] + 8, c31);
            for (int r = 0; r < ir; r++)
                memcpy(s + (i0 + r) * H + h0, tile[r], (size_t)w * sizeof(float));
        }
    }
}

#define QK_ROW(r)                                                                          \
    do {                                                                                   \
        __m512 ar = _mm512_set1_ps(kt[(r) * HD + k]);                                      \
        c##r##0 = _mm512_fmadd_ps(ar, b0, c##r##0);                                        \
        c##r##1 = _mm512_fmadd_ps(ar, b1, c##r##1);                                        \
    } while (0)
#define QK_STORE(r)                                                                        \
    do {                                                                                   \
        if (r < ir) {                                                                      \
            _mm512_mask_storeu_ps(s + (i0 + r) * H + h0, m0, c##r##0);                     \
            _mm512_mask_storeu_ps(s + (i0 + r) * H + h0 + 16, m1, c##r##1);                \
        }                                                                                  \
    } while (0)

/* 8 rows by 32 heads per block; rows past n (up to the next multiple of 8) are read, not
 * stored */
DSV4_AVX512 static void qk_avx512(const float *qt, const float *kt0, int64_t n, int64_t H,
                                  int64_t HD, float *s)
{
    for (int64_t i0 = 0; i0 < n; i0 += 8) {
        const int ir = n - i0 < 8 ? (int)(n - i0) : 8;
        const float *kt = kt0 + i0 * HD;
        for (int64_t h0 = 0; h0 < H; h0 += 32) {
            const int64_t w = H - h0 < 32 ? H - h0 : 32;
            const __mmask16 m0 = w >= 16 ? 0xffff : (__mmask16)((1u << w) - 1);
            const __mmask16 m1 = w >= 32 ? 0xffff : w <= 16 ? 0 : (__mmask16)((1u << (w - 16)) - 1);
            const float *b = qt + (h0 / 32) * HD * 32;
            __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00,
                   c21 = c00, c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00,
                   c60 = c00, c61 = c00, c70 = c00, c71 = c00;
            for (int64_t k = 0; k < HD; k++) {
                __m512 b0 = _mm512_loadu_ps(b + k * 32), b1 = _mm512_loadu_ps(b + k * 32 + 16);
                QK_ROW(0);
                QK_ROW(1);
                QK_ROW(2);
                QK_ROW(3);
                QK_ROW(4);
                QK_ROW(5);
                QK_ROW(6);
                QK_ROW(7);
            }
            QK_STORE(0);
            QK_STORE(1);
            QK_STORE(2);
            QK_STORE(3);
            QK_STORE(4);
            QK_STORE(5);
            QK_STORE(6);
            QK_STORE(7);
        }
    }
}
#endif

/* acc = acc * alpha + o * beta (two products, then the sum), over n values */
static void merge_scalar(float *acc, const float *o, int64_t n, float alpha, float beta)
{
    for (int64_t d = 0; d < n; d++)
        acc[d] = acc[d] * alpha + o[d] * beta;
}

/* o /= denom over n values; out[0:nb] = the bf16 values of o[0:nb] */
static void normalise_scalar(float *o, int64_t n, float denom, float *out, int64_t nb)
{
    for (int64_t d = 0; d < n; d++)
        o[d] = o[d] / denom;
    for (int64_t d = 0; d < nb; d++)
        out[d] = dsv4_round_bf16(o[d]);
}

#if defined(__x86_64__)
DSV4_AVX512 static void merge_avx512(float *acc, const float *o, int64_t n, float alpha, float beta)
{
    const __m512 a = _mm512_set1_ps(alpha), b = _mm512_set1_ps(beta);
    int64_t d = 0;
    for (; d + 16 <= n; d += 16)
        _mm512_storeu_ps(acc + d, _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(acc + d), a),
                                                _mm512_mul_ps(_mm512_loadu_ps(o + d), b)));
    merge_scalar(acc + d, o + d, n - d, alpha, beta);
}

DSV4_AVX512 static void normalise_avx512(float *o, int64_t n, float denom, float *out, int64_t nb)
{
    const __m512 dv = _mm512_set1_ps(denom);
    int64_t d = 0;
    for (; d + 16 <= n; d += 16)
        _mm512_storeu_ps(o + d, _mm512_div_ps(_mm512_loadu_ps(o + d), dv));
    for (; d < n; d++)
        o[d] = o[d] / denom;
    for (d = 0; d + 16 <= nb; d += 16)
        _mm512_storeu_ps(out + d, dsv4_round_bf16x16(_mm512_loadu_ps(o + d)));
    for (; d < nb; d++)
        out[d] = dsv4_round_bf16(o[d]);
}

DSV4_AVX2 static void merge_avx2(float *acc, const float *o, int64_t n, float alpha, float beta)
{
    const __m256 a = _mm256_set1_ps(alpha), b = _mm256_set1_ps(beta);
    int64_t d = 0;
    for (; d + 8 <= n; d += 8)
        _mm256_storeu_ps(acc + d, _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(acc + d), a),
                                                _mm256_mul_ps(_mm256_loadu_ps(o + d), b)));
    merge_scalar(acc + d, o + d, n - d, alpha, beta);
}

DSV4_AVX2 static void normalise_avx2(float *o, int64_t n, float denom, float *out, int64_t nb)
{
    const __m256 dv = _mm256_set1_ps(denom);
    int64_t d = 0;
    for (; d + 8 <= n; d += 8)
        _mm256_storeu_ps(o + d, _mm256_div_ps(_mm256_loadu_ps(o + d), dv));
    for (; d < n; d++)
        o[d] = o[d] / denom;
    for (d = 0; d + 8 <= nb; d += 8)
        _mm256_storeu_ps(out + d, dsv4_round_bf16x8(_mm256_loadu_ps(o + d)));
    for (; d < nb; d++)
        out[d] = dsv4_round_bf16(o[d]);
}
#endif

/* acc += (float)p * scale, the product rounded, then the sum */
static void dequant_add_scalar(float *acc, const int32_t *p, int64_t n, float scale)
{
    for (int64_t c = 0; c < n; c++)
        acc[c] = acc[c] + (float)p[c] * scale;
}

/* y = bf16(acc * w) */
static void scale_store_scalar(const float *acc, const float *w, int64_t n, bf16_t *y)
{
    for (int64_t c = 0; c < n; c++)
        y[c] = dsv4_f32_to_bf16(acc[c] * w[c]);
}

#if defined(__x86_64__)
DSV4_AVX512 static void dequant_add_avx512(float *acc, const int32_t *p, int64_t n, float scale)
{
    const __m512 sv = _mm512_set1_ps(scale);
    int64_t c = 0;
    for (; c + 16 <= n; c += 16) {
        __m512 pf = _mm512_cvtepi32_ps(_mm512_loadu_si512(p + c));
        _mm512_storeu_ps(acc + c, _mm512_add_ps(_mm512_loadu_ps(acc + c), _mm512_mul_ps(pf, sv)));
    }
    dequant_add_scalar(acc + c, p + c, n - c, scale);
}

DSV4_AVX512 static void scale_store_avx512(const float *acc, const float *w, int64_t n, bf16_t *y)
{
    int64_t c = 0;
    for (; c + 16 <= n; c += 16)
        dsv4_store_bf16x16(y + c, _mm512_mul_ps(_mm512_loadu_ps(acc + c), _mm512_loadu_ps(w + c)));
    scale_store_scalar(acc + c, w + c, n - c, y + c);
}

DSV4_AVX2 static void dequant_add_avx2(float *acc, const int32_t *p, int64_t n, float scale)
{
    const __m256 sv = _mm256_set1_ps(scale);
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) {
        __m256 pf = _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(p + c)));
        _mm256_storeu_ps(acc + c, _mm256_add_ps(_mm256_loadu_ps(acc + c), _mm256_mul_ps(pf, sv)));
    }
    dequant_add_scalar(acc + c, p + c, n - c, scale);
}

DSV4_AVX2 static void scale_store_avx2(const float *acc, const float *w, int64_t n, bf16_t *y)
{
    int64_t c = 0;
    for (; c + 8 <= n; c += 8)
        dsv4_store_bf16x8(y + c, _mm256_mul_ps(_mm256_loadu_ps(acc + c), _mm256_loadu_ps(w + c)));
    scale_store_scalar(acc + c, w + c, n - c, y + c);
}
#endif

/* O[t] of §2.2-2.4 for one token, then the inverse RoPE of §2.5, into ob (bf16 values). */
static void attend_token(const struct dsv4_ops *ops, const struct dsv4_sparse_attn_args *a,
                         int64_t t, struct attn_thread *th, float *ob)
{
    const int64_t H = a->H, HD = a->HD, R = a->qk_rope_head_dim, N = HD - R;
    const float scale = (float)pow((double)HD, -0.5);
    void (*merge)(float *, const float *, int64_t, float, float) = merge_scalar;
    void (*tile_softmax)(float *, int64_t, int64_t, float, float *, float *) = softmax_scalar;
    void (*qk_prep)(const bf16_t *, int64_t, int64_t, float *) = qk_prep_scalar;
    void (*qk)(const float *, const float *, int64_t, int64_t, int64_t, float *) = qk_scalar;
    void (*normalise)(float *, int64_t, float, float *, int64_t) = normalise_scalar;
#if defined(__x86_64__)
    if (ops->isa >= DSV4_ISA_AVX512) {
        merge = merge_avx512;
        normalise = normalise_avx512;
        tile_softmax = softmax_avx512;
        qk_prep = qk_prep_avx512;
        qk = qk_avx512;
    } else if (ops->isa >= DSV4_ISA_AVX2) {
        merge = merge_avx2;
        normalise = normalise_avx2;
        tile_softmax = softmax_avx2;
        qk_prep = qk_prep_avx2;
        qk = qk_avx2;
    }
#endif
    int64_t ntile = token_tiles(a, t, th);
    if (!ntile) {
        memset(ob, 0, (size_t)H * HD * sizeof(float));
        return;
    }
    qk_prep(a->q + t * H * HD, H, HD, th->q);
    float *m = th->m, *l = th->l, *mj = th->m + H, *lj = th->l + H;
    for (int64_t j = 0, start = 0; j < ntile; start = th->tile_end[j++]) {
        int64_t n = th->tile_end[j] - start;
        for (int64_t i = 0; i < n; i++)
            dsv4_bf16_row_to_f32(ops, th->rows[start + i], HD, th->kt + i * HD);
        memset(th->kt + n * HD, 0, (size_t)(dsv4_round_up(n, 8) - n) * HD * sizeof(float));
        /* scores as [row][head]: the softmax then runs with the heads in the lanes */
        qk(th->q, th->kt, n, H, HD, th->s);
        float *o = j ? th->oj : th->o;
        tile_softmax(th->s, n, H, scale, mj, lj);
        dsv4_pv(ops, th->s, 1, H, H, th->kt, n, HD, o);
        for (int64_t h = 0; h < H; h++) {
            float mx = mj[h], sum = lj[h];
            const float *oh = o + h * HD;
            if (!j) {
                m[h] = mx;
                l[h] = sum;
                continue;
            }
            /* online merge in tile order (§2.3) */
            float mn = dsv4_max_nan(mx, m[h]);
            float alpha = dsv4_exp_f32(m[h] - mn), beta = dsv4_exp_f32(mx - mn);
            l[h] = alpha * l[h] + beta * sum;
            merge(th->o + h * HD, oh, HD, alpha, beta);
            m[h] = mn;
        }
    }
    float cosr[256], sinr[256];
    dsv4_bf16_row_to_f32(ops, a->freqs_cos + t * a->RW, R / 2, cosr);
    dsv4_bf16_row_to_f32(ops, a->freqs_sin + t * a->RW, R / 2, sinr);
    for (int64_t h = 0; h < H; h++) {
        float denom = l[h] + dsv4_exp_f32(a->attn_sink[h] - m[h]);    /* the sink: a logit without a value */
        float *oh = th->o + h * HD, *out = ob + h * HD;
        normalise(oh, HD, denom, out, N);
        bf16_t rot[512];
        dsv4_rope_bf16(ops, oh + N, cosr, sinr, R, 1, rot);
        dsv4_bf16_row_to_f32(ops, rot, R, out + N);
    }
}

int dsv4_sparse_attn(void *p, struct dsv4_err *e)
{
    const struct dsv4_sparse_attn_args *a = p;
    struct dsv4_arena ar = {a->scratch, 0};
    struct attn_scratch s;
    attn_layout(a, &ar, &s);
    const int64_t T = a->T, H = a->H, HD = a->HD, G = a->G, OL = a->OL, OGI = a->OGI, D = a->D;
    const int64_t Tp = dsv4_gemm_i8_rows(T), lda = dsv4_gemm_i8_lda(OL);
    const struct dsv4_ops *ops = dsv4_call_ops();

    #pragma omp parallel num_threads(a->nth)
    {
        const int ith = omp_get_thread_num(), nth = omp_get_num_threads();
        struct attn_thread *th = &s.th[ith];
        for (int64_t t = ith; t < T; t += nth)
            attend_token(ops, a, t, th, s.ob + t * H * HD);
    }

    /* first projection, per group: o_r[t, g, :] = Ob[t, group g] . wo_a[g]^T */
    struct dsv4_xwt_group grp[256];
    for (int64_t g = 0; g < G; g++)
        grp[g] = (struct dsv4_xwt_group){s.ob + g * OGI, a->wo_a + g * OL * OGI, s.o_r + g * OL};
    dsv4_xwt_groups(ops, grp, G, H * HD, T, OGI, OL, OGI, G * OL, s.xwt, a->nth);

    #pragma omp parallel num_threads(a->nth)
    {
        const int ith = omp_get_thread_num(), nth = omp_get_num_threads();
        /* per (token, group) int8 quantisation, reciprocal-multiply scale (§2.6) */
        for (int64_t u = ith; u < G * Tp; u += nth) {
            int64_t g = u / Tp, t = u % Tp;
            int8_t *q = s.q8 + (g * Tp + t) * lda;
            memset(q, 0, (size_t)lda);
            if (t < T)
                s.sdq[t * G + g] = dsv4_quant_row_i8(ops, s.o_r + (t * G + g) * OL, OL, q);
            int32_t sum = 0;
            for (int64_t r = 0; r < OL; r++)
                sum += q[r];
            s.q8sum[g * Tp + t] = sum;
        }
        #pragma omp barrier

        /* second projection: exact int32 per group, dequantised and summed in group order */
        void (*dequant_add)(float *, const int32_t *, int64_t, float) = dequant_add_scalar;
        void (*scale_store)(const float *, const float *, int64_t, bf16_t *) = scale_store_scalar;
#if defined(__x86_64__)
        if (ops->isa >= DSV4_ISA_AVX512) {
            dequant_add = dequant_add_avx512;
            scale_store = scale_store_avx512;
        } else if (ops->isa >= DSV4_ISA_AVX2) {
            dequant_add = dequant_add_avx2;
            scale_store = scale_store_avx2;
        }
#endif
        int32_t *pb = s.pbuf + (size_t)ith * Tp * COLS;
        float *acc = s.acc + (size_t)ith * Tp * COLS;
        const int64_t un = (D + COLS - 1) / COLS;
        for (int64_t u = ith; u < un; u += nth) {
            int64_t n0 = u * COLS, nc = D - n0 < COLS ? D - n0 : COLS;
            for (int64_t i = 0; i < T * COLS; i++)
                acc[i] = 0.0f;
            for (int64_t g = 0; g < G; g++) {
                dsv4_gemm_i8_nt(ops, s.q8 + g * Tp * lda, s.q8sum + g * Tp, Tp, OL,
                                a->wo_b + g * OL, a->GOL, n0, nc, pb, COLS);
                for (int64_t t = 0; t < T; t++)
                    dequant_add(acc + t * COLS, pb + t * COLS, nc, s.sdq[t * G + g]);
            }
            for (int64_t t = 0; t < T; t++)
                scale_store(acc + t * COLS, a->wo_b_scale + n0, nc, a->attn_out + t * D + n0);
        }
    }
    return DSV4_OK;
}
