/* Tile kernels compiled for AVX2 + FMA; only called when the CPU reports both. */
#if defined(__GNUC__) && defined(__x86_64__)
#include <math.h>
#include <string.h>
#pragma GCC target("avx2,fma")
#define KERNEL_ISA avx2
#define KERNEL_NAME "avx2"
#define VEC_FLOATS 8  /* one ymm */
#define ROW_BLOCK 4   /* 4 x 2 ymm accumulators, 2 for the other operand and a broadcast: 11 of 16 */
#define COL_VECS 2
#define GROUP_VECS 2
#include "tile_kernels_body.h"
#else
typedef int selattn_no_avx2_kernels; /* ISO C forbids an empty translation unit */
#endif
