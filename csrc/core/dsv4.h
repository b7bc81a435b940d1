/* dsv4 core: numerics shared by every kernel. No Python here.
 *
 * Rounding rules (spec chapter 01 §0):
 *   bf16      fp32 -> bfloat16, round to nearest, ties to even
 *   bf16_haz  fp32 -> bfloat16, round to nearest, ties away from zero
 *   int8      per-row: sq = (1/amax)*127, q = rint(v*sq), scale = 1/sq
 * Sums of fp32 values use one canonical order (dsv4_sum_sq, dsv4_dot_f32):
 * element k goes to lane k % 16, lanes are added in a fixed tree. Every ISA
 * variant follows that order, so results do not depend on the CPU or on the
 * number of threads.
 */
#ifndef DSV4_CORE_H
#define DSV4_CORE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef uint16_t bf16_t;

enum dsv4_dtype { DSV4_BF16, DSV4_F32, DSV4_I8, DSV4_I32, DSV4_FP8, DSV4_I64, DSV4_NDTYPE };

/* ---- scalar conversions ------------------------------------------------ */

static inline uint32_t dsv4_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float dsv4_bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline float dsv4_bf16_to_f32(bf16_t h) { return dsv4_bits_f32((uint32_t)h << 16); }

static inline bf16_t dsv4_f32_to_bf16(float f)
{
    uint32_t u = dsv4_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)        /* NaN: keep it a quiet NaN */
        return (bf16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

/* Ties away from zero: add half an ulp to the magnitude, truncate. */
static inline bf16_t dsv4_f32_to_bf16_haz(float f)
{
    uint32_t u = dsv4_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (bf16_t)((u >> 16) | 0x40);
    return (bf16_t)((u + 0x8000u) >> 16);
}

/* Round an fp32 value to bf16 and back: the golden's `.to(bf16).float()`. */
static inline float dsv4_round_bf16(float f) { return dsv4_bf16_to_f32(dsv4_f32_to_bf16(f)); }

/* max as torch.max / np.max reduce: a NaN wins and stays (fmaxf would drop it) */
static inline float dsv4_max_nan(float m, float a) { return (a > m || a != a) ? a : m; }

/* e^x rounded to fp32, computed in double: x clamped to [-120, 100] (beyond, fp32 gives 0
 * or inf anyway), n = rint(x / ln 2), r = x - n ln 2 in two fused steps, Horner on the
 * degree-11 Taylor polynomial in fused steps, times 2^n (exact), one rounding. NaN stays NaN.
 * The AVX2 and AVX-512 forms (avx2.h, avx512.h) take the same steps, so they give the same
 * bits. */
float dsv4_exp_f32(float x);
extern const double dsv4_exp_poly[12];     /* 1/11!, 1/10!, ..., 1/1!, 1 */
#define DSV4_EXP_LOG2E 0x1.71547652b82fep+0
#define DSV4_EXP_LN2_HI 0x1.62e42fefa3800p-1
#define DSV4_EXP_LN2_LO 0x1.ef35793c7673p-45

uint8_t dsv4_f32_to_fp8(float f);     /* e4m3fn, RNE, out of range -> NaN */
float dsv4_fp8_to_f32(uint8_t c);

/* ---- fused steps on the portable path ------------------------------------
 * fmaf(a, b, c) rounds c + a*b once. For bf16 values a and b (8 significant bits each) the
 * product has at most 16 and is an exact fp32 value unless it underflows or overflows, so
 * c + a*b with the product rounded on its own gives the same bits, and vectorises without
 * FMA. The portable loops take that form first and check it afterwards: an inexact product
 * raises FE_UNDERFLOW or FE_OVERFLOW, while an fp32 add never raises FE_UNDERFLOW (a sum that
 * small is exact) and raises FE_OVERFLOW only where the fused sum overflows too. Raised,
 * the pass is redone with fmaf. Where fmaf is an instruction (__FP_FAST_FMAF: aarch64, x86
 * with -mfma) the loops use it directly. */
#include <fenv.h>

/* OR of the 16 low bits of v[r * ld + k], r < rows, k < n: 0 iff every value is a bf16 value */
uint32_t dsv4_low16(const float *v, int64_t rows, int64_t n, int64_t ld);

/* 1: try the unfused form (operands whose low16 is 0 on both sides); the flags it is checked
 * by are cleared here. Results must be in memory before dsv4_unfused_exact() reads the flags. */
static inline int dsv4_unfused_try(uint32_t low16)
{
#if defined(__FP_FAST_FMAF)
    (void)low16;
    return 0;
#else
    if (low16)
        return 0;
    if (fetestexcept(FE_UNDERFLOW | FE_OVERFLOW))
        feclearexcept(FE_UNDERFLOW | FE_OVERFLOW);
    return 1;
#endif
}

/* after an unfused pass: 1 if no product was inexact, i.e. its results are the fused ones */
static inline int dsv4_unfused_exact(void) { return !fetestexcept(FE_UNDERFLOW | FE_OVERFLOW); }

/* ---- the code path: one table of hot primitives per ISA -------------------------
 * Ordered: each level runs the code of the one below but for its own entries. AVX2 means
 * AVX2 + FMA; AVXVNNI is AVX2 with 256-bit int8 dot products (a CPU may have AVX-512
 * without it); AMX adds the int8 tile GEMMs. Every entry of every table gives the same bits. A call takes its
 * table once, on the calling thread (dsv4_call_ops() in run()), and passes it down to the
 * primitives, also into its parallel regions, so no code inside a call reads the setting
 * again. */
enum dsv4_isa {
    DSV4_ISA_SCALAR = 0, DSV4_ISA_AVX2 = 1, DSV4_ISA_AVXVNNI = 2, DSV4_ISA_AVX512 = 3, DSV4_ISA_AMX = 4
};
#define DSV4_NISA 5

struct dsv4_ops {
    enum dsv4_isa isa;
    float (*dot_f32)(const float *a, const float *b, int64_t n);
    void (*dot_f32_rows)(const float *x, const float *W, int64_t ldw, int64_t M, int64_t n,
                         float *out);
    void (*dot_f32_grid)(const float *X, int64_t ldx, int64_t NX, const float *W, int64_t ldw,
                         int64_t M, int64_t n, float *out, int64_t ldo);
    void (*pv)(const float *P, int64_t ldh, int64_t ldi, int64_t H, const float *V, int64_t n,
               int64_t HD, float *O);
    float (*quant_row_i8)(const float *v, int64_t n, int8_t *q);
    void (*rope_bf16)(const float *v, const float *cos, const float *sin, int64_t n, int inverse,
                      bf16_t *y);
    void (*bf16_row_to_f32)(const bf16_t *x, int64_t n, float *y);
    void (*gemm_bf16)(const float *A, int64_t M, int64_t K, const bf16_t *B, int64_t ldb,
                      int64_t n0, int64_t nc, float *C, int64_t ldc, void *work);
    void (*gemm_i8)(const int8_t *Ap, const int32_t *rowsum, int64_t Mp, int64_t K,
                    const int8_t *B, int64_t ldb, int64_t n0, int64_t nc, int32_t *C,
                    int64_t ldc, void *work);
    void (*gemm_i8_nt)(const int8_t *Ap, const int32_t *rowsum, int64_t Mp, int64_t K,
                       const int8_t *W, int64_t ldw, int64_t n0, int64_t nc, int32_t *C,
                       int64_t ldc);
    /* dsv4_xwt's 8-token micro-kernel and its weight-panel copy */
    void (*xwt_micro)(const float *A, int64_t lda, const float *B, int64_t kb, float *ct);
    void (*xwt_panel)(const bf16_t *W, int64_t ldw, int64_t nr, int64_t kn, float *P);
};

/* the table of isa, or NULL if this CPU lacks it; filled once, never changed */
const struct dsv4_ops *dsv4_ops_for(enum dsv4_isa isa);
/* each file's entries of o->isa's table */
void dsv4_numerics_ops(struct dsv4_ops *o);
void dsv4_gemm_ops(struct dsv4_ops *o);

/* ---- row primitives (canonical order) ------------------------------------ */

static inline float dsv4_dot_f32(const struct dsv4_ops *o, const float *a, const float *b,
                                 int64_t n)
{
    return o->dot_f32(a, b, n);
}
float dsv4_sum_sq(const struct dsv4_ops *o, const float *v, int64_t n);
/* out[m] = dsv4_dot_f32(x, W + m*ldw, n) for m < M, bit for bit */
static inline void dsv4_dot_f32_rows(const struct dsv4_ops *o, const float *x, const float *W,
                                     int64_t ldw, int64_t M, int64_t n, float *out)
{
    o->dot_f32_rows(x, W, ldw, M, n, out);
}
/* out[i*ldo + m] = dsv4_dot_f32(X + i*ldx, W + m*ldw, n) for i < NX, m < M, bit for bit */
static inline void dsv4_dot_f32_grid(const struct dsv4_ops *o, const float *X, int64_t ldx,
                                     int64_t NX, const float *W, int64_t ldw, int64_t M,
                                     int64_t n, float *out, int64_t ldo)
{
    o->dot_f32_grid(X, ldx, NX, W, ldw, M, n, out, ldo);
}

/* O[h, :] = sum_i P[h * ldh + i * ldi] * V[i, :] over i ascending, fused steps (exact for
 * bf16 values). */
static inline void dsv4_pv(const struct dsv4_ops *o, const float *P, int64_t ldh, int64_t ldi,
                           int64_t H, const float *V, int64_t n, int64_t HD, float *O)
{
    o->pv(P, ldh, ldi, H, V, n, HD, O);
}

/* 1/sqrt(mean(v^2) + eps), the torch.rsqrt form: sqrt and division each round once. */
float dsv4_rms_inv(const struct dsv4_ops *o, const float *v, int64_t n, float eps);

/* Per-row int8 quantisation (§0.4). Writes q[0..n-1] and returns the dequant scale. */
static inline float dsv4_quant_row_i8(const struct dsv4_ops *o, const float *v, int64_t n,
                                      int8_t *q)
{
    return o->quant_row_i8(v, n, q);
}

/* Interleaved RoPE (§0.5) on n/2 pairs (v[2i], v[2i+1]); cos/sin hold one value
 * per pair. Each output is bf16(p*q -/+ r*s) with every product rounded to fp32.
 * inverse != 0 rotates by the negative angle (the attention output's inverse RoPE). */
static inline void dsv4_rope_bf16(const struct dsv4_ops *o, const float *v, const float *cos,
                                  const float *sin, int64_t n, int inverse, bf16_t *y)
{
    o->rope_bf16(v, cos, sin, n, inverse, y);
}

static inline void dsv4_bf16_row_to_f32(const struct dsv4_ops *o, const bf16_t *x, int64_t n,
                                        float *y)
{
    o->bf16_row_to_f32(x, n, y);
}

/* ---- GEMM ----------------------------------------------------------------
 * Both compute a column slice C[0:M, 0:nc] = A[0:M, :] @ B[:, n0:n0+nc] into a
 * C buffer with row stride ldc. Each C element is the sequential sum over k
 * (fp32 FMA for bf16 inputs; exact int32 for int8), whatever the ISA.
 * `work` is per-call scratch of the size the _work function returns.
 */
size_t dsv4_gemm_bf16_work(int64_t K);
static inline void dsv4_gemm_bf16(const struct dsv4_ops *o, const float *A, int64_t M, int64_t K,
                                  const bf16_t *B, int64_t ldb, int64_t n0, int64_t nc,
                                  float *C, int64_t ldc, void *work)
{
    o->gemm_bf16(A, M, K, B, ldb, n0, nc, C, ldc, work);
}

/* out[t, n] = X[t, :] . W[n, :] for bf16 weight rows W [N, K] (ldw) and X [T, K] fp32
 * holding bf16 values; runs its own parallel region of nth threads. work holds
 * dsv4_xwt_work(T, N, K, 1, nth) bytes. Every output is the sequential-k sum of the GEMM,
 * whatever T, so a token's outputs do not depend on the other tokens. */
size_t dsv4_xwt_work(int64_t T, int64_t N, int64_t K, int64_t G, int nth);
void dsv4_xwt(const struct dsv4_ops *o, const float *X, int64_t ldx, int64_t T, const bf16_t *W,
              int64_t ldw, int64_t N, int64_t K, float *out, int64_t ldo, void *work, int nth);
/* G such products of one shape in one parallel region (work for G), group g from its own
 * X, W and out; same bits as G calls of dsv4_xwt. */
struct dsv4_xwt_group {
    const float *X;
    const bf16_t *W;
    float *out;
};
void dsv4_xwt_groups(const struct dsv4_ops *o, const struct dsv4_xwt_group *g, int64_t G,
                     int64_t ldx, int64_t T, int64_t ldw, int64_t N, int64_t K, int64_t ldo,
                     void *work, int nth);

/* A is int8 [M, K] prepared by dsv4_gemm_i8_prep_a (rows padded, k padded to 4). */
int64_t dsv4_gemm_i8_lda(int64_t K);
int64_t dsv4_gemm_i8_rows(int64_t M);
void dsv4_gemm_i8_prep_a(const int8_t *A, int64_t M, int64_t K, int8_t *Ap, int32_t *rowsum);
size_t dsv4_gemm_i8_work(int64_t K);
static inline void dsv4_gemm_i8(const struct dsv4_ops *o, const int8_t *Ap, const int32_t *rowsum,
                                int64_t M, int64_t K, const int8_t *B, int64_t ldb, int64_t n0,
                                int64_t nc, int32_t *C, int64_t ldc, void *work)
{
    o->gemm_i8(Ap, rowsum, M, K, B, ldb, n0, nc, C, ldc, work);
}

/* C[0:Mp, 0:nc] = A @ W[n0:n0+nc, :]^T for weights stored as rows W [N, K] (ldw = K).
 * Mp is a multiple of 4 (dsv4_gemm_i8_rows gives one). Exact. */
static inline void dsv4_gemm_i8_nt(const struct dsv4_ops *o, const int8_t *Ap,
                                   const int32_t *rowsum, int64_t Mp, int64_t K, const int8_t *W,
                                   int64_t ldw, int64_t n0, int64_t nc, int32_t *C, int64_t ldc)
{
    o->gemm_i8_nt(Ap, rowsum, Mp, K, W, ldw, n0, nc, C, ldc);
}

/* ---- CPU features and threads -------------------------------------------- */

enum dsv4_isa dsv4_best_isa(void);
int dsv4_isa_supported(enum dsv4_isa isa);
enum dsv4_isa dsv4_get_isa(void);
/* -1 (and nothing changes) for a value that is no ISA or one this CPU lacks */
int dsv4_set_isa(enum dsv4_isa isa);
const char *dsv4_isa_name(enum dsv4_isa isa);

int dsv4_num_threads(void);
void dsv4_set_num_threads(int n);
/* A kernel call's thread count and code path are fixed when it begins: between these
 * two, dsv4_num_threads(), dsv4_call_ops() and dsv4_get_isa() on the calling thread return
 * the values of that moment, whatever other threads set meanwhile. Worker threads of a
 * parallel region have no such snapshot: a kernel reads these before its parallel regions
 * and passes the values in. */
void dsv4_call_begin(void);
void dsv4_call_end(void);
const struct dsv4_ops *dsv4_call_ops(void);
/* Reads of the settings made inside a parallel region by a thread with no call snapshot
 * (see above): each is a read that another thread's set_isa()/set_num_threads() could
 * change mid-call. Counted for the tests; 0 unless a kernel breaks the rule. */
long dsv4_unpinned_reads(void);

static inline int64_t dsv4_round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
static inline void *dsv4_align_up(void *p, size_t a) { return (void *)(((uintptr_t)p + a - 1) & ~(uintptr_t)(a - 1)); }

/* Scratch carving: measured with base == NULL in prepare(), replayed in run(). */
struct dsv4_arena { char *base; size_t used; };
static inline void *dsv4_take(struct dsv4_arena *a, size_t bytes)
{
    size_t off = (a->used + 63) & ~(size_t)63;
    a->used = off + bytes;
    return a->base ? a->base + off : NULL;
}

#endif
