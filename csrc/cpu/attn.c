/* Decode attention on the paged KV cache (AVX2 + FMA + F16C): each sequence's one query
 * against exactly its own keys, fp32 math on fp32 / fp16 / bf16 keys and values.
 * Tasks are (sequence, KV head, span of keys); a KV head's GQA group of query heads reads
 * each key once. Spans keep an online softmax (running max, sum, weighted values) and are
 * merged at the end in span order, so a sequence's result depends only on its own context
 * length, never on the batch it is in. */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ops.h"
#include "pool.h"

#define TAVX2 __attribute__((target("avx2,fma,f16c")))
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

INLINE TAVX2 void span_task(const attn_job *j, int t, const int dtype) {
    const attn_args *a = j->a;
    int D = a->d, G = j->group, hkv = a->n_kv_heads;
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
    const int32_t *table = a->tables + (int64_t)b * a->table_stride;
    int bs = a->block_size;
    for (int s0 = k0; s0 < k1; s0 += SUB) {
        int n = k1 - s0 < SUB ? k1 - s0 : SUB;
        if ((s0 + n - 1) / bs != s0 / bs) n = bs - s0 % bs;   /* stay inside one block */
        int64_t base = (((int64_t)table[s0 / bs] * hkv + kh) * bs + s0 % bs) * D;
        float sc[MAX_GROUP][SUB] __attribute__((aligned(32)));
        for (int i = 0; i < n; i++) {
            __m256 acc[MAX_GROUP];
            for (int g = 0; g < G; g++) acc[g] = _mm256_setzero_ps();
            for (int d = 0; d < D; d += 8) {
                __m256 k = load8(a->k_cache, base + (int64_t)i * D + d, dtype);
                for (int g = 0; g < G; g++) acc[g] = _mm256_fmadd_ps(_mm256_load_ps(&q[g][d]), k, acc[g]);
            }
            for (int g = 0; g < G; g++) sc[g][i] = hsum(acc[g]);
        }
        for (int i = n; i < SUB; i++)
            for (int g = 0; g < G; g++) sc[g][i] = -INFINITY;
        float p[MAX_GROUP][SUB] __attribute__((aligned(32)));
        for (int g = 0; g < G; g++) {
            float m = mx[g];
            for (int i = 0; i < n; i++) m = sc[g][i] > m ? sc[g][i] : m;
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
        for (int d = 0; d < D; d += 8) {
            __m256 acc[MAX_GROUP];
            for (int g = 0; g < G; g++) acc[g] = _mm256_load_ps(&o[g][d]);
            for (int i = 0; i < n; i++) {
                __m256 v = load8(a->v_cache, base + (int64_t)i * D + d, dtype);
                for (int g = 0; g < G; g++) acc[g] = _mm256_fmadd_ps(_mm256_set1_ps(p[g][i]), v, acc[g]);
            }
            for (int g = 0; g < G; g++) _mm256_store_ps(&o[g][d], acc[g]);
        }
    }
    for (int g = 0; g < G; g++) {
        memcpy(part + g * (D + 2), o[g], sizeof(float) * D);
        part[g * (D + 2) + D] = mx[g];
        part[g * (D + 2) + D + 1] = sum[g];
    }
}

static TAVX2 void task_f32(void *ctx, int t) { span_task(ctx, t, KV_F32); }
static TAVX2 void task_f16(void *ctx, int t) { span_task(ctx, t, KV_F16); }
static TAVX2 void task_bf16(void *ctx, int t) { span_task(ctx, t, KV_BF16); }

int op_attention_decode(const attn_args *a, int threads) {
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
    pool_run(work < ATTN_PARALLEL_MIN ? 1 : threads, n_tasks,
             a->dtype == KV_F16 ? task_f16 : a->dtype == KV_BF16 ? task_bf16 : task_f32, &j);
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
