/* Build facts: is OpenMP compiled in, how many threads by default, which kernels run. */
#include "selattn.h"
#include "tile_kernels.h"
#include "omp_compat.h"

int selattn_openmp_enabled(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int selattn_max_threads(void) { return omp_get_max_threads(); }

const char *selattn_kernel_name(void) { return selattn_select_kernels()->name; }

/* Why the build is serial ("" when OpenMP is compiled in); set by the build script. */
#ifndef SELATTN_SERIAL_REASON
#define SELATTN_SERIAL_REASON ""
#endif
const char *selattn_serial_reason(void)
{
#ifdef _OPENMP
    return "";
#else
    return SELATTN_SERIAL_REASON[0] ? SELATTN_SERIAL_REASON : "built without OpenMP";
#endif
}

/* omp_pause_resource_all is OpenMP 5.0; the build script defines SELATTN_HAVE_OMP_PAUSE when the
 * compiler's runtime links it (GCC >= 9 does, while still reporting _OPENMP as 4.5). */
int selattn_release_threads(void)
{
#if defined(_OPENMP) && defined(SELATTN_HAVE_OMP_PAUSE)
    return omp_pause_resource_all(omp_pause_hard);
#elif defined(_OPENMP)
    return -1;
#else
    return 0;
#endif
}
