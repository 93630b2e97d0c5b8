/* Selective attention, forward, in O(N) memory per head: a flash-attention style online softmax
 * over key tiles, with the accumulated mask F rebuilt tile by tile (selector_mask.h).
 * Reference: forward() in reference/attention.py; the design is in docs/kernel-design.md.
 *
 * Pass 0 (transpose_blocks): every key tile transposed once, kt (B, H, nqb, D, T).
 * Pass 1-2 (selector_block_prefix): Fstart (B, nqb, N), the mask carried into each query block.
 * Pass 3 (here): for each (b, query block) in parallel, for each key tile left to right:
 *   3a. the selector head's logit tile -> S tile -> F tile (shared by all heads);
 *   3b. for each head: logits - F, causal mask, online softmax, acc += P v.
 *
 * Pruned prefill (forward_with_evictions): key j is visible to query i only while i < evict_at[j]
 * (the KV cache's eviction schedule, kv_cache.c). Evicted keys get F = +inf in the F tile, and key
 * tiles whose every key was evicted before the query block starts are skipped, so a small budget
 * also saves time.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "selattn.h"
#include "forward_internal.h"
#include "selector_mask.h"
#include "tile_kernels.h"
#include "omp_compat.h"

#define T SELATTN_TILE

/* Extremes of evict_at over each key tile: tmin/tmax (B, nqb). A tile whose tmax <= i0 is
 * invisible to every query from i0 on; one whose tmin >= the block's end needs no marking. */
static void evicted_tile_bounds(const int64_t *evict_at, size_t B, size_t N, int64_t *tmin,
                                int64_t *tmax)
{
    const size_t nqb = num_blocks(N);
    for (size_t b = 0; b < B; b++)
        for (size_t kb = 0; kb < nqb; kb++) {
            const int64_t *e = evict_at + b * N + kb * T;
            int64_t lo = INT64_MAX, hi = INT64_MIN;
            for (size_t c = 0; c < block_len(N, kb * T); c++) {
                lo = e[c] < lo ? e[c] : lo;
                hi = e[c] > hi ? e[c] : hi;
            }
            tmin[b * nqb + kb] = lo;
            tmax[b * nqb + kb] = hi;
        }
}

/* ft (T keys, T rows) <- +inf where key j0 + c was evicted before query i0 + r attends. */
static void mark_evicted(float *ft, const int64_t *evict_at_j, size_t i0, size_t rows,
                         size_t ncols)
{
    for (size_t c = 0; c < ncols; c++)
        for (size_t r = 0; r < rows; r++)
            if ((int64_t)(i0 + r) >= evict_at_j[c]) ft[c * T + r] = INFINITY;
}

int selattn_forward(const float *q, const float *k, const float *v,
                    size_t B, size_t H, size_t N, size_t D,
                    size_t selector_head, int protect_bos, int selective, float scale,
                    float *out, float *lse, int nthreads)
{
    return forward_with_evictions(q, k, v, B, H, N, D, selector_head, protect_bos, selective,
                                  scale, NULL, out, lse, nthreads);
}

int forward_with_evictions(const float *q, const float *k, const float *v,
                           size_t B, size_t H, size_t N, size_t D,
                           size_t selector_head, int protect_bos, int selective, float scale,
                           const int64_t *evict_at, float *out, float *lse, int nthreads)
{
    const selattn_kernels *kern = selattn_select_kernels();
    const size_t nqb = num_blocks(N);
    const size_t s = selector_head;
    float *kt_s = NULL;                     /* (B, 1, nqb, D, T) the selector head's key tiles */
    float *fstart = NULL;                   /* (B, nqb, N) mask entering each block */
    selector sp = {kern, q, NULL, NULL, H, N, D, nqb, s, protect_bos, scale, 1, 0};
    if (selective) {
        /* Pass 0: the selector head's key tiles, transposed (1/H of k) */
        kt_s = big_alloc(B * nqb * D * T * sizeof(float));
        fstart = big_alloc(B * nqb * N * sizeof(float));
        if (!kt_s || !fstart) { free(kt_s); free(fstart); return SELATTN_ENOMEM; }
        for (size_t b = 0; b < B; b++)
            transpose_blocks(kern, k + (b * H + s) * N * D, 1, 1, N, D, kt_s + b * nqb * D * T,
                             nthreads);
        sp.kt = kt_s;
        /* Pass 1-2: Fstart */
        int rc = selector_block_prefix(&sp, B, fstart, nthreads);
        if (rc != SELATTN_OK) { free(fstart); free(kt_s); return rc; }
        sp.fstart = fstart;
    }

    int64_t *tmin = NULL, *tmax = NULL;              /* (B, nqb) evict_at per key tile */
    if (evict_at) {
        tmin = malloc(B * nqb * sizeof(int64_t));
        tmax = malloc(B * nqb * sizeof(int64_t));
        if (!tmin || !tmax) {
            free(tmin); free(tmax); free(fstart); free(kt_s);
            return SELATTN_ENOMEM;
        }
        evicted_tile_bounds(evict_at, B, N, tmin, tmax);
    }
    const int masked = selective || evict_at;        /* is there an F tile to subtract? */

    const size_t ntasks = B * nqb;
    int failed = 0;
    #pragma omp parallel num_threads(team_size(nthreads))
    {
        /* per-thread scratch; nothing here grows with N */
        float *ls = malloc(T * T * sizeof(float));         /* (T, T) selector logits, row-major */
        float *sel = malloc(T * T * sizeof(float));        /* (T, T) S tile */
        float *ftile = malloc(T * T * sizeof(float));      /* (T, T) F tile */
        float *ft = malloc(T * T * sizeof(float));         /* (T keys, T rows) F, key-major */
        float *x = malloc(T * T * sizeof(float));          /* (T keys, T rows) logits, then P */
        float *qt = malloc(H * D * T * sizeof(float));     /* (H, D, T) the query block, transposed */
        float *m = malloc(H * T * sizeof(float));          /* (H, T) running row max */
        float *l = malloc(H * T * sizeof(float));          /* (H, T) running row sum */
        float *alpha = malloc(T * sizeof(float));          /* (T,) rescale factors */
        float *colmax = malloc(T * sizeof(float));         /* (T,) row max of one logit tile */
        float *acc = malloc(H * T * D * sizeof(float));    /* (H, T, D) unnormalised output */
        if (!ls || !sel || !ftile || !ft || !x || !qt || !m || !l || !alpha || !colmax || !acc) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp barrier /* every thread sees `failed` before the loop reads it */
        #pragma omp for schedule(dynamic, 1)
        for (size_t task = 0; task < ntasks; task++) {
            if (failed) continue;
            size_t b, qb;
            query_block_task(task, nqb, &b, &qb);
            const size_t i0 = qb * T, rows = block_len(N, i0);
            for (size_t hr = 0; hr < H * T; hr++) { m[hr] = -INFINITY; l[hr] = 0.0f; }
            memset(acc, 0, H * T * D * sizeof(float));
            /* 3.0 the query block of every head, transposed and zero-padded: qt_h (D, T) */
            for (size_t h = 0; h < H; h++) {
                const float *q_bhi = q + ((b * H + h) * N + i0) * D;      /* (rows, D) */
                kern->transpose(q_bhi, D, rows, D, qt + h * D * T);
            }

            for (size_t kb = 0; kb <= qb; kb++) {
                const size_t j0 = kb * T, ncols = block_len(N, j0);
                if (evict_at && tmax[b * nqb + kb] <= (int64_t)i0) continue;  /* all evicted */
                const int off = i0 - j0 < T ? (int)(i0 - j0) : (int)T;  /* causal mask: r + off >= c */
                /* 3a. selector logits -> S -> F for this tile, once for all heads (§§ 2-4) */
                if (selective) {
                    mask_of_tile(&sp, b, qb, kb, ls, sel, ftile);
                    kern->transpose(ftile, T, rows, T, ft);
                } else if (evict_at) {
                    memset(ft, 0, T * T * sizeof(float));
                }
                if (evict_at && tmin[b * nqb + kb] < (int64_t)(i0 + rows))
                    mark_evicted(ft, evict_at + b * N + j0, i0, rows, ncols);
                /* 3b. every head: softmax(L - F) v, online over key tiles (§ 5), on key-major
                 * tiles: x (ncols, T) = scale * k_h q_h^T */
                for (size_t h = 0; h < H; h++) {
                    const float *k_bhj = k + ((b * H + h) * N + j0) * D;  /* (ncols, D) */
                    const float *v_bhj = v + ((b * H + h) * N + j0) * D;  /* (ncols, D) */
                    float *m_h = m + h * T, *l_h = l + h * T, *acc_h = acc + h * T * D;
                    if (selective && h == s) {       /* L_s is the selector's ls, transposed */
                        kern->transpose(ls, T, rows, T, x);
                        kern->softmax_t(x, ft, ncols, off, NULL, m_h, l_h, alpha);
                    } else {                         /* x = L - F, masked; colmax its row max */
                        kern->gemm_nt_logits(k_bhj, ncols, qt + h * D * T, D, scale,
                                             masked ? ft : NULL, off, x, colmax);
                        kern->softmax_t(x, NULL, ncols, off, colmax, m_h, l_h, alpha);
                    }
                    kern->gemm_acc_t(x, rows, v_bhj, ncols, D, alpha, acc_h); /* alpha acc + P v */
                }
            }
            /* 3c. normalise and keep the log-sum-exp for the backward */
            for (size_t h = 0; h < H; h++) {
                float *out_bhi = out + ((b * H + h) * N + i0) * D;        /* (rows, D) */
                float *lse_bhi = lse ? lse + (b * H + h) * N + i0 : NULL;  /* (rows,) */
                for (size_t r = 0; r < rows; r++) {
                    const float inv = 1.0f / l[h * T + r];
                    for (size_t d = 0; d < D; d++)
                        out_bhi[r * D + d] = acc[(h * T + r) * D + d] * inv;
                    if (lse) lse_bhi[r] = m[h * T + r] + logf(l[h * T + r]);
                }
            }
        }
        free(ls); free(sel); free(ftile); free(ft); free(x); free(qt); free(m); free(l);
        free(alpha); free(colmax); free(acc);
    }
    free(tmin); free(tmax); free(fstart); free(kt_s);
    return failed ? SELATTN_ENOMEM : SELATTN_OK;
}
