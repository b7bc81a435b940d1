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

#include "core/avx2.h"
#include "core/avx512.h"
#include "core/dsv4.h"
#include "core/gemm.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#endif

#define NR 32

/* A walk over the lines of `rows` rows (lpr lines each, ld bytes apart) that prefetches a
 * few lines per step into L2, so that the next operand arrives while this one computes. */
struct pf_cursor {
    const char *base;
    int64_t ld, rows, lpr, row, line;
};

static inline void pf_step(struct pf_cursor *c, int64_t n)
{
    for (; n > 0 && c->row < c->rows; n--) {
        __builtin_prefetch(c->base + c->row * c->ld + c->line * 64, 0, 2);
        if (++c->line == c->lpr) {
            c->line = 0;
            c->row++;
        }
    }
}

#if defined(__x86_64__)
/* Transpose 16 x 16 dwords: out row q (stride ldo bytes) = column q of the 16 rows of in
 * (stride ldi bytes); rows n >= nrows read as zero. */
AVX512 static void tr16_dw(const void *in, int64_t ldi, int64_t nrows, void *out, int64_t ldo)
{
    __m512i r[16];
    for (int n = 0; n < 16; n++)
        r[n] = n < nrows ? _mm512_loadu_si512((const char *)in + n * ldi) : _mm512_setzero_si512();
    dsv4_transpose16(r, out, ldo);
}
#endif

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

/* One row of a tile: c[j] = sum over k in order of a[k] * P[k][j], j < NR, the columns in the
 * lanes. fused = 0 rounds each product on its own: the same bits when the products are exact
 * (dsv4_unfused_try), and SSE2 vectorises it. */
static inline __attribute__((always_inline)) void gemm_bf16_row(const float *a, int64_t K,
                                                              const float *P, float *c,
                                                              const int fused)
{
    float acc[NR] = {0};
    for (int64_t k = 0; k < K; k++) {
        const float ak = a[k], *p = P + k * NR;
        for (int j = 0; j < NR; j++)
            acc[j] = fused ? fmaf(ak, p[j], acc[j]) : acc[j] + ak * p[j];
    }
    memcpy(c, acc, sizeof acc);
}

static inline __attribute__((always_inline)) void gemm_bf16_tiles(
    const float *A, int64_t M, int64_t K, const float *P, float *C, int64_t ldc, int64_t nc,
    const int fused)
{
    float acc[DSV4_GEMM_MR * NR];
    for (int64_t m = 0; m < M; m += DSV4_GEMM_MR) {
        for (int r = 0; r < DSV4_GEMM_MR; r++)
            gemm_bf16_row(A + (m + r) * K, K, P, acc + r * NR, fused);
        store_tile(acc, DSV4_GEMM_MR, nc, C + m * ldc, ldc);
    }
}

/* P holds bf16 values (pack_bf16); lowa is dsv4_low16 of A */
static void gemm_bf16_scalar(const float *A, int64_t M, int64_t K, const float *P,
                             float *C, int64_t ldc, int64_t nc, uint32_t lowa)
{
    if (dsv4_unfused_try(lowa)) {
        gemm_bf16_tiles(A, M, K, P, C, ldc, nc, 0);
        if (dsv4_unfused_exact())
            return;
    }
    gemm_bf16_tiles(A, M, K, P, C, ldc, nc, 1);
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

#if defined(__x86_64__)
DSV4_AVX2 static void pack_bf16_avx2(const bf16_t *B, int64_t ldb, int64_t K, int64_t n0,
                                     int64_t nc, float *P)
{
    if (nc != NR) {
        pack_bf16(B, ldb, K, n0, nc, P);
        return;
    }
    for (int64_t k = 0; k < K; k++)
        for (int h = 0; h < NR; h += 8)
            _mm256_store_ps(P + k * NR + h, dsv4_load_bf16x8(B + k * ldb + n0 + h));
}

/* 4 rows by 16 columns per register block (8 accumulators); two blocks per panel */
DSV4_AVX2 static void gemm_bf16_avx2(const float *A, int64_t M, int64_t K, const float *P,
                                     float *C, int64_t ldc, int64_t nc)
{
    float tile[4 * 16] __attribute__((aligned(32)));
    for (int64_t m = 0; m < M; m += 4)
        for (int64_t j = 0; j < nc; j += 16) {
            __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00,
                   c21 = c00, c30 = c00, c31 = c00;
            const float *a = A + m * K, *b = P + j;
            for (int64_t k = 0; k < K; k++) {
                __m256 b0 = _mm256_load_ps(b + k * NR), b1 = _mm256_load_ps(b + k * NR + 8);
                __m256 av = _mm256_set1_ps(a[k]);
                c00 = _mm256_fmadd_ps(av, b0, c00);
                c01 = _mm256_fmadd_ps(av, b1, c01);
                av = _mm256_set1_ps(a[K + k]);
                c10 = _mm256_fmadd_ps(av, b0, c10);
                c11 = _mm256_fmadd_ps(av, b1, c11);
                av = _mm256_set1_ps(a[2 * K + k]);
                c20 = _mm256_fmadd_ps(av, b0, c20);
                c21 = _mm256_fmadd_ps(av, b1, c21);
                av = _mm256_set1_ps(a[3 * K + k]);
                c30 = _mm256_fmadd_ps(av, b0, c30);
                c31 = _mm256_fmadd_ps(av, b1, c31);
            }
            _mm256_store_ps(tile, c00);
            _mm256_store_ps(tile + 8, c01);
            _mm256_store_ps(tile + 16, c10);
            _mm256_store_ps(tile + 24, c11);
            _mm256_store_ps(tile + 32, c20);
            _mm256_store_ps(tile + 40, c21);
            _mm256_store_ps(tile + 48, c30);
            _mm256_store_ps(tile + 56, c31);
            int64_t w = nc - j < 16 ? nc - j : 16;
            for (int r = 0; r < 4; r++)
                memcpy(C + (m + r) * ldc + j, tile + r * 16, (size_t)w * sizeof(float));
        }
}
#endif

/* dsv4_gemm_bf16 of each ISA: NR columns at a time, packed into the panel `work` */
static void gemm_bf16_panels_scalar(const float *A, int64_t M, int64_t K, const bf16_t *B,
                                    int64_t ldb, int64_t n0, int64_t nc, float *C, int64_t ldc,
                                    void *work)
{
    const uint32_t lowa = dsv4_low16(A, M, K, K);
    for (int64_t j = 0; j < nc; j += NR) {
        int64_t w = nc - j < NR ? nc - j : NR;
        pack_bf16(B, ldb, K, n0 + j, w, work);
        gemm_bf16_scalar(A, M, K, work, C + j, ldc, w, lowa);
    }
}

#if defined(__x86_64__)
static void gemm_bf16_panels_avx512(const float *A, int64_t M, int64_t K, const bf16_t *B,
                                    int64_t ldb, int64_t n0, int64_t nc, float *C, int64_t ldc,
                                    void *work)
{
    for (int64_t j = 0; j < nc; j += NR) {
        int64_t w = nc - j < NR ? nc - j : NR;
        pack_bf16_avx512(B, ldb, K, n0 + j, w, work);
        gemm_bf16_avx512(A, M, K, work, C + j, ldc, w);
    }
}

static void gemm_bf16_panels_avx2(const float *A, int64_t M, int64_t K, const bf16_t *B,
                                  int64_t ldb, int64_t n0, int64_t nc, float *C, int64_t ldc,
                                  void *work)
{
    for (int64_t j = 0; j < nc; j += NR) {
        int64_t w = nc - j < NR ? nc - j : NR;
        pack_bf16_avx2(B, ldb, K, n0 + j, w, work);
        gemm_bf16_avx2(A, M, K, work, C + j, ldc, w);
    }
}
#endif

/* ---- int8 -------------------------------------------------------------- */

/* VNNI multiplies unsigned by signed bytes: B is stored as b + 128 (unsigned)
 * and the product sum is corrected by 128 * rowsum(A), exactly, in int32. */

int64_t dsv4_gemm_i8_lda(int64_t K) { return dsv4_round_up(K, 4); }
int64_t dsv4_gemm_i8_rows(int64_t M) { return dsv4_round_up(M, DSV4_GEMM_MR); }
/* int16 copies: the AVX2 panel (NR columns of B), the scalar path's NR columns of B and
 * two rows of A */
size_t dsv4_gemm_i8_work(int64_t K) { return (size_t)dsv4_gemm_i8_lda(K) * (NR + 2) * sizeof(int16_t); }

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

/* s = the four sums a_r . b_c over k < n, r, c in {0, 1}: int16 lanes, which SSE2 multiplies
 * and adds in pairs of k */
static inline void dot2x2_i16(const int16_t *a0, const int16_t *a1, const int16_t *b0,
                              const int16_t *b1, int64_t n, int32_t s[4])
{
    int32_t s00 = 0, s01 = 0, s10 = 0, s11 = 0;
    for (int64_t k = 0; k < n; k++) {
        int32_t x0 = a0[k], x1 = a1[k], y0 = b0[k], y1 = b1[k];
        s00 += x0 * y0;
        s01 += x0 * y1;
        s10 += x1 * y0;
        s11 += x1 * y1;
    }
    s[0] = s00; s[1] = s01; s[2] = s10; s[3] = s11;
}

/* Exact in int32, so any order: NR columns of B at a time copied to int16 [NR][lda] (column
 * after column, zero-padded), two rows of A to int16, and each pair of rows meets each pair
 * of columns in one dot2x2_i16. */
static void gemm_i8_scalar(const int8_t *Ap, int64_t Mp, int64_t K, const int8_t *B,
                           int64_t ldb, int64_t n0, int64_t nc, int32_t *C, int64_t ldc,
                           int16_t *work)
{
    const int64_t lda = dsv4_gemm_i8_lda(K);
    int16_t *bt = work, *a16 = work + NR * lda;
    for (int64_t j0 = 0; j0 < nc; j0 += NR) {
        const int64_t w = nc - j0 < NR ? nc - j0 : NR;
        memset(bt, 0, (size_t)(NR * lda) * sizeof(int16_t));
        for (int64_t k0 = 0; k0 < K; k0 += 16)      /* 16 x w tiles: few lines in flight */
            for (int64_t j = 0; j < w; j++)
                for (int64_t k = k0; k < K && k < k0 + 16; k++)
                    bt[j * lda + k] = B[k * ldb + n0 + j0 + j];
        for (int64_t m = 0; m < Mp; m += 2) {      /* Mp is a multiple of DSV4_GEMM_MR */
            for (int64_t k = 0; k < 2 * lda; k++)
                a16[k] = Ap[m * lda + k];
            for (int64_t j = 0; j < w; j += 2) {
                int32_t s[4];
                dot2x2_i16(a16, a16 + lda, bt + j * lda, bt + (j + 1) * lda, lda, s);
                C[m * ldc + j0 + j] = s[0];
                C[(m + 1) * ldc + j0 + j] = s[2];
                if (j + 1 < w) {
                    C[m * ldc + j0 + j + 1] = s[1];
                    C[(m + 1) * ldc + j0 + j + 1] = s[3];
                }
            }
        }
    }
}

#if defined(__x86_64__)
/* Panel layout: for each group of 4 k, NR columns of 4 bytes (k0..k3), b ^ flip (0x80 for
 * VNNI's unsigned operand: b + 128). */
DSV4_AVX2 static void pack_i8(const int8_t *B, int64_t ldb, int64_t K, int64_t n0, int64_t nc,
                              uint8_t *P, uint8_t flipb)
{
    int64_t KG = dsv4_gemm_i8_lda(K) / 4;
    const __m128i flip = _mm_set1_epi8((char)flipb);
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
                p[4 * j + q] = (uint8_t)v ^ flipb;
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

#if defined(__x86_64__)
/* int8 without VNNI: vpmaddwd on sign-extended int16 is exact (two products of at most 2^14
 * and their sum fit int32). The panel is pack_i8's layout in int16: for each group of 4 k,
 * NR columns of 4 values; one vector holds 4 columns x 4 k and madd
 * leaves per column the sums of k0,k1 and of k2,k3 side by side. */
#define I8_KC 256

/* 16 bytes at p sign-extended, zero past n bytes, without reading past them */
DSV4_AVX2 static inline __m256i i8x16_part(const int8_t *p, int64_t n)
{
    if (n >= 16)
        return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
    int8_t t[16] = {0};
    memcpy(t, p, (size_t)n);
    return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)t));
}

DSV4_AVX2 static inline int32_t hsum_i32x8(__m256i v)
{
    __m128i x = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0x4e));
    x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0xb1));
    return _mm_cvtsi128_si32(x);
}

DSV4_AVX2 static void pack_i8_x16(const int8_t *B, int64_t ldb, int64_t K, int64_t n0, int64_t nc,
                                  int16_t *P)
{
    const int64_t KG = dsv4_gemm_i8_lda(K) / 4;
    for (int64_t g = 0; g < KG; g++) {
        int16_t *p = P + g * 4 * NR;
        if (nc == NR && 4 * g + 3 < K) {
            const int8_t *r0 = B + (4 * g) * ldb + n0;
            for (int h = 0; h < NR; h += 8) {
                __m128i x0 = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)(r0 + h)));
                __m128i x1 = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)(r0 + ldb + h)));
                __m128i x2 = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)(r0 + 2 * ldb + h)));
                __m128i x3 = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)(r0 + 3 * ldb + h)));
                __m128i l01 = _mm_unpacklo_epi16(x0, x1), h01 = _mm_unpackhi_epi16(x0, x1);
                __m128i l23 = _mm_unpacklo_epi16(x2, x3), h23 = _mm_unpackhi_epi16(x2, x3);
                __m128i *o = (__m128i *)(p + 4 * h);
                _mm_store_si128(o + 0, _mm_unpacklo_epi32(l01, l23));
                _mm_store_si128(o + 1, _mm_unpackhi_epi32(l01, l23));
                _mm_store_si128(o + 2, _mm_unpacklo_epi32(h01, h23));
                _mm_store_si128(o + 3, _mm_unpackhi_epi32(h01, h23));
            }
            continue;
        }
        for (int64_t j = 0; j < NR; j++)
            for (int64_t q = 0; q < 4; q++) {
                int64_t k = 4 * g + q;
                p[4 * j + q] = j < nc && k < K ? B[k * ldb + n0 + j] : 0;
            }
    }
}

/* two vectors of (column, k-pair) sums, columns 0-3 and 4-7 -> the 8 column sums in order */
DSV4_AVX2 static inline __m256i i8_fold(__m256i x, __m256i y)
{
    /* hadd: [x c0 c1 y c4 c5 | x c2 c3 y c6 c7] for x = cols 0-3, y = cols 4-7 */
    return _mm256_permute4x64_epi64(_mm256_hadd_epi32(x, y), 0xd8);
}

/* 4 rows by 8 columns per register block; A's rows are sign-extended a k-block at a time */
DSV4_AVX2 static void gemm_i8_avx2(const int8_t *Ap, int64_t Mp, int64_t K, const int16_t *P,
                                   int32_t *C, int64_t ldc, int64_t nc)
{
    const int64_t lda = dsv4_gemm_i8_lda(K), KG = lda / 4;
    int16_t as[4][I8_KC] __attribute__((aligned(32)));
    int32_t tile[4][8] __attribute__((aligned(32)));
    for (int64_t m = 0; m < Mp; m += 4)
        for (int64_t j = 0; j < nc; j += 8) {
            __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00,
                    c21 = c00, c30 = c00, c31 = c00;
            for (int64_t g0 = 0; g0 < KG; g0 += I8_KC / 4) {
                const int64_t gn = KG - g0 < I8_KC / 4 ? KG - g0 : I8_KC / 4;
                for (int r = 0; r < 4; r++)
                    for (int64_t k = 0; k < 4 * gn; k += 16)
                        _mm256_store_si256((__m256i *)(as[r] + k),
                                           i8x16_part(Ap + (m + r) * lda + 4 * g0 + k, 4 * gn - k));
                for (int64_t g = 0; g < gn; g++) {
                    const int16_t *b = P + (g0 + g) * 4 * NR + 4 * j;
                    __m256i b0 = _mm256_load_si256((const __m256i *)b);
                    __m256i b1 = _mm256_load_si256((const __m256i *)(b + 16));
                    __m256i a;
                    int64_t a4;
                    memcpy(&a4, as[0] + 4 * g, 8);
                    a = _mm256_set1_epi64x(a4);
                    c00 = _mm256_add_epi32(c00, _mm256_madd_epi16(a, b0));
                    c01 = _mm256_add_epi32(c01, _mm256_madd_epi16(a, b1));
                    memcpy(&a4, as[1] + 4 * g, 8);
                    a = _mm256_set1_epi64x(a4);
                    c10 = _mm256_add_epi32(c10, _mm256_madd_epi16(a, b0));
                    c11 = _mm256_add_epi32(c11, _mm256_madd_epi16(a, b1));
                    memcpy(&a4, as[2] + 4 * g, 8);
                    a = _mm256_set1_epi64x(a4);
                    c20 = _mm256_add_epi32(c20, _mm256_madd_epi16(a, b0));
                    c21 = _mm256_add_epi32(c21, _mm256_madd_epi16(a, b1));
                    memcpy(&a4, as[3] + 4 * g, 8);
                    a = _mm256_set1_epi64x(a4);
                    c30 = _mm256_add_epi32(c30, _mm256_madd_epi16(a, b0));
                    c31 = _mm256_add_epi32(c31, _mm256_madd_epi16(a, b1));
                }
            }
            _mm256_store_si256((__m256i *)tile[0], i8_fold(c00, c01));
            _mm256_store_si256((__m256i *)tile[1], i8_fold(c10, c11));
            _mm256_store_si256((__m256i *)tile[2], i8_fold(c20, c21));
            _mm256_store_si256((__m256i *)tile[3], i8_fold(c30, c31));
            int64_t w = nc - j < 8 ? nc - j : 8;
            for (int r = 0; r < 4; r++)
                memcpy(C + (m + r) * ldc + j, tile[r], (size_t)w * sizeof(int32_t));
        }
}
#endif

/* ---- int8, weights as rows (W [N, K], row n = output column n) ----------------
 * The expert layout. C[m, n] = sum_k A[m, k] W[n, k], exact. The AVX-512 path
 * streams W rows 64 bytes at a time against four A rows, so W needs no packing. */

/* Exact: two rows of A against two rows of W per dot2x2_i16, over blocks of k copied to
 * int16 on the stack */
#define NT_KB 512
static void gemm_i8_nt_scalar(const int8_t *Ap, int64_t Mp, int64_t K, const int8_t *W,
                              int64_t ldw, int64_t n0, int64_t nc, int32_t *C, int64_t ldc)
{
    const int64_t lda = dsv4_gemm_i8_lda(K);
    int16_t a16[2 * NT_KB], w16[2 * NT_KB];
    for (int64_t m = 0; m < Mp; m += 2) {        /* Mp is a multiple of 4 */
        for (int64_t j = 0; j < nc; j++)
            C[m * ldc + j] = C[(m + 1) * ldc + j] = 0;
        for (int64_t k0 = 0; k0 < K; k0 += NT_KB) {
            const int64_t kn = K - k0 < NT_KB ? K - k0 : NT_KB;
            for (int64_t k = 0; k < kn; k++) {
                a16[k] = Ap[m * lda + k0 + k];
                a16[NT_KB + k] = Ap[(m + 1) * lda + k0 + k];
            }
            for (int64_t j = 0; j < nc; j += 2) {
                const int8_t *w0 = W + (n0 + j) * ldw + k0, *w1 = w0 + ldw;
                const int two = j + 1 < nc;
                for (int64_t k = 0; k < kn; k++) {
                    w16[k] = w0[k];
                    w16[NT_KB + k] = two ? w1[k] : 0;
                }
                int32_t s[4];
                dot2x2_i16(a16, a16 + NT_KB, w16, w16 + NT_KB, kn, s);
                C[m * ldc + j] += s[0];
                C[(m + 1) * ldc + j] += s[2];
                if (two) {
                    C[m * ldc + j + 1] += s[1];
                    C[(m + 1) * ldc + j + 1] += s[3];
                }
            }
        }
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

#if defined(__x86_64__)
/* 2 A rows by 4 W rows, 16 k at a time through vpmaddwd (exact). The four W rows are
 * sign-extended once per k-block and meet every A row from there; the int32 sums of the
 * k-blocks add up in C, exactly. */
#define NT_KC 1024

DSV4_AVX2 static void gemm_i8_nt_avx2(const int8_t *Ap, int64_t Mp, int64_t K, const int8_t *W,
                                      int64_t ldw, int64_t n0, int64_t nc, int32_t *C, int64_t ldc)
{
    const int64_t lda = dsv4_gemm_i8_lda(K);
    int16_t wx[4][NT_KC] __attribute__((aligned(32)));
    int64_t j = 0;
    for (; j + 4 <= nc; j += 4)
        for (int64_t k0 = 0; k0 < K; k0 += NT_KC) {
            const int64_t kn = K - k0 < NT_KC ? K - k0 : NT_KC;
            for (int q = 0; q < 4; q++)
                for (int64_t k = 0; k < kn; k += 16)
                    _mm256_store_si256((__m256i *)(wx[q] + k),
                                       i8x16_part(W + (n0 + j + q) * ldw + k0 + k, kn - k));
            for (int64_t m = 0; m < Mp; m += 2) {
                __m256i c00 = _mm256_setzero_si256(), c01 = c00, c02 = c00, c03 = c00, c10 = c00,
                        c11 = c00, c12 = c00, c13 = c00;
                const int8_t *a0 = Ap + m * lda + k0, *a1 = a0 + lda;
                for (int64_t k = 0; k < kn; k += 16) {
                    __m256i x0 = _mm256_load_si256((const __m256i *)(wx[0] + k));
                    __m256i x1 = _mm256_load_si256((const __m256i *)(wx[1] + k));
                    __m256i x2 = _mm256_load_si256((const __m256i *)(wx[2] + k));
                    __m256i x3 = _mm256_load_si256((const __m256i *)(wx[3] + k));
                    __m256i a = i8x16_part(a0 + k, kn - k);
                    c00 = _mm256_add_epi32(c00, _mm256_madd_epi16(a, x0));
                    c01 = _mm256_add_epi32(c01, _mm256_madd_epi16(a, x1));
                    c02 = _mm256_add_epi32(c02, _mm256_madd_epi16(a, x2));
                    c03 = _mm256_add_epi32(c03, _mm256_madd_epi16(a, x3));
                    a = i8x16_part(a1 + k, kn - k);
                    c10 = _mm256_add_epi32(c10, _mm256_madd_epi16(a, x0));
                    c11 = _mm256_add_epi32(c11, _mm256_madd_epi16(a, x1));
                    c12 = _mm256_add_epi32(c12, _mm256_madd_epi16(a, x2));
                    c13 = _mm256_add_epi32(c13, _mm256_madd_epi16(a, x3));
                }
                int32_t *c = C + m * ldc + j;
                const int32_t s[8] = {hsum_i32x8(c00), hsum_i32x8(c01), hsum_i32x8(c02),
                                      hsum_i32x8(c03), hsum_i32x8(c10), hsum_i32x8(c11),
                                      hsum_i32x8(c12), hsum_i32x8(c13)};
                for (int q = 0; q < 4; q++) {
                    c[q] = k0 ? c[q] + s[q] : s[q];
                    c[ldc + q] = k0 ? c[ldc + q] + s[4 + q] : s[4 + q];
                }
            }
        }
    if (j < nc)
        gemm_i8_nt_scalar(Ap, Mp, K, W, ldw, n0 + j, nc - j, C + j, ldc);
}
#endif

#if defined(__x86_64__)
/* ---- int8 on AMX tiles ----------------------------------------------------------
 * TDPBSSD is int8 x int8 -> int32 exact, so these give the bits of every other path.
 * Tiles 0-3 hold C (mr rows x 16 int32), 4-5 A (mr rows x 64 k), 6-7 B (16 k-quads x
 * 16 columns x 4 k). A is read in place; B is transposed to that k-quad layout. */
#define AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8")))

struct amx_cfg {
    uint8_t palette, start;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};



/* tiles 0-3 hold C and 4 .. 3 + na hold A, mr rows each; the rest B, 16 rows */
AMX static void amx_rows(int mr, int na)
{
    struct amx_cfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.rows[t] = (uint8_t)(t < 4 + na ? mr : 16);
        c.colsb[t] = 64;
    }
    _tile_loadconfig(&c);
}

/* C rows [m, m + mr), columns [j, j + w) from tile t (w < 16 goes through a buffer) */
#define AMX_STORE(t, C, ldc, m, j, w, mr)                                                     \
    do {                                                                                    \
        if ((w) == 16) {                                                                    \
            _tile_stored(t, (C) + (m) * (ldc) + (j), (ldc) * 4);                            \
        } else if ((w) > 0) {                                                               \
            int32_t ct_[16 * 16] __attribute__((aligned(64)));                              \
            _tile_stored(t, ct_, 64);                                                       \
            for (int r_ = 0; r_ < (mr); r_++)                                               \
                memcpy((C) + ((m) + r_) * (ldc) + (j), ct_ + r_ * 16, (size_t)(w) * 4);     \
        }                                                                                   \
    } while (0)

/* tile t = C rows [m, m + mr), columns [j, j + w), zero beyond w */
#define AMX_LOAD(t, C, ldc, m, j, w, mr)                                                      \
    do {                                                                                    \
        if ((w) == 16) {                                                                    \
            _tile_loadd(t, (C) + (m) * (ldc) + (j), (ldc) * 4);                             \
        } else {                                                                            \
            int32_t ct_[16 * 16] __attribute__((aligned(64))) = {0};                        \
            for (int r_ = 0; r_ < (mr); r_++)                                               \
                memcpy(ct_ + r_ * 16, (C) + ((m) + r_) * (ldc) + (j), (size_t)(w) * 4);     \
            _tile_loadd(t, ct_, 64);                                                        \
        }                                                                                   \
    } while (0)

/* C[0:Mp, 0:w0 + w1] (+)= A . [B0 B1]: the B tile of the 64 k from k sits at bp + (k/64) * csp,
 * its 16 rows brow bytes apart (a zero tile may stand in, with csp = 0) */
AMX static void amx_gemm_i8(const int8_t *Ap, int64_t lda, int64_t Mp, int64_t K,
                            const int8_t *b0, const int8_t *b1, int64_t cs0, int64_t cs1,
                            int64_t brow, int64_t w0, int64_t w1, int32_t *C, int64_t ldc, int *mr,
                            int acc)
{
    for (int64_t m = 0; m < Mp;) {
        int64_t rem = Mp - m;
        int rows = rem >= 16 ? 16 : 8, two = rem >= 32;
        if (rows != *mr) {
            *mr = rows;
            amx_rows(rows, 2);
        }
        if (acc) {
            AMX_LOAD(0, C, ldc, m, 0, w0, rows);
            AMX_LOAD(1, C, ldc, m, 16, w1, rows);
            if (two) {
                AMX_LOAD(2, C, ldc, m + 16, 0, w0, rows);
                AMX_LOAD(3, C, ldc, m + 16, 16, w1, rows);
            }
        } else {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
        }
        for (int64_t k = 0; k < K; k += 64) {
            _tile_loadd(4, Ap + m * lda + k, lda);
            _tile_loadd(6, b0 + (k / 64) * cs0, brow);
            _tile_loadd(7, b1 + (k / 64) * cs1, brow);
            _tile_dpbssd(0, 4, 6);
            _tile_dpbssd(1, 4, 7);
            if (two) {
                _tile_loadd(5, Ap + (m + 16) * lda + k, lda);
                _tile_dpbssd(2, 5, 6);
                _tile_dpbssd(3, 5, 7);
            }
        }
        AMX_STORE(0, C, ldc, m, 0, w0, rows);
        AMX_STORE(1, C, ldc, m, 16, w1, rows);
        if (two) {
            AMX_STORE(2, C, ldc, m + 16, 0, w0, rows);
            AMX_STORE(3, C, ldc, m + 16, 16, w1, rows);
        }
        m += two ? 32 : rows;
    }
}

/* W rows [n0, n0 + nc) of length K, four column tiles at a time. For each k-block of
 * AMX_NT_KB the four B tiles per 64 k are built once (32 KB, kept in L1) and every m-tile of
 * A meets them: A is read from L2 once per four products. The int32 sums of a k-block go
 * through C, exactly. Tiles: 0-3 C, 4 A, 5-7 B (5 twice). */
#define AMX_NT_KB 512

AMX static void gemm_i8_nt_amx(const int8_t *Ap, int64_t Mp, int64_t K, const int8_t *W,
                               int64_t ldw, int64_t n0, int64_t nc, int32_t *C, int64_t ldc)
{
    int8_t bt[4][AMX_NT_KB / 64][1024] __attribute__((aligned(64)));
    int mr = 0;
    for (int64_t j = 0; j < nc; j += 64) {
        int64_t w[4], nt = 0;
        for (int t = 0; t < 4; t++) {
            int64_t r = nc - j - 16 * t;
            w[t] = r <= 0 ? 0 : r < 16 ? r : 16;
            nt += w[t] > 0;
        }
        for (int64_t k0 = 0; k0 < K; k0 += AMX_NT_KB) {
            int64_t kn = K - k0 < AMX_NT_KB ? K - k0 : AMX_NT_KB;
            for (int t = 0; t < nt; t++)
                for (int64_t k = 0; k < kn; k += 64)
                    tr16_dw(W + (n0 + j + 16 * t) * ldw + k0 + k, ldw, w[t], bt[t][k / 64], 64);
            /* the next k-block (or the next column quad) streams in meanwhile */
            int64_t pk = k0 + kn < K ? k0 + kn : 0, pj = k0 + kn < K ? j : j + 64;
            int64_t prows = nc - pj < 0 ? 0 : nc - pj < 64 ? nc - pj : 64;
            int64_t plen = K - pk < AMX_NT_KB ? K - pk : AMX_NT_KB;
            if (!prows && ldw >= 2 * K) {
                /* the last block: when the rows are wider than K the caller is likely to
                 * read their next K columns next (a grouped projection); bring in their start */
                pj = 0;
                pk = K;
                prows = nc;
                plen = K < AMX_NT_KB ? K : AMX_NT_KB;
            }
            struct pf_cursor pf = {(const char *)(W + (n0 + pj) * ldw + pk), ldw, prows,
                                   (plen + 63) / 64, 0, 0};
            const int64_t iters = (Mp + 15) / 16, per = (prows * pf.lpr + iters - 1) / iters;
            for (int64_t m = 0; m < Mp;) {
                int rows = Mp - m >= 16 ? 16 : 8;
                if (rows != mr) {
                    mr = rows;
                    amx_rows(rows, 1);
                }
                if (k0) {
                    AMX_LOAD(0, C, ldc, m, j, w[0], rows);
                    if (nt > 1) AMX_LOAD(1, C, ldc, m, j + 16, w[1], rows);
                    if (nt > 2) AMX_LOAD(2, C, ldc, m, j + 32, w[2], rows);
                    if (nt > 3) AMX_LOAD(3, C, ldc, m, j + 48, w[3], rows);
                } else {
                    _tile_zero(0);
                    _tile_zero(1);
                    _tile_zero(2);
                    _tile_zero(3);
                }
                pf_step(&pf, per);
                for (int64_t k = 0; k < kn; k += 64) {
                    /* the next A tile into L1, so that its load does not wait on L2 */
                    const int8_t *na = k + 64 < kn ? Ap + m * K + k0 + k + 64 : Ap + (m + rows) * K + k0;
                    if (k + 64 < kn || m + rows < Mp)
                        for (int r = 0; r < 16; r++)
                            __builtin_prefetch(na + r * K, 0, 3);
                    _tile_loadd(4, Ap + m * K + k0 + k, K);
                    _tile_loadd(5, bt[0][k / 64], 64);
                    _tile_dpbssd(0, 4, 5);
                    if (nt > 1) {
                        _tile_loadd(6, bt[1][k / 64], 64);
                        _tile_dpbssd(1, 4, 6);
                    }
                    if (nt > 2) {
                        _tile_loadd(7, bt[2][k / 64], 64);
                        _tile_dpbssd(2, 4, 7);
                    }
                    if (nt > 3) {
                        _tile_loadd(5, bt[3][k / 64], 64);
                        _tile_dpbssd(3, 4, 5);
                    }
                }
                AMX_STORE(0, C, ldc, m, j, w[0], rows);
                if (nt > 1) AMX_STORE(1, C, ldc, m, j + 16, w[1], rows);
                if (nt > 2) AMX_STORE(2, C, ldc, m, j + 32, w[2], rows);
                if (nt > 3) AMX_STORE(3, C, ldc, m, j + 48, w[3], rows);
                m += rows;
            }
        }
    }
    _tile_release();
}

/* B [K, N] in panels of 32 columns: the VNNI panel of pack_i8, without the +128 */
AMX static void gemm_i8_amx(const int8_t *Ap, int64_t Mp, int64_t K, const int8_t *B,
                            int64_t ldb, int64_t n0, int64_t nc, int32_t *C, int64_t ldc,
                            uint8_t *P)
{
    int mr = 0;
    for (int64_t j = 0; j < nc; j += NR) {
        int64_t w = nc - j < NR ? nc - j : NR;
        pack_i8(B, ldb, K, n0 + j, w, P, 0);
        int64_t w0 = w < 16 ? w : 16, w1 = w - w0;
        amx_gemm_i8(Ap, K, Mp, K, (const int8_t *)P, (const int8_t *)P + 64, 16 * 4 * NR,
                    16 * 4 * NR, 4 * NR, w0, w1, C + j, ldc, &mr, 0);
    }
    _tile_release();
}
#endif

#if defined(__x86_64__)
/* ---- int8 on AVX-VNNI: the AVX-512 VNNI kernels on 256-bit vectors (VEX vpdpbusd, found
 * without AVX-512 on recent Intel and AMD client CPUs). Exact, like every int8 path. */
#define AVXVNNI __attribute__((target("avx2,fma,avxvnni")))

/* pack_i8's panel (b + 128), 4 rows by 16 columns per register block */
AVXVNNI static void gemm_i8_avxvnni(const int8_t *Ap, const int32_t *rowsum, int64_t Mp,
                                    int64_t K, const uint8_t *P, int32_t *C, int64_t ldc,
                                    int64_t nc)
{
    const int64_t lda = dsv4_gemm_i8_lda(K), KG = lda / 4;
    int32_t tile[16] __attribute__((aligned(32)));
    for (int64_t m = 0; m < Mp; m += 4)
        for (int64_t h = 0; h < nc; h += 16) {
            __m256i c[4][2];
            for (int r = 0; r < 4; r++)
                c[r][0] = c[r][1] = _mm256_setzero_si256();
            const int8_t *a = Ap + m * lda;
            for (int64_t g = 0; g < KG; g++) {
                const __m256i b0 = _mm256_load_si256((const __m256i *)(P + g * 4 * NR + 4 * h));
                const __m256i b1 = _mm256_load_si256((const __m256i *)(P + g * 4 * NR + 4 * h + 32));
                for (int r = 0; r < 4; r++) {
                    int32_t a4;
                    memcpy(&a4, a + r * lda + 4 * g, 4);
                    const __m256i av = _mm256_set1_epi32(a4);
                    c[r][0] = _mm256_dpbusd_avx_epi32(c[r][0], b0, av);
                    c[r][1] = _mm256_dpbusd_avx_epi32(c[r][1], b1, av);
                }
            }
            const int64_t w = nc - h < 16 ? nc - h : 16;
            for (int r = 0; r < 4; r++) {
                const __m256i corr = _mm256_set1_epi32(128 * rowsum[m + r]);
                _mm256_store_si256((__m256i *)tile, _mm256_sub_epi32(c[r][0], corr));
                _mm256_store_si256((__m256i *)(tile + 8), _mm256_sub_epi32(c[r][1], corr));
                memcpy(C + (m + r) * ldc + h, tile, (size_t)w * sizeof(int32_t));
            }
        }
}

/* gemm_i8_nt_avx512 on 32 k at a time: 2 A rows by 4 W rows; the last k-slice through
 * zero-padded copies (a zero w byte becomes 128 and meets a zero a byte) */
AVXVNNI static void gemm_i8_nt_avxvnni(const int8_t *Ap, const int32_t *rowsum, int64_t Mp,
                                       int64_t K, const int8_t *W, int64_t ldw, int64_t n0,
                                       int64_t nc, int32_t *C, int64_t ldc)
{
    const int64_t lda = dsv4_gemm_i8_lda(K);
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    int64_t j = 0;
    for (; j + 4 <= nc; j += 4)
        for (int64_t m = 0; m < Mp; m += 2) {
            __m256i acc[2][4];
            for (int r = 0; r < 2; r++)
                for (int q = 0; q < 4; q++)
                    acc[r][q] = _mm256_setzero_si256();
            for (int64_t k = 0; k < K; k += 32) {
                __m256i w[4], a[2];
                if (K - k >= 32) {
                    for (int q = 0; q < 4; q++)
                        w[q] = _mm256_loadu_si256((const __m256i *)(W + (n0 + j + q) * ldw + k));
                    for (int r = 0; r < 2; r++)
                        a[r] = _mm256_loadu_si256((const __m256i *)(Ap + (m + r) * lda + k));
                } else {
                    int8_t t[6][32] __attribute__((aligned(32))) = {{0}};
                    for (int q = 0; q < 4; q++)
                        memcpy(t[q], W + (n0 + j + q) * ldw + k, (size_t)(K - k));
                    for (int r = 0; r < 2; r++)
                        memcpy(t[4 + r], Ap + (m + r) * lda + k, (size_t)(K - k));
                    for (int q = 0; q < 4; q++)
                        w[q] = _mm256_load_si256((const __m256i *)t[q]);
                    for (int r = 0; r < 2; r++)
                        a[r] = _mm256_load_si256((const __m256i *)t[4 + r]);
                }
                for (int q = 0; q < 4; q++)
                    w[q] = _mm256_xor_si256(w[q], flip);
                for (int r = 0; r < 2; r++)
                    for (int q = 0; q < 4; q++)
                        acc[r][q] = _mm256_dpbusd_avx_epi32(acc[r][q], w[q], a[r]);
            }
            for (int r = 0; r < 2; r++)
                for (int q = 0; q < 4; q++)
                    C[(m + r) * ldc + j + q] = hsum_i32x8(acc[r][q]) - 128 * rowsum[m + r];
        }
    if (j < nc)
        gemm_i8_nt_scalar(Ap, Mp, K, W, ldw, n0 + j, nc - j, C + j, ldc);
}

static void gemm_i8_any_avxvnni(const int8_t *Ap, const int32_t *rowsum, int64_t Mp, int64_t K,
                                const int8_t *B, int64_t ldb, int64_t n0, int64_t nc,
                                int32_t *C, int64_t ldc, void *work)
{
    for (int64_t j = 0; j < nc; j += NR) {
        int64_t w = nc - j < NR ? nc - j : NR;
        pack_i8(B, ldb, K, n0 + j, w, work, 0x80);
        gemm_i8_avxvnni(Ap, rowsum, Mp, K, work, C + j, ldc, w);
    }
}
#endif

/* dsv4_gemm_i8 and dsv4_gemm_i8_nt of each ISA; the AMX tiles take K a multiple of 64 and
 * at least 16 rows, AVX-512 the rest */
static void gemm_i8_any_scalar(const int8_t *Ap, const int32_t *rowsum, int64_t Mp, int64_t K,
                               const int8_t *B, int64_t ldb, int64_t n0, int64_t nc, int32_t *C,
                               int64_t ldc, void *work)
{
    gemm_i8_scalar(Ap, Mp, K, B, ldb, n0, nc, C, ldc, work);
}

static void gemm_i8_nt_any_scalar(const int8_t *Ap, const int32_t *rowsum, int64_t Mp, int64_t K,
                                  const int8_t *W, int64_t ldw, int64_t n0, int64_t nc,
                                  int32_t *C, int64_t ldc)
{
    gemm_i8_nt_scalar(Ap, Mp, K, W, ldw, n0, nc, C, ldc);
}

#if defined(__x86_64__)
static void gemm_i8_any_avx2(const int8_t *Ap, const int32_t *rowsum, int64_t Mp, int64_t K,
                             const int8_t *B, int64_t ldb, int64_t n0, int64_t nc, int32_t *C,
                             int64_t ldc, void *work)
{
    for (int64_t j = 0; j < nc; j += NR) {
        int64_t w = nc - j < NR ? nc - j : NR;
        pack_i8_x16(B, ldb, K, n0 + j, w, work);
        gemm_i8_avx2(Ap, Mp, K, work, C + j, ldc, w);
    }
}

static void gemm_i8_nt_any_avx2(const int8_t *Ap, const int32_t *rowsum, int64_t Mp, int64_t K,
                                const int8_t *W, int64_t ldw, int64_t n0, int64_t nc, int32_t *C,
                                int64_t ldc)
{
    gemm_i8_nt_avx2(Ap, Mp, K, W, ldw, n0, nc, C, ldc);
}

static void gemm_i8_any_avx512(const int8_t *Ap, const int32_t *rowsum, int64_t Mp, int64_t K,
                               const int8_t *B, int64_t ldb, int64_t n0, int64_t nc, int32_t *C,
                               int64_t ldc, void *work)
{
    for (int64_t j = 0; j < nc; j += NR) {
        int64_t w = nc - j < NR ? nc - j : NR;
        pack_i8(B, ldb, K, n0 + j, w, work, 0x80);
        gemm_i8_avx512(Ap, rowsum, Mp, K, work, C + j, ldc, w);
    }
}

static void gemm_i8_any_amx(const int8_t *Ap, const int32_t *rowsum, int64_t Mp, int64_t K,
                            const int8_t *B, int64_t ldb, int64_t n0, int64_t nc, int32_t *C,
                            int64_t ldc, void *work)
{
    if (K % 64 == 0 && Mp >= 16)
        gemm_i8_amx(Ap, Mp, K, B, ldb, n0, nc, C, ldc, work);
    else
        gemm_i8_any_avx512(Ap, rowsum, Mp, K, B, ldb, n0, nc, C, ldc, work);
}

static void gemm_i8_nt_any_amx(const int8_t *Ap, const int32_t *rowsum, int64_t Mp, int64_t K,
                               const int8_t *W, int64_t ldw, int64_t n0, int64_t nc, int32_t *C,
                               int64_t ldc)
{
    if (K % 64 == 0 && Mp >= 16)
        gemm_i8_nt_amx(Ap, Mp, K, W, ldw, n0, nc, C, ldc);
    else
        gemm_i8_nt_avx512(Ap, rowsum, Mp, K, W, ldw, n0, nc, C, ldc);
}
#endif

/* ---- out[T, N] = X[T, K] . W[N, K]^T for bf16 weights stored as rows ---------------
 * One order for every T, so that a token's sums do not depend on the other tokens of the
 * call: each thread takes a run of 32-row panels of W. Per k-block of
 * XWT_KC it copies the tokens' slice (shared by all its panels, so it stays in L2) and turns
 * each panel into fp32 [k][32 rows] (stays in L1); 8 tokens at a time meet it in a
 * register-blocked micro-kernel with the rows in the lanes. The sums go through memory
 * between k-blocks, which is exact, so every output is fmaf over k = 0..K-1 in order
 * (exact per product for bf16-valued X), and comes from one thread. */

#include <omp.h>

#define XWT_KC 256
#define XWT_NR 32

static int64_t xwt_token_rows(int64_t T) { return dsv4_round_up(T, 8); }

/* per thread: the token slice [Tr][XWT_KC], a panel [XWT_KC][XWT_NR], and the sums of
 * its run of panels [panels][Tr][XWT_NR], at most one group's worth */
static size_t xwt_thread_bytes(int64_t T, int64_t N, int64_t G, int nth)
{
    int64_t Tr = xwt_token_rows(T), np = (N + XWT_NR - 1) / XWT_NR;
    int64_t pt = (G * np + nth - 1) / nth;
    pt = pt < np ? pt : np;
    return ((size_t)Tr * XWT_KC + XWT_KC * XWT_NR + (size_t)pt * Tr * XWT_NR) * sizeof(float) + 64;
}

size_t dsv4_xwt_work(int64_t T, int64_t N, int64_t K, int64_t G, int nth)
{
    return (size_t)nth * xwt_thread_bytes(T, N, G, nth);
}

/* one token row: c[j] += A[k] * B[k][j] over k in order, j < XWT_NR in the lanes (fused = 0:
 * see gemm_bf16_row) */
static inline __attribute__((always_inline)) void xwt_row(const float *a, const float *B,
                                                        int64_t kb, float *c, const int fused)
{
    float acc[XWT_NR];
    memcpy(acc, c, sizeof acc);
    for (int64_t k = 0; k < kb; k++) {
        const float ak = a[k], *b = B + k * XWT_NR;
        for (int j = 0; j < XWT_NR; j++)
            acc[j] = fused ? fmaf(ak, b[j], acc[j]) : acc[j] + ak * b[j];
    }
    memcpy(c, acc, sizeof acc);
}

/* ct[8][32] += A[8][lda] . B[kb][32], sequential k (A: 8 token rows, B: a panel of bf16
 * values from xwt_panel_scalar) */
static void xwt_micro_scalar(const float *A, int64_t lda, const float *B, int64_t kb, float *ct)
{
    if (dsv4_unfused_try(dsv4_low16(A, 8, kb, lda))) {
        float c0[8 * XWT_NR];
        memcpy(c0, ct, sizeof c0);
        for (int r = 0; r < 8; r++)
            xwt_row(A + r * lda, B, kb, ct + r * XWT_NR, 0);
        if (dsv4_unfused_exact())
            return;
        memcpy(ct, c0, sizeof c0);
    }
    for (int r = 0; r < 8; r++)
        xwt_row(A + r * lda, B, kb, ct + r * XWT_NR, 1);
}

/* P[k][j] = W[j, k] in fp32 for j < nr (zero beyond), k < kn; W's rows read in order */
static void xwt_panel_scalar(const bf16_t *W, int64_t ldw, int64_t nr, int64_t kn, float *P)
{
    for (int64_t j = 0; j < XWT_NR; j++)
        for (int64_t k = 0; k < kn; k++)
            P[k * XWT_NR + j] = j < nr ? dsv4_bf16_to_f32(W[j * ldw + k]) : 0.0f;
}

#if defined(__x86_64__)
AVX512 static void xwt_micro_avx512(const float *A, int64_t lda, const float *B, int64_t kb,
                                    float *ct)
{
    __m512 c[8][2];
    for (int r = 0; r < 8; r++) {
        c[r][0] = _mm512_load_ps(ct + r * XWT_NR);
        c[r][1] = _mm512_load_ps(ct + r * XWT_NR + 16);
    }
    for (int64_t k = 0; k < kb; k++) {
        __m512 b0 = _mm512_load_ps(B + k * XWT_NR), b1 = _mm512_load_ps(B + k * XWT_NR + 16);
        for (int r = 0; r < 8; r++) {
            __m512 av = _mm512_set1_ps(A[r * lda + k]);
            c[r][0] = _mm512_fmadd_ps(av, b0, c[r][0]);
            c[r][1] = _mm512_fmadd_ps(av, b1, c[r][1]);
        }
    }
    for (int r = 0; r < 8; r++) {
        _mm512_store_ps(ct + r * XWT_NR, c[r][0]);
        _mm512_store_ps(ct + r * XWT_NR + 16, c[r][1]);
    }
}

/* xwt_panel_scalar, 16 rows x 16 k at a time: widen, then a 16 x 16 transpose */
AVX512 static void xwt_panel_avx512(const bf16_t *W, int64_t ldw, int64_t nr, int64_t kn, float *P)
{
    const int64_t k16 = kn / 16 * 16;
    for (int64_t jb = 0; jb < XWT_NR; jb += 16) {
        int64_t rows = nr - jb < 0 ? 0 : nr - jb < 16 ? nr - jb : 16;
        for (int64_t k = 0; k < k16; k += 16) {
            __m512i r[16];
            for (int n = 0; n < 16; n++)
                r[n] = n < rows ? _mm512_castps_si512(dsv4_load_bf16x16(W + (jb + n) * ldw + k))
                                : _mm512_setzero_si512();
            dsv4_transpose16(r, P + k * XWT_NR + jb, XWT_NR * 4);
        }
    }
    if (k16 < kn)
        for (int64_t k = k16; k < kn; k++)
            for (int64_t j = 0; j < XWT_NR; j++)
                P[k * XWT_NR + j] = j < nr ? dsv4_bf16_to_f32(W[j * ldw + k]) : 0.0f;
}
#endif

#if defined(__x86_64__)
/* xwt_micro_avx512 as four register blocks of 4 tokens by 16 rows */
DSV4_AVX2 static void xwt_micro_avx2(const float *A, int64_t lda, const float *B, int64_t kb,
                                     float *ct)
{
    for (int r0 = 0; r0 < 8; r0 += 4)
        for (int j = 0; j < XWT_NR; j += 16) {
            float *c = ct + r0 * XWT_NR + j;
            __m256 c00 = _mm256_load_ps(c), c01 = _mm256_load_ps(c + 8);
            __m256 c10 = _mm256_load_ps(c + XWT_NR), c11 = _mm256_load_ps(c + XWT_NR + 8);
            __m256 c20 = _mm256_load_ps(c + 2 * XWT_NR), c21 = _mm256_load_ps(c + 2 * XWT_NR + 8);
            __m256 c30 = _mm256_load_ps(c + 3 * XWT_NR), c31 = _mm256_load_ps(c + 3 * XWT_NR + 8);
            const float *a = A + r0 * lda, *b = B + j;
            for (int64_t k = 0; k < kb; k++) {
                __m256 b0 = _mm256_load_ps(b + k * XWT_NR), b1 = _mm256_load_ps(b + k * XWT_NR + 8);
                __m256 av = _mm256_set1_ps(a[k]);
                c00 = _mm256_fmadd_ps(av, b0, c00);
                c01 = _mm256_fmadd_ps(av, b1, c01);
                av = _mm256_set1_ps(a[lda + k]);
                c10 = _mm256_fmadd_ps(av, b0, c10);
                c11 = _mm256_fmadd_ps(av, b1, c11);
                av = _mm256_set1_ps(a[2 * lda + k]);
                c20 = _mm256_fmadd_ps(av, b0, c20);
                c21 = _mm256_fmadd_ps(av, b1, c21);
                av = _mm256_set1_ps(a[3 * lda + k]);
                c30 = _mm256_fmadd_ps(av, b0, c30);
                c31 = _mm256_fmadd_ps(av, b1, c31);
            }
            _mm256_store_ps(c, c00);
            _mm256_store_ps(c + 8, c01);
            _mm256_store_ps(c + XWT_NR, c10);
            _mm256_store_ps(c + XWT_NR + 8, c11);
            _mm256_store_ps(c + 2 * XWT_NR, c20);
            _mm256_store_ps(c + 2 * XWT_NR + 8, c21);
            _mm256_store_ps(c + 3 * XWT_NR, c30);
            _mm256_store_ps(c + 3 * XWT_NR + 8, c31);
        }
}

/* xwt_panel_scalar, 8 rows x 8 k at a time: widen, then an 8 x 8 transpose */
DSV4_AVX2 static void xwt_panel_avx2(const bf16_t *W, int64_t ldw, int64_t nr, int64_t kn, float *P)
{
    const int64_t k8 = kn / 8 * 8;
    for (int64_t jb = 0; jb < XWT_NR; jb += 8) {
        int64_t rows = nr - jb < 0 ? 0 : nr - jb < 8 ? nr - jb : 8;
        for (int64_t k = 0; k < k8; k += 8) {
            __m256 r[8];
            for (int n = 0; n < 8; n++)
                r[n] = n < rows ? dsv4_load_bf16x8(W + (jb + n) * ldw + k) : _mm256_setzero_ps();
            dsv4_transpose8(r, P + k * XWT_NR + jb, XWT_NR * 4);
        }
    }
    if (k8 < kn)
        for (int64_t k = k8; k < kn; k++)
            for (int64_t j = 0; j < XWT_NR; j++)
                P[k * XWT_NR + j] = j < nr ? dsv4_bf16_to_f32(W[j * ldw + k]) : 0.0f;
}
#endif

void dsv4_xwt(const struct dsv4_ops *o, const float *X, int64_t ldx, int64_t T, const bf16_t *W,
              int64_t ldw, int64_t N, int64_t K, float *out, int64_t ldo, void *work, int nth)
{
    struct dsv4_xwt_group g = {X, W, out};
    dsv4_xwt_groups(o, &g, 1, ldx, T, ldw, N, K, ldo, work, nth);
}

void dsv4_xwt_groups(const struct dsv4_ops *o, const struct dsv4_xwt_group *grp, int64_t G,
                     int64_t ldx, int64_t T, int64_t ldw, int64_t N, int64_t K, int64_t ldo,
                     void *work, int nth)
{
    void (*const micro)(const float *, int64_t, const float *, int64_t, float *) = o->xwt_micro;
    void (*const panel)(const bf16_t *, int64_t, int64_t, int64_t, float *) = o->xwt_panel;
    const int64_t Tr = xwt_token_rows(T), np = (N + XWT_NR - 1) / XWT_NR, calls = Tr / 8;
    const size_t per = xwt_thread_bytes(T, N, G, nth);
    #pragma omp parallel num_threads(nth)
    {
        /* a thread's panels are a run of the G * np in group order; the tokens' k-slice it
         * copies serves all its panels of one group */
        const int ith = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t q0 = G * np * ith / nt, q1 = G * np * (ith + 1) / nt;
        float *xs = (float *)dsv4_align_up((char *)work + (size_t)ith * per, 64);
        float *pw = xs + Tr * XWT_KC, *ct = pw + XWT_KC * XWT_NR;
        memset(xs + T * XWT_KC, 0, (size_t)(Tr - T) * XWT_KC * sizeof(float));
        for (int64_t q = q0; q < q1;) {
            const struct dsv4_xwt_group *g = &grp[q / np];
            const int64_t p0 = q % np, p1 = np < p0 + q1 - q ? np : p0 + q1 - q;
            const float *X = g->X;
            const bf16_t *W = g->W;
            q += p1 - p0;
            memset(ct, 0, (size_t)(p1 - p0) * Tr * XWT_NR * sizeof(float));
            for (int64_t k0 = 0; k0 < K; k0 += XWT_KC) {
                const int64_t kn = K - k0 < XWT_KC ? K - k0 : XWT_KC;
                for (int64_t t = 0; t < T; t++)
                    memcpy(xs + t * XWT_KC, X + t * ldx + k0, (size_t)kn * sizeof(float));
                for (int64_t p = p0; p < p1; p++) {
                    const int64_t r0 = p * XWT_NR, nr = N - r0 < XWT_NR ? N - r0 : XWT_NR;
                    panel(W + r0 * ldw + k0, ldw, nr, kn, pw);
                    /* the next panel's rows (or the first panel's next k-block) come in
                     * meanwhile */
                    int64_t pn = p + 1 < p1 ? p + 1 : p0, pk = p + 1 < p1 ? k0 : k0 + XWT_KC;
                    int64_t pnr = pk >= K ? 0 : N - pn * XWT_NR < XWT_NR ? N - pn * XWT_NR : XWT_NR;
                    int64_t plen = (K - pk < XWT_KC ? K - pk : XWT_KC) * (int64_t)sizeof(bf16_t);
                    struct pf_cursor pf = {(const char *)(W + pn * XWT_NR * ldw + pk),
                                           ldw * (int64_t)sizeof(bf16_t), pnr, (plen + 63) / 64, 0, 0};
                    const int64_t step = (pnr * pf.lpr + calls - 1) / calls;
                    float *c = ct + (p - p0) * Tr * XWT_NR;
                    for (int64_t t = 0; t < Tr; t += 8) {
                        pf_step(&pf, step);
                        micro(xs + t * XWT_KC, XWT_KC, pw, kn, c + t * XWT_NR);
                    }
                }
            }
            for (int64_t p = p0; p < p1; p++) {
                const int64_t r0 = p * XWT_NR, nr = N - r0 < XWT_NR ? N - r0 : XWT_NR;
                for (int64_t t = 0; t < T; t++)
                    memcpy(g->out + t * ldo + r0, ct + ((p - p0) * Tr + t) * XWT_NR,
                           (size_t)nr * sizeof(float));
            }
        }
    }
}

void dsv4_gemm_ops(struct dsv4_ops *o)
{
    o->gemm_bf16 = gemm_bf16_panels_scalar;
    o->gemm_i8 = gemm_i8_any_scalar;
    o->gemm_i8_nt = gemm_i8_nt_any_scalar;
    o->xwt_micro = xwt_micro_scalar;
    o->xwt_panel = xwt_panel_scalar;
#if defined(__x86_64__)
    if (o->isa >= DSV4_ISA_AVX512) {
        o->gemm_bf16 = gemm_bf16_panels_avx512;
        o->gemm_i8 = o->isa == DSV4_ISA_AMX ? gemm_i8_any_amx : gemm_i8_any_avx512;
        o->gemm_i8_nt = o->isa == DSV4_ISA_AMX ? gemm_i8_nt_any_amx : gemm_i8_nt_avx512;
        o->xwt_micro = xwt_micro_avx512;
        o->xwt_panel = xwt_panel_avx512;
    } else if (o->isa >= DSV4_ISA_AVX2) {
        o->gemm_bf16 = gemm_bf16_panels_avx2;
        o->gemm_i8 = o->isa == DSV4_ISA_AVXVNNI ? gemm_i8_any_avxvnni : gemm_i8_any_avx2;
        o->gemm_i8_nt = o->isa == DSV4_ISA_AVXVNNI ? gemm_i8_nt_avxvnni : gemm_i8_nt_any_avx2;
        o->xwt_micro = xwt_micro_avx2;
        o->xwt_panel = xwt_panel_avx2;
    }
#endif
}
