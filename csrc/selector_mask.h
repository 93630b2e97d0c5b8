/* Tiles, and the accumulated mask F built tile by tile without ever holding an N x N matrix.
 *
 * Queries and keys are cut into blocks of T = SELATTN_TILE rows. F[i, j] = sum_{m < i} S[m, j] is a
 * cumulative sum down the query axis, so for i in query block qb:
 *   F[i, j] = Fstart[qb, j] + (sum of S[m, j] over the rows m of block qb above i),
 * where Fstart[qb, j] sums S over all earlier blocks. Fstart is (B, nqb, N): N x N / 64 values per
 * batch element, shared by all heads. The in-block part is rebuilt next to every use from the
 * selector head's logit tile (mask_tile).
 */
#ifndef SELATTN_SELECTOR_MASK_H
#define SELATTN_SELECTOR_MASK_H

#include <stddef.h>

#include "tile_kernels.h"

/* Number of blocks: ceil(N / TILE). */
static inline size_t num_blocks(size_t N) { return (N + SELATTN_TILE - 1) / SELATTN_TILE; }

/* Task `task` of the B x nqb (batch element, query block) tasks, biggest first: query block qb
 * has qb + 1 key tiles, so handing out the last blocks first lets dynamic scheduling keep every
 * core busy to the end. */
static inline void query_block_task(size_t task, size_t nqb, size_t *b, size_t *qb)
{
    *b = task / nqb;
    *qb = nqb - 1 - task % nqb;
}

/* Length of the block starting at position `start`: TILE, or what is left of N. */
static inline size_t block_len(size_t N, size_t start)
{
    return N - start < SELATTN_TILE ? N - start : SELATTN_TILE;
}

/* malloc for the per-call buffers of several MiB (transposed tiles, Fstart, partial sums):
 * on Linux 2 MiB aligned and advised to use huge pages. Release with free(). */
void *big_alloc(size_t bytes);

/* xt (B, H, nqb, D, TILE) = every key block of x (B, H, N, D) transposed, zero-padded past N.
 * The tile kernels read keys (and, in the backward, values) in this layout. */
void transpose_blocks(const selattn_kernels *kern, const float *x, size_t B, size_t H, size_t N,
                      size_t D, float *xt, int nthreads);

/* The transposed tile of block kb of head (b, h) inside transpose_blocks' output: (D, TILE). */
static inline const float *block_tile(const float *xt, size_t b, size_t h, size_t kb, size_t H,
                                      size_t nqb, size_t D)
{
    return xt + ((b * H + h) * nqb + kb) * D * SELATTN_TILE;
}

/* nvis (TILE,): how many keys of the tile at (i0, j0) each query row sees (causal: j <= i, and
 * only the ncols keys that exist); 0 for rows past `rows`. */
static inline void visible_keys(size_t i0, size_t j0, size_t rows, size_t ncols, size_t *nvis)
{
    for (size_t r = 0; r < SELATTN_TILE; r++) {
        const size_t i = i0 + r;
        nvis[r] = (r >= rows || i < j0) ? 0 : (i - j0 + 1 < ncols ? i - j0 + 1 : ncols);
    }
}

/* sel (rows, TILE) = S for the tile at (i0, j0) from the selector logits ls: relu(ls) where
 * j < i and (j != 0 or !protect_bos), else 0.  (§§ 2-3) */
void selection_tile(const selattn_kernels *kern, const float *ls, size_t i0, size_t j0,
                    size_t rows, size_t ncols, int protect_bos, float *sel);

/* f (rows, TILE): f[r, c] = fstart_cols[c] + sum_{r' < r} sel[r', c], exactly non-decreasing
 * in r and across blocks (see selector_mask.c). fstart_cols is (TILE,): all TILE entries are read,
 * so a partial last key tile passes a zero-padded copy (mask_of_tile does).  (§ 4) */
void mask_tile(const float *sel, const float *fstart_cols, size_t rows, float *f);

/* What building the selector's tiles reads: q (B, H, N, D), transposed key tiles kt, and
 * fstart (B, nqb, N) (read by mask_of_tile only). kt holds kt_heads heads per batch element
 * (transpose_blocks' (B, kt_heads, nqb, D, TILE)), the selector head's tiles at index kt_head:
 * all heads (kt_heads = H, kt_head = s), or the selector head alone (kt_heads = 1, kt_head = 0). */
typedef struct {
    const selattn_kernels *kern;
    const float *q, *kt, *fstart;
    size_t H, N, D, nqb, s;     /* s: the selector head */
    int protect_bos;
    float scale;
    size_t kt_heads, kt_head;
} selector;

/* For the tile at (query block qb, key block kb) of batch element b: ls (T, T) = the selector's
 * scaled logits and sel (T, T) = S.  (§§ 1-3) */
void selection_of_tile(const selector *sp, size_t b, size_t qb, size_t kb, float *ls, float *sel);

/* selection_of_tile, then f (T, T) = F of the tile from sp->fstart and S.  (§§ 1-4) */
void mask_of_tile(const selector *sp, size_t b, size_t qb, size_t kb, float *ls, float *sel,
                  float *f);

/* One thread's tiles for mask_of_tile: the selector's logits, S and F, (T, T) floats each. */
typedef struct {
    float *ls, *sel, *f;
} mask_scratch;

/* Allocate them (1 when all three were, 0 otherwise; mask_scratch_free is right either way). */
int mask_scratch_alloc(mask_scratch *w);
void mask_scratch_free(mask_scratch *w);

/* Rows r0 .. rows - 1 of query block qb's F (rows = the block's length), keys 0 .. its last
 * row: out[r * ld + j] = F[b, qb * T + r, j], from the block's key tiles kb <= qb in order
 * (mask_of_tile: the bits every pass sees). Columns past the diagonal tile are not written. */
void mask_block_rows(const selector *sp, size_t b, size_t qb, size_t r0, mask_scratch *w,
                     float *out, size_t ld);

/* The forward's tile: selection_of_tile, then ft (T keys, T rows) = F of the tile key-major
 * (zero for rows past the block; mask_of_tile's sums), from fstart_row (N,), the Fstart row of
 * block qb, which the forward keeps itself. Unless fstart_next is NULL, also the next block's
 * Fstart on this tile's keys: fstart_next[j] = fstart_row[j] + sum of S[m, j] over the block's
 * rows, the very sum selector_block_prefix's pass 2 makes, bit for bit.  (§§ 1-4) */
void mask_of_tile_t(const selector *sp, size_t b, size_t qb, size_t kb, const float *fstart_row,
                    float *ls, float *sel, float *ft, float *fstart_next);

/* The first nrows rows of Fstart (the mask entering query blocks 0 .. nrows - 1) into fstart,
 * which holds ld_rows rows of N per batch element, (B, ld_rows, N): the exclusive prefix over
 * query blocks of the column sums of S, for the selector sp (whose fstart is not read). Pass 1
 * sums each block's columns (rows in order), pass 2 adds the blocks up in block order. The
 * backward and selattn_accumulated_mask take all nqb rows; the forward takes the rows of its
 * first blocks and builds the others on the fly, with the same sums. Returns SELATTN_OK or
 * SELATTN_ENOMEM. */
int selector_block_prefix(const selector *sp, size_t B, size_t nrows, size_t ld_rows,
                          float *fstart, int nthreads);

#endif /* SELATTN_SELECTOR_MASK_H */
