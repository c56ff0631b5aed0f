/* Decode attention over int8 KV pages, for x86-64 CPUs with AVX-512.
 *
 * Why it exists: with ``kv_cache_dtype="int8"`` a page stores each token's K (or V) row of one
 * KV head as D int8 codes followed by the row's float32 scale (model/kv_pages.py), half the
 * bytes of bfloat16. Decode attention is a read of every cached row, so it should read those
 * bytes as they are: this kernel widens 16 codes at a time to float32 in registers and folds
 * the row's scale into the score (K) or the probability (V); no dequantized copy of the
 * context is ever made. The torch fallback (layers.py) gathers and dequantizes pages instead.
 *
 * Layout: q and out are (b, H, D) bfloat16 rows with a stride between sequences; caches are
 * int8 (Hkv, num_blocks, block_size, D + 4); table[p] is the page holding positions
 * [p * block_size, (p + 1) * block_size). Sequence i's query sits at positions[i] and attends
 * to keys j with max(0, pos - window + 1) <= j <= pos (window <= 0: no window). The G = H / Hkv
 * query heads that share a KV head are one task, so each row is widened once for all of them.
 * Tasks (sequence, KV head) are spread over OpenMP threads.
 */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

/* e^x for x <= 0, vectorized: x log2(e) = n + f with n an integer and |f| <= 1/2, 2^f from
 * its Taylor series to degree 6 (relative error < 3e-7), times 2^n; 0 for x < -87 and -inf. */
static inline __m512 kv8_exp(__m512 x) {
    const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
    const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)),
                                   _mm512_set1_ps(1.44269504088896341f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    /* ln(2)^k / k!, k = 6 .. 0 */
    __m512 p = _mm512_set1_ps(1.54035303933816e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.33335581464284e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.61812910762848e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.55041086648216e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.40226506959101e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.93147180559945e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

/* 16 int8 codes -> 16 float32 */
static inline __m512 kv8_widen(const int8_t *codes) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)codes)));
}

static inline float kv8_scale(const int8_t *row, int D) {
    float s;
    memcpy(&s, row + D, sizeof s);
    return s;
}

int tf_kv8_supported(int head_dim) {
    return head_dim > 0 && head_dim % 16 == 0 && head_dim <= 256;
}

/* One (sequence, KV head) task. ``buf`` / ``cap``: the thread's float scratch, grown as
 * needed (freed by the caller). Returns 0, or -2 when out of memory. */
static int kv8_task(int task, const bf16 *q, int64_t q_stride, const int8_t *k_cache,
                    const int8_t *v_cache, int64_t num_blocks, int bs, const int64_t *tables,
                    int64_t table_stride, const int64_t *positions, int H, int Hkv, int D,
                    int window, float scale, bf16 *out, int64_t out_stride, float **buf,
                    int64_t *cap) {
    const int G = H / Hkv, DV = D / 16, R = D + 4;       /* R: bytes per row */
    const int64_t page_bytes = (int64_t)bs * R, head_bytes = num_blocks * page_bytes;
    const int seq = task / Hkv, h = task % Hkv;
    const int64_t pos = positions[seq];
    const int64_t lo = (window > 0 && pos - window + 1 > 0) ? pos - window + 1 : 0;
    const int64_t nk = pos - lo + 1;
    const int64_t need = (int64_t)G * D + nk * G;
    if (need > *cap) {
        free(*buf);
        *cap = need * 2;
        *buf = (float *)malloc(sizeof(float) * *cap);
        if (!*buf) { *cap = 0; return -2; }
    }
    float *qf = *buf, *s = *buf + (int64_t)G * D;       /* qf: (G, D); s: (G, nk) */
    const bf16 *qs = q + seq * q_stride + (int64_t)h * G * D;
    for (int i = 0; i < G * D; i++) qf[i] = from_bf16(qs[i]) * scale;
    const int64_t *table = tables + seq * table_stride;
    const int8_t *kh = k_cache + h * head_bytes, *vh = v_cache + h * head_bytes;
    __m512 w[16];                                       /* DV <= 16 */

    /* pass 1: s[g][j] = k_scale_j * (scale q_g) . codes_j */
    for (int64_t pg = lo / bs; pg <= pos / bs; pg++) {
        const int8_t *page = kh + table[pg] * page_bytes;
        const int64_t j0 = pg * bs;
        const int t0 = j0 < lo ? (int)(lo - j0) : 0;
        const int t1 = pos - j0 + 1 < bs ? (int)(pos - j0 + 1) : bs;
        for (int t = t0; t < t1; t++) {
            const int8_t *row = page + (int64_t)t * R;
            for (int c = 0; c < DV; c++) w[c] = kv8_widen(row + 16 * c);
            const float ks = kv8_scale(row, D);
            for (int g = 0; g < G; g++) {
                __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qf + g * D), w[0]);
                for (int c = 1; c < DV; c++)
                    a = _mm512_fmadd_ps(_mm512_loadu_ps(qf + g * D + 16 * c), w[c], a);
                s[g * nk + (j0 + t - lo)] = ks * _mm512_reduce_add_ps(a);
            }
        }
    }
    /* pass 2: softmax of each query head's scores, in float32 */
    for (int g = 0; g < G; g++) {
        float *sg = s + g * nk;
        float mx = -INFINITY;
        for (int64_t j = 0; j < nk; j++) mx = sg[j] > mx ? sg[j] : mx;
        const __m512 vmx = _mm512_set1_ps(mx);
        __m512 sum = _mm512_setzero_ps();
        int64_t j = 0;
        for (; j + 16 <= nk; j += 16) {
            const __m512 e = kv8_exp(_mm512_sub_ps(_mm512_loadu_ps(sg + j), vmx));
            _mm512_storeu_ps(sg + j, e);
            sum = _mm512_add_ps(sum, e);
        }
        if (j < nk) {
            const __mmask16 m = (__mmask16)((1u << (nk - j)) - 1u);
            const __m512 e = _mm512_maskz_mov_ps(
                m, kv8_exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sg + j), vmx)));
            _mm512_mask_storeu_ps(sg + j, m, e);
            sum = _mm512_add_ps(sum, e);
        }
        const float inv = 1.0f / _mm512_reduce_add_ps(sum);
        for (j = 0; j < nk; j++) sg[j] *= inv;
    }
    /* pass 3: out_g = sum_j (p[g][j] v_scale_j) codes_j, widening each V row once for up to
     * 16 / DV query heads (the accumulators stay in 16 registers) */
    __m512 acc[16];
    for (int g0 = 0; g0 < G; g0 += 16 / DV) {
        const int gn = G - g0 < 16 / DV ? G - g0 : 16 / DV;
        for (int i = 0; i < gn * DV; i++) acc[i] = _mm512_setzero_ps();
        for (int64_t pg = lo / bs; pg <= pos / bs; pg++) {
            const int8_t *page = vh + table[pg] * page_bytes;
            const int64_t j0 = pg * bs;
            const int t0 = j0 < lo ? (int)(lo - j0) : 0;
            const int t1 = pos - j0 + 1 < bs ? (int)(pos - j0 + 1) : bs;
            for (int t = t0; t < t1; t++) {
                const int8_t *row = page + (int64_t)t * R;
                const float vs = kv8_scale(row, D);
                const float *pj = s + g0 * nk + (j0 + t - lo);
                for (int c = 0; c < DV; c++) {
                    const __m512 vf = kv8_widen(row + 16 * c);
                    for (int g = 0; g < gn; g++)
                        acc[g * DV + c] = _mm512_fmadd_ps(_mm512_set1_ps(pj[g * nk] * vs), vf,
                                                          acc[g * DV + c]);
                }
            }
        }
        for (int g = 0; g < gn; g++) {
            bf16 *dst = out + seq * out_stride + (int64_t)(h * G + g0 + g) * D;
            for (int c = 0; c < DV; c++) {
                float tmp[16];
                _mm512_storeu_ps(tmp, acc[g * DV + c]);
                for (int i = 0; i < 16; i++) dst[c * 16 + i] = to_bf16(tmp[i]);
            }
        }
    }
    return 0;
}

/* b sequences, one new token each (its K/V already written to the cache). Returns 0, -1
 * (unsupported shapes), -2 (out of memory) or -3 (a position past its block table). */
int tf_kv8_decode_attention(const bf16 *q, int64_t q_stride, const int8_t *k_cache,
                            const int8_t *v_cache, int64_t num_blocks, int bs,
                            const int64_t *tables, int64_t table_stride, int64_t num_pages,
                            const int64_t *positions, int b, int H, int Hkv, int D, int window,
                            float scale, bf16 *out, int64_t out_stride) {
    if (!tf_kv8_supported(D) || Hkv <= 0 || H % Hkv != 0 || b <= 0 || bs <= 0) return -1;
    for (int i = 0; i < b; i++)
        if (positions[i] < 0 || positions[i] / bs >= num_pages) return -3;
    int status = 0;
#pragma omp parallel
    {
        float *buf = NULL;
        int64_t cap = 0;
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < b * Hkv; task++)
            if (kv8_task(task, q, q_stride, k_cache, v_cache, num_blocks, bs, tables,
                         table_stride, positions, H, Hkv, D, window, scale, out, out_stride,
                         &buf, &cap) != 0)
                status = -2;
        free(buf);
    }
    return status;
}
