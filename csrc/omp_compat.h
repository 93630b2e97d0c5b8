/* OpenMP when the build has it, a serial fallback when it does not (SELATTN_NO_OPENMP=1). */
#ifndef SELATTN_OMP_COMPAT_H
#define SELATTN_OMP_COMPAT_H

#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_max_threads(void) { return 1; }
#endif

/* The team size for one call: nthreads <= 0 means the OpenMP default. */
static inline int team_size(int nthreads) { return nthreads > 0 ? nthreads : omp_get_max_threads(); }

/* Inside a parallel region, called by every thread of the team after allocating its scratch:
 * `ok` false records the failure in the shared `*failed`, and the barrier makes every thread see
 * the same `*failed` before its loop reads it (so all skip their tasks, none waits forever). */
static inline void team_note_alloc(int ok, int *failed)
{
    if (!ok) {
        #pragma omp atomic write
        *failed = 1;
    }
    #pragma omp barrier
}

#endif /* SELATTN_OMP_COMPAT_H */
