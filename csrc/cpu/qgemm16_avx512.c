/* qgemm.h's rows on int16 activations (qg_rows16), AVX-512 (F, BW, VL, VNNI): one vpdpwssd per 32
 * weights and activation row. */
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
    return kind == QG_Q5_0 || kind == QG_Q5_1 || kind == QG_Q5_K ? 5 : kind == QG_Q6_K ? 6 : kind == QG_Q8_0 ? 8 : 4;
}

INLINE T512 float half(const uint8_t *p) { return _cvtsh_ss((unsigned short)(p[0] | p[1] << 8)); }

/* The chunk's per-lane weight scale (mul) and offset (bias): element = int * mul + bias. */
INLINE T512 void lane_scales(const int kind, const uint8_t *sp, const qg_chunk *c, __m512 *mul, __m512 *bias) {
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i group = _mm512_srl_epi32(_mm512_mullo_epi32(iota, _mm512_set1_epi32(c->width)),
                                     _mm_cvtsi32_si128(c->gshift));
    int g = c->width / 32;
    if (kind == QG_Q6_K) {
        __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(sp + 2))));
        *mul = _mm512_mul_ps(sc, _mm512_set1_ps(half(sp)));
        *bias = _mm512_mul_ps(*mul, _mm512_set1_ps(-32.f));
    } else if (kind == QG_Q4_K || kind == QG_Q5_K) {
        __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(sp + 4))));
        __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(sp + 12))));
        sc = _mm256_mul_ps(sc, _mm256_set1_ps(half(sp)));
        mn = _mm256_mul_ps(mn, _mm256_set1_ps(-half(sp + 2)));
        *mul = _mm512_permutexvar_ps(group, _mm512_castps256_ps512(sc));
        *bias = _mm512_permutexvar_ps(group, _mm512_castps256_ps512(mn));
    } else {
        __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)sp));
        *mul = _mm512_permutexvar_ps(group, _mm512_castps256_ps512(d));
        if (kind == QG_Q4_1 || kind == QG_Q5_1) {
            __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sp + 2 * g)));
            *bias = _mm512_permutexvar_ps(group, _mm512_castps256_ps512(m));
        } else {
            *bias = _mm512_mul_ps(*mul, _mm512_set1_ps(kind == QG_Q4_0 ? -8.f : -16.f));   /* Q8_0: unused */
        }
    }
}

/* Steps 2t and 2t + 1 of a 4/5/6-bit chunk as int16 lanes. */
INLINE T512 void unpack_pair(const int bits, const uint8_t *q, int steps, int t, __m512i *lo, __m512i *hi) {
    __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(q + 32 * t)));
    *lo = _mm512_and_si512(b, _mm512_set1_epi16(15));
    *hi = _mm512_srli_epi16(b, 4);
    const uint32_t *hb = (const uint32_t *)(q + 16 * steps);
    if (bits == 5) {
        *lo = _mm512_mask_add_epi16(*lo, hb[2 * t], *lo, _mm512_set1_epi16(16));
        *hi = _mm512_mask_add_epi16(*hi, hb[2 * t + 1], *hi, _mm512_set1_epi16(16));
    } else if (bits == 6) {
        uint64_t m4 = qg_pair_bit((const uint8_t *)hb, t, 0), m5 = qg_pair_bit((const uint8_t *)hb, t, 1);
        *lo = _mm512_mask_add_epi16(*lo, qg_step_bits(m4, 0), *lo, _mm512_set1_epi16(16));
        *lo = _mm512_mask_add_epi16(*lo, qg_step_bits(m5, 0), *lo, _mm512_set1_epi16(32));
        *hi = _mm512_mask_add_epi16(*hi, qg_step_bits(m4, 1), *hi, _mm512_set1_epi16(16));
        *hi = _mm512_mask_add_epi16(*hi, qg_step_bits(m5, 1), *hi, _mm512_set1_epi16(32));
    }
}

/* R weight rows from r0 against MB activation rows from m0, into y's columns from col. */
INLINE T512 void tile(const int kind, const int R, const int MB, const qg_weight *w, const qg_act16 *x, int m0, int r0,
                      float *y, int64_t ldy, int col) {
    const int bits = bits_of(kind);
    const int64_t xs = x->stride;
    /* Software prefetch into L2 about PREFETCH_BYTES on (see qgemm_avx512.c) */
    const int64_t ahead = (PREFETCH_BYTES / (R * w->row_bytes) + 1) * R * w->row_bytes;
    __m512 accf[MAX_R][MAX_MB];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MB; m++) accf[r][m] = _mm512_setzero_ps();
    for (int ci = 0; ci < w->n_chunks; ci++) {
        const qg_chunk *c = &w->chunks[ci];
        const int steps = c->steps;
        const int16_t *xc = x->xq + m0 * xs + c->xoff;
        const uint8_t *row[MAX_R];
        __m512i acc[MAX_R][MAX_MB];
        for (int r = 0; r < R; r++) {
            row[r] = w->data + (int64_t)(r0 + r) * w->row_bytes;
            for (int m = 0; m < MB; m++) acc[r][m] = _mm512_setzero_si512();
        }
        if (bits == 8) {
            for (int s = 0; s < steps; s++) {
                __m512i wv[MAX_R];
                for (int r = 0; r < R; r++) {
                    wv[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(row[r] + c->qoff + 32 * s)));
                    _mm_prefetch((const char *)(row[r] + ahead + c->qoff + 64 * s), _MM_HINT_T1);
                }
                for (int m = 0; m < MB; m++) {
                    __m512i xv = _mm512_loadu_si512(xc + m * xs + 32 * s);
                    for (int r = 0; r < R; r++) acc[r][m] = _mm512_dpwssd_epi32(acc[r][m], wv[r], xv);
                }
            }
        } else {
            for (int t = 0; t < steps / 2; t++) {
                __m512i lo[MAX_R], hi[MAX_R];
                for (int r = 0; r < R; r++) {
                    unpack_pair(bits, row[r] + c->qoff, steps, t, &lo[r], &hi[r]);
                    _mm_prefetch((const char *)(row[r] + ahead + c->qoff + 64 * t), _MM_HINT_T1);
                }
                for (int m = 0; m < MB; m++) {
                    __m512i xl = _mm512_loadu_si512(xc + m * xs + 64 * t);
                    __m512i xh = _mm512_loadu_si512(xc + m * xs + 64 * t + 32);
                    for (int r = 0; r < R; r++) {
                        acc[r][m] = _mm512_dpwssd_epi32(acc[r][m], lo[r], xl);
                        acc[r][m] = _mm512_dpwssd_epi32(acc[r][m], hi[r], xh);
                    }
                }
            }
        }
        __m512 mul[MAX_R], bias[MAX_R];
        for (int r = 0; r < R; r++) lane_scales(kind, row[r] + c->soff, c, &mul[r], &bias[r]);
        for (int m = 0; m < MB; m++) {
            int64_t at = ((int64_t)(m0 + m) * x->n_chunks + ci) * 16;
            __m512 sx = _mm512_loadu_ps(x->sx + at), xsum = _mm512_loadu_ps(x->xs + at);
            for (int r = 0; r < R; r++) {
                accf[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][m]), _mm512_mul_ps(mul[r], sx), accf[r][m]);
                if (kind != QG_Q8_0) accf[r][m] = _mm512_fmadd_ps(bias[r], xsum, accf[r][m]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MB; m++) y[(int64_t)(m0 + m) * ldy + col + r] = _mm512_reduce_add_ps(accf[r][m]);
}

/* Activation rows in fours against weight-row pairs, XB rows at a time (their int16 rows
 * stay in L2 while the tile's weight rows pass); fewer than four rows (decode) against
 * weight rows in fours, whose independent sums keep the dot-product unit busy. */
#define XB 64
INLINE T512 void rows(const int kind, const qg_weight *w, const qg_act16 *x, int r0, int r1, float *y, int64_t ldy) {
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
    static T512 void rows_##K(const qg_weight *w, const qg_act16 *x, int r0, int r1, float *y, int64_t ldy) { \
        rows(QG_##K, w, x, r0, r1, y, ldy); \
    }
KIND_FN(Q4_0)
KIND_FN(Q4_1)
KIND_FN(Q5_0)
KIND_FN(Q5_1)
KIND_FN(Q8_0)
KIND_FN(Q4_K)
KIND_FN(Q5_K)
KIND_FN(Q6_K)

void qg_rows16_avx512(const qg_weight *w, const qg_act16 *x, int r0, int r1, float *y, int64_t ldy) {
    static const qg_rows16_fn by_kind[QG_N_KINDS] = {rows_Q4_0, rows_Q4_1, rows_Q5_0, rows_Q5_1,
                                                   rows_Q8_0, rows_Q4_K, rows_Q5_K, rows_Q6_K};
    by_kind[w->kind](w, x, r0, r1, y, ldy);
}
