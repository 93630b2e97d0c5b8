/* Dead keys: the rigorous bound of dead_keys.h, and which key tiles it kills.
 * The proof is in docs/kernel-design.md ("Dead keys"). */
#include <stdlib.h>

#include "selattn.h"
#include "dead_keys.h"
#include "selector_mask.h"
#include "omp_compat.h"

#define T SELATTN_TILE

/* Relative margin on every logit bound: covers the float32 rounding of the kernels' dot products
 * (|fl(q.k) - q.k| <= D 2^-24 |q| |k| / (1 - D 2^-24)) for D up to 2^14, and of the scale. */
#define EPS (1.0 / 256.0)
/* F as the kernels subtract it: fl(L - F) >= ... loses at most 2^-24 |L - F|; this factor on F
 * (and EPS on L) covers it. */
#define F_SHRINK (1.0 - 1.0 / 1048576.0)

/* x . y in double, in four interleaved partial sums (d mod 4) added as (s0 + s1) + (s2 + s3): a
 * fixed order, so the same bits every call, and four independent chains instead of one (this runs
 * 4 B H N times per call, D terms each, in the forward and again in the backward). Its rounding,
 * about D 2^-53 relative, is far inside the bound's margins (EPS, F_SHRINK). */
static double dot(const float *x, const float *y, size_t D)
{
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    size_t d = 0;
    for (; d + 4 <= D; d += 4)
        for (size_t u = 0; u < 4; u++) s[u] += (double)x[d + u] * (double)y[d + u];
    for (size_t u = 0; d < D; d++, u++) s[u] += (double)x[d] * (double)y[d];
    return (s[0] + s[1]) + (s[2] + s[3]);
}

int dead_bound_init(dead_bound *db, const float *q, const float *k, size_t B, size_t H, size_t N,
                    size_t D, int protect_bos, float scale, float t, int nthreads)
{
    const size_t nqb = num_blocks(N);
    db->t = t;
    db->H = H;
    db->N = N;
    db->nqb = nqb;
    db->knorm = malloc((B * H * N + 1) * sizeof(double));
    db->a = malloc((B * H * nqb + 1) * sizeof(double));
    db->c = malloc((B * H * nqb + 1) * sizeof(double));
    if (!db->knorm || !db->a || !db->c) {
        dead_bound_free(db);
        return SELATTN_ENOMEM;
    }
    const double sc = fabs((double)scale);
    #pragma omp parallel for num_threads(team_size(nthreads)) schedule(static)
    for (size_t bh = 0; bh < B * H; bh++) {
        const float *q_bh = q + bh * N * D, *k_bh = k + bh * N * D;
        double *kn = db->knorm + bh * N;
        for (size_t j = 0; j < N; j++) kn[j] = sqrt(dot(k_bh + j * D, k_bh + j * D, D));
        /* suffix maxima over the rows, one value per block start */
        double amax = 0.0, cmax = -INFINITY;
        for (size_t i = N; i-- > 0;) {
            const double qn = sqrt(dot(q_bh + i * D, q_bh + i * D, D));
            double anchor = (double)scale * dot(q_bh + i * D, k_bh + i * D, D);
            double kref = kn[i];
            if (protect_bos) {
                const double l0 = (double)scale * dot(q_bh + i * D, k_bh, D);
                anchor = l0 > anchor ? l0 : anchor;
                kref = kn[0] > kref ? kn[0] : kref;
            }
            const double ci = -anchor + EPS * sc * qn * kref;
            amax = qn > amax ? qn : amax;
            cmax = ci > cmax ? ci : cmax;
            if (i % T == 0) {
                db->a[bh * nqb + i / T] = (1.0 + EPS) * sc * amax;
                db->c[bh * nqb + i / T] = cmax;
            }
        }
    }
    return SELATTN_OK;
}

void dead_bound_free(dead_bound *db)
{
    free(db->knorm); free(db->a); free(db->c);
    db->knorm = db->a = db->c = NULL;
}

int dead_key(const dead_bound *db, size_t b, size_t qb, size_t j, float fj)
{
    const size_t H = db->H, N = db->N, nqb = db->nqb;
    const double f = (double)fj * F_SHRINK;
    if (!(f >= db->t)) return 0;                     /* cheap first test (and NaN: alive) */
    double need = -INFINITY;
    for (size_t h = 0; h < H; h++) {
        const size_t bh = b * H + h;
        const double x = db->a[bh * nqb + qb] * db->knorm[bh * N + j] + db->c[bh * nqb + qb];
        need = x > need ? x : need;
    }
    return f >= db->t + need;
}

int dead_tile(const dead_bound *db, size_t b, size_t qb, size_t kb, const float *fstart_row)
{
    const size_t j0 = kb * T, ncols = block_len(db->N, j0);
    for (size_t c = 0; c < ncols; c++)
        if (!dead_key(db, b, qb, j0 + c, fstart_row[j0 + c])) return 0;
    return 1;
}

size_t tile_live_keys(const dead_bound *db, size_t b, size_t qb, size_t kb,
                      const float *fstart_row, unsigned char *live)
{
    const size_t j0 = kb * T, ncols = block_len(db->N, j0);
    size_t nlive = 0;
    for (size_t c = 0; c < ncols; c++) {
        live[c] = !dead_key(db, b, qb, j0 + c, fstart_row[j0 + c]);
        nlive += live[c];
    }
    return nlive;
}

void dead_from_keys(const dead_bound *db, size_t B, const float *fstart, int64_t *key_dead_from,
                    int nthreads)
{
    const size_t nqb = db->nqb, N = db->N;
    #pragma omp parallel for num_threads(team_size(nthreads)) schedule(static)
    for (size_t bj = 0; bj < B * N; bj++) {
        const size_t b = bj / N, j = bj % N;
        size_t qb = j / T + 1;                       /* never dead in its own (diagonal) block */
        while (qb < nqb && !dead_key(db, b, qb, j, fstart[(b * nqb + qb) * N + j])) qb++;
        key_dead_from[bj] = (int64_t)qb;
    }
}

void dead_from_rows(const dead_bound *db, size_t B, const float *fstart, int64_t *dead_from,
                    int nthreads)
{
    const size_t nqb = db->nqb, N = db->N;
    #pragma omp parallel for num_threads(team_size(nthreads)) schedule(dynamic, 4)
    for (size_t task = 0; task < B * nqb; task++) {
        const size_t b = task / nqb, kb = task % nqb;
        size_t qb = kb + 1;
        while (qb < nqb && !dead_tile(db, b, qb, kb, fstart + (b * nqb + qb) * N)) qb++;
        dead_from[task] = (int64_t)qb;
    }
}

/* selattn_dead_tiles and selattn_dead_keys: the bound and the Fstart rows (the caller's, or built
 * here as the backward builds them), then per tile (per_key = 0: dead_from (B, nqb)) or per key
 * (per_key = 1: dead_from (B, N)). */
static int dead_decisions(const float *q, const float *k, const float *fstart,
                          size_t B, size_t H, size_t N, size_t D,
                          size_t selector_head, int protect_bos, int selective, float scale,
                          float dead_key_threshold, int per_key, int64_t *dead_from,
                          int nthreads)
{
    const size_t nqb = num_blocks(N);
    for (size_t x = 0; x < B * (per_key ? N : nqb); x++) dead_from[x] = (int64_t)nqb;
    if (!selective || !dead_keys_on(dead_key_threshold) || B == 0 || N == 0) return SELATTN_OK;
    const selattn_kernels *kern = selattn_select_kernels();
    float *kt_s = NULL, *own = NULL;
    int rc = SELATTN_OK;
    if (!fstart) {              /* the Fstart rows of every block, as the backward builds them */
        kt_s = big_alloc(B * nqb * D * T * sizeof(float));
        own = big_alloc(B * nqb * N * sizeof(float));
        rc = kt_s && own ? SELATTN_OK : SELATTN_ENOMEM;
        if (rc == SELATTN_OK) {
            for (size_t b = 0; b < B; b++)
                transpose_blocks(kern, k + (b * H + selector_head) * N * D, 1, 1, N, D,
                                 kt_s + b * nqb * D * T, nthreads);
            const selector sp = {kern, q, kt_s, NULL, H, N, D, nqb, selector_head, protect_bos,
                                 scale, 1, 0};
            rc = selector_block_prefix(&sp, B, nqb, nqb, own, nthreads);
        }
        fstart = own;
    }
    dead_bound bound;
    if (rc == SELATTN_OK)
        rc = dead_bound_init(&bound, q, k, B, H, N, D, protect_bos, scale, dead_key_threshold,
                             nthreads);
    if (rc == SELATTN_OK) {
        if (per_key)
            dead_from_keys(&bound, B, fstart, dead_from, nthreads);
        else
            dead_from_rows(&bound, B, fstart, dead_from, nthreads);
        dead_bound_free(&bound);
    }
    free(kt_s); free(own);
    return rc;
}

int selattn_dead_tiles(const float *q, const float *k, const float *fstart,
                       size_t B, size_t H, size_t N, size_t D,
                       size_t selector_head, int protect_bos, int selective, float scale,
                       float dead_key_threshold, int64_t *dead_from, int nthreads)
{
    return dead_decisions(q, k, fstart, B, H, N, D, selector_head, protect_bos, selective, scale,
                          dead_key_threshold, 0, dead_from, nthreads);
}

int selattn_dead_keys(const float *q, const float *k, const float *fstart,
                      size_t B, size_t H, size_t N, size_t D,
                      size_t selector_head, int protect_bos, int selective, float scale,
                      float dead_key_threshold, int64_t *key_dead_from, int nthreads)
{
    return dead_decisions(q, k, fstart, B, H, N, D, selector_head, protect_bos, selective, scale,
                          dead_key_threshold, 1, key_dead_from, nthreads);
}
