/* Packs of live keys (docs/kernel-design.md, "Dead keys"): the keys of a partly dead key tile that
 * the bound of dead_keys.h leaves alive, gathered key-major into a tile of at most TILE keys, so
 * that the heads' work on them costs O(live keys), not O(64 x tiles).
 *
 * A pack holds, for its keys m = 0 .. n - 1 (in the order they were added):
 *   ft (TILE keys, TILE rows)  F of the key for the query block's rows (the F tile's key-major row)
 *   ls (TILE keys, TILE rows)  the selector head's logits of the key (its transposed column)
 *   k, v (H, TILE, D)          every head's key and value row
 * The forward fills one per query block from the live keys of several tiles and runs the heads on
 * it when it is full (run_pack); the backward packs the live keys of one tile at a time (its key
 * blocks own dk and dv) and runs its key-major kernels on the n packed keys. Which keys are live
 * is tile_live_keys' decision (dead_keys.h), for both.
 */
#ifndef SELATTN_KEY_PACK_H
#define SELATTN_KEY_PACK_H

#include <stddef.h>

typedef struct {
    size_t n;              /* keys in the pack */
    size_t H, D;
    float *ft, *ls;        /* (TILE, TILE) key-major */
    float *k, *v;          /* (H, TILE, D) */
} key_pack;

/* An empty pack for H heads of dimension D. 1 when allocated, 0 otherwise (key_pack_free is right
 * either way). */
int key_pack_alloc(key_pack *pk, size_t H, size_t D);
void key_pack_free(key_pack *pk);

/* Append key j of batch element b (n < TILE): ft_col, ls_col (TILE,) its F and selector logits
 * (rows of key-major tiles; ls_col may be NULL when the caller never reads pk->ls), and its rows
 * of k and v (B, H, N, D). */
void key_pack_add(key_pack *pk, const float *ft_col, const float *ls_col, const float *k,
                  const float *v, size_t b, size_t N, size_t j);

#endif /* SELATTN_KEY_PACK_H */
