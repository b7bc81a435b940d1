/* CPU feature detection, the ISA switch and the thread count: the only
 * mutable globals of the library. */
#define _GNU_SOURCE
#include <omp.h>
#include <pthread.h>
#include <stdatomic.h>
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

/* AVX2 and FMA, with the OS saving xmm and ymm state */
static int has_avx2(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return 0;
    int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1;
    if (!osxsave || !avx || !fma || (xgetbv0() & 0x6) != 0x6)
        return 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return 0;
    return (b >> 5) & 1;
}

/* AVX-VNNI (VEX-encoded vpdpbusd on ymm) */
static int has_avxvnni(void)
{
    unsigned a, b, c, d;
    return has_avx2() && __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 4) & 1);
}

static int has_avx512(void)
{
    unsigned a, b, c, d;
    if (!has_avx2() || !__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27)))   /* OSXSAVE */
        return 0;
    /* the OS must save xmm, ymm, opmask and zmm state */
    if ((xgetbv0() & 0xe6) != 0xe6)
        return 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return 0;
    int f = (b >> 16) & 1, bw = (b >> 30) & 1, vl = (b >> 31) & 1, vnni = (c >> 11) & 1;
    return f && bw && vl && vnni;
}

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

/* AMX-INT8 tiles, with the OS saving tile state and granting it to this process */
static int amx_probe(void)
{
    unsigned a, b, c, d;
    if (!has_avx512() || !__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return 0;
    if (!((d >> 24) & 1) || !((d >> 25) & 1))     /* AMX-TILE, AMX-INT8 */
        return 0;
    if ((xgetbv0() & 0x60000) != 0x60000)           /* XTILECFG, XTILEDATA */
        return 0;
#if defined(__linux__) && defined(SYS_arch_prctl)
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
#else
    return 0;
#endif
}

static int has_amx(void)
{
    static int known = -1;
    if (known < 0)
        known = amx_probe();
    return known;
}
#else
static int has_avx2(void) { return 0; }
static int has_avxvnni(void) { return 0; }
static int has_avx512(void) { return 0; }
static int has_amx(void) { return 0; }
#endif

/* The settings every call starts from. A call copies them once into its thread's
 * snapshot (dsv4_call_begin), and everything the calling thread asks afterwards (scratch
 * sizes in prepare(), team sizes and the table of primitives in run()) comes from that
 * copy, so a set_num_threads() or set_isa() from another thread takes effect at the next
 * call, never inside one. */
static _Atomic int g_isa = -1;          /* -1: not chosen yet */
static _Atomic int g_nthreads = 0;      /* 0: not chosen yet */
static _Atomic long g_unpinned = 0;
static _Thread_local const struct dsv4_ops *tl_ops = NULL;
static _Thread_local int tl_nth = 0;

int dsv4_isa_supported(enum dsv4_isa isa)
{
    return isa == DSV4_ISA_SCALAR || (isa == DSV4_ISA_AVX2 && has_avx2()) ||
           (isa == DSV4_ISA_AVXVNNI && has_avxvnni()) || (isa == DSV4_ISA_AVX512 && has_avx512()) ||
           (isa == DSV4_ISA_AMX && has_amx());
}

const char *dsv4_isa_name(enum dsv4_isa isa)
{
    return isa == DSV4_ISA_AMX ? "amx" : isa == DSV4_ISA_AVX512 ? "avx512"
         : isa == DSV4_ISA_AVXVNNI ? "avxvnni" : isa == DSV4_ISA_AVX2 ? "avx2" : "scalar";
}

enum dsv4_isa dsv4_best_isa(void)
{
    return has_amx() ? DSV4_ISA_AMX : has_avx512() ? DSV4_ISA_AVX512
         : has_avxvnni() ? DSV4_ISA_AVXVNNI : has_avx2() ? DSV4_ISA_AVX2 : DSV4_ISA_SCALAR;
}

static struct dsv4_ops g_tables[DSV4_NISA];
static pthread_once_t g_tables_once = PTHREAD_ONCE_INIT;

static void fill_tables(void)
{
    for (int i = 0; i < DSV4_NISA; i++) {
        g_tables[i].isa = (enum dsv4_isa)i;
        dsv4_numerics_ops(&g_tables[i]);
        dsv4_gemm_ops(&g_tables[i]);
    }
}

static int table_filled(const struct dsv4_ops *o)
{
    return o->dot_f32 && o->dot_f32_rows && o->dot_f32_grid && o->pv && o->quant_row_i8 &&
           o->rope_bf16 && o->bf16_row_to_f32 && o->gemm_bf16 && o->gemm_i8 && o->gemm_i8_nt &&
           o->xwt_micro && o->xwt_panel;
}

static const struct dsv4_ops *table(enum dsv4_isa isa)
{
    pthread_once(&g_tables_once, fill_tables);
    return &g_tables[isa];
}

const struct dsv4_ops *dsv4_ops_for(enum dsv4_isa isa)
{
    if ((int)isa < 0 || (int)isa >= DSV4_NISA || !dsv4_isa_supported(isa))
        return NULL;
    return table_filled(table(isa)) ? table(isa) : NULL;
}

static const struct dsv4_ops *global_ops(void)
{
    int isa = g_isa;
    if (isa < 0) {
        isa = dsv4_best_isa();            /* DSV4_ISA is applied by the Python package */
        int unset = -1;
        atomic_compare_exchange_strong(&g_isa, &unset, isa);
        isa = g_isa;
    }
    /* g_isa only ever holds a value dsv4_set_isa() accepted (checked there, not per call:
     * CPUID is slow under a hypervisor) */
    return table((enum dsv4_isa)isa);
}

static int global_threads(void)
{
    int n = g_nthreads;
    if (n <= 0) {
        int unset = 0;
        atomic_compare_exchange_strong(&g_nthreads, &unset, omp_get_max_threads());
        n = g_nthreads;
    }
    return n;
}

/* a worker thread of a parallel region has no snapshot: what it reads here may not be the
 * call's setting */
static void count_unpinned(void)
{
    if (omp_in_parallel())
        g_unpinned++;
}

const struct dsv4_ops *dsv4_call_ops(void)
{
    if (tl_ops)
        return tl_ops;
    count_unpinned();
    return global_ops();
}

enum dsv4_isa dsv4_get_isa(void) { return dsv4_call_ops()->isa; }

int dsv4_set_isa(enum dsv4_isa isa)
{
    if (!dsv4_ops_for(isa))
        return -1;
    g_isa = (int)isa;
    return 0;
}

int dsv4_num_threads(void)
{
    if (tl_nth > 0)
        return tl_nth;
    count_unpinned();
    return global_threads();
}

void dsv4_set_num_threads(int n) { g_nthreads = n; }

void dsv4_call_begin(void)
{
    tl_ops = global_ops();
    tl_nth = global_threads();
}

void dsv4_call_end(void)
{
    tl_ops = NULL;
    tl_nth = 0;
}

long dsv4_unpinned_reads(void) { return g_unpinned; }
