/* OpenMP when the build has it, a serial fallback when it does not (SELATTN_NO_OPENMP=1). */
#ifndef SELATTN_OMP_COMPAT_H
#define SELATTN_OMP_COMPAT_H

#include <sched.h>

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

/* Progress flags between the tasks of one parallel loop (the forward's wavefront): a task
 * publishes with flag_publish after writing the data the flag stands for, and a later task reads
 * that data only after flag_wait_at_least has seen the flag reach its value. Both are sequentially
 * consistent atomics, so the data written before the publish is visible after the wait. Only a
 * task handed out earlier is ever waited for, and that task is running, so the wait ends. */
static inline void flag_publish(int *flag, int value)
{
    #pragma omp atomic write seq_cst
    *flag = value;
}

static inline void flag_wait_at_least(const int *flag, int value)
{
    for (unsigned spins = 0;; spins++) {
        int now;
        #pragma omp atomic read seq_cst
        now = *flag;
        if (now >= value) return;
        if (spins < 4096) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
            __builtin_ia32_pause();                 /* a polite spin: the wait is usually short */
#endif
        } else {
            sched_yield();     /* more threads than cores: let the task we wait for run */
        }
    }
}

#endif /* SELATTN_OMP_COMPAT_H */
