/* Small-batch bfloat16 linear layer (y = x W^T + b) for x86-64 CPUs with AVX-512 BF16.
 *
 * Why it exists: a decode step at batch 1-8 is a stream over every weight byte, so a linear
 * layer should run at memory bandwidth. oneDNN's bfloat16 GEMM reaches 15-25 GB/s here for one
 * activation row, plain or pre-packed; this kernel reads each weight row once, front to back,
 * and reaches the bandwidth of a bare AVX-512 read of the same bytes (measured on the 2-core Zen
 * 4: a 178 MB chain of layers in 4.9 ms = 36 GB/s from huge-page memory, where oneDNN took 10-11
 * ms). Rows are read whole and in order because reading a few rows side by side (several short
 * streams) cut the hardware prefetcher's effect and the bandwidth by half in our measurements.
 *
 * Layout: x is (M, K) with a row stride, W is (N, K) contiguous (nn.Linear's layout, so the
 * same tensor serves torch's GEMM for large batches), bias is (N,) or NULL, out is (M, N) with a
 * row stride. Products of bfloat16 pairs accumulate in float32 (vdpbf16ps); each output is
 * rounded to bfloat16 once, after the bias is added. Output rows are split over OpenMP threads.
 */
#include <immintrin.h>

#include "kernels.h"

/* One weight row against MM (a compile-time constant, so the accumulators live in registers)
 * activation rows. Two accumulators per activation row halve the dependency chain. */
#define ROW_DOT(MM)                                                                          \
    static inline void row_dot##MM(const bf16 *wp, const bf16 *x, int64_t xs, int K,       \
                                   float *s) {                                               \
        __m512 a[MM], b[MM];                                                                 \
        for (int m = 0; m < MM; m++) {                                                       \
            a[m] = _mm512_setzero_ps();                                                      \
            b[m] = _mm512_setzero_ps();                                                      \
        }                                                                                    \
        int k = 0;                                                                           \
        for (; k + 64 <= K; k += 64) {                                                       \
            __m512bh w0 = (__m512bh)_mm512_loadu_si512(wp + k);                              \
            __m512bh w1 = (__m512bh)_mm512_loadu_si512(wp + k + 32);                         \
            for (int m = 0; m < MM; m++) {                                                   \
                a[m] = _mm512_dpbf16_ps(a[m], w0, (__m512bh)_mm512_loadu_si512(x + m * xs + k)); \
                b[m] = _mm512_dpbf16_ps(b[m], w1,                                            \
                                        (__m512bh)_mm512_loadu_si512(x + m * xs + k + 32));  \
            }                                                                                \
        }                                                                                    \
        if (k < K) { /* K % 64 == 32 */                                                      \
            __m512bh w0 = (__m512bh)_mm512_loadu_si512(wp + k);                              \
            for (int m = 0; m < MM; m++)                                                     \
                a[m] = _mm512_dpbf16_ps(a[m], w0, (__m512bh)_mm512_loadu_si512(x + m * xs + k)); \
        }                                                                                    \
        for (int m = 0; m < MM; m++) s[m] = _mm512_reduce_add_ps(_mm512_add_ps(a[m], b[m])); \
    }

ROW_DOT(1)
ROW_DOT(2)
ROW_DOT(3)
ROW_DOT(4)

int tf_linear_supported(int in_features) { return in_features > 0 && in_features % 32 == 0; }

void tf_linear_rows(const bf16 *x, int64_t x_stride, int M, const bf16 *w, int N, int K,
                    const bf16 *bias, bf16 *out, int64_t out_stride) {
    tf_linear_rows_to(x, x_stride, M, w, N, K, bias, out, NULL, out_stride);
}

/* As tf_linear_rows; with ``out_f32`` (and out NULL) each output is stored as the float32 sum,
 * never rounded to bfloat16: logits. Rounded to bfloat16, logits of ~25 move in steps of 0.125,
 * so near-ties become exact ties and greedy picks whichever id is lower (seen on SmolLM2: "The"
 * vs "L" for "What is the capital of France?", 0.08 apart in float32). */
void tf_linear_rows_to(const bf16 *x, int64_t x_stride, int M, const bf16 *w, int N, int K,
                       const bf16 *bias, bf16 *out, float *out_f32, int64_t out_stride) {
#pragma omp for schedule(static)
    for (int n = 0; n < N; n++) {
        const bf16 *wp = w + (int64_t)n * K;
        const float bn = bias ? from_bf16(bias[n]) : 0.0f;
        for (int m0 = 0; m0 < M; m0 += 4) {   /* more than 4 rows: the row comes from L1 again */
            float s[4];
            const int mm = M - m0 < 4 ? M - m0 : 4;
            const bf16 *xp = x + m0 * x_stride;
            switch (mm) {
                case 1: row_dot1(wp, xp, x_stride, K, s); break;
                case 2: row_dot2(wp, xp, x_stride, K, s); break;
                case 3: row_dot3(wp, xp, x_stride, K, s); break;
                default: row_dot4(wp, xp, x_stride, K, s); break;
            }
            for (int m = 0; m < mm; m++) {
                if (out_f32) out_f32[(m0 + m) * out_stride + n] = s[m] + bn;
                else out[(m0 + m) * out_stride + n] = to_bf16(s[m] + bn);
            }
        }
    }
}

/* Returns 0, or -1 for shapes the kernel does not handle (K not a multiple of 32). */
int tf_linear(const bf16 *x, int64_t x_stride, int M, const bf16 *w, int N, int K,
              const bf16 *bias, bf16 *out, int64_t out_stride) {
    if (!tf_linear_supported(K) || M < 0 || N < 0) return -1;
#pragma omp parallel
    tf_linear_rows(x, x_stride, M, w, N, K, bias, out, out_stride);
    return 0;
}

/* x @ w.T into float32 ``out`` (M, N), unrounded: the logits of prefill chunks, so they agree
 * with the native decode step's. Returns 0, or -1 for shapes the kernel does not handle. */
int tf_linear_f32(const bf16 *x, int64_t x_stride, int M, const bf16 *w, int N, int K,
                  float *out, int64_t out_stride) {
    if (!tf_linear_supported(K) || M < 0 || N < 0) return -1;
#pragma omp parallel
    tf_linear_rows_to(x, x_stride, M, w, N, K, NULL, NULL, out, out_stride);
    return 0;
}
