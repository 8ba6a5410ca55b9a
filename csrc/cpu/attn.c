/* Attention on the paged KV cache (AVX2 + FMA + F16C): each query against exactly the keys
 * up to its own position, fp32 math on fp32 / fp16 / bf16 keys and values.
 * Tasks are (sequence, KV head, span of keys); a KV head's GQA group of query heads reads
 * each key once. Spans keep an online softmax (running max, sum, weighted values) and are
 * merged at the end in span order, so a query's result depends only on its own keys, never
 * on the batch or the prompt chunk it is in. */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ops.h"
#include "pool.h"

#define TAVX2 __attribute__((target("avx2,fma,f16c")))
/* The same code with AVX-512VL's 32 vector registers: more sums held at once, no spills. */
#define T512VL __attribute__((target("avx512f,avx512vl,avx2,fma,f16c")))
#define INLINE static inline __attribute__((always_inline))
#define SUB 16              /* keys scored together */
#define MAX_GROUP 16
#define MAX_D 256

INLINE TAVX2 __m256 load8(const void *p, int64_t at, const int dtype) {
    if (dtype == KV_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + at)));
    if (dtype == KV_BF16)
        return _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + at))), 16));
    return _mm256_loadu_ps((const float *)p + at);
}

INLINE TAVX2 float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* e^x for x <= 0 (scores minus their running max): 2^n * p(r), |r| <= ln2 / 2, degree-6
 * polynomial; below -87 the result is 0. Relative error ~2e-7. */
INLINE TAVX2 __m256 exp_neg(__m256 x) {
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
    __m256 p = _mm256_set1_ps(1.f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return _mm256_and_ps(y, _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_GE_OQ));
}

typedef struct {
    const attn_args *a;
    int group, splits, span;
    float *part;            /* [task][group][D + 2]: weighted values, then max, sum */
} attn_job;

/* Four sums at once: [sum a, sum b, sum c, sum d]. */
INLINE TAVX2 __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
    __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

/* Scores of keys i .. i + KB - 1 of a sub-block for the G heads: KB x G independent sums
 * (enough to hide the FMA latency), reduced four at a time. */
INLINE TAVX2 void score_keys(const int G, const int KB, const int dtype, const float (*q)[MAX_D], const void *keys,
                             int64_t at, int D, int i, float (*sc)[SUB]) {
    __m256 acc[32];
    for (int a = 0; a < KB * G; a++) acc[a] = _mm256_setzero_ps();
    for (int d = 0; d < D; d += 8)
        for (int kb = 0; kb < KB; kb++) {
            __m256 k = load8(keys, at + (int64_t)(i + kb) * D + d, dtype);
            for (int g = 0; g < G; g++) acc[kb * G + g] = _mm256_fmadd_ps(_mm256_load_ps(&q[g][d]), k, acc[kb * G + g]);
        }
    float out[32] __attribute__((aligned(16)));
    int a = 0;
    for (; a + 4 <= KB * G; a += 4) _mm_store_ps(out + a, hsum4(acc[a], acc[a + 1], acc[a + 2], acc[a + 3]));
    for (; a < KB * G; a++) out[a] = hsum(acc[a]);
    for (int kb = 0; kb < KB; kb++)
        for (int g = 0; g < G; g++) sc[g][i + kb] = out[kb * G + g];
}

/* o[g][d0 .. d0 + 8 DB) += sum over the n keys of p[g][i] v[i][...] */
INLINE TAVX2 void add_values(const int G, const int DB, const int dtype, const float (*p)[SUB], const void *values,
                             int64_t at, int D, int n, int d0, float (*o)[MAX_D]) {
    __m256 acc[32];
    for (int g = 0; g < G; g++)
        for (int c = 0; c < DB; c++) acc[g * DB + c] = _mm256_load_ps(&o[g][d0 + 8 * c]);
    for (int i = 0; i < n; i++) {
        __m256 v[8];
        for (int c = 0; c < DB; c++) v[c] = load8(values, at + (int64_t)i * D + d0 + 8 * c, dtype);
        for (int g = 0; g < G; g++) {
            __m256 pg = _mm256_broadcast_ss(&p[g][i]);
            for (int c = 0; c < DB; c++) acc[g * DB + c] = _mm256_fmadd_ps(pg, v[c], acc[g * DB + c]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int c = 0; c < DB; c++) _mm256_store_ps(&o[g][d0 + 8 * c], acc[g * DB + c]);
}

/* One task: keys k0 .. k1 - 1 of sequence b for KV head kh's group of G query heads. */
INLINE TAVX2 void span_task(const int G, const int dtype, const int regs, const attn_job *j, int t) {
    /* Keys scored together (KB x G sums + a key) and 8-float columns of o kept in registers
     * (G x DB sums + DB values + a weight), within the vector registers. */
    const int KB = (regs - 4) / G >= 4 ? 4 : (regs - 4) / G >= 2 ? 2 : 1;
    const int DB = (regs - 1) / (G + 1) >= 8 ? 8 : (regs - 1) / (G + 1) >= 4 ? 4 : (regs - 1) / (G + 1) >= 2 ? 2 : 1;
    const attn_args *a = j->a;
    int D = a->d, hkv = a->n_kv_heads;
    int sp = t % j->splits, kh = (t / j->splits) % hkv, b = t / j->splits / hkv;
    int len = a->seq_lens[b], k0 = sp * j->span, k1 = k0 + j->span < len ? k0 + j->span : len;
    float *part = j->part + (int64_t)t * G * (D + 2);
    float q[MAX_GROUP][MAX_D] __attribute__((aligned(32))), o[MAX_GROUP][MAX_D] __attribute__((aligned(32)));
    float mx[MAX_GROUP], sum[MAX_GROUP];
    const float *qrow = a->q + a->rows[b] * (int64_t)a->n_heads * D + (int64_t)kh * G * D;
    for (int g = 0; g < G; g++) {
        for (int d = 0; d < D; d++) q[g][d] = qrow[g * D + d] * a->scale;
        memset(o[g], 0, sizeof(float) * D);
        mx[g] = -INFINITY;
        sum[g] = 0.f;
    }
    const int32_t *table = a->tables + (int64_t)(a->table_index ? a->table_index[b] : b) * a->table_stride;
    int bs = a->block_size, elem = dtype == KV_F32 ? 4 : 2;
    for (int s0 = k0; s0 < k1;) {
        int n = k1 - s0 < SUB ? k1 - s0 : SUB;
        if (s0 % bs + n > bs) n = bs - s0 % bs;                  /* stay inside one block */
        int64_t base = (((int64_t)table[s0 / bs] * hkv + kh) * bs + s0 % bs) * D;
        if (s0 % bs == 0 && s0 + bs < k1) {
            /* the next block's keys and values of this head: blocks lie anywhere in the pool,
             * beyond what the hardware prefetchers guess */
            int64_t next = ((int64_t)table[s0 / bs + 1] * hkv + kh) * bs * D * elem;
            for (int64_t off = 0; off < (int64_t)bs * D * elem; off += 64) {
                _mm_prefetch((const char *)a->k_cache + next + off, _MM_HINT_T0);
                _mm_prefetch((const char *)a->v_cache + next + off, _MM_HINT_T0);
            }
        }
        float sc[MAX_GROUP][SUB] __attribute__((aligned(32)));
        int i = 0;
        for (; i + KB <= n; i += KB) score_keys(G, KB, dtype, q, a->k_cache, base, D, i, sc);
        for (; i < n; i++) score_keys(G, 1, dtype, q, a->k_cache, base, D, i, sc);
        for (i = n; i < SUB; i++)
            for (int g = 0; g < G; g++) sc[g][i] = -INFINITY;
        float p[MAX_GROUP][SUB] __attribute__((aligned(32)));
        for (int g = 0; g < G; g++) {
            float m = mx[g];
            for (i = 0; i < n; i++) m = sc[g][i] > m ? sc[g][i] : m;
            float corr = mx[g] == -INFINITY ? 0.f : m == mx[g] ? 1.f : expf(mx[g] - m);
            __m256 mv = _mm256_set1_ps(m);
            __m256 p0 = exp_neg(_mm256_sub_ps(_mm256_load_ps(&sc[g][0]), mv));
            __m256 p1 = exp_neg(_mm256_sub_ps(_mm256_load_ps(&sc[g][8]), mv));
            _mm256_store_ps(&p[g][0], p0);
            _mm256_store_ps(&p[g][8], p1);
            sum[g] = sum[g] * corr + hsum(_mm256_add_ps(p0, p1));
            mx[g] = m;
            if (corr != 1.f) {
                __m256 cv = _mm256_set1_ps(corr);
                for (int d = 0; d < D; d += 8) _mm256_store_ps(&o[g][d], _mm256_mul_ps(_mm256_load_ps(&o[g][d]), cv));
            }
        }
        /* o += p v: DB columns of 8 floats of every head's o in registers per pass */
        int d0 = 0;
        for (; d0 + 8 * DB <= D; d0 += 8 * DB) add_values(G, DB, dtype, p, a->v_cache, base, D, n, d0, o);
        for (; d0 < D; d0 += 8) add_values(G, 1, dtype, p, a->v_cache, base, D, n, d0, o);
        s0 += n;
    }
    for (int g = 0; g < G; g++) {
        memcpy(part + g * (D + 2), o[g], sizeof(float) * D);
        part[g * (D + 2) + D] = mx[g];
        part[g * (D + 2) + D + 1] = sum[g];
    }
}

#define GROUP_FNS(G) \
    static TAVX2 void f32_##G(void *ctx, int t) { span_task(G, KV_F32, 16, ctx, t); } \
    static TAVX2 void f16_##G(void *ctx, int t) { span_task(G, KV_F16, 16, ctx, t); } \
    static TAVX2 void bf16_##G(void *ctx, int t) { span_task(G, KV_BF16, 16, ctx, t); } \
    static T512VL void f32_512_##G(void *ctx, int t) { span_task(G, KV_F32, 32, ctx, t); } \
    static T512VL void f16_512_##G(void *ctx, int t) { span_task(G, KV_F16, 32, ctx, t); } \
    static T512VL void bf16_512_##G(void *ctx, int t) { span_task(G, KV_BF16, 32, ctx, t); }
GROUP_FNS(1) GROUP_FNS(2) GROUP_FNS(3) GROUP_FNS(4) GROUP_FNS(5) GROUP_FNS(6) GROUP_FNS(7) GROUP_FNS(8)
GROUP_FNS(9) GROUP_FNS(10) GROUP_FNS(11) GROUP_FNS(12) GROUP_FNS(13) GROUP_FNS(14) GROUP_FNS(15) GROUP_FNS(16)
#define ROW(G) {{f32_##G, f16_##G, bf16_##G}, {f32_512_##G, f16_512_##G, bf16_512_##G}}
static const pool_task_fn tasks[MAX_GROUP][2][3] = {ROW(1), ROW(2), ROW(3), ROW(4), ROW(5), ROW(6), ROW(7), ROW(8),
                                                    ROW(9), ROW(10), ROW(11), ROW(12), ROW(13), ROW(14), ROW(15),
                                                    ROW(16)};

int op_attention(const attn_args *a, int threads) {
    int G = a->n_heads / a->n_kv_heads, D = a->d, max_len = 0;
    if (G > MAX_GROUP || D > MAX_D || D % 8 || G * a->n_kv_heads != a->n_heads) return 2;
    for (int b = 0; b < a->n_seqs; b++) max_len = a->seq_lens[b] > max_len ? a->seq_lens[b] : max_len;
    attn_job j = {.a = a, .group = G};
    /* Spans of KEY_SPAN keys: every sequence is cut the same way whatever the batch. */
    j.span = KEY_SPAN;
    j.splits = max_len > 0 ? (max_len + KEY_SPAN - 1) / KEY_SPAN : 1;
    int n_tasks = a->n_seqs * a->n_kv_heads * j.splits;
    j.part = malloc(sizeof(float) * (size_t)n_tasks * G * (D + 2));
    if (!j.part) return 1;
    int64_t work = (int64_t)max_len * a->n_seqs * a->n_heads * D;
    pool_run(work < ATTN_PARALLEL_MIN ? 1 : threads, n_tasks, tasks[G - 1][strcmp(qg_isa(), "avx512") == 0][a->dtype], &j);
    for (int b = 0; b < a->n_seqs; b++) {
        int used = (a->seq_lens[b] + KEY_SPAN - 1) / KEY_SPAN;
        for (int kh = 0; kh < a->n_kv_heads; kh++)
            for (int g = 0; g < G; g++) {
                const float *first = j.part + ((int64_t)(b * a->n_kv_heads + kh) * j.splits * G + g) * (D + 2);
                float m = -INFINITY, l = 0.f, acc[MAX_D] = {0};
                for (int s = 0; s < used; s++) m = fmaxf(m, first[(int64_t)s * G * (D + 2) + D]);
                for (int s = 0; s < used; s++) {
                    const float *ps = first + (int64_t)s * G * (D + 2);
                    float w = expf(ps[D] - m);
                    l += w * ps[D + 1];
                    for (int d = 0; d < D; d++) acc[d] += w * ps[d];
                }
                float *out = a->out + a->rows[b] * (int64_t)a->n_heads * D + (int64_t)(kh * G + g) * D;
                for (int d = 0; d < D; d++) out[d] = l > 0.f ? acc[d] / l : 0.f;
            }
    }
    free(j.part);
    return 0;
}
