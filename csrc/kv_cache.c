/* The pruned KV cache of one selective-attention layer: the eviction rule, one decoding step, and
 * the prefill. Reference: the KVCache class in reference/cache.py (the same steps, numbered alike);
 * the design is in docs/kv-cache.md.
 *
 * One step for the token at position p:
 *   1. make room: with `budget` tokens held, evict the one with the largest F (never BOS when
 *      protected; on equal F the oldest);
 *   2. insert p into the smallest free slot, F = 0;
 *   3. attend: every head's softmax(scale q.k - F) over the held slots, times v;
 *   4. add the selector head's relu(scale q.k) to the F of every other held token (not BOS);
 *   5. drop held tokens whose F exceeds evict_threshold.
 * The prefill runs 1, 2, 4, 5 for every token on the selector head alone (the "walk", which only
 * needs O(held) work per token) and records when each token was evicted; then the blocked forward
 * computes every head's output with that eviction schedule (forward_with_evictions). Steps 1-2
 * and 4-5 are the same functions in both, and the selector logits the same tile kernel on the
 * same slot layout, so a prefill leaves the cache bitwise as N steps would.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "selattn.h"
#include "forward_internal.h"
#include "tile_kernels.h"
#include "omp_compat.h"

#define T SELATTN_TILE

/* Below this much work (B * H * slots * D) a step runs on one thread: waking the team costs more. */
#define PARALLEL_STEP_WORK ((size_t)1 << 18)

/* max |x[i]| over x[0..n), +inf when some x[i] is NaN or infinite. */
static float max_abs(const float *x, size_t n)
{
    int ok = 1;
    float m = 0.0f;
    for (size_t i = 0; i < n; i++) {
        const float a = fabsf(x[i]);
        ok &= isfinite(x[i]) != 0;
        m = a > m ? a : m;
    }
    return ok ? m : INFINITY;
}

/* The largest |q|, |k|, |v| of n floats each: inf marks a NaN or infinity. */
typedef struct { float q, k, v; } magnitudes;

static magnitudes input_magnitudes(const float *q, const float *k, const float *v, size_t n)
{
    magnitudes m = {max_abs(q, n), max_abs(k, n), max_abs(v, n)};
    return m;
}

static int finite_magnitudes(magnitudes m)
{
    return isfinite(m.q) && isfinite(m.k) && isfinite(m.v);
}

/* 1 when `n` more tokens whose inputs have the magnitudes m cannot overflow float32 in this cache
 * (docs/reliability.md § 1, "Overflow"): with K, V the largest |k|, |v| ever stored, the logits
 * are |scale q.k| <= scale D |q| K (and the unscaled dot product <= D |q| K); the accumulated
 * mask of a held token grows by at most one logit per token, from the largest F held now; the
 * differences L - F - max inside the softmax are at most twice logit + mask; the unnormalised
 * output sums at most (tokens seen) values of size V. Every bound must stay below 2^120. */
static int magnitudes_safe(const selattn_kv_cache *c, magnitudes m, size_t n)
{
    const double limit = ldexp(1.0, SELATTN_MAGNITUDE_LIMIT_LOG2);
    const double K = fmax(c->maxima[0], m.k), V = fmax(c->maxima[1], m.v);
    const double dot = (double)c->D * m.q * K, logit = (double)c->scale * dot;
    double held_F = 0.0;
    for (size_t i = 0; i < c->B * c->capacity; i++)
        if (c->pos[i] >= 0 && c->F[i] > held_F) held_F = c->F[i];
    const double mask = held_F + (double)n * logit;
    const double seen = (double)c->length + (double)n;
    return dot <= limit && 2.0 * (logit + mask) <= limit && seen * V <= limit;
}

/* After tokens with magnitudes m were stored: the running maxima of |k| and |v|. */
static void note_magnitudes(selattn_kv_cache *c, magnitudes m)
{
    c->maxima[0] = fmaxf(c->maxima[0], m.k);
    c->maxima[1] = fmaxf(c->maxima[1], m.v);
}

/* SELATTN_OK, or why `n` tokens with magnitudes m are refused when checking. */
static int check_inputs(const selattn_kv_cache *c, magnitudes m, size_t n)
{
    if (!finite_magnitudes(m)) return SELATTN_ENONFINITE;
    if (!magnitudes_safe(c, m, n)) return SELATTN_EOVERFLOW;
    return SELATTN_OK;
}

static int evictable(const selattn_kv_cache *c, int64_t p)
{
    return p >= 0 && !(c->protect_bos && p == 0);       /* held, and not a protected BOS */
}

/* Free `slot` of batch element b; record that its token is invisible from query `when` on. */
static void free_slot(selattn_kv_cache *c, size_t b, size_t slot, int64_t when,
                      int64_t *evict_at_b)
{
    int64_t *pos_b = c->pos + b * c->capacity;
    if (evict_at_b) evict_at_b[pos_b[slot]] = when;
    pos_b[slot] = -1;
    c->F[b * c->capacity + slot] = 0.0f;
    c->size[b]--;
    c->evictions[b]++;
    while (c->extent[b] > 0 && pos_b[c->extent[b] - 1] < 0) c->extent[b]--;
}

/* Steps 1-2 for position p of batch element b; returns the slot. A free slot must exist once a
 * full budget has evicted (the caller checks room beforehand when there is no budget). */
static size_t make_room_and_insert(selattn_kv_cache *c, size_t b, int64_t p, int64_t *evict_at_b)
{
    const size_t cap = c->capacity;
    int64_t *pos_b = c->pos + b * cap;
    const float *F_b = c->F + b * cap;
    if (c->budget && (size_t)c->size[b] >= c->budget) {          /* 1. evict argmax F */
        size_t victim = cap;
        for (size_t j = 0; j < (size_t)c->extent[b]; j++) {
            if (!evictable(c, pos_b[j])) continue;
            if (victim == cap || F_b[j] > F_b[victim] ||
                (F_b[j] == F_b[victim] && pos_b[j] < pos_b[victim]))
                victim = j;
        }
        if (victim < cap) free_slot(c, b, victim, p, evict_at_b);  /* p no longer sees it */
    }
    size_t slot = (size_t)c->extent[b];                          /* 2. smallest free slot */
    if ((size_t)c->size[b] < slot) {                             /* there is a hole below */
        slot = 0;
        while (pos_b[slot] >= 0) slot++;
    }
    pos_b[slot] = p;
    c->F[b * cap + slot] = 0.0f;
    c->size[b]++;
    c->newest[b] = (int64_t)slot;
    if ((int64_t)slot >= c->extent[b]) c->extent[b] = (int64_t)slot + 1;
    return slot;
}

/* Write one token's key (into its transposed tile) and value (if v_row) for head h. */
static void store_head(selattn_kv_cache *c, size_t b, size_t h, size_t slot, const float *k_row,
                       const float *v_row)
{
    const size_t D = c->D, cap = c->capacity;
    float *kt_tile = c->kt + ((b * c->H + h) * (cap / T) + slot / T) * D * T;   /* (D, T) */
    for (size_t d = 0; d < D; d++) kt_tile[d * T + slot % T] = k_row[d];
    if (v_row) memcpy(c->v + ((b * c->H + h) * cap + slot) * D, v_row, D * sizeof(float));
}

/* x (extent rounded up to T) = scale * q_row . k of every slot of head h (free slots: garbage). */
static void slot_logits(const selattn_kernels *kern, const selattn_kv_cache *c, size_t b,
                        size_t h, const float *q_row, size_t extent, float *x)
{
    const size_t D = c->D;
    const float *kt_bh = c->kt + (b * c->H + h) * (c->capacity / T) * D * T;  /* (cap/T, D, T) */
    for (size_t t = 0; t * T < extent; t++)
        kern->gemm_nt(q_row, 1, kt_bh + t * D * T, D, c->scale, x + t * T);
}

/* Steps 4-5: F += relu(ls) on every held slot but the newest and a protected BOS; then drop the
 * slots whose F exceeds the threshold (invisible from query p + 1 on). */
static void update_mask(selattn_kv_cache *c, size_t b, const float *ls, int64_t p,
                        int64_t *evict_at_b)
{
    const size_t cap = c->capacity, extent = (size_t)c->extent[b];
    const size_t newest = (size_t)c->newest[b];
    const int64_t *pos_b = c->pos + b * cap;
    float *F_b = c->F + b * cap;
    for (size_t j = 0; j < extent; j++)                               /* 4. (§ 4) */
        if (j != newest && evictable(c, pos_b[j])) F_b[j] += ls[j] > 0.0f ? ls[j] : 0.0f;
    if (c->evict_threshold < INFINITY)                                /* 5. */
        for (size_t j = 0; j < extent; j++)
            if (j != newest && evictable(c, pos_b[j]) && F_b[j] > c->evict_threshold)
                free_slot(c, b, j, p + 1, evict_at_b);
}

/* Step 3 for head h of batch element b: out_bh (D,) = softmax(L - F) v over the held slots. x is
 * (capacity,) scratch. The selector head also leaves its raw logits in c->sel for step 4. */
static void attend_head(const selattn_kernels *kern, const selattn_kv_cache *c, size_t b,
                        size_t h, const float *q_bh, float *x, float *out_bh)
{
    const size_t D = c->D, cap = c->capacity, extent = (size_t)c->extent[b];
    const size_t ntiles = (extent + T - 1) / T;
    const int64_t *pos_b = c->pos + b * cap;
    const float *F_b = c->F + b * cap;
    const float *v_bh = c->v + (b * c->H + h) * cap * D;                       /* (cap, D) */
    slot_logits(kern, c, b, h, q_bh, extent, x);
    if (c->selective && h == c->selector_head) memcpy(c->sel + b * cap, x, extent * sizeof(float));
    float m = -INFINITY;
    for (size_t j = 0; j < ntiles * T; j++) {                          /* L - F on held slots */
        x[j] = (j < extent && pos_b[j] >= 0) ? x[j] - F_b[j] : -INFINITY;
        m = x[j] > m ? x[j] : m;                       /* finite: the newest token is held */
    }
    float l = 0.0f;
    for (size_t t = 0; t < ntiles; t++) {
        float sum;
        kern->exp_rows(x + t * T, &m, 1, &sum);
        l += sum;
    }
    memset(out_bh, 0, D * sizeof(float));
    for (size_t t = 0; t < ntiles; t++) {
        const size_t ncols = extent - t * T < T ? extent - t * T : T;
        kern->gemm_acc(x + t * T, 1, v_bh + t * T * D, ncols, D, NULL, out_bh);
    }
    const float inv = 1.0f / l;
    for (size_t d = 0; d < D; d++) out_bh[d] *= inv;
}

int selattn_kv_step(selattn_kv_cache *c, const float *q, const float *k, const float *v,
                    float *out, int check_finite, int nthreads)
{
    const selattn_kernels *kern = selattn_select_kernels();
    const size_t B = c->B, H = c->H, D = c->D, cap = c->capacity;
    const magnitudes mag = input_magnitudes(q, k, v, B * H * D);   /* always: the maxima */
    if (check_finite) {
        const int rc = check_inputs(c, mag, 1);
        if (rc != SELATTN_OK) return rc;
    }
    for (size_t b = 0; b < B; b++)       /* refuse before anything changes: no free slot and */
        if ((size_t)c->size[b] >= cap && (!c->budget || (size_t)c->size[b] < c->budget))
            return SELATTN_EFULL;        /* no eviction (a budgeted cache grows up to budget) */

    size_t widest = 0;
    for (size_t b = 0; b < B; b++) {                                   /* steps 1-2 */
        const size_t slot = make_room_and_insert(c, b, c->length, NULL);
        for (size_t h = 0; h < H; h++)
            store_head(c, b, h, slot, k + (b * H + h) * D, v + (b * H + h) * D);
        widest = (size_t)c->extent[b] > widest ? (size_t)c->extent[b] : widest;
    }
    /* step 3: each (b, h) is independent, so any number of threads gives the same bits */
    #pragma omp parallel for num_threads(team_size(nthreads)) schedule(static) \
        if (B * H * widest * D >= PARALLEL_STEP_WORK)
    for (size_t bh = 0; bh < B * H; bh++)
        attend_head(kern, c, bh / H, bh % H, q + bh * D, c->scratch + bh * cap, out + bh * D);
    if (c->selective)                                                  /* steps 4-5 */
        for (size_t b = 0; b < B; b++) update_mask(c, b, c->sel + b * cap, c->length, NULL);
    c->length++;
    note_magnitudes(c, mag);
    return SELATTN_OK;
}

/* A prompt q, k, v (B, H, N, D); s is its selector head. all_heads: store every head's keys and
 * values in the cache (a KV cache), or only the selector's keys, in the cache's head 0 (the
 * budgeted forward, which needs nothing but the eviction schedule). */
typedef struct {
    const float *q, *k, *v;
    size_t H, N, s;
    int all_heads;
} prompt;

/* Steps 1, 2, 4 and 5 of every token of the prompt for batch element b, from an empty cache:
 * evict_at_b (N,) gets the first query that no longer sees each token (N: never evicted). */
static void walk(const selattn_kernels *kern, selattn_kv_cache *c, size_t b, const prompt *pr,
                 int64_t *evict_at_b)
{
    const size_t D = c->D, N = pr->N;
    for (size_t i = 0; i < N; i++) evict_at_b[i] = (int64_t)N;
    for (size_t i = 0; i < N; i++) {
        const size_t slot = make_room_and_insert(c, b, (int64_t)i, evict_at_b);
        if (pr->all_heads) {
            for (size_t h = 0; h < pr->H; h++) {
                const size_t row = ((b * pr->H + h) * N + i) * D;
                store_head(c, b, h, slot, pr->k + row, pr->v + row);
            }
        } else if (c->selective) {
            store_head(c, b, 0, slot, pr->k + ((b * pr->H + pr->s) * N + i) * D, NULL);
        }
        if (c->selective) {
            float *ls = c->sel + b * c->capacity;
            slot_logits(kern, c, b, pr->all_heads ? pr->s : 0,
                        pr->q + ((b * pr->H + pr->s) * N + i) * D, (size_t)c->extent[b], ls);
            update_mask(c, b, ls, (int64_t)i, evict_at_b);
        }
    }
}

/* Back to empty (after a failed prefill from empty: that is the state before the call). */
static void clear(selattn_kv_cache *c)
{
    for (size_t i = 0; i < c->B * c->capacity; i++) { c->pos[i] = -1; c->F[i] = 0.0f; }
    for (size_t b = 0; b < c->B; b++)
        c->size[b] = c->evictions[b] = c->newest[b] = c->extent[b] = 0;
    c->length = 0;
}

/* Walk every batch element, then run the blocked forward with the resulting schedule. */
static int walk_then_forward(selattn_kv_cache *c, const prompt *pr, size_t B, size_t D,
                             int protect_bos, int selective, float scale, float *out,
                             int nthreads)
{
    const selattn_kernels *kern = selattn_select_kernels();
    const size_t N = pr->N;
    int64_t *evict_at = malloc(B * N * sizeof(int64_t));                    /* (B, N) */
    if (!evict_at) return SELATTN_ENOMEM;
    #pragma omp parallel for num_threads(team_size(nthreads)) schedule(dynamic, 1) if (B > 1)
    for (size_t b = 0; b < B; b++) walk(kern, c, b, pr, evict_at + b * N);
    int evicted = 0;
    for (size_t i = 0; i < B * N && !evicted; i++) evicted = evict_at[i] < (int64_t)N;
    int rc = forward_with_evictions(pr->q, pr->k, pr->v, B, pr->H, N, D, pr->s, protect_bos,
                                    selective, scale, evicted ? evict_at : NULL, NULL,
                                    c->dead_key_threshold, out, NULL, NULL, nthreads);
    free(evict_at);
    return rc;
}

/* Prefill of a cache that already holds tokens: N steps, one token of every (b, h) at a time. */
static int prefill_by_steps(selattn_kv_cache *c, const float *q, const float *k, const float *v,
                            size_t N, float *out, int nthreads)
{
    const size_t BH = c->B * c->H, D = c->D;
    for (size_t b = 0; b < c->B; b++) {  /* refuse before anything changes */
        size_t held = (size_t)c->size[b] + N;
        if (c->budget && held > c->budget) held = c->budget;
        if (held > c->capacity) return SELATTN_EFULL;
    }
    float *buf = malloc(4 * BH * D * sizeof(float));          /* q, k, v, out of one token */
    if (!buf) return SELATTN_ENOMEM;
    float *qi = buf, *ki = buf + BH * D, *vi = buf + 2 * BH * D, *oi = buf + 3 * BH * D;
    for (size_t i = 0; i < N; i++) {
        for (size_t bh = 0; bh < BH; bh++) {                  /* (B, H, N, D) -> (B, H, D) */
            memcpy(qi + bh * D, q + (bh * N + i) * D, D * sizeof(float));
            memcpy(ki + bh * D, k + (bh * N + i) * D, D * sizeof(float));
            memcpy(vi + bh * D, v + (bh * N + i) * D, D * sizeof(float));
        }
        selattn_kv_step(c, qi, ki, vi, oi, 0, nthreads);      /* room was checked above */
        for (size_t bh = 0; bh < BH; bh++)
            memcpy(out + (bh * N + i) * D, oi + bh * D, D * sizeof(float));
    }
    free(buf);
    return SELATTN_OK;
}

int selattn_kv_prefill(selattn_kv_cache *c, const float *q, const float *k, const float *v,
                       size_t N, float *out, int check_finite, int nthreads)
{
    if (N == 0) return SELATTN_OK;
    const magnitudes mag = input_magnitudes(q, k, v, c->B * c->H * N * c->D);
    if (check_finite) {
        const int rc = check_inputs(c, mag, N);
        if (rc != SELATTN_OK) return rc;
    }
    if (c->length > 0) return prefill_by_steps(c, q, k, v, N, out, nthreads);
    if (c->capacity < (c->budget && c->budget < N ? c->budget : N)) return SELATTN_EFULL;
    const prompt pr = {q, k, v, c->H, N, c->selector_head, 1};
    int rc = walk_then_forward(c, &pr, c->B, c->D, c->protect_bos, c->selective, c->scale, out,
                               nthreads);
    if (rc != SELATTN_OK) { clear(c); return rc; }
    c->length = (int64_t)N;
    note_magnitudes(c, mag);
    return SELATTN_OK;
}

int selattn_forward_budget(const float *q, const float *k, const float *v,
                           size_t B, size_t H, size_t N, size_t D,
                           size_t selector_head, int protect_bos, int selective, float scale,
                           size_t budget, float *out, int nthreads)
{
    return selattn_forward_budget_skip(q, k, v, B, H, N, D, selector_head, protect_bos,
                                       selective, scale, budget, 0.0f, out, nthreads);
}

int selattn_forward_budget_skip(const float *q, const float *k, const float *v,
                                size_t B, size_t H, size_t N, size_t D,
                                size_t selector_head, int protect_bos, int selective,
                                float scale, size_t budget, float dead_key_threshold,
                                float *out, int nthreads)
{
    if (budget >= N)            /* nothing is ever evicted */
        return forward_with_evictions(q, k, v, B, H, N, D, selector_head, protect_bos, selective,
                                      scale, NULL, NULL, dead_key_threshold, out, NULL, NULL,
                                      nthreads);
    /* A cache of the selector head's keys only: all the walk needs. */
    const size_t cap = (budget + T - 1) / T * T;
    selattn_kv_cache c = {.B = B, .H = 1, .D = D, .capacity = cap};
    c.kt = selective ? calloc(B * cap * D, sizeof(float)) : NULL;
    c.pos = malloc(B * cap * sizeof(int64_t));
    c.F = malloc(B * cap * sizeof(float));
    c.sel = malloc(B * cap * sizeof(float));
    int64_t *counts = calloc(4 * B, sizeof(int64_t));
    float maxima[2] = {0.0f, 0.0f};
    c.maxima = maxima;
    int rc = SELATTN_ENOMEM;
    if ((c.kt || !selective) && c.pos && c.F && c.sel && counts) {
        c.size = counts; c.evictions = counts + B; c.newest = counts + 2 * B;
        c.extent = counts + 3 * B;
        c.budget = budget; c.evict_threshold = INFINITY; c.selector_head = 0;
        c.protect_bos = protect_bos; c.selective = selective; c.scale = scale;
        c.dead_key_threshold = dead_key_threshold;
        clear(&c);
        const prompt pr = {q, k, v, H, N, selector_head, 0};
        rc = walk_then_forward(&c, &pr, B, D, protect_bos, selective, scale, out, nthreads);
    }
    free(c.kt); free(c.pos); free(c.F); free(c.sel); free(counts);
    return rc;
}
