/* The inputs' NaN / infinity check, in C: one read of each array, split among the threads, with
 * no temporary (NumPy's isfinite(x).all() writes a byte per element first). */
#include <math.h>

#include "selattn.h"
#include "omp_compat.h"

int selattn_all_finite(const float *x, size_t n, int nthreads)
{
    int ok = 1;
    /* x - x is 0 for a finite x and NaN for NaN or +-inf; no early exit, so it vectorises */
    #pragma omp parallel for num_threads(team_size(nthreads)) schedule(static) reduction(&:ok) \
        if (n >= 65536)
    for (size_t i = 0; i < n; i++) ok &= (x[i] - x[i]) == 0.0f;
    return ok;
}
