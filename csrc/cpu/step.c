/* step.h: a whole decode step, the model's forward (smollm3_triton/model.py) for one query per
 * sequence, op for op, with no Python between the ops. */
#include "step.h"

#include <stdlib.h>

#include "ops.h"

int step_decode(const step_model *m, float *x, int B, const int64_t *positions, const int64_t *slots,
                const int32_t *tables, int64_t table_stride, const int32_t *seq_lens, const int64_t *logit_rows,
                int R, float *logits, int threads) {
    int H = m->hidden, D = m->head_dim, qkv_w = (m->n_heads + 2 * m->n_kv_heads) * D;
    int64_t floats = (int64_t)B * (3 * H + qkv_w + 2 * m->n_heads * D + m->inter) + (int64_t)R * 2 * H;
    float *buf = malloc(sizeof(float) * floats);
    int64_t *rows = malloc(sizeof(int64_t) * (B > 0 ? B : 1));
    if (!buf || !rows) {
        free(buf);
        free(rows);
        return 1;
    }
    float *res = buf, *h = res + (int64_t)B * H, *y = h + (int64_t)B * H, *qkv = y + (int64_t)B * H;
    float *q = qkv + (int64_t)B * qkv_w, *attn = q + (int64_t)B * m->n_heads * D, *gu = attn + (int64_t)B * m->n_heads * D;
    float *last = gu + (int64_t)B * m->inter, *last_h = last + (int64_t)R * H;
    for (int b = 0; b < B; b++) rows[b] = b;
    attn_args at = {.q = q, .n_heads = m->n_heads, .n_kv_heads = m->n_kv_heads, .d = D, .n_seqs = B,
                    .dtype = m->kv_dtype, .block_size = m->block_size, .tables = tables,
                    .table_stride = table_stride, .seq_lens = seq_lens, .rows = rows, .scale = m->scale, .out = attn};
    int rc = 0;
    /* x: the branch output entering each norm; res: the running residual stream. */
    for (int i = 0; i < m->n_layers && rc == 0; i++) {
        const step_layer *l = &m->layers[i];
        op_rms_norm(x, i ? res : NULL, l->attn_norm, m->eps, B, H, y, res);
        if (i == 0)     /* the first norm has no residual: the stream starts as the embeddings */
            for (int64_t e = 0; e < (int64_t)B * H; e++) res[e] = x[e];
        if ((rc = op_matmul(l->qkv, y, H, B, qkv, qkv_w, NULL, threads, 0))) break;
        if (op_rope_kv(qkv, B, positions, slots, m->cos, m->sin, m->n_pos, m->n_heads, m->n_kv_heads, D, l->use_rope,
                       l->k_cache, l->v_cache, m->kv_dtype, m->n_slots, m->block_size, q) >= 0) {
            rc = 3;
            break;
        }
        at.k_cache = l->k_cache;
        at.v_cache = l->v_cache;
        if ((rc = op_attention(&at, threads))) break;
        if ((rc = op_matmul(l->o, attn, m->n_heads * D, B, x, H, NULL, threads, 0))) break;
        op_rms_norm(x, res, l->ffn_norm, m->eps, B, H, y, h);
        float *t = res;         /* h (= x + res) is the new stream */
        res = h;
        h = t;
        if ((rc = op_matmul(l->gate_up, y, H, B, gu, m->inter, NULL, threads, 1))) break;
        if ((rc = op_matmul(l->down, gu, m->inter, B, x, H, NULL, threads, 0))) break;
    }
    if (rc == 0) {
        for (int r = 0; r < R; r++)
            for (int c = 0; c < H; c++) {
                last[(int64_t)r * H + c] = x[logit_rows[r] * H + c];
                last_h[(int64_t)r * H + c] = res[logit_rows[r] * H + c];
            }
        op_rms_norm(last, last_h, m->final_norm, m->eps, R, H, y, last_h);
        rc = op_matmul(m->lm_head, y, H, R, logits, m->vocab, NULL, threads, 0);
    }
    free(buf);
    free(rows);
    return rc;
}
