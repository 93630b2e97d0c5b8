/* Tile kernels for any CPU the compiler targets (SSE2 on plain x86-64). */
#define KERNEL_ISA generic
#define KERNEL_NAME "generic"
#define ROW_BLOCK 1
#include "tile_kernels_body.h"
