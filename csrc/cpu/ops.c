/* ops.h */
#include "ops.h"

#include <math.h>
#include <stdlib.h>

#include "pool.h"

/* Work per task (multiply-adds): large enough that a claim is cheap beside it, small enough
 * that a thread the OS deschedules mid-task holds up little. */
#define TASK_MACS (1 << 16)

static void compute_rows(const qg_matrix *m, int r0, int r1, const qg_act *x, float *y, int64_t ldy) {
    int base = 0;
    for (int s = 0; s < m->n_seg; base += m->seg[s++].rows) {
        const qg_weight *w = &m->seg[s];
        int a = r0 - base < 0 ? 0 : r0 - base, b = r1 - base > w->rows ? w->rows : r1 - base;
        if (a < b) qg_rows(w, x, a, b, y + (base + a - r0), ldy);
    }
}

typedef struct {
    const qg_matrix *w;
    qg_act x;
    float *y;
    int64_t ldy;
    int tile, rows, swiglu;
} matmul_job;

static void matmul_task(void *ctx, int t) {
    matmul_job *j = ctx;
    int r0 = t * j->tile, r1 = r0 + j->tile < j->rows ? r0 + j->tile : j->rows, n = r1 - r0, m = j->x.m;
    if (!j->swiglu) {
        compute_rows(j->w, r0, r1, &j->x, j->y + r0, j->ldy);
        return;
    }
    float small[m * n <= 16384 ? m * n : 1];
    float *up = m * n <= 16384 ? small : malloc(sizeof(float) * m * n);
    float *gate = j->y + r0;
    compute_rows(j->w, r0, r1, &j->x, gate, j->ldy);
    compute_rows(j->w, j->rows + r0, j->rows + r1, &j->x, up, n);
    for (int i = 0; i < m; i++)
        for (int c = 0; c < n; c++) {
            float g = gate[i * j->ldy + c];
            gate[i * j->ldy + c] = g / (1.f + expf(-g)) * up[i * n + c];
        }
    if (up != small) free(up);
}

int op_matmul(const qg_matrix *w, const float *x, int64_t ldx, int m, float *y, int64_t ldy, int threads,
              int swiglu) {
    int64_t bytes = (qg_act_bytes(m, w->cols) + 63) & ~(int64_t)63;
    void *buf = aligned_alloc(64, bytes);
    if (!buf) return 1;
    matmul_job j = {.w = w, .y = y, .ldy = ldy, .rows = swiglu ? w->rows / 2 : w->rows, .swiglu = swiglu};
    qg_quantize(x, ldx, m, w->cols, buf, &j.x);
    int64_t per_row = (int64_t)w->cols * (m < 8 ? m : 8) * (swiglu ? 2 : 1);
    j.tile = (int)((TASK_MACS + per_row - 1) / per_row + 3) & ~3;
    int n_tasks = (j.rows + j.tile - 1) / j.tile;
    pool_run(threads, n_tasks, matmul_task, &j);
    free(buf);
    return 0;
}
