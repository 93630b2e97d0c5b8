/* Packs of live keys (key_pack.h): their buffers, and gathering a key into one. */
#include <stdlib.h>
#include <string.h>

#include "key_pack.h"
#include "tile_kernels.h"

#define T SELATTN_TILE

int key_pack_alloc(key_pack *pk, size_t H, size_t D)
{
    pk->n = 0;
    pk->H = H;
    pk->D = D;
    pk->ft = malloc(T * T * sizeof(float));
    pk->ls = malloc(T * T * sizeof(float));
    pk->k = malloc(H * T * D * sizeof(float));
    pk->v = malloc(H * T * D * sizeof(float));
    return pk->ft && pk->ls && pk->k && pk->v;
}

void key_pack_free(key_pack *pk)
{
    free(pk->ft); free(pk->ls); free(pk->k); free(pk->v);
    pk->ft = pk->ls = pk->k = pk->v = NULL;
    pk->n = 0;
}

void key_pack_add(key_pack *pk, const float *ft_col, const float *ls_col, const float *k,
                  const float *v, size_t b, size_t N, size_t j)
{
    const size_t H = pk->H, D = pk->D, n = pk->n++;
    memcpy(pk->ft + n * T, ft_col, T * sizeof(float));
    if (ls_col) memcpy(pk->ls + n * T, ls_col, T * sizeof(float));
    for (size_t h = 0; h < H; h++) {
        const size_t src = ((b * H + h) * N + j) * D;                /* row (b, h, j) */
        memcpy(pk->k + (h * T + n) * D, k + src, D * sizeof(float));
        memcpy(pk->v + (h * T + n) * D, v + src, D * sizeof(float));
    }
}
