/* KV compressors (spec chapter 04): decode_compressor_ratio4, decode_compressor_ratio128.
 * Each token's kv and score projections go into a paged state; a token that completes a
 * window of R positions pools the window (softmax over the scores, per column), then
 * RMSNorm, RoPE on the last dims, and writes one compressed row into the cache. Ratio 4
 * overlaps: the entry of window w pools the front halves of window w-1 and the back halves
 * of window w. States and caches are updated in place, after every index was checked. */
#include <math.h>
#include <omp.h>
#include <stdio.h>

#include "kernels/kernels.h"

static float exp32(float z) { return (float)exp((double)z); }

/* k = bf16(y) . H, row vector on the left; products of bf16 values are exact */
static void hadamard_rotate(const float *y, const bf16_t *H, int64_t n, float *k)
{
    float v[512];
    for (int64_t i = 0; i < n; i++) {
        v[i] = dsv4_round_bf16(y[i]);
        k[i] = 0.0f;
    }
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < n; j++)
            k[j] = k[j] + v[i] * dsv4_bf16_to_f32(H[i * n + j]);
}

int dsv4_decode_compressor_prepare(void *p, struct dsv4_err *e, size_t *scratch)
{
    struct dsv4_decode_compressor_args *a = p;
    const int64_t R = a->variant, coff = R == 4 ? 2 : 1;
    if (a->S != 1) {
        snprintf(e->msg, sizeof e->msg,
                 "x has S = %lld tokens per request; the decode compressors are defined for S = 1",
                 (long long)a->S);
        return DSV4_EVALUE;
    }
    if (a->R != R || a->OD != coff * a->HD || a->SW != 2 * a->OD) {
        snprintf(e->msg, sizeof e->msg,
                 "ape is [%lld, %lld], compress_state rows are %lld wide; expected ape [%lld, %lld * "
                 "head dim %lld] and rows of twice that (kv and score)",
                 (long long)a->R, (long long)a->OD, (long long)a->SW, (long long)R,
                 (long long)coff, (long long)a->HD);
        return DSV4_EVALUE;
    }
    if (a->hadamard && a->HD > 512) {
        snprintf(e->msg, sizeof e->msg, "head dim %lld is larger than 512", (long long)a->HD);
        return DSV4_EVALUE;
    }
    if (2 * a->R2 >= a->HD || 2 * a->R2 != a->qk_rope_head_dim) {
        snprintf(e->msg, sizeof e->msg, "cos has %lld columns; expected qk_rope_head_dim / 2 = %lld",
                 (long long)a->R2, (long long)(a->qk_rope_head_dim / 2));
        return DSV4_EVALUE;
    }
    for (int64_t b = 0; b < a->B; b++) {
        int64_t p0 = a->position_ids[b], rs = a->state_slot_mapping[b], rc = a->cmp_slot_mapping[b];
        if (p0 < 0) {
            snprintf(e->msg, sizeof e->msg, "position_ids[%lld, 0] = %lld is negative", (long long)b,
                     (long long)p0);
            return DSV4_EVALUE;
        }
        if (rs >= a->NB * a->PAGE) {
            snprintf(e->msg, sizeof e->msg,
                     "state_slot_mapping[%lld, 0] = %lld is beyond the %lld rows of compress_state",
                     (long long)b, (long long)rs, (long long)(a->NB * a->PAGE));
            return DSV4_EVALUE;
        }
        if ((p0 + 1) % R)
            continue;                                  /* no window completes: no cache write */
        if (rc >= a->NC * a->CBLK) {
            snprintf(e->msg, sizeof e->msg,
                     "cmp_slot_mapping[%lld, 0] = %lld is beyond the %lld rows of the cache",
                     (long long)b, (long long)rc, (long long)(a->NC * a->CBLK));
            return DSV4_EVALUE;
        }
        /* the pages a completing window reads */
        int64_t first = R == 4 ? p0 - 7 : p0 - 127;
        for (int64_t q = first < 0 ? 0 : first; q <= p0; q++) {
            int64_t lp = q / a->PAGE;
            if (lp >= a->NP)
                continue;
            int64_t pg = a->compress_state_block_table[b * a->NP + lp];
            if (pg >= a->NB) {
                snprintf(e->msg, sizeof e->msg,
                         "compress_state_block_table[%lld, %lld] = %lld is beyond the %lld pages of "
                         "compress_state",
                         (long long)b, (long long)lp, (long long)pg, (long long)a->NB);
                return DSV4_EVALUE;
            }
        }
    }
    *scratch = (size_t)a->B * (2 * a->OD + a->D) * sizeof(float) + 2 * (size_t)a->HD * sizeof(float) +
               dsv4_xwt_work(a->B, a->OD, a->D, 2, dsv4_num_threads());
    return DSV4_OK;
}

/* state row of position q for request b, or NULL if it is missing (kv 0, score -inf) */
static const float *state_row(const struct dsv4_decode_compressor_args *a, int64_t b, int64_t q)
{
    if (q < 0 || q / a->PAGE >= a->NP)
        return NULL;
    int64_t pg = a->compress_state_block_table[b * a->NP + q / a->PAGE];
    return pg < 0 ? NULL : a->compress_state + (pg * a->PAGE + q % a->PAGE) * a->SW;
}

int dsv4_decode_compressor(void *p, struct dsv4_err *e)
{
    const struct dsv4_decode_compressor_args *a = p;
    const struct dsv4_ops *ops = dsv4_call_ops();
    const int64_t B = a->B, D = a->D, HD = a->HD, OD = a->OD, R = a->variant;
    float *xf = a->scratch, *kg = xf + B * D;        /* kg: [B][kv OD | score OD] */
    float *pooled = kg + B * 2 * OD, *sc = pooled + HD;

    for (int64_t b = 0; b < B; b++)
        dsv4_bf16_row_to_f32(ops, a->x + b * D, D, xf + b * D);
    void *work = kg + B * 2 * OD + 2 * HD;
    struct dsv4_xwt_group kv_gate[2] = {{xf, a->wkv, kg}, {xf, a->wgate, kg + OD}};
    dsv4_xwt_groups(ops, kv_gate, 2, D, B, D, OD, D, 2 * OD, work, dsv4_num_threads());
    if (!a->keep_kv)
        memset(a->kv, 0, (size_t)B * HD * sizeof(float));

    for (int64_t b = 0; b < B; b++) {              /* in order: a request's write precedes its read */
        const int64_t p0 = a->position_ids[b];
        float *row = kg + b * 2 * OD;
        const float *ape = a->ape + (p0 % R) * OD;
        for (int64_t c = 0; c < OD; c++)
            row[OD + c] = row[OD + c] + ape[c];
        if (a->state_slot_mapping[b] >= 0)
            memcpy(a->compress_state + a->state_slot_mapping[b] * a->SW, row, (size_t)2 * OD * sizeof(float));
        if ((p0 + 1) % R)
            continue;

        /* the rows of the window: (kv, score) pointers, NULL = missing */
        const float *kvp[128], *scp[128];
        int64_t n = 0;
        if (R == 4) {
            int64_t cur = p0 - 3, prev = cur - 4;
            for (int64_t j = 0; j < 4; j++, n++) {     /* front halves of the previous window */
                const float *r = state_row(a, b, prev + j);
                kvp[n] = r ? r : NULL;
                scp[n] = r ? r + OD : NULL;
            }
            for (int64_t j = 0; j < 4; j++, n++) {     /* back halves of this window */
                const float *r = state_row(a, b, cur + j);
                kvp[n] = r ? r + HD : NULL;
                scp[n] = r ? r + OD + HD : NULL;
            }
        } else {
            for (int64_t q = p0 - 127; q <= p0; q++, n++) {
                const float *r = state_row(a, b, q);
                kvp[n] = r;
                scp[n] = r ? r + OD : NULL;
            }
        }
        /* softmax pooling per column, batch form: sequential sums, true division; the
         * columns are independent, so they are shared between the threads */
        #pragma omp parallel for schedule(static) num_threads(dsv4_num_threads()) if (n > 8)
        for (int64_t c = 0; c < HD; c++) {
            float m = -INFINITY, z = 0.0f, o = 0.0f;
            for (int64_t r = 0; r < n; r++) {
                float s = scp[r] ? scp[r][c] : -INFINITY;
                m = dsv4_max_nan(m, s);
            }
            float e0[128];
            for (int64_t r = 0; r < n; r++) {
                e0[r] = exp32((scp[r] ? scp[r][c] : -INFINITY) - m);
                z = r ? z + e0[r] : e0[r];
            }
            for (int64_t r = 0; r < n; r++) {
                float k = kvp[r] ? kvp[r][c] : 0.0f;
                float prod = k * (e0[r] / z);
                o = r ? o + prod : prod;
            }
            pooled[c] = o;
        }
        /* RMSNorm with gamma, then RoPE on the last dims, all fp32 */
        float inv = dsv4_rms_inv(ops, pooled, HD, a->rms_norm_eps);
        for (int64_t c = 0; c < HD; c++)
            sc[c] = (pooled[c] * inv) * dsv4_bf16_to_f32(a->norm_w[c]);
        const int64_t nd = HD - 2 * a->R2;
        for (int64_t i = 0; i < a->R2; i++) {
            float x0 = sc[nd + 2 * i], x1 = sc[nd + 2 * i + 1];
            float cs = a->cos[b * a->R2 + i], sn = a->sin[b * a->R2 + i];
            sc[nd + 2 * i] = x0 * cs - x1 * sn;
            sc[nd + 2 * i + 1] = x0 * sn + x1 * cs;
        }
        int64_t slot = a->cmp_slot_mapping[b];
        if (slot < 0)
            continue;                                  /* an uncommitted boundary writes nothing */
        if (a->hadamard) {
            hadamard_rotate(sc, a->hadamard, HD, pooled);
            memcpy(sc, pooled, (size_t)HD * sizeof(float));
        }
        memcpy(a->kv + b * HD, sc, (size_t)HD * sizeof(float));
        for (int64_t c = 0; c < HD; c++)
            a->cmp_kv_cache[slot * HD + c] = dsv4_f32_to_bf16(sc[c]);
    }
    return DSV4_OK;
}

/* ---- prefill: one chunk of one request (variant = R) -------------------------------
 * Entries pool from the state as it was before the chunk, overlaid with the chunk's own
 * projections; the chunk's rows are appended to the state afterwards (§4.6, §4.7). */

static int64_t prefill_row(const struct dsv4_prefill_compressor_args *a, int64_t q)
{
    if (q < 0 || q / a->PAGE >= a->NP)
        return -1;
    int64_t pg = a->compress_state_block_table[q / a->PAGE];
    return pg < 0 ? -1 : pg * a->PAGE + q % a->PAGE;
}

int dsv4_prefill_compressor_prepare(void *p, struct dsv4_err *e, size_t *scratch)
{
    struct dsv4_prefill_compressor_args *a = p;
    const int64_t R = a->variant, coff = R == 4 ? 2 : 1, span = R == 4 ? 8 : R;
    if (dsv4_resolve_num_tokens(&a->num_tokens, a->T, e))
        return DSV4_EVALUE;
    if (R == 128 && a->T > 128) {
        snprintf(e->msg, sizeof e->msg,
                 "a ratio-128 chunk overlays its tokens by position mod 128; T = %lld is larger",
                 (long long)a->T);
        return DSV4_EVALUE;
    }
    if (a->R != R || a->OD != coff * a->HD) {
        snprintf(e->msg, sizeof e->msg,
                 "ape is [%lld, %lld]; expected [%lld, %lld * head dim %lld (from 'norm_w')]",
                 (long long)a->R, (long long)a->OD, (long long)R, (long long)coff, (long long)a->HD);
        return DSV4_EVALUE;
    }
    a->W = a->T / R > 1 ? a->T / R : 1;
    if (a->hadamard && a->HD > 512) {
        snprintf(e->msg, sizeof e->msg, "head dim %lld is larger than 512", (long long)a->HD);
        return DSV4_EVALUE;
    }
    if (a->RW != a->qk_rope_head_dim || a->RW >= a->HD || a->RW % 2) {
        snprintf(e->msg, sizeof e->msg, "freqs_cos has %lld columns; expected qk_rope_head_dim = %lld",
                 (long long)a->RW, (long long)a->qk_rope_head_dim);
        return DSV4_EVALUE;
    }
    for (int64_t t = 0; t < a->num_tokens; t++) {
        int64_t wp = a->position_ids[t], rs = a->state_slot_mapping[t], dst = a->cmp_slot_mapping[t];
        if (wp < 0) {
            snprintf(e->msg, sizeof e->msg, "position_ids[%lld] = %lld is negative", (long long)t,
                     (long long)wp);
            return DSV4_EVALUE;
        }
        if (rs >= a->NB * a->PAGE) {
            snprintf(e->msg, sizeof e->msg, "state_slot_mapping[%lld] = %lld is beyond the %lld state rows",
                     (long long)t, (long long)rs, (long long)(a->NB * a->PAGE));
            return DSV4_EVALUE;
        }
        if (dst >= a->NC * a->CBLK) {
            snprintf(e->msg, sizeof e->msg, "cmp_slot_mapping[%lld] = %lld is beyond the %lld rows of cmp_kv",
                     (long long)t, (long long)dst, (long long)(a->NC * a->CBLK));
            return DSV4_EVALUE;
        }
        if (dst < 0)
            continue;
        int64_t start = wp + 1 - R;                    /* window start: the RoPE row */
        if (start < 0 || start >= a->MAXS) {
            snprintf(e->msg, sizeof e->msg,
                     "cmp_slot_mapping[%lld] = %lld completes a window at position %lld, whose start "
                     "%lld has no row in freqs_cos (%lld rows)",
                     (long long)t, (long long)dst, (long long)wp, (long long)start, (long long)a->MAXS);
            return DSV4_EVALUE;
        }
        for (int64_t q = wp + 1 - span; q <= wp; q++) {
            if (q < 0 || q / a->PAGE >= a->NP)
                continue;
            int64_t pg = a->compress_state_block_table[q / a->PAGE];
            if (pg >= a->NB) {
                snprintf(e->msg, sizeof e->msg,
                         "compress_state_block_table[%lld] = %lld is beyond the %lld state pages",
                         (long long)(q / a->PAGE), (long long)pg, (long long)a->NB);
                return DSV4_EVALUE;
            }
        }
    }
    *scratch = (size_t)a->T * (a->D + 2 * a->OD + a->HD) * sizeof(float) +
               (size_t)dsv4_num_threads() * 2 * span * a->HD * sizeof(float) +
               dsv4_xwt_work(a->T, a->OD, a->D, 2, dsv4_num_threads()) + 64;
    return DSV4_OK;
}

int dsv4_prefill_compressor(void *p, struct dsv4_err *e)
{
    const struct dsv4_prefill_compressor_args *a = p;
    const struct dsv4_ops *ops = dsv4_call_ops();
    const int64_t T = a->T, D = a->D, OD = a->OD, HD = a->HD, R = a->variant;
    const int64_t n = a->num_tokens, span = R == 4 ? 8 : R, R2 = a->RW / 2, nd = HD - a->RW;
    float *xf = a->scratch, *K = xf + T * D, *G = K + T * OD, *Y = G + T * OD;
    float *slots = Y + T * HD;                        /* per thread: kv [span][HD], score [span][HD] */

    for (int64_t t = 0; t < T; t++)
        dsv4_bf16_row_to_f32(ops, a->x + t * D, D, xf + t * D);
    void *work = slots + (size_t)dsv4_num_threads() * 2 * span * HD;
    struct dsv4_xwt_group kv_gate[2] = {{xf, a->wkv, K}, {xf, a->wgate, G}};
    dsv4_xwt_groups(ops, kv_gate, 2, D, T, D, OD, D, OD, work, dsv4_num_threads());
    for (int64_t t = 0; t < n; t++) {                 /* scores carry the position embedding */
        const float *ape = a->ape + (a->position_ids[t] % R) * OD;
        for (int64_t c = 0; c < OD; c++)
            G[t * OD + c] = G[t * OD + c] + ape[c];
    }

    #pragma omp parallel num_threads(dsv4_num_threads())
    {
        float *kv = slots + (size_t)omp_get_thread_num() * 2 * span * HD, *sc = kv + span * HD;
        #pragma omp for schedule(static)
        for (int64_t t0 = 0; t0 < n; t0++) {
            if (a->cmp_slot_mapping[t0] < 0)
                continue;
            const int64_t wp = a->position_ids[t0], cur = wp + 1 - R, prev = cur - R;
            const int first_window = R == 4 && wp < 7;
            /* slots from the state as it was before this chunk */
            for (int64_t i = 0; i < span; i++) {
                int64_t q, half;                      /* ratio 4: front halves, then back halves */
                if (R == 4) {
                    q = i < 4 ? prev + i : cur + i - 4;
                    half = i < 4 ? 0 : HD;
                } else {
                    q = cur + i;
                    half = 0;
                }
                int64_t r = (R == 4 && i < 4 && first_window) ? -1 : prefill_row(a, q);
                for (int64_t c = 0; c < HD; c++) {
                    kv[i * HD + c] = r >= 0 ? a->kv_state[r * OD + half + c] : 0.0f;
                    /* a missing row: score -inf for ratio 4, 0 for ratio 128 (§4.3.3) */
                    sc[i * HD + c] = r >= 0 ? a->score_state[r * OD + half + c] : (R == 4 ? -INFINITY : 0.0f);
                }
            }
            /* the chunk's own rows overlay them, later tokens last */
            for (int64_t t = 0; t < n; t++) {
                int64_t pp = a->position_ids[t], i, half;
                if (R == 4) {
                    if (pp < prev || pp > wp)
                        continue;
                    i = pp < cur ? pp - prev : 4 + pp - cur;
                    half = pp < cur ? 0 : HD;
                } else {
                    if (pp > wp)
                        continue;
                    i = pp % 128;
                    half = 0;
                }
                memcpy(kv + i * HD, K + t * OD + half, (size_t)HD * sizeof(float));
                memcpy(sc + i * HD, G + t * OD + half, (size_t)HD * sizeof(float));
            }
            float *y = Y + t0 * HD;
            for (int64_t c = 0; c < HD; c++) {
                if (R == 4) {                         /* online form, from slot 7 (§4.2.4) */
                    float m = sc[7 * HD + c], l = exp32(m - m), o = kv[7 * HD + c];
                    for (int64_t j = first_window ? 4 : 0; j < 7; j++) {
                        float s = sc[j * HD + c], mn = dsv4_max_nan(m, s);
                        float al = exp32(m - mn), be = exp32(s - mn);
                        l = al * l + be;
                        o = o * al + kv[j * HD + c] * be;
                        m = mn;
                    }
                    y[c] = o / l;
                } else {                              /* batch form (§4.2.3) */
                    float m = -INFINITY, z = 0.0f, o = 0.0f, ex[128];
                    for (int64_t i = 0; i < span; i++)
                        m = dsv4_max_nan(m, sc[i * HD + c]);
                    for (int64_t i = 0; i < span; i++) {
                        ex[i] = exp32(sc[i * HD + c] - m);
                        z = i ? z + ex[i] : ex[i];
                    }
                    for (int64_t i = 0; i < span; i++) {
                        float prod = kv[i * HD + c] * (ex[i] / z);
                        o = i ? o + prod : prod;
                    }
                    y[c] = o;
                }
            }
            float inv = dsv4_rms_inv(ops, y, HD, a->rms_norm_eps);
            for (int64_t c = 0; c < HD; c++)
                y[c] = (y[c] * inv) * dsv4_bf16_to_f32(a->norm_w[c]);
            for (int64_t i = 0; i < R2; i++) {
                float cs = dsv4_bf16_to_f32(a->freqs_cos[cur * a->RW + i]);
                float sn = dsv4_bf16_to_f32(a->freqs_sin[cur * a->RW + i]);
                float x0 = y[nd + 2 * i], x1 = y[nd + 2 * i + 1];
                y[nd + 2 * i] = x0 * cs - x1 * sn;
                y[nd + 2 * i + 1] = x0 * sn + x1 * cs;
            }
        }
    }
    /* writes in token order, so that a repeated slot ends as the golden's */
    if (a->kv_out)
        memset(a->kv_out, 0, (size_t)a->W * HD * sizeof(bf16_t));
    for (int64_t t0 = 0, i = 0; t0 < n; t0++) {
        int64_t dst = a->cmp_slot_mapping[t0];
        if (dst < 0)
            continue;
        float *y = Y + t0 * HD, k[512];
        if (a->hadamard) {
            hadamard_rotate(y, a->hadamard, HD, k);
            y = k;
        }
        for (int64_t c = 0; c < HD; c++)
            a->cmp_kv[dst * HD + c] = dsv4_f32_to_bf16(y[c]);
        if (a->kv_out && i < a->W)
            memcpy(a->kv_out + i * HD, a->cmp_kv + dst * HD, (size_t)HD * sizeof(bf16_t));
        i++;
    }
    for (int64_t t = 0; t < n; t++) {
        int64_t r = a->state_slot_mapping[t];
        if (r >= 0) {
            memcpy(a->kv_state + r * OD, K + t * OD, (size_t)OD * sizeof(float));
            memcpy(a->score_state + r * OD, G + t * OD, (size_t)OD * sizeof(float));
        }
    }
    return DSV4_OK;
}
