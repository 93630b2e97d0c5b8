/* The inputs' NaN / infinity check, in C: one read of each array, split among the threads, with
 * no temporary (NumPy's isfinite(x).all() writes a byte per element first). */
#include <math.h>

#include "selattn.h"
#include "omp_compat.h"

int selattn_all_finite(const float *x, size_t n, int nthreads)
{
    const size_t nblk = n / 64;
    int ok = 1;
    /* x - x is 0 for a finite x and NaN for NaN or +-inf, and NaN stays NaN in a sum: 64
     * independent lane sums (so it vectorises without reassociation), checked once per block. */
    #pragma omp parallel for num_threads(team_size(nthreads)) schedule(static) reduction(&:ok) \
        if (n >= 65536)
    for (size_t blk = 0; blk < nblk; blk += 256) {
        float s[64] = {0};
        const size_t end = blk + 256 < nblk ? blk + 256 : nblk;
        for (size_t i = blk * 64; i < end * 64; i += 64)
            for (int u = 0; u < 64; u++) s[u] += x[i + u] - x[i + u];
        for (int u = 0; u < 64; u++) ok &= s[u] == 0.0f;
    }
    for (size_t i = nblk * 64; i < n; i++) ok &= (x[i] - x[i]) == 0.0f;
    return ok;
}

float selattn_max_abs(const float *x, size_t n, int nthreads)
{
    const size_t nblk = n / 64;
    int ok = 1;
    float top = 0.0f;
    /* 64 independent lanes again: the finite test as above, and a running max of |x| per lane
     * (a > m ? a : m, which vectorises lane-wise without reassociating anything). */
    #pragma omp parallel for num_threads(team_size(nthreads)) schedule(static) \
        reduction(&:ok) reduction(max:top) if (n >= 65536)
    for (size_t blk = 0; blk < nblk; blk += 256) {
        float s[64] = {0}, m[64] = {0};
        const size_t end = blk + 256 < nblk ? blk + 256 : nblk;
        for (size_t i = blk * 64; i < end * 64; i += 64)
            for (int u = 0; u < 64; u++) {
                const float a = fabsf(x[i + u]);
                s[u] += x[i + u] - x[i + u];
                m[u] = a > m[u] ? a : m[u];
            }
        for (int u = 0; u < 64; u++) {
            ok &= s[u] == 0.0f;
            top = m[u] > top ? m[u] : top;
        }
    }
    for (size_t i = nblk * 64; i < n; i++) {
        const float a = fabsf(x[i]);
        ok &= (x[i] - x[i]) == 0.0f;
        top = a > top ? a : top;
    }
    return ok ? top : INFINITY;
}
