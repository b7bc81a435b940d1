/* CPU feature detection, the ISA switch and the thread count: the only
 * mutable globals of the library. */
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "core/dsv4.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

static uint64_t xgetbv0(void)
{
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

static int has_avx512(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27)))   /* OSXSAVE */
        return 0;
    /* the OS must save xmm, ymm, opmask and zmm state */
    if ((xgetbv0() & 0xe6) != 0xe6)
        return 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return 0;
    int f = (b >> 16) & 1, bw = (b >> 30) & 1, vl = (b >> 31) & 1, vnni = (c >> 11) & 1;
    return f && bw && vl && vnni;
}
#else
static int has_avx512(void) { return 0; }
#endif

static enum dsv4_isa g_isa = DSV4_ISA_SCALAR;
static int g_isa_ready = 0;
static int g_nthreads = 0;

int dsv4_isa_supported(enum dsv4_isa isa)
{
    return isa == DSV4_ISA_SCALAR || (isa == DSV4_ISA_AVX512 && has_avx512());
}

const char *dsv4_isa_name(enum dsv4_isa isa)
{
    return isa == DSV4_ISA_AVX512 ? "avx512" : "scalar";
}

enum dsv4_isa dsv4_get_isa(void)
{
    if (!g_isa_ready) {
        g_isa = has_avx512() ? DSV4_ISA_AVX512 : DSV4_ISA_SCALAR;
        const char *env = getenv("DSV4_ISA");
        if (env && strcmp(env, "scalar") == 0)
            g_isa = DSV4_ISA_SCALAR;
        g_isa_ready = 1;
    }
    return g_isa;
}

void dsv4_set_isa(enum dsv4_isa isa)
{
    g_isa = isa;
    g_isa_ready = 1;
}

int dsv4_num_threads(void)
{
    if (g_nthreads <= 0)
        g_nthreads = omp_get_max_threads();
    return g_nthreads;
}

void dsv4_set_num_threads(int n) { g_nthreads = n; }
