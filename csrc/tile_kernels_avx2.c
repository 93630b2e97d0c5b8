/* Tile kernels compiled for AVX2 + FMA; only called when the CPU reports both. */
#if defined(__GNUC__) && defined(__x86_64__)
#include <math.h>
#include <string.h>
#pragma GCC target("avx2,fma")
#define KERNEL_ISA avx2
#define KERNEL_NAME "avx2"
#define ROW_BLOCK 1
#include "tile_kernels_body.h"
#else
typedef int selattn_no_avx2_kernels; /* ISO C forbids an empty translation unit */
#endif
