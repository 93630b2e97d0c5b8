/* Selective attention, forward, in O(N) memory per head: a flash-attention style online softmax
 * over key tiles, with the accumulated mask F rebuilt tile by tile (selector_mask.h).
 * Reference: forward() in reference/attention.py; the design is in docs/kernel-design.md.
 *
 * Pass 0 (transpose_blocks): the selector head's key tiles transposed once, kt_s (B, nqb, D, T).
 * Pass 1 (here): for each (b, pair of query blocks) in parallel, each block's queries transposed
 * (qt), then for each key tile left to right:
 *   1a. for each block: the selector head's logit tile -> S tile -> F tile (shared by all heads),
 *       transposed to key-major, from the block's Fstart row; and the next block's Fstart row on
 *       this tile's keys, Fstart[qb + 1] = Fstart[qb] + (column sums of S over block qb);
 *   1b. for each head and block: the key-major logit tile x = scale * k qt - F, causally masked
 *       (gemm_nt_logits), online softmax (softmax_t), acc = alpha acc + P v (gemm_acc_t);
 *   1c. out = acc / l, lse = m + log l.
 * Key-major tiles (keys down, query rows across the vector lanes) make the softmax's row max and
 * sum lane-wise, and need no transposed copy of k: the keys are read where they are.
 *
 * The wavefront: Fstart, the mask entering each query block, is a running sum over the blocks
 * above it, so the selective forward hands out its tasks top block first, and block qb + 1 reads
 * Fstart[qb + 1] on key tile kb as soon as block qb has written it (after 1a, before its heads'
 * work), one tile behind. The selector's logits are computed once, in 1a, where a backward
 * without the forward's rows computes them twice (selector_block_prefix, then its tiles). The
 * rows live in a ring of a few rows per batch element; a block overwrites a slot only after the
 * block that read it is done.
 * When the ring holds every row (N <= 4096, or the caller keeps the rows), the first quarter of
 * the blocks take their rows from selector_block_prefix before the loop (1/16 of its cost) and
 * run after the wavefront, biggest first, as filler while its last, biggest tasks finish. The
 * sums are those of selector_block_prefix, in its order, so F has the same bits as there, on any
 * number of threads.
 *
 * The rank penalty (selattn_forward_soft, docs § 10): every row's cut is needed before its first
 * tile, so Fstart comes from selector_block_prefix for all blocks (all filler, no wavefront),
 * soft_cuts then finds theta and the cut's column of each row (rank_penalty.c), and 1a turns each
 * F tile into F_soft (soft_tile_t) before the heads use it.
 *
 * Dead keys (selattn_forward_skip, dead_keys.h; docs/kernel-design.md): in 1a a block tests each
 * key of an off-diagonal tile against the bound on its Fstart row. A tile with no live key is
 * skipped, and the block writes +inf into the next block's Fstart row there (so the next block
 * finds it dead too); the live keys of a partly dead tile are packed (their F, the selector's
 * logits, k and v rows) into a tile of the block's own, whose heads' work (run_pack) runs when
 * it is full and before the diagonal tile.
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
#include "dead_keys.h"
#include "forward_internal.h"
#include "key_pack.h"
#include "rank_penalty.h"
#include "selector_mask.h"
#include "tile_kernels.h"
#include "omp_compat.h"

#define T SELATTN_TILE
#define QPAIR 2    /* query blocks per task, walking the key tiles together */
#define RING_ROWS_MAX (64 + 1)                 /* Fstart rows per batch element at most */
#define RING_BYTES ((size_t)1 << 20)           /* and at most about 1 MiB of them */

/* Slots in the ring of Fstart rows, (B, ring, N): up to 65, so that to N = 4096 every block has
 * its own row and never waits for a slot; fewer for longer inputs, so the ring stays near 1 MiB
 * per batch element; at least QPAIR + 1, the rows one task reads and writes at once. */
static size_t fstart_ring_rows(size_t nqb, size_t N)
{
    size_t rows = N ? RING_BYTES / (N * sizeof(float)) : 0;
    if (rows > RING_ROWS_MAX) rows = RING_ROWS_MAX;
    if (rows > nqb + 1) rows = nqb + 1;
    if (rows < QPAIR + 1) rows = QPAIR + 1;
    return rows;
}

/* Filler blocks: when every Fstart row stays in memory (the ring never wraps), the first quarter
 * of the query blocks (a multiple of QPAIR) get their rows from selector_block_prefix before the
 * loop, at 1/16 of its full cost, and run after the wavefront, largest first: small independent
 * tasks that keep every thread busy while the last, biggest wavefront tasks finish. */
static size_t filler_blocks(size_t nqb, size_t ring)
{
    if (ring < nqb) return 0;        /* slots are reused: every row must come from the wavefront */
    const size_t nfill = nqb / 4;
    return nfill - nfill % QPAIR;
}

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

/* The heads' work on a pack of live keys gathered from partly dead key tiles of one query block
 * (key_pack.h; every key before the block's first row: no causal mask): the same steps as 1b on a
 * tile, with the pack's F, the selector head's logits (key-major) and its key and value rows,
 * then the pack is empty. qt, m, l, acc are the block's (H, ...) parts. */
static void run_pack(const selattn_kernels *kern, key_pack *pk, size_t s, float scale,
                     size_t rows, const float *qt, float *m, float *l, float *acc, float *x,
                     float *colmax, float *alpha)
{
    const size_t n = pk->n, H = pk->H, D = pk->D;
    for (size_t h = 0; h < H; h++) {
        float *m_h = m + h * T, *l_h = l + h * T, *acc_h = acc + h * T * D;
        if (h == s) {
            memcpy(x, pk->ls, n * T * sizeof(float));
            kern->softmax_t(x, pk->ft, n, (int)T, NULL, m_h, l_h, alpha);
        } else {
            kern->gemm_nt_logits(pk->k + h * T * D, n, qt + h * D * T, D, scale, pk->ft, (int)T,
                                 x, colmax);
            kern->softmax_t(x, NULL, n, (int)T, colmax, m_h, l_h, alpha);
        }
        kern->gemm_acc_t(x, rows, pk->v + h * T * D, n, D, alpha, acc_h);      /* + P v */
    }
    pk->n = 0;
}

int selattn_forward(const float *q, const float *k, const float *v,
                    size_t B, size_t H, size_t N, size_t D,
                    size_t selector_head, int protect_bos, int selective, float scale,
                    float *out, float *lse, float *fstart, int nthreads)
{
    return forward_with_evictions(q, k, v, B, H, N, D, selector_head, protect_bos, selective,
                                  scale, NULL, NULL, 0.0f, out, lse, fstart, nthreads);
}

int selattn_forward_soft(const float *q, const float *k, const float *v,
                         size_t B, size_t H, size_t N, size_t D,
                         size_t selector_head, int protect_bos, int selective, float scale,
                         size_t soft_budget, float soft_strength,
                         float *out, float *lse, float *fstart, float *soft_theta,
                         int64_t *soft_cut, int nthreads)
{
    return selattn_forward_skip(q, k, v, B, H, N, D, selector_head, protect_bos, selective, scale,
                                soft_budget, soft_strength, 0.0f, out, lse, fstart, soft_theta,
                                soft_cut, nthreads);
}

int selattn_forward_skip(const float *q, const float *k, const float *v,
                         size_t B, size_t H, size_t N, size_t D,
                         size_t selector_head, int protect_bos, int selective, float scale,
                         size_t soft_budget, float soft_strength, float dead_key_threshold,
                         float *out, float *lse, float *fstart, float *soft_theta,
                         int64_t *soft_cut, int nthreads)
{
    if (soft_budget == 0 || B == 0 || N == 0) {           /* no penalty, or no row to cut */
        if (soft_theta && soft_cut) soft_no_cuts(B, N, soft_theta, soft_cut);
        return forward_with_evictions(q, k, v, B, H, N, D, selector_head, protect_bos, selective,
                                      scale, NULL, NULL, dead_key_threshold, out, lse, fstart,
                                      nthreads);
    }
    float *theta = soft_theta ? soft_theta : malloc(B * N * sizeof(float));
    int64_t *cut = soft_cut ? soft_cut : malloc(B * N * sizeof(int64_t));
    int rc = SELATTN_ENOMEM;
    if (theta && cut) {
        const soft_penalty soft = {soft_budget, soft_strength, theta, cut};
        rc = forward_with_evictions(q, k, v, B, H, N, D, selector_head, protect_bos, selective,
                                    scale, NULL, &soft, dead_key_threshold, out, lse, fstart,
                                    nthreads);
    }
    if (theta != soft_theta) free(theta);
    if (cut != soft_cut) free(cut);
    return rc;
}

int forward_with_evictions(const float *q, const float *k, const float *v,
                           size_t B, size_t H, size_t N, size_t D,
                           size_t selector_head, int protect_bos, int selective, float scale,
                           const int64_t *evict_at, const soft_penalty *soft_in,
                           float dead_key_threshold, float *out, float *lse, float *fstart_out,
                           int nthreads)
{
    const selattn_kernels *kern = selattn_select_kernels();
    const size_t nqb = num_blocks(N);
    const size_t s = selector_head;
    /* The rank penalty only where a row has a cut: F = 0 (not selective) has nothing past a
     * cut, and with budget >= N no row has more keys than the budget. Then theta and cut say
     * "no cut" everywhere; otherwise soft_cuts writes every row of them. */
    const soft_penalty *soft = soft_in && selective && soft_in->budget < N ? soft_in : NULL;
    if (soft_in && !soft) soft_no_cuts(B, N, soft_in->theta, soft_in->cut);
    /* the caller's (B, nqb, N) is a ring that never wraps: every row stays for the backward;
     * the rank penalty needs every row too (its cuts are found before the loop) */
    const size_t ring = fstart_out || soft ? nqb : fstart_ring_rows(nqb, N);
    float *kt_s = NULL;                     /* (B, 1, nqb, D, T) the selector head's key tiles */
    float *fstart = NULL;                   /* (B, ring, N) Fstart row of block qb at qb % ring */
    int *ready = NULL;    /* (B, nqb) key tiles of Fstart[qb + 1] that block qb has written */
    int *done = NULL;     /* (B, nqb) 1 once block qb has read its Fstart row for the last time */
    int64_t *tmin = NULL, *tmax = NULL;     /* (B, nqb) evict_at per key tile */
    selector sp = {kern, q, NULL, NULL, H, N, D, nqb, s, protect_bos, scale, 1, 0};
    int failed = 0;
    if (selective) {
        /* Pass 0: the selector head's key tiles, transposed (1/H of k) */
        kt_s = big_alloc(B * nqb * D * T * sizeof(float));
        fstart = fstart_out ? fstart_out : big_alloc(B * ring * N * sizeof(float));
        ready = calloc(B * nqb, sizeof(int));
        done = calloc(B * nqb, sizeof(int));
        failed |= !kt_s || !fstart || !ready || !done;
        if (!failed)
            for (size_t b = 0; b < B; b++)
                transpose_blocks(kern, k + (b * H + s) * N * D, 1, 1, N, D,
                                 kt_s + b * nqb * D * T, nthreads);
        sp.kt = kt_s;
    }
    /* with the rank penalty every row comes from the prefix, and (almost) every block is filler:
     * the cuts need all of F's rows before the loop */
    const size_t nfill = !selective ? 0 : soft ? nqb - nqb % QPAIR : filler_blocks(nqb, ring);
    const size_t nprefix = soft ? nqb : nfill + 1;
    if ((nfill > 0 || soft) && !failed)  /* rows 0 .. nfill: the filler's and the wavefront's seed */
        failed |= selector_block_prefix(&sp, B, nprefix, ring, fstart, nthreads) != SELATTN_OK;
    if (soft && !failed) {
        /* the cut of every row: theta, cut (B, N), from F's rows (rank_penalty.c) */
        selector spf = sp;
        spf.fstart = fstart;
        failed |= soft_cuts(&spf, B, soft->budget, soft->theta, soft->cut, nthreads) != SELATTN_OK;
    }
    /* dead keys: the bound's per-head norms and suffix maxima (dead_keys.h), O(B H N D) */
    dead_bound bound = {0};
    const int skip = selective && dead_keys_on(dead_key_threshold) && !failed;
    if (skip)
        failed |= dead_bound_init(&bound, q, k, B, H, N, D, protect_bos, scale,
                                  dead_key_threshold, nthreads) != SELATTN_OK;
    if (evict_at && !failed) {
        tmin = malloc(B * nqb * sizeof(int64_t));
        tmax = malloc(B * nqb * sizeof(int64_t));
        failed |= !tmin || !tmax;
        if (!failed) evicted_tile_bounds(evict_at, B, N, tmin, tmax);
    }
    const int masked = selective || evict_at;        /* is there an F tile to subtract? */
    /* pack the live keys of partly dead tiles into full tiles (not with evictions, which mark
     * F per key and tile) */
    const int pack = skip && !evict_at;
    const size_t nwave = (nqb - nfill + QPAIR - 1) / QPAIR;     /* wavefront pairs per b */
    const size_t nfillp = nfill / QPAIR;                          /* filler pairs per b */
    const size_t ntasks = failed ? 0 : B * (nwave + nfillp);
    size_t next_task = 0;       /* tasks are handed out in this order (see the header comment) */

    #pragma omp parallel num_threads(team_size(nthreads))
    {
        /* per-thread scratch; nothing here grows with N. g indexes the blocks of the pair. */
        float *ls = malloc(QPAIR * T * T * sizeof(float));     /* (g, T, T) selector logits */
        float *ft = malloc(QPAIR * T * T * sizeof(float));     /* (g, T keys, T rows) F */
        float *sel = malloc(T * T * sizeof(float));            /* (T, T) S tile */
        float *x = malloc(T * T * sizeof(float));              /* (T keys, T rows) logits, P */
        float *qt = malloc(QPAIR * H * D * T * sizeof(float)); /* (g, H, D, T) q, transposed */
        float *m = malloc(QPAIR * H * T * sizeof(float));      /* (g, H, T) running row max */
        float *l = malloc(QPAIR * H * T * sizeof(float));      /* (g, H, T) running row sum */
        float *alpha = malloc(T * sizeof(float));              /* (T,) rescale factors */
        float *colmax = malloc(T * sizeof(float));             /* (T,) row max of a tile */
        float *acc = malloc(QPAIR * H * T * D * sizeof(float)); /* (g, H, T, D) out, unscaled */
        /* the packs of live keys, one per block of the pair (key_pack.h); lst a tile's logits
         * transposed */
        key_pack pk[QPAIR] = {{0}};
        int pk_ok = 1;
        for (size_t g = 0; g < QPAIR && pack; g++) pk_ok &= key_pack_alloc(&pk[g], H, D);
        float *lst = pack ? malloc(T * T * sizeof(float)) : NULL;
        team_note_alloc(ls && sel && ft && x && qt && m && l && alpha && colmax && acc &&
                        (!pack || (pk_ok && lst)), &failed);
        for (;;) {
            size_t task;
            #pragma omp atomic capture
            task = next_task++;
            if (task >= ntasks || failed) break;
            /* Tasks: (b, pair of query blocks). Selective: the wavefront's pairs top first, then
             * the filler's pairs biggest first. Otherwise biggest first, so the dynamic hand-out
             * keeps every core busy to the end. The two blocks of a pair walk the key tiles
             * together, so each key and value tile is used twice while it is in cache; each
             * block keeps its own state and order of operations, so pairing changes no bit. */
            size_t b, qb0;
            if (!selective) {
                b = task / nwave;
                qb0 = (nwave - 1 - task % nwave) * QPAIR;
            } else if (task < B * nwave) {
                b = task / nwave;
                qb0 = nfill + task % nwave * QPAIR;
            } else {
                b = (task - B * nwave) / nfillp;
                qb0 = (nfillp - 1 - (task - B * nwave) % nfillp) * QPAIR;
            }
            const size_t nb = nqb - qb0 < QPAIR ? nqb - qb0 : QPAIR;          /* in the pair */
            int *ready_b = selective ? ready + b * nqb : NULL;        /* the wavefront's */
            int *done_b = selective ? done + b * nqb : NULL;
            float *fstart_b = selective ? fstart + b * ring * N : NULL;
            size_t i0[QPAIR], rows[QPAIR];
            for (size_t g = 0; g < nb; g++) {
                const size_t qb = qb0 + g;
                i0[g] = qb * T;
                rows[g] = block_len(N, i0[g]);
                for (size_t hr = g * H * T; hr < (g + 1) * H * T; hr++) {
                    m[hr] = -INFINITY;
                    l[hr] = 0.0f;
                }
                memset(acc + g * H * T * D, 0, H * T * D * sizeof(float));
                /* 1.0 the query block of every head, transposed and zero-padded: qt_h (D, T) */
                for (size_t h = 0; h < H; h++) {
                    const float *q_bhi = q + ((b * H + h) * N + i0[g]) * D;       /* (rows, D) */
                    kern->transpose(q_bhi, D, rows[g], D, qt + (g * H + h) * D * T);
                }
                if (selective) {
                    /* Fstart[0] = 0 on the first key tile, the only one block 0 reads */
                    if (qb == 0 && nfill == 0) memset(fstart_b, 0, block_len(N, 0) * sizeof(float));
                    /* the slot of Fstart[qb + 1] is free once its last reader is done */
                    if (qb + 1 < nqb && qb + 1 >= ring)
                        flag_wait_at_least(done_b + qb + 1 - ring, 1);
                }
            }

            for (size_t kb = 0; kb < qb0 + nb; kb++) {
                const size_t j0 = kb * T, ncols = block_len(N, j0);
                int active[QPAIR], off[QPAIR];
                for (size_t g = 0; g < nb; g++) {
                    const size_t qb = qb0 + g;
                    active[g] = kb <= qb && !(evict_at && tmax[b * nqb + kb] <= (int64_t)i0[g]);
                    /* the causal mask: row r sees key c when r + off >= c */
                    off[g] = kb <= qb && i0[g] - j0 < T ? (int)(i0[g] - j0) : (int)T;
                    float *ft_g = ft + g * T * T;
                    if (selective && kb <= qb) {
                        /* 1a. selector logits -> S -> F for this tile, for all heads (§§ 2-4),
                         * and the next block's Fstart on its keys. A tile whose keys were all
                         * evicted is skipped by this block and every later one: no F needed. */
                        const int wave = qb >= nfill;   /* the filler's rows are all there */
                        float *row_next = wave && qb + 1 < nqb ? fstart_b + (qb + 1) % ring * N
                                                               : NULL;
                        size_t nlive = ncols;          /* the tile's live keys */
                        unsigned char live[T];
                        if (active[g]) {
                            if (qb > nfill) flag_wait_at_least(ready_b + qb - 1, (int)kb + 1);
                            const float *row = fstart_b + qb % ring * N;
                            if (skip && kb < qb)             /* dead keys (dead_keys.h) */
                                nlive = tile_live_keys(&bound, b, qb, kb, row, live);
                            /* a dead key tile costs nothing from here on: the next block
                             * finds +inf in its Fstart row, so it is dead there too */
                            if (nlive == 0) {
                                active[g] = 0;
                                if (row_next)
                                    for (size_t c = 0; c < ncols; c++) row_next[j0 + c] = INFINITY;
                            }
                        }
                        if (active[g]) {
                            mask_of_tile_t(&sp, b, qb, kb, fstart_b + qb % ring * N,
                                           ls + g * T * T, sel, ft_g, row_next);
                            if (soft) {          /* F -> F_soft: the rank penalty (§ 10) */
                                float theta_rows[T];
                                soft_theta_rows(soft->theta + b * N, i0[g], rows[g], theta_rows);
                                soft_tile_t(ft_g, theta_rows, soft->strength);
                            }
                        }
                        if (active[g] && pack && nlive < ncols) {
                            /* a partly dead tile: its live keys join the block's pack (F, the
                             * selector's logits, k and v rows), whose heads' work runs when it
                             * holds T keys or the block leaves its last tile before the
                             * diagonal; the tile itself is not run */
                            active[g] = 0;
                            kern->transpose(ls + g * T * T, T, rows[g], T, lst);
                            for (size_t c = 0; c < ncols; c++) {
                                if (!live[c]) continue;
                                key_pack_add(&pk[g], ft_g + c * T, lst + c * T, k, v, b, N,
                                             j0 + c);
                                if (pk[g].n == T)
                                    run_pack(kern, &pk[g], s, scale, rows[g], qt + g * H * D * T,
                                             m + g * H * T, l + g * H * T, acc + g * H * T * D,
                                             x, colmax, alpha);
                            }
                        }
                        if (pack && kb + 1 == qb && pk[g].n > 0)     /* the last pack */
                            run_pack(kern, &pk[g], s, scale, rows[g], qt + g * H * D * T,
                                     m + g * H * T, l + g * H * T, acc + g * H * T * D, x,
                                     colmax, alpha);
                        int published = (int)kb + 1;
                        if (kb == qb) {          /* the diagonal: Fstart[qb + 1] is 0 beyond it */
                            if (row_next)
                                memset(row_next + j0 + T, 0, block_len(N, j0 + T) * sizeof(float));
                            published = (int)kb + 2;
                            flag_publish(done_b + qb, 1);
                        }
                        flag_publish(ready_b + qb, published);
                    } else if (active[g] && evict_at) {
                        memset(ft_g, 0, T * T * sizeof(float));
                    }
                    if (active[g] && evict_at && tmin[b * nqb + kb] < (int64_t)(i0[g] + rows[g]))
                        mark_evicted(ft_g, evict_at + b * N + j0, i0[g], rows[g], ncols);
                }
                /* 1b. every head: softmax(L - F) v, online over key tiles (§ 5), on key-major
                 * tiles: x (ncols, T) = scale * k_h q_h^T */
                for (size_t h = 0; h < H; h++) {
                    const float *k_bhj = k + ((b * H + h) * N + j0) * D;  /* (ncols, D) */
                    const float *v_bhj = v + ((b * H + h) * N + j0) * D;  /* (ncols, D) */
                    for (size_t g = 0; g < nb; g++) {
                        if (!active[g]) continue;
                        const size_t gh = g * H + h;
                        float *m_h = m + gh * T, *l_h = l + gh * T, *acc_h = acc + gh * T * D;
                        float *ft_g = masked ? ft + g * T * T : NULL;
                        if (selective && h == s) {   /* L_s is the selector's ls, transposed */
                            kern->transpose(ls + g * T * T, T, rows[g], T, x);
                            kern->softmax_t(x, ft_g, ncols, off[g], NULL, m_h, l_h, alpha);
                        } else {                     /* x = L - F, masked; colmax its row max */
                            kern->gemm_nt_logits(k_bhj, ncols, qt + gh * D * T, D, scale, ft_g,
                                                 off[g], x, colmax);
                            kern->softmax_t(x, NULL, ncols, off[g], colmax, m_h, l_h, alpha);
                        }
                        kern->gemm_acc_t(x, rows[g], v_bhj, ncols, D, alpha, acc_h); /* + P v */
                    }
                }
            }
            /* 1c. normalise and keep the log-sum-exp for the backward */
            for (size_t g = 0; g < nb; g++)
                for (size_t h = 0; h < H; h++) {
                    const size_t gh = g * H + h;
                    float *out_bhi = out + ((b * H + h) * N + i0[g]) * D;        /* (rows, D) */
                    float *lse_bhi = lse ? lse + (b * H + h) * N + i0[g] : NULL;  /* (rows,) */
                    for (size_t r = 0; r < rows[g]; r++) {
                        const float inv = 1.0f / l[gh * T + r];
                        for (size_t d = 0; d < D; d++)
                            out_bhi[r * D + d] = acc[(gh * T + r) * D + d] * inv;
                        if (lse) lse_bhi[r] = m[gh * T + r] + logf(l[gh * T + r]);
                    }
                }
        }
        free(ls); free(sel); free(ft); free(x); free(qt); free(m); free(l);
        free(alpha); free(colmax); free(acc);
        for (size_t g = 0; g < QPAIR; g++) key_pack_free(&pk[g]);
        free(lst);
    }
    if (fstart != fstart_out) free(fstart);
    dead_bound_free(&bound);
    free(tmin); free(tmax); free(ready); free(done); free(kt_s);
    return failed ? SELATTN_ENOMEM : SELATTN_OK;
}
