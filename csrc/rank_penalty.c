/* The rank penalty of pruning-aware training on F's tiles (see rank_penalty.h).
 * Reference: rank_penalty and keys_past_the_cut in reference/attention.py (docs § 10). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "selattn.h"
#include "rank_penalty.h"
#include "omp_compat.h"

#define T SELATTN_TILE

static inline void swap_floats(float *x, size_t a, size_t b)
{
    const float t = x[a];
    x[a] = x[b];
    x[b] = t;
}

/* select_kth's general case: quickselect in place, three-way partitions. */
static float quickselect(float *x, size_t n, size_t k)
{
    size_t lo = 0, hi = n;                       /* the k-th smallest lies in x[lo .. hi) */
    for (;;) {
        /* pivot: the median of the first, middle and last values (one of them, so the "equal"
         * part below is never empty and every round shrinks the range) */
        const float a = x[lo], b = x[lo + (hi - lo) / 2], c = x[hi - 1];
        const float p = a < b ? (b < c ? b : (a < c ? c : a)) : (a < c ? a : (b < c ? c : b));
        /* three-way partition: [lo, lt) < p, [lt, gt) neither (== p, or NaN), [gt, hi) > p.
         * Many equal values (F has many exact zeros) cost one pass, not a quadratic walk. */
        size_t lt = lo, i = lo, gt = hi;
        while (i < gt) {
            if (x[i] < p) swap_floats(x, lt++, i++);
            else if (x[i] > p) swap_floats(x, i, --gt);
            else i++;
        }
        if (k < lt) hi = lt;
        else if (k >= gt) lo = gt;
        else return p;
    }
}

#define SAMPLE 32        /* select_kth's sample of the row, for two pivots around the k-th */
#define SAMPLE_SPREAD 4  /* sample ranks on either side of the k-th's expected one */

float select_kth(const float *x, size_t n, size_t k, float *work)
{
    if (n <= 8 * SAMPLE) {                         /* short rows: quickselect on a copy */
        memcpy(work, x, n * sizeof(float));
        return quickselect(work, n, k);
    }
    /* Two pivots lo <= hi from a sorted sample, around where the k-th should rank; one
     * branch-free pass counts the values below lo and gathers those in [lo, hi] (about a
     * quarter of the row), and quickselect finishes there. When the k-th is not in [lo, hi]
     * (an unlucky sample, or NaN) the whole row goes to quickselect instead. */
    float sample[SAMPLE];
    for (size_t t = 0; t < SAMPLE; t++) {         /* evenly spaced, insertion-sorted */
        const float v = x[(t * n + n / 2) / SAMPLE];
        size_t u = t;
        for (; u > 0 && sample[u - 1] > v; u--) sample[u] = sample[u - 1];
        sample[u] = v;
    }
    const size_t at = k * SAMPLE / n;
    const float lo = sample[at > SAMPLE_SPREAD ? at - SAMPLE_SPREAD : 0];
    const float hi = sample[at + SAMPLE_SPREAD < SAMPLE ? at + SAMPLE_SPREAD : SAMPLE - 1];
    size_t below = 0, m = 0;
    for (size_t j = 0; j < n; j++) {
        const float v = x[j];
        below += v < lo;
        work[m] = v;                                  /* kept only when lo <= v <= hi */
        m += (v >= lo) & (v <= hi);
    }
    if (below <= k && k < below + m) return quickselect(work, m, k - below);
    memcpy(work, x, n * sizeof(float));
    return quickselect(work, n, k);
}

void soft_no_cuts(size_t B, size_t N, float *theta, int64_t *cut)
{
    for (size_t e = 0; e < B * N; e++) {
        theta[e] = INFINITY;
        cut[e] = -1;
    }
}

int soft_cuts(const selector *sp, size_t B, size_t budget, float *theta, int64_t *cut,
              int nthreads)
{
    const size_t N = sp->N, nqb = sp->nqb, K = budget;
    int failed = 0;
    #pragma omp parallel num_threads(team_size(nthreads))
    {
        mask_scratch w;                                  /* the tiles of mask_of_tile */
        const int tiles_ok = mask_scratch_alloc(&w);
        float *rows_f = malloc(T * N * sizeof(float));   /* (T, N) the block's rows of F */
        float *work = malloc(N * sizeof(float));         /* (N,) one row, reordered */
        team_note_alloc(tiles_ok && rows_f && work, &failed);
        /* per (b, query block), biggest first; every row is written by its block's task only */
        #pragma omp for schedule(dynamic, 1)
        for (size_t task = 0; task < B * nqb; task++) {
            if (failed) continue;
            size_t b, qb;
            query_block_task(task, nqb, &b, &qb);
            const size_t i0 = qb * T, rows = block_len(N, i0);
            float *theta_bi = theta + b * N + i0;                          /* (rows,) */
            int64_t *cut_bi = cut + b * N + i0;                            /* (rows,) */
            /* row i has i + 1 keys: a cut only when i + 1 > K, i.e. i >= K */
            const size_t first_cut = K > i0 ? (K - i0 < rows ? K - i0 : rows) : 0;
            for (size_t r = 0; r < first_cut; r++) {
                theta_bi[r] = INFINITY;
                cut_bi[r] = -1;
            }
            if (first_cut == rows) continue;
            /* the block's rows of F that have a cut, the tiles' own bits */
            mask_block_rows(sp, b, qb, first_cut, &w, rows_f, N);
            for (size_t r = first_cut; r < rows; r++) {
                const size_t n = i0 + r + 1;                               /* keys j <= i */
                const float *row = rows_f + r * N;                          /* (n,) F[i, :] */
                const float t = select_kth(row, n, K - 1, work);   /* the K-th smallest F */
                int64_t c = -1;           /* its column: the lowest j with F[i, j] == theta */
                for (size_t j = 0; j < n; j++)
                    if (row[j] == t) { c = (int64_t)j; break; }
                theta_bi[r] = c >= 0 ? t : INFINITY;        /* (c < 0 only with NaN in F) */
                cut_bi[r] = c;
            }
        }
        mask_scratch_free(&w); free(rows_f); free(work);
    }
    return failed ? SELATTN_ENOMEM : SELATTN_OK;
}

void soft_theta_rows(const float *theta_b, size_t i0, size_t rows, float *theta_rows)
{
    for (size_t r = 0; r < T; r++) theta_rows[r] = r < rows ? theta_b[i0 + r] : INFINITY;
}

void soft_tile_t(float *ft, const float *theta_rows, float strength)
{
    for (size_t c = 0; c < T; c++)
        for (size_t r = 0; r < T; r++) {
            const float x = ft[c * T + r], th = theta_rows[r];
            ft[c * T + r] = x > th ? x + strength * (x - th) : x;      /* past the cut */
        }
}

void soft_tile(float *f, const float *theta_rows, float strength)
{
    for (size_t r = 0; r < T; r++) {
        const float th = theta_rows[r];
        /* no cut (theta = +inf: x > th never holds), or a row past the tile's end, whose F the
         * caller left undefined: nothing to do, and nothing read */
        if (th == INFINITY) continue;
        for (size_t c = 0; c < T; c++) {
            const float x = f[r * T + c];
            f[r * T + c] = x > th ? x + strength * (x - th) : x;       /* past the cut */
        }
    }
}
