/* GEMM for the two operand kinds the kernels need.
 *
 *   bf16 x bf16 -> fp32: each C element is fmaf(a_k, b_k, c) over k = 0..K-1 in
 *     order. The product of two bf16 values is exact in fp32, so the fused and
 *     the unfused forms agree; FMA is used in every variant so that they agree
 *     even for products that underflow.
 *   int8 x int8 -> int32: exact, so every order gives the same bits.
 *
 * The caller splits the columns between threads; a call computes all M rows
 * (M a multiple of DSV4_GEMM_MR, padded with zero rows by the caller) for one
 * column slice. B is repacked into a panel of NR columns at a time, in `work`.
 */
#include <math.h>

#include "core/dsv4.h"
#include "core/gemm.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#endif

#define NR 32

/* ---- bf16 -------------------------------------------------------------- */

size_t dsv4_gemm_bf16_work(int64_t K) { return (size_t)K * NR * sizeof(float); }

/* B[:, n0:n0+nc] (nc <= NR) -> panel[k][0..NR) in fp32, zero-padded columns. */
static void pack_bf16(const bf16_t *B, int64_t ldb, int64_t K, int64_t n0, int64_t nc, float *P)
{
    for (int64_t k = 0; k < K; k++) {
        const bf16_t *row = B + k * ldb + n0;
        float *p = P + k * NR;
        for (int64_t j = 0; j < nc; j++)
            p[j] = dsv4_bf16_to_f32(row[j]);
        for (int64_t j = nc; j < NR; j++)
            p[j] = 0.0f;
    }
}

static void store_tile(const float *acc, int64_t mr, int64_t nc, float *C, int64_t ldc)
{
    for (int64_t r = 0; r < mr; r++)
        memcpy(C + r * ldc, acc + r * NR, (size_t)nc * sizeof(float));
}

static void gemm_bf16_scalar(const float *A, int64_t M, int64_t K, const float *P,
                             float *C, int64_t ldc, int64_t nc)
{
    float acc[DSV4_GEMM_MR * NR];
    for (int64_t m = 0; m < M; m += DSV4_GEMM_MR) {
        for (int r = 0; r < DSV4_GEMM_MR; r++)
            for (int j = 0; j < NR; j++) {
                float c = 0.0f;
                const float *a = A + (m + r) * K;
                for (int64_t k = 0; k < K; k++)
                    c = fmaf(a[k], P[k * NR + j], c);
                acc[r * NR + j] = c;
            }
        store_tile(acc, DSV4_GEMM_MR, nc, C + m * ldc, ldc);
    }
}

#if defined(__x86_64__)
AVX512 static void pack_bf16_avx512(const bf16_t *B, int64_t ldb, int64_t K, int64_t n0,
                                    int64_t nc, float *P)
{
    if (nc != NR) {
        pack_bf16(B, ldb, K, n0, nc, P);
        return;
    }
    for (int64_t k = 0; k < K; k++) {
        const bf16_t *row = B + k * ldb + n0;
        __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)row));
        __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(row + 16)));
        _mm512_store_ps(P + k * NR, _mm512_castsi512_ps(_mm512_slli_epi32(lo, 16)));
        _mm512_store_ps(P + k * NR + 16, _mm512_castsi512_ps(_mm512_slli_epi32(hi, 16)));
    }
}

AVX512 static void gemm_bf16_avx512(const float *A, int64_t M, int64_t K, const float *P,
                                    float *C, int64_t ldc, int64_t nc)
{
    float tile[DSV4_GEMM_MR * NR] __attribute__((aligned(64)));
    for (int64_t m = 0; m < M; m += DSV4_GEMM_MR) {
        __m512 c[DSV4_GEMM_MR][2];
        for (int r = 0; r < DSV4_GEMM_MR; r++)
            c[r][0] = c[r][1] = _mm512_setzero_ps();
        const float *a = A + m * K;
        for (int64_t k = 0; k < K; k++) {
            __m512 b0 = _mm512_load_ps(P + k * NR), b1 = _mm512_load_ps(P + k * NR + 16);
            for (int r = 0; r < DSV4_GEMM_MR; r++) {
                __m512 av = _mm512_set1_ps(a[r * K + k]);
                c[r][0] = _mm512_fmadd_ps(av, b0, c[r][0]);
                c[r][1] = _mm512_fmadd_ps(av, b1, c[r][1]);
            }
        }
        if (nc == NR) {
            for (int r = 0; r < DSV4_GEMM_MR; r++) {
                _mm512_storeu_ps(C + (m + r) * ldc, c[r][0]);
                _mm512_storeu_ps(C + (m + r) * ldc + 16, c[r][1]);
            }
        } else {
            for (int r = 0; r < DSV4_GEMM_MR; r++) {
                _mm512_store_ps(tile + r * NR, c[r][0]);
                _mm512_store_ps(tile + r * NR + 16, c[r][1]);
            }
            store_tile(tile, DSV4_GEMM_MR, nc, C + m * ldc, ldc);
        }
    }
}
#endif

void dsv4_gemm_f32_panel(const float *A, int64_t M, int64_t K, const float *P, float *C,
                         int64_t ldc, int64_t nc)
{
#if defined(__x86_64__)
    if (dsv4_get_isa() == DSV4_ISA_AVX512) {
        gemm_bf16_avx512(A, M, K, P, C, ldc, nc);
        return;
    }
#endif
    gemm_bf16_scalar(A, M, K, P, C, ldc, nc);
}

void dsv4_gemm_bf16(const float *A, int64_t M, int64_t K,
                    const bf16_t *B, int64_t ldb, int64_t n0, int64_t nc,
                    float *C, int64_t ldc, void *work)
{
    float *P = work;
    int avx = dsv4_get_isa() == DSV4_ISA_AVX512;
    for (int64_t j = 0; j < nc; j += NR) {
        int64_t w = nc - j < NR ? nc - j : NR;
#if defined(__x86_64__)
        if (avx) {
            pack_bf16_avx512(B, ldb, K, n0 + j, w, P);
            gemm_bf16_avx512(A, M, K, P, C + j, ldc, w);
            continue;
        }
#endif
        (void)avx;
        pack_bf16(B, ldb, K, n0 + j, w, P);
        gemm_bf16_scalar(A, M, K, P, C + j, ldc, w);
    }
}

/* ---- int8 -------------------------------------------------------------- */

/* VNNI multiplies unsigned by signed bytes: B is stored as b + 128 (unsigned)
 * and the product sum is corrected by 128 * rowsum(A), exactly, in int32. */

int64_t dsv4_gemm_i8_lda(int64_t K) { return dsv4_round_up(K, 4); }
int64_t dsv4_gemm_i8_rows(int64_t M) { return dsv4_round_up(M, DSV4_GEMM_MR); }
size_t dsv4_gemm_i8_work(int64_t K) { return (size_t)dsv4_gemm_i8_lda(K) * NR; }

void dsv4_gemm_i8_prep_a(const int8_t *A, int64_t M, int64_t K, int8_t *Ap, int32_t *rowsum)
{
    int64_t lda = dsv4_gemm_i8_lda(K), Mp = dsv4_gemm_i8_rows(M);
    for (int64_t m = 0; m < Mp; m++) {
        int32_t s = 0;
        for (int64_t k = 0; k < lda; k++) {
            int8_t v = m < M && k < K ? A[m * K + k] : 0;
            Ap[m * lda + k] = v;
            s += v;
        }
        rowsum[m] = s;
    }
}

static void gemm_i8_scalar(const int8_t *Ap, int64_t Mp, int64_t K, const int8_t *B,
                           int64_t ldb, int64_t n0, int64_t nc, int32_t *C, int64_t ldc)
{
    int64_t lda = dsv4_gemm_i8_lda(K);
    for (int64_t m = 0; m < Mp; m++)
        for (int64_t j = 0; j < nc; j++) {
            int32_t c = 0;
            for (int64_t k = 0; k < K; k++)
                c += (int32_t)Ap[m * lda + k] * (int32_t)B[k * ldb + n0 + j];
            C[m * ldc + j] = c;
        }
}

#if defined(__x86_64__)
/* Panel layout: for each group of 4 k, NR columns of 4 bytes (k0..k3), b + 128. */
AVX512 static void pack_i8(const int8_t *B, int64_t ldb, int64_t K, int64_t n0, int64_t nc,
                           uint8_t *P)
{
    int64_t KG = dsv4_gemm_i8_lda(K) / 4;
    const __m128i flip = _mm_set1_epi8((char)0x80);
    for (int64_t g = 0; g < KG; g++) {
        uint8_t *p = P + g * 4 * NR;
        if (nc == NR && 4 * g + 3 < K) {
            const int8_t *r0 = B + (4 * g) * ldb + n0;
            for (int h = 0; h < NR; h += 16) {
                __m128i x0 = _mm_loadu_si128((const __m128i *)(r0 + h));
                __m128i x1 = _mm_loadu_si128((const __m128i *)(r0 + ldb + h));
                __m128i x2 = _mm_loadu_si128((const __m128i *)(r0 + 2 * ldb + h));
                __m128i x3 = _mm_loadu_si128((const __m128i *)(r0 + 3 * ldb + h));
                __m128i l01 = _mm_unpacklo_epi8(x0, x1), h01 = _mm_unpackhi_epi8(x0, x1);
                __m128i l23 = _mm_unpacklo_epi8(x2, x3), h23 = _mm_unpackhi_epi8(x2, x3);
                __m128i *o = (__m128i *)(p + 4 * h);
                _mm_store_si128(o + 0, _mm_xor_si128(_mm_unpacklo_epi16(l01, l23), flip));
                _mm_store_si128(o + 1, _mm_xor_si128(_mm_unpackhi_epi16(l01, l23), flip));
                _mm_store_si128(o + 2, _mm_xor_si128(_mm_unpacklo_epi16(h01, h23), flip));
                _mm_store_si128(o + 3, _mm_xor_si128(_mm_unpackhi_epi16(h01, h23), flip));
            }
            continue;
        }
        for (int64_t j = 0; j < NR; j++)
            for (int64_t q = 0; q < 4; q++) {
                int64_t k = 4 * g + q;
                int8_t v = j < nc && k < K ? B[k * ldb + n0 + j] : 0;
                p[4 * j + q] = (uint8_t)(v + 128);
            }
    }
}

AVX512 static void gemm_i8_avx512(const int8_t *Ap, const int32_t *rowsum, int64_t Mp,
                                  int64_t K, const uint8_t *P, int32_t *C, int64_t ldc,
                                  int64_t nc)
{
    int64_t lda = dsv4_gemm_i8_lda(K), KG = lda / 4;
    int32_t tile[DSV4_GEMM_MR * NR] __attribute__((aligned(64)));
    for (int64_t m = 0; m < Mp; m += DSV4_GEMM_MR) {
        __m512i c[DSV4_GEMM_MR][2];
        for (int r = 0; r < DSV4_GEMM_MR; r++)
            c[r][0] = c[r][1] = _mm512_setzero_si512();
        const int8_t *a = Ap + m * lda;
        for (int64_t g = 0; g < KG; g++) {
            __m512i b0 = _mm512_load_si512(P + g * 4 * NR);
            __m512i b1 = _mm512_load_si512(P + g * 4 * NR + 64);
            for (int r = 0; r < DSV4_GEMM_MR; r++) {
                int32_t a4;
                memcpy(&a4, a + r * lda + 4 * g, 4);
                __m512i av = _mm512_set1_epi32(a4);
                c[r][0] = _mm512_dpbusd_epi32(c[r][0], b0, av);
                c[r][1] = _mm512_dpbusd_epi32(c[r][1], b1, av);
            }
        }
        for (int r = 0; r < DSV4_GEMM_MR; r++) {
            __m512i corr = _mm512_set1_epi32(128 * rowsum[m + r]);
            c[r][0] = _mm512_sub_epi32(c[r][0], corr);
            c[r][1] = _mm512_sub_epi32(c[r][1], corr);
            if (nc == NR) {
                _mm512_storeu_si512(C + (m + r) * ldc, c[r][0]);
                _mm512_storeu_si512(C + (m + r) * ldc + 16, c[r][1]);
            } else {
                _mm512_store_si512(tile + r * NR, c[r][0]);
                _mm512_store_si512(tile + r * NR + 16, c[r][1]);
                memcpy(C + (m + r) * ldc, tile + r * NR, (size_t)nc * sizeof(int32_t));
            }
        }
    }
}
#endif

void dsv4_gemm_i8(const int8_t *Ap, const int32_t *rowsum, int64_t Mp, int64_t K,
                  const int8_t *B, int64_t ldb, int64_t n0, int64_t nc,
                  int32_t *C, int64_t ldc, void *work)
{
#if defined(__x86_64__)
    if (dsv4_get_isa() == DSV4_ISA_AVX512) {
        for (int64_t j = 0; j < nc; j += NR) {
            int64_t w = nc - j < NR ? nc - j : NR;
            pack_i8(B, ldb, K, n0 + j, w, work);
            gemm_i8_avx512(Ap, rowsum, Mp, K, work, C + j, ldc, w);
        }
        return;
    }
#endif
    (void)rowsum; (void)work;
    gemm_i8_scalar(Ap, Mp, K, B, ldb, n0, nc, C, ldc);
}

/* ---- int8, weights as rows (W [N, K], row n = output column n) ----------------
 * The expert layout. C[m, n] = sum_k A[m, k] W[n, k], exact. The AVX-512 path
 * streams W rows 64 bytes at a time against four A rows, so W needs no packing. */

static void gemm_i8_nt_scalar(const int8_t *Ap, int64_t Mp, int64_t K, const int8_t *W,
                              int64_t ldw, int64_t n0, int64_t nc, int32_t *C, int64_t ldc)
{
    int64_t lda = dsv4_gemm_i8_lda(K);
    for (int64_t m = 0; m < Mp; m++)
        for (int64_t j = 0; j < nc; j++) {
            const int8_t *a = Ap + m * lda, *w = W + (n0 + j) * ldw;
            int32_t c = 0;
            for (int64_t k = 0; k < K; k++)
                c += (int32_t)a[k] * (int32_t)w[k];
            C[m * ldc + j] = c;
        }
}

#if defined(__x86_64__)
AVX512 static void gemm_i8_nt_avx512(const int8_t *Ap, const int32_t *rowsum, int64_t Mp,
                                     int64_t K, const int8_t *W, int64_t ldw, int64_t n0,
                                     int64_t nc, int32_t *C, int64_t ldc)
{
    int64_t lda = dsv4_gemm_i8_lda(K);
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    int64_t j = 0;
    for (; j + 4 <= nc; j += 4)
        for (int64_t m = 0; m < Mp; m += 4) {
            __m512i acc[4][4];
            for (int r = 0; r < 4; r++)
                for (int q = 0; q < 4; q++)
                    acc[r][q] = _mm512_setzero_si512();
            for (int64_t k = 0; k < K; k += 64) {
                __mmask64 mk = K - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (K - k)) - 1);
                __m512i w[4];
                for (int q = 0; q < 4; q++)   /* w + 128 as unsigned; masked bytes give 128 * 0 */
                    w[q] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, W + (n0 + j + q) * ldw + k), flip);
                for (int r = 0; r < 4; r++) {
                    __m512i a = _mm512_maskz_loadu_epi8(mk, Ap + (m + r) * lda + k);
                    for (int q = 0; q < 4; q++)
                        acc[r][q] = _mm512_dpbusd_epi32(acc[r][q], w[q], a);
                }
            }
            for (int r = 0; r < 4; r++)
                for (int q = 0; q < 4; q++)
                    C[(m + r) * ldc + j + q] = _mm512_reduce_add_epi32(acc[r][q]) - 128 * rowsum[m + r];
        }
    if (j < nc)
        gemm_i8_nt_scalar(Ap, Mp, K, W, ldw, n0 + j, nc - j, C + j, ldc);
}
#endif

void dsv4_gemm_i8_nt(const int8_t *Ap, const int32_t *rowsum, int64_t Mp, int64_t K,
                     const int8_t *W, int64_t ldw, int64_t n0, int64_t nc, int32_t *C, int64_t ldc)
{
#if defined(__x86_64__)
    if (dsv4_get_isa() == DSV4_ISA_AVX512) {
        gemm_i8_nt_avx512(Ap, rowsum, Mp, K, W, ldw, n0, nc, C, ldc);
        return;
    }
#endif
    (void)rowsum;
    gemm_i8_nt_scalar(Ap, Mp, K, W, ldw, n0, nc, C, ldc);
}


/* ---- out[T, N] = X[T, K] . W[N, K]^T for bf16 weights stored as rows ---------------
 * Few tokens: dot products, one per output, in the dsv4_dot_f32 lane order. From
 * DSV4_XWT_PANEL_MIN tokens on: the tokens are laid out as [K][32] panels and every group
 * of weight rows meets them in the register-blocked GEMM (sequential k). Both paths are
 * exact per product for bf16-valued X; each output comes from one thread. */

#include <omp.h>

#define XWT_ROWS 64

size_t dsv4_xwt_work(int64_t T, int64_t N, int64_t K, int nth)
{
    if (T < DSV4_XWT_PANEL_MIN)
        return 0;
    int64_t nb = (T + DSV4_PANEL - 1) / DSV4_PANEL;
    return ((size_t)nb * K * DSV4_PANEL + (size_t)nth * (XWT_ROWS * K + XWT_ROWS * DSV4_PANEL)) *
           sizeof(float);
}

void dsv4_xwt(const float *X, int64_t ldx, int64_t T, const bf16_t *W, int64_t ldw, int64_t N,
              int64_t K, float *out, int64_t ldo, void *work, int nth)
{
    const int64_t units = (N + XWT_ROWS - 1) / XWT_ROWS;
    if (T < DSV4_XWT_PANEL_MIN) {
        #pragma omp parallel for schedule(static) num_threads(nth)
        for (int64_t u = 0; u < units; u++) {
            int64_t r0 = u * XWT_ROWS, nr = N - r0 < XWT_ROWS ? N - r0 : XWT_ROWS;
            dsv4_dot_fma_grid(X, ldx, T, NULL, W + r0 * ldw, ldw, nr, K, out + r0, ldo);
        }
        return;
    }
    const int64_t nb = (T + DSV4_PANEL - 1) / DSV4_PANEL;
    float *panels = work, *thr = panels + (size_t)nb * K * DSV4_PANEL;
    #pragma omp parallel num_threads(nth)
    {
        const int ith = omp_get_thread_num(), nt = omp_get_num_threads();
        for (int64_t b = ith; b < nb; b += nt) {
            float *P = panels + (size_t)b * K * DSV4_PANEL;
            for (int64_t j = 0; j < DSV4_PANEL; j++) {
                int64_t t = b * DSV4_PANEL + j;
                for (int64_t k = 0; k < K; k++)
                    P[k * DSV4_PANEL + j] = t < T ? X[t * ldx + k] : 0.0f;
            }
        }
        #pragma omp barrier
        float *wf = thr + (size_t)ith * (XWT_ROWS * K + XWT_ROWS * DSV4_PANEL);
        float *ct = wf + XWT_ROWS * K;
        for (int64_t u = ith; u < units; u += nt) {
            int64_t r0 = u * XWT_ROWS, nr = N - r0 < XWT_ROWS ? N - r0 : XWT_ROWS;
            int64_t mr = dsv4_round_up(nr, DSV4_GEMM_MR);
            for (int64_t r = 0; r < nr; r++)
                dsv4_bf16_row_to_f32(W + (r0 + r) * ldw, K, wf + r * K);
            memset(wf + nr * K, 0, (size_t)(mr - nr) * K * sizeof(float));
            for (int64_t b = 0; b < nb; b++) {
                int64_t t0 = b * DSV4_PANEL, nc = T - t0 < DSV4_PANEL ? T - t0 : DSV4_PANEL;
                dsv4_gemm_f32_panel(wf, mr, K, panels + (size_t)b * K * DSV4_PANEL, ct, DSV4_PANEL, nc);
                for (int64_t r = 0; r < nr; r++)
                    for (int64_t j = 0; j < nc; j++)
                        out[(t0 + j) * ldo + r0 + r] = ct[r * DSV4_PANEL + j];
            }
        }
    }
}
