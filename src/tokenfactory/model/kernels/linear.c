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
 *
 * 2-8 rows (a token and its drafts being verified, a small batch) used to cost ~0.3 of a
 * 1-row pass per extra row: with a load per vdpbf16ps and an 8-instruction reduction per
 * output the kernel ran at ~77 GFLOP/s (this core's vdpbf16ps peak is ~230). They now run
 * register tiles (3 weight rows x 2-4 activation rows) that load less and reduce 16 sums
 * together, with software prefetch in place of the stream the tiles break up (2-3 rows: one
 * weight row at a time, the sums reduced together). Measured on SmolLM2's native decode step
 * (30 layers + lm_head on huge pages, one core, 128-token context): 1 / 2 / 4 / 8 rows 10.0 /
 * 10.7 / 13.2 / 19.4 ms, where the old kernel took 2 rows 1.27x and 8 rows 3.45x of 1 row.
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

/* Weight rows per tile of the multi-row path: every TILE's NB divides it, so each group of
 * activation rows walks the same 12 weight rows (the later groups from L1/L2). */
#define NT 12
/* Several weight rows read side by side defeat the hardware prefetcher (measured: half the
 * bandwidth at 2 rows), so the first group of a tile fetches the weights PF_TILES tiles ahead
 * into L2, in address order (into L1 they evicted the tile in use: slower still). Measured on
 * SmolLM2's layers, one core: 8 rows 22 ms vs 28-30 without, 2 rows on par with row_dot. */
#define PF_TILES 2
/* Up to this many rows a weight row is read alone (tile_1xM, one stream, as row_dot1): on
 * SmolLM2 (huge pages, one core) 2 rows 10.7 ms / 3 rows 12.4 ms where the 3-row tiles took
 * 13.7 / 15.2 (1 row: 10.0); from 4 rows the tiles win (8 rows 19.4 ms vs 33). Two rows side
 * by side without prefetch were the slowest of all (28 ms at 4 rows). */
#define ONE_STREAM_MAX 3
#define PF_HINT _MM_HINT_T1

/* NB weight rows x MB activation rows at once (compile-time constants: the 2 NB MB
 * accumulators stay in registers). Each output keeps row_dot's two accumulators and its order
 * (chunks of 32 alternate between a and b; the sum is reduce(a + b)), and reduce16 adds like
 * _mm512_reduce_add_ps: every output is bit for bit what row_dot1 computes for that row alone,
 * whatever the tile. What the tile buys: one weight load feeds MB vdpbf16ps and one activation
 * load NB (row_dot: a load per vdpbf16ps), and 16 sums share one reduction (~3 instructions
 * each instead of ~8): at 2-8 rows the layer is no longer bound by loads and reductions.
 * s: NB * MB sums, s[n * MB + m]. */
#define TILE(NB, MB)                                                                         \
    static inline void tile_##NB##x##MB(const bf16 *w, int K, const bf16 *x, int64_t xs,   \
                                        const bf16 *pf, float *s) {                          \
        __m512 a[NB * MB], b[NB * MB];                                                       \
        for (int i = 0; i < NB * MB; i++) {                                                  \
            a[i] = _mm512_setzero_ps();                                                      \
            b[i] = _mm512_setzero_ps();                                                      \
        }                                                                                    \
        int k = 0;                                                                           \
        for (; k + 64 <= K; k += 64) {                                                       \
            __m512bh wv[NB];                                                                 \
            if (pf) /* the next rows' NB K weights, in address order, a part per step */     \
                for (int i = 0; i < 2 * NB; i++)                                             \
                    _mm_prefetch((const char *)(pf + (int64_t)k * NB + i * 32), PF_HINT);      \
            for (int n = 0; n < NB; n++)                                                     \
                wv[n] = (__m512bh)_mm512_loadu_si512(w + (int64_t)n * K + k);                \
            for (int m = 0; m < MB; m++) {                                                   \
                const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * xs + k);            \
                for (int n = 0; n < NB; n++)                                                 \
                    a[n * MB + m] = _mm512_dpbf16_ps(a[n * MB + m], wv[n], xv);              \
            }                                                                                \
            for (int n = 0; n < NB; n++)                                                     \
                wv[n] = (__m512bh)_mm512_loadu_si512(w + (int64_t)n * K + k + 32);           \
            for (int m = 0; m < MB; m++) {                                                   \
                const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * xs + k + 32);       \
                for (int n = 0; n < NB; n++)                                                 \
                    b[n * MB + m] = _mm512_dpbf16_ps(b[n * MB + m], wv[n], xv);              \
            }                                                                                \
        }                                                                                    \
        if (k < K) { /* K % 64 == 32 */                                                      \
            __m512bh wv[NB];                                                                 \
            for (int n = 0; n < NB; n++)                                                     \
                wv[n] = (__m512bh)_mm512_loadu_si512(w + (int64_t)n * K + k);                \
            for (int m = 0; m < MB; m++) {                                                   \
                const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * xs + k);            \
                for (int n = 0; n < NB; n++)                                                 \
                    a[n * MB + m] = _mm512_dpbf16_ps(a[n * MB + m], wv[n], xv);              \
            }                                                                                \
        }                                                                                    \
        __m512 v[16];                                                                        \
        for (int i = 0; i < 16; i++)                                                         \
            v[i] = i < NB * MB ? _mm512_add_ps(a[i], b[i]) : _mm512_setzero_ps();            \
        _mm512_storeu_ps(s, reduce16(v)); /* s has room for 16 */                            \
    }

TILE(3, 4)   /* 3 weight rows side by side: more streams read slower (6 rows: 2 rows took */
TILE(3, 3)   /* 1.3x the time of 1 row, 3 rows x 4 took 1.0x) */
TILE(3, 2)
TILE(1, 2)
TILE(1, 3)


int tf_linear_supported(int in_features) { return in_features > 0 && in_features % 32 == 0; }

void tf_linear_rows(const bf16 *x, int64_t x_stride, int M, const bf16 *w, int N, int K,
                    const bf16 *bias, bf16 *out, int64_t out_stride) {
    tf_linear_rows_to(x, x_stride, M, w, N, K, bias, out, NULL, out_stride);
}

static inline void store_out(float v, bf16 *out, float *out_f32, int64_t idx) {
    if (out_f32) out_f32[idx] = v;
    else out[idx] = to_bf16(v);
}

/* One weight row against all M activation rows, 4 at a time (row_dot). */
static inline void one_row(const bf16 *x, int64_t x_stride, int M, const bf16 *w, int n, int K,
                           const bf16 *bias, bf16 *out, float *out_f32, int64_t out_stride) {
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
        for (int m = 0; m < mm; m++) store_out(s[m] + bn, out, out_f32, (m0 + m) * out_stride + n);
    }
}

/* As tf_linear_rows; with ``out_f32`` (and out NULL) each output is stored as the float32 sum,
 * never rounded to bfloat16: logits. Rounded to bfloat16, logits of ~25 move in steps of 0.125,
 * so near-ties become exact ties and greedy picks whichever id is lower (seen on SmolLM2: "The"
 * vs "L" for "What is the capital of France?", 0.08 apart in float32).
 *
 * One row (a plain decode step) streams each weight row whole and in order (row_dot1: faster
 * for one row than the tiles, measured); so do 2-3 rows (tile_1xM, ONE_STREAM_MAX); 4+ rows
 * (a verified draft, a batch) run NT-row tiles of 3-row tile_3xMB calls, the activation rows
 * in groups of 4 / 3 / 2, weight rows past the last whole tile one by one. Both give every output the
 * same bits (see TILE), so a row's result never depends on how many rows share the step. */
void tf_linear_rows_to(const bf16 *x, int64_t x_stride, int M, const bf16 *w, int N, int K,
                       const bf16 *bias, bf16 *out, float *out_f32, int64_t out_stride) {
    if (M == 1) {
#pragma omp for schedule(static)
        for (int n = 0; n < N; n++) one_row(x, x_stride, 1, w, n, K, bias, out, out_f32, out_stride);
        return;
    }
    if (M <= ONE_STREAM_MAX) {
#pragma omp for schedule(static)
        for (int n = 0; n < N; n++) {
            const bf16 *wp = w + (int64_t)n * K;
            float s[16];
            if (M == 2) tile_1x2(wp, K, x, x_stride, NULL, s);
            else tile_1x3(wp, K, x, x_stride, NULL, s);
            const float bn = bias ? from_bf16(bias[n]) : 0.0f;
            for (int m = 0; m < M; m++) store_out(s[m] + bn, out, out_f32, m * out_stride + n);
        }
        return;
    }
    const int tiles = N / NT;
    int groups = 0;   /* activation row groups (below) */
    for (int m0 = 0; m0 < M; groups++) m0 += M - m0 == 5 ? 3 : M - m0 >= 4 ? 4 : M - m0;
#pragma omp for schedule(static) nowait
    for (int t = 0; t < tiles; t++) {
        const int n0 = t * NT;
        float s[NT * 4 + 16];
        for (int m0 = 0, g = 0; m0 < M; g++) {
            /* groups of 4, with a remainder of 1..3 split so no group is a lone row */
            const int left = M - m0;
            const int mb = left == 5 ? 3 : left >= 4 ? 4 : left;
            const bf16 *xp = x + m0 * x_stride;
            for (int nb = 0; nb < NT; nb += 3) {
                const bf16 *wp = w + (int64_t)(n0 + nb) * K;
                /* each 3 rows of the tile PF_TILES ahead are prefetched by one group, the
                 * groups taking turns, so the memory stays busy while later groups compute */
                const bf16 *pf = (nb / 3) % groups == g && t + PF_TILES < tiles
                                 ? wp + (int64_t)PF_TILES * NT * K : NULL;
                switch (mb) {
                    case 4: tile_3x4(wp, K, xp, x_stride, pf, s + nb * 4); break;
                    case 3: tile_3x3(wp, K, xp, x_stride, pf, s + nb * 3); break;
                    default: tile_3x2(wp, K, xp, x_stride, pf, s + nb * 2); break;
                }
            }
            for (int n = 0; n < NT; n++) {
                const float bn = bias ? from_bf16(bias[n0 + n]) : 0.0f;
                for (int m = 0; m < mb; m++)
                    store_out(s[n * mb + m] + bn, out, out_f32, (m0 + m) * out_stride + n0 + n);
            }
            m0 += mb;
        }
    }
#pragma omp for schedule(static)
    for (int n = tiles * NT; n < N; n++) one_row(x, x_stride, M, w, n, K, bias, out, out_f32, out_stride);
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

/* ------------------------------------------------------------------ any kind (descriptors)
 * The quantized kinds run kernels/quant.c's tf_qlinear_* (float32 y = x W^T, x bfloat16 rows
 * of `in`, W as stored). Declared weak so the library links, and the bf16 kind runs, whether or
 * not quant.c is there: a missing kernel is a NULL address, refused by tf_linear_kind_supported
 * (which native_step.supports asks before building a step). */
typedef void (*tf_qlinear_fn)(const void *w, const float *scales_or_null, const uint16_t *x_bf16,
                              float *y, int rows, int out, int in);
void tf_qlinear_q8_0(const void *, const float *, const uint16_t *, float *, int, int, int)
    __attribute__((weak));
void tf_qlinear_q4_0(const void *, const float *, const uint16_t *, float *, int, int, int)
    __attribute__((weak));
void tf_qlinear_q4_1(const void *, const float *, const uint16_t *, float *, int, int, int)
    __attribute__((weak));
void tf_qlinear_int8(const void *, const float *, const uint16_t *, float *, int, int, int)
    __attribute__((weak));

static tf_qlinear_fn qlinear_fn(int64_t kind) {
    switch (kind) {
        case TF_KIND_Q8_0: return tf_qlinear_q8_0;
        case TF_KIND_Q4_0: return tf_qlinear_q4_0;
        case TF_KIND_Q4_1: return tf_qlinear_q4_1;
        case TF_KIND_INT8: return tf_qlinear_int8;
        default: return NULL;
    }
}

/* Bytes of one output row of weights (GGUF blocks of 32: d [, m], then the quants). */
static int64_t row_bytes(int64_t kind, int64_t in) {
    switch (kind) {
        case TF_KIND_BF16: return 2 * in;
        case TF_KIND_Q8_0: return in / 32 * 34;
        case TF_KIND_Q4_0: return in / 32 * 18;
        case TF_KIND_Q4_1: return in / 32 * 20;
        default: return in;   /* int8 */
    }
}

int tf_linear_kind_supported(int kind) {
    return kind == TF_KIND_BF16 || qlinear_fn(kind) != NULL;
}

void tf_linear_any(const tf_linear_desc *L, const bf16 *x, int64_t x_stride, int M, bf16 *out,
                   float *out_f32, int64_t out_stride, float *scratch) {
    const int N = (int)L->out, K = (int)L->in;
    if (L->kind == TF_KIND_BF16) {   /* the orphaned `omp for` (its end is the barrier) */
        tf_linear_rows_to(x, x_stride, M, (const bf16 *)L->weight, N, K, L->bias, out, out_f32,
                          out_stride);
        return;
    }
    /* Quantized: quant.c's kernel, called by every thread of the team with the same
     * arguments (inside a parallel region it shares out the output rows with an orphaned
     * `omp for`, whose end is a barrier), into scratch (M, N) float32; then the bias and the
     * store, rows shared out again. x: contiguous rows of K (the step's buffers are). */
    (void)x_stride;
    qlinear_fn(L->kind)(L->weight, L->scales, x, scratch, M, N, K);
#pragma omp for schedule(static)
    for (int n = 0; n < N; n++) {
        const float bn = L->bias ? from_bf16(L->bias[n]) : 0.f;
        for (int m = 0; m < M; m++) {
            const float v = scratch[(int64_t)m * N + n] + bn;
            if (out) out[m * out_stride + n] = to_bf16(v);
            else out_f32[m * out_stride + n] = v;
        }
    }
}

static inline float from_f16(uint16_t h) { return _cvtsh_ss(h); }

void tf_table_row(const tf_linear_desc *T, int64_t row, bf16 *dst) {
    const int64_t K = T->in;
    const uint8_t *r = (const uint8_t *)T->weight + row_bytes(T->kind, K) * row;
    if (T->kind == TF_KIND_BF16) {
        memcpy(dst, r, sizeof(bf16) * K);
        return;
    }
    if (T->kind == TF_KIND_INT8) {
        const float s = T->scales[row];
        for (int64_t k = 0; k < K; k++) dst[k] = to_bf16((float)((const int8_t *)r)[k] * s);
        return;
    }
    const int64_t bb = row_bytes(T->kind, 32);
    for (int64_t blk = 0; blk < K / 32; blk++) {
        const uint8_t *b = r + blk * bb;
        uint16_t dh, mh = 0;
        memcpy(&dh, b, 2);
        const float d = from_f16(dh);
        bf16 *o = dst + blk * 32;
        if (T->kind == TF_KIND_Q8_0) {
            for (int i = 0; i < 32; i++) o[i] = to_bf16(d * (float)((const int8_t *)(b + 2))[i]);
            continue;
        }
        if (T->kind == TF_KIND_Q4_0) {   /* (q - 8) d */
            for (int i = 0; i < 16; i++) {
                o[i] = to_bf16((float)((b[2 + i] & 0x0F) - 8) * d);
                o[i + 16] = to_bf16((float)((b[2 + i] >> 4) - 8) * d);
            }
            continue;
        }
        memcpy(&mh, b + 2, 2);           /* q4_1: q d + m */
        const float m = from_f16(mh);
        for (int i = 0; i < 16; i++) {
            o[i] = to_bf16((float)(b[4 + i] & 0x0F) * d + m);
            o[i + 16] = to_bf16((float)(b[4 + i] >> 4) * d + m);
        }
    }
}
