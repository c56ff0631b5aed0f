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
 * Two kernels share the block layouts:
 *
 * Decode (tf_qlinear_<kind>, run by the native decode step and by QuantLinear for bfloat16
 * activations): llama.cpp's method. Each activation row is rounded once per call to int8
 * codes per block of 32 (float32 scale amax / 127; llama.cpp's Q8_0/Q8_1 store it as fp16),
 * and a block's dot product is an integer one -- Q4 nibbles (unsigned) or |int8| (with the
 * activation's sign flipped where the weight is negative) times the codes through AVX-512
 * VNNI's vpdpbusd on 256-bit vectors (on Zen 4 a 512-bit op costs two 256-bit ones) --
 * converted to float once and scaled by d * dx: one float multiply-add a block and row.
 * Q4_1's offset m (and Q4_0's -8 d) meets dx * sum(codes), computed with the codes. Result:
 * the dequantized weights times activations each moved by at most amax / 254 of their
 * block, to float32 rounding (tests/model/test_quant_kernels.py checks both). Measured
 * cost of that rounding on SmolLM2 (docs/quantization.md): KL divergence to the dequantized
 * float32 model 0.0036 (llama.cpp's own, same file: 0.0027), perplexity -0.1%.
 *
 * Exact (tf_qlinear_exact, float32 models): activations stay bfloat16. Each block's codes
 * become bfloat16 numbers exactly -- a Q4 nibble through a 16-entry table (vpermw: nibble for
 * Q4_1, nibble - 8 for Q4_0), int8 values by conversion -- and meet the activations in AVX-512
 * BF16 dot products (vdpbf16ps: products exact, float32 sums), scaled by the block's d. Q4_1's
 * offset adds m * sum(x) per block. int8 rows have one scale, applied at the end. It is ~1.5-2x
 * slower a block than the decode kernel (per-block code tables, bf16 dots of 2x the width).
 *
 * Parallelism: OpenMP over output rows. Called outside a parallel region, a function opens
 * one; called from inside one (a whole decode step in one region), every thread of the team
 * must call it and the rows are shared out by an orphaned `omp for`. Each thread computes the
 * activation block sums itself (rows * in additions) so no barrier or shared buffer is
 * needed (the decode kernel likewise rounds the activations in each thread). Up to 4
 * activation rows share one pass over a weight row (each block is decoded once per group of
 * 4); more rows come back to it from L1. Portable scalar versions of the same arithmetic are
 * compiled where AVX-512 BF16 / VNNI are absent (the build is -march=native, so what the
 * compiler sees is this CPU; tf_qlinear_isa says which).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
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

/* Per activation row, the float32 sum of each block of 32 values: the term that turns the
 * stored unsigned codes back into weights (see the file comment). */
static void block_sums(const bf16 *x, int rows, int in, float *sums) {
    const int nb = in / QK;
    for (int r = 0; r < rows; r++) {
        for (int b = 0; b < nb; b++) {
            float s = 0.0f;
            for (int j = 0; j < QK; j++) s += from_bf16(x[(size_t)r * in + b * QK + j]);
            sums[(size_t)r * nb + b] = s;
        }
    }
}

/* A block's map from codes c (nibble, nibble - 8 or int8) back to weights, w = d * c + k:
 * sum_j w_j x_j = d * sum_j c_j x_j + k * sum_j x_j (k: Q4_1's m, else 0). */
static inline void block_affine(int kind, const uint8_t *blk, float *d, float *k) {
    switch (kind) {
        case TF_Q4_1: *d = half_to_float(blk); *k = half_to_float(blk + 2); break;
        case TF_Q4_0: *d = half_to_float(blk); *k = 0.0f; break;
        case TF_Q8_0: *d = half_to_float(blk); *k = 0.0f; break;
        default: *d = 1.0f; *k = 0.0f; break;   /* int8: the row scale is applied at the end */
    }
}

#ifdef TF_QUANT_SIMD
/* A Q4 block's 16 bytes as its 32 values' codes in bfloat16 (exact), in value order: each
 * nibble indexes ``table`` (vpermw): nibble (Q4_1) or nibble - 8 (Q4_0). */
static inline __m512i q4_codes(const uint8_t *qs, __m512i table) {
    const __m128i a = _mm_loadu_si128((const __m128i *)qs);
    __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(a), _mm_srli_epi16(a, 4), 1);
    v = _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
    return _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(v), table);
}

/* bfloat16 of 0 .. 15 (Q4_1) and of -8 .. 7 (Q4_0); vpermw reads 32 entries */
static const uint16_t Q4_1_CODES[32] __attribute__((aligned(64))) = {
    0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
    0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};
static const uint16_t Q4_0_CODES[32] __attribute__((aligned(64))) = {
    0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80,
    0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0};

/* 32 signed bytes as 32 bfloat16 values (exact: |q| <= 128 needs 8 bits). */
static inline __m512i s8_codes(const uint8_t *q) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)q);
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1)));
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

/* The affine maps (d, k) of a row's nb blocks into dk[0..nb) and dk[nb..2nb): 16 blocks at
 * a time, their fp16 words gathered (d at offset 0; Q4_1's m at offset 2). */
static inline void row_affine(int kind, const uint8_t *wrow, int nb, float *dk) {
    const int bb = block_bytes[kind];
    const __m512i offs = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6,
                                                             5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(bb));
    for (int b0 = 0; b0 < nb; b0 += 16) {
        const __mmask16 live = nb - b0 >= 16 ? 0xFFFF : (__mmask16)((1u << (nb - b0)) - 1);
        /* the first 4 bytes of each live block (blocks hold >= 18 bytes: never past it) */
        const __m512i words = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, offs,
                                                          wrow + (size_t)b0 * bb, 1);
        const __m512 d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(words));
        const __m512 k = kind == TF_Q4_1
            ? _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(words, 16)))
            : _mm512_setzero_ps();
        _mm512_mask_storeu_ps(dk + b0, live, d);
        _mm512_mask_storeu_ps(dk + nb + b0, live, k);
    }
}

/* sum_b k[b] * xsum[b] over nb blocks. */
static inline float dot_f32(const float *a, const float *b, int n) {
    __m512 acc = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) {
        const __mmask16 live = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(live, a + i), _mm512_maskz_loadu_ps(live, b + i), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* One weight row against MM (<= 4, a constant after inlining) activation rows xr (bf16, row
 * stride ``in``) whose block sums are ``xsum`` (stride nb); ``dk``: scratch of 2 nb floats. */
static inline __attribute__((always_inline)) void row_dot(
        int kind, const uint8_t *wrow, int nb, const bf16 *xr, int in, const float *xsum,
        float *dk, const int MM, float *s) {
    __m512 acc[4];
    for (int m = 0; m < MM; m++) acc[m] = _mm512_setzero_ps();
    const int bb = block_bytes[kind];
    if (kind == TF_INT8) {   /* one scale per row (applied by the caller): plain products */
        for (int b = 0; b < nb; b++) {
            const __m512i w = s8_codes(wrow + (size_t)b * QK);
            for (int m = 0; m < MM; m++)
                acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)w,
                                          (__m512bh)_mm512_loadu_si512(xr + (size_t)m * in + b * QK));
        }
        for (int m = 0; m < MM; m++) s[m] = _mm512_reduce_add_ps(acc[m]);
        return;
    }
    row_affine(kind, wrow, nb, dk);
    const __m512i table = _mm512_load_si512(kind == TF_Q4_0 ? Q4_0_CODES : Q4_1_CODES);
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = wrow + (size_t)b * bb;
        const __m512i w = kind == TF_Q4_1 ? q4_codes(blk + 4, table)
                        : kind == TF_Q4_0 ? q4_codes(blk + 2, table) : s8_codes(blk + 2);
        const __m512 dv = _mm512_set1_ps(dk[b]);
        for (int m = 0; m < MM; m++) {
            const __m512 p = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w,
                                              (__m512bh)_mm512_loadu_si512(xr + (size_t)m * in + b * QK));
            acc[m] = _mm512_fmadd_ps(p, dv, acc[m]);
        }
    }
    for (int m = 0; m < MM; m++)
        s[m] = _mm512_reduce_add_ps(acc[m]) + (kind == TF_Q4_1 ? dot_f32(dk + nb, xsum + (size_t)m * nb, nb) : 0.0f);
}
#else
static void row_dot(int kind, const uint8_t *wrow, int nb, const bf16 *xr, int in,
                    const float *xsum, float *dk, const int MM, float *s) {
    (void)dk;
    const int bb = block_bytes[kind];
    for (int m = 0; m < MM; m++) {
        float acc = 0.0f;
        for (int b = 0; b < nb; b++) {
            const uint8_t *blk = wrow + (size_t)b * bb;
            const bf16 *x = xr + (size_t)m * in + b * QK;
            float c[QK], d, k, dot = 0.0f;
            if (kind == TF_Q4_0 || kind == TF_Q4_1) {
                const uint8_t *qs = blk + (kind == TF_Q4_0 ? 2 : 4);
                const int offset = kind == TF_Q4_0 ? 8 : 0;
                for (int j = 0; j < 16; j++) {
                    c[j] = (float)((qs[j] & 0x0F) - offset);
                    c[j + 16] = (float)((qs[j] >> 4) - offset);
                }
            } else {
                const int8_t *q = (const int8_t *)(kind == TF_Q8_0 ? blk + 2 : blk);
                for (int j = 0; j < QK; j++) c[j] = (float)q[j];
            }
            for (int j = 0; j < QK; j++) dot += c[j] * from_bf16(x[j]);
            block_affine(kind, blk, &d, &k);
            acc += d * dot + k * xsum[(size_t)m * nb + b];
        }
        s[m] = acc;
    }
}
#endif

/* Body run by every thread: the block sums privately, then share out the output rows. */
static void qlinear_team(int kind, const void *w, const float *scales, const bf16 *x, float *y,
                         int rows, int out, int in) {
    const int nb = in / QK;
    const size_t row_bytes = kind == TF_INT8 ? (size_t)in : (size_t)nb * block_bytes[kind];
    /* per thread: the block sums of every row, then 2 nb floats of row_dot scratch */
    float *xsum = malloc(sizeof(float) * (size_t)nb * (size_t)((rows > 0 ? rows : 1) + 2));
    const int ok = xsum != NULL;
    float *dk = ok ? xsum + (size_t)nb * (rows > 0 ? rows : 1) : NULL;
    if (ok) block_sums(x, rows, in, xsum);
#pragma omp for schedule(static)
    for (int n = 0; n < out; n++) {
        if (!ok) continue;
        const uint8_t *wrow = (const uint8_t *)w + (size_t)n * row_bytes;
        const float sn = kind == TF_INT8 ? scales[n] : 1.0f;
        for (int m0 = 0; m0 < rows; m0 += 4) {
            const int mm = rows - m0 < 4 ? rows - m0 : 4;
            const bf16 *xr = x + (size_t)m0 * in;
            const float *xs = xsum + (size_t)m0 * nb;
            float s[4];
            switch (mm) {
                case 1: row_dot(kind, wrow, nb, xr, in, xs, dk, 1, s); break;
                case 2: row_dot(kind, wrow, nb, xr, in, xs, dk, 2, s); break;
                case 3: row_dot(kind, wrow, nb, xr, in, xs, dk, 3, s); break;
                default: row_dot(kind, wrow, nb, xr, in, xs, dk, 4, s); break;
            }
            for (int m = 0; m < mm; m++) y[(size_t)(m0 + m) * out + n] = s[m] * sn;
        }
    }
    free(xsum);
}

/* ------------------------------------------------------------------------------------------
 * The decode path: activations quantized to int8 blocks, integer dot products (see the file
 * comment). Each activation row's block b of 32 values becomes dx = amax / 127 and codes
 * q = rint(x * (127 / amax)) (|q| <= 127; amax 0: all codes 0), plus sx = dx * sum(q).
 * A weight block with codes c and map w = d * c + k then contributes
 *     d * dx * sum(c q)  +  k * sx
 * where sum(c q) is exact in int32. Q4 codes are the unsigned nibbles (Q4_0's k = -8 d);
 * Q8_0 / int8 codes are signed, so |c| meets q * sign(c) (vpdpbusd multiplies unsigned by
 * signed bytes). The result is the dequantized weights' product with the rounded activations
 * (dx * q) up to float32 rounding; each activation moves by at most dx / 2.
 */
static void quantize_rows(const bf16 *x, int rows, int in, int8_t *q, float *dx, float *sx,
                          int32_t *isum) {
    const int nb = in / QK;
    for (int r = 0; r < rows; r++) {
        for (int b = 0; b < nb; b++) {
            const bf16 *xb = x + (size_t)r * in + (size_t)b * QK;
            int8_t *qb = q + (size_t)r * in + (size_t)b * QK;
            float amax = 0.0f;
            int sum = 0;
#ifdef TF_QUANT_SIMD
            const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)xb)), 16));
            const __m512 hi = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(xb + 16))), 16));
            amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
            const __m512 id = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
            const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, id));   /* nearest even */
            const __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, id));
            _mm_storeu_si128((__m128i *)qb, _mm512_cvtepi32_epi8(qlo));
            _mm_storeu_si128((__m128i *)(qb + 16), _mm512_cvtepi32_epi8(qhi));
            sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
#else
            for (int j = 0; j < QK; j++) {
                const float a = fabsf(from_bf16(xb[j]));
                amax = a > amax ? a : amax;
            }
            const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
            for (int j = 0; j < QK; j++) {
                qb[j] = (int8_t)rintf(from_bf16(xb[j]) * id);   /* nearest even, as above */
                sum += qb[j];
            }
#endif
            const float d = amax / 127.0f;
            dx[(size_t)r * nb + b] = d;
            sx[(size_t)r * nb + b] = d * (float)sum;
            if (isum) isum[(size_t)r * nb + b] = sum;
        }
    }
}

#if defined(TF_QUANT_SIMD) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define TF_QUANT_VNNI 1
/* One block of one weight row against MM activation rows: acc[m] += d dx cvt(dot), and
 * (Q4 kinds) kacc[m] += k sx, all lanes alike. 256-bit vectors: on Zen 4 a 512-bit op costs
 * two 256-bit ones, so one block a vector loses nothing and needs no lane shuffles. */
static inline __attribute__((always_inline)) void block_i8(
        int kind, const uint8_t *blk, int b, int nb, const int8_t *q, int in, const float *dx,
        const float *sx, const int MM, __m256 *acc, __m256 *kacc) {
    __m256i w, ws = _mm256_setzero_si256();
    __m256 dv = _mm256_set1_ps(1.0f), kv = _mm256_setzero_ps();
    if (kind == TF_Q4_1 || kind == TF_Q4_0) {
        const __m128i qs = _mm_loadu_si128((const __m128i *)(blk + (kind == TF_Q4_1 ? 4 : 2)));
        w = _mm256_and_si256(_mm256_inserti128_si256(_mm256_castsi128_si256(qs),
                                                     _mm_srli_epi16(qs, 4), 1),
                             _mm256_set1_epi8(0x0F));
    } else {
        ws = _mm256_loadu_si256((const __m256i *)(blk + (kind == TF_Q8_0 ? 2 : 0)));
        w = _mm256_abs_epi8(ws);
    }
    if (kind != TF_INT8) {
        uint16_t h;
        memcpy(&h, blk, 2);
        dv = _mm256_cvtph_ps(_mm_set1_epi16((short)h));
    }
    if (kind == TF_Q4_1) {
        uint16_t h;
        memcpy(&h, blk + 2, 2);
        kv = _mm256_cvtph_ps(_mm_set1_epi16((short)h));
    } else if (kind == TF_Q4_0) {
        kv = _mm256_mul_ps(dv, _mm256_set1_ps(-8.0f));
    }
    for (int m = 0; m < MM; m++) {
        __m256i y = _mm256_loadu_si256((const __m256i *)(q + (size_t)m * in + (size_t)b * QK));
        if (kind == TF_Q8_0 || kind == TF_INT8) y = _mm256_sign_epi8(y, ws);
        const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, y);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p),
                                 _mm256_mul_ps(dv, _mm256_set1_ps(dx[(size_t)m * nb + b])), acc[m]);
        if (kind == TF_Q4_1 || kind == TF_Q4_0)
            kacc[m] = _mm256_fmadd_ps(kv, _mm256_set1_ps(sx[(size_t)m * nb + b]), kacc[m]);
    }
}

static inline float hsum256(__m256 v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

/* One weight row against MM (<= 4, a constant after inlining) quantized activation rows. Even
 * and odd blocks go to separate accumulators (two dependency chains per row). */
static inline __attribute__((always_inline)) void row_dot_i8(
        int kind, const uint8_t *wrow, int nb, const int8_t *q, int in, const float *dx,
        const float *sx, const int MM, float *s) {
    __m256 a0[4], a1[4], k0[4], k1[4];
    for (int m = 0; m < MM; m++)
        a0[m] = a1[m] = k0[m] = k1[m] = _mm256_setzero_ps();
    const int bb = block_bytes[kind];
    int b = 0;
    for (; b + 1 < nb; b += 2) {
        block_i8(kind, wrow + (size_t)b * bb, b, nb, q, in, dx, sx, MM, a0, k0);
        block_i8(kind, wrow + (size_t)(b + 1) * bb, b + 1, nb, q, in, dx, sx, MM, a1, k1);
    }
    if (b < nb) block_i8(kind, wrow + (size_t)b * bb, b, nb, q, in, dx, sx, MM, a0, k0);
    for (int m = 0; m < MM; m++)
        s[m] = hsum256(_mm256_add_ps(a0[m], a1[m]))
             + _mm256_cvtss_f32(_mm256_add_ps(k0[m], k1[m]));
}
#else
/* Portable: the same integer sums and float terms, one block at a time. */
static void row_dot_i8(int kind, const uint8_t *wrow, int nb, const int8_t *q, int in,
                       const float *dx, const float *sx, const int MM, float *s) {
    const int bb = block_bytes[kind];
    for (int m = 0; m < MM; m++) {
        float acc = 0.0f;
        for (int b = 0; b < nb; b++) {
            const uint8_t *blk = wrow + (size_t)b * bb;
            const int8_t *qb = q + (size_t)m * in + (size_t)b * QK;
            int32_t dot = 0;
            if (kind == TF_Q4_0 || kind == TF_Q4_1) {
                const uint8_t *qs = blk + (kind == TF_Q4_0 ? 2 : 4);
                for (int j = 0; j < 16; j++)
                    dot += (qs[j] & 0x0F) * qb[j] + (qs[j] >> 4) * qb[j + 16];
            } else {
                const int8_t *c = (const int8_t *)(kind == TF_Q8_0 ? blk + 2 : blk);
                for (int j = 0; j < QK; j++) dot += c[j] * qb[j];
            }
            float d, k;
            block_affine(kind, blk, &d, &k);
            if (kind == TF_Q4_0) k = -8.0f * d;
            acc += d * dx[(size_t)m * nb + b] * (float)dot + k * sx[(size_t)m * nb + b];
        }
        s[m] = acc;
    }
}
#endif

/* Body run by every thread: quantize the activations privately, then share out the rows. */
static inline __attribute__((always_inline)) void qlinear_i8_body(
        const int kind, const void *w, const float *scales, const bf16 *x, float *y, int rows,
        int out, int in) {
    const int nb = in / QK;
    const size_t row_bytes = kind == TF_INT8 ? (size_t)in : (size_t)nb * block_bytes[kind];
    /* per thread: codes (rows, in), then dx and sx (rows, nb) each */
    int8_t *q = malloc((size_t)rows * in + 2 * sizeof(float) * (size_t)rows * nb + 64);
    const int ok = q != NULL;
    float *dx = ok ? (float *)(q + ((size_t)rows * in + 63) / 64 * 64) : NULL;
    float *sx = ok ? dx + (size_t)rows * nb : NULL;
    if (ok) quantize_rows(x, rows, in, q, dx, sx, NULL);
#pragma omp for schedule(static)
    for (int n = 0; n < out; n++) {
        if (!ok) continue;
        const uint8_t *wrow = (const uint8_t *)w + (size_t)n * row_bytes;
        const float sn = kind == TF_INT8 ? scales[n] : 1.0f;
        for (int m0 = 0; m0 < rows; m0 += 4) {   /* > 4 rows: the weight row again, from L1 */
            const int mm = rows - m0 < 4 ? rows - m0 : 4;
            const int8_t *qr = q + (size_t)m0 * in;
            const float *dr = dx + (size_t)m0 * nb, *sr = sx + (size_t)m0 * nb;
            float s[4];
            switch (mm) {
                case 1: row_dot_i8(kind, wrow, nb, qr, in, dr, sr, 1, s); break;
                case 2: row_dot_i8(kind, wrow, nb, qr, in, dr, sr, 2, s); break;
                case 3: row_dot_i8(kind, wrow, nb, qr, in, dr, sr, 3, s); break;
                default: row_dot_i8(kind, wrow, nb, qr, in, dr, sr, 4, s); break;
            }
            for (int m = 0; m < mm; m++) y[(size_t)(m0 + m) * out + n] = s[m] * sn;
        }
    }
    free(q);
}

/* The body with ``kind`` a constant in each copy (no kind tests left in the inner loop). */
static void qlinear_i8_team(int kind, const void *w, const float *scales, const bf16 *x,
                            float *y, int rows, int out, int in) {
    switch (kind) {
        case TF_Q8_0: qlinear_i8_body(TF_Q8_0, w, scales, x, y, rows, out, in); break;
        case TF_Q4_0: qlinear_i8_body(TF_Q4_0, w, scales, x, y, rows, out, in); break;
        case TF_Q4_1: qlinear_i8_body(TF_Q4_1, w, scales, x, y, rows, out, in); break;
        default: qlinear_i8_body(TF_INT8, w, scales, x, y, rows, out, in); break;
    }
}

int tf_qgemm(int kind, const void *packed, const uint16_t *x, int rows, int out, int in,
             const uint16_t *bias, uint16_t *y_bf16, float *y_f32);

static void qlinear(int kind, int exact, const void *w, const float *scales, const uint16_t *x,
                    float *y, int rows, int out, int in) {
    if (rows <= 0 || out <= 0 || in <= 0 || in % QK) return;   /* checked by the callers */
    /* GGUF kinds with a packed copy (passed where int8 passes its scales): the GEMM kernel,
     * same numbers, ~3x fewer instructions a block (see "Prefill GEMM" below). Inside a
     * parallel region a failure (no memory) cannot fall back: the team is already split. */
    if (!exact && kind != TF_INT8 && scales
        && (tf_qgemm(kind, scales, x, rows, out, in, NULL, NULL, y) == 0 || omp_in_parallel()))
        return;
    if (omp_in_parallel()) {
        if (exact) qlinear_team(kind, w, scales, x, y, rows, out, in);
        else qlinear_i8_team(kind, w, scales, x, y, rows, out, in);
    } else {
#pragma omp parallel
        {
            if (exact) qlinear_team(kind, w, scales, x, y, rows, out, in);
            else qlinear_i8_team(kind, w, scales, x, y, rows, out, in);
        }
    }
}

/* The fixed interface (y (rows, out) = x (rows, in) @ W^T; ``in`` a multiple of 32): the
 * int8-activation kernels, which the native decode step runs. ``scales_or_null``: int8's
 * per-row scales; for the GGUF kinds NULL (the blocks as stored, the decode kernel) or the
 * weight's copy packed by tf_qpack (the GEMM kernel, same arithmetic). */
void tf_qlinear_q8_0(const void *w, const float *scales_or_null, const uint16_t *x_bf16,
                     float *y, int rows, int out, int in) {
    qlinear(TF_Q8_0, 0, w, scales_or_null, x_bf16, y, rows, out, in);
}

void tf_qlinear_q4_0(const void *w, const float *scales_or_null, const uint16_t *x_bf16,
                     float *y, int rows, int out, int in) {
    qlinear(TF_Q4_0, 0, w, scales_or_null, x_bf16, y, rows, out, in);
}

void tf_qlinear_q4_1(const void *w, const float *scales_or_null, const uint16_t *x_bf16,
                     float *y, int rows, int out, int in) {
    qlinear(TF_Q4_1, 0, w, scales_or_null, x_bf16, y, rows, out, in);
}

void tf_qlinear_int8(const void *w, const float *scales_or_null, const uint16_t *x_bf16,
                     float *y, int rows, int out, int in) {
    qlinear(TF_INT8, 0, w, scales_or_null, x_bf16, y, rows, out, in);
}

/* The same product with the activations unrounded (bfloat16 dot products, see the file
 * comment): for float32 models, which pass x as two bfloat16 halves. ``kind``: 0 q8_0,
 * 1 q4_0, 2 q4_1, 3 int8. */
void tf_qlinear_exact(int kind, const void *w, const float *scales_or_null,
                      const uint16_t *x_bf16, float *y, int rows, int out, int in) {
    if (kind < 0 || kind > TF_INT8) return;
    qlinear(kind, 1, w, scales_or_null, x_bf16, y, rows, out, in);
}

/* Which instruction set the kernels were built for: 2 AVX-512 VNNI (int8 dot products) and
 * BF16, 1 AVX-512 BF16 without VNNI (int8 path portable), 0 portable C only. */
int tf_qlinear_isa(void) {
#if defined(TF_QUANT_VNNI)
    return 2;
#elif defined(TF_QUANT_SIMD)
    return 1;
#else
    return 0;
#endif
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
#ifdef TF_QUANT_SIMD
        if (kind != TF_INT8) {   /* codes -> float -> d * c + k -> bfloat16, 32 at a time */
            const __m512i table = _mm512_load_si512(kind == TF_Q4_0 ? Q4_0_CODES : Q4_1_CODES);
            for (int b = 0; b < nb; b++) {
                const uint8_t *blk = wrow + (size_t)b * block_bytes[kind];
                float d, k;
                block_affine(kind, blk, &d, &k);
                const __m512i c = kind == TF_Q4_1 ? q4_codes(blk + 4, table)
                                : kind == TF_Q4_0 ? q4_codes(blk + 2, table) : s8_codes(blk + 2);
                const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm512_castsi512_si256(c)), 16));
                const __m512 hi = _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(c, 1)), 16));
                const __m512 dv = _mm512_set1_ps(d), kv = _mm512_set1_ps(k);
                /* d * c, then + k: rounded as gguf.quants and the scalar loop round */
                const __m512bh out = _mm512_cvtne2ps_pbh(_mm512_add_ps(_mm512_mul_ps(hi, dv), kv),
                                                         _mm512_add_ps(_mm512_mul_ps(lo, dv), kv));
                _mm512_storeu_si512(o + b * QK, (__m512i)out);
            }
            continue;
        }
#endif
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

/* ------------------------------------------------------------------------------------------
 * Prefill GEMM on a packed copy of the blocks (tf_qpack, tf_qgemm).
 *
 * Why: above a few activation rows the decode kernel's layout (one block of one row a vector,
 * its 8 int32 lanes summed per block and row) spends as many instructions on the per-block
 * scale as on the products, and the previous path dequantized the whole weight to bfloat16
 * per call for oneDNN. Here the bytes are reordered once at load so that one 512-bit vector
 * holds 4 consecutive weights of 16 output rows (lane r = row r): a `vpdpbusd` against 4
 * activation codes broadcast to every lane advances 16 rows at once, 8 of them finish a block
 * for 16 rows, and the block's float work (convert, d * dx multiply-add, Q4_1's m * sx) is
 * once per 16 rows and activation row instead of once per row. The same unpacked weight
 * vectors serve up to GEMM_MR activation rows from registers; a group of 16 rows (at most a
 * few KB a block row) stays in L1 while every activation tile passes over it.
 *
 * Same arithmetic as the decode kernel: activations rounded to int8 per block of 32 (scale
 * amax / 127), exact integer sums per block, d * dx (and Q4_1's m * sx) in float32. Q4_0's
 * -8 and Q8_0's +128 offsets (Q8_0 codes are stored biased to unsigned, as vpdpbusd wants)
 * are taken out in integer arithmetic (minus offset * sum of the activation codes), so all
 * three kinds give the same numbers as the decode kernel up to float32 summation order.
 *
 * Packed layout, per group of 16 output rows (out % 16 == 0), per block b of 32 values:
 *   d[16] fp16 | Q4_1 only: m[16] fp16 | quants
 *   Q4_0/Q4_1 quants: 4 vectors of 64 bytes; vector j, lane r = row r's stored bytes
 *     qs[4j .. 4j+3] (low nibbles: values 4j.., high nibbles: values 16+4j..);
 *   Q8_0 quants: 8 vectors; vector j, lane r = row r's q[4j .. 4j+3] + 128 (unsigned).
 * The same number of bytes as the stored blocks.
 */
enum { GEMM_ROWS = 16, GEMM_MR = 8, GEMM_MC = 256 };

static int packed_block_bytes(int kind) {
    switch (kind) {
        case TF_Q4_0: return GEMM_ROWS * 18;
        case TF_Q4_1: return GEMM_ROWS * 20;
        case TF_Q8_0: return GEMM_ROWS * 34;
        default: return 0;
    }
}

/* Reorder a (out, in) weight of GGUF blocks into the packed layout above (``dst``: as many
 * bytes as ``w``). Returns 0, or -1 for an unsupported kind or shape. */
int tf_qpack(int kind, const void *w, int out, int in, void *dst) {
    const int pb = packed_block_bytes(kind);
    if (!pb || out <= 0 || out % GEMM_ROWS || in <= 0 || in % QK) return -1;
    const int nb = in / QK, bb = block_bytes[kind];
    const int qoff = kind == TF_Q4_1 ? 4 : 2;               /* quants in a stored block */
    const int poff = kind == TF_Q4_1 ? 64 : 32;             /* quants in a packed block */
    const int qbytes = kind == TF_Q8_0 ? 32 : 16;
#pragma omp parallel for schedule(static) if ((int64_t)out * in > 65536)
    for (int g = 0; g < out / GEMM_ROWS; g++) {
        for (int b = 0; b < nb; b++) {
            uint8_t *p = (uint8_t *)dst + ((size_t)g * nb + b) * pb;
            for (int r = 0; r < GEMM_ROWS; r++) {
                const uint8_t *blk = (const uint8_t *)w
                    + ((size_t)(g * GEMM_ROWS + r) * nb + b) * bb;
                memcpy(p + 2 * r, blk, 2);                                  /* d */
                if (kind == TF_Q4_1) memcpy(p + 32 + 2 * r, blk + 2, 2);    /* m */
                for (int j = 0; j < qbytes / 4; j++)
                    for (int t = 0; t < 4; t++) {
                        const uint8_t v = blk[qoff + 4 * j + t];
                        p[poff + 64 * j + 4 * r + t] = kind == TF_Q8_0 ? (uint8_t)(v ^ 0x80u) : v;
                    }
            }
        }
    }
    return 0;
}

#if defined(TF_QUANT_VNNI)
/* One group of 16 weight rows against MR (<= GEMM_MR, a constant after inlining) activation
 * rows: acc[m] = the 16 outputs of activation row m. */
static inline __attribute__((always_inline)) void gemm_tile(
        const int kind, const uint8_t *pg, int nb, const int8_t *q, int in, const float *dx,
        const float *sx, const int32_t *isum, const int MR, __m512 *acc) {
    const int pb = packed_block_bytes(kind);
    for (int m = 0; m < MR; m++) acc[m] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = pg + (size_t)b * pb;
        const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk));
        __m512 mv = _mm512_setzero_ps();
        __m512i w[8];
        if (kind == TF_Q8_0) {
            for (int j = 0; j < 8; j++) w[j] = _mm512_loadu_si512(blk + 32 + 64 * j);
        } else {
            const uint8_t *qs = blk + (kind == TF_Q4_1 ? 64 : 32);
            const __m512i low = _mm512_set1_epi8(0x0F);
            for (int j = 0; j < 4; j++) {
                const __m512i v = _mm512_loadu_si512(qs + 64 * j);
                w[j] = _mm512_and_si512(v, low);
                w[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            }
            if (kind == TF_Q4_1)
                mv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 32)));
        }
        for (int m = 0; m < MR; m++) {
            const int8_t *xq = q + (size_t)m * in + (size_t)b * QK;
            __m512i ia = _mm512_setzero_si512();
            for (int j = 0; j < 8; j++) {
                int32_t x4;
                memcpy(&x4, xq + 4 * j, 4);
                ia = _mm512_dpbusd_epi32(ia, w[j], _mm512_set1_epi32(x4));
            }
            const size_t mb = (size_t)m * nb + b;
            if (kind == TF_Q8_0) ia = _mm512_sub_epi32(ia, _mm512_set1_epi32(128 * isum[mb]));
            if (kind == TF_Q4_0) ia = _mm512_sub_epi32(ia, _mm512_set1_epi32(8 * isum[mb]));
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia),
                                     _mm512_mul_ps(dv, _mm512_set1_ps(dx[mb])), acc[m]);
            if (kind == TF_Q4_1) acc[m] = _mm512_fmadd_ps(mv, _mm512_set1_ps(sx[mb]), acc[m]);
        }
    }
}

/* Rows [m0, m0 + mr) of the output for weight group g; bias added, stored as bfloat16 or
 * float32. */
static inline __attribute__((always_inline)) void gemm_group(
        const int kind, const uint8_t *packed, int g, int nb, const int8_t *q, int in,
        const float *dx, const float *sx, const int32_t *isum, int m0, int mr, int out,
        const bf16 *bias, bf16 *y16, float *y32) {
    const uint8_t *pg = packed + (size_t)g * nb * packed_block_bytes(kind);
    const __m512 bv = bias ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
        _mm256_loadu_si256((const __m256i *)(bias + g * GEMM_ROWS))), 16)) : _mm512_setzero_ps();
    for (int t = m0; t < m0 + mr; t += GEMM_MR) {
        const int n = m0 + mr - t < GEMM_MR ? m0 + mr - t : GEMM_MR;
        const int8_t *qt = q + (size_t)t * in;
        const float *dt = dx + (size_t)t * nb, *st = sx + (size_t)t * nb;
        const int32_t *it = isum + (size_t)t * nb;
        __m512 acc[GEMM_MR];
        switch (n) {
            case 1: gemm_tile(kind, pg, nb, qt, in, dt, st, it, 1, acc); break;
            case 2: gemm_tile(kind, pg, nb, qt, in, dt, st, it, 2, acc); break;
            case 3: gemm_tile(kind, pg, nb, qt, in, dt, st, it, 3, acc); break;
            case 4: gemm_tile(kind, pg, nb, qt, in, dt, st, it, 4, acc); break;
            case 5: gemm_tile(kind, pg, nb, qt, in, dt, st, it, 5, acc); break;
            case 6: gemm_tile(kind, pg, nb, qt, in, dt, st, it, 6, acc); break;
            case 7: gemm_tile(kind, pg, nb, qt, in, dt, st, it, 7, acc); break;
            default: gemm_tile(kind, pg, nb, qt, in, dt, st, it, GEMM_MR, acc); break;
        }
        for (int m = 0; m < n; m++) {
            const __m512 v = _mm512_add_ps(acc[m], bv);
            const size_t o = (size_t)(t + m) * out + (size_t)g * GEMM_ROWS;
            if (y16) _mm256_storeu_si256((__m256i *)(y16 + o), (__m256i)_mm512_cvtneps_pbh(v));
            else _mm512_storeu_ps(y32 + o, v);
        }
    }
}

static void gemm_team(const int kind, const uint8_t *packed, const int8_t *q, int rows, int in,
                      const float *dx, const float *sx, const int32_t *isum, int out,
                      const bf16 *bias, bf16 *y16, float *y32) {
    const int nb = in / QK, groups = out / GEMM_ROWS;
    /* activation rows in chunks that stay in L2 while every weight group passes over them */
    for (int m0 = 0; m0 < rows; m0 += GEMM_MC) {
        const int mr = rows - m0 < GEMM_MC ? rows - m0 : GEMM_MC;
#pragma omp for schedule(static)
        for (int g = 0; g < groups; g++)
            if (q) gemm_group(kind, packed, g, nb, q, in, dx, sx, isum, m0, mr, out, bias, y16,
                              y32);
    }
}
#endif

#if defined(TF_QUANT_VNNI)
/* The activation codes and per-block terms of ``rows`` rows: one allocation, NULL if none. */
static int8_t *gemm_quant_alloc(int rows, int in, float **dx, float **sx, int32_t **isum) {
    const int nb = in / QK;
    const size_t qbytes = ((size_t)rows * in + 63) / 64 * 64;
    int8_t *q = malloc(qbytes + (2 * sizeof(float) + sizeof(int32_t)) * (size_t)rows * nb);
    if (!q) return NULL;
    *dx = (float *)(q + qbytes);
    *sx = *dx + (size_t)rows * nb;
    *isum = (int32_t *)(*sx + (size_t)rows * nb);
    return q;
}

static void gemm_kind(int kind, const uint8_t *w, const int8_t *q, int rows, int in,
                      const float *dx, const float *sx, const int32_t *isum, int out,
                      const bf16 *bias, bf16 *y16, float *y32) {
    switch (kind) {   /* the kind a constant in each copy */
        case TF_Q8_0: gemm_team(TF_Q8_0, w, q, rows, in, dx, sx, isum, out, bias, y16, y32); break;
        case TF_Q4_0: gemm_team(TF_Q4_0, w, q, rows, in, dx, sx, isum, out, bias, y16, y32); break;
        default: gemm_team(TF_Q4_1, w, q, rows, in, dx, sx, isum, out, bias, y16, y32); break;
    }
}
#endif

/* y (rows, out) = x (rows, in) @ W^T (+ bias) for W packed by tf_qpack: activations rounded
 * to int8 per block as the decode kernel rounds them (see above). Output bfloat16 ``y_bf16``
 * or, when that is NULL, float32 ``y_f32``; ``bias``: bfloat16 (out,) or NULL. Called outside
 * a parallel region it opens one (the rows are quantized once, shared); from inside one
 * (the native decode step) every thread of the team must call it, each quantizes the rows
 * privately and the weight groups are shared out. Returns 0, or -1 where unsupported (a kind
 * or shape tf_qpack refuses, a build without AVX-512 VNNI, no memory): the caller then takes
 * another path. */
int tf_qgemm(int kind, const void *packed, const uint16_t *x, int rows, int out, int in,
             const uint16_t *bias, uint16_t *y_bf16, float *y_f32) {
    if (!packed_block_bytes(kind) || rows <= 0 || out <= 0 || out % GEMM_ROWS || in <= 0
        || in % QK || (!y_bf16 && !y_f32))
        return -1;
#if defined(TF_QUANT_VNNI)
    const int nb = in / QK;
    float *dx, *sx;
    int32_t *isum;
    if (omp_in_parallel()) {
        int8_t *q = gemm_quant_alloc(rows, in, &dx, &sx, &isum);
        const int ok = q != NULL;
        if (ok) quantize_rows(x, rows, in, q, dx, sx, isum);
        /* a thread without memory still meets every work-sharing loop (the team waits at
         * their ends), skipping its share, as the decode kernel does */
        gemm_kind(kind, packed, q, rows, in, dx, sx, isum, out, bias, y_bf16, y_f32);
        free(q);
        return ok ? 0 : -1;
    }
    int8_t *q = gemm_quant_alloc(rows, in, &dx, &sx, &isum);
    if (!q) return -1;
#pragma omp parallel if ((int64_t)rows * out * in > (1 << 20))
    {
#pragma omp for schedule(static)
        for (int r = 0; r < rows; r++)
            quantize_rows(x + (size_t)r * in, 1, in, q + (size_t)r * in, dx + (size_t)r * nb,
                          sx + (size_t)r * nb, isum + (size_t)r * nb);
        gemm_kind(kind, packed, q, rows, in, dx, sx, isum, out, bias, y_bf16, y_f32);
    }
    free(q);
    return 0;
#else
    (void)x; (void)bias; (void)packed;
    return -1;
#endif
}
