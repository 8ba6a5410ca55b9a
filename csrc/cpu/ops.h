/* The CPU ops the model calls, each one parallel job (or none when too small to share). */
#ifndef SMOLLM3_CPU_OPS_H
#define SMOLLM3_CPU_OPS_H

#include <stdint.h>

#include "qgemm.h"

#define QG_MAX_SEGMENTS 8

typedef struct {               /* row segments of one column count (a fused QKV of mixed types) */
    int n_seg, rows, cols;
    qg_weight seg[QG_MAX_SEGMENTS];
} qg_matrix;

/* y[M, rows] = x[M, cols] @ W^T; swiglu: y[M, rows / 2] = silu(gate) * up, W's rows being
 * gate then up. Returns nonzero when out of memory. */
int op_matmul(const qg_matrix *w, const float *x, int64_t ldx, int m, float *y, int64_t ldy, int threads,
              int swiglu);

#endif
