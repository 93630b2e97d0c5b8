/* The three hot inner loops of selective attention, on tiles of SELATTN_TILE keys.
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
    /* acc (rows, D) += p (rows, TILE) @ y (ncols, D), using the first ncols columns of p.
     * This is out += P v (and dq += G k, dv += P^T dout, dk += G^T q in the backward). */
    void (*gemm_acc)(const float *p, size_t rows, const float *y, size_t ncols, size_t D,
                     float *acc);
    /* x[i] = exp(x[i]) for n values; exp(-inf) = 0. Results below ~1e-38 are flushed to 0. */
    void (*exp_inplace)(float *x, size_t n);
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
