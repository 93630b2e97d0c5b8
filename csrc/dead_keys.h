/* Dead keys: key tiles whose weight is provably negligible for a query block and every later one
 * (docs/kernel-design.md, "Dead keys"). The forward, the backward and the prefill skip them.
 *
 * For query block qb (first row i0) and head h, with u_h(qb) = max over rows i >= i0:
 *   a_h(qb) = (1 + EPS) * scale * max_{i >= i0} |q_hi|
 *   c_h(qb) = max_{i >= i0} ( -anchor_hi + EPS * scale * |q_hi| * max(|k_hi|, [bos] |k_h0|) )
 * where anchor_hi = max(L_hii, [bos] L_hi0) (the diagonal, and BOS when protected: keys whose F
 * is exactly 0 in every row), key j (< i0) is dead for block qb when
 *   F[i0, j] * (1 - 2^-20) >= t + max_h ( a_h(qb) * |k_hj| + c_h(qb) ),
 * and then its weight in every head and every row i >= i0 is below e^-t of the row's total. The
 * right side never grows with qb and F never decreases down a column, so a dead key stays dead.
 * A key tile is dead when all its keys are. Everything here is computed in double.
 */
#ifndef SELATTN_DEAD_KEYS_H
#define SELATTN_DEAD_KEYS_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

/* Is dead-key skipping on for this threshold? t > 0 and finite; anything else is the exact
 * (dense) kernel. */
static inline int dead_keys_on(float t) { return t > 0.0f && isfinite(t); }

typedef struct {
    double t;
    size_t H, N, nqb;
    double *knorm;      /* (B, H, N) |k_hj| */
    double *a, *c;      /* (B, H, nqb) a_h(qb), c_h(qb) */
} dead_bound;

/* Fill the bound for q, k (B, H, N, D). Returns SELATTN_OK or SELATTN_ENOMEM (then nothing to
 * free). dead_bound_free releases it (also after a failure: the pointers are NULL then). */
int dead_bound_init(dead_bound *db, const float *q, const float *k, size_t B, size_t H, size_t N,
                    size_t D, int protect_bos, float scale, float t, int nthreads);
void dead_bound_free(dead_bound *db);

/* 1 when key j (< 64 qb) of batch element b is dead for query block qb, f being F[64 qb, j]. */
int dead_key(const dead_bound *db, size_t b, size_t qb, size_t j, float f);

/* live (TILE,): live[c] = 1 when key kb * 64 + c (kb < qb) of batch element b is not dead for
 * query block qb (dead_key on fstart_row (N,), the Fstart row of block qb), 0 when it is; the
 * forward's and the backward's decision which keys of a tile to pack (key_pack.h). Returns how
 * many are live. */
size_t tile_live_keys(const dead_bound *db, size_t b, size_t qb, size_t kb,
                      const float *fstart_row, unsigned char *live);

/* 1 when key tile kb (< qb) is dead for query block qb of batch element b, reading
 * fstart_row (N,), the mask entering block qb (a tile the forward skipped holds +inf there). */
int dead_tile(const dead_bound *db, size_t b, size_t qb, size_t kb, const float *fstart_row);

/* dead_from (B, nqb): the first query block for which each key tile is dead (nqb: never), from
 * the Fstart rows fstart (B, nqb, N), read for each tile only up to its first dead block. */
void dead_from_rows(const dead_bound *db, size_t B, const float *fstart, int64_t *dead_from,
                    int nthreads);

/* key_dead_from (B, N): the first query block for which each key is dead (nqb: never), from the
 * Fstart rows fstart (B, nqb, N), read for each key only up to its first dead block. A key tile's
 * dead_from is the largest of its keys'. */
void dead_from_keys(const dead_bound *db, size_t B, const float *fstart, int64_t *key_dead_from,
                    int nthreads);

#endif /* SELATTN_DEAD_KEYS_H */
