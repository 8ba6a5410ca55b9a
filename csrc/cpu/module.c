/* smollm3_triton._cpu: the CPU kernels' Python entry points. Tensors arrive as data
 * pointers (tensor.data_ptr()) with their sizes; kernels/cpu_native.py checks dtypes,
 * shapes and contiguity before any call, and keeps every buffer alive across it. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "ops.h"
#include "pool.h"
#include "qgemm.h"
#include "step.h"

static int ints(PyObject *const *args, Py_ssize_t n, Py_ssize_t want, long long *out, const char *name) {
    if (n != want) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd arguments, got %zd", name, want, n);
        return 0;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        out[i] = PyLong_AsLongLong(args[i]);
        if (out[i] == -1 && PyErr_Occurred()) return 0;
    }
    return 1;
}

/* ---------------------------------------------------------------- matrices */

static void free_matrix(PyObject *capsule) {
    qg_matrix *m = PyCapsule_GetPointer(capsule, "qg_matrix");
    if (m) {
        for (int i = 0; i < m->n_seg; i++) free(m->seg[i].chunks);
        free(m);
    }
}

/* plan(kind, cols) -> row bytes, or -1 */
static PyObject *py_plan(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[2];
    if (!ints(args, n, 2, a, "plan")) return NULL;
    if (a[1] <= 0 || a[1] > (1 << 24)) return PyLong_FromLong(-1);
    qg_chunk *chunks = malloc(sizeof(qg_chunk) * qg_max_chunks((int)a[1]));
    int64_t row_bytes = -1;
    int ok = chunks && qg_plan((int)a[0], (int)a[1], chunks, &row_bytes) > 0;
    free(chunks);
    return PyLong_FromLongLong(ok ? row_bytes : -1);
}

/* matrix(cols, kind0, rows0, data0, kind1, rows1, data1, ...) -> capsule: row segments of one
 * column count, each packed by pack() into data (row bytes from plan(), + 64 bytes). */
static PyObject *py_matrix(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[1 + 3 * QG_MAX_SEGMENTS];
    if (n < 4 || (n - 1) % 3 || n > 1 + 3 * QG_MAX_SEGMENTS) {
        PyErr_SetString(PyExc_TypeError, "matrix(cols, kind, rows, data, ...): 1 to 8 segments");
        return NULL;
    }
    if (!ints(args, n, n, a, "matrix")) return NULL;
    qg_matrix *m = calloc(1, sizeof(qg_matrix));
    if (!m) return PyErr_NoMemory();
    m->cols = (int)a[0];
    for (Py_ssize_t i = 1; i < n; i += 3) {
        qg_weight *w = &m->seg[m->n_seg++];
        w->kind = (int)a[i];
        w->rows = (int)a[i + 1];
        w->cols = m->cols;
        w->data = (const uint8_t *)(intptr_t)a[i + 2];
        w->chunks = malloc(sizeof(qg_chunk) * qg_max_chunks(m->cols));
        if (!w->chunks || (w->n_chunks = qg_plan(w->kind, w->cols, w->chunks, &w->row_bytes)) <= 0) {
            PyObject *cap = PyCapsule_New(m, "qg_matrix", free_matrix);   /* frees what was made */
            Py_XDECREF(cap);
            PyErr_Format(PyExc_ValueError, "no layout for kind %d with %d columns", (int)a[i], m->cols);
            return NULL;
        }
        m->rows += w->rows;
        m->wide |= w->kind < QG_Q4_K;
    }
    return PyCapsule_New(m, "qg_matrix", free_matrix);
}

/* pack(kind, rows, cols, v, s, ls, f, lf, out) */
static PyObject *py_pack(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[9];
    if (!ints(args, n, 9, a, "pack")) return NULL;
    qg_weight w = {.kind = (int)a[0], .rows = (int)a[1], .cols = (int)a[2]};
    w.chunks = malloc(sizeof(qg_chunk) * qg_max_chunks(w.cols));
    if (!w.chunks || (w.n_chunks = qg_plan(w.kind, w.cols, w.chunks, &w.row_bytes)) <= 0) {
        free(w.chunks);
        PyErr_Format(PyExc_ValueError, "no layout for kind %d with %d columns", w.kind, w.cols);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    qg_pack(&w, (const int16_t *)(intptr_t)a[3], (const uint8_t *)(intptr_t)a[4], a[5],
            (const uint16_t *)(intptr_t)a[6], a[7], (uint8_t *)(intptr_t)a[8]);
    Py_END_ALLOW_THREADS
    free(w.chunks);
    Py_RETURN_NONE;
}

static const qg_matrix *get_matrix(PyObject *o) { return PyCapsule_GetPointer(o, "qg_matrix"); }

/* pack_gguf(kind, rows, cols, raw, raw_row_bytes, out) */
static PyObject *py_pack_gguf(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[6];
    if (!ints(args, n, 6, a, "pack_gguf")) return NULL;
    qg_weight w = {.kind = (int)a[0], .rows = (int)a[1], .cols = (int)a[2]};
    w.chunks = malloc(sizeof(qg_chunk) * qg_max_chunks(w.cols));
    if (!w.chunks || (w.n_chunks = qg_plan(w.kind, w.cols, w.chunks, &w.row_bytes)) <= 0) {
        free(w.chunks);
        return PyErr_Format(PyExc_ValueError, "no layout for kind %d with %d columns", w.kind, w.cols);
    }
    if (a[4] != (long long)w.cols / qg_block_elems(w.kind) * qg_block_bytes(w.kind)) {
        free(w.chunks);
        return PyErr_Format(PyExc_ValueError, "rows of %lld bytes for %d columns of kind %d", a[4], w.cols, w.kind);
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = qg_pack_gguf(&w, (const uint8_t *)(intptr_t)a[3], a[4], (uint8_t *)(intptr_t)a[5]);
    Py_END_ALLOW_THREADS
    free(w.chunks);
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

#define HUGE_PAGE ((uintptr_t)2 << 20)

/* advise_huge(ptr, nbytes) -> the bytes of the whole 2 MB pages inside [ptr, ptr + nbytes) that
 * the kernel was asked to back with transparent huge pages (madvise), 0 where it refuses (THP
 * off). Call it before the memory is first written: pages already there stay 4 KB. */
static PyObject *py_advise_huge(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[2];
    if (!ints(args, n, 2, a, "advise_huge")) return NULL;
    uintptr_t start = ((uintptr_t)a[0] + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1);
    uintptr_t end = ((uintptr_t)a[0] + (uintptr_t)a[1]) & ~(HUGE_PAGE - 1);
    if (a[1] <= 0 || end <= start || madvise((void *)start, end - start, MADV_HUGEPAGE) != 0) return PyLong_FromLong(0);
    return PyLong_FromUnsignedLongLong((unsigned long long)(end - start));
}

/* dequant_rows(matrix, rows (int64), n, out [n, cols] fp32); rows must be < the matrix's rows */
static PyObject *py_dequant_rows(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[3];
    if (n != 4) return PyErr_Format(PyExc_TypeError, "dequant_rows takes 4 arguments, got %zd", n);
    const qg_matrix *m = get_matrix(args[0]);
    if (!m || !ints(args + 1, 3, 3, a, "dequant_rows")) return NULL;
    const int64_t *rows = (const int64_t *)(intptr_t)a[0];
    float *out = (float *)(intptr_t)a[2];
    for (long long i = 0; i < a[1]; i++) {
        int64_t r = rows[i], base = 0;
        for (int s = 0; s < m->n_seg; base += m->seg[s++].rows)
            if (r - base < m->seg[s].rows) {
                int64_t local = r - base;
                qg_dequant_rows(&m->seg[s], &local, 1, out + i * m->cols);
                break;
            }
    }
    Py_RETURN_NONE;
}

/* matmul(matrix, x, ldx, m, y, ldy, residual, threads): y[m, rows] = x[m, cols] @ W^T (fp32)
 * + residual[m, rows] (stride ldy, not y itself; 0: none) */
static PyObject *py_matmul(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[7];
    if (n != 8) return PyErr_Format(PyExc_TypeError, "matmul takes 8 arguments, got %zd", n);
    const qg_matrix *mat = get_matrix(args[0]);
    if (!mat || !ints(args + 1, 7, 7, a, "matmul")) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = op_matmul(mat, (const float *)(intptr_t)a[0], a[1], (int)a[2], (float *)(intptr_t)a[3], a[4],
                   (const float *)(intptr_t)a[5], (int)a[6], 0);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* gate_up_swiglu(matrix, x, ldx, m, h, ldh, threads): h = silu(x @ gate^T) * (x @ up^T), the
 * matrix's rows being gate then up, rows / 2 each. */
static PyObject *py_gate_up(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[6];
    if (n != 7) return PyErr_Format(PyExc_TypeError, "gate_up_swiglu takes 7 arguments, got %zd", n);
    const qg_matrix *mat = get_matrix(args[0]);
    if (!mat || !ints(args + 1, 6, 6, a, "gate_up_swiglu")) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = op_matmul(mat, (const float *)(intptr_t)a[0], a[1], (int)a[2], (float *)(intptr_t)a[3], a[4], NULL,
                   (int)a[5], 1);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* rms_norm(x, residual (0: none), w, eps, m, d, y, h) */
static PyObject *py_rms_norm(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[8];
    if (n != 8) return PyErr_Format(PyExc_TypeError, "rms_norm takes 8 arguments, got %zd", n);
    double eps = PyFloat_AsDouble(args[3]);
    if (eps == -1.0 && PyErr_Occurred()) return NULL;
    PyObject *rest[7] = {args[0], args[1], args[2], args[4], args[5], args[6], args[7]};
    if (!ints(rest, 7, 7, a, "rms_norm")) return NULL;
    op_rms_norm((const float *)(intptr_t)a[0], (const float *)(intptr_t)a[1], (const float *)(intptr_t)a[2],
                (float)eps, (int)a[3], (int)a[4], (float *)(intptr_t)a[5], (float *)(intptr_t)a[6]);
    Py_RETURN_NONE;
}

/* rope_kv(qkv, m, positions, slots, cos, sin, n_pos, n_heads, n_kv, d, use_rope, k_cache, v_cache,
 *         dtype, n_slots, block_size, q) -> -1, or the first token with a bad position or slot */
static PyObject *py_rope_kv(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[17];
    if (!ints(args, n, 17, a, "rope_kv")) return NULL;
    int bad = op_rope_kv((const float *)(intptr_t)a[0], (int)a[1], (const int64_t *)(intptr_t)a[2],
                         (const int64_t *)(intptr_t)a[3], (const float *)(intptr_t)a[4],
                         (const float *)(intptr_t)a[5], a[6], (int)a[7], (int)a[8], (int)a[9], (int)a[10],
                         (void *)(intptr_t)a[11], (void *)(intptr_t)a[12], (int)a[13], a[14], (int)a[15],
                         (float *)(intptr_t)a[16]);
    return PyLong_FromLong(bad);
}

/* attention(q, k_cache, v_cache, dtype, block_size, n_heads, n_kv_heads, d, n, tables, table_stride,
 *           table_index (0: none), seq_lens, rows, scale, out, threads) */
static PyObject *py_attention(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[17];
    if (n != 17) return PyErr_Format(PyExc_TypeError, "attention takes 17 arguments, got %zd", n);
    double scale = PyFloat_AsDouble(args[14]);
    if (scale == -1.0 && PyErr_Occurred()) return NULL;
    PyObject *rest[17];
    memcpy(rest, args, sizeof(rest));
    rest[14] = args[0];     /* parsed as a float above */
    if (!ints(rest, 17, 17, a, "attention")) return NULL;
    attn_args at = {.q = (const float *)(intptr_t)a[0], .k_cache = (const void *)(intptr_t)a[1],
                    .v_cache = (const void *)(intptr_t)a[2], .dtype = (int)a[3], .block_size = (int)a[4],
                    .n_heads = (int)a[5], .n_kv_heads = (int)a[6], .d = (int)a[7], .n_seqs = (int)a[8],
                    .tables = (const int32_t *)(intptr_t)a[9], .table_stride = a[10],
                    .table_index = (const int32_t *)(intptr_t)a[11], .seq_lens = (const int32_t *)(intptr_t)a[12],
                    .rows = (const int64_t *)(intptr_t)a[13], .scale = (float)scale, .out = (float *)(intptr_t)a[15]};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = op_attention(&at, (int)a[16]);
    Py_END_ALLOW_THREADS
    if (rc == 1) return PyErr_NoMemory();
    if (rc == 2) return PyErr_Format(PyExc_ValueError, "attention: unsupported heads %d / %d or head dim %d",
                                     at.n_heads, at.n_kv_heads, at.d);
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- the decode step */

static void free_step(PyObject *capsule) { free(PyCapsule_GetPointer(capsule, "step_model")); }

/* step_model((n_layers, hidden, n_heads, n_kv_heads, head_dim, inter, vocab, n_pos, n_slots, kv_dtype,
 *             block_size, cos, sin, final_norm), eps, scale, lm_head, layers) -> capsule; layers: a list of
 * (attn_norm, ffn_norm, qkv, o, gate_up, down, k_cache, v_cache, use_rope), matrices as capsules.
 * The caller keeps every matrix and buffer alive while the capsule lives. */
static PyObject *py_step_model(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long c[14];
    if (n != 5 || !PyTuple_Check(args[0]) || PyTuple_GET_SIZE(args[0]) != 14 || !PyList_Check(args[4]))
        return PyErr_Format(PyExc_TypeError, "step_model(config, eps, scale, lm_head, layers)");
    if (!ints(&PyTuple_GET_ITEM(args[0], 0), 14, 14, c, "step_model")) return NULL;
    double eps = PyFloat_AsDouble(args[1]), scale = PyFloat_AsDouble(args[2]);
    const qg_matrix *head = get_matrix(args[3]);
    if (PyErr_Occurred() || !head) return NULL;
    Py_ssize_t L = PyList_GET_SIZE(args[4]);
    if (L != c[0]) return PyErr_Format(PyExc_ValueError, "%zd layers given for %lld", L, c[0]);
    step_model *m = calloc(1, sizeof(step_model) + sizeof(step_layer) * L);
    if (!m) return PyErr_NoMemory();
    *m = (step_model){.n_layers = (int)c[0], .hidden = (int)c[1], .n_heads = (int)c[2], .n_kv_heads = (int)c[3],
                      .head_dim = (int)c[4], .inter = (int)c[5], .vocab = (int)c[6], .n_pos = c[7], .n_slots = c[8],
                      .kv_dtype = (int)c[9], .block_size = (int)c[10], .cos = (const float *)(intptr_t)c[11],
                      .sin = (const float *)(intptr_t)c[12], .final_norm = (const float *)(intptr_t)c[13],
                      .eps = (float)eps, .scale = (float)scale, .lm_head = head};
    for (Py_ssize_t i = 0; i < L; i++) {
        PyObject *t = PyList_GET_ITEM(args[4], i);
        long long p[5];
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 9) {
            free(m);
            return PyErr_Format(PyExc_TypeError, "layer %zd: a 9-tuple", i);
        }
        PyObject *ip[5] = {PyTuple_GET_ITEM(t, 0), PyTuple_GET_ITEM(t, 1), PyTuple_GET_ITEM(t, 6),
                           PyTuple_GET_ITEM(t, 7), PyTuple_GET_ITEM(t, 8)};
        step_layer *l = &m->layers[i];
        if (!ints(ip, 5, 5, p, "step_model layer") || !(l->qkv = get_matrix(PyTuple_GET_ITEM(t, 2))) ||
            !(l->o = get_matrix(PyTuple_GET_ITEM(t, 3))) || !(l->gate_up = get_matrix(PyTuple_GET_ITEM(t, 4))) ||
            !(l->down = get_matrix(PyTuple_GET_ITEM(t, 5)))) {
            free(m);
            return NULL;
        }
        l->attn_norm = (const float *)(intptr_t)p[0];
        l->ffn_norm = (const float *)(intptr_t)p[1];
        l->k_cache = (void *)(intptr_t)p[2];
        l->v_cache = (void *)(intptr_t)p[3];
        l->use_rope = (int)p[4];
    }
    return PyCapsule_New(m, "step_model", free_step);
}

/* decode_step(model, x, B, positions, slots, tables, table_stride, seq_lens, logit_rows, R, logits, threads) */
static PyObject *py_decode_step(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[11];
    if (n != 12) return PyErr_Format(PyExc_TypeError, "decode_step takes 12 arguments, got %zd", n);
    const step_model *m = PyCapsule_GetPointer(args[0], "step_model");
    if (!m || !ints(args + 1, 11, 11, a, "decode_step")) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = step_decode(m, (float *)(intptr_t)a[0], (int)a[1], (const int64_t *)(intptr_t)a[2],
                     (const int64_t *)(intptr_t)a[3], (const int32_t *)(intptr_t)a[4], a[5],
                     (const int32_t *)(intptr_t)a[6], (const int64_t *)(intptr_t)a[7], (int)a[8],
                     (float *)(intptr_t)a[9], (int)a[10]);
    Py_END_ALLOW_THREADS
    if (rc == 1) return PyErr_NoMemory();
    if (rc == 2) return PyErr_Format(PyExc_ValueError, "decode_step: unsupported attention shape");
    if (rc == 3) return PyErr_Format(PyExc_IndexError, "decode_step: a position outside the RoPE tables or a slot "
                                     "outside the KV pool");
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- settings */

static PyObject *py_isa(PyObject *self, PyObject *noargs) { return PyUnicode_FromString(qg_isa()); }

static PyObject *py_select(PyObject *self, PyObject *arg) {
    const char *name = PyUnicode_AsUTF8(arg);
    if (!name) return NULL;
    return PyBool_FromLong(qg_select(name));
}

static PyObject *py_spin_us(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    long long a[1];
    if (n == 1) {
        if (!ints(args, n, 1, a, "spin_us")) return NULL;
        pool_set_spin_us((int)a[0]);
    }
    return PyLong_FromLong(pool_spin_us());
}

static PyObject *py_pool_stats(PyObject *self, PyObject *noargs) {
    pool_stats s = pool_get_stats();
    return Py_BuildValue("{s:K,s:K,s:K,s:d}", "parallel_jobs", (unsigned long long)s.parallel_jobs, "solo_jobs",
                         (unsigned long long)s.solo_jobs, "stalls", (unsigned long long)s.stalls, "wait_s",
                         s.wait_ns / 1e9);
}

static PyMethodDef methods[] = {
    {"plan", (PyCFunction)(void (*)(void))py_plan, METH_FASTCALL, "row bytes of a packed row, or -1"},
    {"matrix", (PyCFunction)(void (*)(void))py_matrix, METH_FASTCALL, "a packed matrix's handle"},
    {"pack", (PyCFunction)(void (*)(void))py_pack, METH_FASTCALL, "pack integer values and scales"},
    {"pack_gguf", (PyCFunction)(void (*)(void))py_pack_gguf, METH_FASTCALL, "pack rows of GGUF blocks"},
    {"advise_huge", (PyCFunction)(void (*)(void))py_advise_huge, METH_FASTCALL, "madvise(MADV_HUGEPAGE)"},
    {"dequant_rows", (PyCFunction)(void (*)(void))py_dequant_rows, METH_FASTCALL, "packed rows back to fp32"},
    {"matmul", (PyCFunction)(void (*)(void))py_matmul, METH_FASTCALL, "y = x @ W^T"},
    {"gate_up_swiglu", (PyCFunction)(void (*)(void))py_gate_up, METH_FASTCALL, "silu(x @ gate^T) * (x @ up^T)"},
    {"rms_norm", (PyCFunction)(void (*)(void))py_rms_norm, METH_FASTCALL, "residual add + RMSNorm"},
    {"rope_kv", (PyCFunction)(void (*)(void))py_rope_kv, METH_FASTCALL, "RoPE on q, k; K/V cache write"},
    {"attention", (PyCFunction)(void (*)(void))py_attention, METH_FASTCALL, "causal attention, row by row"},
    {"step_model", (PyCFunction)(void (*)(void))py_step_model, METH_FASTCALL, "a decode step's model"},
    {"decode_step", (PyCFunction)(void (*)(void))py_decode_step, METH_FASTCALL, "one decode step"},
    {"isa", py_isa, METH_NOARGS, "the instruction set in use"},
    {"pool_stats", py_pool_stats, METH_NOARGS, "jobs run in parallel / on the caller alone, stalls, the caller's waits"},
    {"select", py_select, METH_O, "use 'avx512' or 'avx2'; False where this CPU cannot"},
    {"spin_us", (PyCFunction)(void (*)(void))py_spin_us, METH_FASTCALL, "get / set the idle spin in us"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu", NULL, -1, methods};

PyMODINIT_FUNC PyInit__cpu(void) {
    if (!qg_select("avx512") && !qg_select("avx2")) {
        PyErr_SetString(PyExc_ImportError, "the CPU kernels need AVX2, FMA and F16C");
        return NULL;
    }
    return PyModule_Create(&module);
}
