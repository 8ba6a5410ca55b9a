/* ops.h */
#include "ops.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>

#include "pool.h"

/* Work per task (multiply-adds): large enough that a claim is cheap beside it, small enough
 * that a thread the OS deschedules mid-task holds up little. */
#define TASK_MACS (1 << 16)

typedef struct {
    const qg_matrix *w;
    qg_act x;                   /* int8 activations, or */
    qg_act16 x16;               /* int16 ones (w->wide) */
    float *y;
    const float *residual;      /* added to y's tile while it is in cache (NULL: none) */
    int64_t ldy;
    int tile, rows, swiglu;
} matmul_job;

static void compute_rows(const matmul_job *j, int r0, int r1, float *y, int64_t ldy) {
    const qg_matrix *m = j->w;
    int base = 0;
    for (int s = 0; s < m->n_seg; base += m->seg[s++].rows) {
        const qg_weight *w = &m->seg[s];
        int a = r0 - base < 0 ? 0 : r0 - base, b = r1 - base > w->rows ? w->rows : r1 - base;
        if (a >= b) continue;
        if (m->wide)
            qg_rows16(w, &j->x16, a, b, y + (base + a - r0), ldy);
        else
            qg_rows(w, &j->x, a, b, y + (base + a - r0), ldy);
    }
}

static int m_rows(const matmul_job *j) { return j->w->wide ? j->x16.m : j->x.m; }

static void matmul_task(void *ctx, int t) {
    matmul_job *j = ctx;
    int r0 = t * j->tile, r1 = r0 + j->tile < j->rows ? r0 + j->tile : j->rows, n = r1 - r0, m = m_rows(j);
    if (!j->swiglu) {
        compute_rows(j, r0, r1, j->y + r0, j->ldy);
        if (j->residual)
            for (int i = 0; i < m; i++) {
                float *y = j->y + i * j->ldy + r0;
                const float *res = j->residual + i * j->ldy + r0;
                for (int c = 0; c < n; c++) y[c] += res[c];
            }
        return;
    }
    float small[m * n <= 16384 ? m * n : 1];
    float *up = m * n <= 16384 ? small : malloc(sizeof(float) * m * n);
    float *gate = j->y + r0;
    compute_rows(j, r0, r1, gate, j->ldy);
    compute_rows(j, j->rows + r0, j->rows + r1, up, n);
    for (int i = 0; i < m; i++)
        for (int c = 0; c < n; c++) {
            float g = gate[i * j->ldy + c];
            gate[i * j->ldy + c] = g / (1.f + expf(-g)) * up[i * n + c];
        }
    if (up != small) free(up);
}

/* Activation rows per quantization task (prompts: several tasks). */
#define QUANT_ROWS 16

typedef struct {
    const float *x;
    int64_t ldx;
    const matmul_job *job;
    int m;
} quant_job;

static void quantize(const matmul_job *j, const float *x, int64_t ldx, int i0, int i1) {
    if (j->w->wide)
        qg_quantize16(x, ldx, i0, i1, &j->x16);
    else
        qg_quantize(x, ldx, i0, i1, &j->x);
}

static void quant_task(void *ctx, int t) {
    const quant_job *q = ctx;
    int i1 = (t + 1) * QUANT_ROWS < q->m ? (t + 1) * QUANT_ROWS : q->m;
    quantize(q->job, q->x, q->ldx, t * QUANT_ROWS, i1);
}

int op_matmul(const qg_matrix *w, const float *x, int64_t ldx, int m, float *y, int64_t ldy,
              const float *residual, int threads, int swiglu) {
    if (m <= 0) return 0;
    int64_t bytes = ((w->wide ? qg_act16_bytes(m, w->cols) : qg_act_bytes(m, w->cols)) + 63) & ~(int64_t)63;
    void *buf = aligned_alloc(64, bytes);
    if (!buf) return 1;
    matmul_job j = {.w = w, .y = y, .residual = residual, .ldy = ldy, .rows = swiglu ? w->rows / 2 : w->rows,
                    .swiglu = swiglu};
    if (w->wide)
        qg_act16_layout(m, w->cols, buf, &j.x16);
    else
        qg_act_layout(m, w->cols, buf, &j.x);
    if (m >= 2 * QUANT_ROWS) {
        quant_job q = {x, ldx, &j, m};
        pool_run(threads, (m + QUANT_ROWS - 1) / QUANT_ROWS, quant_task, &q);
    } else {
        quantize(&j, x, ldx, 0, m);
    }
    int64_t per_row = (int64_t)w->cols * (m < 8 ? m : 8) * (swiglu ? 2 : 1);
    j.tile = (int)((TASK_MACS + per_row - 1) / per_row + 3) & ~3;
    int n_tasks = (j.rows + j.tile - 1) / j.tile;
    pool_run(threads, n_tasks, matmul_task, &j);
    free(buf);
    return 0;
}

void op_rms_norm(const float *x, const float *residual, const float *w, float eps, int m, int d, float *y, float *h) {
    for (int i = 0; i < m; i++) {
        const float *xr = x + (int64_t)i * d;
        float *hr = residual ? h + (int64_t)i * d : (float *)xr;
        if (residual)
            for (int c = 0; c < d; c++) hr[c] = xr[c] + residual[(int64_t)i * d + c];
        double ss = 0;
        for (int c = 0; c < d; c++) ss += (double)hr[c] * hr[c];
        float r = 1.f / sqrtf((float)(ss / d) + eps);
        for (int c = 0; c < d; c++) y[(int64_t)i * d + c] = hr[c] * r * w[c];
    }
}

static uint16_t to_bf16(float f) {       /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)(u >> 16 | 0x40);
    return (uint16_t)((u + 0x7fff + (u >> 16 & 1)) >> 16);
}

__attribute__((target("f16c"))) static void store(void *cache, int64_t at, const float *src, int d, int dtype) {
    if (dtype == KV_F32) {
        memcpy((float *)cache + at, src, sizeof(float) * d);
    } else {
        uint16_t *dst = (uint16_t *)cache + at;
        for (int c = 0; c < d; c++) dst[c] = dtype == KV_F16 ? _cvtss_sh(src[c], 0) : to_bf16(src[c]);
    }
}

int op_rope_kv(const float *qkv, int m, const int64_t *positions, const int64_t *slots, const float *cos,
               const float *sin, int64_t n_pos, int n_heads, int n_kv, int d, int use_rope, void *k_cache,
               void *v_cache, int dtype, int64_t n_slots, int block_size, float *q) {
    int half = d / 2, width = (n_heads + 2 * n_kv) * d;
    float k[d];
    for (int t = 0; t < m; t++) {
        int64_t p = positions[t], slot = slots[t];
        if (p < 0 || p >= n_pos || slot >= n_slots) return t;
        const float *row = qkv + (int64_t)t * width, *c = cos + p * half, *s = sin + p * half;
        int64_t at = slot < 0 ? -1 : ((slot / block_size * n_kv) * block_size + slot % block_size) * d;
        for (int h = 0; h < n_heads + n_kv; h++) {
            const float *src = row + h * d;
            float *dst = h < n_heads ? q + ((int64_t)t * n_heads + h) * d : k;
            for (int i = 0; i < half; i++) {
                float x1 = src[i], x2 = src[i + half];
                dst[i] = use_rope ? x1 * c[i] - x2 * s[i] : x1;
                dst[i + half] = use_rope ? x2 * c[i] + x1 * s[i] : x2;
            }
            if (h >= n_heads && at >= 0) {
                int64_t head_at = at + (int64_t)(h - n_heads) * block_size * d;
                store(k_cache, head_at, k, d, dtype);
                store(v_cache, head_at, row + (n_heads + n_kv + h - n_heads) * d, d, dtype);
            }
        }
    }
    return -1;
}
