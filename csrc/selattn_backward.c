/* Selective attention, backward, in O(N) memory per head.
 * Reference: backward() in reference/attention.py (docs/selective-attention.md § 7); the tiling
 * is explained in docs/kernel-design.md.
 *
 * With logits = L - F and P = softmax(logits), per head h (all (T, T) tiles):
 *   dv_h  += P_h^T dout_h                       <- out = P @ v
 *   dP_h   = dout_h v_h^T
 *   G_h    = P_h * (dP_h - delta_h)             <- P = softmax(logits), delta = rowsum(dout * out)
 *   dF     = -sum_h G_h + dF_extra              <- logits = L - F[:, None]; a loss on F
 *   dS[m, j] = sum_{i > m} dF[i, j]             <- F = shift(cumsum(S)) : a reverse cumsum
 *   dLsel  = dS * allowed * (L_s > 0)           <- S = relu(L_s) under the BOS/self constraints
 *   dq_h  += scale * (G_h + [h == s] dLsel) k_h <- L = scale * q k^T
 *   dk_h  += scale * (G_h + [h == s] dLsel)^T q_h
 *
 * Passes:
 *   0.   kt, vt (B, H, nqb, D, T): key and value tiles transposed once (transpose_blocks).
 *   1-2. Fstart (B, nqb, N) (selector_block_prefix), unless the forward kept its rows for us.
 *   3.   delta (B, H, N) = rowsum(dout * out).
 *   4.   key blocks are dealt to SELATTN_DQ_CHUNKS chunks; per (b, chunk) in parallel, for each
 *        key block of the chunk, query blocks from the last one up: recompute P and G for every
 *        head, accumulate dv and dk for the key block (owned: one task per key block); carry the
 *        reverse cumsum of Gsum = sum_h G_h - dF_extra (= -dF) down the key block's columns,
 *        which gives dLsel; add G k into the chunk's own partial sum of dq.
 * dF_extra, an extra gradient on F (the memory loss'), comes as R rows per batch element
 * (selattn_backward_df_rows); the rows are sorted into their query blocks once (df_rows_index),
 * and each tile subtracts the rows that fall in it from its Gsum, in slot order.
 * The rank penalty (selattn_backward_soft, docs § 10): the F tile becomes the forward's F_soft
 * (theta from the forward), and before the dF rows a past key's gsum is multiplied by
 * 1 + strength, its row's sum W over the past keys kept per dq chunk (past_sum);
 *   4b.  per (b, chunk), after pass 4: the cut's share e[i, cut[i]] = -strength * W[i] through
 *        the reverse cumsum and the S > 0 gate into the selector head's dq and dk
 *        (cut_share_grads): 3 products of one head per tile, where pass 4 makes 5 H + 1.
 *   5.   dq = scale * (sum of the chunks' partial sums, in chunk order).
 * Dead keys (selattn_backward_skip, dead_keys.h): before pass 4, dead_from (B, nqb) = the first
 * query block for which each key tile is dead, from the Fstart rows (the forward's decisions: the
 * same rows, the same test). Pass 4 skips a key block's dead tiles; only where extra dF rows lie at
 * or below a dead tile does it compute the selector head's S there, the reverse cumsum of those
 * rows through it and its dq, dk (dead_tile_selector): the attention's part is below the bound.
 * dk/dv are owned by key blocks and each partial sum of dq by one chunk, walked in a fixed order;
 * the chunks are a constant, not the thread count, so the result does not depend on the thread
 * count. P and G are computed once per tile (5 products per head and tile, like a fused
 * attention backward with atomics), at the price of SELATTN_DQ_CHUNKS - 1 extra dq-sized buffers.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "selattn.h"
#include "dead_keys.h"
#include "key_pack.h"
#include "rank_penalty.h"
#include "selector_mask.h"
#include "tile_kernels.h"
#include "omp_compat.h"

#define T SELATTN_TILE

/* dq is summed over key blocks; the key blocks are dealt to this many chunks (a constant, never the
 * thread count, so the sums do not depend on it), each adding into its own copy of dq. */
#define SELATTN_DQ_CHUNKS 2

/* Everything one (query block, key block) tile needs to recompute P and G. */
typedef struct {
    size_t i0, j0, rows, ncols;
    const float *ftile;        /* (T, T) F tile or NULL when not selective */
} tile_pos;

/* p (rows, T) = exp(x - F - lse) on the visible keys, 0 elsewhere. x holds the logits L on
 * entry. */
static void recompute_probs(float *x, const tile_pos *tp, const float *lse_bhi,
                            const selattn_kernels *kern)
{
    float rowmax[T];
    size_t nvis[T];
    visible_keys(tp->i0, tp->j0, tp->rows, tp->ncols, nvis);
    kern->masked_logits(x, tp->ftile, nvis, tp->rows, rowmax);
    kern->exp_rows(x, lse_bhi, tp->rows, NULL);
}

/* The extra gradient on F, as rows: slot e of batch element b is F's row index[b * R + e]
 * (skipped unless in [0, N)), with gradient rows[(b * R + e) * N ...]. first and order sort the
 * slots by query block: the slots of (b, qb) are order[first[b * nqb + qb] ..
 * first[b * nqb + qb + 1]), in increasing slot order. */
typedef struct {
    const float *rows;         /* (B, R, N) */
    const int64_t *index;      /* (B, R) */
    size_t R;
    size_t *first;             /* (B * nqb + 1,) */
    size_t *order;             /* (B * R,) slots b * R + e, grouped by (b, qb) */
} df_rows;

/* Sort the valid slots into their query blocks (a stable counting sort: slot order kept). */
static void df_rows_index(df_rows *x, size_t B, size_t N, size_t nqb)
{
    for (size_t c = 0; c <= B * nqb; c++) x->first[c] = 0;
    for (size_t be = 0; be < B * x->R; be++) {            /* count per (b, qb), shifted by 1 */
        const int64_t r = x->index[be];
        if (r >= 0 && (uint64_t)r < N) x->first[(be / x->R) * nqb + (size_t)r / T + 1]++;
    }
    for (size_t c = 0; c < B * nqb; c++) x->first[c + 1] += x->first[c];
    size_t *fill = x->first;          /* reuse: fill[c] walks from first[c]; restored below */
    for (size_t be = 0; be < B * x->R; be++) {
        const int64_t r = x->index[be];
        if (r >= 0 && (uint64_t)r < N) x->order[fill[(be / x->R) * nqb + (size_t)r / T]++] = be;
    }
    for (size_t c = B * nqb; c > 0; c--) fill[c] = fill[c - 1];   /* fill[c] ended at first[c+1] */
    x->first[0] = 0;
}

/* The problem every tile of the backward reads. */
typedef struct {
    const float *q, *k, *v, *lse, *dout, *delta;
    const float *kt, *vt;      /* (B, H, nqb, D, T) key and value tiles, transposed */
    selector sel;              /* the selector's tiles (mask_of_tile) */
    size_t H, N, D, nqb, s;
    int selective;
    float scale;
    const selattn_kernels *kern;
    const df_rows *df;         /* extra gradient on F, or NULL */
    /* the rank penalty (§ 10), or theta = NULL: theta, cut (B, N) from the forward; past_sum
     * (nchunks, B, N) each dq chunk's share of W[b, i] = sum of gsum over row i's past keys */
    const float *theta;
    const int64_t *cut;
    float strength;
    float *past_sum;
    size_t B, nchunks;
    const int64_t *dead_from;  /* (B, nqb) first query block a key tile is dead for, or NULL */
    /* the packs of partly dead tiles (packed_tile_grads), when dead_from is not NULL: the bound
     * (tile_live_keys), and the query and dout blocks transposed, (B, H, nqb, D, T) */
    const dead_bound *bound;
    const float *qt, *doutt;
} problem;

/* gsum (rows, T) -= the extra dF rows that fall in the tile (b, qb, kb), slot by slot: gsum is
 * -dF of the tile, so the reverse cumsum then carries -(dF_attention + dF_extra). Entries at
 * keys j >= i or on a protected BOS reach no S (selector_grad gates them by S > 0), as in the
 * reference's accumulated_mask_backward. */
static void subtract_df_rows(const problem *pr, size_t b, size_t qb, size_t kb, float *gsum)
{
    const df_rows *x = pr->df;
    const size_t i0 = qb * T, j0 = kb * T, ncols = block_len(pr->N, j0);
    const size_t cell = b * pr->nqb + qb;
    for (size_t e = x->first[cell]; e < x->first[cell + 1]; e++) {
        const size_t be = x->order[e];
        const size_t r = (size_t)x->index[be] - i0;                       /* row in the tile */
        const float *row = x->rows + be * pr->N + j0;                     /* (ncols,) */
        for (size_t c = 0; c < ncols; c++) gsum[r * T + c] -= row[c];
    }
}

/* Per-thread scratch of the backward (nothing here grows with N). */
typedef struct {
    float *ls, *sel;     /* (T, T) selector logits and S */
    float *ftile;        /* (T, T) F */
    float *p, *g;        /* (H, T, T) P and G of every head */
    float *gsum;         /* (T, T) sum_h G_h */
    float *carry;        /* (T,) reverse cumsum carry */
    float *theta_rows;   /* (T,) the rank penalty's cut of each row of the tile */
    float *acc_a, *acc_b;/* (H, T, D) dk or dq; dv */
    /* packed_tile_grads' (NULL unless packing): the pack, the selector's logits transposed
     * (T, T), the pack's sum_h G_h key-major (T, T), the selector head's dLsel (T, T), and the
     * accumulators' rows of the packed keys (2, H, T, D) */
    key_pack pk;
    float *lst, *gsum_t, *gsel, *pacc;
} scratch;

static void scratch_free(scratch *w)
{
    free(w->ls); free(w->sel); free(w->ftile); free(w->p); free(w->g);
    free(w->gsum); free(w->carry); free(w->theta_rows); free(w->acc_a);
    free(w->acc_b);
    key_pack_free(&w->pk);
    free(w->lst); free(w->gsum_t); free(w->gsel); free(w->pacc);
}

static int scratch_alloc(scratch *w, size_t H, size_t D, int pack)
{
    w->pk = (key_pack){0};
    w->lst = w->gsum_t = w->gsel = w->pacc = NULL;
    if (pack) {
        w->lst = malloc(T * T * sizeof(float));
        w->gsum_t = malloc(T * T * sizeof(float));
        w->gsel = malloc(T * T * sizeof(float));
        w->pacc = malloc(2 * H * T * D * sizeof(float));
        if (!key_pack_alloc(&w->pk, H, D) || !w->lst || !w->gsum_t || !w->gsel || !w->pacc)
            pack = -1;
    }
    w->ls = malloc(T * T * sizeof(float));
    w->sel = malloc(T * T * sizeof(float));
    w->ftile = malloc(T * T * sizeof(float));
    w->p = malloc(H * T * T * sizeof(float));
    w->g = malloc(H * T * T * sizeof(float));
    w->gsum = malloc(T * T * sizeof(float));
    w->carry = malloc(T * sizeof(float));
    w->theta_rows = malloc(T * sizeof(float));
    w->acc_a = malloc(H * T * D * sizeof(float));
    w->acc_b = malloc(H * T * D * sizeof(float));
    return w->ls && w->sel && w->ftile && w->p && w->g &&
           w->gsum && w->carry && w->theta_rows && w->acc_a && w->acc_b && pack >= 0;
}

/* For one tile: the selector's logits, S and F (when selective), then P_h and G_h of every head,
 * and gsum (rows, T) = sum_h G_h. Rows past tp->rows of these tiles are left undefined. Both
 * passes call this, so they recompute exactly the same numbers. */
static void tile_probs_and_grads(const problem *pr, size_t b, const tile_pos *tp, scratch *w)
{
    const size_t H = pr->H, N = pr->N, D = pr->D, s = pr->s, kb = tp->j0 / T;
    if (pr->selective) {
        memset(w->gsum, 0, T * T * sizeof(float));
        mask_of_tile(&pr->sel, b, tp->i0 / T, kb, w->ls, w->sel, w->ftile);
        if (pr->theta) {       /* the forward's F_soft (§ 10): ftile > theta exactly where past */
            soft_theta_rows(pr->theta + b * N, tp->i0, tp->rows, w->theta_rows);
            soft_tile(w->ftile, w->theta_rows, pr->strength);
        }
    }
    size_t nvis[T];
    visible_keys(tp->i0, tp->j0, tp->rows, tp->ncols, nvis);
    for (size_t h = 0; h < H; h++) {
        const size_t row0 = (b * H + h) * N + tp->i0;                      /* row (b, h, i0) */
        const float *kt_h = block_tile(pr->kt, b, h, kb, H, pr->nqb, D);
        const float *vt_h = block_tile(pr->vt, b, h, kb, H, pr->nqb, D);
        float *p_h = w->p + h * T * T;
        if (pr->selective && h == s) {                                     /* L_s is ls */
            memcpy(p_h, w->ls, T * T * sizeof(float));
            recompute_probs(p_h, tp, pr->lse + row0, pr->kern);            /* P = exp(L-F-lse) */
        } else {
            pr->kern->gemm_nt_probs(pr->q + row0 * D, tp->rows, kt_h, D, pr->scale, tp->ftile,
                                    nvis, pr->lse + row0, p_h);            /* P = exp(L-F-lse) */
        }
        pr->kern->gemm_nt_grad(pr->dout + row0 * D, tp->rows, vt_h, D, p_h,    /* dP = dout v^T, */
                               pr->delta + row0, w->g + h * T * T,          /* G = P (dP - delta) */
                               pr->selective ? w->gsum : NULL);
    }
}

/* A dead tile (qb, kb) with extra dF rows at or below it: the attention's P and G are below the
 * bound and skipped, but the rows' reverse cumsum runs up the key block's columns through it, so
 * (as in key_block_grads with G = 0): S of the tile, gsum = -(the dF rows in it), dS into the
 * selector head's G_s, then dk_s (into acc_s, (T, D)) += G_s^T q_s and dq_part += G_s k_s. */
static void dead_tile_selector(const problem *pr, size_t b, size_t qb, size_t kb, scratch *w,
                               float *acc_s, float *dq_part)
{
    const size_t N = pr->N, D = pr->D, s = pr->s;
    const size_t i0 = qb * T, j0 = kb * T, rows = block_len(N, i0), ncols = block_len(N, j0);
    const size_t row0 = (b * pr->H + s) * N + i0;                        /* row (b, s, i0) */
    float *g = w->g + s * T * T;
    selection_of_tile(&pr->sel, b, qb, kb, w->ls, w->sel);
    memset(w->gsum, 0, T * T * sizeof(float));
    subtract_df_rows(pr, b, qb, kb, w->gsum);
    memset(g, 0, T * T * sizeof(float));
    pr->kern->selector_grad(w->gsum, w->sel, rows, w->carry, g);
    pr->kern->gemm_acc_t(g, ncols, pr->q + row0 * D, rows, D, NULL, acc_s);    /* dk += G^T q */
    pr->kern->gemm_acc(g, rows, pr->k + ((b * pr->H + s) * N + j0) * D, ncols, D, NULL,
                       dq_part + row0 * D);                                    /* dq += G k */
}

/* Key block kb belongs to dq chunk dq_chunk(kb, nchunks): a snake over the chunks
 * (0 1 2 3 3 2 1 0 0 1 ...), so every chunk gets about the same number of tiles. */
static size_t dq_chunk(size_t kb, size_t nchunks)
{
    const size_t p = kb % (2 * nchunks);
    return p < nchunks ? p : 2 * nchunks - 1 - p;
}

/* A partly dead tile (qb, kb < qb): some of its keys are dead for block qb (dead_keys.h), and
 * only the n live ones (live[c]) get the attention's work. They are packed (key_pack.h, the
 * forward's packs: F, the selector's logits, every head's k and v rows) and the heads run on
 * key-major tiles of n keys x 64 query rows, at O(n) cost:
 *   P^T = exp(scale k q^T - F^T - lse)    <- P = exp(L - F - lse)   (gemm_nt_probs_t; probs_t
 *                                                                     from the logits for h = s)
 *   G^T = P^T * (v dout^T - delta)        <- G = P * (dP - delta)   (gemm_nt_grad_t)
 *   dv += P^T dout, dk += G^T q           on the packed keys' rows of the accumulators
 *   dq += G k
 * Every entry of P and G has the bits of the dense tile's, and dv and dk get the dense tile's
 * operations in its order (the keys' rows of the accumulators are gathered, added to and put
 * back); dq sums over the live keys only, the dead ones' terms being dropped. (The bits are the
 * dense tile's as long as the compiler contracts the scalar tails of gemm_acc and gemm_acc_t,
 * for D not a multiple of the vector width, alike; with GCC on AVX-512 and AVX2 they may
 * differ by rounding.) The selector head's path through F stays whole: gsum (rows, 64) is the pack's
 * sum_h G_h on the live columns and 0 on the dead ones (their G is below the bound), the rank
 * penalty and the extra dF rows act on it as in key_block_grads, and selector_grad carries the
 * reverse cumsum up every column, dead or not, into dLsel (rows, 64). Its live columns join the
 * selector head's packed G (g - carry, the dense tile's bits). A dead column gets anything only
 * from dF rows at or below this tile (below it the column was dead too, its G dropped); then the
 * selector head's dk and dq are made on the whole tile as in key_block_grads (two products of
 * one head), else on the pack. */
static void packed_tile_grads(const problem *pr, size_t b, size_t qb, size_t kb,
                              const unsigned char *live, scratch *w, float *dq_part)
{
    const selattn_kernels *kern = pr->kern;
    const size_t H = pr->H, N = pr->N, D = pr->D, nqb = pr->nqb, s = pr->s;
    const size_t i0 = qb * T, j0 = kb * T, rows = block_len(N, i0), ncols = block_len(N, j0);
    key_pack *pk = &w->pk;
    size_t idx[T];                                   /* idx[m]: the tile column of packed key m */
    /* 4p.1 the selector's logits ls and S (rows, 64), F key-major (the forward's tile), F_soft;
     * the live keys into the pack */
    mask_of_tile_t(&pr->sel, b, qb, kb, pr->sel.fstart + (b * nqb + qb) * N, w->ls, w->sel,
                   w->ftile, NULL);
    if (pr->theta) {
        soft_theta_rows(pr->theta + b * N, i0, rows, w->theta_rows);
        soft_tile_t(w->ftile, w->theta_rows, pr->strength);
    }
    kern->transpose(w->ls, T, rows, T, w->lst);                /* (64 keys, 64 rows), 0-padded */
    pk->n = 0;
    for (size_t c = 0; c < ncols; c++) {
        if (!live[c]) continue;
        idx[pk->n] = c;
        key_pack_add(pk, w->ftile + c * T, w->lst + c * T, pr->k, pr->v, b, N, j0 + c);
    }
    const size_t n = pk->n;
    float *pk_dk = w->pacc, *pk_dv = w->pacc + H * T * D;     /* (H, n, D) of the packed keys */
    for (size_t h = 0; h < H; h++)
        for (size_t m = 0; m < n; m++) {
            memcpy(pk_dk + (h * T + m) * D, w->acc_a + (h * T + idx[m]) * D, D * sizeof(float));
            memcpy(pk_dv + (h * T + m) * D, w->acc_b + (h * T + idx[m]) * D, D * sizeof(float));
        }
    /* 4p.2 every head: P^T, G^T (n, 64), gsum_t = sum_h G_h^T, dv += P^T dout */
    memset(w->gsum_t, 0, n * T * sizeof(float));
    for (size_t h = 0; h < H; h++) {
        const size_t row0 = (b * H + h) * N + i0;                      /* row (b, h, i0) */
        float lse_r[T], delta_r[T];          /* the block's rows; padding: P = 0, G = 0 there */
        for (size_t r = 0; r < T; r++) {
            lse_r[r] = r < rows ? pr->lse[row0 + r] : INFINITY;
            delta_r[r] = r < rows ? pr->delta[row0 + r] : 0.0f;
        }
        float *p_h = w->p + h * T * T, *g_h = w->g + h * T * T;       /* (n, 64) key-major */
        if (h == s) {                                                  /* L_s is ls */
            memcpy(p_h, pk->ls, n * T * sizeof(float));
            kern->probs_t(p_h, pk->ft, n, lse_r);                      /* P = exp(L-F-lse) */
        } else {
            kern->gemm_nt_probs_t(pk->k + h * T * D, n, block_tile(pr->qt, b, h, qb, H, nqb, D),
                                  D, pr->scale, pk->ft, lse_r, p_h);   /* P = exp(L-F-lse) */
        }
        kern->gemm_nt_grad_t(pk->v + h * T * D, n, block_tile(pr->doutt, b, h, qb, H, nqb, D),
                             D, p_h, delta_r, g_h, w->gsum_t);         /* G = P (dP - delta) */
        kern->gemm_acc(p_h, n, pr->dout + row0 * D, rows, D, NULL,
                       pk_dv + h * T * D);                             /* dv += P^T dout */
    }
    /* 4p.3 the selector head's path through F, on the whole tile (rows, 64): gsum, the rank
     * penalty, the dF rows, dS = reverse cumsum gated by S > 0 into gsel */
    memset(w->gsum, 0, T * T * sizeof(float));
    for (size_t m = 0; m < n; m++)
        for (size_t r = 0; r < rows; r++) w->gsum[r * T + idx[m]] = w->gsum_t[m * T + r];
    if (pr->theta) {        /* as in key_block_grads (dead columns: gsum = 0, nothing to add) */
        float *w_row = pr->past_sum + (dq_chunk(kb, pr->nchunks) * pr->B + b) * N + i0;
        for (size_t r = 0; r < rows; r++) {
            const float th = w->theta_rows[r];
            float part = 0.0f;
            for (size_t m = 0; m < n; m++) {
                float *x = w->gsum + r * T + idx[m];
                if (w->ftile[idx[m] * T + r] > th) {    /* F_soft > theta iff F > theta */
                    part += *x;
                    *x += pr->strength * *x;
                }
            }
            w_row[r] += part;
        }
    }
    if (pr->df) subtract_df_rows(pr, b, qb, kb, w->gsum);
    memset(w->gsel, 0, T * T * sizeof(float));
    kern->selector_grad(w->gsum, w->sel, rows, w->carry, w->gsel);
    float *g_s = w->g + s * T * T;
    for (size_t m = 0; m < n; m++)                  /* live columns: into the packed G_s */
        for (size_t r = 0; r < rows; r++) g_s[m * T + r] += w->gsel[r * T + idx[m]];
    int dead_grad = 0;                              /* does a dead column get anything? */
    for (size_t c = 0; c < ncols && !dead_grad; c++)
        for (size_t r = 0; r < rows && !live[c]; r++) dead_grad |= w->gsel[r * T + c] != 0.0f;
    if (dead_grad)            /* then the selector head's G is worked on whole, (rows, 64) */
        for (size_t m = 0; m < n; m++)
            for (size_t r = 0; r < rows; r++) w->gsel[r * T + idx[m]] = g_s[m * T + r];
    /* 4p.4 every head: dk += G^T q, dq += G k on the pack; the packed rows put back */
    for (size_t h = 0; h < H; h++) {
        const size_t row0 = (b * H + h) * N + i0;
        const float *g_h = w->g + h * T * T;
        if (!(h == s && dead_grad)) {
            kern->gemm_acc(g_h, n, pr->q + row0 * D, rows, D, NULL, pk_dk + h * T * D); /* dk */
            kern->gemm_acc_t(g_h, rows, pk->k + h * T * D, n, D, NULL,
                             dq_part + row0 * D);                                      /* dq */
        }
        for (size_t m = 0; m < n; m++) {
            memcpy(w->acc_a + (h * T + idx[m]) * D, pk_dk + (h * T + m) * D, D * sizeof(float));
            memcpy(w->acc_b + (h * T + idx[m]) * D, pk_dv + (h * T + m) * D, D * sizeof(float));
        }
    }
    if (dead_grad) {      /* the selector head on the whole tile, as key_block_grads does it */
        const size_t row0 = (b * H + s) * N + i0;
        kern->gemm_acc_t(w->gsel, ncols, pr->q + row0 * D, rows, D, NULL,
                         w->acc_a + s * T * D);                              /* dk += G^T q */
        kern->gemm_acc(w->gsel, rows, pr->k + ((b * H + s) * N + j0) * D, ncols, D, NULL,
                       dq_part + row0 * D);                                  /* dq += G k */
    }
}

/* Pass 4 for one (b, key block): dk and dv of the block, and its share of dq added into
 * dq_part (B, H, N, D), the partial sum of the block's dq chunk. */
static void key_block_grads(const problem *pr, size_t b, size_t kb, scratch *w, float *dk,
                            float *dv, float *dq_part)
{
    const size_t H = pr->H, N = pr->N, D = pr->D, nqb = pr->nqb;
    const size_t j0 = kb * T, ncols = block_len(N, j0);
    memset(w->acc_a, 0, H * T * D * sizeof(float));
    memset(w->acc_b, 0, H * T * D * sizeof(float));
    memset(w->carry, 0, T * sizeof(float));
    /* dead tiles: from query block `dead` down (dead_keys.h); `pending` once extra dF rows were
     * met at or below the current block (their reverse cumsum must run up through it) */
    const size_t dead = pr->dead_from ? (size_t)pr->dead_from[b * nqb + kb] : nqb;
    int pending = 0;
    for (size_t qb = nqb; qb-- > kb;) {                 /* bottom up: the reverse cumsum */
        const size_t i0 = qb * T, rows = block_len(N, i0);
        if (qb >= dead) {
            const size_t cell = b * nqb + qb;
            pending |= pr->df && pr->df->first[cell + 1] > pr->df->first[cell];
            if (pending) dead_tile_selector(pr, b, qb, kb, w, w->acc_a + pr->s * T * D, dq_part);
            continue;
        }
        if (pr->dead_from && kb < qb) {
            /* some keys of the tile dead for this block (not all: qb < dead)? then only the
             * live ones are worked on (packed_tile_grads) */
            unsigned char live[T];
            const size_t nlive = tile_live_keys(pr->bound, b, qb, kb,
                                                pr->sel.fstart + (b * nqb + qb) * N, live);
            if (nlive < ncols) {
                packed_tile_grads(pr, b, qb, kb, live, w, dq_part);
                continue;
            }
        }
        const tile_pos tp = {i0, j0, rows, ncols, pr->selective ? w->ftile : NULL};
        tile_probs_and_grads(pr, b, &tp, w);
        if (pr->selective && pr->theta) {
            /* dF = rank_penalty_backward(dF_soft): a past key passes (1 + strength) times its
             * gradient (`F_soft = F + strength * (F - theta)`); its share for the cut,
             * -strength times the row's sum W over the past keys, goes in pass 4b */
            float *w_row = pr->past_sum + (dq_chunk(kb, pr->nchunks) * pr->B + b) * N + i0;
            for (size_t r = 0; r < rows; r++) {
                const float th = w->theta_rows[r];
                float part = 0.0f;
                for (size_t c = 0; c < ncols; c++) {
                    float *x = w->gsum + r * T + c;
                    if (w->ftile[r * T + c] > th) {      /* F_soft > theta iff F > theta */
                        part += *x;
                        *x += pr->strength * *x;
                    }
                }
                w_row[r] += part;
            }
        }
        if (pr->selective) {
            /* dF_total = dF_attention + dF_extra: the memory loss' rows join -gsum */
            if (pr->df) subtract_df_rows(pr, b, qb, kb, w->gsum);
            /* dS = reverse cumsum of dF = -gsum, gated where S > 0, into G_s (§ 7) */
            pr->kern->selector_grad(w->gsum, w->sel, rows, w->carry, w->g + pr->s * T * T);
        }
        for (size_t h = 0; h < H; h++) {
            const size_t row0 = (b * H + h) * N + i0;                      /* row (b, h, i0) */
            const float *q_bhi = pr->q + row0 * D;                         /* (rows, D) */
            const float *dout_bhi = pr->dout + row0 * D;                   /* (rows, D) */
            const float *k_bhj = pr->k + ((b * H + h) * N + j0) * D;       /* (ncols, D) */
            const float *g_h = w->g + h * T * T;
            pr->kern->gemm_acc_t(w->p + h * T * T, ncols, dout_bhi, rows, D, NULL,
                                 w->acc_b + h * T * D);                 /* dv += P^T dout */
            pr->kern->gemm_acc_t(g_h, ncols, q_bhi, rows, D, NULL,            /* dk += G^T q */
                                 w->acc_a + h * T * D);
            pr->kern->gemm_acc(g_h, rows, k_bhj, ncols, D, NULL,
                               dq_part + row0 * D);                     /* dq += G k */
        }
    }
    for (size_t h = 0; h < H; h++) {
        float *dk_bhj = dk + ((b * H + h) * N + j0) * D;                   /* (ncols, D) */
        float *dv_bhj = dv + ((b * H + h) * N + j0) * D;                   /* (ncols, D) */
        for (size_t e = 0; e < ncols * D; e++) {
            dk_bhj[e] = pr->scale * w->acc_a[h * T * D + e];
            dv_bhj[e] = w->acc_b[h * T * D + e];
        }
    }
}

/* Pass 4b for one (b, key block), with the rank penalty: the cut's share of its row's gradient.
 * rank_penalty_backward's `dF[i, cut[i]] -= strength * sum_{j past} dF_soft[i, j]` is, in gsum's
 * terms (gsum = -dF), e[i, cut[i]] = -strength * W[i] with W[i] = sum of gsum over row i's past
 * keys, which pass 4 left in past_sum (one partial sum per dq chunk, added here in chunk order).
 * Like any gradient on F it goes through the reverse cumsum down its column and the S > 0 gate
 * into the selector head only: G_s = selector_grad(e), then dk_s += scale * G_s^T q_s and the
 * chunk's dq partial sum += G_s k_s. Query tiles from the last one up, as in pass 4; tiles below
 * the lowest row whose cut falls in this key block are skipped (nothing to carry yet). */
static void cut_share_grads(const problem *pr, size_t b, size_t kb, scratch *w, float *dk,
                            float *dq_part)
{
    const size_t H = pr->H, N = pr->N, D = pr->D, nqb = pr->nqb, s = pr->s;
    const size_t j0 = kb * T, ncols = block_len(N, j0);
    const int64_t *cut_b = pr->cut + b * N;
    int any = 0;               /* does a row (i >= j0: cut[i] <= i) cut in this key block? */
    for (size_t i = j0; i < N && !any; i++)
        any = cut_b[i] >= (int64_t)j0 && cut_b[i] < (int64_t)(j0 + ncols);
    if (!any) return;
    float *e = w->gsum;                  /* (T, T) the cuts' shares, in gsum's terms */
    float *g = w->g;                     /* (T, T) the selector head's extra dL */
    float *acc = w->acc_a;               /* (T, D) its dk on the key block */
    memset(acc, 0, T * D * sizeof(float));
    memset(w->carry, 0, T * sizeof(float));
    int live = 0;                        /* has the carry been given anything yet? */
    const size_t row_s = (b * H + s) * N;                            /* row (b, s, 0) */
    for (size_t qb = nqb; qb-- > kb;) {
        const size_t i0 = qb * T, rows = block_len(N, i0);
        memset(e, 0, T * T * sizeof(float));
        for (size_t r = 0; r < rows; r++) {
            const size_t i = i0 + r;
            const int64_t c = cut_b[i];
            if (c < (int64_t)j0 || c >= (int64_t)(j0 + ncols) || c > (int64_t)i) continue;
            float w_i = 0.0f;                                   /* W[i], in chunk order */
            for (size_t ch = 0; ch < pr->nchunks; ch++)
                w_i += pr->past_sum[(ch * pr->B + b) * N + i];
            e[r * T + (size_t)c - j0] = -pr->strength * w_i;
            live |= e[r * T + (size_t)c - j0] != 0.0f;
        }
        if (!live) continue;             /* carry and e are zero: this tile gets nothing */
        selection_of_tile(&pr->sel, b, qb, kb, w->ls, w->sel);        /* S, for the gate */
        memset(g, 0, T * T * sizeof(float));
        pr->kern->selector_grad(e, w->sel, rows, w->carry, g);  /* dS = reverse cumsum, gated */
        const float *q_bsi = pr->q + (row_s + i0) * D;                 /* (rows, D) */
        const float *k_bsj = pr->k + (row_s + j0) * D;                 /* (ncols, D) */
        pr->kern->gemm_acc_t(g, ncols, q_bsi, rows, D, NULL, acc);         /* dk += G^T q */
        pr->kern->gemm_acc(g, rows, k_bsj, ncols, D, NULL, dq_part + (row_s + i0) * D);
    }
    float *dk_bsj = dk + (row_s + j0) * D;                             /* (ncols, D) */
    for (size_t x = 0; x < ncols * D; x++) dk_bsj[x] += pr->scale * acc[x];
}

int selattn_backward(const float *q, const float *k, const float *v,
                     const float *out, const float *lse, const float *fstart,
                     const float *dout,
                     size_t B, size_t H, size_t N, size_t D,
                     size_t selector_head, int protect_bos, int selective, float scale,
                     float *dq, float *dk, float *dv, int nthreads)
{
    return selattn_backward_df_rows(q, k, v, out, lse, fstart, dout, NULL, NULL, 0, B, H, N, D,
                                    selector_head, protect_bos, selective, scale, dq, dk, dv,
                                    nthreads);
}

int selattn_backward_df_rows(const float *q, const float *k, const float *v,
                             const float *out, const float *lse, const float *fstart,
                             const float *dout,
                             const float *dF_rows, const int64_t *dF_row_index, size_t R,
                             size_t B, size_t H, size_t N, size_t D,
                             size_t selector_head, int protect_bos, int selective, float scale,
                             float *dq, float *dk, float *dv, int nthreads)
{
    return selattn_backward_soft(q, k, v, out, lse, fstart, dout, dF_rows, dF_row_index, R,
                                 B, H, N, D, selector_head, protect_bos, selective, scale,
                                 0.0f, NULL, NULL, dq, dk, dv, nthreads);
}

int selattn_backward_soft(const float *q, const float *k, const float *v,
                          const float *out, const float *lse, const float *fstart,
                          const float *dout,
                          const float *dF_rows, const int64_t *dF_row_index, size_t R,
                          size_t B, size_t H, size_t N, size_t D,
                          size_t selector_head, int protect_bos, int selective, float scale,
                          float soft_strength, const float *soft_theta, const int64_t *soft_cut,
                          float *dq, float *dk, float *dv, int nthreads)
{
    return selattn_backward_skip(q, k, v, out, lse, fstart, dout, dF_rows, dF_row_index, R,
                                 B, H, N, D, selector_head, protect_bos, selective, scale,
                                 soft_strength, soft_theta, soft_cut, 0.0f, dq, dk, dv, nthreads);
}

int selattn_backward_skip(const float *q, const float *k, const float *v,
                          const float *out, const float *lse, const float *fstart_in,
                          const float *dout,
                          const float *dF_rows, const int64_t *dF_row_index, size_t R,
                          size_t B, size_t H, size_t N, size_t D,
                          size_t selector_head, int protect_bos, int selective, float scale,
                          float soft_strength, const float *soft_theta, const int64_t *soft_cut,
                          float dead_key_threshold, float *dq, float *dk, float *dv,
                          int nthreads)
{
    const selattn_kernels *kern = selattn_select_kernels();
    const size_t nqb = num_blocks(N);
    const size_t nchunks = nqb < SELATTN_DQ_CHUNKS ? nqb : SELATTN_DQ_CHUNKS;
    const size_t nel = B * H * N * D;                  /* elements of q (and of dq) */
    const int team = team_size(nthreads);
    (void)team;                                        /* unused in a serial build */
    float *fstart_own = NULL;           /* (B, nqb, N), built here when the caller has none */
    float *delta = big_alloc(B * H * N * sizeof(float));  /* (B, H, N) */
    float *kt = big_alloc(B * H * nqb * D * T * sizeof(float)); /* (B, H, nqb, D, T) */
    float *vt = big_alloc(B * H * nqb * D * T * sizeof(float)); /* (B, H, nqb, D, T) */
    /* (nchunks - 1, B, H, N, D) partial sums of dq; chunk 0 adds into dq itself */
    float *dq_parts = nchunks > 1 ? big_alloc((nchunks - 1) * nel * sizeof(float)) : NULL;
    /* the extra dF rows, sorted into query blocks: O(B (R + nqb)), only when there are some */
    const int with_df = selective && dF_rows && dF_row_index && R > 0 && B > 0 && N > 0;
    df_rows df = {dF_rows, dF_row_index, R, NULL, NULL};
    if (with_df) {
        df.first = malloc((B * nqb + 1) * sizeof(size_t));
        df.order = malloc(B * R * sizeof(size_t));
    }
    /* the rank penalty: W's partial sums per dq chunk, (nchunks, B, N) */
    const int with_soft = selective && soft_theta && soft_cut && B > 0 && N > 0;
    float *past_sum = with_soft ? calloc(nchunks * B * N, sizeof(float)) : NULL;
    int rc = (!delta || !kt || !vt || (nchunks > 1 && !dq_parts) ||
              (with_df && (!df.first || !df.order)) || (with_soft && !past_sum))
             ? SELATTN_ENOMEM : SELATTN_OK;
    if (rc == SELATTN_OK && with_df) df_rows_index(&df, B, N, nqb);
    if (rc == SELATTN_OK) {
        /* Pass 0: transposed key and value tiles */
        transpose_blocks(kern, k, B, H, N, D, kt, nthreads);
        transpose_blocks(kern, v, B, H, N, D, vt, nthreads);
    }
    if (rc == SELATTN_OK && selective && !fstart_in) {
        /* Pass 1-2: the mask entering each query block (the forward's rows, when it kept them) */
        fstart_own = big_alloc(B * nqb * N * sizeof(float));
        const selector sp = {kern, q, kt, NULL, H, N, D, nqb, selector_head, protect_bos, scale,
                             H, selector_head};
        rc = !fstart_own ? SELATTN_ENOMEM
             : selector_block_prefix(&sp, B, nqb, nqb, fstart_own, nthreads);
    }
    const float *fstart = fstart_in ? fstart_in : fstart_own;
    /* dead keys: the bound, the first query block each key tile is dead for (from the Fstart
     * rows), and for the packs of partly dead tiles the query and dout blocks transposed */
    int64_t *dead_from = NULL;
    dead_bound bound = {0};
    float *qt = NULL, *doutt = NULL;   /* (B, H, nqb, D, T) */
    const int skip = rc == SELATTN_OK && selective && dead_keys_on(dead_key_threshold) && N > 0;
    if (skip) {
        dead_from = malloc(B * nqb * sizeof(int64_t));
        qt = big_alloc(B * H * nqb * D * T * sizeof(float));
        doutt = big_alloc(B * H * nqb * D * T * sizeof(float));
        rc = !dead_from || !qt || !doutt ? SELATTN_ENOMEM
             : dead_bound_init(&bound, q, k, B, H, N, D, protect_bos, scale, dead_key_threshold,
                               nthreads);
        if (rc == SELATTN_OK) {
            dead_from_rows(&bound, B, fstart, dead_from, nthreads);
            transpose_blocks(kern, q, B, H, N, D, qt, nthreads);
            transpose_blocks(kern, dout, B, H, N, D, doutt, nthreads);
        }
    }
    if (rc != SELATTN_OK) {
        free(fstart_own); free(delta); free(kt); free(vt); free(dq_parts);
        free(df.first); free(df.order); free(past_sum); free(dead_from);
        free(qt); free(doutt); dead_bound_free(&bound);
        return rc;
    }

    /* Pass 3: delta = rowsum(dout * out); the dq partial sums start at 0 */
    #pragma omp parallel for num_threads(team) schedule(static)
    for (size_t row = 0; row < B * H * N; row++) {
        float acc = 0.0f;
        for (size_t d = 0; d < D; d++) acc += dout[row * D + d] * out[row * D + d];
        delta[row] = acc;
        memset(dq + row * D, 0, D * sizeof(float));
        for (size_t c = 1; c < nchunks; c++)
            memset(dq_parts + (c - 1) * nel + row * D, 0, D * sizeof(float));
    }

    const problem pr = {q, k, v, lse, dout, delta, kt, vt,
                        {kern, q, kt, fstart, H, N, D, nqb, selector_head, protect_bos, scale,
                         H, selector_head},
                        H, N, D, nqb, selector_head, selective, scale, kern,
                        with_df ? &df : NULL,
                        with_soft ? soft_theta : NULL, soft_cut, soft_strength, past_sum,
                        B, nchunks, dead_from, skip ? &bound : NULL, qt, doutt};
    int failed = 0;
    #pragma omp parallel num_threads(team)
    {
        scratch w;
        team_note_alloc(scratch_alloc(&w, H, D, skip), &failed);
        /* Pass 4: one task per (b, dq chunk); it walks the chunk's key blocks in increasing
         * order, so each partial sum of dq is added up in the same order for any team size. */
        #pragma omp for schedule(dynamic, 1)
        for (size_t task = 0; task < B * nchunks; task++) {
            const size_t b = task / nchunks, c = task % nchunks;
            float *dq_part = c == 0 ? dq : dq_parts + (c - 1) * nel;
            for (size_t kb = 0; kb < nqb && !failed; kb++)
                if (dq_chunk(kb, nchunks) == c) key_block_grads(&pr, b, kb, &w, dk, dv, dq_part);
        }
        /* (the loop's implicit barrier: every partial sum is complete) */

        /* Pass 4b, with the rank penalty: the cuts' shares (every W is complete), into the
         * same dq partial sums and key blocks as pass 4, by the same ownership */
        if (with_soft) {
            #pragma omp for schedule(dynamic, 1)
            for (size_t task = 0; task < B * nchunks; task++) {
                const size_t b = task / nchunks, c = task % nchunks;
                float *dq_part = c == 0 ? dq : dq_parts + (c - 1) * nel;
                for (size_t kb = 0; kb < nqb && !failed; kb++)
                    if (dq_chunk(kb, nchunks) == c) cut_share_grads(&pr, b, kb, &w, dk, dq_part);
            }
        }

        /* Pass 5: dq = scale * (part_0 + part_1 + ...), in chunk order */
        #pragma omp for schedule(static)
        for (size_t row = 0; row < B * H * N; row++) {
            if (failed) continue;
            float *dq_row = dq + row * D;
            for (size_t c = 1; c < nchunks; c++) {
                const float *part = dq_parts + (c - 1) * nel + row * D;
                for (size_t d = 0; d < D; d++) dq_row[d] += part[d];
            }
            for (size_t d = 0; d < D; d++) dq_row[d] *= scale;
        }
        scratch_free(&w);
    }
    free(fstart_own); free(delta); free(kt); free(vt); free(dq_parts);
    free(df.first); free(df.order); free(past_sum); free(dead_from);
    free(qt); free(doutt); dead_bound_free(&bound);
    return failed ? SELATTN_ENOMEM : SELATTN_OK;
}
