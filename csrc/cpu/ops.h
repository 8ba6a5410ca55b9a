/* The CPU ops the model calls, each one parallel job (or none when too small to share). */
#ifndef SMOLLM3_CPU_OPS_H
#define SMOLLM3_CPU_OPS_H

#include <stdint.h>

#include "qgemm.h"

#define QG_MAX_SEGMENTS 8

typedef struct {               /* row segments of one column count (a fused QKV of mixed types) */
    int n_seg, rows, cols;
    int wide;                  /* int16 activations (a legacy type among the segments: qgemm.h) */
    qg_weight seg[QG_MAX_SEGMENTS];
} qg_matrix;

/* y[M, rows] = x[M, cols] @ W^T, + residual[M, rows] (stride ldy; not y itself) unless NULL;
 * swiglu: y[M, rows / 2] = silu(gate) * up, W's rows being gate then up (no residual).
 * Returns nonzero when out of memory. */
int op_matmul(const qg_matrix *w, const float *x, int64_t ldx, int m, float *y, int64_t ldy,
              const float *residual, int threads, int swiglu);

enum { KV_F32, KV_F16, KV_BF16 };

/* h = x + residual (residual NULL: h = x, not written); y = h * rsqrt(mean(h^2) + eps) * w. */
void op_rms_norm(const float *x, const float *residual, const float *w, float eps, int m, int d, float *y, float *h);

/* qkv [m, (n_heads + 2 n_kv) d] -> q [m, n_heads, d] rotated (half-split RoPE at positions,
 * tables cos / sin [n_pos, d / 2]) when use_rope; K (rotated) and V written to the caches
 * [n_blocks, n_kv, block_size, d] at slots (block * block_size + offset; < 0: not written).
 * Returns the first token whose position is outside the tables or slot outside the pool,
 * or -1. */
int op_rope_kv(const float *qkv, int m, const int64_t *positions, const int64_t *slots, const float *cos,
               const float *sin, int64_t n_pos, int n_heads, int n_kv, int d, int use_rope, void *k_cache,
               void *v_cache, int dtype, int64_t n_slots, int block_size, float *q);

typedef struct {
    const float *q;                 /* [rows, n_heads, d] */
    const void *k_cache, *v_cache;  /* [n_blocks, n_kv_heads, block_size, d] of dtype */
    int dtype, block_size, n_heads, n_kv_heads, d, n_seqs;
    const int32_t *tables;          /* [*, table_stride] block ids */
    int64_t table_stride;
    const int32_t *table_index;     /* each query's row of tables (NULL: query i reads row i) */
    const int32_t *seq_lens;        /* keys each query sees (its own position + 1) */
    const int64_t *rows;            /* each query's row in q and out */
    float scale;
    float *out;                     /* [rows, n_heads, d] */
} attn_args;

/* Keys per attention task; a sequence's spans are merged in order. */
#define KEY_SPAN 256
/* Below this many multiply-adds (keys x heads x d over the batch) attention runs on one thread. */
#define ATTN_PARALLEL_MIN (1 << 18)

/* n_seqs queries, each against the first seq_lens[i] keys of its sequence: a decode step's
 * one query per sequence, or a prompt's rows each at its own position (causal). Returns 0,
 * 1 when out of memory, 2 for an unsupported shape (group > 16, d > 256 or not a multiple of 8). */
int op_attention(const attn_args *a, int threads);

#endif
