/* qgemm.h: the chunk plan, packing at load, activation quantization, the ISA choice. */
#include "qgemm.h"

#include <immintrin.h>
#include <math.h>
#include <string.h>

int qg_bits(int kind) {
    switch (kind) {
    case QG_Q5_0: case QG_Q5_1: case QG_Q5_K: return 5;
    case QG_Q6_K: return 6;
    case QG_Q8_0: return 8;
    default: return 4;
    }
}

static int is_k_quant(int kind) { return kind == QG_Q4_K || kind == QG_Q5_K || kind == QG_Q6_K; }

static int64_t quant_bytes(int kind, int steps) {
    static const int per_step[9] = {0, 0, 0, 0, 16, 20, 24, 0, 32};
    return (int64_t)per_step[qg_bits(kind)] * steps;
}

static int64_t scale_bytes(int kind, int width) {
    int g = width / 32;
    switch (kind) {
    case QG_Q4_0: case QG_Q5_0: case QG_Q8_0: return 2 * g;
    case QG_Q4_1: case QG_Q5_1: return 4 * g;
    case QG_Q4_K: case QG_Q5_K: return 20;
    default: return 18;        /* Q6_K */
    }
}

int qg_max_chunks(int cols) { return cols / 256 + 4; }

int qg_plan(int kind, int cols, qg_chunk *chunks, int64_t *row_bytes) {
    if (kind < 0 || kind >= QG_N_KINDS || cols <= 0 || cols % (is_k_quant(kind) ? 256 : 32)) return -1;
    int n = 0, k0 = 0, xoff = 0;
    int64_t off = 0;
    for (int width = 256; width >= 32; width /= 2) {
        while (cols - k0 >= width) {
            qg_chunk *c = &chunks[n++];
            c->k0 = k0;
            c->width = width;
            c->steps = width / 32 < 2 ? 2 : width / 32;
            c->gshift = kind == QG_Q6_K ? 8 : 9;
            c->xoff = xoff;
            c->qoff = (int)off;
            off += quant_bytes(kind, c->steps);
            c->soff = (int)off;
            off += scale_bytes(kind, width);
            xoff += 32 * c->steps;
            k0 += width;
            if (width < 256) break;
        }
    }
    *row_bytes = off;
    return n;
}

void qg_pack(const qg_weight *w, const int16_t *v, const uint8_t *s, int64_t ls, const uint16_t *f, int64_t lf,
             uint8_t *out) {
    int kind = w->kind, bits = qg_bits(kind), K = w->cols;
    for (int64_t r = 0; r < w->rows; r++) {
        const int16_t *vr = v + r * K;
        const uint8_t *sr = s ? s + r * ls : NULL;
        const uint16_t *fr = f + r * lf;
        uint8_t *o = out + r * w->row_bytes;
        for (int ci = 0; ci < w->n_chunks; ci++) {
            const qg_chunk *c = &w->chunks[ci];
            uint8_t *q = o + c->qoff;
            int steps = c->steps, per_lane = c->width / 16;
            int16_t sl[256];        /* the chunk's slots, step by step (see qgemm.h) */
            memset(sl, 0, sizeof(int16_t) * 32 * steps);
            for (int l = 0; l < 16; l++)
                for (int e = 0; e < per_lane; e++) sl[32 * (e / 2) + 2 * l + (e & 1)] = vr[c->k0 + l * per_lane + e];
            if (bits == 8) {
                for (int i = 0; i < 32 * steps; i++) q[i] = (uint8_t)(int8_t)sl[i];
            } else {
                for (int t = 0; t < steps / 2; t++)
                    for (int j = 0; j < 32; j++)
                        q[32 * t + j] = (uint8_t)((sl[64 * t + j] & 15) | (sl[64 * t + 32 + j] & 15) << 4);
                uint8_t *hb = q + 16 * steps;
                for (int st = 0; st < steps && bits == 5; st++) {
                    uint32_t m4 = 0;
                    for (int j = 0; j < 32; j++) m4 |= (uint32_t)((sl[32 * st + j] >> 4) & 1) << j;
                    memcpy(hb + 4 * st, &m4, 4);
                }
                for (int t = 0; t < steps / 2 && bits == 6; t++) {
                    uint64_t m[2] = {0, 0};     /* bit 4, bit 5; bit 2j + h: slot j of step 2t + h */
                    for (int b = 0; b < 64; b++)
                        for (int k = 0; k < 2; k++) m[k] |= (uint64_t)((sl[32 * (2 * t + (b & 1)) + (b >> 1)] >> (4 + k)) & 1) << b;
                    memcpy(hb + 16 * t, m, 16);
                }
            }
            uint8_t *sc = o + c->soff;
            int g0 = c->k0 / 32, g = c->width / 32, sb = c->k0 / 256;
            switch (kind) {
            case QG_Q4_0: case QG_Q5_0: case QG_Q8_0:
                memcpy(sc, fr + g0, 2 * g);
                break;
            case QG_Q4_1: case QG_Q5_1:
                memcpy(sc, fr + g0, 2 * g);
                memcpy(sc + 2 * g, fr + K / 32 + g0, 2 * g);
                break;
            case QG_Q4_K: case QG_Q5_K:
                memcpy(sc, fr + sb, 2);
                memcpy(sc + 2, fr + K / 256 + sb, 2);
                memcpy(sc + 4, sr + g0, 8);
                memcpy(sc + 12, sr + K / 32 + g0, 8);
                break;
            default:        /* Q6_K */
                memcpy(sc, fr + sb, 2);
                memcpy(sc + 2, sr + c->k0 / 16, 16);
            }
        }
    }
}

int64_t qg_act_bytes(int m, int cols) {      /* slots: at most cols + 4 tail chunks' padding */
    return (int64_t)m * ((cols + 128) + 2 * qg_max_chunks(cols) * 16 * 4) + 128;
}

/* An activation row's chunk count and slots per row (the same plan for int8 and int16 rows). */
static int act_plan(int cols, int64_t *stride) {
    qg_chunk chunks[qg_max_chunks(cols)];
    int64_t row_bytes;
    int n = qg_plan(QG_Q8_0, cols, chunks, &row_bytes);
    *stride = chunks[n - 1].xoff + 32 * chunks[n - 1].steps;
    return n;
}

void qg_act_layout(int m, int cols, void *buf, qg_act *out) {
    out->m = m;
    out->cols = cols;
    out->n_chunks = act_plan(cols, &out->stride);
    out->xq = (int8_t *)buf;
    out->sx = (float *)(out->xq + m * out->stride + (-(m * out->stride) & 63));
    out->xs = out->sx + (int64_t)m * out->n_chunks * 16;
}

/* Loads a group of 32 values into a[4]; returns their largest magnitude. */
__attribute__((target("avx2,fma"))) static inline float load_group(const float *x, __m256 a[4]) {
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int i = 0; i < 4; i++) a[i] = _mm256_loadu_ps(x + 8 * i);
    __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(a[0], magnitude), _mm256_and_ps(a[1], magnitude)),
                             _mm256_max_ps(_mm256_and_ps(a[2], magnitude), _mm256_and_ps(a[3], magnitude)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}

/* 32 values -> int8 at 127 / max|x| (nearest even, as lrintf); returns the scale. */
__attribute__((target("avx2,fma"))) static float quantize_group(const float *x, int8_t *q) {
    __m256 a[4];
    float amax = load_group(x, a);
    __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    __m256i v[4];
    for (int i = 0; i < 4; i++) v[i] = _mm256_cvtps_epi32(_mm256_mul_ps(a[i], inv));
    /* packs works per 128-bit half: the dword permutation puts the eight quarters back in order */
    __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    return amax / 127.f;
}

void qg_quantize(const float *x, int64_t ldx, int i0, int i1, const qg_act *out) {
    qg_chunk chunks[qg_max_chunks(out->cols)];
    int64_t row_bytes;
    int n = qg_plan(QG_Q8_0, out->cols, chunks, &row_bytes);
    for (int i = i0; i < i1; i++) {
        const float *xr = x + i * ldx;
        for (int ci = 0; ci < n; ci++) {
            const qg_chunk *c = &chunks[ci];
            int8_t q[256];
            float gsx[8];
            for (int g = 0; g < c->width / 32; g++) gsx[g] = quantize_group(xr + c->k0 + 32 * g, q + 32 * g);
            /* Byte p of lane l in pair t (see qgemm.h): weight l * P + 4t + 2 (p & 1) + (p >> 1),
             * zero past the lane's P weights (chunks of 32). */
            int per_lane = c->width / 16;
            int8_t *dst = out->xq + i * out->stride + c->xoff;
            float *sx = out->sx + ((int64_t)i * n + ci) * 16, *xs = out->xs + ((int64_t)i * n + ci) * 16;
            for (int l = 0; l < 16; l++) {
                int sum = 0;
                for (int t = 0; t < c->steps / 2; t++)
                    for (int p = 0; p < 4; p++) {
                        int e = 4 * t + 2 * (p & 1) + (p >> 1);
                        int8_t v = e < per_lane ? q[l * per_lane + e] : 0;
                        dst[64 * t + 4 * l + p] = v;
                        sum += v;
                    }
                sx[l] = gsx[l * per_lane / 32];
                xs[l] = sx[l] * (float)sum;
            }
        }
    }
}

/* ---------------------------------------------------------------- int16 activations (qgemm16_*.c) */

int64_t qg_act16_bytes(int m, int cols) {      /* slots: at most cols + 4 tail chunks' padding */
    return (int64_t)m * ((cols + 128) * 2 + 2 * qg_max_chunks(cols) * 16 * 4) + 128;
}

void qg_act16_layout(int m, int cols, void *buf, qg_act16 *out) {
    out->m = m;
    out->cols = cols;
    out->n_chunks = act_plan(cols, &out->stride);
    out->xq = (int16_t *)buf;
    out->sx = (float *)(out->xq + m * out->stride + (-(m * out->stride) & 31));
    out->xs = out->sx + (int64_t)m * out->n_chunks * 16;
}

/* 32 values -> int16 at 32767 / max|x| (nearest even, as lrintf); returns the scale. */
__attribute__((target("avx2,fma"))) static float quantize_group16(const float *x, int16_t *q) {
    __m256 a[4];
    float amax = load_group(x, a);
    __m256 inv = _mm256_set1_ps(amax > 0.f ? 32767.f / amax : 0.f);
    __m256i v[4];
    for (int i = 0; i < 4; i++) v[i] = _mm256_cvtps_epi32(_mm256_mul_ps(a[i], inv));
    /* packs works per 128-bit half: 0xD8 puts the quarters back in order */
    _mm256_storeu_si256((__m256i *)q, _mm256_permute4x64_epi64(_mm256_packs_epi32(v[0], v[1]), 0xD8));
    _mm256_storeu_si256((__m256i *)(q + 16), _mm256_permute4x64_epi64(_mm256_packs_epi32(v[2], v[3]), 0xD8));
    return amax / 32767.f;
}

void qg_quantize16(const float *x, int64_t ldx, int i0, int i1, const qg_act16 *out) {
    qg_chunk chunks[qg_max_chunks(out->cols)];
    int64_t row_bytes;
    int n = qg_plan(QG_Q8_0, out->cols, chunks, &row_bytes);
    for (int i = i0; i < i1; i++) {
        const float *xr = x + i * ldx;
        for (int ci = 0; ci < n; ci++) {
            const qg_chunk *c = &chunks[ci];
            int16_t q[256] __attribute__((aligned(32)));
            float gsx[8];
            for (int g = 0; g < c->width / 32; g++) gsx[g] = quantize_group16(xr + c->k0 + 32 * g, q + 32 * g);
            /* Slots are int16 pairs: pair s of lane l (weights l * P + 2s, + 1) goes to pair
             * column l of step s, a [16][P / 2] -> [steps][16] transpose. */
            int per_lane = c->width / 16, pairs = per_lane / 2 > 0 ? per_lane / 2 : 1;
            int32_t *dst = (int32_t *)(out->xq + i * out->stride + c->xoff);
            const int32_t *src = (const int32_t *)q;
            if (per_lane < 2 * c->steps) memset(dst, 0, 64 * c->steps);
            for (int l = 0; l < 16; l++)
                for (int p = 0; p < pairs; p++) dst[16 * p + l] = src[l * pairs + p];
            float *sx = out->sx + ((int64_t)i * n + ci) * 16, *xs = out->xs + ((int64_t)i * n + ci) * 16;
            for (int l = 0; l < 16; l++) {
                int sum = 0;
                for (int e = 0; e < per_lane; e++) sum += q[l * per_lane + e];
                sx[l] = gsx[l * per_lane / 32];
                xs[l] = sx[l] * (float)sum;
            }
        }
    }
}

qg_rows_fn qg_rows;
qg_rows16_fn qg_rows16;
static const char *isa_name = "none";

const char *qg_isa(void) { return isa_name; }

int qg_select(const char *isa) {
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    if (strcmp(isa, "avx512") == 0 && avx512) {
        qg_rows = qg_rows_avx512;
        qg_rows16 = qg_rows16_avx512;
    } else if (strcmp(isa, "avx2") == 0 && avx2) {
        qg_rows = qg_rows_avx2;
        qg_rows16 = qg_rows16_avx2;
    } else {
        return 0;
    }
    isa_name = isa;
    return 1;
}
