/* Body of the tile kernels, included once per instruction set by tile_kernels_<isa>.c, which
 * defines KERNEL_ISA (a name), the target pragma and the shape of the register blocks:
 *   VEC_FLOATS  floats per native vector: 16 (AVX-512, zmm), 8 (AVX2, ymm), 4 (SSE2, xmm);
 *   ROW_BLOCK   rows per register block of the tile products;
 *   COL_VECS    native vectors per row of a register block (its width: COL_VECS * VEC_FLOATS);
 *   GROUP_VECS  native vectors handled together by the row-wise kernels (softmax_t, ...).
 *
 * GNU vector extensions on native-width vectors (vf = VEC_FLOATS floats, one register): a 64-wide
 * tile row is NV = 64 / VEC_FLOATS vectors. Vectors wider than the registers (what this file used
 * before: 16 floats everywhere) are lowered by GCC through the stack on AVX2 and SSE2.
 *
 * Results do not depend on VEC_FLOATS or on the blocks: every output element is computed by the
 * same operations in the same order (sums over keys or over d run in index order), and the
 * horizontal sums and maxima reduce 16 lanes in one fixed tree (hsum16, hmax16), whatever the
 * register width.
 */
#include <math.h>
#include <string.h>

#include "tile_kernels.h"

/* Every vf helper below is static and inlined, so the vector ABI note does not apply. */
#pragma GCC diagnostic ignored "-Wpsabi"

#define CAT2(a, b) a##_##b
#define CAT(a, b) CAT2(a, b)
#define K(name) CAT(name, KERNEL_ISA)

#define VW VEC_FLOATS
#define NV (SELATTN_TILE / VW)          /* native vectors per 64-float tile row */
#define NG (16 / VW)                    /* native vectors per 16 lanes (the reduction trees' width) */

typedef float vf __attribute__((vector_size(4 * VW)));
typedef int vi __attribute__((vector_size(4 * VW)));
/* The same vector at float alignment, for loads and stores anywhere in a float array. */
typedef float vf_u __attribute__((vector_size(4 * VW), aligned(4), may_alias));

static inline __attribute__((always_inline)) vf K(load)(const float *p) { return *(const vf_u *)p; }
static inline __attribute__((always_inline)) void K(store)(float *p, vf v) { *(vf_u *)p = v; }

/* v, opaque to the optimiser: keeps a product from being contracted with the next addition into
 * one fused multiply-add. GCC contracts a * b + c where it sees it (-ffp-contract=fast, the GNU C
 * default), and whether it sees it can depend on how a block was unrolled; where a kernel promises
 * the operations of two unfused kernels (gemm_nt_logits = gemm_nt + masked_logits), the product
 * is rounded on its own, in every block. */
static inline __attribute__((always_inline)) vf K(rounded)(vf v)
{
#if defined(__x86_64__) || defined(__i386__)
    __asm__("" : "+v"(v));
#elif defined(__aarch64__)
    __asm__("" : "+w"(v));
#endif
    return v;
}

/* lane[w] = w: the lane index, for masks that depend on a row or key position. */
static inline __attribute__((always_inline)) vi K(lanes)(void)
{
    vi lane;
    for (int w = 0; w < VW; w++) lane[w] = w;
    return lane;
}

/* ---------------------------------------------------------------------------------------------
 * gemm_acc: acc (rows, D) = alpha[r] * acc + p (rows, 64)[:, :ncols] @ y (ncols, D)
 * (alpha may be NULL: 1). The rescale of the online softmax is applied while acc is loaded.
 * gemm_acc_t: acc (rows, D) = alpha[r] * acc + p^T @ y, where p is (ncols, 64) and its first
 * `rows` columns are used: the products with a transposed tile (the forward's P v on a
 * key-major P, dv += P^T dout, dk += G^T q), without transposing.
 * Register block: R rows x nb vectors of d (acc_block); the blocks are ROW_BLOCK x COL_VECS, then
 * ROW_BLOCK x 2 (when COL_VECS > 2) and ROW_BLOCK x 1 on the rest of D, then one row at a time,
 * then scalar tails of D. Every element is c = alpha * acc, then c += p * y for j = 0, 1, ... in
 * order, whatever block it falls in.
 * `p_at(i, j)` is the coefficient of y row j in acc row i. */
#define P_AT(i, j) (p_transposed ? p[(j) * SELATTN_TILE + (i)] : p[(i) * SELATTN_TILE + (j)])

static inline __attribute__((always_inline)) void K(acc_block)(
    const float *restrict p, const int p_transposed, size_t i, const int R,
    const float *restrict y, size_t ncols, size_t D, size_t d0, const int nb,
    const float *restrict alpha, float *restrict acc)
{
    vf c[ROW_BLOCK][COL_VECS];
    for (int r = 0; r < R; r++) {
        const float a_r = alpha ? alpha[i + r] : 1.0f;
        for (int u = 0; u < nb; u++) c[r][u] = a_r * K(load)(acc + (i + r) * D + d0 + VW * u);
    }
    for (size_t j = 0; j < ncols; j++) {
        const float *y_j = y + j * D + d0;
        vf yv[COL_VECS];
        for (int u = 0; u < nb; u++) yv[u] = K(load)(y_j + VW * u);
        for (int r = 0; r < R; r++) {
            const float a = P_AT(i + r, j);
            for (int u = 0; u < nb; u++) c[r][u] += a * yv[u];
        }
    }
    for (int r = 0; r < R; r++)
        for (int u = 0; u < nb; u++) K(store)(acc + (i + r) * D + d0 + VW * u, c[r][u]);
}

static inline __attribute__((always_inline)) void K(acc_rows)(
    const float *restrict p, const int p_transposed, size_t i, const int R,
    const float *restrict y, size_t ncols, size_t D, const float *restrict alpha,
    float *restrict acc)
{
    size_t d0 = 0;
    for (; d0 + COL_VECS * VW <= D; d0 += COL_VECS * VW)
        K(acc_block)(p, p_transposed, i, R, y, ncols, D, d0, COL_VECS, alpha, acc);
#if COL_VECS > 2
    /* AVX-512, D = 32 (or the 32 after 64s): 2 vectors a row, 8 accumulators, not 4 */
    for (; d0 + 2 * VW <= D; d0 += 2 * VW)
        K(acc_block)(p, p_transposed, i, R, y, ncols, D, d0, 2, alpha, acc);
#endif
    for (; d0 + VW <= D; d0 += VW)
        K(acc_block)(p, p_transposed, i, R, y, ncols, D, d0, 1, alpha, acc);
    for (int r = 0; r < R; r++) {                                  /* scalar tail of D */
        float *acc_i = acc + (i + r) * D;
        const float a_r = alpha ? alpha[i + r] : 1.0f;
        for (size_t d = d0; d < D; d++) {
            float c = a_r * acc_i[d];
            for (size_t j = 0; j < ncols; j++) c += P_AT(i + r, j) * y[j * D + d];
            acc_i[d] = c;
        }
    }
}

static inline __attribute__((always_inline)) void K(gemm_acc_impl)(
    const float *restrict p, size_t rows, const float *restrict y, size_t ncols, size_t D,
    const float *restrict alpha, float *restrict acc, const int p_transposed)
{
    size_t i = 0;
    for (; i + ROW_BLOCK <= rows; i += ROW_BLOCK)
        K(acc_rows)(p, p_transposed, i, ROW_BLOCK, y, ncols, D, alpha, acc);
    for (; i < rows; i++) K(acc_rows)(p, p_transposed, i, 1, y, ncols, D, alpha, acc);
}
#undef P_AT

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

/* Sum and max of 16 lanes, held in NG = 16 / VW native vectors v[0..NG-1] (lane l of the 16 in
 * v[l / VW]), as a tree: lane l combined with lane l + 8, then + 4, + 2, + 1, and lane 0 is the
 * result. Across vectors while the distance is a whole vector, then with lane shuffles. A fixed
 * order, so the same bits every time and for every VW, in registers, four steps instead of a
 * 16-long chain. */
#if VW == 16
#define SWAP8 (vi){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7}
#define SWAP4 (vi){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11}
#define SWAP2 (vi){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13}
#define SWAP1 (vi){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14}
#elif VW == 8
#define SWAP4 (vi){4, 5, 6, 7, 0, 1, 2, 3}
#define SWAP2 (vi){2, 3, 0, 1, 6, 7, 4, 5}
#define SWAP1 (vi){1, 0, 3, 2, 5, 4, 7, 6}
#elif VW == 4
#define SWAP2 (vi){2, 3, 0, 1}
#define SWAP1 (vi){1, 0, 3, 2}
#else
#error "VEC_FLOATS must be 4, 8 or 16"
#endif

static inline __attribute__((always_inline)) float K(hsum16)(vf *v)
{
    for (int half = NG / 2; half >= 1; half /= 2)         /* lanes l + 8 (and + 4) across vectors */
        for (int g = 0; g < half; g++) v[g] = v[g] + v[g + half];
    vf s = v[0];
#if VW == 16
    s += __builtin_shuffle(s, SWAP8);
#endif
#if VW >= 8
    s += __builtin_shuffle(s, SWAP4);
#endif
    s += __builtin_shuffle(s, SWAP2);
    s += __builtin_shuffle(s, SWAP1);
    return s[0];
}

static inline __attribute__((always_inline)) float K(hmax16)(vf *v)
{
    for (int half = NG / 2; half >= 1; half /= 2)
        for (int g = 0; g < half; g++) v[g] = K(select)(v[g] > v[g + half], v[g], v[g + half]);
    vf s = v[0], w;
#if VW == 16
    w = __builtin_shuffle(s, SWAP8); s = K(select)(s > w, s, w);
#endif
#if VW >= 8
    w = __builtin_shuffle(s, SWAP4); s = K(select)(s > w, s, w);
#endif
    w = __builtin_shuffle(s, SWAP2);    s = K(select)(s > w, s, w);
    w = __builtin_shuffle(s, SWAP1);    s = K(select)(s > w, s, w);
    return s[0];
}

/* ---------------------------------------------------------------------------------------------
 * expv: Cody-Waite range reduction x = n ln2 + r, a degree-6 polynomial for e^r on
 * |r| <= ln2/2 (about 1 ulp), and 2^n built in the exponent bits. Plain arithmetic, so it
 * vectorises without -ffast-math and gives the same bits on every call, lane by lane. */
static inline __attribute__((always_inline)) vf K(expv)(vf x)
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
 * Register block: ROW_BLOCK rows x COL_VECS vectors of columns, one pass over d (the columns in
 * chunks of COL_VECS * VW, each chunk down all rows). Three variants finish the product in
 * registers instead of storing it (the backward's tile, fused):
 *   gemm_nt_probs: out = exp(scale * x yt - f - shift[r]) on the first nvis[r] keys of row r, 0
 *                  on the others (f may be NULL): P recomputed from the log-sum-exp;
 *   gemm_nt_grad:  g = p * (x yt - shift[r]) and gsum += g (gsum may be NULL): dP never stored.
 *   gemm_nt_logits: the forward's key-major tile x (ncols keys, 64 rows) = scale * k qt - f,
 *                  -inf where key c is hidden from row r (r + off < c), and colmax (64,) = the
 *                  max over the keys per row: the first half of softmax_t.
 * The operations per element are those of gemm_nt + masked_logits + exp_rows (resp.
 * gemm_nt + softmax_grad), in the same order. */
enum { NT_PLAIN, NT_PROBS, NT_GRAD, NT_LOGITS, NT_PROBS_T, NT_GRAD_T };

/* Finish element block (i, col .. col + VW - 1) of the product, c. */
static inline __attribute__((always_inline)) void K(nt_finish)(
    const int mode, vf c, size_t i, size_t col, float scale, float *restrict out,
    const float *restrict f, const size_t *restrict nvis, const float *restrict shift,
    const float *restrict p, float *restrict gsum, int off, vf *restrict mx)
{
    const size_t e = i * SELATTN_TILE + col;
    if (mode == NT_LOGITS) {        /* key-major: i is a key, the lanes are query rows */
        vf x = K(rounded)(scale * c);
        if (f) x -= K(load)(f + e);
        if (off < SELATTN_TILE)
            x = K(select)(K(lanes)() + ((int)col + off) >= (int)i, x, (vf){0} - INFINITY);
        K(store)(out + e, x);
        *mx = K(select)(x > *mx, x, *mx);
    } else if (mode == NT_PROBS_T) {   /* key-major: i is a key, the lanes are query rows */
        vf x = K(rounded)(scale * c);
        if (f) x -= K(load)(f + e);
        K(store)(out + e, K(expv)(x - K(load)(shift + col)));
    } else if (mode == NT_GRAD_T) {
        vf g = K(load)(p + e) * (c - K(load)(shift + col));
        K(store)(out + e, g);
        if (gsum) K(store)(gsum + e, K(load)(gsum + e) + g);
    } else if (mode == NT_PLAIN) {
        K(store)(out + e, scale * c);
    } else if (mode == NT_PROBS) {
        vf x = K(rounded)(scale * c);
        if (f) x -= K(load)(f + e);
        x = K(select)(K(lanes)() + (int)col < (int)nvis[i], x, (vf){0} - INFINITY);
        K(store)(out + e, K(expv)(x - shift[i]));
    } else {
        vf g = K(load)(p + e) * (c - shift[i]);
        K(store)(out + e, g);
        if (gsum) K(store)(gsum + e, K(load)(gsum + e) + g);
    }
}

/* Rows i .. i + R - 1, columns col0 .. col0 + nb * VW - 1. */
static inline __attribute__((always_inline)) void K(nt_block)(
    const int mode, const float *restrict x, size_t i, const int R, const float *restrict yt,
    size_t D, size_t col0, const int nb, float scale, float *restrict out,
    const float *restrict f, const size_t *restrict nvis, const float *restrict shift,
    const float *restrict p, float *restrict gsum, int off, vf *restrict mx)
{
    vf c[ROW_BLOCK][COL_VECS];
    for (int r = 0; r < R; r++)
        for (int u = 0; u < nb; u++) c[r][u] = (vf){0};
    for (size_t d = 0; d < D; d++) {
        const float *yt_d = yt + d * SELATTN_TILE + col0;
        vf yv[COL_VECS];
        for (int u = 0; u < nb; u++) yv[u] = K(load)(yt_d + VW * u);
        for (int r = 0; r < R; r++) {
            const float a = x[(i + r) * D + d];
            for (int u = 0; u < nb; u++) c[r][u] += a * yv[u];
        }
    }
    for (int r = 0; r < R; r++)
        for (int u = 0; u < nb; u++)
            K(nt_finish)(mode, c[r][u], i + r, col0 + VW * u, scale, out, f, nvis, shift, p,
                         gsum, off, &mx[u]);
}

static inline __attribute__((always_inline)) void K(gemm_nt_impl)(
    const int mode, const float *restrict x, size_t rows, const float *restrict yt, size_t D,
    float scale, float *restrict out, const float *restrict f, const size_t *restrict nvis,
    const float *restrict shift, const float *restrict p, float *restrict gsum, int off,
    float *restrict colmax)
{
    for (size_t col0 = 0; col0 < SELATTN_TILE; col0 += COL_VECS * VW) {
        vf mx[COL_VECS];
        for (int u = 0; u < COL_VECS; u++) mx[u] = (vf){0} - INFINITY;
        size_t i = 0;
        for (; i + ROW_BLOCK <= rows; i += ROW_BLOCK)
            K(nt_block)(mode, x, i, ROW_BLOCK, yt, D, col0, COL_VECS, scale, out, f, nvis, shift,
                        p, gsum, off, mx);
        for (; i < rows; i++) /* leftover rows, one at a time */
            K(nt_block)(mode, x, i, 1, yt, D, col0, COL_VECS, scale, out, f, nvis, shift, p,
                        gsum, off, mx);
        if (mode == NT_LOGITS)
            for (int u = 0; u < COL_VECS; u++) K(store)(colmax + col0 + VW * u, mx[u]);
    }
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

static void K(gemm_nt_probs_t)(const float *restrict x, size_t ncols, const float *restrict yt,
                               size_t D, float scale, const float *restrict f,
                               const float *restrict shift, float *restrict out)
{
    K(gemm_nt_impl)(NT_PROBS_T, x, ncols, yt, D, scale, out, f, NULL, shift, NULL, NULL, 0,
                    NULL);
}

static void K(gemm_nt_grad_t)(const float *restrict x, size_t ncols, const float *restrict yt,
                              size_t D, const float *restrict p, const float *restrict shift,
                              float *restrict g, float *restrict gsum)
{
    K(gemm_nt_impl)(NT_GRAD_T, x, ncols, yt, D, 1.0f, g, NULL, NULL, shift, p, gsum, 0, NULL);
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
 * (f may be NULL: F = 0); rowmax[r] = max of the row: lane-wise over the four 16-lane quarters of
 * the row, then hmax16. */
static void K(masked_logits)(float *restrict x, const float *restrict f,
                             const size_t *restrict nvis, size_t rows, float *restrict rowmax)
{
    const vf neg_inf = (vf){0} - INFINITY;
    const vi lane = K(lanes)();
    for (size_t r = 0; r < rows; r++) {
        float *x_r = x + r * SELATTN_TILE;
        vf mx[NG];
        for (int g = 0; g < NG; g++) mx[g] = neg_inf;
        for (int u = 0; u < NV; u++) {
            vf xv = K(load)(x_r + VW * u);
            if (f) xv -= K(load)(f + r * SELATTN_TILE + VW * u);
            xv = K(select)(lane + VW * u < (int)nvis[r], xv, neg_inf);
            K(store)(x_r + VW * u, xv);
            mx[u % NG] = K(select)(xv > mx[u % NG], xv, mx[u % NG]);
        }
        rowmax[r] = K(hmax16)(mx);
    }
}

/* ---------------------------------------------------------------------------------------------
 * exp_rows: x (rows, 64) <- exp(x - shift[r]); rowsum[r] = the row's sum (if rowsum != NULL):
 * lane-wise (q0 + q1) + (q2 + q3) over the row's four 16-lane quarters q, then hsum16, so every
 * call gives the same bits. */
static void K(exp_rows)(float *restrict x, const float *restrict shift, size_t rows,
                        float *restrict rowsum)
{
    for (size_t r = 0; r < rows; r++) {
        float *x_r = x + r * SELATTN_TILE;
        vf pairs[2][NG];
        for (int h = 0; h < 2; h++)
            for (int g = 0; g < NG; g++) {
                float *a = x_r + 32 * h + VW * g, *b = a + 16;
                vf ea = K(expv)(K(load)(a) - shift[r]), eb = K(expv)(K(load)(b) - shift[r]);
                K(store)(a, ea);
                K(store)(b, eb);
                pairs[h][g] = ea + eb;
            }
        if (rowsum) {
            vf s[NG];
            for (int g = 0; g < NG; g++) s[g] = pairs[0][g] + pairs[1][g];
            rowsum[r] = K(hsum16)(s);
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * probs_t: key-major x (ncols keys, 64 rows) <- exp(x - f - shift[r]), the rows across the lanes:
 * per entry the operations of masked_logits (x - f) and exp_rows (exp(. - shift)). */
static void K(probs_t)(float *restrict x, const float *restrict f, size_t ncols,
                       const float *restrict shift)
{
    for (size_t c = 0; c < ncols; c++)
        for (int u = 0; u < NV; u++) {
            const size_t e = c * SELATTN_TILE + VW * u;
            const vf xv = K(load)(x + e) - K(load)(f + e);
            K(store)(x + e, K(expv)(xv - K(load)(shift + VW * u)));
        }
}

/* ---------------------------------------------------------------------------------------------
 * selection: sel (rows, 64) = relu(ls) on keys first <= c < nallow[r] of row r, 0 elsewhere. */
static void K(selection)(const float *restrict ls, size_t first, const size_t *restrict nallow,
                         size_t rows, float *restrict sel)
{
    const vi lane = K(lanes)();
    const vf zero = {0};
    for (size_t r = 0; r < rows; r++) {
        for (int u = 0; u < NV; u++) {
            vi c = lane + VW * u;
            vf x = K(load)(ls + r * SELATTN_TILE + VW * u);
            vi keep = (c >= (int)first) & (c < (int)nallow[r]) & (x > zero);
            K(store)(sel + r * SELATTN_TILE + VW * u, K(select)(keep, x, zero));
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
        for (int u = 0; u < NV; u++) {
            const size_t e = r * SELATTN_TILE + VW * u;
            vf gv = K(load)(p + e) * (K(load)(dp + e) - delta[r]);
            K(store)(g + e, gv);
            if (gsum) K(store)(gsum + e, K(load)(gsum + e) + gv);
        }
    }
}


/* ---------------------------------------------------------------------------------------------
 * softmax_t: one online-softmax step on a key-major tile x (ncols keys, 64 query rows): query
 * rows are the lanes, so row maxima and sums are plain lane-wise operations (done for
 * GROUP_VECS vectors of rows at a time: the rows are independent).
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
    const vi lane = K(lanes)();
    for (int u0 = 0; u0 < NV; u0 += GROUP_VECS) {
        float *x0 = x + VW * u0;
        const float *f0 = f ? f + VW * u0 : NULL;
        vf mx[GROUP_VECS], shift[GROUP_VECS], sum[GROUP_VECS], al[GROUP_VECS];
        for (int u = 0; u < GROUP_VECS; u++) mx[u] = K(load)(m + VW * (u0 + u));
        if (colmax) {                     /* x is already masked (gemm_nt_logits) */
            for (int u = 0; u < GROUP_VECS; u++) {
                vf cm = K(load)(colmax + VW * (u0 + u));
                mx[u] = K(select)(cm > mx[u], cm, mx[u]);
            }
        } else if (off >= SELATTN_TILE) {    /* below the diagonal: every key visible, no mask */
            for (size_t c = 0; c < ncols; c++) {
                for (int u = 0; u < GROUP_VECS; u++) {
                    vf xv = K(load)(x0 + c * SELATTN_TILE + VW * u);
                    if (f0) xv -= K(load)(f0 + c * SELATTN_TILE + VW * u);
                    K(store)(x0 + c * SELATTN_TILE + VW * u, xv);
                    mx[u] = K(select)(xv > mx[u], xv, mx[u]);
                }
            }
        } else {
            for (size_t c = 0; c < ncols; c++) {
                for (int u = 0; u < GROUP_VECS; u++) {
                    vf xv = K(load)(x0 + c * SELATTN_TILE + VW * u);
                    if (f0) xv -= K(load)(f0 + c * SELATTN_TILE + VW * u);
                    xv = K(select)(lane + (VW * (u0 + u) + off) >= (int)c, xv, neg_inf);
                    K(store)(x0 + c * SELATTN_TILE + VW * u, xv);
                    mx[u] = K(select)(xv > mx[u], xv, mx[u]);
                }
            }
        }
        for (int u = 0; u < GROUP_VECS; u++) {
            const vi none = mx[u] == neg_inf;
            const vf m_old = K(load)(m + VW * (u0 + u));
            shift[u] = K(select)(none, (vf){0}, mx[u]);
            al[u] = K(select)(none, (vf){0} + 1.0f, K(expv)(m_old - shift[u]));
            K(store)(alpha + VW * (u0 + u), al[u]);
            K(store)(m + VW * (u0 + u), mx[u]);
            sum[u] = (vf){0};
        }
        for (size_t c = 0; c < ncols; c++) {
            for (int u = 0; u < GROUP_VECS; u++) {
                vf e = K(expv)(K(load)(x0 + c * SELATTN_TILE + VW * u) - shift[u]);
                K(store)(x0 + c * SELATTN_TILE + VW * u, e);
                sum[u] += e;
            }
        }
        for (int u = 0; u < GROUP_VECS; u++)
            K(store)(l + VW * (u0 + u), K(load)(l + VW * (u0 + u)) * al[u] + sum[u]);
    }
}

/* ---------------------------------------------------------------------------------------------
 * transpose: xt (ncols, 64)[c, r] = x[r * ldx + c] for r < rows, 0 for r >= rows (a row-major
 * tile, or a block of rows of q, to key-major / column-major form). In VW x VW blocks held
 * in registers: each round (w = VW / 2, ..., 2, 1) swaps the off-diagonal w x w sub-blocks of
 * row pairs (i, i + w) with two-register shuffles. */
#define TR_IDX_LO(k, w) (((k) & (w)) ? VW + (k) - (w) : (k))
#define TR_IDX_HI(k, w) (((k) & (w)) ? VW + (k) : (k) + (w))
#if VW == 16
#define TR_MASK(F, w) (vi){F(0, w), F(1, w), F(2, w), F(3, w), F(4, w), F(5, w), F(6, w),         \
                           F(7, w), F(8, w), F(9, w), F(10, w), F(11, w), F(12, w), F(13, w),     \
                           F(14, w), F(15, w)}
#elif VW == 8
#define TR_MASK(F, w) (vi){F(0, w), F(1, w), F(2, w), F(3, w), F(4, w), F(5, w), F(6, w), F(7, w)}
#else
#define TR_MASK(F, w) (vi){F(0, w), F(1, w), F(2, w), F(3, w)}
#endif
#define TR_ROUND(w)                                                                               \
    for (int i = 0; i < VW; i++) {                                                                \
        if (i & (w)) continue;                                                                    \
        vf lo = __builtin_shuffle(a[i], a[i + (w)], TR_MASK(TR_IDX_LO, w));                       \
        vf hi = __builtin_shuffle(a[i], a[i + (w)], TR_MASK(TR_IDX_HI, w));                       \
        a[i] = lo; a[i + (w)] = hi;                                                               \
    }
#if VW == 16
#define TR_ALL TR_ROUND(8) TR_ROUND(4) TR_ROUND(2) TR_ROUND(1)
#elif VW == 8
#define TR_ALL TR_ROUND(4) TR_ROUND(2) TR_ROUND(1)
#else
#define TR_ALL TR_ROUND(2) TR_ROUND(1)
#endif

static void K(transpose)(const float *restrict x, size_t ldx, size_t rows, size_t ncols,
                         float *restrict xt)
{
    size_t c0 = 0;
    for (; c0 + VW <= ncols; c0 += VW)
        for (size_t r0 = 0; r0 < SELATTN_TILE; r0 += VW) {
            vf a[VW];
            for (size_t i = 0; i < VW; i++)
                a[i] = r0 + i < rows ? K(load)(x + (r0 + i) * ldx + c0) : (vf){0};
            TR_ALL
            for (size_t j = 0; j < VW; j++) K(store)(xt + (c0 + j) * SELATTN_TILE + r0, a[j]);
        }
    for (; c0 < ncols; c0++)                                   /* columns past the last VW */
        for (size_t r = 0; r < SELATTN_TILE; r++)
            xt[c0 * SELATTN_TILE + r] = r < rows ? x[r * ldx + c0] : 0.0f;
}
/* mask_tile_t: mask_tile (selector_mask.h) written key-major: ft (64 keys, 64 rows)[c, r] =
 * fstart_cols[c] + sum_{r' < r} sel[r', c] for r < rows, 0 for r >= rows. The sums run down the
 * rows in order, as in mask_tile, and each VW x VW block is transposed in registers on its way
 * out, so F reaches the forward's key-major tiles without a row-major copy. colsum (64,), when
 * not NULL, gets the sums over all `rows` rows: column_sums' result, bit for bit (same order). */
static void K(mask_tile_t)(const float *restrict sel, const float *restrict fstart_cols,
                           size_t rows, float *restrict ft, float *restrict colsum)
{
    for (int u = 0; u < NV; u++) {
        const vf fs = K(load)(fstart_cols + VW * u);
        vf part = (vf){0};
        for (size_t r0 = 0; r0 < SELATTN_TILE; r0 += VW) {
            vf a[VW];
            for (size_t i = 0; i < VW; i++) {
                if (r0 + i < rows) {
                    a[i] = fs + part;
                    part += K(load)(sel + (r0 + i) * SELATTN_TILE + VW * u);
                } else {
                    a[i] = (vf){0};
                }
            }
            TR_ALL
            for (size_t j = 0; j < VW; j++) K(store)(ft + (VW * u + j) * SELATTN_TILE + r0, a[j]);
        }
        if (colsum) K(store)(colsum + VW * u, part);
    }
}

#undef TR_IDX_LO
#undef TR_IDX_HI
#undef TR_MASK
#undef TR_ROUND
#undef TR_ALL

/* ---------------------------------------------------------------------------------------------
 * selector_grad: the selector's extra gradient on one tile, added into its G (rows, 64). carry
 * (64,) holds, per key, the sum of gsum over the rows below the tile; walking rows upwards,
 * g[m] -= carry where sel[m] > 0 (dS = -carry, gated by S > 0), then carry += gsum[m]. */
static void K(selector_grad)(const float *restrict gsum, const float *restrict sel, size_t rows,
                             float *restrict carry, float *restrict g)
{
    const vf zero = {0};
    for (int u0 = 0; u0 < NV; u0 += GROUP_VECS) {
        vf cr[GROUP_VECS];
        for (int u = 0; u < GROUP_VECS; u++) cr[u] = K(load)(carry + VW * (u0 + u));
        for (size_t r = rows; r-- > 0;) {
            for (int u = 0; u < GROUP_VECS; u++) {
                const size_t e = r * SELATTN_TILE + VW * (u0 + u);
                vf gv = K(load)(g + e);
                K(store)(g + e, K(select)(K(load)(sel + e) > zero, gv - cr[u], gv));
                cr[u] += K(load)(gsum + e);
            }
        }
        for (int u = 0; u < GROUP_VECS; u++) K(store)(carry + VW * (u0 + u), cr[u]);
    }
}

/* ---------------------------------------------------------------------------------------------
 * column_sums: sums (64,) = sum over r < rows of x[r, :], rows added in order from 0 (the order
 * mask_tile's partial sums use, so Fstart and the in-block part of F agree bit for bit). */
static void K(column_sums)(const float *restrict x, size_t rows, float *restrict sums)
{
    for (int u0 = 0; u0 < NV; u0 += GROUP_VECS) {
        vf part[GROUP_VECS];
        for (int u = 0; u < GROUP_VECS; u++) part[u] = (vf){0};
        for (size_t r = 0; r < rows; r++)
            for (int u = 0; u < GROUP_VECS; u++)
                part[u] += K(load)(x + r * SELATTN_TILE + VW * (u0 + u));
        for (int u = 0; u < GROUP_VECS; u++) K(store)(sums + VW * (u0 + u), part[u]);
    }
}

const selattn_kernels CAT(selattn_kernels, KERNEL_ISA) = {
    .name = KERNEL_NAME,
    .gemm_nt = K(gemm_nt),
    .gemm_nt_probs = K(gemm_nt_probs),
    .gemm_nt_grad = K(gemm_nt_grad),
    .gemm_nt_probs_t = K(gemm_nt_probs_t),
    .gemm_nt_grad_t = K(gemm_nt_grad_t),
    .gemm_nt_logits = K(gemm_nt_logits),
    .gemm_acc = K(gemm_acc),
    .gemm_acc_t = K(gemm_acc_t),
    .masked_logits = K(masked_logits),
    .exp_rows = K(exp_rows),
    .probs_t = K(probs_t),
    .selection = K(selection),
    .softmax_grad = K(softmax_grad),
    .softmax_t = K(softmax_t),
    .transpose = K(transpose),
    .mask_tile_t = K(mask_tile_t),
    .column_sums = K(column_sums),
    .selector_grad = K(selector_grad),
};
