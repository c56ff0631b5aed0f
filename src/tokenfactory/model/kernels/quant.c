/* Weight-only quantized linear layers (y = x W^T, float32 out) on GGUF blocks as stored.
 *
 * Why: a decode step streams every weight byte, so bytes per weight set its speed. A GGUF
 * Q4_1 weight is 0.625 bytes, Q8_0 1.06, bf16 2: executing the blocks as stored (no
 * dequantization at load) reads 2-3x fewer bytes per token than the bf16 path.
 *
 * Weight layouts (llama.cpp's, blocks of 32 values along a row; a row never shares a block):
 *   Q8_0 (34 B): fp16 d, int8 q[32]             w = d * q
 *   Q4_0 (18 B): fp16 d, uint8 qs[16]           w = d * (nibble - 8)
 *   Q4_1 (20 B): fp16 d, fp16 m, uint8 qs[16]   w = d * nibble + m
 *     nibbles: value j < 16 is the low nibble of qs[j], value j + 16 its high nibble;
 *   int8: int8 (out, in) row-major with one float scale per output row (w = scale[n] * q).
 *
 * Method (llama.cpp's idea, written here from the formats): each activation row is quantized
 * to int8 in blocks of 32 with one float scale per block (d_x = max|x| / 127, q = rint(x /
 * d_x)), then each weight block meets its activation block as an integer dot product
 * (AVX-512 VNNI vpdpbusd: unsigned x signed bytes, 4 products summed per int32 lane) scaled
 * by d_w * d_x in float32. Two blocks fill one 512-bit register: lanes 0-7 hold block 2p,
 * lanes 8-15 block 2p + 1, so the per-block scales are 16-lane vectors precomputed with the
 * activation ("xs"). The unsigned operand: Q4 nibbles are unsigned as stored (Q4_0's "- 8"
 * becomes a precomputed per-lane 8 * sum(q_x) ("xc"); Q4_1's "+ m" a per-lane d_x * sum(q_x) /
 * 8 ("xm") times m); signed Q8_0/int8 weights use |w| and move the sign onto x.
 *
 * Parallelism: OpenMP over output rows. Called outside a parallel region, a function opens
 * one; called from inside one (a whole decode step in one region), every thread of the team
 * must call it and the rows are shared out by an orphaned `omp for`. Each thread quantizes the
 * activations itself (rows * in values, ~1/out of the work) so no barrier or shared buffer
 * is needed. Up to 4 activation rows share one pass over a weight row (the row is unpacked
 * once per group of 4); more rows come back to it from L1. A portable scalar version of the
 * same arithmetic is compiled where AVX-512 VNNI/BW is absent.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define TF_QUANT_SIMD 1
#endif

#include "kernels.h"

enum { QK = 32, TF_Q8_0 = 0, TF_Q4_0 = 1, TF_Q4_1 = 2, TF_INT8 = 3 };

static const int block_bytes[4] = {34, 18, 20, 32};

static inline float half_to_float(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, u;
    if (exp == 0x1Fu) {
        u = sign | 0x7F800000u | (man << 13);                 /* inf / NaN */
    } else if (exp != 0) {
        u = sign | ((exp + 112u) << 23) | (man << 13);        /* normal */
    } else if (man == 0) {
        u = sign;                                             /* zero */
    } else {                                                  /* subnormal: renormalize */
        exp = 113u;
        while (!(man & 0x400u)) { man <<= 1; exp--; }
        u = sign | (exp << 23) | ((man & 0x3FFu) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* One activation row quantized: npairs pairs of blocks (the last padded with zeros). */
typedef struct {
    int8_t *q;       /* (npairs * 64) */
    float *xs;       /* (npairs * 16) block scale d_x per lane */
    float *xm;       /* (npairs * 16) d_x * sum(q) / 8 per lane (Q4_1's m term) */
    int32_t *xc;     /* (npairs * 16) 8 * sum of the lane's 4 q (Q4_0's -8 term) */
} qrow;

static size_t qrow_bytes(int npairs) { return (size_t)npairs * (64 + 3 * 64); }

static qrow qrow_at(uint8_t *base, int npairs, int r) {
    uint8_t *p = base + (size_t)r * qrow_bytes(npairs);
    qrow q = {(int8_t *)p, (float *)(p + npairs * 64), (float *)(p + npairs * 128),
              (int32_t *)(p + npairs * 192)};
    return q;
}

/* Quantize one bfloat16 row of ``in`` (a multiple of 32) values. */
static void quantize_row(const bf16 *x, int in, int npairs, qrow r) {
    const int nb = in / QK;
    memset(r.q, 0, (size_t)npairs * 64);
    memset(r.xs, 0, (size_t)npairs * 3 * 64);
    for (int b = 0; b < nb; b++) {
        float v[QK], amax = 0.0f;
        for (int j = 0; j < QK; j++) {
            v[j] = from_bf16(x[b * QK + j]);
            amax = fmaxf(amax, fabsf(v[j]));
        }
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        int8_t *q = r.q + b * QK;
        int sum = 0;
        for (int j = 0; j < QK; j++) {
            q[j] = (int8_t)rintf(v[j] * id);
            sum += q[j];
        }
        const int lane0 = (b / 2) * 16 + (b % 2) * 8;
        for (int l = 0; l < 8; l++) {
            r.xs[lane0 + l] = d;
            r.xm[lane0 + l] = d * (float)sum * 0.125f;
            r.xc[lane0 + l] = 8 * (q[4 * l] + q[4 * l + 1] + q[4 * l + 2] + q[4 * l + 3]);
        }
    }
}

#ifdef TF_QUANT_SIMD
/* Two Q4 blocks' nibbles as 64 unsigned bytes in value order: [a 0-15, a 16-31, b 0-15,
 * b 16-31]; b may be NULL (zeros). */
static inline __m512i unpack_q4(const uint8_t *qa, const uint8_t *qb) {
    const __m128i a = _mm_loadu_si128((const __m128i *)qa);
    const __m128i b = qb ? _mm_loadu_si128((const __m128i *)qb) : _mm_setzero_si128();
    __m512i v = _mm512_inserti32x4(_mm512_castsi128_si512(a), a, 1);
    v = _mm512_inserti32x4(_mm512_inserti32x4(v, b, 2), b, 3);
    const __m512i shift = _mm512_set_epi64(0x0004000400040004LL, 0x0004000400040004LL, 0, 0,
                                           0x0004000400040004LL, 0x0004000400040004LL, 0, 0);
    return _mm512_and_si512(_mm512_srlv_epi16(v, shift), _mm512_set1_epi8(0x0F));
}

static inline __m512 pair_ps(float a, float b) {
    return _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(a), _mm512_set1_ps(b));
}

/* One weight row against MM (<= 4, a constant after inlining) quantized activation rows. */
static inline __attribute__((always_inline)) void row_dot(
        int kind, const uint8_t *wrow, int nb, const qrow *xr, const int MM, float *s) {
    __m512 acc[4];
    for (int m = 0; m < MM; m++) acc[m] = _mm512_setzero_ps();
    const int bb = block_bytes[kind];
    for (int p = 0; 2 * p < nb; p++) {
        const int has_b = 2 * p + 1 < nb;
        const uint8_t *ba = wrow + (size_t)(2 * p) * bb, *bq = has_b ? ba + bb : NULL;
        if (kind == TF_Q4_0 || kind == TF_Q4_1) {
            const int off = kind == TF_Q4_0 ? 2 : 4;
            const __m512i w = unpack_q4(ba + off, has_b ? bq + off : NULL);
            const __m512 wd = pair_ps(half_to_float(ba), has_b ? half_to_float(bq) : 0.0f);
            if (kind == TF_Q4_1) {
                const __m512 wm = pair_ps(half_to_float(ba + 2), has_b ? half_to_float(bq + 2) : 0.0f);
                for (int m = 0; m < MM; m++) {
                    const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w,
                                                            _mm512_loadu_si512(xr[m].q + 64 * p));
                    acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),
                                             _mm512_mul_ps(wd, _mm512_loadu_ps(xr[m].xs + 16 * p)), acc[m]);
                    acc[m] = _mm512_fmadd_ps(wm, _mm512_loadu_ps(xr[m].xm + 16 * p), acc[m]);
                }
            } else {
                for (int m = 0; m < MM; m++) {
                    __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w,
                                                      _mm512_loadu_si512(xr[m].q + 64 * p));
                    dot = _mm512_sub_epi32(dot, _mm512_loadu_si512(xr[m].xc + 16 * p));
                    acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),
                                             _mm512_mul_ps(wd, _mm512_loadu_ps(xr[m].xs + 16 * p)), acc[m]);
                }
            }
        } else {   /* signed bytes: Q8_0 blocks or a plain int8 row */
            __m512i w;
            __m512 wd;
            if (kind == TF_Q8_0) {
                const __m256i a = _mm256_loadu_si256((const __m256i *)(ba + 2));
                const __m256i b = has_b ? _mm256_loadu_si256((const __m256i *)(bq + 2))
                                        : _mm256_setzero_si256();
                w = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
                wd = pair_ps(half_to_float(ba), has_b ? half_to_float(bq) : 0.0f);
            } else {
                w = _mm512_maskz_loadu_epi8(has_b ? ~0ULL : 0xFFFFFFFFULL, ba);
                wd = _mm512_set1_ps(1.0f);
            }
            const __mmask64 neg = _mm512_movepi8_mask(w);
            const __m512i aw = _mm512_abs_epi8(w);
            for (int m = 0; m < MM; m++) {
                const __m512i xq = _mm512_loadu_si512(xr[m].q + 64 * p);
                const __m512i sx = _mm512_mask_sub_epi8(xq, neg, _mm512_setzero_si512(), xq);
                const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), aw, sx);
                acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),
                                         _mm512_mul_ps(wd, _mm512_loadu_ps(xr[m].xs + 16 * p)), acc[m]);
            }
        }
    }
    for (int m = 0; m < MM; m++) s[m] = _mm512_reduce_add_ps(acc[m]);
}
#else
static void row_dot(int kind, const uint8_t *wrow, int nb, const qrow *xr, const int MM, float *s) {
    const int bb = block_bytes[kind];
    for (int m = 0; m < MM; m++) {
        float acc = 0.0f;
        for (int b = 0; b < nb; b++) {
            const uint8_t *blk = wrow + (size_t)b * bb;
            const int8_t *xq = xr[m].q + b * QK;
            const int lane0 = (b / 2) * 16 + (b % 2) * 8;
            const float dx = xr[m].xs[lane0];
            int dot = 0;
            if (kind == TF_Q4_0 || kind == TF_Q4_1) {
                const uint8_t *qs = blk + (kind == TF_Q4_0 ? 2 : 4);
                for (int j = 0; j < 16; j++)
                    dot += (qs[j] & 0x0F) * xq[j] + (qs[j] >> 4) * xq[j + 16];
                if (kind == TF_Q4_0) {
                    for (int l = 0; l < 8; l++) dot -= xr[m].xc[lane0 + l];
                }
                acc += (float)dot * (half_to_float(blk) * dx);
                if (kind == TF_Q4_1) acc += half_to_float(blk + 2) * (8.0f * xr[m].xm[lane0]);
            } else {
                const int8_t *wq = (const int8_t *)(kind == TF_Q8_0 ? blk + 2 : blk);
                for (int j = 0; j < QK; j++) dot += wq[j] * xq[j];
                acc += (float)dot * ((kind == TF_Q8_0 ? half_to_float(blk) : 1.0f) * dx);
            }
        }
        s[m] = acc;
    }
}
#endif

/* Body run by every thread: quantize x privately, then share out the output rows. */
static void qlinear_team(int kind, const void *w, const float *scales, const bf16 *x, float *y,
                         int rows, int out, int in) {
    const int nb = in / QK, npairs = (nb + 1) / 2;
    const size_t row_bytes = kind == TF_INT8 ? (size_t)in : (size_t)nb * block_bytes[kind];
    uint8_t *buf = aligned_alloc(64, qrow_bytes(npairs) * (size_t)(rows > 0 ? rows : 1));
    int ok = buf != NULL;
    if (ok) {
        for (int r = 0; r < rows; r++) quantize_row(x + (size_t)r * in, in, npairs, qrow_at(buf, npairs, r));
    }
#pragma omp for schedule(static)
    for (int n = 0; n < out; n++) {
        if (!ok) continue;
        const uint8_t *wrow = (const uint8_t *)w + (size_t)n * row_bytes;
        const float sn = kind == TF_INT8 ? scales[n] : 1.0f;
        for (int m0 = 0; m0 < rows; m0 += 4) {
            qrow xr[4];
            const int mm = rows - m0 < 4 ? rows - m0 : 4;
            for (int m = 0; m < mm; m++) xr[m] = qrow_at(buf, npairs, m0 + m);
            float s[4];
            switch (mm) {
                case 1: row_dot(kind, wrow, nb, xr, 1, s); break;
                case 2: row_dot(kind, wrow, nb, xr, 2, s); break;
                case 3: row_dot(kind, wrow, nb, xr, 3, s); break;
                default: row_dot(kind, wrow, nb, xr, 4, s); break;
            }
            for (int m = 0; m < mm; m++) y[(size_t)(m0 + m) * out + n] = s[m] * sn;
        }
    }
    free(buf);
}

static void qlinear(int kind, const void *w, const float *scales, const uint16_t *x, float *y,
                    int rows, int out, int in) {
    if (rows <= 0 || out <= 0 || in <= 0 || in % QK) return;   /* checked by the callers */
    if (omp_in_parallel()) {
        qlinear_team(kind, w, scales, x, y, rows, out, in);
    } else {
#pragma omp parallel
        qlinear_team(kind, w, scales, x, y, rows, out, in);
    }
}

/* The fixed interface (y (rows, out) = x (rows, in) @ W^T; ``in`` a multiple of 32). */
void tf_qlinear_q8_0(const void *w, const float *scales_or_null, const uint16_t *x_bf16,
                     float *y, int rows, int out, int in) {
    qlinear(TF_Q8_0, w, scales_or_null, x_bf16, y, rows, out, in);
}

void tf_qlinear_q4_0(const void *w, const float *scales_or_null, const uint16_t *x_bf16,
                     float *y, int rows, int out, int in) {
    qlinear(TF_Q4_0, w, scales_or_null, x_bf16, y, rows, out, in);
}

void tf_qlinear_q4_1(const void *w, const float *scales_or_null, const uint16_t *x_bf16,
                     float *y, int rows, int out, int in) {
    qlinear(TF_Q4_1, w, scales_or_null, x_bf16, y, rows, out, in);
}

void tf_qlinear_int8(const void *w, const float *scales_or_null, const uint16_t *x_bf16,
                     float *y, int rows, int out, int in) {
    qlinear(TF_INT8, w, scales_or_null, x_bf16, y, rows, out, in);
}

/* Dequantize weight rows to bfloat16: rows ``row_ids`` (or 0 .. n - 1 when NULL) of a
 * (*, in) weight of ``kind`` into ``dst`` (n, in). For embedding lookups and for large
 * batches, which run oneDNN's bfloat16 GEMM on a dequantized copy (see quant_linear.py). */
void tf_qdequant_bf16(int kind, const void *w, const float *scales, const int64_t *row_ids,
                      int n, int in, uint16_t *dst) {
    if (kind < 0 || kind > TF_INT8 || n <= 0 || in <= 0 || in % QK) return;
    const int nb = in / QK;
    const size_t row_bytes = kind == TF_INT8 ? (size_t)in : (size_t)nb * block_bytes[kind];
#pragma omp parallel for schedule(static) if ((int64_t)n * in > 65536)
    for (int r = 0; r < n; r++) {
        const int64_t src = row_ids ? row_ids[r] : r;
        const uint8_t *wrow = (const uint8_t *)w + (size_t)src * row_bytes;
        bf16 *o = dst + (size_t)r * in;
        for (int b = 0; b < nb; b++) {
            const uint8_t *blk = wrow + (size_t)b * block_bytes[kind];
            float v[QK];
            if (kind == TF_Q8_0) {
                const float d = half_to_float(blk);
                for (int j = 0; j < QK; j++) v[j] = d * (float)(int8_t)blk[2 + j];
            } else if (kind == TF_INT8) {
                for (int j = 0; j < QK; j++) v[j] = scales[src] * (float)(int8_t)blk[j];
            } else {
                const float d = half_to_float(blk);
                const uint8_t *qs = blk + (kind == TF_Q4_1 ? 4 : 2);
                if (kind == TF_Q4_1) {
                    const float m = half_to_float(blk + 2);
                    for (int j = 0; j < 16; j++) {
                        v[j] = d * (float)(qs[j] & 0x0F) + m;
                        v[j + 16] = d * (float)(qs[j] >> 4) + m;
                    }
                } else {
                    for (int j = 0; j < 16; j++) {
                        v[j] = d * (float)((qs[j] & 0x0F) - 8);
                        v[j + 16] = d * (float)((qs[j] >> 4) - 8);
                    }
                }
            }
            for (int j = 0; j < QK; j++) o[b * QK + j] = to_bf16(v[j]);
        }
    }
}
