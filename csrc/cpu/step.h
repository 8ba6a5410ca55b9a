/* A whole decode step of the transformer (smollm3_triton/model.py) in one call: the engine's
 * steps where every sequence brings one token spend no time in Python between ops. */
#ifndef SMOLLM3_CPU_STEP_H
#define SMOLLM3_CPU_STEP_H

#include <stdint.h>

#include "ops.h"

typedef struct {
    const float *attn_norm, *ffn_norm;
    const qg_matrix *qkv, *o, *gate_up, *down;
    void *k_cache, *v_cache;            /* this layer's [n_blocks, n_kv_heads, block_size, head_dim] */
    int use_rope;
} step_layer;

typedef struct {
    int n_layers, hidden, n_heads, n_kv_heads, head_dim, inter, vocab;
    float eps, scale;
    const float *cos, *sin;             /* RoPE tables [n_pos, head_dim / 2] */
    int64_t n_pos, n_slots;
    int kv_dtype, block_size;
    const float *final_norm;
    const qg_matrix *lm_head;
    step_layer layers[];
} step_model;

/* x [B, hidden]: the tokens' embeddings (overwritten). Returns 0; 1 out of memory; 2 an
 * unsupported attention shape; 3 a position outside the RoPE tables or slot outside the pool. */
int step_decode(const step_model *m, float *x, int B, const int64_t *positions, const int64_t *slots,
                const int32_t *tables, int64_t table_stride, const int32_t *seq_lens, const int64_t *logit_rows,
                int R, float *logits, int threads);

#endif
