/* Runs core primitives and kernels of csrc/ on inputs from a fixed seed and prints one
 * FNV-1a hash per output: the same lines on every CPU, code path and thread count, or the
 * results depend on one of them. tools/aarch64_check builds it natively and for aarch64
 * (run under qemu-user) and compares the lines.
 *
 *   hash_outputs [isa [threads]]     isa: scalar (default), avx2, avxvnni, avx512, amx, best;
 *                                    threads: default 2
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/dsv4.h"
#include "core/gemm.h"
#include "kernels/kernels.h"

/* the primitives' table of the chosen path, for the primitives called outside a kernel call */
static const struct dsv4_ops *ops;

/* ---- seeded values ---------------------------------------------------------------- */

static uint64_t rng_state;

static uint64_t next_u64(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);     /* splitmix64 */
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* uniform in [-1, 1), times 2^e with e uniform in [-spread, spread] */
static float rand_f32(int spread)
{
    float u = (float)(next_u64() >> 40) * 0x1p-23f - 1.0f;
    int e = spread ? (int)(next_u64() % (uint64_t)(2 * spread + 1)) - spread : 0;
    return ldexpf(u, e);
}

/* a bf16 value of rand_f32(spread) * 2^shift */
static float rand_bf16v(int spread, int shift) { return dsv4_round_bf16(ldexpf(rand_f32(spread), shift)); }

static void *xalloc(size_t n)
{
    void *p = aligned_alloc(64, (n + 63) / 64 * 64 + 64);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

static float *f32s(int64_t n, int spread)
{
    float *v = xalloc((size_t)n * 4);
    for (int64_t i = 0; i < n; i++)
        v[i] = rand_f32(spread);
    return v;
}

static float *bf16vals(int64_t n, int spread, int shift)
{
    float *v = xalloc((size_t)n * 4);
    for (int64_t i = 0; i < n; i++)
        v[i] = rand_bf16v(spread, shift);
    return v;
}

static bf16_t *bf16s(int64_t n, int spread, int shift)
{
    bf16_t *v = xalloc((size_t)n * 2);
    for (int64_t i = 0; i < n; i++)
        v[i] = dsv4_f32_to_bf16(rand_bf16v(spread, shift));
    return v;
}

static int8_t *i8s(int64_t n)
{
    int8_t *v = xalloc((size_t)n);
    for (int64_t i = 0; i < n; i++)
        v[i] = (int8_t)(next_u64() & 0xff);
    return v;
}

/* ---- hashes ------------------------------------------------------------------------- */

static void put(const char *name, const void *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ ((const unsigned char *)p)[i]) * 0x100000001b3ull;
    printf("%-28s %016llx\n", name, (unsigned long long)h);
}

/* ---- kernels through their prepare/run pair, as the binding runs them -------------- */

static void run(const char *name, void *args, size_t scratch_off,
                int (*prepare)(void *, struct dsv4_err *, size_t *), int (*fn)(void *, struct dsv4_err *))
{
    struct dsv4_err e = {{0}};
    size_t n = 0;
    dsv4_call_begin();
    if (prepare(args, &e, &n)) {
        fprintf(stderr, "%s: prepare: %s\n", name, e.msg);
        exit(1);
    }
    void *scratch = xalloc(n);
    *(void **)((char *)args + scratch_off) = scratch;
    if (fn(args, &e)) {
        fprintf(stderr, "%s: %s\n", name, e.msg);
        exit(1);
    }
    dsv4_call_end();
    free(scratch);
}

#define RUN(name, args, FN) run(name, &(args), offsetof(__typeof__(args), scratch), FN##_prepare, FN)

/* ---- the cases ---------------------------------------------------------------------- */

static const float specials[] = {0.0f, -0.0f, NAN, -NAN, INFINITY, -INFINITY, 1e-45f, -1e-45f,
                                 1e-40f, 1.1754942e-38f, 3.4028235e38f, -3.4028235e38f,
                                 88.72283f, 88.72284f, -87.33655f, -103.97208f, -103.97209f,
                                 1.00390625f, -1.00390625f, 1.01171875f, 0.5f, 1e-30f, -1e30f};
#define NSPEC ((int64_t)(sizeof specials / sizeof specials[0]))

static void conversions(void)
{
    /* every 4099-th fp32 bit pattern (NaNs, infinities, subnormals among them) */
    const int64_t n = ((int64_t)1 << 32) / 4099 + 1;
    bf16_t *b = xalloc((size_t)n * 2), *h = xalloc((size_t)n * 2);
    uint8_t *f8 = xalloc((size_t)n);
    for (int64_t i = 0; i < n; i++) {
        float f = dsv4_bits_f32((uint32_t)(i * 4099));
        b[i] = dsv4_f32_to_bf16(f);
        h[i] = dsv4_f32_to_bf16_haz(f);
        f8[i] = dsv4_f32_to_fp8(f);
    }
    put("f32_to_bf16", b, (size_t)n * 2);
    put("f32_to_bf16_haz", h, (size_t)n * 2);
    put("f32_to_fp8", f8, (size_t)n);
    float back[256];
    for (int c = 0; c < 256; c++)
        back[c] = dsv4_fp8_to_f32((uint8_t)c);
    put("fp8_to_f32", back, sizeof back);
    free(b); free(h); free(f8);
}

static void exp_values(void)
{
    const int64_t n = 300000 + NSPEC;
    float *x = xalloc((size_t)n * 4), *y = xalloc((size_t)n * 4);
    for (int64_t i = 0; i < n; i++)
        x[i] = i < NSPEC ? specials[i] : (float)(next_u64() >> 40) * 0x1p-24f * 210.0f - 115.0f;
    for (int64_t i = 0; i < n; i++)
        y[i] = dsv4_exp_f32(x[i]);
    put("exp_f32", y, (size_t)n * 4);
    struct dsv4_cast_args c = {.x = x, .y = y, .N = n, .variant = DSV4_CAST_EXP};
    memset(y, 0, (size_t)n * 4);
    RUN("cast_exp", c, dsv4_cast);
    put("cast_exp", y, (size_t)n * 4);
    free(x); free(y);
}

static void rows(void)
{
    const int64_t ns[] = {1, 15, 16, 17, 100, 1000, 4099};
    float out[3 * 7];
    for (int i = 0; i < 7; i++) {
        float *a = f32s(ns[i], 10), *b = f32s(ns[i], 10);
        out[3 * i] = dsv4_dot_f32(ops, a, b, ns[i]);
        out[3 * i + 1] = dsv4_sum_sq(ops, a, ns[i]);
        out[3 * i + 2] = dsv4_rms_inv(ops, a, ns[i], 1e-6f);
        free(a); free(b);
    }
    put("dot_sum_sq_rms", out, sizeof out);
    /* dot_f32_rows / grid against many rows */
    float *X = f32s(5 * 333, 3), *W = f32s(37 * 333, 3), grid[5 * 37];
    dsv4_dot_f32_grid(ops, X, 333, 5, W, 333, 37, 333, grid, 37);
    put("dot_f32_grid", grid, sizeof grid);
    free(X); free(W);
}

static void quant_rows(void)
{
    const int64_t n = 333;
    float *v = f32s(8 * n, 8);
    for (int64_t i = 0; i < NSPEC; i++)           /* specials: each in a row of its own */
        v[(i % 8) * n + 3 * i] = specials[i];
    for (int64_t k = 0; k < n; k++)
        v[7 * n + k] = (float)k - 166.0f;              /* .5 ties */
    int8_t q[8 * 333];
    float sc[8];
    for (int r = 0; r < 8; r++)
        sc[r] = dsv4_quant_row_i8(ops, v + r * n, n, q + r * n);
    put("quant_row_i8", q, sizeof q);
    put("quant_row_i8_scale", sc, sizeof sc);
    free(v);
}

static void rope(void)
{
    const int64_t n = 70;
    float *v = f32s(n, 4), *c = bf16vals(n / 2, 0, 0), *s = bf16vals(n / 2, 0, 0);
    bf16_t y[2 * 70];
    dsv4_rope_bf16(ops, v, c, s, n, 0, y);
    dsv4_rope_bf16(ops, v, c, s, n, 1, y + n);
    put("rope_bf16", y, sizeof y);
    free(v); free(c); free(s);
}

static void gemms(int tiny)
{
    char name[64];
    const int64_t M = 16, K = 333, N = 70;
    /* tiny: both operands near 2^-64, so that products underflow and take the fused steps */
    const int sh = tiny ? -64 : 0, sp = tiny ? 2 : 8;
    float *A = bf16vals(M * K, sp, sh);
    bf16_t *B = bf16s(K * N, sp, sh);
    float *C = xalloc(M * N * 4), *work = xalloc(dsv4_gemm_bf16_work(K));
    dsv4_gemm_bf16(ops, A, M, K, B, N, 0, N, C, N, work);
    snprintf(name, sizeof name, "gemm_bf16%s", tiny ? "_tiny" : "");
    put(name, C, M * N * 4);

    /* xwt: X [T, K] . W[N, K]^T, few tokens and a panel's worth */
    for (int64_t T = 5; T <= 40; T += 35) {
        float *X = bf16vals(T * K, sp, sh), *out = xalloc(T * N * 4);
        bf16_t *W = bf16s(N * K, sp, sh);
        void *xw = xalloc(dsv4_xwt_work(T, N, K, 1, 2));
        dsv4_xwt(ops, X, K, T, W, K, N, K, out, N, xw, 2);
        snprintf(name, sizeof name, "xwt_T%lld%s", (long long)T, tiny ? "_tiny" : "");
        put(name, out, T * N * 4);
        free(X); free(out); free(W); free(xw);
    }

    /* PV */
    const int64_t H = 6, HD = 70, n = 45;
    float *P = bf16vals(n * H, sp, sh), *V = bf16vals(n * HD, sp, sh), *O = xalloc(H * HD * 4);
    dsv4_pv(ops, P, 1, H, H, V, n, HD, O);
    snprintf(name, sizeof name, "pv%s", tiny ? "_tiny" : "");
    put(name, O, H * HD * 4);
    free(A); free(B); free(C); free(work); free(P); free(V); free(O);
}

static void int8_gemms(void)
{
    const int64_t M = 13, K = 333, N = 70, Mp = dsv4_gemm_i8_rows(M), lda = dsv4_gemm_i8_lda(K);
    int8_t *A = i8s(M * K), *B = i8s(K * N), *Wt = i8s(N * K), *Ap = xalloc(Mp * lda);
    int32_t *rs = xalloc(Mp * 4), *C = xalloc(Mp * N * 4);
    void *work = xalloc(dsv4_gemm_i8_work(K));
    dsv4_gemm_i8_prep_a(A, M, K, Ap, rs);
    dsv4_gemm_i8(ops, Ap, rs, Mp, K, B, N, 0, N, C, N, work);
    put("gemm_i8", C, M * N * 4);
    dsv4_gemm_i8_nt(ops, Ap, rs, Mp, K, Wt, K, 0, N, C, N);
    put("gemm_i8_nt", C, M * N * 4);
    free(A); free(B); free(Wt); free(Ap); free(rs); free(C); free(work);
}

static void kernels(void)
{
    /* the numerics kernels of dsv4._C */
    {
        const int64_t M = 13, K = 200, N = 65;
        bf16_t *a = bf16s(M * K, 6, 0), *b = bf16s(K * N, 6, 0);
        int8_t *ai = i8s(M * K), *bi = i8s(K * N);
        void *c = xalloc(M * K * 4);          /* M x N, and M x K for the _nt case */
        struct dsv4_matmul_args m = {.a = a, .b = b, .c = c, .M = M, .K = K, .N = N,
                                     .variant = DSV4_MATMUL_BF16};
        RUN("matmul_bf16", m, dsv4_matmul);
        put("matmul_bf16", c, M * N * 4);
        m = (struct dsv4_matmul_args){.a = ai, .b = bi, .c = c, .M = M, .K = K, .N = N,
                                      .variant = DSV4_MATMUL_I8};
        RUN("matmul_i8", m, dsv4_matmul);
        put("matmul_i8", c, M * N * 4);
        m.variant = DSV4_MATMUL_I8_NT;
        m.K = N; m.N = K;        /* b as [N, K] rows: a [M, 65] . b[200, 65]^T */
        int8_t *an = i8s(M * N);
        m.a = an;
        RUN("matmul_i8_nt", m, dsv4_matmul);
        put("matmul_i8_nt", c, M * K * 4);
        free(a); free(b); free(ai); free(bi); free(an); free(c);
    }
    {
        const int64_t M = 9, N = 333;
        float *x = f32s(M * N, 8), *sc = xalloc(M * 4);
        int8_t *y = xalloc(M * N);
        x[5] = NAN; x[N + 7] = INFINITY;
        struct dsv4_quant_int8_args q = {.x = x, .y = y, .scale = sc, .M = M, .N = N};
        RUN("quant_int8", q, dsv4_quant_int8);
        put("quant_int8", y, M * N);
        put("quant_int8_scale", sc, M * 4);
        free(x); free(sc); free(y);
    }
    /* rms_norm, hc_post, hc_pre: the hyper-connection streams and the attention norm */
    const int64_t T = 5, HC = 4, D = 256, K = HC * D, MIX = (2 + HC) * HC;
    {
        bf16_t *x = bf16s(T * D, 3, 0), *w = bf16s(D, 1, 0), *y = xalloc(T * D * 2);
        struct dsv4_rms_norm_args r = {.x = x, .norm_w = w, .x_normed = y, .T = T, .D = D,
                                       .rms_norm_eps = 1e-6f};
        RUN("rms_norm", r, dsv4_rms_norm);
        put("rms_norm", y, T * D * 2);
        free(x); free(w); free(y);
    }
    {
        bf16_t *x = bf16s(T * HC * D, 3, 0), *xm = xalloc(T * D * 2);
        float *fn = f32s(MIX * K, 4), *scale = f32s(3, 0), *base = f32s(MIX, 0);
        float *post = xalloc(T * HC * 4), *comb = xalloc(T * HC * HC * 4);
        struct dsv4_hc_pre_args h = {.x = x, .hc_fn = fn, .hc_scale = scale, .hc_base = base,
                                     .x_mixed = xm, .post = post, .comb = comb, .T = T, .HC = HC,
                                     .D = D, .MIX = MIX, .K = K, .hc_sinkhorn_iters = 20,
                                     .rms_norm_eps = 1e-6f, .hc_eps = 1e-6f};
        RUN("hc_pre", h, dsv4_hc_pre);
        put("hc_pre_x_mixed", xm, T * D * 2);
        put("hc_pre_post", post, T * HC * 4);
        put("hc_pre_comb", comb, T * HC * HC * 4);
        bf16_t *res = bf16s(T * HC * D, 3, 0), *y = xalloc(T * HC * D * 2);
        struct dsv4_hc_post_args p = {.x = xm, .residual = res, .post = post, .comb = comb,
                                      .y = y, .T = T, .HC = HC, .D = D, .HC2 = HC * HC};
        RUN("hc_post", p, dsv4_hc_post);
        put("hc_post", y, T * HC * D * 2);
        free(x); free(xm); free(fn); free(scale); free(base); free(post); free(comb);
        free(res); free(y);
    }
    {
        /* qkv_proj_rope, plain variant, a small model: D 256, Q 64, H 4 x HD 96, rope 32 */
        const int64_t Dq = 256, Q = 64, H = 4, HD = 96, R = 32, P = T;
        bf16_t *x = bf16s(T * Dq, 2, 0), *wq_a = bf16s(Dq * Q, 0, 0), *wkv = bf16s(Dq * HD, 0, 0);
        int8_t *wq_b = i8s(Q * H * HD);
        float *wq_b_scale = f32s(H * HD, 0);
        bf16_t *cs = bf16s(P * R, 0, 0), *sn = bf16s(P * R, 0, 0), *gq = bf16s(Q, 0, 0), *gkv = bf16s(HD, 0, 0);
        bf16_t *q = xalloc(T * H * HD * 2), *kv = xalloc(T * HD * 2);
        int8_t *qr = xalloc(T * Q);
        float *qrs = xalloc(T * 4);
        struct dsv4_qkv_proj_rope_args a = {
            .x = x, .wq_a = wq_a, .wq_b = wq_b, .wq_b_scale = wq_b_scale, .wkv = wkv,
            .rope_cos = cs, .rope_sin = sn, .gamma_cq = gq, .gamma_ckv = gkv, .q = q, .kv = kv,
            .qr = qr, .qr_scale = qrs, .T = T, .D = Dq, .Q = Q, .HHD = H * HD, .HD = HD, .H = H, .P = P,
            .RW = R, .qk_rope_head_dim = R, .rms_norm_eps = 1e-6f,
            .variant = DSV4_QKV_PLAIN, .nth = dsv4_num_threads()};
        RUN("qkv_proj_rope", a, dsv4_qkv_proj_rope);
        put("qkv_q", q, T * H * HD * 2);
        put("qkv_kv", kv, T * HD * 2);
        put("qkv_qr", qr, T * Q);
        put("qkv_qr_scale", qrs, T * 4);
        free(x); free(wq_a); free(wkv); free(wq_b); free(wq_b_scale); free(cs); free(sn);
        free(gq); free(gkv); free(q); free(kv); free(qr); free(qrs);
    }
}

int main(int argc, char **argv)
{
    const char *isa = argc > 1 ? argv[1] : "scalar";
    int nth = argc > 2 ? atoi(argv[2]) : 2;
    int found = !strcmp(isa, "best");
    if (found)
        dsv4_set_isa(dsv4_best_isa());
    for (int i = DSV4_ISA_SCALAR; !found && i <= DSV4_ISA_AMX; i++)
        if (!strcmp(isa, dsv4_isa_name((enum dsv4_isa)i))) {
            if (!dsv4_isa_supported((enum dsv4_isa)i)) {
                fprintf(stderr, "%s: this CPU has no %s\n", argv[0], isa);
                return 3;
            }
            dsv4_set_isa((enum dsv4_isa)i);
            found = 1;
        }
    if (!found) {
        fprintf(stderr, "usage: %s [scalar|avx2|avxvnni|avx512|amx|best [threads]]\n", argv[0]);
        return 2;
    }
    dsv4_set_num_threads(nth > 0 ? nth : 1);
    ops = dsv4_ops_for(dsv4_get_isa());
    fprintf(stderr, "isa %s, %d threads\n", dsv4_isa_name(dsv4_get_isa()), dsv4_num_threads());
    rng_state = 20260708;
    conversions();
    exp_values();
    rows();
    quant_rows();
    rope();
    gemms(0);
    gemms(1);
    int8_gemms();
    kernels();
    return 0;
}
