/* Building the accumulated mask F block by block (see selector_mask.h).
 * Reference: accumulated_mask_from_logits in reference/attention.py (docs §§ 2-4). */
#include <stdlib.h>
#include <string.h>

#include "selattn.h"
#include "selector_mask.h"
#include "omp_compat.h"

#define T SELATTN_TILE

void transpose_key_tile(const float *x, size_t ncols, size_t D, float *xt)
{
    for (size_t d = 0; d < D; d++) {
        float *xt_d = xt + d * T;
        for (size_t c = 0; c < ncols; c++) xt_d[c] = x[c * D + d];
        for (size_t c = ncols; c < T; c++) xt_d[c] = 0.0f;
    }
}

void selection_tile(const float *ls, size_t i0, size_t j0, size_t rows, size_t ncols,
                    int protect_bos, float *sel)
{
    for (size_t r = 0; r < T; r++) {
        const size_t i = i0 + r;
        for (size_t c = 0; c < T; c++) {
            const size_t j = j0 + c;
            /* S = relu(L[s]) (§ 2); zero on and above the diagonal and for BOS (§ 3) */
            const int allowed = r < rows && c < ncols && j < i && !(protect_bos && j == 0);
            const float x = ls[r * T + c];
            sel[r * T + c] = (allowed && x > 0.0f) ? x : 0.0f;
        }
    }
}

void mask_tile(const float *sel, const float *fstart_cols, size_t rows, float *f)
{
    float running[T];                       /* F of the current row, one value per key */
    memcpy(running, fstart_cols, sizeof running);
    for (size_t r = 0; r < rows; r++) {     /* roll by one: row r sees the rows above it (§ 4) */
        for (size_t c = 0; c < T; c++) {
            f[r * T + c] = running[c];
            running[c] += sel[r * T + c];
        }
    }
}

int selector_block_prefix(const float *q, const float *k, size_t B, size_t H, size_t N, size_t D,
                          size_t selector_head, int protect_bos, float scale,
                          const selattn_kernels *kern, float *fstart, int nthreads)
{
    const size_t nqb = num_blocks(N);
    const size_t ntasks = B * nqb;
    int failed = 0;

    /* Pass 1: each query block's column sums of S, fstart[b, qb, j] = sum_{m in qb} S[m, j].
     * Every (b, qb) writes only its own row of fstart, so the blocks run in parallel. */
    #pragma omp parallel num_threads(team_size(nthreads))
    {
        float *kt = malloc(D * T * sizeof(float));   /* (D, T) transposed key tile */
        float *ls = malloc(T * T * sizeof(float));   /* (T, T) selector logits */
        float *sel = malloc(T * T * sizeof(float));  /* (T, T) S */
        if (!kt || !ls || !sel) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp barrier /* every thread sees `failed` before the loop reads it */
        #pragma omp for schedule(dynamic, 1)
        for (size_t task = 0; task < ntasks; task++) {
            if (failed) continue;
            const size_t b = task / nqb, qb = nqb - 1 - task % nqb;   /* big blocks first */
            const size_t i0 = qb * T, rows = N - i0 < T ? N - i0 : T;
            const float *q_bs = q + ((b * H + selector_head) * N) * D;  /* (N, D) */
            const float *k_bs = k + ((b * H + selector_head) * N) * D;  /* (N, D) */
            float *colsum = fstart + (b * nqb + qb) * N;                /* (N,) */
            memset(colsum, 0, N * sizeof(float));
            for (size_t kb = 0; kb <= qb; kb++) {
                const size_t j0 = kb * T, ncols = N - j0 < T ? N - j0 : T;
                transpose_key_tile(k_bs + j0 * D, ncols, D, kt);
                kern->gemm_nt(q_bs + i0 * D, rows, kt, D, scale, ls);
                selection_tile(ls, i0, j0, rows, ncols, protect_bos, sel);
                for (size_t r = 0; r < rows; r++)
                    for (size_t c = 0; c < ncols; c++) colsum[j0 + c] += sel[r * T + c];
            }
        }
        free(kt); free(ls); free(sel);
    }
    if (failed) return SELATTN_ENOMEM;

    /* Pass 2: exclusive prefix over blocks, in place: fstart[b, qb, j] = sum_{qb' < qb} ...
     * Columns are independent, so they run in parallel; each keeps the block order. */
    #pragma omp parallel for num_threads(team_size(nthreads)) schedule(static)
    for (size_t bj = 0; bj < B * N; bj++) {
        const size_t b = bj / N, j = bj % N;
        float running = 0.0f;
        for (size_t qb = 0; qb < nqb; qb++) {
            float *cell = fstart + (b * nqb + qb) * N + j;
            const float block_sum = *cell;
            *cell = running;
            running += block_sum;
        }
    }
    return SELATTN_OK;
}
