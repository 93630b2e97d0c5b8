/* selattn: selective attention (Leviathan, Kalman, Matias, arXiv 2410.02703) on the CPU.
 *
 * All tensors are float32, row-major and contiguous:
 *   q, k, v, out, dout, dq, dk, dv are (B, H, N, D); lse and delta are (B, H, N); F is (B, N, N).
 * Callers own all memory. Functions keep no global state; `nthreads` <= 0 means "OpenMP default".
 * Every function returns 0 on success, or SELATTN_ENOMEM when its per-thread scratch could not be
 * allocated (nothing of size N x N per head is ever allocated).
 */
#ifndef SELATTN_H
#define SELATTN_H

#include <stddef.h>
#include <stdint.h>

/* cdef begin: selattn_c/build_ffi.py hands the declarations from here to the "cdef end" mark to
 * cffi, so this header is the one description of the C API. */
#define SELATTN_OK 0
#define SELATTN_ENOMEM 1
#define SELATTN_EFULL 2   /* KV cache without a budget: no free slot (the caller grows it) */
#define SELATTN_ENONFINITE 3  /* an input holds NaN or infinity (only when asked to check) */
#define SELATTN_EOVERFLOW 4   /* inputs finite but so large that float32 could overflow */
/* The largest magnitude any bound on an intermediate value may reach: 2^120, a factor 2^8 below
 * FLT_MAX for rounding. The checks that use it are described in docs/reliability.md. */
#define SELATTN_MAGNITUDE_LIMIT_LOG2 120

/* Forward: out = softmax(L - F) v, and lse = the per-row log-sum-exp that backward needs.
 * selector_head in [0, H); protect_bos, selective are 0/1. fstart, when not NULL (and selective),
 * gets the accumulated mask entering each block of 64 queries, (B, ceil(N / 64), N): row qb is
 * F[64 qb, :] on its first 64 (qb + 1) keys (the rest of the row is not written). The forward
 * builds it anyway; handed to selattn_backward, it saves the backward from building it again
 * (N^2 / 64 floats per batch element: 1 MiB at N = 4096). */
int selattn_forward(const float *q, const float *k, const float *v,
                    size_t B, size_t H, size_t N, size_t D,
                    size_t selector_head, int protect_bos, int selective, float scale,
                    float *out, float *lse, float *fstart, int nthreads);

/* Backward of selattn_forward, including the path through F into the selector head's q and k.
 * out, lse and fstart are what the forward returned; fstart may be NULL (the backward then
 * builds it: one more product of the selector head per tile). dq, dk, dv are written (not
 * accumulated). */
int selattn_backward(const float *q, const float *k, const float *v,
                     const float *out, const float *lse, const float *fstart,
                     const float *dout,
                     size_t B, size_t H, size_t N, size_t D,
                     size_t selector_head, int protect_bos, int selective, float scale,
                     float *dq, float *dk, float *dv, int nthreads);

/* selattn_backward with an extra gradient on F (e.g. the memory loss'), given as rows: dF_rows
 * (B, R, N) is the gradient on F's rows dF_row_index (B, R) of each batch element; a slot whose
 * index is -1 is unused (as is any index outside [0, N)), and slots naming the same row add up.
 * Entries on keys j >= i (where F is a constant 0) and on a protected BOS contribute nothing, as
 * in the reference. Ignored when not selective (F is then the constant 0). No N x N buffer: the
 * rows are added into the tiled backward where they fall (docs/kernel-design.md). With R = 0 or
 * NULL rows it is selattn_backward. */
int selattn_backward_df_rows(const float *q, const float *k, const float *v,
                             const float *out, const float *lse, const float *fstart,
                             const float *dout,
                             const float *dF_rows, const int64_t *dF_row_index, size_t R,
                             size_t B, size_t H, size_t N, size_t D,
                             size_t selector_head, int protect_bos, int selective, float scale,
                             float *dq, float *dk, float *dv, int nthreads);

/* selattn_forward with the rank penalty of pruning-aware training (reference: forward(...,
 * soft_budget=, soft_strength=) and rank_penalty, docs/selective-attention.md § 10): row i's cut
 * theta[i] is the soft_budget-th smallest F[i, j] over its keys j <= i (no cut when i <
 * soft_budget), and every head subtracts F_soft = F + soft_strength * (F - theta) on the keys
 * past the cut (F > theta) instead of F. soft_theta (B, N) gets theta (+inf where a row has no
 * cut) and soft_cut (B, N) the cut's column (-1 where none; on equal F the lowest column), for
 * selattn_backward_soft; either may be NULL (not kept). soft_budget = 0: no penalty
 * (selattn_forward); soft_budget >= N, or not selective: no row has a cut, the result is
 * selattn_forward's bit for bit. soft_strength >= 0 and finite. Extra memory: Fstart for every
 * block (as fstart, N^2 / 64 floats per batch element, allocated when fstart is NULL) and 65 x N
 * floats per thread for the cuts; nothing N x N. */
int selattn_forward_soft(const float *q, const float *k, const float *v,
                         size_t B, size_t H, size_t N, size_t D,
                         size_t selector_head, int protect_bos, int selective, float scale,
                         size_t soft_budget, float soft_strength,
                         float *out, float *lse, float *fstart, float *soft_theta,
                         int64_t *soft_cut, int nthreads);

/* selattn_backward_df_rows through the rank penalty of selattn_forward_soft: soft_theta and
 * soft_cut (B, N) are what that forward wrote (and soft_strength what it was given); a key past
 * the cut passes (1 + soft_strength) times its gradient to F and -soft_strength times it to the
 * cut's F[i, soft_cut[i]] (reference: rank_penalty_backward); the extra dF rows are added after
 * (they are a gradient on F, not on F_soft). NULL soft_theta or soft_cut: no penalty
 * (selattn_backward_df_rows). Extra memory: 2 x B x N floats. */
int selattn_backward_soft(const float *q, const float *k, const float *v,
                          const float *out, const float *lse, const float *fstart,
                          const float *dout,
                          const float *dF_rows, const int64_t *dF_row_index, size_t R,
                          size_t B, size_t H, size_t N, size_t D,
                          size_t selector_head, int protect_bos, int selective, float scale,
                          float soft_strength, const float *soft_theta, const int64_t *soft_cut,
                          float *dq, float *dk, float *dv, int nthreads);

/* selattn_forward_soft (soft_budget = 0: selattn_forward) skipping dead keys: with
 * dead_key_threshold t > 0 and finite, a key tile whose F at a query block's first row guarantees
 * (docs/kernel-design.md, "Dead keys") that each of its keys has a weight below e^-t of the row's
 * total in every head and every row of that block and all later blocks is skipped for them (no
 * selector logits, no QK, no exp, no PV). t <= 0 or not finite: exact, selattn_forward_soft bit
 * for bit. fstart, when kept, then holds +inf on a dead tile's keys from the block after its
 * death on (not F: hand it to selattn_backward_skip with the same t, not to the memory loss). */
int selattn_forward_skip(const float *q, const float *k, const float *v,
                         size_t B, size_t H, size_t N, size_t D,
                         size_t selector_head, int protect_bos, int selective, float scale,
                         size_t soft_budget, float soft_strength, float dead_key_threshold,
                         float *out, float *lse, float *fstart, float *soft_theta,
                         int64_t *soft_cut, int nthreads);

/* selattn_backward_soft skipping the dead keys selattn_forward_skip skipped (the same
 * dead_key_threshold; fstart that forward's, or NULL): a dead tile costs nothing, except the
 * selector head's S, dS and its dq, dk where extra dF rows lie below it (their reverse cumsum
 * runs up through it); in a partly dead tile only the live keys are worked on (packed), while
 * the selector head's path through F (dF rows, the rank penalty) still runs up every column.
 * Exact (selattn_backward_soft bit for bit) for t <= 0 or not finite. */
int selattn_backward_skip(const float *q, const float *k, const float *v,
                          const float *out, const float *lse, const float *fstart,
                          const float *dout,
                          const float *dF_rows, const int64_t *dF_row_index, size_t R,
                          size_t B, size_t H, size_t N, size_t D,
                          size_t selector_head, int protect_bos, int selective, float scale,
                          float soft_strength, const float *soft_theta, const int64_t *soft_cut,
                          float dead_key_threshold, float *dq, float *dk, float *dv,
                          int nthreads);

/* Which key tiles the two above skip: dead_from (B, ceil(N / 64)) gets, per key tile, the first
 * query block for which it is dead (ceil(N / 64): never). fstart is a selattn_forward_skip's
 * (with this t), an exact forward's, or NULL (then built here). Not selective, or t off: never. */
int selattn_dead_tiles(const float *q, const float *k, const float *fstart,
                       size_t B, size_t H, size_t N, size_t D,
                       size_t selector_head, int protect_bos, int selective, float scale,
                       float dead_key_threshold, int64_t *dead_from, int nthreads);

/* The same per key: key_dead_from (B, N) gets, per key, the first query block for which it is
 * dead (ceil(N / 64): never), the decision the forward and the backward make when they pack the
 * live keys of a partly dead tile. A tile's dead_from is the largest of its keys'. */
int selattn_dead_keys(const float *q, const float *k, const float *fstart,
                      size_t B, size_t H, size_t N, size_t D,
                      size_t selector_head, int protect_bos, int selective, float scale,
                      float dead_key_threshold, int64_t *key_dead_from, int nthreads);

/* The memory loss' row sums without any N x N buffer (reference: memory_loss, docs § 8):
 * kept (B, N), kept[b, i] = sum_{j <= i} (1 - min(F[b, i, j], tau) / tau), summed in double;
 * mem[b] = max_i kept[b, i]. fstart is the forward's (selattn_forward), or NULL (then built here:
 * N^2 / 64 floats per batch element). tau > 0. */
int selattn_memory_rows(const float *q, const float *k, const float *fstart,
                        size_t B, size_t H, size_t N, size_t D,
                        size_t selector_head, int protect_bos, float scale, float tau,
                        float *kept, int nthreads);

/* Rows of the accumulated mask F without any N x N buffer: F_rows (B, R, N) gets F[b, r, :] for
 * r = row_index[b, slot] (zero where j > r, as F is), and zeros for a slot of index -1 (or any
 * index outside [0, N)). fstart as in selattn_memory_rows; without it a row r costs the selector
 * head's tiles above it. The same bits of F as the forward, the backward and
 * selattn_memory_rows. */
int selattn_mask_rows(const float *q, const float *k, const float *fstart,
                      size_t B, size_t H, size_t N, size_t D,
                      size_t selector_head, int protect_bos, float scale,
                      const int64_t *row_index, size_t R, float *F_rows, int nthreads);

/* The accumulated mask F (B, N, N), materialised: for inspection and plots only. */
int selattn_accumulated_mask(const float *q, const float *k,
                             size_t B, size_t H, size_t N, size_t D,
                             size_t selector_head, int protect_bos, float scale,
                             float *F, int nthreads);

/* Budgeted forward (pruned prefill): each query attends only to the keys a `budget`-slot KV cache
 * still holds when it arrives (the rule of kv_cache.c). No N x N memory: the eviction schedule is
 * (B, N). Same arguments as selattn_forward, without lse (there is no budgeted backward). */
int selattn_forward_budget(const float *q, const float *k, const float *v,
                           size_t B, size_t H, size_t N, size_t D,
                           size_t selector_head, int protect_bos, int selective, float scale,
                           size_t budget, float *out, int nthreads);

/* selattn_forward_budget skipping dead keys as selattn_forward_skip does (dead_key_threshold t;
 * t <= 0 or not finite: exact): the same outputs as a selattn_kv_prefill into an empty cache
 * with that budget and t, bit for bit. */
int selattn_forward_budget_skip(const float *q, const float *k, const float *v,
                                size_t B, size_t H, size_t N, size_t D,
                                size_t selector_head, int protect_bos, int selective,
                                float scale, size_t budget, float dead_key_threshold,
                                float *out, int nthreads);

/* A pruned KV cache for one attention layer. The caller owns every array (zero-initialised, pos
 * filled with -1) and this struct; the functions below keep no other state.
 * capacity is a multiple of 64 (the tile width) and >= budget. Keys are stored as transposed
 * tiles of 64 slots, like the forward's key tiles, so one step is a row of tile products. */
typedef struct {
    size_t B, H, D, capacity;
    float *kt;            /* (B, H, capacity / 64, D, 64) keys: slot c of tile t at [t][d][c] */
    float *v;             /* (B, H, capacity, D) values */
    int64_t *pos;         /* (B, capacity) absolute position held by each slot, -1 = free */
    float *F;             /* (B, capacity) running accumulated mask of each slot, 0 when free */
    int64_t *size;        /* (B,) tokens held */
    int64_t *evictions;   /* (B,) tokens evicted so far */
    int64_t *newest;      /* (B,) slot of the last token inserted */
    int64_t *extent;      /* (B,) one past the highest slot in use (0 when empty) */
    float *scratch;       /* (B, H, capacity) logits of one step */
    float *sel;           /* (B, capacity) the selector head's logits of one step */
    int64_t length;       /* tokens seen so far (the next token's position) */
    size_t budget;        /* most tokens held; 0 = no budget (grow when full) */
    float evict_threshold;  /* drop held tokens whose F exceeds it; +inf = never */
    size_t selector_head;
    int protect_bos, selective;
    float scale;
    float dead_key_threshold;  /* the prefill from empty skips dead keys (selattn_forward_skip);
                                * 0 (or not finite): exact */
    float *maxima;        /* (2,) largest |k| and |v| stored so far (0 when empty) */
} selattn_kv_cache;

/* One token: q, k, v, out are (B, H, D). Returns SELATTN_EFULL when a cache without budget has
 * no free slot, and, when check_finite is set, SELATTN_ENONFINITE when an input is not finite and
 * SELATTN_EOVERFLOW when the inputs, the keys and values held and the accumulated mask are so
 * large that a logit, the mask or the output could overflow float32; in every case before
 * anything changes. */
int selattn_kv_step(selattn_kv_cache *c, const float *q, const float *k, const float *v,
                    float *out, int check_finite, int nthreads);

/* N tokens: q, k, v, out are (B, H, N, D); the same result and state as N steps. From an empty
 * cache it runs the eviction rule on the selector head, then the blocked forward with that
 * eviction schedule; on a cache that already holds tokens it runs N steps. */
int selattn_kv_prefill(selattn_kv_cache *c, const float *q, const float *k, const float *v,
                       size_t N, float *out, int check_finite, int nthreads);

/* 1 when none of x[0..n) is NaN or infinite, else 0 (the Python wrappers' input check). */
int selattn_all_finite(const float *x, size_t n, int nthreads);
/* max |x[i]| over x[0..n), or +infinity when some x[i] is NaN or infinite (one read, no
 * temporary): the finiteness check and the magnitude that the overflow bounds need at once. */
float selattn_max_abs(const float *x, size_t n, int nthreads);

/* Threads and build facts. */
int selattn_openmp_enabled(void);
int selattn_max_threads(void);
/* Which tile kernels run on this CPU: "avx512", "avx2" or "generic". */
const char *selattn_kernel_name(void);
/* "" for an OpenMP build, else why it is serial. */
const char *selattn_serial_reason(void);
/* Ends the OpenMP worker threads that the calling thread's parallel regions started (they start
 * again at its next parallel region), so that a fork() right after leaves the child no pool of
 * threads that do not exist there. 0 when done (or nothing to do: a serial build), nonzero when
 * the OpenMP runtime cannot (then a forked child must run its kernels with 1 thread). Not from
 * inside a kernel. */
int selattn_release_threads(void);
/* cdef end */

#endif /* SELATTN_H */
