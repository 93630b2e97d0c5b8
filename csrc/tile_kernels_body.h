/* Body of the tile kernels, included once per instruction set by tile_kernels_<isa>.c, which
 * defines KERNEL_ISA (a name), ROW_BLOCK (query rows per register block) and the target pragma.
 *
 * GNU vector extensions (vf = 16 floats) express the register blocking portably: the compiler
 * lowers a vf to one zmm (AVX-512), two ymm (AVX2) or four xmm (SSE2) registers.
 */
#include <math.h>
#include <string.h>

#include "tile_kernels.h"

/* Every vf helper below is static and inlined, so the vector ABI note does not apply. */
#pragma GCC diagnostic ignored "-Wpsabi"

#define CAT2(a, b) a##_##b
#define CAT(a, b) CAT2(a, b)
#define K(name) CAT(name, KERNEL_ISA)

typedef float vf __attribute__((vector_size(64)));
typedef int vi __attribute__((vector_size(64)));

static inline __attribute__((always_inline)) vf K(load)(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline __attribute__((always_inline)) void K(store)(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* ---------------------------------------------------------------------------------------------
 * gemm_acc: acc (rows, D) = alpha[r] * acc + p (rows, 64)[:, :ncols] @ y (ncols, D)
 * (alpha may be NULL: 1). The rescale of the online softmax is applied while acc is loaded.
 * gemm_acc_t: acc (rows, D) = alpha[r] * acc + p^T @ y, where p is (ncols, 64) and its first
 * `rows` columns are used: the products with a transposed tile (the forward's P v on a
 * key-major tile, dv += P^T dout, dk += G^T q), without transposing.
 * Register block: ROW_BLOCK rows x 64 values of d; then 16-wide, then scalar tails of D.
 * `p_at(i, j)` is the coefficient of y row j in acc row i. */
static inline __attribute__((always_inline)) void K(gemm_acc_impl)(
    const float *restrict p, size_t rows, const float *restrict y, size_t ncols, size_t D,
    const float *restrict alpha, float *restrict acc, const int p_transposed)
{
#define P_AT(i, j) (p_transposed ? p[(j) * SELATTN_TILE + (i)] : p[(i) * SELATTN_TILE + (j)])
    size_t i = 0;
    for (; i < rows; i += ROW_BLOCK) {
        const size_t nr = rows - i < ROW_BLOCK ? rows - i : ROW_BLOCK;
        size_t d0 = 0;
        if (nr == ROW_BLOCK) {
            for (; d0 + 64 <= D; d0 += 64) {
                vf c[ROW_BLOCK][4];
                for (int r = 0; r < ROW_BLOCK; r++) {
                    const float a_r = alpha ? alpha[i + r] : 1.0f;
                    for (int u = 0; u < 4; u++)
                        c[r][u] = a_r * K(load)(acc + (i + r) * D + d0 + 16 * u);
                }
                for (size_t j = 0; j < ncols; j++) {
                    const float *y_j = y + j * D + d0;
                    vf y0 = K(load)(y_j), y1 = K(load)(y_j + 16);
                    vf y2 = K(load)(y_j + 32), y3 = K(load)(y_j + 48);
                    for (int r = 0; r < ROW_BLOCK; r++) {
                        float a = P_AT(i + r, j);
                        c[r][0] += a * y0; c[r][1] += a * y1; c[r][2] += a * y2; c[r][3] += a * y3;
                    }
                }
                for (int r = 0; r < ROW_BLOCK; r++)
                    for (int u = 0; u < 4; u++) K(store)(acc + (i + r) * D + d0 + 16 * u, c[r][u]);
            }
        }
        for (size_t r = 0; r < nr; r++) {
            float *acc_i = acc + (i + r) * D;
            const float a_r = alpha ? alpha[i + r] : 1.0f;
            size_t d = d0;
            for (; d + 16 <= D; d += 16) {
                vf c = a_r * K(load)(acc_i + d);
                for (size_t j = 0; j < ncols; j++) c += P_AT(i + r, j) * K(load)(y + j * D + d);
                K(store)(acc_i + d, c);
            }
            for (; d < D; d++) {
                float c = a_r * acc_i[d];
                for (size_t j = 0; j < ncols; j++) c += P_AT(i + r, j) * y[j * D + d];
                acc_i[d] = c;
            }
        }
    }
#undef P_AT
}

static void K(gemm_acc)(const float *restrict p, size_t rows, const float *restrict y,
                        size_t ncols, size_t D, const float *restrict alpha, float *restrict acc)
{
    K(gemm_acc_impl)(p, rows, y, ncols, D, alpha, acc, 0);
}

static void K(gemm_acc_t)(const float *restrict p, size_t rows, const float *restrict y,
                          size_t ncols, size_t D, const float *restrict alpha,
                          float *restrict acc)
{
    K(gemm_acc_impl)(p, rows, y, ncols, D, alpha, acc, 1);
}

static inline __attribute__((always_inline)) vf K(select)(vi mask, vf a, vf b) /* mask ? a : b */
{
    return (vf)(((vi)a & mask) | ((vi)b & ~mask));
}

/* Sum and max of the 16 lanes, as a tree of lane shuffles (8 + 8, 4 + 4, 2 + 2, 1 + 1): a fixed
 * order, so the same bits every time, in registers, four steps instead of a 16-long chain. */
#define SWAP8 (vi){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7}
#define SWAP4 (vi){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11}
#define SWAP2 (vi){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13}
#define SWAP1 (vi){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14}

static inline __attribute__((always_inline)) float K(hsum)(vf v)
{
    v += __builtin_shuffle(v, SWAP8);
    v += __builtin_shuffle(v, SWAP4);
    v += __builtin_shuffle(v, SWAP2);
    v += __builtin_shuffle(v, SWAP1);
    return v[0];
}

static inline __attribute__((always_inline)) float K(hmax)(vf v)
{
    vf w = __builtin_shuffle(v, SWAP8); v = K(select)(v > w, v, w);
    w = __builtin_shuffle(v, SWAP4);    v = K(select)(v > w, v, w);
    w = __builtin_shuffle(v, SWAP2);    v = K(select)(v > w, v, w);
    w = __builtin_shuffle(v, SWAP1);    v = K(select)(v > w, v, w);
    return v[0];
}

/* ---------------------------------------------------------------------------------------------
 * exp16: Cody-Waite range reduction x = n ln2 + r, a degree-6 polynomial for e^r on
 * |r| <= ln2/2 (about 1 ulp), and 2^n built in the exponent bits. Plain arithmetic, so it
 * vectorises without -ffast-math and gives the same bits on every call. */
static inline __attribute__((always_inline)) vf K(exp16)(vf x)
{
    /* Precondition: x <= 88 (callers pass logits minus their row max or log-sum-exp, so x <= 0
     * up to rounding); no overflow clamp is spent on it. */
    const vf lo = (vf){0} - 87.0f, magic = (vf){0} + 12582912.0f;
    const vi underflow = x < lo;                     /* e^x < 1.7e-38: flush to 0 (and -inf) */
    vf xc = K(select)(underflow, lo, x);
    vf t = xc * 1.44269504088896341f + magic;        /* magic = 1.5 * 2^23: round to nearest */
    vf n = t - magic;
    vi ni = (vi)t - (vi)magic;
    vf r = xc - n * 0.693359375f;                    /* ln2 split in two: n * ln2_hi is exact */
    r = r + n * 2.12194440e-4f;
    vf poly = 1.9875691500e-4f * r + 1.3981999507e-3f;
    poly = poly * r + 8.3334519073e-3f;
    poly = poly * r + 4.1665795894e-2f;
    poly = poly * r + 1.6666665459e-1f;
    poly = poly * r + 5.0000001201e-1f;
    vf e = poly * (r * r) + r + 1.0f;
    vf two_n = (vf)((ni + 127) << 23);
    return (vf)((vi)(e * two_n) & ~underflow);
}

/* ---------------------------------------------------------------------------------------------
 * gemm_nt: out (rows, 64) = scale * x (rows, D) @ yt (D, 64)
 * Register block: ROW_BLOCK rows x 64 columns of accumulators, one pass over d. Two variants
 * finish the product in registers instead of storing it (the backward's tile, fused):
 *   gemm_nt_probs: out = exp(scale * x yt - f - shift[r]) on the first nvis[r] keys of row r, 0
 *                  on the others (f may be NULL): P recomputed from the log-sum-exp;
 *   gemm_nt_grad:  g = p * (x yt - shift[r]) and gsum += g (gsum may be NULL): dP never stored.
 *   gemm_nt_logits: the forward's key-major tile x (ncols keys, 64 rows) = scale * k qt - f,
 *                  -inf where key c is hidden from row r (r + off < c), and colmax (64,) = the
 *                  max over the keys per row: the first half of softmax_t.
 * The operations per element are those of gemm_nt + masked_logits + exp_rows (resp.
 * gemm_nt + softmax_grad), in the same order. */
enum { NT_PLAIN, NT_PROBS, NT_GRAD, NT_LOGITS };

static inline __attribute__((always_inline)) void K(nt_finish)(
    const int mode, vf c, size_t i, int u, float scale, float *restrict out,
    const float *restrict f, const size_t *restrict nvis, const float *restrict shift,
    const float *restrict p, float *restrict gsum, int off, vf *restrict mx)
{
    const size_t e = i * SELATTN_TILE + 16 * u;
    if (mode == NT_LOGITS) {        /* key-major: i is a key, the lanes are query rows */
        vi lane;
        for (int w = 0; w < 16; w++) lane[w] = w;
        vf x = scale * c;
        if (f) x -= K(load)(f + e);
        if (off < SELATTN_TILE)
            x = K(select)(lane + (16 * u + off) >= (int)i, x, (vf){0} - INFINITY);
        K(store)(out + e, x);
        mx[u] = K(select)(x > mx[u], x, mx[u]);
    } else if (mode == NT_PLAIN) {
        K(store)(out + e, scale * c);
    } else if (mode == NT_PROBS) {
        vi lane;
        for (int w = 0; w < 16; w++) lane[w] = w;
        vf x = scale * c;
        if (f) x -= K(load)(f + e);
        x = K(select)(lane + 16 * u < (int)nvis[i], x, (vf){0} - INFINITY);
        K(store)(out + e, K(exp16)(x - shift[i]));
    } else {
        vf g = K(load)(p + e) * (c - shift[i]);
        K(store)(out + e, g);
        if (gsum) K(store)(gsum + e, K(load)(gsum + e) + g);
    }
}

static inline __attribute__((always_inline)) void K(gemm_nt_impl)(
    const int mode, const float *restrict x, size_t rows, const float *restrict yt, size_t D,
    float scale, float *restrict out, const float *restrict f, const size_t *restrict nvis,
    const float *restrict shift, const float *restrict p, float *restrict gsum, int off,
    float *restrict colmax)
{
    vf mx[4];
    if (mode == NT_LOGITS)
        for (int u = 0; u < 4; u++) mx[u] = (vf){0} - INFINITY;
    size_t i = 0;
    for (; i + ROW_BLOCK <= rows; i += ROW_BLOCK) {
        vf c[ROW_BLOCK][4];
        for (int r = 0; r < ROW_BLOCK; r++)
            for (int u = 0; u < 4; u++) c[r][u] = (vf){0};
        for (size_t d = 0; d < D; d++) {
            const float *yt_d = yt + d * SELATTN_TILE;
            vf y0 = K(load)(yt_d), y1 = K(load)(yt_d + 16);
            vf y2 = K(load)(yt_d + 32), y3 = K(load)(yt_d + 48);
            for (int r = 0; r < ROW_BLOCK; r++) {
                float a = x[(i + r) * D + d];
                c[r][0] += a * y0; c[r][1] += a * y1; c[r][2] += a * y2; c[r][3] += a * y3;
            }
        }
        for (int r = 0; r < ROW_BLOCK; r++)
            for (int u = 0; u < 4; u++)
                K(nt_finish)(mode, c[r][u], i + r, u, scale, out, f, nvis, shift, p, gsum, off,
                             mx);
    }
    for (; i < rows; i++) { /* leftover rows, one at a time */
        vf c[4] = {{0}, {0}, {0}, {0}};
        for (size_t d = 0; d < D; d++) {
            const float *yt_d = yt + d * SELATTN_TILE;
            float a = x[i * D + d];
            c[0] += a * K(load)(yt_d);      c[1] += a * K(load)(yt_d + 16);
            c[2] += a * K(load)(yt_d + 32); c[3] += a * K(load)(yt_d + 48);
        }
        for (int u = 0; u < 4; u++)
            K(nt_finish)(mode, c[u], i, u, scale, out, f, nvis, shift, p, gsum, off, mx);
    }
    if (mode == NT_LOGITS)
        for (int u = 0; u < 4; u++) K(store)(colmax + 16 * u, mx[u]);
}

static void K(gemm_nt)(const float *restrict x, size_t rows, const float *restrict yt, size_t D,
                       float scale, float *restrict out)
{
    K(gemm_nt_impl)(NT_PLAIN, x, rows, yt, D, scale, out, NULL, NULL, NULL, NULL, NULL, 0, NULL);
}

static void K(gemm_nt_probs)(const float *restrict x, size_t rows, const float *restrict yt,
                             size_t D, float scale, const float *restrict f,
                             const size_t *restrict nvis, const float *restrict shift,
                             float *restrict out)
{
    K(gemm_nt_impl)(NT_PROBS, x, rows, yt, D, scale, out, f, nvis, shift, NULL, NULL, 0, NULL);
}

static void K(gemm_nt_grad)(const float *restrict x, size_t rows, const float *restrict yt,
                            size_t D, const float *restrict p, const float *restrict shift,
                            float *restrict g, float *restrict gsum)
{
    K(gemm_nt_impl)(NT_GRAD, x, rows, yt, D, 1.0f, g, NULL, NULL, shift, p, gsum, 0, NULL);
}

static void K(gemm_nt_logits)(const float *restrict k, size_t ncols, const float *restrict qt,
                              size_t D, float scale, const float *restrict f, int off,
                              float *restrict x, float *restrict colmax)
{
    K(gemm_nt_impl)(NT_LOGITS, k, ncols, qt, D, scale, x, f, NULL, NULL, NULL, NULL, off,
                    colmax);
}

/* ---------------------------------------------------------------------------------------------
 * masked_logits: x (rows, 64) <- x - f on the first nvis[r] keys of row r, -inf on the others
 * (f may be NULL: F = 0); rowmax[r] = max of the row. Max is exact, so lane order is irrelevant. */
static void K(masked_logits)(float *restrict x, const float *restrict f,
                             const size_t *restrict nvis, size_t rows, float *restrict rowmax)
{
    const vf neg_inf = (vf){0} - INFINITY;
    vi lane;
    for (int u = 0; u < 16; u++) lane[u] = u;
    for (size_t r = 0; r < rows; r++) {
        float *x_r = x + r * SELATTN_TILE;
        vf mx = neg_inf;
        for (int u = 0; u < 4; u++) {
            vf xv = K(load)(x_r + 16 * u);
            if (f) xv -= K(load)(f + r * SELATTN_TILE + 16 * u);
            xv = K(select)(lane + 16 * u < (int)nvis[r], xv, neg_inf);
            K(store)(x_r + 16 * u, xv);
            mx = K(select)(xv > mx, xv, mx);
        }
        rowmax[r] = K(hmax)(mx);
    }
}

/* ---------------------------------------------------------------------------------------------
 * exp_rows: x (rows, 64) <- exp(x - shift[r]); rowsum[r] = the row's sum (if rowsum != NULL),
 * summed in 16 lanes and then across them in a fixed order, so every call gives the same bits. */
static void K(exp_rows)(float *restrict x, const float *restrict shift, size_t rows,
                        float *restrict rowsum)
{
    for (size_t r = 0; r < rows; r++) {
        float *x_r = x + r * SELATTN_TILE;
        vf e[4];
        for (int u = 0; u < 4; u++) {
            e[u] = K(exp16)(K(load)(x_r + 16 * u) - shift[r]);
            K(store)(x_r + 16 * u, e[u]);
        }
        if (rowsum) rowsum[r] = K(hsum)((e[0] + e[1]) + (e[2] + e[3]));
    }
}

/* ---------------------------------------------------------------------------------------------
 * selection: sel (rows, 64) = relu(ls) on keys first <= c < nallow[r] of row r, 0 elsewhere. */
static void K(selection)(const float *restrict ls, size_t first, const size_t *restrict nallow,
                         size_t rows, float *restrict sel)
{
    vi lane;
    for (int u = 0; u < 16; u++) lane[u] = u;
    const vf zero = {0};
    for (size_t r = 0; r < rows; r++) {
        for (int u = 0; u < 4; u++) {
            vi c = lane + 16 * u;
            vf x = K(load)(ls + r * SELATTN_TILE + 16 * u);
            vi keep = (c >= (int)first) & (c < (int)nallow[r]) & (x > zero);
            K(store)(sel + r * SELATTN_TILE + 16 * u, K(select)(keep, x, zero));
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * softmax_grad: g (rows, 64) = p * (dp - delta[r]); gsum (rows, 64) += g when gsum != NULL. */
static void K(softmax_grad)(const float *restrict p, const float *restrict dp,
                            const float *restrict delta, size_t rows, float *restrict g,
                            float *restrict gsum)
{
    for (size_t r = 0; r < rows; r++) {
        for (int u = 0; u < 4; u++) {
            const size_t e = r * SELATTN_TILE + 16 * u;
            vf gv = K(load)(p + e) * (K(load)(dp + e) - delta[r]);
            K(store)(g + e, gv);
            if (gsum) K(store)(gsum + e, K(load)(gsum + e) + gv);
        }
    }
}


/* ---------------------------------------------------------------------------------------------
 * softmax_t: one online-softmax step on a key-major tile x (ncols keys, 64 query rows): query
 * rows are the 16-wide lanes, so row maxima and sums are plain lane-wise operations.
 * x[c, r] <- exp(x[c, r] - f[c, r] - m_new[r]) where key c is visible to row r (r + off >= c;
 * off >= 64 means every key is visible), 0 elsewhere; f may be NULL (F = 0). When colmax is not
 * NULL, x is already L - F with the mask applied and colmax its max per row (gemm_nt_logits), so
 * only the exponentials are left; f and off are then not read. m, l (64,) are the
 * running max and sum, alpha (64,) receives exp(m_old - m_new). A row whose max is still -inf
 * (only evicted keys so far) keeps l = 0 and gets alpha = 1. Keys are summed in order c = 0, 1,
 * ... in every lane, so the bits do not depend on anything but the inputs. */
static void K(softmax_t)(float *restrict x, const float *restrict f, size_t ncols, int off,
                         const float *restrict colmax, float *restrict m, float *restrict l,
                         float *restrict alpha)
{
    const vf neg_inf = (vf){0} - INFINITY;
    vi lane;
    for (int u = 0; u < 16; u++) lane[u] = u;
    vf mx[4], shift[4], sum[4];
    for (int u = 0; u < 4; u++) mx[u] = K(load)(m + 16 * u);
    if (colmax) {                     /* x is already masked (gemm_nt_logits) */
        for (int u = 0; u < 4; u++) {
            vf cm = K(load)(colmax + 16 * u);
            mx[u] = K(select)(cm > mx[u], cm, mx[u]);
        }
    } else if (off >= SELATTN_TILE) {        /* below the diagonal: every key visible, no mask */
        for (size_t c = 0; c < ncols; c++) {
            for (int u = 0; u < 4; u++) {
                vf xv = K(load)(x + c * SELATTN_TILE + 16 * u);
                if (f) xv -= K(load)(f + c * SELATTN_TILE + 16 * u);
                K(store)(x + c * SELATTN_TILE + 16 * u, xv);
                mx[u] = K(select)(xv > mx[u], xv, mx[u]);
            }
        }
    } else {
        for (size_t c = 0; c < ncols; c++) {
            for (int u = 0; u < 4; u++) {
                vf xv = K(load)(x + c * SELATTN_TILE + 16 * u);
                if (f) xv -= K(load)(f + c * SELATTN_TILE + 16 * u);
                xv = K(select)(lane + (16 * u + off) >= (int)c, xv, neg_inf);
                K(store)(x + c * SELATTN_TILE + 16 * u, xv);
                mx[u] = K(select)(xv > mx[u], xv, mx[u]);
            }
        }
    }
    for (int u = 0; u < 4; u++) {
        const vi none = mx[u] == neg_inf;
        const vf m_old = K(load)(m + 16 * u);
        shift[u] = K(select)(none, (vf){0}, mx[u]);
        K(store)(alpha + 16 * u, K(select)(none, (vf){0} + 1.0f, K(exp16)(m_old - shift[u])));
        K(store)(m + 16 * u, mx[u]);
        sum[u] = (vf){0};
    }
    for (size_t c = 0; c < ncols; c++) {
        for (int u = 0; u < 4; u++) {
            vf e = K(exp16)(K(load)(x + c * SELATTN_TILE + 16 * u) - shift[u]);
            K(store)(x + c * SELATTN_TILE + 16 * u, e);
            sum[u] += e;
        }
    }
    for (int u = 0; u < 4; u++)
        K(store)(l + 16 * u, K(load)(l + 16 * u) * K(load)(alpha + 16 * u) + sum[u]);
}

/* ---------------------------------------------------------------------------------------------
 * transpose: xt (ncols, 64)[c, r] = x[r * ldx + c] for r < rows, 0 for r >= rows (a row-major
 * tile, or a block of rows of q, to key-major / column-major form). In 16 x 16 blocks held
 * in registers: four rounds swap the off-diagonal 8 x 8, 4 x 4, 2 x 2 and 1 x 1 sub-blocks of
 * row pairs (i, i + w) with two-register shuffles. */
#define TR_LO(w) (vi){                                                                            \
    (0 & w) ? 16 + 0 - w : 0, (1 & w) ? 16 + 1 - w : 1, (2 & w) ? 16 + 2 - w : 2,                 \
    (3 & w) ? 16 + 3 - w : 3, (4 & w) ? 16 + 4 - w : 4, (5 & w) ? 16 + 5 - w : 5,                 \
    (6 & w) ? 16 + 6 - w : 6, (7 & w) ? 16 + 7 - w : 7, (8 & w) ? 16 + 8 - w : 8,                 \
    (9 & w) ? 16 + 9 - w : 9, (10 & w) ? 16 + 10 - w : 10, (11 & w) ? 16 + 11 - w : 11,           \
    (12 & w) ? 16 + 12 - w : 12, (13 & w) ? 16 + 13 - w : 13, (14 & w) ? 16 + 14 - w : 14,        \
    (15 & w) ? 16 + 15 - w : 15}
#define TR_HI(w) (vi){                                                                            \
    (0 & w) ? 16 + 0 : 0 + w, (1 & w) ? 16 + 1 : 1 + w, (2 & w) ? 16 + 2 : 2 + w,                 \
    (3 & w) ? 16 + 3 : 3 + w, (4 & w) ? 16 + 4 : 4 + w, (5 & w) ? 16 + 5 : 5 + w,                 \
    (6 & w) ? 16 + 6 : 6 + w, (7 & w) ? 16 + 7 : 7 + w, (8 & w) ? 16 + 8 : 8 + w,                 \
    (9 & w) ? 16 + 9 : 9 + w, (10 & w) ? 16 + 10 : 10 + w, (11 & w) ? 16 + 11 : 11 + w,           \
    (12 & w) ? 16 + 12 : 12 + w, (13 & w) ? 16 + 13 : 13 + w, (14 & w) ? 16 + 14 : 14 + w,        \
    (15 & w) ? 16 + 15 : 15 + w}
#define TR_ROUND(w)                                                                               \
    for (int i = 0; i < 16; i++) {                                                                \
        if (i & (w)) continue;                                                                    \
        vf lo = __builtin_shuffle(a[i], a[i + (w)], TR_LO(w));                                    \
        vf hi = __builtin_shuffle(a[i], a[i + (w)], TR_HI(w));                                    \
        a[i] = lo; a[i + (w)] = hi;                                                               \
    }

static void K(transpose)(const float *restrict x, size_t ldx, size_t rows, size_t ncols,
                         float *restrict xt)
{
    size_t c0 = 0;
    for (; c0 + 16 <= ncols; c0 += 16)
        for (size_t r0 = 0; r0 < SELATTN_TILE; r0 += 16) {
            vf a[16];
            for (size_t i = 0; i < 16; i++)
                a[i] = r0 + i < rows ? K(load)(x + (r0 + i) * ldx + c0) : (vf){0};
            TR_ROUND(8) TR_ROUND(4) TR_ROUND(2) TR_ROUND(1)
            for (size_t j = 0; j < 16; j++) K(store)(xt + (c0 + j) * SELATTN_TILE + r0, a[j]);
        }
    for (; c0 < ncols; c0++)                                   /* columns past the last 16 */
        for (size_t r = 0; r < SELATTN_TILE; r++)
            xt[c0 * SELATTN_TILE + r] = r < rows ? x[r * ldx + c0] : 0.0f;
}
/* mask_tile_t: mask_tile (selector_mask.h) written key-major: ft (64 keys, 64 rows)[c, r] =
 * fstart_cols[c] + sum_{r' < r} sel[r', c] for r < rows, 0 for r >= rows. The sums run down the
 * rows in order, as in mask_tile, and each 16 x 16 block is transposed in registers on its way
 * out, so F reaches the forward's key-major tiles without a row-major copy. colsum (64,), when
 * not NULL, gets the sums over all `rows` rows: column_sums' result, bit for bit (same order). */
static void K(mask_tile_t)(const float *restrict sel, const float *restrict fstart_cols,
                           size_t rows, float *restrict ft, float *restrict colsum)
{
    vf fs[4], part[4];
    for (int u = 0; u < 4; u++) { fs[u] = K(load)(fstart_cols + 16 * u); part[u] = (vf){0}; }
    for (size_t r0 = 0; r0 < SELATTN_TILE; r0 += 16)
        for (int u = 0; u < 4; u++) {
            vf a[16];
            for (size_t i = 0; i < 16; i++) {
                if (r0 + i < rows) {
                    a[i] = fs[u] + part[u];
                    part[u] += K(load)(sel + (r0 + i) * SELATTN_TILE + 16 * u);
                } else {
                    a[i] = (vf){0};
                }
            }
            TR_ROUND(8) TR_ROUND(4) TR_ROUND(2) TR_ROUND(1)
            for (size_t j = 0; j < 16; j++) K(store)(ft + (16 * u + j) * SELATTN_TILE + r0, a[j]);
        }
    if (colsum)
        for (int u = 0; u < 4; u++) K(store)(colsum + 16 * u, part[u]);
}

#undef TR_LO
#undef TR_HI
#undef TR_ROUND

/* ---------------------------------------------------------------------------------------------
 * selector_grad: the selector's extra gradient on one tile, added into its G (rows, 64). carry
 * (64,) holds, per key, the sum of gsum over the rows below the tile; walking rows upwards,
 * g[m] -= carry where sel[m] > 0 (dS = -carry, gated by S > 0), then carry += gsum[m]. */
static void K(selector_grad)(const float *restrict gsum, const float *restrict sel, size_t rows,
                             float *restrict carry, float *restrict g)
{
    const vf zero = {0};
    vf cr[4];
    for (int u = 0; u < 4; u++) cr[u] = K(load)(carry + 16 * u);
    for (size_t r = rows; r-- > 0;) {
        for (int u = 0; u < 4; u++) {
            const size_t e = r * SELATTN_TILE + 16 * u;
            vf gv = K(load)(g + e);
            K(store)(g + e, K(select)(K(load)(sel + e) > zero, gv - cr[u], gv));
            cr[u] += K(load)(gsum + e);
        }
    }
    for (int u = 0; u < 4; u++) K(store)(carry + 16 * u, cr[u]);
}

/* ---------------------------------------------------------------------------------------------
 * column_sums: sums (64,) = sum over r < rows of x[r, :], rows added in order from 0 (the order
 * mask_tile's partial sums use, so Fstart and the in-block part of F agree bit for bit). */
static void K(column_sums)(const float *restrict x, size_t rows, float *restrict sums)
{
    vf part[4] = {{0}, {0}, {0}, {0}};
    for (size_t r = 0; r < rows; r++)
        for (int u = 0; u < 4; u++) part[u] += K(load)(x + r * SELATTN_TILE + 16 * u);
    for (int u = 0; u < 4; u++) K(store)(sums + 16 * u, part[u]);
}

const selattn_kernels CAT(selattn_kernels, KERNEL_ISA) = {
    .name = KERNEL_NAME,
    .gemm_nt = K(gemm_nt),
    .gemm_nt_probs = K(gemm_nt_probs),
    .gemm_nt_grad = K(gemm_nt_grad),
    .gemm_nt_logits = K(gemm_nt_logits),
    .gemm_acc = K(gemm_acc),
    .gemm_acc_t = K(gemm_acc_t),
    .masked_logits = K(masked_logits),
    .exp_rows = K(exp_rows),
    .selection = K(selection),
    .softmax_grad = K(softmax_grad),
    .softmax_t = K(softmax_t),
    .transpose = K(transpose),
    .mask_tile_t = K(mask_tile_t),
    .column_sums = K(column_sums),
    .selector_grad = K(selector_grad),
};
