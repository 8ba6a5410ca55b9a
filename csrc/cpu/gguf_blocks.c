/* GGUF blocks -> the packed layout of qgemm.h, and back to fp32 (embedding rows).
 *
 * A GGUF row is decoded into each element's integer and the repacked scale planes of
 * kernels/repack.py (s: sub-block scales, f: fp16 fields), which qg_pack lays out; the block
 * formats are ggml's (ggml-common.h): Q4_0 {d, qs[16]}, Q4_1 {d, m, qs[16]}, Q5_0 {d, qh[4],
 * qs[16]}, Q5_1 {d, m, qh[4], qs[16]}, Q8_0 {d, qs[32]}, Q4_K {d, dmin, scales[12], qs[128]},
 * Q5_K {d, dmin, scales[12], qh[32], qs[128]}, Q6_K {ql[128], qh[64], scales[16], d}. */
#include <stdlib.h>
#include <string.h>

#include "qgemm.h"

static uint16_t u16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

int qg_block_bytes(int kind) {
    static const int bytes[QG_N_KINDS] = {18, 20, 22, 24, 34, 144, 176, 210};
    return bytes[kind];
}

int qg_block_elems(int kind) { return kind >= QG_Q4_K ? 256 : 32; }

/* Q4_K / Q5_K: the 12 bytes of eight 6-bit scales and mins. */
static void k_scales(const uint8_t *q, uint8_t *sc, uint8_t *mn) {
    for (int j = 0; j < 8; j++) {
        if (j < 4) {
            sc[j] = q[j] & 63;
            mn[j] = q[j + 4] & 63;
        } else {
            sc[j] = (uint8_t)((q[j + 4] & 15) | ((q[j - 4] >> 6) << 4));
            mn[j] = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
        }
    }
}

/* One GGUF row of `cols` -> v[cols], s (sub-block scales), f (fp16 fields), as repack.py's planes. */
static void decode_row(int kind, int cols, const uint8_t *raw, int16_t *v, uint8_t *s, uint16_t *f) {
    int nb = cols / qg_block_elems(kind), bb = qg_block_bytes(kind);
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = raw + (int64_t)b * bb;
        int16_t *out = v + b * qg_block_elems(kind);
        switch (kind) {
        case QG_Q4_0: case QG_Q4_1: case QG_Q5_0: case QG_Q5_1: {
            int head = kind == QG_Q4_0 ? 2 : kind == QG_Q4_1 ? 4 : kind == QG_Q5_0 ? 6 : 8;
            uint32_t qh = kind == QG_Q5_0 || kind == QG_Q5_1 ? (uint32_t)blk[head - 4] | (uint32_t)blk[head - 3] << 8 |
                                                                   (uint32_t)blk[head - 2] << 16 | (uint32_t)blk[head - 1] << 24 : 0;
            for (int j = 0; j < 16; j++) {
                out[j] = (int16_t)((blk[head + j] & 15) | ((qh >> j) & 1) << 4);
                out[j + 16] = (int16_t)((blk[head + j] >> 4) | ((qh >> (j + 16)) & 1) << 4);
            }
            f[b] = u16(blk);
            if (kind == QG_Q4_1 || kind == QG_Q5_1) f[nb + b] = u16(blk + 2);
            break;
        }
        case QG_Q8_0:
            for (int j = 0; j < 32; j++) out[j] = (int8_t)blk[2 + j];
            f[b] = u16(blk);
            break;
        case QG_Q4_K: case QG_Q5_K: {
            const uint8_t *qs = blk + (kind == QG_Q4_K ? 16 : 48), *qh = blk + 16;
            for (int j = 0; j < 4; j++)
                for (int l = 0; l < 32; l++) {
                    int lo = qs[32 * j + l] & 15, hi = qs[32 * j + l] >> 4;
                    if (kind == QG_Q5_K) {
                        lo |= ((qh[l] >> (2 * j)) & 1) << 4;
                        hi |= ((qh[l] >> (2 * j + 1)) & 1) << 4;
                    }
                    out[64 * j + l] = (int16_t)lo;
                    out[64 * j + 32 + l] = (int16_t)hi;
                }
            k_scales(blk + 4, s + 8 * b, s + cols / 32 + 8 * b);
            f[b] = u16(blk);
            f[nb + b] = u16(blk + 2);
            break;
        }
        default: {      /* Q6_K: element 128h + 32k + l, k = 2i + j: nibble i of ql[64h + 32j + l], bits 2k of qh[32h + l] */
            const uint8_t *ql = blk, *qh = blk + 128;
            for (int h = 0; h < 2; h++)
                for (int k = 0; k < 4; k++)
                    for (int l = 0; l < 32; l++) {
                        int low = (ql[64 * h + 32 * (k & 1) + l] >> (4 * (k >> 1))) & 15;
                        out[128 * h + 32 * k + l] = (int16_t)(low | ((qh[32 * h + l] >> (2 * k)) & 3) << 4);
                    }
            memcpy(s + 16 * b, blk + 192, 16);
            f[b] = u16(blk + 208);
        }
        }
    }
}

int qg_pack_gguf(const qg_weight *w, const uint8_t *raw, int64_t raw_row_bytes, uint8_t *out) {
    int K = w->cols;
    int16_t *v = malloc(sizeof(int16_t) * K);
    uint8_t *s = malloc(K / 8 + 16);
    uint16_t *f = malloc(sizeof(uint16_t) * (K / 16 + 16));
    if (!v || !s || !f) {
        free(v), free(s), free(f);
        return 1;
    }
    qg_weight one = *w;
    one.rows = 1;
    for (int64_t r = 0; r < w->rows; r++) {
        decode_row(w->kind, K, raw + r * raw_row_bytes, v, s, f);
        /* lf, ls: the plane widths qg_pack indexes with */
        qg_pack(&one, v, s, 0, f, 0, out + r * w->row_bytes);
    }
    free(v), free(s), free(f);
    return 0;
}

static float half_to_float(const uint8_t *p) {
    uint16_t h = u16(p);
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 31, man = h & 1023, bits;
    if (exp == 31) {
        bits = sign | 0x7f800000u | man << 13;
    } else if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {            /* subnormal: normalise */
            int e = -1;
            do {
                man <<= 1;
                e++;
            } while (!(man & 1024));
            bits = sign | (uint32_t)(112 - e) << 23 | (man & 1023) << 13;
        }
    } else {
        bits = sign | (exp + 112) << 23 | man << 13;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* The (mul, bias) of group g of a chunk: element = int * mul + bias, as gguf-py computes it. */
static void group_scales(int kind, const uint8_t *sc, int g, int groups, float *mul, float *bias) {
    switch (kind) {
    case QG_Q4_0: case QG_Q5_0: case QG_Q8_0: {
        float d = half_to_float(sc + 2 * g);
        *mul = d;
        *bias = kind == QG_Q4_0 ? -8.f * d : kind == QG_Q5_0 ? -16.f * d : 0.f;
        break;
    }
    case QG_Q4_1: case QG_Q5_1:
        *mul = half_to_float(sc + 2 * g);
        *bias = half_to_float(sc + 2 * groups + 2 * g);
        break;
    case QG_Q4_K: case QG_Q5_K:
        *mul = half_to_float(sc) * (float)sc[4 + g];
        *bias = -(half_to_float(sc + 2) * (float)sc[12 + g]);
        break;
    default:        /* Q6_K */
        *mul = half_to_float(sc) * (float)(int8_t)sc[2 + g];
        *bias = -32.f * *mul;
    }
}

void qg_dequant_rows(const qg_weight *w, const int64_t *rows, int n, float *out) {
    int bits = qg_bits(w->kind), gs = w->kind == QG_Q6_K ? 16 : 32;
    for (int i = 0; i < n; i++) {
        const uint8_t *row = w->data + rows[i] * w->row_bytes;
        float *o = out + (int64_t)i * w->cols;
        for (int ci = 0; ci < w->n_chunks; ci++) {
            const qg_chunk *c = &w->chunks[ci];
            const uint8_t *q = row + c->qoff;
            const uint32_t *hb = (const uint32_t *)(q + 16 * c->steps);
            int per_lane = c->width / 16;
            for (int l = 0; l < 16; l++)
                for (int e = 0; e < per_lane; e++) {
                    int st = e / 2, j = 2 * l + (e & 1), at = l * per_lane + e, val;
                    if (bits == 8) {
                        val = (int8_t)q[32 * st + j];
                    } else {
                        val = (q[32 * (st / 2) + j] >> (4 * (st & 1))) & 15;
                        if (bits == 5) val |= ((hb[st] >> j) & 1) << 4;
                        for (int k = 0; k < 2 && bits == 6; k++)
                            val |= (int)((qg_pair_bit((const uint8_t *)hb, st / 2, k) >> (2 * j + (st & 1))) & 1) << (4 + k);
                    }
                    float mul, bias;
                    group_scales(w->kind, row + c->soff, at / gs, c->width / 32, &mul, &bias);
                    o[c->k0 + at] = (float)val * mul + bias;
                }
        }
    }
}
