/* Quantized matrix products for the CPU: y[M, N] = x[M, K] @ W[N, K]^T, W in GGUF's 4/5/6/8-bit
 * types, fp32 scaling and sums. The K-quants (qg_rows): x rounded to int8 per 32 elements (127 /
 * each group's largest magnitude, as GGUF's Q8_0), int32 dot products of unsigned weight and
 * signed activation bytes (AVX-512 VNNI vpdpbusd, 64 per instruction, or AVX2 vpmaddubsw). The
 * legacy types (qg_rows16, below): x in int16 on vpdpwssd / vpmaddwd.
 *
 * Layout (built once at load by qg_pack): a row of K weights is cut into chunks of 256
 * (then 128, 64, 32 for what is left). A chunk is laid out 32 "slots" per step, 16 lanes
 * x 2; lane l holds the chunk's weights l * W/16 .. (l+1) * W/16
 * - 1 in consecutive steps, two per step (slot 2l + h of step s: weight l * W/16 + 2s + h).
 * A lane thus never mixes two scale groups, so a chunk's int32 lane sums are scaled once
 * per chunk (not once per group), by the lane's weight scale times its activation scale.
 * Steps per chunk: max(2, W / 32), taken in pairs by the kernels: word j (16 bits) of pair t
 * is slot j of step 2t (low byte) and of step 2t + 1 (high byte), so a 32-bit lane holds four
 * weights of one lane, l * W/16 + 4t + {0, 2, 1, 3}, the order of the int8 activation row.
 * Quant bytes of a chunk, then its scales:
 *   4-bit: steps / 2 x 32 bytes, byte j = (step 2t slot j) | (step 2t + 1 slot j) << 4;
 *   5-bit: the same, then one uint32 per step: bit j = fifth bit of slot j;
 *   6-bit: the same nibbles, then two uint64 per pair of steps: bit 4, bit 5 of each weight, bit
 *          2j + h for slot j of step 2t + h (the byte order of the pair unpacked: one mask
 *          register each on AVX-512, qg_pair_bit);
 *   8-bit: 32 int8 per step.
 * Scales per chunk of G = W/32 groups (W/16 for Q6_K): Q4_0/Q5_0/Q8_0 fp16 d[G];
 * Q4_1/Q5_1 fp16 d[G], m[G]; Q4_K/Q5_K (W = 256) fp16 d, dmin, uint8 sc[8], mn[8];
 * Q6_K (W = 256) fp16 d, int8 sc[16]. Nothing is requantized: element = int * mul + bias
 * with GGUF's own integers and scales. */
#ifndef SMOLLM3_CPU_QGEMM_H
#define SMOLLM3_CPU_QGEMM_H

#include <stdint.h>
#include <string.h>

enum qg_kind { QG_Q4_0, QG_Q4_1, QG_Q5_0, QG_Q5_1, QG_Q8_0, QG_Q4_K, QG_Q5_K, QG_Q6_K, QG_N_KINDS };

typedef struct {
    int k0, width, steps, gshift;   /* gshift: lane l's group is (l * width) >> gshift */
    int xoff;                       /* first int8 slot of the chunk in a quantized activation row */
    int qoff, soff;                 /* byte offsets of quants and scales in a weight row */
} qg_chunk;

typedef struct {
    int kind, rows, cols, n_chunks;
    int64_t row_bytes;
    const uint8_t *data;            /* rows x row_bytes (+ 64 bytes of slack) */
    qg_chunk *chunks;
} qg_weight;

typedef struct {                    /* M activation rows, quantized */
    int m, cols, n_chunks;
    int64_t stride;                 /* int8 slots per row */
    int8_t *xq;                     /* [m][stride], in the order of the weights' pairs of steps */
    float *sx, *xs;                 /* [m][n_chunks][16]: lane scale, lane sum (scale x int sum) */
} qg_act;

/* Chunk plan of a K-column row for a weight kind; returns the chunk count (<= cols / 32 + 4)
 * and the row's byte count, or -1 where cols does not fit the kind. */
int qg_plan(int kind, int cols, qg_chunk *chunks, int64_t *row_bytes);
int qg_max_chunks(int cols);
int qg_bits(int kind);

/* The 6-bit types' high bits of pair t (qg_pair_bit's `bit`: 0 for bit 4, 1 for bit 5) as a
 * mask of the pair's 64 bytes; qg_step_bits takes one step's 32 slots (h = 0: step 2t) out of it. */
static inline uint64_t qg_pair_bit(const uint8_t *high_bits, int t, int bit) {
    uint64_t m;
    memcpy(&m, high_bits + 16 * t + 8 * bit, 8);
    return m;
}
static inline uint32_t qg_step_bits(uint64_t m, int h) {
    m = (m >> h) & 0x5555555555555555ull;
    m = (m | m >> 1) & 0x3333333333333333ull;
    m = (m | m >> 2) & 0x0f0f0f0f0f0f0f0full;
    m = (m | m >> 4) & 0x00ff00ff00ff00ffull;
    m = (m | m >> 8) & 0x0000ffff0000ffffull;
    return (uint32_t)(m | m >> 16);
}

/* Pack rows: v[rows][cols] the integer of each element (int16: 0..2^bits-1, Q8_0 signed),
 * s, f the repacked planes (kernels/repack.py: s sub-block scales, f fp16 fields), row-major
 * with ls, lf entries per row. */
void qg_pack(const qg_weight *w, const int16_t *v, const uint8_t *s, int64_t ls, const uint16_t *f, int64_t lf,
             uint8_t *out);

/* Pack rows straight from GGUF blocks (raw_row_bytes apart); nonzero when out of memory. */
int qg_pack_gguf(const qg_weight *w, const uint8_t *raw, int64_t raw_row_bytes, uint8_t *out);
int qg_block_bytes(int kind);
int qg_block_elems(int kind);
/* Rows of the packed matrix back to fp32, element = int * mul + bias as GGUF defines it. */
void qg_dequant_rows(const qg_weight *w, const int64_t *rows, int n, float *out);

typedef struct {                    /* the same, int16 (2^-16 of each group's largest magnitude) */
    int m, cols, n_chunks;
    int64_t stride;                 /* int16 slots per row, slot j of step s at 32 s + j */
    int16_t *xq;
    float *sx, *xs;
} qg_act16;

int64_t qg_act_bytes(int m, int cols);
/* Lay out m quantized rows of cols in buf (qg_act_bytes), then fill rows i0 .. i1 - 1 from x. */
void qg_act_layout(int m, int cols, void *buf, qg_act *out);
void qg_quantize(const float *x, int64_t ldx, int i0, int i1, const qg_act *out);

/* y[i][r - r0] = row r of w . activation row i, for r0 <= r < r1 and i < x->m; the
 * implementation picked at start-up. qg_rows: the K-quants (Q4_K, Q5_K, Q6_K) only. */
typedef void (*qg_rows_fn)(const qg_weight *w, const qg_act *x, int r0, int r1, float *y, int64_t ldy);
extern qg_rows_fn qg_rows;
const char *qg_isa(void);
int qg_select(const char *isa);     /* "avx512", "avx2": 0 where this CPU cannot */

void qg_rows_avx512(const qg_weight *w, const qg_act *x, int r0, int r1, float *y, int64_t ldy);
void qg_rows_avx2(const qg_weight *w, const qg_act *x, int r0, int r1, float *y, int64_t ldy);

/* The same on int16 activations (vpdpwssd, 32 per AVX-512 instruction, or AVX2 vpmaddwd): what
 * the legacy types (Q4_0 ... Q8_0) take. int8 alone took SmolLM2-135M Q4_1 to 7 of 22 greedy
 * prompts equal to the exact path (int16: 22, llama.cpp: 11) and KLD 2.2e-3 (int16: 3.6e-7),
 * where the K-quants (Q4_K_M files) are the GEMVs that need int8's speed. */
int64_t qg_act16_bytes(int m, int cols);
void qg_act16_layout(int m, int cols, void *buf, qg_act16 *out);
void qg_quantize16(const float *x, int64_t ldx, int i0, int i1, const qg_act16 *out);
typedef void (*qg_rows16_fn)(const qg_weight *w, const qg_act16 *x, int r0, int r1, float *y, int64_t ldy);
extern qg_rows16_fn qg_rows16;
void qg_rows16_avx512(const qg_weight *w, const qg_act16 *x, int r0, int r1, float *y, int64_t ldy);
void qg_rows16_avx2(const qg_weight *w, const qg_act16 *x, int r0, int r1, float *y, int64_t ldy);

#endif
