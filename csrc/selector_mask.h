/* The accumulated mask F, built tile by tile without ever holding an N x N matrix.
 *
 * F[i, j] = sum_{m < i} S[m, j] is a cumulative sum down the query axis. Split the queries into
 * blocks of SELATTN_TILE rows: then F[i, j] = Fstart[qb, j] + (sum of S[m, j] over the rows m of
 * block qb above i), where Fstart[qb, j] is the sum of S over all earlier blocks. Fstart is
 * (B, nqb, N): N x N / 64 per batch element, shared by all heads. The in-block part is recomputed
 * next to every use from the selector head's logit tile.
 */
#ifndef SELATTN_SELECTOR_MASK_H
#define SELATTN_SELECTOR_MASK_H

#include <stddef.h>

#include "tile_kernels.h"

/* Pass 1 + 2 of the forward: fstart (B, nqb, N) = exclusive prefix over query blocks of the
 * column sums of S. Returns SELATTN_OK or SELATTN_ENOMEM. */
int selector_block_prefix(const float *q, const float *k, size_t B, size_t H, size_t N, size_t D,
                          size_t selector_head, int protect_bos, float scale,
                          const selattn_kernels *kern, float *fstart, int nthreads);

/* xt (D, TILE) = x (ncols, D) transposed, zero-padded in columns ncols..TILE-1. */
void transpose_key_tile(const float *x, size_t ncols, size_t D, float *xt);

/* sel (TILE, TILE) = S for the tile at query i0, key j0 from the selector logits ls:
 * relu(ls) where j < i and (j != 0 or !protect_bos), else 0 (also outside rows/ncols). */
void selection_tile(const float *ls, size_t i0, size_t j0, size_t rows, size_t ncols,
                    int protect_bos, float *sel);

/* f (TILE, TILE): f[r, c] = fstart_cols[c] + sum_{r' < r} sel[r', c]. */
void mask_tile(const float *sel, const float *fstart_cols, size_t rows, float *f);

/* Number of query blocks: ceil(N / TILE). */
static inline size_t num_blocks(size_t N) { return (N + SELATTN_TILE - 1) / SELATTN_TILE; }

#endif /* SELATTN_SELECTOR_MASK_H */
