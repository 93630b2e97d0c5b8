/* The accumulated mask F (B, N, N), materialised for inspection (reference: accumulated_mask). */
#include <stdlib.h>
#include <string.h>

#include "selattn.h"
#include "selector_mask.h"
#include "omp_compat.h"

#define T SELATTN_TILE

int selattn_accumulated_mask(const float *q, const float *k,
                             size_t B, size_t H, size_t N, size_t D,
                             size_t selector_head, int protect_bos, float scale,
                             float *F, int nthreads)
{
    const selattn_kernels *kern = selattn_select_kernels();
    const size_t nqb = num_blocks(N);
    float *fstart = big_alloc(B * nqb * N * sizeof(float));     /* (B, nqb, N) */
    float *kt = big_alloc(B * H * nqb * D * T * sizeof(float)); /* (B, H, nqb, D, T) */
    if (!fstart || !kt) { free(fstart); free(kt); return SELATTN_ENOMEM; }
    transpose_blocks(kern, k, B, H, N, D, kt, nthreads);
    const selector sp = {kern, q, kt, fstart, H, N, D, nqb, selector_head, protect_bos, scale,
                         H, selector_head};
    int rc = selector_block_prefix(&sp, B, nqb, nqb, fstart, nthreads);
    if (rc != SELATTN_OK) { free(fstart); free(kt); return rc; }
    int failed = 0;
    #pragma omp parallel num_threads(team_size(nthreads))
    {
        mask_scratch w;
        team_note_alloc(mask_scratch_alloc(&w), &failed);
        #pragma omp for schedule(dynamic, 1)
        for (size_t task = 0; task < B * nqb; task++) {
            if (failed) continue;
            const size_t b = task / nqb, qb = task % nqb;
            const size_t i0 = qb * T, rows = block_len(N, i0);
            for (size_t r = 0; r < rows; r++)                 /* zero above the diagonal */
                memset(F + (b * N + i0 + r) * N, 0, N * sizeof(float));
            mask_block_rows(&sp, b, qb, 0, &w, F + (b * N + i0) * N, N);
        }
        mask_scratch_free(&w);
    }
    free(fstart); free(kt);
    return failed ? SELATTN_ENOMEM : SELATTN_OK;
}
