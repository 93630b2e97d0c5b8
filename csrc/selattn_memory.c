/* The memory loss' forward without any N x N buffer: the kept row sums of F, and rows of F.
 * Reference: memory_loss and memory_loss_backward in reference/attention.py (docs § 8).
 *
 *   mem[b] = max_i kept[b, i],   kept[b, i] = sum_{j <= i} (1 - min(F[b, i, j], tau) / tau)
 *   dF[b, r, j] = -dmem[b] / tau  where j <= r and F[b, r, j] < tau  (r = the argmax row)
 *
 * selattn_memory_rows gives kept (B, N); the caller takes the max (and its row, the first on
 * ties). selattn_mask_rows gives the F rows that gradient needs, (B, R, N); the dF rows built
 * from them go to selattn_backward_df_rows. Both build F tile by tile from the selector head's
 * tiles exactly as the forward and the backward do (selector_mask.h), so they see the same bits of
 * F as the backward the gradient goes into.
 *
 * selattn_memory_rows:
 *   0. kt_s (B, 1, nqb, D, T): the selector head's key tiles, transposed (1/H of k).
 *   1. Fstart (B, nqb, N): the forward's rows when the caller has them, else
 *      selector_block_prefix (1/64 of N x N per batch element, as the backward).
 *   2. per (b, query block) in parallel, key tiles in order: the F tile (mask_of_tile), and each
 *      row's sum of 1 - min(F, tau) / tau over its keys j <= i, in double.
 * selattn_mask_rows, per (b, requested row, key tile kb <= its block) in parallel:
 *   the tile's Fstart columns, from the caller's Fstart or as pass 2 of selector_block_prefix sums
 *   them (the column sums of the blocks above, in block order), then the tile's F (mask_tile) and
 *   the requested row of it. Nothing is N x N and every value has one owner, summed in an order
 *   fixed by the problem: bitwise the same result for any thread count.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "selattn.h"
#include "selector_mask.h"
#include "omp_compat.h"

#define T SELATTN_TILE

/* kt_s (B, 1, nqb, D, T): the selector head's key tiles, transposed. */
static void selector_key_tiles(const selattn_kernels *kern, const float *k, size_t B, size_t H,
                               size_t N, size_t D, size_t s, float *kt_s, int nthreads)
{
    const size_t nqb = num_blocks(N);
    for (size_t b = 0; b < B; b++)
        transpose_blocks(kern, k + (b * H + s) * N * D, 1, 1, N, D, kt_s + b * nqb * D * T,
                         nthreads);
}

int selattn_memory_rows(const float *q, const float *k, const float *fstart_in,
                        size_t B, size_t H, size_t N, size_t D,
                        size_t selector_head, int protect_bos, float scale, float tau,
                        float *kept, int nthreads)
{
    if (B == 0 || N == 0) return SELATTN_OK;            /* no row to sum */
    const selattn_kernels *kern = selattn_select_kernels();
    const size_t nqb = num_blocks(N);
    float *kt_s = big_alloc(B * nqb * D * T * sizeof(float));   /* (B, 1, nqb, D, T) */
    float *fstart_own = NULL;                      /* (B, nqb, N), when the caller has none */
    if (!kt_s) return SELATTN_ENOMEM;
    /* Pass 0: the selector head's key tiles */
    selector_key_tiles(kern, k, B, H, N, D, selector_head, kt_s, nthreads);
    selector sp = {kern, q, kt_s, fstart_in, H, N, D, nqb, selector_head, protect_bos, scale,
                   1, 0};
    if (!fstart_in) {
        /* Pass 1: the mask entering each query block */
        fstart_own = big_alloc(B * nqb * N * sizeof(float));
        int rc = !fstart_own ? SELATTN_ENOMEM
                 : selector_block_prefix(&sp, B, nqb, nqb, fstart_own, nthreads);
        if (rc != SELATTN_OK) { free(kt_s); free(fstart_own); return rc; }
        sp.fstart = fstart_own;
    }

    int failed = 0;
    #pragma omp parallel num_threads(team_size(nthreads))
    {
        mask_scratch w;                                 /* (T, T) selector logits, S, F */
        team_note_alloc(mask_scratch_alloc(&w), &failed);
        /* Pass 2: per (b, query block), biggest first; each row's sum over its key tiles in
         * order, so the row sums do not depend on the thread count */
        #pragma omp for schedule(dynamic, 1)
        for (size_t task = 0; task < B * nqb; task++) {
            if (failed) continue;
            size_t b, qb;
            query_block_task(task, nqb, &b, &qb);
            const size_t i0 = qb * T, rows = block_len(N, i0);
            double acc[T] = {0};     /* double: N terms of [0, 1] without float32's drift */
            for (size_t kb = 0; kb <= qb; kb++) {
                const size_t j0 = kb * T, ncols = block_len(N, j0);
                mask_of_tile(&sp, b, qb, kb, w.ls, w.sel, w.f);
                for (size_t r = 0; r < rows; r++) {
                    const size_t i = i0 + r;
                    /* keys j <= i of this tile: kept = 1 - min(F, tau) / tau  (§ 8) */
                    const size_t nkeys = i < j0 ? 0 : (i - j0 + 1 < ncols ? i - j0 + 1 : ncols);
                    double row = 0.0;
                    for (size_t c = 0; c < nkeys; c++) {
                        const float x = w.f[r * T + c];
                        row += 1.0 - (double)(x < tau ? x : tau) / (double)tau;
                    }
                    acc[r] += row;
                }
            }
            for (size_t r = 0; r < rows; r++) kept[b * N + i0 + r] = (float)acc[r];
        }
        mask_scratch_free(&w);
    }
    free(kt_s); free(fstart_own);
    return failed ? SELATTN_ENOMEM : SELATTN_OK;
}

int selattn_mask_rows(const float *q, const float *k, const float *fstart,
                      size_t B, size_t H, size_t N, size_t D,
                      size_t selector_head, int protect_bos, float scale,
                      const int64_t *row_index, size_t R, float *F_rows, int nthreads)
{
    if (B == 0 || N == 0 || R == 0) return SELATTN_OK;   /* no row to write */
    const selattn_kernels *kern = selattn_select_kernels();
    const size_t nqb = num_blocks(N);
    float *kt_s = big_alloc(B * nqb * D * T * sizeof(float));   /* (B, 1, nqb, D, T) */
    if (!kt_s) return SELATTN_ENOMEM;
    /* Pass 0: the selector head's key tiles */
    selector_key_tiles(kern, k, B, H, N, D, selector_head, kt_s, nthreads);
    const selector sp = {kern, q, kt_s, NULL, H, N, D, nqb, selector_head, protect_bos, scale,
                         1, 0};
    int failed = 0;
    #pragma omp parallel num_threads(team_size(nthreads))
    {
        mask_scratch w;                                 /* (T, T) selector logits, S, F */
        team_note_alloc(mask_scratch_alloc(&w), &failed);
        /* one task per (b, requested row, key tile): it writes that tile's columns of the row */
        #pragma omp for schedule(dynamic, 1)
        for (size_t task = 0; task < B * R * nqb; task++) {
            if (failed) continue;
            const size_t br = task / nqb, kb = task % nqb;          /* br = b * R + slot */
            const size_t b = br / R, j0 = kb * T, ncols = block_len(N, j0);
            const int64_t r = row_index[br];
            float *out = F_rows + br * N + j0;                      /* (ncols,) */
            const size_t qb = (r >= 0 && (uint64_t)r < N) ? (size_t)r / T : 0;
            if (r < 0 || (uint64_t)r >= N || kb > qb) {             /* unused, or keys j > r */
                memset(out, 0, ncols * sizeof(float));
                continue;
            }
            float fstart_cols[T];
            if (fstart) {                                           /* the forward's row */
                memcpy(fstart_cols, fstart + (b * nqb + qb) * N + j0, ncols * sizeof(float));
            } else {
                /* selector_block_prefix's sums on this tile: pass 1's column sums of each block
                 * above (rows in order), pass 2's running sum over them in block order (blocks
                 * before kb add exact zeros to its 0, so they are left out) */
                for (size_t c = 0; c < ncols; c++) fstart_cols[c] = 0.0f;
                for (size_t qb2 = kb; qb2 < qb; qb2++) {
                    float sums[T];
                    selection_of_tile(&sp, b, qb2, kb, w.ls, w.sel);
                    kern->column_sums(w.sel, block_len(N, qb2 * T), sums);
                    for (size_t c = 0; c < ncols; c++) fstart_cols[c] += sums[c];
                }
            }
            for (size_t c = ncols; c < T; c++) fstart_cols[c] = 0.0f;
            /* the tile's F (mask_of_tile's sums), and its row r */
            const size_t i0 = qb * T;
            selection_of_tile(&sp, b, qb, kb, w.ls, w.sel);
            mask_tile(w.sel, fstart_cols, (size_t)r - i0 + 1, w.f);
            memcpy(out, w.f + ((size_t)r - i0) * T, ncols * sizeof(float));
        }
        mask_scratch_free(&w);
    }
    free(kt_s);
    return failed ? SELATTN_ENOMEM : SELATTN_OK;
}
