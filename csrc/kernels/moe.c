/* Mixture of experts: gate, expert_shared, expert_routed, moe (spec chapter 05).
 *
 * The experts run in the device form the spec allows (§4.6): int8 x int8 ->
 * int32 GEMMs straight from the int8 weights (never widened), dequantised as
 * fl(fl(f32(acc) * row scale) * column scale). The golden dequantises first
 * and multiplies in fp32; the two agree up to a few ulps before the bf16 and
 * int8 rounding points, which the comparators allow for.
 */
#include <math.h>
#include <omp.h>
#include <stdio.h>

#include "core/gemm.h"
#include "kernels/kernels.h"

#define TB 4              /* tokens per pass over gate_w */
#define COLS 64           /* GEMM columns per work unit */

static float exp32(float z) { return (float)exp((double)z); }

/* ---- expert FFN on a block of int8 rows ---------------------------------------- */

struct ffn_weights {
    const int8_t *w1, *w3, *w2;       /* [I, D], [I, D], [D, I] */
    const float *s1, *s3, *s2;        /* [I], [I], [D] */
};

struct ffn_scratch {
    int8_t *xa, *ha;                  /* rows padded for the int8 GEMM */
    int32_t *xsum, *hsum;
    int32_t *g, *u, *y;               /* [Mp, I], [Mp, I], [Mp, D] */
    int8_t *hq;                       /* [Mp, I] */
    float *rs;                        /* [Mp] dequant scale of h (times the routing weight) */
    float *rows;                      /* per thread: one fp32 row of I */
};

static void ffn_layout(int64_t rows, int64_t D, int64_t I, int nth, struct dsv4_arena *ar,
                       struct ffn_scratch *s)
{
    int64_t Mp = dsv4_gemm_i8_rows(rows);
    s->xa = dsv4_take(ar, (size_t)Mp * dsv4_gemm_i8_lda(D));
    s->ha = dsv4_take(ar, (size_t)Mp * dsv4_gemm_i8_lda(I));
    s->xsum = dsv4_take(ar, (size_t)Mp * sizeof(int32_t));
    s->hsum = dsv4_take(ar, (size_t)Mp * sizeof(int32_t));
    s->g = dsv4_take(ar, (size_t)Mp * I * sizeof(int32_t));
    s->u = dsv4_take(ar, (size_t)Mp * I * sizeof(int32_t));
    s->y = dsv4_take(ar, (size_t)Mp * D * sizeof(int32_t));
    s->hq = dsv4_take(ar, (size_t)Mp * I);
    s->rs = dsv4_take(ar, (size_t)Mp * sizeof(float));
    s->rows = dsv4_take(ar, (size_t)nth * I * sizeof(float));
}

/* The golden's form sum_k (x_k * sx) * (w_k * sw), for a row or column whose scale is not
 * finite: then every term is NaN or +-Inf, so no order of summation can change the result,
 * where the device form (acc * sx) * sw would give Inf for the golden's NaN. */
static float dot_nonfinite(const int8_t *x, float sx, const int8_t *w, float sw, int64_t K)
{
    float acc = 0.0f;
    for (int64_t k = 0; k < K; k++)
        acc = acc + ((float)x[k] * sx) * ((float)w[k] * sw);
    return acc;
}

/* y[j] = bf16(FFN(x[j])) for the c rows of x (row stride D), §2.5 in device form.
 * rw: per-row routing weight folded into h's dequant scale, or NULL (shared expert). */
static void ffn_rows(const int8_t *x, const float *sx, const float *rw, int64_t c, int64_t D,
                     int64_t I, const struct ffn_weights *w, float limit, bf16_t *y,
                     const struct ffn_scratch *s)
{
    const int64_t Mp = dsv4_gemm_i8_rows(c);
    const int nth = dsv4_num_threads();
    const struct dsv4_ops *ops = dsv4_call_ops();
    dsv4_gemm_i8_prep_a(x, c, D, s->xa, s->xsum);
    const int64_t ui = (I + COLS - 1) / COLS, ud = (D + COLS - 1) / COLS;

    #pragma omp parallel num_threads(nth)
    {
        const int ith = omp_get_thread_num(), nt = omp_get_num_threads();
        for (int64_t u = ith; u < 2 * ui; u += nt) {
            int64_t n0 = (u % ui) * COLS, nc = I - n0 < COLS ? I - n0 : COLS;
            if (u < ui)
                dsv4_gemm_i8_nt(ops, s->xa, s->xsum, Mp, D, w->w1, D, n0, nc, s->g + n0, I);
            else
                dsv4_gemm_i8_nt(ops, s->xa, s->xsum, Mp, D, w->w3, D, n0, nc, s->u + n0, I);
        }
        #pragma omp barrier
        float *h = s->rows + (size_t)ith * I;
        for (int64_t j = ith; j < c; j += nt) {
            for (int64_t n = 0; n < I; n++) {
                float g = ((float)s->g[j * I + n] * sx[j]) * w->s1[n];
                float v = ((float)s->u[j * I + n] * sx[j]) * w->s3[n];
                if (!isfinite(sx[j]) || !isfinite(w->s1[n]))
                    g = dot_nonfinite(x + j * D, sx[j], w->w1 + n * D, w->s1[n], D);
                if (!isfinite(sx[j]) || !isfinite(w->s3[n]))
                    v = dot_nonfinite(x + j * D, sx[j], w->w3 + n * D, w->s3[n], D);
                if (limit > 0.0f) {           /* the gate is clamped from above only */
                    g = g > limit ? limit : g;
                    v = v > limit ? limit : (v < -limit ? -limit : v);
                }
                h[n] = (g / (1.0f + exp32(-g))) * v;
            }
            float hs = dsv4_quant_row_i8(ops, h, I, s->hq + j * I);
            s->rs[j] = rw ? hs * rw[j] : hs;
        }
        #pragma omp barrier
        #pragma omp single
        dsv4_gemm_i8_prep_a(s->hq, c, I, s->ha, s->hsum);
        for (int64_t u = ith; u < ud; u += nt) {
            int64_t n0 = u * COLS, nc = D - n0 < COLS ? D - n0 : COLS;
            dsv4_gemm_i8_nt(ops, s->ha, s->hsum, Mp, I, w->w2, I, n0, nc, s->y + n0, D);
        }
        #pragma omp barrier
        for (int64_t j = ith; j < c; j += nt)
            for (int64_t d = 0; d < D; d++) {
                float o = ((float)s->y[j * D + d] * s->rs[j]) * w->s2[d];
                if (!isfinite(s->rs[j]) || !isfinite(w->s2[d]))
                    o = dot_nonfinite(s->hq + j * I, s->rs[j], w->w2 + d * I, w->s2[d], I);
                y[j * D + d] = dsv4_f32_to_bf16(o);
            }
    }
}

static int check_widths(int64_t D, int64_t I, struct dsv4_err *e)
{
    /* the unsigned-by-signed int8 GEMM accumulates K * 255 * 128 in int32 */
    if (D > 65536 || I > 65536) {
        snprintf(e->msg, sizeof e->msg, "hidden size %lld or expert width %lld exceeds 65536",
                 (long long)D, (long long)I);
        return DSV4_EVALUE;
    }
    return DSV4_OK;
}

/* ---- expert_shared ------------------------------------------------------------ */

int dsv4_expert_shared_prepare(void *p, struct dsv4_err *e, size_t *scratch)
{
    struct dsv4_expert_shared_args *a = p;
    if (check_widths(a->D, a->IE, e))
        return DSV4_EVALUE;
    struct dsv4_arena ar = {0};
    struct ffn_scratch s;
    ffn_layout(a->T, a->D, a->IE, dsv4_num_threads(), &ar, &s);
    *scratch = ar.used;
    return DSV4_OK;
}

int dsv4_expert_shared(void *p, struct dsv4_err *e)
{
    const struct dsv4_expert_shared_args *a = p;
    struct dsv4_arena ar = {a->scratch, 0};
    struct ffn_scratch s;
    ffn_layout(a->T, a->D, a->IE, dsv4_num_threads(), &ar, &s);
    struct ffn_weights w = {a->shared_w1, a->shared_w3, a->shared_w2,
                            a->shared_w1_scale, a->shared_w3_scale, a->shared_w2_scale};
    ffn_rows(a->x_local_i8, a->x_local_scale_dq, NULL, a->T, a->D, a->IE, &w, a->swiglu_limit,
             a->sh, &s);
    return DSV4_OK;
}

/* ---- expert_routed ------------------------------------------------------------ */

int dsv4_expert_routed_prepare(void *p, struct dsv4_err *e, size_t *scratch)
{
    struct dsv4_expert_routed_args *a = p;
    if (check_widths(a->D, a->IE, e))
        return DSV4_EVALUE;
    for (int64_t x = 0; x < a->E; x++) {
        int32_t c = a->recv_expert_count[x];
        if (c < 0 || c > a->M) {
            snprintf(e->msg, sizeof e->msg,
                     "recv_expert_count[%lld, 0] = %d is outside [0, %lld] (the receive depth of recv_x)",
                     (long long)x, c, (long long)a->M);
            return DSV4_EVALUE;
        }
    }
    struct dsv4_arena ar = {0};
    struct ffn_scratch s;
    ffn_layout(a->M, a->D, a->IE, dsv4_num_threads(), &ar, &s);
    *scratch = ar.used;
    return DSV4_OK;
}

int dsv4_expert_routed(void *p, struct dsv4_err *e)
{
    const struct dsv4_expert_routed_args *a = p;
    struct dsv4_arena ar = {a->scratch, 0};
    struct ffn_scratch s;
    ffn_layout(a->M, a->D, a->IE, dsv4_num_threads(), &ar, &s);
    const int64_t M = a->M, D = a->D, I = a->IE;
    for (int64_t x = 0; x < a->E; x++) {
        int64_t c = a->recv_expert_count[x];
        bf16_t *y = a->recv_y + x * M * D;
        memset(y + c * D, 0, (size_t)(M - c) * D * sizeof(bf16_t));
        if (c == 0)
            continue;
        struct ffn_weights w = {a->routed_w1 + x * I * D, a->routed_w3 + x * I * D,
                                a->routed_w2 + x * D * I, a->routed_w1_scale + x * I,
                                a->routed_w3_scale + x * I, a->routed_w2_scale + x * D};
        ffn_rows(a->recv_x + x * M * D, a->recv_scale_dq + x * M, a->recv_weights + x * M, c, D, I,
                 &w, a->swiglu_limit, y, &s);
    }
    return DSV4_OK;
}

/* ---- gate --------------------------------------------------------------------- */

static int64_t active_tokens(int64_t num_tokens, int64_t T)
{
    return num_tokens < 0 ? 0 : (num_tokens > T ? T : num_tokens);
}

/* Hash layers read tid2eid[input_ids[t]] for every row, active or not (§3.4). */
static int check_hash_routing(const int32_t *tid2eid, const int64_t *ids, int64_t T, int64_t V,
                              int64_t K, int64_t E, const char *where, struct dsv4_err *e)
{
    for (int64_t t = 0; t < T; t++) {
        if (ids[t] < 0 || ids[t] >= V) {
            snprintf(e->msg, sizeof e->msg, "input_ids%s[%lld] = %lld is outside [0, %lld) (rows of tid2eid)",
                     where, (long long)t, (long long)ids[t], (long long)V);
            return DSV4_EVALUE;
        }
        for (int64_t k = 0; k < K; k++) {
            int32_t x = tid2eid[ids[t] * K + k];
            if (x < 0 || x >= E) {
                snprintf(e->msg, sizeof e->msg,
                         "tid2eid%s[%lld, %lld] = %d (looked up by input_ids[%lld]) is outside [0, %lld) "
                         "(rows of gate_w)",
                         where, (long long)ids[t], (long long)k, x, (long long)t, (long long)E);
                return DSV4_EVALUE;
            }
        }
    }
    return DSV4_OK;
}

static int check_gate(const struct dsv4_gate_args *a, const char *where, struct dsv4_err *e)
{
    if (a->K != a->num_experts_per_tok) {
        snprintf(e->msg, sizeof e->msg,
                 "argument 'tid2eid' has %lld columns; expected num_experts_per_tok = %lld",
                 (long long)a->K, (long long)a->num_experts_per_tok);
        return DSV4_EVALUE;
    }
    if (a->layer_id >= a->num_hash_layers && a->K > a->E) {
        snprintf(e->msg, sizeof e->msg, "top-%lld of %lld experts (rows of 'gate_w') is impossible",
                 (long long)a->K, (long long)a->E);
        return DSV4_EVALUE;
    }
    if (a->layer_id < a->num_hash_layers)
        return check_hash_routing(a->tid2eid, a->input_ids, a->T, a->V, a->K, a->E, where, e);
    return DSV4_OK;
}

/* per thread: TB normalised rows, TB logit and score rows, the taken flags, the K chosen scores */
static int64_t gate_thread_floats(const struct dsv4_gate_args *a)
{
    return TB * a->D + 2 * TB * a->E + a->E + a->K;
}

static size_t gate_scratch(const struct dsv4_gate_args *a)
{
    return (size_t)dsv4_num_threads() * gate_thread_floats(a) * sizeof(float);
}

int dsv4_gate_prepare(void *p, struct dsv4_err *e, size_t *scratch)
{
    struct dsv4_gate_args *a = p;
    if (check_gate(a, "", e))
        return DSV4_EVALUE;
    *scratch = gate_scratch(a);
    return DSV4_OK;
}

/* sum of the K selected scores in torch's order for a row shorter than a vector:
 * partials v0..v3, the rest added to partial 0, then partials 1, 2, 3 (§3.3 G7) */
static float weight_denominator(const float *v, int64_t K)
{
    if (K <= 4) {
        float s = v[0];
        for (int64_t k = 1; k < K; k++)
            s = s + v[k];
        return s;
    }
    float s = v[0];
    for (int64_t k = 4; k < K; k++)
        s = s + v[k];
    return ((s + v[1]) + v[2]) + v[3];
}

int dsv4_gate(void *p, struct dsv4_err *e)
{
    const struct dsv4_gate_args *a = p;
    const struct dsv4_ops *ops = dsv4_call_ops();
    const int64_t T = a->T, D = a->D, E = a->E, K = a->K, nb = (T + TB - 1) / TB;
    const int64_t n = active_tokens(a->num_tokens, T);
    const int hash = a->layer_id < a->num_hash_layers;
    #pragma omp parallel num_threads(dsv4_num_threads())
    {
        const int ith = omp_get_thread_num(), nth = omp_get_num_threads();
        float *xn = (float *)a->scratch + (size_t)ith * gate_thread_floats(a);
        float *logit = xn + TB * D, *score = logit + TB * E, *taken = score + TB * E;
        float *v = taken + E;                            /* G7: the K unbiased scores */
        for (int64_t b = ith; b < nb; b += nth) {
            int64_t t0 = b * TB, nx = T - t0 < TB ? T - t0 : TB;
            for (int64_t i = 0; i < nx; i++) {           /* G1, G2 */
                int64_t t = t0 + i;
                float *x = xn + i * D;
                dsv4_bf16_row_to_f32(ops, a->x_mixed + t * D, D, x);
                float inv =
                    1.0f / sqrtf(dsv4_sum_sq(ops, x, D) * (1.0f / (float)D) + a->rms_norm_eps);
                for (int64_t d = 0; d < D; d++) {
                    bf16_t h = dsv4_f32_to_bf16((x[d] * inv) * dsv4_bf16_to_f32(a->norm_w[d]));
                    a->x_norm[t * D + d] = h;
                    x[d] = dsv4_bf16_to_f32(h);
                }
                a->x_norm_scale[t] = dsv4_quant_row_i8(ops, x, D, a->x_norm_i8 + t * D);
            }
            dsv4_dot_f32_grid(ops, xn, D, nx, a->gate_w, D, E, D, logit, E);     /* G3 */
            for (int64_t i = 0; i < nx; i++) {
                int64_t t = t0 + i;
                float *z = logit + i * E, *sc = score + i * E;
                for (int64_t x = 0; x < E; x++) {        /* G4: sqrt(softplus), log1p form */
                    float az = fabsf(z[x]);
                    float sp = (z[x] > 0.0f ? z[x] : 0.0f) + (float)log1p((double)exp32(-az));
                    sc[x] = sqrtf(sp);
                }
                int32_t *idx = a->indices + t * K;
                if (hash) {
                    for (int64_t k = 0; k < K; k++)
                        idx[k] = a->tid2eid[a->input_ids[t] * K + k];
                } else {                 /* G5, G6: stable, lower id wins a tie, NaN last */
                    for (int64_t x = 0; x < E; x++) {
                        z[x] = sc[x] + a->gate_bias[x];
                        taken[x] = 0.0f;
                    }
                    for (int64_t k = 0; k < K; k++) {
                        int64_t best = -1;
                        for (int64_t x = 0; x < E; x++)
                            if (taken[x] == 0.0f && (best < 0 || z[x] > z[best] || (z[best] != z[best] && z[x] == z[x])))
                                best = x;
                        taken[best] = 1.0f;
                        idx[k] = (int32_t)best;
                    }
                }
                for (int64_t k = 0; k < K; k++)
                    v[k] = sc[idx[k]];
                float den = weight_denominator(v, K);
                for (int64_t k = 0; k < K; k++)
                    a->weights[t * K + k] = (v[k] / den) * a->routed_scaling_factor;
                if (t >= n) {                            /* G8 */
                    a->x_norm_scale[t] = 0.0f;
                    for (int64_t k = 0; k < K; k++) {
                        idx[k] = 0;
                        a->weights[t * K + k] = 0.0f;
                    }
                }
            }
        }
    }
    return DSV4_OK;
}

/* ---- moe ---------------------------------------------------------------------- */

struct moe_scratch {
    bf16_t *x_mixed, *x_norm, *sh, *route_y, *ffn;   /* route_y: [R, T, K, D] */
    bf16_t *blk;                                    /* one expert's outputs, [R*T, D] */
    float *post, *comb, *sx, *w;
    int8_t *xq;
    int32_t *idx;
    int8_t *rx;                                     /* gathered rows of one expert */
    float *rsx, *rw;
    int64_t *rpos;
    int64_t *count;
    void *hc, *gate;
    struct ffn_scratch fs;
};

static void moe_subs(const struct dsv4_moe_args *a, int64_t r, struct dsv4_hc_pre_args *hp,
                     struct dsv4_gate_args *g, struct dsv4_hc_post_args *hq,
                     const struct moe_scratch *s)
{
    const int64_t T = a->T, D = a->D, HC = a->HC, K = a->K;
    *hp = (struct dsv4_hc_pre_args){
        .x = a->x_hc + r * T * a->HCD, .hc_fn = a->hc_ffn_fn + r * a->MIX * a->HCD,
        .hc_scale = a->hc_ffn_scale + r * 3, .hc_base = a->hc_ffn_base + r * a->MIX,
        .x_mixed = s ? s->x_mixed : NULL, .post = s ? s->post + r * T * HC : NULL,
        .comb = s ? s->comb + r * T * HC * HC : NULL,
        .T = T, .HC = HC, .D = D, .MIX = a->MIX, .K = a->HCD, .HC2 = HC * HC,
        .hc_sinkhorn_iters = a->hc_sinkhorn_iters, .rms_norm_eps = a->rms_norm_eps,
        .hc_eps = a->hc_eps, .scratch = s ? s->hc : NULL};
    *g = (struct dsv4_gate_args){
        .x_mixed = s ? s->x_mixed : NULL, .norm_w = a->norm_w + r * D,
        .gate_w = a->gate_w + r * a->E * D, .gate_bias = a->gate_bias + r * a->E,
        .tid2eid = a->tid2eid + r * a->V * K, .input_ids = a->input_ids + r * T,
        .x_norm = s ? s->x_norm : NULL, .x_norm_i8 = s ? s->xq + r * T * D : NULL,
        .x_norm_scale = s ? s->sx + r * T : NULL, .indices = s ? s->idx + r * T * K : NULL,
        .weights = s ? s->w + r * T * K : NULL,
        .T = T, .D = D, .E = a->E, .V = a->V, .K = K, .layer_id = a->layer_id,
        .num_tokens = a->num_tokens, .num_hash_layers = a->num_hash_layers,
        .num_experts_per_tok = a->num_experts_per_tok, .rms_norm_eps = a->rms_norm_eps,
        .routed_scaling_factor = a->routed_scaling_factor, .scratch = s ? s->gate : NULL};
    *hq = (struct dsv4_hc_post_args){
        .x = s ? s->ffn : NULL, .residual = a->x_hc + r * T * a->HCD,
        .post = s ? s->post + r * T * HC : NULL, .comb = s ? s->comb + r * T * HC * HC : NULL,
        .y = a->x_next + r * T * a->HCD, .T = T, .HC = HC, .D = D, .HC2 = HC * HC};
}

static void moe_layout(const struct dsv4_moe_args *a, struct dsv4_arena *ar, struct moe_scratch *s)
{
    const int64_t R = a->R, T = a->T, D = a->D, HC = a->HC, K = a->K;
    struct dsv4_hc_pre_args hp;
    struct dsv4_gate_args g;
    struct dsv4_hc_post_args hq;
    struct dsv4_err e;
    size_t n_hc = 0;
    moe_subs(a, 0, &hp, &g, &hq, NULL);
    dsv4_hc_pre_prepare(&hp, &e, &n_hc);
    s->x_mixed = dsv4_take(ar, (size_t)T * D * sizeof(bf16_t));
    s->x_norm = dsv4_take(ar, (size_t)T * D * sizeof(bf16_t));
    s->ffn = dsv4_take(ar, (size_t)T * D * sizeof(bf16_t));
    s->sh = dsv4_take(ar, (size_t)R * T * D * sizeof(bf16_t));
    s->route_y = dsv4_take(ar, (size_t)R * T * K * D * sizeof(bf16_t));
    s->post = dsv4_take(ar, (size_t)R * T * HC * sizeof(float));
    s->comb = dsv4_take(ar, (size_t)R * T * HC * HC * sizeof(float));
    s->sx = dsv4_take(ar, (size_t)R * T * sizeof(float));
    s->w = dsv4_take(ar, (size_t)R * T * K * sizeof(float));
    s->xq = dsv4_take(ar, (size_t)R * T * D);
    s->idx = dsv4_take(ar, (size_t)R * T * K * sizeof(int32_t));
    s->rx = dsv4_take(ar, (size_t)R * T * D);
    s->blk = dsv4_take(ar, (size_t)R * T * D * sizeof(bf16_t));
    s->rsx = dsv4_take(ar, (size_t)R * T * sizeof(float));
    s->rw = dsv4_take(ar, (size_t)R * T * sizeof(float));
    s->rpos = dsv4_take(ar, (size_t)R * T * sizeof(int64_t));
    s->count = dsv4_take(ar, (size_t)a->E * sizeof(int64_t));
    s->hc = dsv4_take(ar, n_hc);
    s->gate = dsv4_take(ar, gate_scratch(&g));
    ffn_layout(R * T, D, a->IE, dsv4_num_threads(), ar, &s->fs);
}

int dsv4_moe_prepare(void *p, struct dsv4_err *e, size_t *scratch)
{
    struct dsv4_moe_args *a = p;
    if (a->HCD != a->HC * a->D || a->MIX != (2 + a->HC) * a->HC || a->HC > 16) {
        snprintf(e->msg, sizeof e->msg,
                 "argument 'hc_ffn_fn' is [%lld, %lld]; expected [(2 + HC) * HC, HC * D] = [%lld, %lld] "
                 "(HC, D from 'x_hc')",
                 (long long)a->MIX, (long long)a->HCD, (long long)((2 + a->HC) * a->HC),
                 (long long)(a->HC * a->D));
        return DSV4_EVALUE;
    }
    if (a->E != a->R * a->EL) {
        snprintf(e->msg, sizeof e->msg,
                 "argument 'gate_w' routes over %lld experts; the routed shards hold R * E_l = %lld * %lld "
                 "(from 'routed_w1')",
                 (long long)a->E, (long long)a->R, (long long)a->EL);
        return DSV4_EVALUE;
    }
    if (check_widths(a->D, a->IE, e))
        return DSV4_EVALUE;
    for (int64_t r = 0; r < a->R; r++) {
        struct dsv4_hc_pre_args hp;
        struct dsv4_gate_args g;
        struct dsv4_hc_post_args hq;
        char where[32];
        moe_subs(a, r, &hp, &g, &hq, NULL);
        snprintf(where, sizeof where, "[%lld]", (long long)r);
        if (check_gate(&g, where, e))
            return DSV4_EVALUE;
    }
    struct dsv4_arena ar = {0};
    struct moe_scratch s;
    moe_layout(a, &ar, &s);
    *scratch = ar.used;
    return DSV4_OK;
}

int dsv4_moe(void *p, struct dsv4_err *e)
{
    const struct dsv4_moe_args *a = p;
    struct dsv4_arena ar = {a->scratch, 0};
    struct moe_scratch s;
    moe_layout(a, &ar, &s);
    const int64_t R = a->R, T = a->T, D = a->D, K = a->K, EL = a->EL, I = a->IE;
    const int64_t n = active_tokens(a->num_tokens, T);
    struct dsv4_hc_pre_args hp;
    struct dsv4_gate_args g;
    struct dsv4_hc_post_args hq;

    /* M1-M2 for every rank; x_mixed is only needed by the gate, so one buffer serves */
    for (int64_t r = 0; r < R; r++) {
        moe_subs(a, r, &hp, &g, &hq, &s);
        dsv4_hc_pre(&hp, e);
        dsv4_gate(&g, e);
    }
    /* an expert's receive buffer holds R * T rows (§6.5): check before any output */
    memset(s.count, 0, (size_t)a->E * sizeof(int64_t));
    for (int64_t r = 0; r < R; r++)
        for (int64_t t = 0; t < n; t++)
            for (int64_t k = 0; k < K; k++)
                s.count[s.idx[(r * T + t) * K + k]]++;
    for (int64_t x = 0; x < a->E; x++)
        if (s.count[x] > R * T) {
            snprintf(e->msg, sizeof e->msg,
                     "the routing sends %lld rows to expert %lld (rank %lld, local %lld); its receive "
                     "buffer holds R * T = %lld (layer_id %lld routes by tid2eid)",
                     (long long)s.count[x], (long long)x, (long long)(x / EL), (long long)(x % EL),
                     (long long)(R * T), (long long)a->layer_id);
            return DSV4_EVALUE;
        }
    /* M3: shared expert per rank */
    struct ffn_weights sw;
    for (int64_t r = 0; r < R; r++) {
        sw = (struct ffn_weights){a->shared_w1 + r * I * D, a->shared_w3 + r * I * D,
                                  a->shared_w2 + r * D * I, a->shared_w1_scale + r * I,
                                  a->shared_w3_scale + r * I, a->shared_w2_scale + r * D};
        ffn_rows(s.xq + r * T * D, s.sx + r * T, NULL, T, D, I, &sw, a->swiglu_limit,
                 s.sh + r * T * D, &s.fs);
    }
    /* M4: each expert's routes as one block, in the dispatch order (rank, token, k) */
    for (int64_t x = 0; x < a->E; x++) {
        if (!s.count[x])
            continue;
        int64_t c = 0, dst = x / EL, l = x % EL;
        for (int64_t r = 0; r < R; r++)
            for (int64_t t = 0; t < n; t++)
                for (int64_t k = 0; k < K; k++)
                    if (s.idx[(r * T + t) * K + k] == x) {
                        memcpy(s.rx + c * D, s.xq + (r * T + t) * D, (size_t)D);
                        s.rsx[c] = s.sx[r * T + t];
                        s.rw[c] = s.w[(r * T + t) * K + k];
                        s.rpos[c++] = (r * T + t) * K + k;
                    }
        const int64_t sh = dst * EL + l;     /* the destination rank's shard, local expert l */
        struct ffn_weights rw = {a->routed_w1 + sh * I * D, a->routed_w3 + sh * I * D,
                                 a->routed_w2 + sh * D * I, a->routed_w1_scale + sh * I,
                                 a->routed_w3_scale + sh * I, a->routed_w2_scale + sh * D};
        ffn_rows(s.rx, s.rsx, s.rw, c, D, I, &rw, a->swiglu_limit, s.blk, &s.fs);
        for (int64_t j = 0; j < c; j++)
            memcpy(s.route_y + s.rpos[j] * D, s.blk + j * D, (size_t)D * sizeof(bf16_t));
    }
    /* M5, M6: combine in k order onto the shared output, then hc_post */
    for (int64_t r = 0; r < R; r++) {
        for (int64_t t = 0; t < T; t++)
            for (int64_t d = 0; d < D; d++) {
                float acc = dsv4_bf16_to_f32(s.sh[(r * T + t) * D + d]);
                if (t < n)
                    for (int64_t k = 0; k < K; k++)
                        acc = acc + dsv4_bf16_to_f32(s.route_y[((r * T + t) * K + k) * D + d]);
                s.ffn[t * D + d] = dsv4_f32_to_bf16(acc);
            }
        moe_subs(a, r, &hp, &g, &hq, &s);
        dsv4_hc_post(&hq, e);
    }
    return DSV4_OK;
}
