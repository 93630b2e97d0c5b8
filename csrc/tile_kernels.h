/* The hot inner loops of selective attention, on tiles of SELATTN_TILE keys.
 *
 * Each is compiled three times (tile_kernels_{generic,avx2,avx512}.c include tile_kernels_body.h
 * with a different instruction set) and picked at run time from what the CPU supports, so a plain
 * x86-64 build works everywhere and still runs AVX-512 code where it can.
 */
#ifndef SELATTN_TILE_KERNELS_H
#define SELATTN_TILE_KERNELS_H

#include <stddef.h>

/* Keys per tile, and query rows per tile. The kernels are written for this constant. */
#define SELATTN_TILE 64

typedef struct {
    const char *name;
    /* out (rows, TILE) = scale * x (rows, D) @ yt (D, TILE); yt is a transposed, zero-padded
     * key tile. This is L = scale * q k^T for one tile (and dP = dout v^T in the backward). */
    void (*gemm_nt)(const float *x, size_t rows, const float *yt, size_t D, float scale,
                    float *out);
    /* gemm_nt finished in registers with masked_logits and exp_rows: out (rows, TILE) =
     * exp(scale * x yt - f - shift[r]) on the first nvis[r] keys of row r, 0 on the others; f may
     * be NULL. The backward's P = exp(L - F - lse), without storing L. */
    void (*gemm_nt_probs)(const float *x, size_t rows, const float *yt, size_t D, float scale,
                          const float *f, const size_t *nvis, const float *shift, float *out);
    /* gemm_nt finished with softmax_grad: g (rows, TILE) = p * (x yt - shift[r]), gsum += g when
     * not NULL. The backward's G = P * (dP - delta), without storing dP = dout v^T. */
    void (*gemm_nt_grad)(const float *x, size_t rows, const float *yt, size_t D, const float *p,
                         const float *shift, float *g, float *gsum);
    /* Key-major forms of the two above, for the backward's packs of live keys (key_pack.h): x
     * (ncols, D) key (resp. value) rows, yt (D, TILE) a transposed query (resp. dout) block, and
     * the outputs (ncols keys, TILE rows) with the query rows across the lanes, so the work is
     * O(ncols): out = exp(scale * x yt - f - shift[r]) on every entry (f (TILE, TILE) key-major or
     * NULL; no causal mask: every packed key comes before the block's first row), and
     * g = p * (x yt - shift[r]), gsum += g when not NULL. Each entry is the very operations of
     * gemm_nt_probs / gemm_nt_grad on the same key and row (same bits). */
    void (*gemm_nt_probs_t)(const float *x, size_t ncols, const float *yt, size_t D, float scale,
                            const float *f, const float *shift, float *out);
    void (*gemm_nt_grad_t)(const float *x, size_t ncols, const float *yt, size_t D,
                           const float *p, const float *shift, float *g, float *gsum);
    /* The forward's key-major logit tile, finished in registers: x (ncols keys, TILE rows) =
     * scale * k (ncols, D) @ qt (D, TILE) - f, -inf where r + off < c (off >= TILE: no mask);
     * f (TILE, TILE) key-major or NULL. colmax (TILE,) = the max over the keys of each row. */
    void (*gemm_nt_logits)(const float *k, size_t ncols, const float *qt, size_t D, float scale,
                           const float *f, int off, float *x, float *colmax);
    /* acc (rows, D) = alpha[r] * acc + p (rows, TILE) @ y (ncols, D), using the first ncols
     * columns of p; alpha may be NULL (1). This is acc = alpha acc + P v, the online softmax's
     * rescale and accumulate (and dq += G k in the backward). */
    void (*gemm_acc)(const float *p, size_t rows, const float *y, size_t ncols, size_t D,
                     const float *alpha, float *acc);
    /* acc (rows, D) = alpha[r] * acc + p^T @ y (ncols, D), where p is (ncols, TILE) and its first
     * `rows` columns are used; alpha may be NULL (1). The forward's acc = alpha acc + P v on a
     * key-major P tile, and dv += P^T dout, dk += G^T q, without transposing the tile first. */
    void (*gemm_acc_t)(const float *p, size_t rows, const float *y, size_t ncols, size_t D,
                       const float *alpha, float *acc);
    /* x (rows, TILE) <- x - f on the first nvis[r] keys of row r and -inf on the rest (the
     * causal mask and the tile's edge); f may be NULL (F = 0). rowmax (rows,) gets each row's max. */
    void (*masked_logits)(float *x, const float *f, const size_t *nvis, size_t rows,
                          float *rowmax);
    /* Key-major x (ncols keys, TILE rows) <- exp(x - f - shift[r]) (f key-major, not NULL): the
     * operations of masked_logits and exp_rows on a visible entry. The selector head's P on a
     * pack, from its logits. */
    void (*probs_t)(float *x, const float *f, size_t ncols, const float *shift);
    /* x (rows, TILE) <- exp(x - shift[r]) for x - shift <= 88 (exp(-inf) = 0; results below ~1e-38 become 0);
     * rowsum (rows,) gets each row's sum when not NULL. */
    void (*exp_rows)(float *x, const float *shift, size_t rows, float *rowsum);
    /* sel (rows, TILE) = relu(ls) on the keys first <= c < nallow[r] of row r, 0 elsewhere:
     * the selection S under its constraints (only earlier tokens, not BOS when protected). */
    void (*selection)(const float *ls, size_t first, const size_t *nallow, size_t rows,
                      float *sel);
    /* g (rows, TILE) = p * (dp - delta[r]), the softmax backward; gsum += g when not NULL. */
    void (*softmax_grad)(const float *p, const float *dp, const float *delta, size_t rows,
                         float *g, float *gsum);
    /* One online-softmax step on a key-major tile x (ncols keys, TILE query rows):
     * x[c, r] <- exp(x - f - m_new[r]) where r + off >= c (the causal mask; off >= TILE: no mask),
     * 0 elsewhere; f may be NULL. With colmax (from gemm_nt_logits), x is already masked and
     * colmax is its row max: only the exponentials are left. m, l (TILE,) running max and sum;
     * alpha (TILE,) gets exp(m_old - m_new) (1 for a row whose max is still -inf). */
    void (*softmax_t)(float *x, const float *f, size_t ncols, int off, const float *colmax,
                      float *m, float *l, float *alpha);
    /* xt (ncols, TILE)[c, r] = x[r * ldx + c] for r < rows, 0 for r >= rows. */
    void (*transpose)(const float *x, size_t ldx, size_t rows, size_t ncols, float *xt);
    /* The F tile, key-major: ft (TILE, TILE)[c, r] = fstart_cols[c] + sum_{r' < r} sel[r', c] for
     * r < rows, 0 for r >= rows (mask_tile's sums, in its order, stored transposed); colsum
     * (TILE,), unless NULL, = the sums over all rows (column_sums' bits). */
    void (*mask_tile_t)(const float *sel, const float *fstart_cols, size_t rows, float *ft,
                        float *colsum);
    /* sums (TILE,) = the column sums of x (rows, TILE), rows added in order from row 0. */
    void (*column_sums)(const float *x, size_t rows, float *sums);
    /* The selector's gradient on one tile, rows bottom-up: g[m, c] -= carry[c] where
     * sel[m, c] > 0, then carry[c] += gsum[m, c] (the reverse cumsum of dF = -gsum). */
    void (*selector_grad)(const float *gsum, const float *sel, size_t rows, float *carry,
                          float *g);
} selattn_kernels;

/* The kernel set for this CPU (a pointer to a constant table; no state is kept).
 * SELATTN_KERNELS=generic|avx2|avx512 in the environment forces one set (if the CPU has it). */
const selattn_kernels *selattn_select_kernels(void);

extern const selattn_kernels selattn_kernels_generic;
#if defined(__GNUC__) && defined(__x86_64__)
extern const selattn_kernels selattn_kernels_avx2;
extern const selattn_kernels selattn_kernels_avx512;
#endif

#endif /* SELATTN_TILE_KERNELS_H */
