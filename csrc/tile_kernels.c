/* Run-time choice of tile kernels (see tile_kernels.h). */
#include <stdlib.h>
#include <string.h>

#include "tile_kernels.h"

const selattn_kernels *selattn_select_kernels(void)
{
#if defined(__GNUC__) && defined(__x86_64__)
    const char *forced = getenv("SELATTN_KERNELS");
    __builtin_cpu_init();
    int has_avx512 = __builtin_cpu_supports("avx512f");
    int has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (forced && strcmp(forced, "generic") == 0) return &selattn_kernels_generic;
    if (forced && strcmp(forced, "avx2") == 0 && has_avx2) return &selattn_kernels_avx2;
    if (has_avx512) return &selattn_kernels_avx512;
    if (has_avx2) return &selattn_kernels_avx2;
#endif
    return &selattn_kernels_generic;
}
