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
 *
 * Scores with AVX-512 VNNI (built where the host has it, -march=native): widening a K row to
 * float32 and reducing each head's dot product cost ~15 instructions per key and head, which
 * made this kernel compute-bound and slower than the bfloat16 one although it reads half the
 * bytes. So each query head's row (times the softmax scale) is rounded to int8 once per task
 * with its own scale (absmax / 127, as the pages round K), and a key's score is one vpdpbusd
 * per 64 dims: the codes are made unsigned (k + 128, an xor of the sign bit) and the
 * 128 * sum(q codes) this adds is subtracted once. 16 keys' partial sums are reduced together
 * (a transpose-add tree, ~3 instructions per key) and scaled by q_scale * k_scale in float.
 * Extra error: each q element moves by at most q_scale / 2 = absmax(q) / 254, so a score moves
 * by at most k_scale * q_scale / 2 * sum |k codes| (typically ~sqrt(D) times less); this is the
 * rounding llama.cpp applies to q for its q8_0 KV cache (there per 32 elements).
 * ``int8_dot = 0`` (or a build without VNNI) keeps the exact float32 scores.
 */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#if defined(__AVX512VNNI__)
#define KV8_VNNI 1
#endif

/* Whether this build scores keys with int8 dot products (rounding q to int8). */
int tf_kv8_int8_dot(void) {
#if defined(KV8_VNNI)
    return 1;
#else
    return 0;
#endif
}

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

/* Pages sit wherever the block table puts them, so the hardware prefetcher cannot follow
 * from one to the next: ask for the next page's lines while this one is being read. */
static inline void kv8_prefetch_page(const int8_t *page, int64_t bytes) {
    if (!page) return;
    for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch((const char *)page + i, _MM_HINT_T0);
}

int tf_kv8_supported(int head_dim) {
    return head_dim > 0 && head_dim % 16 == 0 && head_dim <= 256;
}

#if defined(KV8_VNNI)
/* Pairs (a, b) of int32 vectors -> per 128-bit lane (a0+a2, b0+b2, a1+a3, b1+b3) */
static inline __m512i kv8_fold32(__m512i a, __m512i b) {
    return _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
}

static inline __m512i kv8_fold64(__m512i a, __m512i b) {
    return _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
}

static inline __m512i kv8_fold128(__m512i a, __m512i b) {
    return _mm512_add_epi32(_mm512_shuffle_i32x4(a, b, 0x88), _mm512_shuffle_i32x4(a, b, 0xDD));
}

/* v[k]: 16 int32 partial sums of key k -> lane k holds key k's total */
static inline __m512i kv8_reduce16(const __m512i *v) {
    __m512i x[8], y[4];
    for (int i = 0; i < 8; i++) x[i] = kv8_fold32(v[2 * i], v[2 * i + 1]);
    for (int i = 0; i < 4; i++) y[i] = kv8_fold64(x[2 * i], x[2 * i + 1]);
    return kv8_fold128(kv8_fold128(y[0], y[1]), kv8_fold128(y[2], y[3]));
}

/* Scores of n <= 16 consecutive rows of one page for every query head: s[g * nk + k] =
 * k_scale_k * q_scale_g * (q codes_g . k codes_k). ``qi`` (G, DP) int8 query codes (zero past
 * D), ``qsum[g]`` = 128 * their sum, ``kx`` a (16, DP) scratch for the unsigned key codes. */
static void kv8_scores_vnni(const int8_t *rows, int n, int D, int DP, int G, const int8_t *qi,
                            const int32_t *qsum, const float *qscale, uint8_t *kx, float *s,
                            int64_t nk) {
    const int R = D + 4, NC = DP / 64;
    const __m512i sign = _mm512_set1_epi8((char)0x80);
    float ks[16] = {0};
    for (int k = 0; k < 16; k++) {   /* rows past n: zeros (their lanes are not stored) */
        const int8_t *row = rows + (int64_t)k * R;
        for (int c = 0; c < NC; c++) {
            const int left = k < n ? D - 64 * c : 0;
            const __mmask64 m = left >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << left) - 1);
            /* past D: 0 ^ 0x80 = 128 unsigned, times q code 0 */
            _mm512_storeu_si512(kx + k * DP + 64 * c,
                                _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, row + 64 * c), sign));
        }
        if (k < n) ks[k] = kv8_scale(row, D);
    }
    const __m512 vks = _mm512_loadu_ps(ks);
    const __mmask16 live = (__mmask16)((1u << n) - 1u);
    __m512i acc[16];
    for (int g = 0; g < G; g++) {
        const int8_t *qg = qi + g * DP;
#pragma GCC unroll 16
        for (int k = 0; k < 16; k++) acc[k] = _mm512_setzero_si512();
        for (int c = 0; c < NC; c++) {
            const __m512i qv = _mm512_loadu_si512(qg + 64 * c);
#pragma GCC unroll 16
            for (int k = 0; k < 16; k++)
                acc[k] = _mm512_dpbusd_epi32(acc[k], _mm512_loadu_si512(kx + k * DP + 64 * c), qv);
        }
        const __m512i dot = _mm512_sub_epi32(kv8_reduce16(acc), _mm512_set1_epi32(qsum[g]));
        const __m512 sc = _mm512_mul_ps(_mm512_cvtepi32_ps(dot),
                                        _mm512_mul_ps(vks, _mm512_set1_ps(qscale[g])));
        _mm512_mask_storeu_ps(s + g * nk, live, sc);
    }
}

/* q_g (times the softmax scale) rounded to int8 with scale absmax / 127 (0 for a zero row):
 * qi (G, DP) zero-padded, qsum[g] = 128 * sum of codes, qscale[g]. */
static void kv8_round_queries(const float *qf, int G, int D, int DP, int8_t *qi, int32_t *qsum,
                              float *qscale) {
    for (int g = 0; g < G; g++) {
        const float *x = qf + g * D;
        float amax = 0.0f;
        for (int i = 0; i < D; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
        const float sc = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int32_t sum = 0;
        for (int i = 0; i < DP; i++) {
            int v = i < D ? (int)lrintf(x[i] * inv) : 0;
            v = v > 127 ? 127 : (v < -127 ? -127 : v);
            qi[g * DP + i] = (int8_t)v;
            sum += v;
        }
        qsum[g] = 128 * sum;
        qscale[g] = sc;
    }
}
#endif

/* Pass 3 for D = 64 and GN <= 4 query heads (a constant once inlined): out_g = sum_j (p[g][j]
 * v_scale_j) codes_j, each V row widened once for all GN heads. With constant counts the
 * GN x 4 accumulators stay in registers; the generic loop below keeps them in memory. */
static inline __attribute__((always_inline)) void kv8_values_d64(
    const int GN, const int8_t *vh, const int64_t *table, int64_t page_bytes, int bs, int64_t lo,
    int64_t pos, const float *p, int64_t nk, bf16 *dst) {
    __m512 acc[16];
    for (int i = 0; i < 4 * GN; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t pg = lo / bs; pg <= pos / bs; pg++) {
        const int8_t *page = vh + table[pg] * page_bytes;
        const int64_t j0 = pg * bs;
        const int t0 = j0 < lo ? (int)(lo - j0) : 0;
        const int t1 = pos - j0 + 1 < bs ? (int)(pos - j0 + 1) : bs;
        const float *pj = p + (j0 - lo);
        kv8_prefetch_page(pg < pos / bs ? vh + table[pg + 1] * page_bytes : NULL, page_bytes);
        for (int t = t0; t < t1; t++) {
            const int8_t *row = page + (int64_t)t * 68;
            const __m512 vs = _mm512_set1_ps(kv8_scale(row, 64));
            const __m512 w0 = kv8_widen(row), w1 = kv8_widen(row + 16),
                         w2 = kv8_widen(row + 32), w3 = kv8_widen(row + 48);
            for (int g = 0; g < GN; g++) {
                const __m512 pv = _mm512_mul_ps(_mm512_set1_ps(pj[g * nk + t]), vs);
                acc[4 * g] = _mm512_fmadd_ps(pv, w0, acc[4 * g]);
                acc[4 * g + 1] = _mm512_fmadd_ps(pv, w1, acc[4 * g + 1]);
                acc[4 * g + 2] = _mm512_fmadd_ps(pv, w2, acc[4 * g + 2]);
                acc[4 * g + 3] = _mm512_fmadd_ps(pv, w3, acc[4 * g + 3]);
            }
        }
    }
    for (int g = 0; g < GN; g++)
        for (int c = 0; c < 4; c++) {
            float tmp[16];
            _mm512_storeu_ps(tmp, acc[4 * g + c]);
            for (int i = 0; i < 16; i++) dst[g * 64 + c * 16 + i] = to_bf16(tmp[i]);
        }
}

/* One (sequence, KV head) task. ``buf`` / ``cap``: the thread's float scratch, grown as
 * needed (freed by the caller). Returns 0, or -2 when out of memory. */
static int kv8_task(int task, const bf16 *q, int64_t q_stride, const int8_t *k_cache,
                    const int8_t *v_cache, int64_t num_blocks, int bs, const int64_t *tables,
                    int64_t table_stride, const int64_t *positions, int H, int Hkv, int D,
                    int window, float scale, bf16 *out, int64_t out_stride, int int8_dot,
                    float **buf, int64_t *cap) {
    const int G = H / Hkv, DV = D / 16, R = D + 4;       /* R: bytes per row */
    const int64_t page_bytes = (int64_t)bs * R, head_bytes = num_blocks * page_bytes;
    const int seq = task / Hkv, h = task % Hkv;
    const int64_t pos = positions[seq];
    const int64_t lo = (window > 0 && pos - window + 1 > 0) ? pos - window + 1 : 0;
    const int64_t nk = pos - lo + 1;
    const int DP = (D + 63) / 64 * 64;                   /* D padded to whole 64-byte steps */
    (void)int8_dot;                                     /* without VNNI: float scores only */
    /* floats: qf (G, D), s (G, nk); bytes after them: q codes (G, DP), unsigned keys (16, DP) */
    const int64_t need = (int64_t)G * D + nk * G + ((int64_t)G * DP + 16 * DP) / 4 + 16;
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
#if defined(KV8_VNNI)
    if (int8_dot) {
        int8_t *qi = (int8_t *)(s + nk * G);
        uint8_t *kx = (uint8_t *)(qi + (int64_t)G * DP);
        int32_t qsum[256];
        float qscale[256];
        if (G > 256) return -1;
        kv8_round_queries(qf, G, D, DP, qi, qsum, qscale);
        for (int64_t pg = lo / bs; pg <= pos / bs; pg++) {
            const int8_t *page = kh + table[pg] * page_bytes;
            const int64_t j0 = pg * bs;
            const int t0 = j0 < lo ? (int)(lo - j0) : 0;
            const int t1 = pos - j0 + 1 < bs ? (int)(pos - j0 + 1) : bs;
            kv8_prefetch_page(pg < pos / bs ? kh + table[pg + 1] * page_bytes : NULL, page_bytes);
            for (int t = t0; t < t1; t += 16)
                kv8_scores_vnni(page + (int64_t)t * R, t1 - t < 16 ? t1 - t : 16, D, DP, G, qi,
                                qsum, qscale, kx, s + (j0 + t - lo), nk);
        }
    } else
#endif
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
        __m512 vmax = _mm512_set1_ps(-INFINITY);            /* 16 running maxima, not one chain */
        int64_t j = 0;
        for (; j + 16 <= nk; j += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(sg + j));
        if (j < nk)
            vmax = _mm512_mask_max_ps(vmax, (__mmask16)((1u << (nk - j)) - 1u), vmax,
                                      _mm512_maskz_loadu_ps((__mmask16)((1u << (nk - j)) - 1u),
                                                            sg + j));
        const __m512 vmx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
        __m512 sum = _mm512_setzero_ps();
        for (j = 0; j + 16 <= nk; j += 16) {
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
    if (D == 64) {
        for (int g0 = 0; g0 < G; g0 += 4) {
            const float *p = s + g0 * nk;
            bf16 *dst = out + seq * out_stride + (int64_t)(h * G + g0) * D;
            switch (G - g0 < 4 ? G - g0 : 4) {
            case 1: kv8_values_d64(1, vh, table, page_bytes, bs, lo, pos, p, nk, dst); break;
            case 2: kv8_values_d64(2, vh, table, page_bytes, bs, lo, pos, p, nk, dst); break;
            case 3: kv8_values_d64(3, vh, table, page_bytes, bs, lo, pos, p, nk, dst); break;
            default: kv8_values_d64(4, vh, table, page_bytes, bs, lo, pos, p, nk, dst); break;
            }
        }
        return 0;
    }
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
                            float scale, bf16 *out, int64_t out_stride, int int8_dot) {
    if (!tf_kv8_supported(D) || Hkv <= 0 || H % Hkv != 0 || b <= 0 || bs <= 0) return -1;
    for (int i = 0; i < b; i++)
        if (positions[i] < 0 || positions[i] / bs >= num_pages) return -3;
    int status = 0;
#pragma omp parallel
    {
        float *buf = NULL;
        int64_t cap = 0;
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < b * Hkv; task++) {
            const int rc = kv8_task(task, q, q_stride, k_cache, v_cache, num_blocks, bs, tables,
                         table_stride, positions, H, Hkv, D, window, scale, out, out_stride,
                         int8_dot, &buf, &cap);
            if (rc != 0) status = rc;
        }
        free(buf);
    }
    return status;
}
