/* Tile kernels for any CPU the compiler targets (SSE2 on plain x86-64). */
#define KERNEL_ISA generic
#define KERNEL_NAME "generic"
#define VEC_FLOATS 4  /* one xmm (SSE2), or the target's 16-byte vectors */
#define ROW_BLOCK 4   /* 4 x 2 accumulators, 2 for the other operand, a broadcast, a product */
#define COL_VECS 2
#define GROUP_VECS 4
#include "tile_kernels_body.h"
