/* qgemm.h's rows on AVX2 (+ FMA, F16C) for the K-quants on int8 activations (the legacy types:
 * qgemm16_avx2.c): a pair of steps' 64 bytes as two 256-bit halves, lanes
 * 0-7 and 8-15; vpmaddubsw + vpmaddwd + vpaddd per 32 weights and activation row. */
#include <immintrin.h>

#include "qgemm.h"

#define TAVX2 __attribute__((target("avx2,fma,f16c")))
#define INLINE static inline __attribute__((always_inline))
/* Tile bounds: arrays of fixed size (not [R], a VLA) so that, with R and MB constant in each
 * instantiation, the compiler keeps every accumulator in a register. */
#define MAX_R 4
#define MAX_MB 4
#define PREFETCH_BYTES 8192       /* as in qgemm_avx512.c */

typedef struct { __m256i a, b; } i16x32;    /* lanes 0-7 (words 0-15), lanes 8-15 (words 16-31) */

INLINE int bits_of(int kind) {
    return kind == QG_Q5_K ? 5 : kind == QG_Q6_K ? 6 : 4;
}

INLINE TAVX2 float half(const uint8_t *p) { return _cvtsh_ss((unsigned short)(p[0] | p[1] << 8)); }

/* words 16h .. 16h + 15 of a pair of steps: byte j of `lo` in the low byte, of `hi` in the high */
INLINE TAVX2 __m256i interleave(__m256i lo, __m256i hi, int h) {
    __m128i l = h ? _mm256_extracti128_si256(lo, 1) : _mm256_castsi256_si128(lo);
    __m128i u = h ? _mm256_extracti128_si256(hi, 1) : _mm256_castsi256_si128(hi);
    return _mm256_or_si256(_mm256_cvtepu8_epi16(l), _mm256_slli_epi16(_mm256_cvtepu8_epi16(u), 8));
}

/* add where the slot's bit of `mask` is set */
INLINE TAVX2 i16x32 add_masked(i16x32 v, uint32_t mask, short add) {
    const __m256i bit = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
                                          (short)0x8000);
    __m256i lo = _mm256_cmpeq_epi16(_mm256_and_si256(_mm256_set1_epi16((short)(mask & 0xffff)), bit), bit);
    __m256i hi = _mm256_cmpeq_epi16(_mm256_and_si256(_mm256_set1_epi16((short)(mask >> 16)), bit), bit);
    v.a = _mm256_add_epi16(v.a, _mm256_and_si256(lo, _mm256_set1_epi16(add)));
    v.b = _mm256_add_epi16(v.b, _mm256_and_si256(hi, _mm256_set1_epi16(add)));
    return v;
}

/* add to byte B of the pair (word B / 2's low or high byte) where bit B of mask is set */
INLINE TAVX2 i16x32 add_bytes_masked(i16x32 v, uint64_t mask, char add) {
    /* byte k of a half takes mask byte k / 8 (vpshufb within each 128-bit lane: dword broadcast) */
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    __m256i a = _mm256_shuffle_epi8(_mm256_set1_epi32((int)(uint32_t)mask), spread);
    __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32((int)(uint32_t)(mask >> 32)), spread);
    a = _mm256_cmpeq_epi8(_mm256_and_si256(a, bit), bit);
    b = _mm256_cmpeq_epi8(_mm256_and_si256(b, bit), bit);
    v.a = _mm256_add_epi8(v.a, _mm256_and_si256(a, _mm256_set1_epi8(add)));
    v.b = _mm256_add_epi8(v.b, _mm256_and_si256(b, _mm256_set1_epi8(add)));
    return v;
}

/* Steps 2t and 2t + 1 of a chunk as bytes, word j = slot j of each (qgemm.h). */
INLINE TAVX2 i16x32 unpack_pair(const int bits, const uint8_t *q, int steps, int t) {
    i16x32 v;
    __m256i b = _mm256_loadu_si256((const __m256i *)(q + 32 * t)), m = _mm256_set1_epi8(15);
    __m256i lo = _mm256_and_si256(b, m), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m);
    v.a = interleave(lo, hi, 0), v.b = interleave(lo, hi, 1);
    const uint32_t *hb = (const uint32_t *)(q + 16 * steps);
    if (bits == 5) {
        v = add_masked(add_masked(v, hb[2 * t], 16), hb[2 * t + 1], 16 << 8);
    } else if (bits == 6) {     /* the high bits are byte masks of the pair */
        v = add_bytes_masked(v, qg_pair_bit((const uint8_t *)hb, t, 0), 16);
        v = add_bytes_masked(v, qg_pair_bit((const uint8_t *)hb, t, 1), 32);
    }
    return v;
}

/* The chunk's lane scales as two halves (see qgemm_avx512.c's lane_scales). */
INLINE TAVX2 void lane_scales(const int kind, const uint8_t *sp, const qg_chunk *c, __m256 mul[2], __m256 bias[2]) {
    if (kind == QG_Q6_K) {
        __m128i sc = _mm_loadu_si128((const __m128i *)(sp + 2));
        __m256 d = _mm256_set1_ps(half(sp));
        mul[0] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc)), d);
        mul[1] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8))), d);
        bias[0] = _mm256_mul_ps(mul[0], _mm256_set1_ps(-32.f));
        bias[1] = _mm256_mul_ps(mul[1], _mm256_set1_ps(-32.f));
        return;
    }
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m128i shift = _mm_cvtsi32_si128(c->gshift);
    __m256i w = _mm256_set1_epi32(c->width);
    __m256i idx[2] = {_mm256_srl_epi32(_mm256_mullo_epi32(iota, w), shift),
                      _mm256_srl_epi32(_mm256_mullo_epi32(_mm256_add_epi32(iota, _mm256_set1_epi32(8)), w), shift)};
    __m256 m = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(sp + 4)))),
                             _mm256_set1_ps(half(sp)));          /* Q4_K, Q5_K */
    __m256 b = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(sp + 12)))),
                             _mm256_set1_ps(-half(sp + 2)));
    for (int h = 0; h < 2; h++) {
        mul[h] = _mm256_permutevar8x32_ps(m, idx[h]);
        bias[h] = _mm256_permutevar8x32_ps(b, idx[h]);
    }
}

/* acc + the lane sums of 4 bytes of w times x; |products| stay under 2^14 per pair (63 x 127 x
 * 2), so vpmaddubsw does not saturate. */
INLINE TAVX2 __m256i dot(__m256i acc, __m256i w, const int8_t *x) {
    __m256i p = _mm256_maddubs_epi16(w, _mm256_loadu_si256((const __m256i *)x));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

INLINE TAVX2 float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

INLINE TAVX2 void tile(const int kind, const int R, const int MB, const qg_weight *w, const qg_act *x, int m0, int r0,
                       float *y, int64_t ldy, int col) {
    const int bits = bits_of(kind);
    const int64_t xs = x->stride;
    const int64_t ahead = (PREFETCH_BYTES / (R * w->row_bytes) + 1) * R * w->row_bytes;
    __m256 accf[MAX_R][MAX_MB];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MB; m++) accf[r][m] = _mm256_setzero_ps();
    for (int ci = 0; ci < w->n_chunks; ci++) {
        const qg_chunk *c = &w->chunks[ci];
        const int steps = c->steps;
        const int8_t *xc = x->xq + m0 * xs + c->xoff;
        const uint8_t *row[MAX_R];
        __m256i acc[MAX_R][MAX_MB][2];
        for (int r = 0; r < R; r++) {
            row[r] = w->data + (int64_t)(r0 + r) * w->row_bytes;
            for (int m = 0; m < MB; m++) acc[r][m][0] = acc[r][m][1] = _mm256_setzero_si256();
        }
        for (int t = 0; t < steps / 2; t++) {
            i16x32 wv[MAX_R];
            for (int r = 0; r < R; r++) {
                wv[r] = unpack_pair(bits, row[r] + c->qoff, steps, t);
                _mm_prefetch((const char *)(row[r] + ahead + c->qoff + 64 * t), _MM_HINT_T1);
            }
            for (int m = 0; m < MB; m++)
                for (int r = 0; r < R; r++) {
                    const int8_t *xm = xc + m * xs + 64 * t;
                    acc[r][m][0] = dot(acc[r][m][0], wv[r].a, xm);
                    acc[r][m][1] = dot(acc[r][m][1], wv[r].b, xm + 32);
                }
        }
        for (int r = 0; r < R; r++) {
            __m256 mul[2], bias[2];
            lane_scales(kind, row[r] + c->soff, c, mul, bias);
            for (int m = 0; m < MB; m++) {
                int64_t at = ((int64_t)(m0 + m) * x->n_chunks + ci) * 16;
                for (int h = 0; h < 2; h++) {
                    __m256 sx = _mm256_loadu_ps(x->sx + at + 8 * h);
                    accf[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][m][h]), _mm256_mul_ps(mul[h], sx),
                                                 accf[r][m]);
                    accf[r][m] = _mm256_fmadd_ps(bias[h], _mm256_loadu_ps(x->xs + at + 8 * h), accf[r][m]);
                }
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MB; m++) y[(int64_t)(m0 + m) * ldy + col + r] = hsum(accf[r][m]);
}

#define XB 64      /* activation rows per pass, as in qgemm_avx512.c */
INLINE TAVX2 void rows(const int kind, const qg_weight *w, const qg_act *x, int r0, int r1, float *y, int64_t ldy) {
    for (int b0 = 0; b0 < x->m; b0 += XB) {
        int b1 = b0 + XB < x->m ? b0 + XB : x->m, r = r0;
        for (; r + 2 <= r1; r += 2) {
            int i = b0;
            for (; i + 2 <= b1; i += 2) tile(kind, 2, 2, w, x, i, r, y, ldy, r - r0);
            for (; i < b1; i++) tile(kind, 2, 1, w, x, i, r, y, ldy, r - r0);
        }
        for (; r < r1; r++)
            for (int i = b0; i < b1; i++) tile(kind, 1, 1, w, x, i, r, y, ldy, r - r0);
    }
}

#define KIND_FN(K) \
    static TAVX2 void rows_##K(const qg_weight *w, const qg_act *x, int r0, int r1, float *y, int64_t ldy) { \
        rows(QG_##K, w, x, r0, r1, y, ldy); \
    }
KIND_FN(Q4_K)
KIND_FN(Q5_K)
KIND_FN(Q6_K)

void qg_rows_avx2(const qg_weight *w, const qg_act *x, int r0, int r1, float *y, int64_t ldy) {
    (w->kind == QG_Q6_K ? rows_Q6_K : w->kind == QG_Q5_K ? rows_Q5_K : rows_Q4_K)(w, x, r0, r1, y, ldy);
}
