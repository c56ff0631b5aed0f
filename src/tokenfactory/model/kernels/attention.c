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
#include <omp.h>
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
 * Decode attention: one new token per row, read through the rows' block tables (tables: rows
 * of num_pages page ids, table_stride apart; positions: each row's position, whose K/V are
 * already in the cache). Memory-bound at one row, so the plan is to touch each K and V row
 * once: pass 1 scores every key for the G query heads of a KV head (bf16 dot products), pass 2
 * takes the softmax in float32, pass 3 accumulates V rows weighted by float32 probabilities.
 *
 * Rows of one sequence (a token and the drafts verified with it: consecutive positions, one
 * block table) run as one task per KV head, so that pass 1 and pass 3 read each K and V row
 * once for all of them, each row over its own causal range. Each row's arithmetic is what it
 * would be alone: a score is the same chain of vdpbf16ps, summed by reduce16 (the tree of
 * _mm512_reduce_add_ps), then scaled; the softmax runs on the row's own slice; V rows are
 * added in key order into the row's own accumulators. So a verified draft's attention equals
 * plain decoding's for that position bit for bit (greedy speculation depends on it).
 */

/* Scores of the 16 keys ``kr`` (n16 of them live) for one query head: the dot products as
 * DC chunks of 32 (DC = D / 32, a constant so everything stays in registers), reduced 16 at
 * a time. Stores n16 floats of scale * q.k. */
#define SCORE_BLOCK(DC)                                                                      \
    static inline void score_block_##DC(const bf16 *qu, const bf16 *const *kr, int n16,     \
                                        float scale, float *dst) {                           \
        __m512bh qv[DC];                                                                     \
        for (int c = 0; c < DC; c++) qv[c] = (__m512bh)_mm512_loadu_si512(qu + c * 32);       \
        __m512 v[16];                                                                        \
        for (int t = 0; t < 16; t++) {                                                       \
            __m512 a = _mm512_setzero_ps();                                                  \
            if (t < n16)                                                                     \
                for (int c = 0; c < DC; c++)                                                 \
                    a = _mm512_dpbf16_ps(a, qv[c],                                           \
                                         (__m512bh)_mm512_loadu_si512(kr[t] + c * 32));      \
            v[t] = a;                                                                        \
        }                                                                                    \
        const __m512 sc = _mm512_mul_ps(_mm512_set1_ps(scale), reduce16(v));                 \
        _mm512_mask_storeu_ps(dst, (__mmask16)((1u << n16) - 1u), sc);                       \
    }
SCORE_BLOCK(2)
SCORE_BLOCK(4)
SCORE_BLOCK(6)
SCORE_BLOCK(8)

/* Pass 3 for up to UB query heads (units) at once, DVC = D / 16 accumulators each (constants:
 * registers): out_i = sum over keys j in [lo[i], hi[i]], ascending, of p_i[j] v_j, where
 * p_i = s + i * nk - jlo. Each V row is read and widened once for all units. Keys every unit
 * attends to run in a loop without conditions (so the accumulators stay in registers; units
 * past ``un`` repeat the last one, their sums dropped); the few keys only some units attend
 * to (the ends of a draft's causal ranges, of windows) run before and after, in key order. */
#define PV_PASS(DVC, UB)                                                                     \
    static void pv_pass_##DVC(const float *s, int64_t nk, int64_t jlo, const int64_t *lo,   \
                              const int64_t *hi, int un, const bf16 *vh, const int64_t *table, \
                              int bs, int64_t page_elems, bf16 *const *dst) {                \
        __m512 acc[UB][DVC];                                                                 \
        int64_t a = lo[0], b = hi[0], ca = lo[0], cb = hi[0];                                \
        for (int i = 0; i < UB; i++) {                                                       \
            for (int c = 0; c < DVC; c++) acc[i][c] = _mm512_setzero_ps();                   \
            if (i < un) {                                                                    \
                a = lo[i] < a ? lo[i] : a;                                                   \
                b = hi[i] > b ? hi[i] : b;                                                   \
                ca = lo[i] > ca ? lo[i] : ca;                                                \
                cb = hi[i] < cb ? hi[i] : cb;                                                \
            }                                                                                \
        }                                                                                    \
        /* ragged keys before the common ones, the common ones, ragged keys after */         \
        const int common = ca <= cb;                                                         \
        const int64_t seg_lo[2] = {a, common ? cb + 1 : 1}, seg_hi[2] = {common ? ca - 1 : b, common ? b : 0}; \
        for (int sg = 0; sg < 2; sg++) {                                                     \
            for (int64_t j = seg_lo[sg]; j <= seg_hi[sg]; j++) {                             \
                const bf16 *vr = vh + table[j / bs] * page_elems + (j % bs) * (DVC * 16);    \
                for (int i = 0; i < un; i++) {                                               \
                    if (j < lo[i] || j > hi[i]) continue;                                    \
                    const __m512 p = _mm512_set1_ps(s[i * nk + (j - jlo)]);                  \
                    for (int c = 0; c < DVC; c++)                                            \
                        acc[i][c] = _mm512_fmadd_ps(p, _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256( \
                            (const __m256i *)(vr + c * 16))), acc[i][c]);                    \
                }                                                                            \
            }                                                                                \
            if (sg == 0 && common)                                                           \
                pv_common_##DVC(s, nk, jlo, ca, cb, un, vh, table, bs, page_elems, acc);     \
        }                                                                                    \
        for (int i = 0; i < UB && i < un; i++)                                               \
            for (int c = 0; c < DVC; c++) {                                                  \
                float tmp[16];                                                               \
                _mm512_storeu_ps(tmp, acc[i][c]);                                            \
                for (int e = 0; e < 16; e++) dst[i][c * 16 + e] = to_bf16(tmp[e]);           \
            }                                                                                \
    }
/* The keys [ca, cb] that every unit attends to, accumulated into ``acc`` (UB x DVC). */
#define PV_COMMON(DVC, UB)                                                                   \
    static inline void pv_common_##DVC(const float *s, int64_t nk, int64_t jlo, int64_t ca, \
                                       int64_t cb, int un, const bf16 *vh,                   \
                                       const int64_t *table, int bs, int64_t page_elems,     \
                                       __m512 (*acc)[DVC]) {                                 \
        __m512 r[UB][DVC];                                                                   \
        const float *p[UB];                                                                  \
        for (int i = 0; i < UB; i++) {                                                       \
            const int u = i < un ? i : un - 1;                                               \
            p[i] = s + u * nk - jlo;                                                         \
            for (int c = 0; c < DVC; c++) r[i][c] = acc[i][c];                               \
        }                                                                                    \
        int64_t j = ca;                                                                      \
        while (j <= cb) {                                                                    \
            const bf16 *page = vh + table[j / bs] * page_elems;                              \
            const int t0 = (int)(j % bs);                                                    \
            const int t1 = cb - j + 1 < bs - t0 ? (int)(cb - j + 1) + t0 : bs;               \
            for (int t = t0; t < t1; t++, j++) {                                             \
                const bf16 *vr = page + (int64_t)t * (DVC * 16);                             \
                __m512 vf[DVC];                                                              \
                for (int c = 0; c < DVC; c++)                                                \
                    vf[c] = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const __m256i *)(vr + c * 16))); \
                for (int i = 0; i < UB; i++) {                                               \
                    const __m512 pv = _mm512_set1_ps(p[i][j]);                               \
                    for (int c = 0; c < DVC; c++) r[i][c] = _mm512_fmadd_ps(pv, vf[c], r[i][c]); \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
        for (int i = 0; i < UB; i++)                                                         \
            for (int c = 0; c < DVC; c++) acc[i][c] = r[i][c];                               \
    }
PV_COMMON(4, 6)
PV_COMMON(8, 3)
PV_COMMON(12, 2)
PV_COMMON(16, 1)
PV_PASS(4, 6)
PV_PASS(8, 3)
PV_PASS(12, 2)
PV_PASS(16, 1)
#define PV_UNITS(DV) ((DV) == 4 ? 6 : (DV) == 8 ? 3 : (DV) == 12 ? 2 : 1)

/* Rows r0 .. r0 + R - 1 of one sequence (``table`` its block table; ``positions`` their R
 * positions) for KV head h. ``s`` / ``s_cap``: the calling thread's float scratch, grown as
 * needed (freed by the caller). Returns 0, or -2 when out of memory. */
int tf_decode_rows(int r0, int R, int h, const bf16 *q, int64_t q_stride, const bf16 *k_cache,
                   const bf16 *v_cache, int64_t num_blocks, int bs, const int64_t *table,
                   const int64_t *positions, int H, int Hkv, int D, int window, float scale,
                   bf16 *out, int64_t out_stride, float **s_buf, int64_t *s_cap) {
    const int G = H / Hkv, U = R * G, DV = D / 16, DC = D / 32;
    const int64_t head_stride = num_blocks * bs * D, page_elems = (int64_t)bs * D;
    int64_t lo_buf[64], hi_buf[64];               /* per unit (query head of a row) */
    const bf16 *qu_buf[64];
    int64_t *lo = lo_buf, *hi = hi_buf;
    const bf16 **qu = qu_buf;
    if (U > 64) {                                 /* more than 64 query heads per KV head */
        lo = (int64_t *)malloc(sizeof(int64_t) * 2 * (size_t)U);
        qu = (const bf16 **)malloc(sizeof(const bf16 *) * (size_t)U);
        if (!lo || !qu) { free(lo); free(qu); return -2; }
        hi = lo + U;
    }
    int64_t jlo = INT64_MAX, jhi = -1;
    for (int u = 0; u < U; u++) {
        const int64_t pos = positions[u / G];
        lo[u] = (window > 0 && pos - window + 1 > 0) ? pos - window + 1 : 0;
        hi[u] = pos;
        jlo = lo[u] < jlo ? lo[u] : jlo;
        jhi = pos > jhi ? pos : jhi;
    }
    const int64_t nk = jhi - jlo + 1;
    if (nk * U > *s_cap) {
        free(*s_buf);
        *s_cap = nk * U * 2;
        *s_buf = (float *)malloc(sizeof(float) * *s_cap);
        if (!*s_buf) {
            *s_cap = 0;
            if (U > 64) { free(lo); free(qu); }
            return -2;
        }
    }
    float *s = *s_buf;
    const bf16 *kh = k_cache + h * head_stride, *vh = v_cache + h * head_stride;
    for (int u = 0; u < U; u++)
        qu[u] = q + (int64_t)(r0 + u / G) * q_stride + (int64_t)(h * G + u % G) * D;
    /* pass 1: s[u][j - jlo] = scale * q_u . k_j for every key any row attends to (a row's
     * slice is what it alone would score: keys past a row's position are scored, not used) */
    for (int64_t jb = jlo; jb <= jhi; jb += 16) {
        const int n16 = jhi - jb + 1 < 16 ? (int)(jhi - jb + 1) : 16;
        const bf16 *kr[16];
        int64_t pg = jb / bs;
        int t = (int)(jb % bs);
        for (int i = 0; i < n16; i++) {
            kr[i] = kh + table[pg] * page_elems + (int64_t)t * D;
            if (++t == bs) { t = 0; pg++; }
        }
        for (int u = 0; u < U; u++) {
            float *dst = s + u * nk + (jb - jlo);
            switch (DC) {
                case 2: score_block_2(qu[u], kr, n16, scale, dst); break;
                case 4: score_block_4(qu[u], kr, n16, scale, dst); break;
                case 6: score_block_6(qu[u], kr, n16, scale, dst); break;
                default: score_block_8(qu[u], kr, n16, scale, dst); break;
            }
        }
    }
    /* pass 2: softmax per unit over its own keys, in float32 */
    for (int u = 0; u < U; u++) {
        float *sg = s + u * nk + (lo[u] - jlo);
        const int64_t nu = hi[u] - lo[u] + 1;
        /* the maximum, 16 lanes at a time (exact in any order; NaN skipped, as the scalar
         * ``x > mx ? x : mx`` does: max_ps returns its second operand when one is NaN) */
        __m512 mv = _mm512_set1_ps(-INFINITY);
        int64_t j = 0;
        for (; j + 16 <= nu; j += 16) mv = _mm512_max_ps(_mm512_loadu_ps(sg + j), mv);
        float mx = _mm512_reduce_max_ps(mv);
        for (; j < nu; j++) mx = sg[j] > mx ? sg[j] : mx;
        __m512 sum = _mm512_setzero_ps();
        j = 0;
        for (; j + 16 <= nu; j += 16) {
            const __m512 e = exp_neg(_mm512_sub_ps(_mm512_loadu_ps(sg + j), _mm512_set1_ps(mx)));
            _mm512_storeu_ps(sg + j, e);
            sum = _mm512_add_ps(sum, e);
        }
        float tail = 0.f;
        for (; j < nu; j++) { sg[j] = expf(sg[j] - mx); tail += sg[j]; }
        const float inv = 1.0f / (_mm512_reduce_add_ps(sum) + tail);
        for (j = 0; j < nu; j++) sg[j] *= inv;
    }
    /* pass 3: out_u = sum_j p[u][j] v_j, walking V once for PV_UNITS units */
    const int ub = PV_UNITS(DV);
    for (int u0 = 0; u0 < U; u0 += ub) {
        const int un = U - u0 < ub ? U - u0 : ub;
        bf16 *dst[6];
        for (int i = 0; i < un; i++) {
            const int u = u0 + i;
            dst[i] = out + (int64_t)(r0 + u / G) * out_stride + (int64_t)(h * G + u % G) * D;
        }
        const float *su = s + u0 * nk;
        switch (DV) {
            case 4: pv_pass_4(su, nk, jlo, lo + u0, hi + u0, un, vh, table, bs, page_elems, dst); break;
            case 8: pv_pass_8(su, nk, jlo, lo + u0, hi + u0, un, vh, table, bs, page_elems, dst); break;
            case 12: pv_pass_12(su, nk, jlo, lo + u0, hi + u0, un, vh, table, bs, page_elems, dst); break;
            default: pv_pass_16(su, nk, jlo, lo + u0, hi + u0, un, vh, table, bs, page_elems, dst); break;
        }
    }
    if (U > 64) { free(lo); free(qu); }
    return 0;
}

/* One (sequence, KV head) task of decode attention: tf_decode_rows for one row. */
int tf_decode_task(int task, const bf16 *q, int64_t q_stride, const bf16 *k_cache,
                   const bf16 *v_cache, int64_t num_blocks, int bs, const int64_t *tables,
                   int64_t table_stride, const int64_t *positions, int H, int Hkv, int D,
                   int window, float scale, bf16 *out, int64_t out_stride, float **s_buf,
                   int64_t *s_cap) {
    const int seq = task / Hkv, h = task % Hkv;
    return tf_decode_rows(seq, 1, h, q, q_stride, k_cache, v_cache, num_blocks, bs,
                          tables + seq * table_stride, positions + seq, H, Hkv, D, window, scale,
                          out, out_stride, s_buf, s_cap);
}

/* Which rows attend together (tf_decode_rows): a row that continues the one before it -- the
 * next position, the same pages up to its own -- joins its group (a token and the drafts
 * verified with it), so that each K/V row is read once per group instead of once per row.
 * Any grouping gives the same numbers (each row's arithmetic is its own), so this is a
 * matter of speed only. With more threads than tasks to share out, groups are halved (a K/V
 * row then read twice) so that no thread idles. Writes (first row, rows) pairs into
 * ``pieces`` (room for 2 B ints); returns how many. */
int tf_decode_pieces(int B, int G, int Hkv, int bs, const int64_t *tables,
                            int64_t table_stride, const int64_t *positions, int *pieces) {
    const int max_rows = 64 / G < 8 ? (64 / G > 1 ? 64 / G : 1) : 8;   /* rows x G <= 64 */
    int n = 0;
    for (int b = 0; b < B;) {
        int e = b + 1;
        while (e < B && e - b < max_rows && positions[e] == positions[e - 1] + 1
               && memcmp(tables + (int64_t)b * table_stride, tables + (int64_t)e * table_stride,
                         sizeof(int64_t) * (size_t)(positions[e] / bs + 1)) == 0)
            e++;
        pieces[2 * n] = b;
        pieces[2 * n + 1] = e - b;
        n++;
        b = e;
    }
    const int threads = omp_get_max_threads();
    if (threads > 1 && n * Hkv < 2 * threads) {
        int m = n;
        for (int i = 0; i < n; i++) {
            const int rows = pieces[2 * i + 1];
            if (rows < 2) continue;
            pieces[2 * i + 1] = rows / 2;
            pieces[2 * m] = pieces[2 * i] + rows / 2;
            pieces[2 * m + 1] = rows - rows / 2;
            m++;
        }
        n = m;
    }
    return n;
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
    int *pieces = (int *)malloc(sizeof(int) * 2 * (size_t)b);
    if (!pieces) return -2;
    const int npieces = tf_decode_pieces(b, H / Hkv, Hkv, bs, tables, table_stride, positions,
                                         pieces);
    int status = 0;
#pragma omp parallel
    {
        float *s = NULL;
        int64_t s_cap = 0;
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < npieces * Hkv; task++) {
            const int r0 = pieces[2 * (task / Hkv)], rows = pieces[2 * (task / Hkv) + 1];
            if (tf_decode_rows(r0, rows, task % Hkv, q, q_stride, k_cache, v_cache, num_blocks,
                               bs, tables + r0 * table_stride, positions + r0, H, Hkv, D,
                               window, scale, out, out_stride, &s, &s_cap) != 0)
                status = -2;
        }
        free(s);
    }
    free(pieces);
    return status;
}
