/* qgemm.h's rows on AVX-512 (F, BW, VL, VNNI) for the K-quants on int8 activations: one vpdpbusd
 * per 64 weights and activation row. (The legacy types: qgemm16_avx512.c.) */
#include <immintrin.h>

#include "qgemm.h"

#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#define INLINE static inline __attribute__((always_inline))
/* Tile bounds: arrays of fixed size (not [R], a VLA) so that, with R and MB constant in each
 * instantiation, the compiler keeps every accumulator in a register. */
#define MAX_R 4
#define MAX_MB 4
#define PREFETCH_BYTES 8192

INLINE int bits_of(int kind) {
    return kind == QG_Q5_K ? 5 : kind == QG_Q6_K ? 6 : 4;
}

INLINE T512 float half(const uint8_t *p) { return _cvtsh_ss((unsigned short)(p[0] | p[1] << 8)); }

/* The chunk's per-lane weight scale (mul) and offset (element = int * mul - bias). A K-quant
 * chunk is a whole 256-weight block (qg_plan), so lane l (16 weights) lies in Q4_K / Q5_K's
 * 32-weight group l / 2 and in Q6_K's 16-weight group l. */
INLINE T512 void lane_scales(const int kind, const uint8_t *sp, __m512 *mul, __m512 *bias) {
    if (kind == QG_Q6_K) {
        __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(sp + 2))));
        *mul = _mm512_mul_ps(sc, _mm512_set1_ps(half(sp)));
        *bias = _mm512_mul_ps(*mul, _mm512_set1_ps(32.f));
    } else {        /* Q4_K, Q5_K: fp16 d, dmin, then sc[8], mn[8]: one vector of sc * d | mn * dmin */
        const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        const __m512i group = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
        __m512 d = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_loadu_si32(sp))));
        __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(sp + 4)))), d);
        *mul = _mm512_permutexvar_ps(group, v);
        *bias = _mm512_permutexvar_ps(_mm512_add_epi32(group, _mm512_set1_epi32(8)), v);
    }
}

/* A K-quant chunk's steps (256 weights, 32 a step): a constant, so that the loop over its pairs
 * unrolls and its accumulators stay in registers. */
#define STEPS 8

/* Steps 2t and 2t + 1 of a chunk as unsigned bytes, word j = slot j of each (qgemm.h). */
INLINE T512 __m512i unpack_pair(const int bits, const uint8_t *q, int t) {
    /* byte j's low nibble to the word's low byte, its high nibble to the high byte: (v | v << 4) & 0x0f0f */
    __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(q + 32 * t)));
    v = _mm512_ternarylogic_epi32(v, _mm512_slli_epi16(v, 4), _mm512_set1_epi16(0x0f0f), 0xa8);
    const uint8_t *hb = q + 16 * STEPS;
    if (bits == 5) {
        const uint32_t *h5 = (const uint32_t *)hb;
        v = _mm512_mask_add_epi16(v, h5[2 * t], v, _mm512_set1_epi16(16));
        v = _mm512_mask_add_epi16(v, h5[2 * t + 1], v, _mm512_set1_epi16(16 << 8));
    } else if (bits == 6) {     /* the high bits are byte masks of the pair: one add each */
        v = _mm512_mask_add_epi8(v, qg_pair_bit(hb, t, 0), v, _mm512_set1_epi8(16));
        v = _mm512_mask_add_epi8(v, qg_pair_bit(hb, t, 1), v, _mm512_set1_epi8(32));
    }
    return v;
}

/* R weight rows from r0 against MB activation rows from m0, into y's columns from col. */
INLINE T512 void tile(const int kind, const int R, const int MB, const qg_weight *w, const qg_act *x, int m0, int r0,
                      float *y, int64_t ldy, int col) {
    const int bits = bits_of(kind);
    const int64_t xs = x->stride;
    /* Software prefetch into L2 of the rows about PREFETCH_BYTES on, at the same place in each:
     * the hardware prefetchers follow R interleaved streams too late. Measured on a 75 MB
     * matrix, one row (M = 1), 1 thread, AVX-512 EPYC: Q4_K 4.7 -> 7.2 GB/s, Q6_K 4.7 -> 6.2,
     * Q4_1 4.3 -> 8.3 against one tile ahead into L1 (_MM_HINT_T0), whose fill buffers run out. */
    const int64_t ahead = (PREFETCH_BYTES / (R * w->row_bytes) + 1) * R * w->row_bytes;
    __m512 accf[MAX_R][MAX_MB];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MB; m++) accf[r][m] = _mm512_setzero_ps();
    for (int ci = 0; ci < w->n_chunks; ci++) {
        const qg_chunk *c = &w->chunks[ci];
        const int8_t *xc = x->xq + m0 * xs + c->xoff;
        const uint8_t *row[MAX_R];
        __m512i acc[MAX_R][MAX_MB];
        for (int r = 0; r < R; r++) {
            row[r] = w->data + (int64_t)(r0 + r) * w->row_bytes;
            for (int m = 0; m < MB; m++) acc[r][m] = _mm512_setzero_si512();
        }
        for (int t = 0; t < STEPS / 2; t++) {
            __m512i wv[MAX_R];
            for (int r = 0; r < R; r++) {
                wv[r] = unpack_pair(bits, row[r] + c->qoff, t);
                _mm_prefetch((const char *)(row[r] + ahead + c->qoff + 64 * t), _MM_HINT_T1);
            }
            for (int m = 0; m < MB; m++) {
                __m512i xv = _mm512_loadu_si512(xc + m * xs + 64 * t);
                for (int r = 0; r < R; r++) acc[r][m] = _mm512_dpbusd_epi32(acc[r][m], wv[r], xv);
            }
        }
        __m512 mul[MAX_R], bias[MAX_R];
        for (int r = 0; r < R; r++) lane_scales(kind, row[r] + c->soff, &mul[r], &bias[r]);
        for (int m = 0; m < MB; m++) {
            int64_t at = ((int64_t)(m0 + m) * x->n_chunks + ci) * 16;
            __m512 sx = _mm512_loadu_ps(x->sx + at), xsum = _mm512_loadu_ps(x->xs + at);
            for (int r = 0; r < R; r++) {
                accf[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][m]), _mm512_mul_ps(mul[r], sx), accf[r][m]);
                accf[r][m] = _mm512_fnmadd_ps(bias[r], xsum, accf[r][m]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MB; m++) y[(int64_t)(m0 + m) * ldy + col + r] = _mm512_reduce_add_ps(accf[r][m]);
}

/* Activation rows in fours against weight-row pairs, XB rows at a time (their int8 rows
 * stay in L2 while the tile's weight rows pass); fewer than four rows (decode) against
 * weight rows in fours, whose independent sums keep the dot-product unit busy. */
#define XB 64
INLINE T512 void rows(const int kind, const qg_weight *w, const qg_act *x, int r0, int r1, float *y, int64_t ldy) {
    int M = x->m;
    if (M >= 4) {
        for (int b0 = 0; b0 < M; b0 += XB) {
            int b1 = b0 + XB < M ? b0 + XB : M, r = r0;
            for (; r + 2 <= r1; r += 2) {
                int i = b0;
                for (; i + 4 <= b1; i += 4) tile(kind, 2, 4, w, x, i, r, y, ldy, r - r0);
                for (; i < b1; i++) tile(kind, 2, 1, w, x, i, r, y, ldy, r - r0);
            }
            for (; r < r1; r++) {
                int i = b0;
                for (; i + 4 <= b1; i += 4) tile(kind, 1, 4, w, x, i, r, y, ldy, r - r0);
                for (; i < b1; i++) tile(kind, 1, 1, w, x, i, r, y, ldy, r - r0);
            }
        }
    } else {
        int r = r0;
        for (; r + 4 <= r1; r += 4)
            for (int i = 0; i < M; i++) tile(kind, 4, 1, w, x, i, r, y, ldy, r - r0);
        for (; r < r1; r++)
            for (int i = 0; i < M; i++) tile(kind, 1, 1, w, x, i, r, y, ldy, r - r0);
    }
}

#define KIND_FN(K) \
    static T512 void rows_##K(const qg_weight *w, const qg_act *x, int r0, int r1, float *y, int64_t ldy) { \
        rows(QG_##K, w, x, r0, r1, y, ldy); \
    }
KIND_FN(Q4_K)
KIND_FN(Q5_K)
KIND_FN(Q6_K)

void qg_rows_avx512(const qg_weight *w, const qg_act *x, int r0, int r1, float *y, int64_t ldy) {
    (w->kind == QG_Q6_K ? rows_Q6_K : w->kind == QG_Q5_K ? rows_Q5_K : rows_Q4_K)(w, x, r0, r1, y, ldy);
}
