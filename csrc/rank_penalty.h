/* The rank penalty of pruning-aware training (docs/selective-attention.md § 10) on F's tiles,
 * without any N x N buffer. Reference: rank_penalty, keys_past_the_cut and rank_penalty_backward
 * in reference/attention.py. Not part of the public API (selattn.h has the entry points).
 *
 * Row i's cut theta[i] is the budget-th smallest F[i, j] over its keys j <= i (no cut when the row
 * has budget keys or fewer: theta = +inf, cut = -1). A key past the cut (F > theta) gets
 *   F_soft[i, j] = F[i, j] + strength * (F[i, j] - theta[i]),
 * every other key keeps F. theta and the cut's column are found once per row (soft_cuts, in the
 * forward); the tiles then apply the penalty element by element from theta alone.
 */
#ifndef SELATTN_RANK_PENALTY_H
#define SELATTN_RANK_PENALTY_H

#include <stddef.h>
#include <stdint.h>

#include "selector_mask.h"

/* The penalty's arguments as the kernels pass them around: NULL = no penalty. theta (B, N) and
 * cut (B, N) are written by the forward (soft_cuts) and read by the backward. */
typedef struct {
    size_t budget;       /* >= 1 */
    float strength;      /* >= 0 */
    float *theta;        /* (B, N) F[i, cut[i]], +inf where the row has no cut */
    int64_t *cut;        /* (B, N) the cut's column, -1 where the row has none */
} soft_penalty;

/* The k-th smallest (0-based) of x[0..n), k < n; work (n,) is scratch. Two pivots from a small
 * sorted sample, one branch-free pass that keeps the values between them, then quickselect
 * (median-of-three pivots, three-way partitions) on those (or on a copy of all of x when the
 * sample missed). Deterministic: the value depends on the data only. NaNs give some value of x
 * but never loop or read out of bounds. O(n) on average. */
float select_kth(const float *x, size_t n, size_t k, float *work);

/* theta, cut (B, N) of every row from F, which sp builds tile by tile (mask_of_tile, so the very
 * bits the forward's and the backward's tiles have); sp->fstart must hold all nqb rows of each
 * batch element, (B, nqb, N). Per (b, query block) in parallel: the block's rows of F (64 x N
 * floats per thread), then per row a selection on a copy (N floats per thread). The cut's column
 * is the lowest j <= i with F[i, j] == theta[i] (ties: see docs/kernel-design.md). Returns
 * SELATTN_OK or SELATTN_ENOMEM. */
int soft_cuts(const selector *sp, size_t B, size_t budget, float *theta, int64_t *cut,
              int nthreads);

/* No row has a cut: theta = +inf, cut = -1 on all B x N rows. */
void soft_no_cuts(size_t B, size_t N, float *theta, int64_t *cut);

/* theta_rows (TILE,) = theta of the rows i0 .. i0 + rows - 1, +inf past them (no penalty on the
 * tile's padding). */
void soft_theta_rows(const float *theta_b, size_t i0, size_t rows, float *theta_rows);

/* ft (TILE keys, TILE rows), key-major (the forward's F tile) <- F_soft: ft[c, r] +=
 * strength * (ft[c, r] - theta_rows[r]) where ft[c, r] > theta_rows[r]. */
void soft_tile_t(float *ft, const float *theta_rows, float strength);

/* f (TILE rows, TILE keys), row-major (the backward's F tile) <- F_soft, likewise. */
void soft_tile(float *f, const float *theta_rows, float strength);

#endif /* SELATTN_RANK_PENALTY_H */
