/* Tile kernels compiled for AVX-512F; only called when the CPU reports it. */
#if defined(__GNUC__) && defined(__x86_64__)
#include <math.h>
#include <string.h>
#pragma GCC target("avx512f,avx2,fma")
#define KERNEL_ISA avx512
#define KERNEL_NAME "avx512"
#define VEC_FLOATS 16 /* one zmm */
#define ROW_BLOCK 4   /* 4 x 4 zmm accumulators of the 32 registers */
#define COL_VECS 4
#define GROUP_VECS 4
#include "tile_kernels_body.h"
#else
typedef int selattn_no_avx512_kernels; /* ISO C forbids an empty translation unit */
#endif
