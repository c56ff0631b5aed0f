/* One decoder layer for a batch of single-token decodes, in one call.
 *
 * Why it exists: a decode step at batch 1 streams every weight once; at this host's 35-70
 * GB/s that is 2.5-5 ms for a 100M-parameter model, while running the same layer as ~15
 * separate torch ops (or ~5 custom ops inside a torch.compile graph) adds 1-3 ms of dispatch,
 * Python and thread fork/join per step. Here the whole layer runs inside one OpenMP parallel
 * region: RMSNorm, q/k/v projection (+ bias), optional per-head q/k RMSNorm (Qwen3), RoPE, the
 * K/V write into the paged cache, attention over the pages (attention.c), output projection,
 * residual, RMSNorm, gate/up projection, SiLU * up, down projection, residual. Each projection
 * is a descriptor of whatever its module offers (model/linear_kernels.py), run by tf_linear_any:
 * linear.c's bandwidth-bound bfloat16 rows, or quant.c's kernels for GGUF/int8 weights; phases
 * are separated by the worksharing barriers.
 *
 * Rounding follows the torch path op for op: every op's result is rounded to bfloat16 once
 * (RoPE once for x * cos + rotate(x) * sin, as tf_rope_rows does in prefill steps).
 *
 * Rows are independent computations: a row's numbers never depend on which other rows share
 * the step (linear.c's tiles and attention.c's row groups keep each row's arithmetic its
 * own). So a speculative step -- a token and its drafts as consecutive rows of one sequence,
 * every layer's K/V written for all rows before any row attends -- yields at each position
 * exactly the logits plain decoding yields there, while the weights are read once for all
 * rows and each group of rows reads its K/V pages once.
 */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>

#include "kernels.h"

/* One layer as its modules offer it (native_step.py): norms' bfloat16 weights (q/k norm NULL
 * where absent), each linear as a descriptor of its kind (linear_kernels.py), the KV pages. */
typedef struct {
    const bf16 *input_norm, *q_norm, *k_norm, *post_norm;
    tf_linear_desc qkv, o, gate_up, down;
    bf16 *k_cache, *v_cache;     /* (Hkv, num_blocks + 1, block_size, D) each */
    int64_t window;              /* sliding window, 0 = none */
} tf_layer;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, intermediate, num_blocks, block_size;
    float eps, scale;
} tf_dims;

/* out[i] = x[i] * rsqrt(mean(x^2) + eps) * w[i], accumulated in float32, rounded once. */
static void rms_norm(const bf16 *x, int n, const bf16 *w, float eps, bf16 *out) {
    float ss = 0.f;
    for (int i = 0; i < n; i++) {
        const float v = from_bf16(x[i]);
        ss += v * v;
    }
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = to_bf16(from_bf16(x[i]) * r * from_bf16(w[i]));
}

/* One head in place: optional RMSNorm (rounded), then RoPE with cos/sin rows of D (sin's
 * first half already negated, see rope.py): x * cos + [x2, x1] * sin. */
static void norm_rope(bf16 *h, int D, const bf16 *norm_w, float eps, const bf16 *cos,
                      const bf16 *sin) {
    if (norm_w) rms_norm(h, D, norm_w, eps, h);
    float tmp[512];                       /* D <= 256 (tf_attention_supported) */
    for (int i = 0; i < D; i++) tmp[i] = from_bf16(h[i]);
    const int half = D / 2;
    for (int i = 0; i < D; i++) {
        const float swapped = tmp[i < half ? i + half : i - half];
        h[i] = to_bf16(tmp[i] * from_bf16(cos[i]) + swapped * from_bf16(sin[i]));
    }
}

/* Whether descriptor L is a supported kind of shape (out, in). */
static int linear_ok(const tf_linear_desc *L, int64_t out, int64_t in) {
    return L->out == out && L->in == in && L->weight != NULL && in % 32 == 0
           && tf_linear_kind_supported((int)L->kind);
}

/* x (B, hidden) is the residual stream, updated in place. cos/sin: tables of D-wide rows,
 * sequence b using row rope_rows[b] (the position, for a table over all positions); slots (B,) flat
 * cache slots (page * block_size + offset) of the new tokens; tables (B, num_pages) with a
 * row stride; positions (B,). work: B * (2 hidden + (heads + 2 kv_heads) D + heads D +
 * 3 intermediate) bfloat16 scratch; fwork: B * (largest out of a quantized linear) floats.
 * pieces: npieces (first row, rows) pairs of rows attending together (attention_pieces).
 * Returns 0, -1 (unsupported shapes), -2 (out of memory),
 * -3 (a position past its block table). */
static int decode_layer(const tf_layer *L, const tf_dims *d, int B, bf16 *x, const bf16 *cos,
                        const bf16 *sin, const int64_t *rope_rows, const int64_t *slots,
                        const int64_t *tables, int64_t table_stride, int64_t num_pages,
                        const int64_t *positions, const int *pieces, int npieces, bf16 *work,
                        float *fwork) {
    const int H = (int)d->hidden, NH = (int)d->heads, NKV = (int)d->kv_heads, D = (int)d->head_dim;
    const int I = (int)d->intermediate, NQ = NH * D, NQKV = (NH + 2 * NKV) * D;
    const int check = tf_decode_check(B, NH, NKV, D, (int)d->block_size, num_pages, positions);
    if (check != 0) return check;
    if (!linear_ok(&L->qkv, NQKV, H) || !linear_ok(&L->o, H, NQ) || !linear_ok(&L->gate_up, 2 * I, H)
        || !linear_ok(&L->down, H, I))
        return -1;
    bf16 *xn = work, *qkv = xn + (int64_t)B * H, *att = qkv + (int64_t)B * NQKV;
    bf16 *gu = att + (int64_t)B * NQ, *act = gu + (int64_t)B * 2 * I, *tmp = act + (int64_t)B * I;
    const int64_t head_stride = d->num_blocks * d->block_size * D;
    int status = 0;

#pragma omp parallel
    {
        float *s = NULL;
        int64_t s_cap = 0;
#pragma omp single
        for (int b = 0; b < B; b++) rms_norm(x + (int64_t)b * H, H, L->input_norm, d->eps, xn + (int64_t)b * H);

        tf_linear_any(&L->qkv, xn, H, B, qkv, NULL, NQKV, fwork);

#pragma omp for schedule(static)
        for (int b = 0; b < B; b++) {   /* q/k norm + RoPE, then K/V into the cache */
            bf16 *row = qkv + (int64_t)b * NQKV;
            const bf16 *c = cos + rope_rows[b] * D, *sn = sin + rope_rows[b] * D;
            for (int h = 0; h < NH; h++) norm_rope(row + h * D, D, L->q_norm, d->eps, c, sn);
            for (int h = 0; h < NKV; h++) {
                bf16 *k = row + NQ + h * D;
                norm_rope(k, D, L->k_norm, d->eps, c, sn);
                memcpy(L->k_cache + h * head_stride + slots[b] * D, k, sizeof(bf16) * D);
                memcpy(L->v_cache + h * head_stride + slots[b] * D, row + NQ + NKV * D + h * D,
                       sizeof(bf16) * D);
            }
        }

#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < npieces * NKV; task++) {
            const int r0 = pieces[2 * (task / NKV)], rows = pieces[2 * (task / NKV) + 1];
            if (tf_decode_rows(r0, rows, task % NKV, qkv, NQKV, L->k_cache, L->v_cache,
                               d->num_blocks, (int)d->block_size, tables + r0 * table_stride,
                               positions + r0, NH, NKV, D, (int)L->window, d->scale, att, NQ,
                               &s, &s_cap) != 0)
                status = -2;
        }

        tf_linear_any(&L->o, att, NQ, B, tmp, NULL, H, fwork);

#pragma omp single
        for (int b = 0; b < B; b++) {
            bf16 *xr = x + (int64_t)b * H;
            for (int i = 0; i < H; i++) xr[i] = to_bf16(from_bf16(xr[i]) + from_bf16(tmp[(int64_t)b * H + i]));
            rms_norm(xr, H, L->post_norm, d->eps, xn + (int64_t)b * H);
        }

        tf_linear_any(&L->gate_up, xn, H, B, gu, NULL, 2 * I, fwork);

#pragma omp for schedule(static)
        for (int64_t j = 0; j < (int64_t)B * I; j++) {
            const int64_t b = j / I, i = j % I;
            const float g = from_bf16(gu[b * 2 * I + i]);
            const float silu = from_bf16(to_bf16(g / (1.0f + expf(-g))));
            act[j] = to_bf16(silu * from_bf16(gu[b * 2 * I + I + i]));
        }

        tf_linear_any(&L->down, act, I, B, tmp, NULL, H, fwork);

#pragma omp for schedule(static)
        for (int64_t j = 0; j < (int64_t)B * H; j++)
            x[j] = to_bf16(from_bf16(x[j]) + from_bf16(tmp[j]));
        free(s);
    }
    return status;
}

/* A whole decode step: embedding rows of ``ids`` -> every layer -> final RMSNorm -> lm_head,
 * into float32 ``logits`` (B, lm_head->out) (float32 sums, not rounded to bfloat16: see
 * linear.c). ``embed`` and ``lm_head`` are descriptors of any kind (a quantized embedding row
 * is dequantized on lookup) and may share one table (tied). Scratch: ``x`` (B, hidden),
 * ``work`` and ``fwork`` (see decode_layer; for a quantized lm_head B * vocab floats). */
int tf_decode_step(const tf_layer *layers, int num_layers, const tf_dims *d, int B,
                   const int64_t *ids, const tf_linear_desc *embed, const bf16 *final_norm,
                   const tf_linear_desc *lm_head, bf16 *x, const bf16 *cos, const bf16 *sin,
                   const int64_t *rope_rows, const int64_t *slots, const int64_t *tables,
                   int64_t table_stride, int64_t num_pages, const int64_t *positions, bf16 *work,
                   float *fwork, float *logits) {
    const int H = (int)d->hidden, vocab = (int)lm_head->out;
    if (embed->in != H || !linear_ok(lm_head, vocab, H)
        || !(embed->kind == TF_KIND_BF16 || embed->kind == TF_KIND_Q8_0
             || embed->kind == TF_KIND_Q4_0 || embed->kind == TF_KIND_Q4_1
             || (embed->kind == TF_KIND_INT8 && embed->scales)))
        return -1;
    const int check = tf_decode_check(B, (int)d->heads, (int)d->kv_heads, (int)d->head_dim,
                                      (int)d->block_size, num_pages, positions);
    if (check != 0) return check;
    for (int b = 0; b < B; b++) {
        if (ids[b] < 0 || ids[b] >= embed->out) return -1;
        tf_table_row(embed, ids[b], x + (int64_t)b * H);
    }
    int *pieces = (int *)malloc(sizeof(int) * 2 * (size_t)B);
    if (!pieces) return -2;
    const int npieces = tf_decode_pieces(B, (int)(d->heads / d->kv_heads), (int)d->kv_heads,
                                         (int)d->block_size, tables, table_stride, positions,
                                         pieces);
    for (int i = 0; i < num_layers; i++) {
        const int rc = decode_layer(layers + i, d, B, x, cos, sin, rope_rows, slots, tables,
                                    table_stride, num_pages, positions, pieces, npieces, work,
                                    fwork);
        if (rc != 0) {
            free(pieces);
            return rc;
        }
    }
    free(pieces);
    for (int b = 0; b < B; b++)
        rms_norm(x + (int64_t)b * H, H, final_norm, d->eps, work + (int64_t)b * H);
#pragma omp parallel
    tf_linear_any(lm_head, work, H, B, NULL, logits, vocab, fwork);
    return 0;
}

/* The residual add and the next RMSNorm of a multi-token (prefill) step as one call, for the
 * torch-op layers: x (M, H) += delta (each sum rounded to bfloat16, as a bfloat16 add would;
 * delta may be NULL), then out = RMSNorm(x) * w (see rms_norm). Two torch ops each (the norm
 * alone is five: upcast, pow, mean, rsqrt, mul) cost ~70 us per call at a few rows; this is
 * a few us. Returns 0. */
int tf_add_rms_norm(bf16 *x, int64_t x_stride, const bf16 *delta, int64_t delta_stride, int M,
                    int H, const bf16 *w, float eps, bf16 *out, int64_t out_stride) {
#pragma omp parallel for schedule(static) if (M >= 16)
    for (int m = 0; m < M; m++) {
        bf16 *xr = x + (int64_t)m * x_stride;
        if (delta) {
            const bf16 *dr = delta + (int64_t)m * delta_stride;
            for (int i = 0; i < H; i++) xr[i] = to_bf16(from_bf16(xr[i]) + from_bf16(dr[i]));
        }
        rms_norm(xr, H, w, eps, out + (int64_t)m * out_stride);
    }
    return 0;
}

/* RoPE in place over T rows of `heads` D-wide heads (row stride x_stride elements), row t
 * rotated by cos/sin row t (tables (T, D), see norm_rope): one call for the q and k heads of
 * a prefill chunk instead of torch's cat, three multiplies and an add. Returns 0, or -1 when
 * D is unsupported. */
int tf_rope_rows(bf16 *x, int64_t x_stride, int T, int heads, int D, const bf16 *cos,
                 const bf16 *sin) {
    if (D <= 0 || D > 512 || D % 2) return -1;
#pragma omp parallel for schedule(static) if (T >= 16)
    for (int t = 0; t < T; t++)
        for (int h = 0; h < heads; h++)
            norm_rope(x + (int64_t)t * x_stride + (int64_t)h * D, D, NULL, 0.f,
                      cos + (int64_t)t * D, sin + (int64_t)t * D);
    return 0;
}
