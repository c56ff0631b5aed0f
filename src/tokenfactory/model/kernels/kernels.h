/* Shared by the native kernels: the bfloat16 type, conversions, and the pieces one kernel
 * file uses from another (all built into one library, see __init__.py). */
#ifndef TOKENFACTORY_KERNELS_H
#define TOKENFACTORY_KERNELS_H

#include <stdint.h>
#include <string.h>

typedef uint16_t bf16;

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

/* attention.c: decode attention, one (sequence, KV head) task; and its argument checks. */
int tf_attention_supported(int head_dim);
int tf_decode_check(int b, int H, int Hkv, int D, int bs, int64_t num_pages,
                    const int64_t *positions);
int tf_decode_task(int task, const bf16 *q, int64_t q_stride, const bf16 *k_cache,
                   const bf16 *v_cache, int64_t num_blocks, int bs, const int64_t *tables,
                   int64_t table_stride, const int64_t *positions, int H, int Hkv, int D,
                   int window, float scale, bf16 *out, int64_t out_stride, float **s_buf,
                   int64_t *s_cap);

#endif
