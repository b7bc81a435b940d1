#ifndef DSV4_GEMM_H
#define DSV4_GEMM_H
/* Rows per micro-tile: A and C of the GEMMs have a multiple of this many rows. */
#define DSV4_GEMM_MR 8
#endif
