/* Tiles, and the accumulated mask F built block by block (see selector_mask.h).
 * Reference: accumulated_mask_from_logits in reference/attention.py (docs §§ 2-4). */
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "selattn.h"
#include "selector_mask.h"
#include "omp_compat.h"

#define T SELATTN_TILE

void *big_alloc(size_t bytes)
{
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    /* 2 MiB aligned, and asked for huge pages: a fresh buffer of several MiB then costs a few
     * page faults instead of one per 4 KiB, and the tile loops fewer TLB misses. */
    const size_t huge = (size_t)2 << 20;
    if (bytes >= huge) {
        void *p = NULL;
        if (posix_memalign(&p, huge, bytes) != 0) return NULL;
        madvise(p, bytes, MADV_HUGEPAGE);          /* advice only: failure changes nothing */
        return p;
    }
#endif
    return malloc(bytes);
}

void transpose_blocks(const selattn_kernels *kern, const float *x, size_t B, size_t H, size_t N,
                      size_t D, float *xt, int nthreads)
{
    const size_t nqb = num_blocks(N);
    #pragma omp parallel for num_threads(team_size(nthreads)) schedule(static)
    for (size_t task = 0; task < B * H * nqb; task++) {
        const size_t bh = task / nqb, kb = task % nqb;
        const size_t j0 = kb * T;
        const float *x_bhj = x + (bh * N + j0) * D;      /* (ncols, D) */
        kern->transpose(x_bhj, D, block_len(N, j0), D, xt + task * D * T);   /* (D, T) */
    }
}

void selection_tile(const selattn_kernels *kern, const float *ls, size_t i0, size_t j0,
                    size_t rows, size_t ncols, int protect_bos, float *sel)
{
    size_t nallow[T];                           /* row r may mask keys j < i = i0 + r */
    for (size_t r = 0; r < rows; r++) {
        const size_t i = i0 + r;
        nallow[r] = i <= j0 ? 0 : (i - j0 < ncols ? i - j0 : ncols);
    }
    const size_t first = (protect_bos && j0 == 0) ? 1 : 0;   /* BOS is never masked */
    kern->selection(ls, first, nallow, rows, sel);
}

void mask_tile(const float *sel, const float *fstart_cols, size_t rows, float *f)
{
    /* part[c] = sum of S over the rows of this block above row r, summed from the block's first
     * row in the same order as pass 1's column sums. So F = fstart + part is non-decreasing down
     * each column exactly (rounding is monotone), across block boundaries too: the next block
     * starts at fstart + (part after the last row), the very same sum. */
    float part[T] = {0};
    for (size_t r = 0; r < rows; r++) {     /* roll by one: row r sees the rows above it (§ 4) */
        for (size_t c = 0; c < T; c++) {
            f[r * T + c] = fstart_cols[c] + part[c];
            part[c] += sel[r * T + c];
        }
    }
}

void selection_of_tile(const selector *sp, size_t b, size_t qb, size_t kb, float *ls, float *sel)
{
    const size_t i0 = qb * T, j0 = kb * T, rows = block_len(sp->N, i0);
    const float *q_bsi = sp->q + ((b * sp->H + sp->s) * sp->N + i0) * sp->D;    /* (rows, D) */
    sp->kern->gemm_nt(q_bsi, rows,
                      block_tile(sp->kt, b, sp->kt_head, kb, sp->kt_heads, sp->nqb, sp->D),
                      sp->D, sp->scale, ls);
    selection_tile(sp->kern, ls, i0, j0, rows, block_len(sp->N, j0), sp->protect_bos, sel);
}

/* fstart_cols (T,) = the entries of an Fstart row (N,) on key tile kb: ncols of them,
 * zero-padded to T. */
static void fstart_cols_of_tile(const float *fstart_row, size_t N, size_t kb, float *fstart_cols)
{
    /* The row has N entries: the last key tile has only ncols of them. Copy those and zero-pad,
     * so mask_tile's T-wide loop never reads past the row (past the buffer at its end). */
    const size_t j0 = kb * T, ncols = block_len(N, j0);
    memcpy(fstart_cols, fstart_row + j0, ncols * sizeof(float));
    for (size_t c = ncols; c < T; c++) fstart_cols[c] = 0.0f;
}

void mask_of_tile(const selector *sp, size_t b, size_t qb, size_t kb, float *ls, float *sel,
                  float *f)
{
    float fstart_cols[T];
    selection_of_tile(sp, b, qb, kb, ls, sel);
    fstart_cols_of_tile(sp->fstart + (b * sp->nqb + qb) * sp->N, sp->N, kb, fstart_cols);
    mask_tile(sel, fstart_cols, block_len(sp->N, qb * T), f);
}

int mask_scratch_alloc(mask_scratch *w)
{
    w->ls = malloc(T * T * sizeof(float));
    w->sel = malloc(T * T * sizeof(float));
    w->f = malloc(T * T * sizeof(float));
    return w->ls && w->sel && w->f;
}

void mask_scratch_free(mask_scratch *w)
{
    free(w->ls); free(w->sel); free(w->f);
}

void mask_block_rows(const selector *sp, size_t b, size_t qb, size_t r0, mask_scratch *w,
                     float *out, size_t ld)
{
    const size_t rows = block_len(sp->N, qb * T);
    for (size_t kb = 0; kb <= qb; kb++) {
        const size_t j0 = kb * T, ncols = block_len(sp->N, j0);
        mask_of_tile(sp, b, qb, kb, w->ls, w->sel, w->f);
        for (size_t r = r0; r < rows; r++)
            memcpy(out + r * ld + j0, w->f + r * T, ncols * sizeof(float));
    }
}

void mask_of_tile_t(const selector *sp, size_t b, size_t qb, size_t kb, const float *fstart_row,
                    float *ls, float *sel, float *ft, float *fstart_next)
{
    float fstart_cols[T], colsum[T];
    selection_of_tile(sp, b, qb, kb, ls, sel);
    fstart_cols_of_tile(fstart_row, sp->N, kb, fstart_cols);
    sp->kern->mask_tile_t(sel, fstart_cols, block_len(sp->N, qb * T), ft, colsum);
    if (fstart_next) {         /* pass 2's running sum: Fstart[qb + 1] = Fstart[qb] + colsum */
        const size_t j0 = kb * T, ncols = block_len(sp->N, j0);
        for (size_t c = 0; c < ncols; c++) fstart_next[j0 + c] = fstart_cols[c] + colsum[c];
    }
}

int selector_block_prefix(const selector *sp_in, size_t B, size_t nrows, size_t ld_rows,
                          float *fstart, int nthreads)
{
    const size_t N = sp_in->N;
    const size_t nsum = nrows > 0 ? nrows - 1 : 0;     /* blocks whose column sums are needed */
    selector sp = *sp_in;
    sp.fstart = NULL;
    int failed = 0;

    /* Pass 1: each query block's column sums of S, into the row after it:
     * fstart[b, qb + 1, j] = sum_{m in qb} S[m, j], for qb < nrows - 1. Every (b, qb) writes only
     * its own row, so the blocks run in parallel. */
    #pragma omp parallel num_threads(team_size(nthreads))
    {
        float *ls = malloc(T * T * sizeof(float));   /* (T, T) selector logits */
        float *sel = malloc(T * T * sizeof(float));  /* (T, T) S */
        team_note_alloc(ls && sel, &failed);
        #pragma omp for schedule(dynamic, 1)
        for (size_t task = 0; task < B * nsum; task++) {
            if (failed) continue;
            size_t b, qb;
            query_block_task(task, nsum, &b, &qb);
            const size_t rows = block_len(N, qb * T);
            float *colsum = fstart + (b * ld_rows + qb + 1) * N;               /* (N,) */
            memset(colsum, 0, N * sizeof(float));
            for (size_t kb = 0; kb <= qb; kb++) {
                const size_t j0 = kb * T, ncols = block_len(N, j0);
                float sums[T];
                selection_of_tile(&sp, b, qb, kb, ls, sel);
                sp.kern->column_sums(sel, rows, sums);        /* rows in order, from 0 */
                memcpy(colsum + j0, sums, ncols * sizeof(float));
            }
        }
        free(ls); free(sel);
    }
    if (failed) return SELATTN_ENOMEM;

    /* Pass 2: the running sum over blocks, in place, in block order: row 0 is 0, and
     * fstart[b, qb, j] = sum_{qb' < qb} colsum[b, qb', j]. Columns are independent, so they run
     * in parallel. */
    #pragma omp parallel for num_threads(team_size(nthreads)) schedule(static)
    for (size_t bj = 0; bj < B * N; bj++) {
        const size_t b = bj / N, j = bj % N;
        float running = 0.0f;
        if (nrows > 0) fstart[b * ld_rows * N + j] = 0.0f;
        for (size_t qb = 1; qb < nrows; qb++) {
            float *cell = fstart + (b * ld_rows + qb) * N + j;
            running += *cell;
            *cell = running;
        }
    }
    return SELATTN_OK;
}
