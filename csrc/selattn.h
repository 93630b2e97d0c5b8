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

/* cdef begin: selattn_c/build_ffi.py hands the declarations from here to the "cdef end" mark to
 * cffi, so this header is the one description of the C API. */
#define SELATTN_OK 0
#define SELATTN_ENOMEM 1

/* Forward: out = softmax(L - F) v, and lse = the per-row log-sum-exp that backward needs.
 * selector_head in [0, H); protect_bos, selective are 0/1. */
int selattn_forward(const float *q, const float *k, const float *v,
                    size_t B, size_t H, size_t N, size_t D,
                    size_t selector_head, int protect_bos, int selective, float scale,
                    float *out, float *lse, int nthreads);

/* Backward of selattn_forward, including the path through F into the selector head's q and k.
 * out and lse are what the forward returned; dq, dk, dv are written (not accumulated). */
int selattn_backward(const float *q, const float *k, const float *v,
                     const float *out, const float *lse, const float *dout,
                     size_t B, size_t H, size_t N, size_t D,
                     size_t selector_head, int protect_bos, int selective, float scale,
                     float *dq, float *dk, float *dv, int nthreads);

/* The accumulated mask F (B, N, N), materialised: for inspection and plots only. */
int selattn_accumulated_mask(const float *q, const float *k,
                             size_t B, size_t H, size_t N, size_t D,
                             size_t selector_head, int protect_bos, float scale,
                             float *F, int nthreads);

/* Threads and build facts. */
int selattn_openmp_enabled(void);
int selattn_max_threads(void);
/* Which tile kernels run on this CPU: "avx512", "avx2" or "generic". */
const char *selattn_kernel_name(void);
/* "" for an OpenMP build, else why it is serial. */
const char *selattn_serial_reason(void);
/* cdef end */

#endif /* SELATTN_H */
