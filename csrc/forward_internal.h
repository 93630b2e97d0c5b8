/* The forward with an eviction schedule: shared by selattn_forward (no evictions) and the pruned
 * prefill of the KV cache (kv_cache.c). Not part of the public API. */
#ifndef SELATTN_FORWARD_INTERNAL_H
#define SELATTN_FORWARD_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "rank_penalty.h"

/* selattn_forward, where key j of batch element b is visible to query i only while
 * i < evict_at[b * N + j] (evict_at (B, N), or NULL: nothing is evicted). lse and fstart may be
 * NULL; with evictions, fstart's rows skip the key tiles a block skipped. soft, when not NULL,
 * adds the rank penalty (rank_penalty.h): its theta and cut are written (no cut anywhere when not
 * selective or budget >= N), and every head subtracts F_soft. Not with evict_at.
 * dead_key_threshold t (dead_keys_on: > 0 and finite; else exact): key tiles dead for a block by
 * the bound of dead_keys.h are skipped for it and every later block; the fstart rows then hold
 * +inf on a dead tile's keys from the block after its death on. */
int forward_with_evictions(const float *q, const float *k, const float *v,
                           size_t B, size_t H, size_t N, size_t D,
                           size_t selector_head, int protect_bos, int selective, float scale,
                           const int64_t *evict_at, const soft_penalty *soft,
                           float dead_key_threshold, float *out, float *lse, float *fstart_out,
                           int nthreads);

#endif /* SELATTN_FORWARD_INTERNAL_H */
