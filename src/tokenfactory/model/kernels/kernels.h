/* Shared by the native kernels: the bfloat16 type, conversions, and the pieces one kernel
 * file uses from another (all built into one library, see __init__.py). */
#ifndef TOKENFACTORY_KERNELS_H
#define TOKENFACTORY_KERNELS_H

#include <stdint.h>
#include <string.h>

typedef uint16_t bf16;

#ifdef __AVX512F__
#include <immintrin.h>
/* The sums of 16 float32 vectors at once: lane i of the result is v[i]'s horizontal sum,
 * added by the very tree _mm512_reduce_add_ps uses (lanes i + i+8, then + i+4, + i+2, + i+1;
 * float addition commutes exactly), so a kernel that reduces 16 dot products together gets
 * bit for bit the sums of reducing each alone, in ~3 instructions per sum instead of ~8.
 * Unused inputs may be zero vectors. */
static inline __m512 reduce16(const __m512 v[16]) {
    __m512 t[8], u[4], w[2];
    for (int j = 0; j < 8; j++)   /* [v2j lanes 0..7 + 8..15 | v2j+1 likewise] */
        t[j] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int j = 0; j < 4; j++)   /* 128-bit lane e: v4j+e's 4 partial sums (lanes i + i+4) */
        u[j] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * j], t[2 * j + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(t[2 * j], t[2 * j + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int j = 0; j < 2; j++)   /* lane e: [v(2j)*4+e: i + i+2 (2 sums), v(2j+1)*4+e: same] */
        w[j] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * j], u[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(u[2 * j], u[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    /* lane e: [v e, v 4+e, v 8+e, v 12+e]: result lane 4e + c holds v(4c + e); back in order */
    const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_permutexvar_ps(
        _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), r);
}
#endif

/* float -> bfloat16, round to nearest even; NaN stays NaN. */
static inline bf16 to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (bf16)((u >> 16) | 0x40u);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

static inline float from_bf16(bf16 h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* linear.c: out = x W^T + bias for M rows, as an orphaned `omp for` over output features:
 * call it from inside a parallel region (every thread), or through tf_linear. */
void tf_linear_rows(const bf16 *x, int64_t x_stride, int M, const bf16 *w, int N, int K,
                    const bf16 *bias, bf16 *out, int64_t out_stride);
void tf_linear_rows_to(const bf16 *x, int64_t x_stride, int M, const bf16 *w, int N, int K,
                       const bf16 *bias, bf16 *out, float *out_f32, int64_t out_stride);
int tf_linear_supported(int in_features);

/* A linear layer as a module describes it (model/linear_kernels.py): the weight format
 * (TF_KIND_*), pointers to the weight (and per-row float scales for int8), an optional bfloat16
 * bias (out,), and the shape (out, in). The quantized kinds are GGUF blocks as stored. */
enum { TF_KIND_BF16 = 0, TF_KIND_Q8_0 = 1, TF_KIND_Q4_0 = 2, TF_KIND_Q4_1 = 3, TF_KIND_INT8 = 4 };
typedef struct {
    int64_t kind;
    const void *weight;
    const float *scales;
    const bf16 *bias;
    int64_t out, in;
} tf_linear_desc;

/* linear.c: out = x W^T + bias for any kind, called by every thread of a parallel region
 * with the same arguments (work shared out; ends in a barrier). Into bfloat16 ``out`` or, when ``out`` is NULL, float32 ``out_f32``
 * (unrounded), rows ``out_stride`` apart. ``scratch``: M * L->out floats (quantized kinds). */
void tf_linear_any(const tf_linear_desc *L, const bf16 *x, int64_t x_stride, int M, bf16 *out,
                   float *out_f32, int64_t out_stride, float *scratch);
int tf_linear_kind_supported(int kind);
/* Row ``row`` of a (out, in) table of any kind as bfloat16 (embedding lookups). */
void tf_table_row(const tf_linear_desc *T, int64_t row, bf16 *dst);

/* attention.c: decode attention, one (sequence, KV head) task, or R rows of one sequence
 * (consecutive positions, one block table) for one KV head; and its argument checks. */
int tf_attention_supported(int head_dim);
int tf_decode_check(int b, int H, int Hkv, int D, int bs, int64_t num_pages,
                    const int64_t *positions);
int tf_decode_rows(int r0, int R, int h, const bf16 *q, int64_t q_stride, const bf16 *k_cache,
                   const bf16 *v_cache, int64_t num_blocks, int bs, const int64_t *table,
                   const int64_t *positions, int H, int Hkv, int D, int window, float scale,
                   bf16 *out, int64_t out_stride, float **s_buf, int64_t *s_cap);
int tf_decode_pieces(int B, int G, int Hkv, int bs, const int64_t *tables,
                     int64_t table_stride, const int64_t *positions, int *pieces);
int tf_decode_task(int task, const bf16 *q, int64_t q_stride, const bf16 *k_cache,
                   const bf16 *v_cache, int64_t num_blocks, int bs, const int64_t *tables,
                   int64_t table_stride, const int64_t *positions, int H, int Hkv, int D,
                   int window, float scale, bf16 *out, int64_t out_stride, float **s_buf,
                   int64_t *s_cap);

#endif
