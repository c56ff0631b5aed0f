/* Prefill attention over a paged bfloat16 KV cache, for x86-64 CPUs with AVX-512 BF16.
 *
 * Why it exists: torch's CPU flash-attention computes bfloat16 attention in float32 (~150
 * GFLOP/s on this 2-core Zen 4), and a chunk that follows a cached prefix needs an explicit
 * mask, which is slower still. This kernel multiplies bfloat16 pairs with vdpbf16ps (twice the
 * float32 FMA rate), keeps the online softmax in float32, and reads K/V straight through the
 * block table, so no gathered copy of the context is made.
 *
 * Layout (see model/layers.py): q and out are (n, H, D) rows with a stride between tokens;
 * caches are (Hkv, num_blocks, block_size, D); table[p] is the page holding positions
 * [p * block_size, (p + 1) * block_size). Query token i sits at position start + i and attends
 * to keys j with max(0, pos - window + 1) <= j <= pos (window <= 0: no window). The G = H / Hkv
 * query heads sharing a KV head are processed together, so each K/V tile is loaded once for
 * all of them.
 *
 * Work is split over (KV head, tile of query rows) with OpenMP; when loaded into a process that
 * already has torch, the OpenMP runtime is torch's own (same soname), so the two share threads.
 */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>

#include "kernels.h"

#define KB 64       /* keys per block: K and V tiles of one block stay in L1 */
#define MR 4        /* query rows per micro-kernel */
#define TILE 32     /* query rows per task (MR multiple) */

/* exp(x) for x <= 0: 2^(x log2 e) split into 2^n * 2^f, f in [-0.5, 0.5], with a degree-6
 * polynomial for 2^f (relative error ~2e-7); exactly 0 below -87 (and for -inf). */
static inline __m512 exp_neg(__m512 x) {
    const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

/* Pack keys [0, nkeys_pad) of one KV head.
 *   kp: per group of 16 keys, D/2 vectors of 32 bf16; vector d2 holds (k[t][2 d2], k[t][2 d2 + 1])
 *       for t = 0..15 -- so one vdpbf16ps against a broadcast query pair scores 16 keys.
 *   vp: per pair of keys, D/16 vectors; vector c holds (v[2 j2][16 c + t], v[2 j2 + 1][16 c + t])
 *       for t = 0..15 -- so one vdpbf16ps against a broadcast probability pair updates 16 dims.
 * Keys at or past nkeys are zero (never attended to; zero keeps 0 * garbage from making NaN). */
static void pack_head(const bf16 *kc, const bf16 *vc, int bs,
                      const int64_t *table, int nkeys, int nkeys_pad, int D,
                      bf16 *kp, bf16 *vp) {
    const int64_t page_elems = (int64_t)bs * D;
    for (int g = 0; g < nkeys_pad / 16; g++) {
        bf16 *dst = kp + (int64_t)g * 16 * D;
        for (int t = 0; t < 16; t++) {
            const int j = g * 16 + t;
            if (j < nkeys) {
                const bf16 *src = kc + table[j / bs] * page_elems + (int64_t)(j % bs) * D;
                for (int d2 = 0; d2 < D / 2; d2++) {
                    dst[d2 * 32 + 2 * t] = src[2 * d2];
                    dst[d2 * 32 + 2 * t + 1] = src[2 * d2 + 1];
                }
            } else {
                for (int d2 = 0; d2 < D / 2; d2++) {
                    dst[d2 * 32 + 2 * t] = 0;
                    dst[d2 * 32 + 2 * t + 1] = 0;
                }
            }
        }
    }
    for (int j2 = 0; j2 < nkeys_pad / 2; j2++) {
        bf16 *dst = vp + (int64_t)j2 * 2 * D;
        for (int e = 0; e < 2; e++) {
            const int j = 2 * j2 + e;
            if (j < nkeys) {
                const bf16 *src = vc + table[j / bs] * page_elems + (int64_t)(j % bs) * D;
                for (int c = 0; c < D / 16; c++)
                    for (int t = 0; t < 16; t++) dst[c * 32 + 2 * t + e] = src[c * 16 + t];
            } else {
                for (int c = 0; c < D / 16; c++)
                    for (int t = 0; t < 16; t++) dst[c * 32 + 2 * t + e] = 0;
            }
        }
    }
}

static inline __m512bh bcast_pair(const bf16 *p) {
    uint32_t u;
    memcpy(&u, p, 4);
    return (__m512bh)_mm512_set1_epi32((int)u);
}

/* s[r][0..KB) = q_r . k_j for the MR rows and the KB keys of block `kblk` (packed). */
static inline void scores(const bf16 *const *qrow, const bf16 *kp, int D, float *s) {
    for (int c0 = 0; c0 < KB / 16; c0 += 4) {
        __m512 acc[MR][4];
        for (int r = 0; r < MR; r++)
            for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
        for (int d2 = 0; d2 < D / 2; d2++) {
            __m512bh kv[4];
            for (int c = 0; c < 4; c++)
                kv[c] = (__m512bh)_mm512_loadu_si512(kp + ((int64_t)(c0 + c) * (D / 2) + d2) * 32);
            for (int r = 0; r < MR; r++) {
                const __m512bh qq = bcast_pair(qrow[r] + 2 * d2);
                for (int c = 0; c < 4; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], qq, kv[c]);
            }
        }
        for (int r = 0; r < MR; r++)
            for (int c = 0; c < 4; c++) _mm512_storeu_ps(s + r * KB + (c0 + c) * 16, acc[r][c]);
    }
}

/* o[r][0..D) += sum_j p[r][j] v_j over the KB keys of one block (packed, bf16 probabilities). */
static inline void accumulate(const bf16 *p, const bf16 *vp, int D, float *o) {
    for (int c0 = 0; c0 < D / 16; c0 += 4) {
        __m512 acc[MR][4];
        for (int r = 0; r < MR; r++)
            for (int c = 0; c < 4; c++) acc[r][c] = _mm512_loadu_ps(o + r * D + (c0 + c) * 16);
        for (int j2 = 0; j2 < KB / 2; j2++) {
            __m512bh vv[4];
            for (int c = 0; c < 4; c++)
                vv[c] = (__m512bh)_mm512_loadu_si512(vp + ((int64_t)j2 * (D / 16) + c0 + c) * 32);
            for (int r = 0; r < MR; r++) {
                const __m512bh pp = bcast_pair(p + r * KB + 2 * j2);
                for (int c = 0; c < 4; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], pp, vv[c]);
            }
        }
        for (int r = 0; r < MR; r++)
            for (int c = 0; c < 4; c++) _mm512_storeu_ps(o + r * D + (c0 + c) * 16, acc[r][c]);
    }
}

int tf_attention_supported(int head_dim) { return head_dim > 0 && head_dim % 64 == 0 && head_dim <= 256; }

/* Workspace: kp and vp each hold Hkv * round_up(start + n, KB) * D bf16. */
int tf_prefill_attention(const bf16 *q, int64_t q_stride, const bf16 *k_cache, const bf16 *v_cache,
                         int64_t num_blocks, int bs, const int64_t *table, int n, int start,
                         int H, int Hkv, int D, int window, float scale,
                         bf16 *out, int64_t out_stride, bf16 *kp, bf16 *vp) {
    if (!tf_attention_supported(D) || H % Hkv != 0 || n <= 0 || start < 0) return -1;
    const int G = H / Hkv;
    const int end = start + n;
    const int nkeys_pad = (end + KB - 1) / KB * KB;
    const int64_t head_stride = num_blocks * bs * D;
    const int64_t packed = (int64_t)nkeys_pad * D;
    const int rows = n * G;
    const int tiles = (rows + TILE - 1) / TILE;

#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int h = 0; h < Hkv; h++)
            pack_head(k_cache + h * head_stride, v_cache + h * head_stride, bs, table, end,
                      nkeys_pad, D, kp + h * packed, vp + h * packed);

        float o[TILE * 256];
        float m[TILE], l[TILE];
        float s[MR * KB];
        bf16 p[MR * KB];
        const bf16 *qrow[MR];

        /* later tiles see more keys: hand them out last-first, dynamically */
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < Hkv * tiles; task++) {
            const int h = task % Hkv;
            const int r0 = (tiles - 1 - task / Hkv) * TILE;
            const int nr = rows - r0 < TILE ? rows - r0 : TILE;
            const int pos_first = start + r0 / G, pos_last = start + (r0 + nr - 1) / G;
            int lo = 0;
            if (window > 0 && pos_first - window + 1 > 0) lo = pos_first - window + 1;
            const bf16 *kph = kp + h * packed, *vph = vp + h * packed;
            for (int r = 0; r < nr; r++) { m[r] = -1e30f; l[r] = 0.f; }
            memset(o, 0, sizeof(float) * nr * D);

            for (int j0 = lo / KB * KB; j0 <= pos_last; j0 += KB) {
                for (int rb = 0; rb < nr; rb += MR) {
                    int pos[MR];
                    for (int r = 0; r < MR; r++) {
                        const int row = r0 + rb + (rb + r < nr ? r : nr - 1 - rb);   /* pad: repeat */
                        pos[r] = start + row / G;
                        qrow[r] = q + (int64_t)(row / G) * q_stride + (int64_t)(h * G + row % G) * D;
                    }
                    scores(qrow, kph + (int64_t)j0 * D, D, s);
                    for (int r = 0; r < MR && rb + r < nr; r++) {
                        const int hi = pos[r];                                  /* keys <= hi */
                        const int wlo = window > 0 ? pos[r] - window + 1 : 0;  /* keys >= wlo */
                        float *sr = s + r * KB;
                        __m512 mx = _mm512_set1_ps(-1e30f);
                        for (int c = 0; c < KB / 16; c++) {
                            __m512 x = _mm512_mul_ps(_mm512_loadu_ps(sr + c * 16), _mm512_set1_ps(scale));
                            const int jb = j0 + c * 16;
                            if (jb + 15 > hi || jb < wlo) {
                                const __m512i j = _mm512_add_epi32(_mm512_set1_epi32(jb),
                                    _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
                                const __mmask16 ok = _mm512_cmp_epi32_mask(j, _mm512_set1_epi32(hi), _MM_CMPINT_LE)
                                                   & _mm512_cmp_epi32_mask(j, _mm512_set1_epi32(wlo), _MM_CMPINT_NLT);
                                x = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), ok, x);
                            }
                            _mm512_storeu_ps(sr + c * 16, x);
                            mx = _mm512_max_ps(mx, x);
                        }
                        const int row = rb + r;
                        const float m_new = fmaxf(m[row], _mm512_reduce_max_ps(mx));
                        const float corr = expf(m[row] - m_new);
                        m[row] = m_new;
                        __m512 sum = _mm512_setzero_ps();
                        for (int c = 0; c < KB / 16; c += 2) {
                            const __m512 e0 = exp_neg(_mm512_sub_ps(_mm512_loadu_ps(sr + c * 16), _mm512_set1_ps(m_new)));
                            const __m512 e1 = exp_neg(_mm512_sub_ps(_mm512_loadu_ps(sr + c * 16 + 16), _mm512_set1_ps(m_new)));
                            const __m512bh pb = _mm512_cvtne2ps_pbh(e1, e0);   /* rounded, as used */
                            _mm512_storeu_si512(p + r * KB + c * 16, (__m512i)pb);
                            /* sum the rounded probabilities, so normalisation matches what is accumulated */
                            const __m512i w = (__m512i)pb;
                            sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
                            sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32((int)0xFFFF0000u))));
                        }
                        l[row] = l[row] * corr + _mm512_reduce_add_ps(sum);
                        if (corr != 1.0f) {
                            const __m512 cv = _mm512_set1_ps(corr);
                            for (int d = 0; d < D; d += 16)
                                _mm512_storeu_ps(o + row * D + d, _mm512_mul_ps(cv, _mm512_loadu_ps(o + row * D + d)));
                        }
                    }
                    if (nr - rb < MR) {   /* padded rows: accumulate into scratch, not into o */
                        float pad[MR * 256];
                        const int live = nr - rb;
                        memcpy(pad, o + rb * D, sizeof(float) * live * D);
                        memset(p + live * KB, 0, sizeof(bf16) * (MR - live) * KB);
                        accumulate(p, vph + (int64_t)j0 * D, D, pad);
                        memcpy(o + rb * D, pad, sizeof(float) * live * D);
                    } else {
                        accumulate(p, vph + (int64_t)j0 * D, D, o + rb * D);
                    }
                }
            }
            for (int r = 0; r < nr; r++) {
                const int row = r0 + r;
                bf16 *dst = out + (int64_t)(row / G) * out_stride + (int64_t)(h * G + row % G) * D;
                const float inv = l[r] > 0.f ? 1.0f / l[r] : 0.f;
                for (int d = 0; d < D; d++) dst[d] = to_bf16(o[r * D + d] * inv);
            }
        }
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Decode attention: one new token per sequence, b sequences, read through their block tables
 * (tables: b rows of num_pages page ids, table_stride apart; positions: the new token's position, whose K/V are
 * already in the cache). Memory-bound, so the plan is to touch each K and V row exactly once:
 * pass 1 scores every key for the G query heads of a KV head (bf16 dot products), pass 2
 * takes the softmax in float32, pass 3 accumulates V rows weighted by float32 probabilities.
 * One task per (sequence, KV head).
 */

/* One (sequence, KV head) task of decode attention. ``s`` / ``s_cap``: the calling thread's
 * float scratch, grown as needed (freed by the caller). Returns 0, or -2 when out of memory. */
int tf_decode_task(int task, const bf16 *q, int64_t q_stride, const bf16 *k_cache,
                   const bf16 *v_cache, int64_t num_blocks, int bs, const int64_t *tables,
                   int64_t table_stride, const int64_t *positions, int H, int Hkv, int D,
                   int window, float scale, bf16 *out, int64_t out_stride, float **s_buf,
                   int64_t *s_cap) {
    const int G = H / Hkv;
    const int DV = D / 16;                      /* float32 vectors per row */
    const int64_t head_stride = num_blocks * bs * D, page_elems = (int64_t)bs * D;
    __m512 acc[16];                              /* DV <= 16 */
    const int seq = task / Hkv, h = task % Hkv;
    const int64_t pos = positions[seq];
    const int64_t lo = (window > 0 && pos - window + 1 > 0) ? pos - window + 1 : 0;
    const int64_t nk = pos - lo + 1;
    if (nk * G > *s_cap) {
        free(*s_buf);
        *s_cap = nk * G * 2;
        *s_buf = (float *)malloc(sizeof(float) * *s_cap);
        if (!*s_buf) { *s_cap = 0; return -2; }
    }
    float *s = *s_buf;
    const int64_t *table = tables + seq * table_stride;
    const bf16 *kh = k_cache + h * head_stride, *vh = v_cache + h * head_stride;
    const bf16 *qs = q + seq * q_stride + (int64_t)h * G * D;
    /* pass 1: s[g][j] = scale * q_g . k_j */
    for (int64_t pg = lo / bs; pg <= pos / bs; pg++) {   /* page by page: no division per key */
        const bf16 *page = kh + table[pg] * page_elems;
        const int64_t j0 = pg * bs;
        const int t0 = j0 < lo ? (int)(lo - j0) : 0, t1 = pos - j0 + 1 < bs ? (int)(pos - j0 + 1) : bs;
        for (int t = t0; t < t1; t++) {
            const bf16 *kr = page + (int64_t)t * D;
            for (int g = 0; g < G; g++) {
                __m512 a = _mm512_setzero_ps();
                for (int c = 0; c < D / 32; c++)
                    a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(qs + g * D + c * 32),
                                         (__m512bh)_mm512_loadu_si512(kr + c * 32));
                s[g * nk + (j0 + t - lo)] = scale * _mm512_reduce_add_ps(a);
            }
        }
    }
    /* pass 2: softmax per query head, in float32 */
    for (int g = 0; g < G; g++) {
        float *sg = s + g * nk;
        float mx = -INFINITY;
        for (int64_t j = 0; j < nk; j++) mx = sg[j] > mx ? sg[j] : mx;
        __m512 sum = _mm512_setzero_ps();
        int64_t j = 0;
        for (; j + 16 <= nk; j += 16) {
            const __m512 e = exp_neg(_mm512_sub_ps(_mm512_loadu_ps(sg + j), _mm512_set1_ps(mx)));
            _mm512_storeu_ps(sg + j, e);
            sum = _mm512_add_ps(sum, e);
        }
        float tail = 0.f;
        for (; j < nk; j++) { sg[j] = expf(sg[j] - mx); tail += sg[j]; }
        const float inv = 1.0f / (_mm512_reduce_add_ps(sum) + tail);
        for (j = 0; j < nk; j++) sg[j] *= inv;
    }
    /* pass 3: out_g = sum_j p[g][j] v_j, walking V once for (up to 16 / DV) heads */
    for (int g0 = 0; g0 < G; g0 += 16 / DV) {
        const int gn = G - g0 < 16 / DV ? G - g0 : 16 / DV;
        for (int i = 0; i < gn * DV; i++) acc[i] = _mm512_setzero_ps();
        for (int64_t pg = lo / bs; pg <= pos / bs; pg++) {
            const bf16 *page = vh + table[pg] * page_elems;
            const int64_t j0 = pg * bs;
            const int t0 = j0 < lo ? (int)(lo - j0) : 0, t1 = pos - j0 + 1 < bs ? (int)(pos - j0 + 1) : bs;
            for (int t = t0; t < t1; t++) {
                const bf16 *vr = page + (int64_t)t * D;
                const float *pj = s + g0 * nk + (j0 + t - lo);
                for (int c = 0; c < DV; c++) {
                    const __m512 vf = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const __m256i *)(vr + c * 16)));
                    for (int g = 0; g < gn; g++)
                        acc[g * DV + c] = _mm512_fmadd_ps(_mm512_set1_ps(pj[g * nk]), vf, acc[g * DV + c]);
                }
            }
        }
        for (int g = 0; g < gn; g++) {
            bf16 *dst = out + seq * out_stride + (int64_t)(h * G + g0 + g) * D;
            for (int c = 0; c < DV; c++) {
                float tmp[16];
                _mm512_storeu_ps(tmp, acc[g * DV + c]);
                for (int t = 0; t < 16; t++) dst[c * 16 + t] = to_bf16(tmp[t]);
            }
        }
    }
    return 0;
}

/* Checks shared by the decode entry points: 0, -1 (shapes), -3 (a position past its table). */
int tf_decode_check(int b, int H, int Hkv, int D, int bs, int64_t num_pages,
                    const int64_t *positions) {
    if (!tf_attention_supported(D) || Hkv <= 0 || H % Hkv != 0 || b <= 0) return -1;
    for (int i = 0; i < b; i++)
        if (positions[i] < 0 || positions[i] / bs >= num_pages) return -3;
    return 0;
}

int tf_decode_attention(const bf16 *q, int64_t q_stride, const bf16 *k_cache, const bf16 *v_cache,
                        int64_t num_blocks, int bs, const int64_t *tables, int64_t table_stride,
                        int64_t num_pages, const int64_t *positions, int b, int H, int Hkv,
                        int D, int window, float scale, bf16 *out, int64_t out_stride) {
    const int check = tf_decode_check(b, H, Hkv, D, bs, num_pages, positions);
    if (check != 0) return check;
    int status = 0;
#pragma omp parallel
    {
        float *s = NULL;
        int64_t s_cap = 0;
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < b * Hkv; task++)
            if (tf_decode_task(task, q, q_stride, k_cache, v_cache, num_blocks, bs, tables,
                               table_stride, positions, H, Hkv, D, window, scale, out,
                               out_stride, &s, &s_cap) != 0)
                status = -2;
        free(s);
    }
    return status;
}
