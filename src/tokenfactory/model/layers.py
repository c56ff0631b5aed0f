"""Building blocks of the decoder: RMSNorm, paged attention, gated MLP.

Shapes use T for the number of tokens in the step (all sequences flattened), H query heads,
Hkv key/value heads, G = H / Hkv queries per KV head, D head_dim.

The KV cache of one layer is two tensors of shape (Hkv, num_blocks + 1, block_size, D) (the
last page is scratch for padded rows, see ``TorchExecutor.initialize_cache``): head-major,
so that one KV head's page is a contiguous (block_size, D) block. A token at position p of a
sequence lives in page ``block_ids[p // block_size]`` at slot ``p % block_size``; the runner
turns that into one flat slot index per token (``page * block_size + slot``), so new K/V are
written with a single ``index_copy_`` along the (num_blocks * block_size) axis.

int8 KV pages (``kv_cache_dtype="int8"``, see ``kv_pages.py``) hold (Hkv, num_blocks + 1,
block_size, D + 4) int8 rows: D codes and the row's float32 scale. New K/V are quantized as
they are written; decodes and prefill chunks read the pages in the native int8 kernel
(``kernels/kv_int8.py``; a chunk's tokens are its rows, one position each) or gather and
dequantize them, and prefill chunks always attend through the pages (their own fresh K/V
included), so a token's output does not depend on how the prompt was chunked or which pages
came from the prefix cache.

Why head-major: gathering a batch's pages with ``index_select`` then yields (Hkv, B, L, D)
directly, which is already the (Hkv * B, L, D) batch of matrices that ``bmm`` wants; with a
(num_blocks, block_size, Hkv, D) layout every gather would need another transposing copy.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tokenfactory.model import kernels
from tokenfactory.model.kernels import kv_int8
from tokenfactory.model.kv_pages import dequantize_int8_rows, quantize_int8_rows
from tokenfactory.model.linear_kernels import NativeLinear


class RMSNorm(nn.Module):
    """y = w * x / rms(x). One fused kernel (accumulating in float32); in float32 it equals
    transformers' formula exactly, in bfloat16 it rounds once where transformers rounds twice."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps
        self.shape = (dim,)
        self.fused = False   # add_norm in one native call (bfloat16 CPU; set by the runner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.shape, self.weight, self.eps)

    def native_weight(self) -> int | None:
        """The address of the weight for the native decode step (bfloat16, contiguous, CPU),
        or None: then the model decodes with torch ops."""
        w = self.weight
        if w.dtype != torch.bfloat16 or w.device.type != "cpu" or not w.is_contiguous():
            return None
        return w.data_ptr()

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add and this norm: (x + delta, norm(x + delta)); delta None: (x,
        norm(x)). x, delta: (T, dim). When ``fused``, one native call that updates x in place
        (a deep, thin model's prefill otherwise spends as long in these small ops, ~70 us
        each, as in its attention)."""
        if (self.fused and x.dim() == 2 and x.stride(1) == 1
                and (delta is None or delta.stride(-1) == 1)):
            return x, kernels.add_rms_norm(x, delta, self.weight, self.eps)
        if delta is not None:
            x = x + delta
        return x, self(x)


class CpuLinear(nn.Module):
    """A bfloat16 linear layer for CPUs, picking the fastest kernel for each batch size.

    Up to ``kernels.LINEAR_MAX_ROWS`` rows (decode steps) it runs the native small-batch kernel,
    which reads every weight byte once at memory bandwidth; stock ``F.linear`` reaches 10-20
    GB/s on this CPU at batch 1 in bfloat16, oneDNN with pre-packed weights 20-25 GB/s, the
    native kernel ~36 GB/s from huge-page memory (see kernels/linear.c). Larger batches
    (prefill chunks, big decode batches) use oneDNN on the plain weight. (A pre-packed copy
    for oneDNN was 15-30% faster at 16-64 rows but cost a second copy of the weights; off by
    default since offline throughput measured the same with and without, so removed.)

    The native decode step takes the weight through :meth:`native_linear`.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        self.native = kernels.supports_linear(self.weight.dtype, self.in_features)
        # up to this many rows the native kernel runs, oneDNN above; set per CPU by
        # model/kernel_choice.py (0: oneDNN always, as on CPUs where its GEMMs win)
        self.native_max_rows = kernels.LINEAR_MAX_ROWS if self.native else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows <= self.native_max_rows:
            x2 = x.reshape(rows, self.in_features)
            if x2.stride(1) != 1:
                x2 = x2.contiguous()
            y = kernels.linear(x2, self.weight, self.bias)
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def native_linear(self) -> NativeLinear | None:
        """This layer for the native decode step (kind "bf16", see linear_kernels.py); None
        where the native kernel cannot take it (input width, no library, not on the CPU)."""
        w, b = self.weight, self.bias
        if (not self.native or w.dtype != torch.bfloat16 or w.device.type != "cpu"
                or not w.is_contiguous() or (b is not None and not b.is_contiguous())):
            return None
        return NativeLinear("bf16", w.data_ptr(), 0, 0 if b is None else b.data_ptr(),
                            self.out_features, self.in_features, owner=self)


def can_use_cpu_linears(dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()


def use_cpu_linears(module: nn.Module) -> int:
    """Replace every ``nn.Linear`` under ``module`` by a :class:`CpuLinear`. Returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, CpuLinear(child))
            count += 1
        else:
            count += use_cpu_linears(child)
    return count


@dataclass
class PrefillSeq:
    """One multi-token chunk: tokens [offset, offset + num_tokens) of the step's flat batch,
    at positions start .. start + num_tokens - 1 of a sequence whose pages are ``block_ids``."""
    offset: int
    num_tokens: int
    start: int
    block_ids: torch.Tensor          # (num_pages,) int64, pages covering positions [0, end)
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)  # window -> mask
    gather_index: torch.Tensor | None = None   # built by the first layer, reused by the rest

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


class Workspace:
    """Reusable scratch buffers for the page gathers. Large temporaries freshly allocated each
    layer cost a page fault per 4 KiB (glibc hands out new mmaps above 32 MiB), which made the
    gathers run at ~3 GB/s; reusing one buffer keeps them near memory bandwidth."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = 1
        for n in shape:
            numel *= n
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(int(numel * 1.25) + 1, dtype=like.dtype, device=like.device)
            self._buffers[name] = buf
        return buf[:numel].view(shape)


@dataclass
class DecodeGroup:
    """Single-token decodes in rows [start, end) of the flat batch, attending to their first
    ``block_tables.shape[1]`` pages. Decodes are grouped by context length so that padding every
    table to the group's longest sequence wastes little gather and attention work."""
    start: int
    end: int
    block_tables: torch.Tensor       # (b, pages) int64, padded with any valid page
    positions: torch.Tensor          # (b,) int64
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)  # window -> mask

    gather_index: torch.Tensor | None = None   # built by the first layer, reused by the rest

    def mask(self, window: int | None, block_size: int) -> torch.Tensor:
        """(1, b, 1, pages * block_size) float32 additive mask: 0 where a row may attend, -inf
        elsewhere (padding pages, future slots, outside the sliding window)."""
        mask = self.masks.get(window)
        if mask is None:
            length = self.block_tables.shape[1] * block_size
            kv_pos = torch.arange(length, device=self.positions.device)[None, :]   # (1, L)
            q_pos = self.positions[:, None]                                        # (b, 1)
            allowed = kv_pos <= q_pos
            if window is not None:
                allowed &= kv_pos > q_pos - window
            mask = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
            mask = mask.masked_fill_(~allowed, float("-inf"))[None, :, None, :]
            self.masks[window] = mask
        return mask


@dataclass
class AttentionMetadata:
    """Where this step's tokens go and what they attend to. Built once per step by the runner.

    The flat batch holds the single-token decodes first (``num_decodes`` of them, in
    ``decode_groups``), then the multi-token chunks in ``prefills``.
    """
    block_size: int
    slot_mapping: torch.Tensor                    # (T,) int64 flat cache slot of each token
    num_decodes: int = 0
    decode_groups: list[DecodeGroup] = field(default_factory=list)
    prefills: list[PrefillSeq] = field(default_factory=list)
    workspace: Workspace | None = None            # None: allocate gathers afresh
    # whether attention may take the native kernels (where they run at all): chosen per CPU
    # by model/kernel_choice.py
    native_prefill: bool = True
    native_decode: bool = True

    def prefill_mask(self, seq: PrefillSeq, window: int | None) -> torch.Tensor:
        """(num_tokens, end) bool: which key positions each query token may attend to."""
        mask = seq.masks.get(window)
        if mask is None:
            dev = seq.block_ids.device
            kv_pos = torch.arange(seq.end, device=dev)[None, :]              # (1, end)
            q_pos = torch.arange(seq.start, seq.end, device=dev)[:, None]    # (n, 1)
            mask = kv_pos <= q_pos
            if window is not None:
                mask &= kv_pos > q_pos - window
            seq.masks[window] = mask
        return mask


def _flat_page_index(pages: torch.Tensor, num_kv: int, num_pages: int) -> torch.Tensor:
    """Row indices of ``pages`` for every KV head in the (Hkv * N, bs * D) view of a cache."""
    heads = torch.arange(num_kv, device=pages.device)[:, None]
    return (heads * num_pages + pages[None, :]).flatten()                    # (Hkv * n,)


def _gather_pages(cache: torch.Tensor, index: torch.Tensor, meta: AttentionMetadata,
                  name: str) -> torch.Tensor:
    """cache (Hkv, N, bs, D) -> (Hkv, n, bs, D) for the flat ``index`` from
    :func:`_flat_page_index`, into a reused buffer if there is a workspace.

    Gathers rows of the flattened (Hkv * N, bs * D) cache: index_select along dim 0 copies
    whole contiguous pages and runs 2-3x faster than selecting along dim 1."""
    hkv, num_pages, bs, d = cache.shape
    flat = cache.view(hkv * num_pages, bs * d)
    if meta.workspace is None:
        return flat.index_select(0, index).view(hkv, -1, bs, d)
    out = meta.workspace.get(name, (index.shape[0], bs * d), cache)
    return torch.index_select(flat, 0, index, out=out).view(hkv, -1, bs, d)


def _read_pages(cache: torch.Tensor, index: torch.Tensor, meta: AttentionMetadata, name: str,
                dtype: torch.dtype) -> torch.Tensor:
    """:func:`_gather_pages` as (Hkv, n, bs, D) ``dtype``: int8 pages are gathered (into their
    own workspace buffers) and dequantized."""
    if cache.dtype != torch.int8:
        return _gather_pages(cache, index, meta, name)
    return dequantize_int8_rows(_gather_pages(cache, index, meta, name + "8"), dtype)


_native_ok: dict[tuple[torch.dtype, int], bool] = {}


def _write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              slot_mapping: torch.Tensor) -> None:
    """Store the step's K/V (T, Hkv, D) at their flat slots of the (Hkv, N, bs, D) caches;
    int8 caches get quantized rows (T, Hkv, D + 4)."""
    if k_cache.dtype == torch.int8:
        k, v = quantize_int8_rows(k), quantize_int8_rows(v)
    num_kv, row = k.shape[1], k.shape[2]
    k_cache.view(num_kv, -1, row).index_copy_(1, slot_mapping, k.transpose(0, 1))
    v_cache.view(num_kv, -1, row).index_copy_(1, slot_mapping, v.transpose(0, 1))


def _native_attention(q: torch.Tensor) -> bool:
    """Whether attention for this dtype and head size runs in the native kernels."""
    key = (q.dtype, q.shape[-1])
    ok = _native_ok.get(key)
    if ok is None:
        ok = _native_ok[key] = q.device.type == "cpu" and kernels.supports(*key)
    return ok


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    window: int | None, scale: float) -> torch.Tensor:
    """Write this step's K/V into the cache, then attend. q: (T, H, D); k, v: (T, Hkv, D);
    caches (Hkv, num_blocks, block_size, D), or int8 (.., D + 4) (see the module docstring).
    Returns (T, H, D).

    Grouped-query attention folds the G query heads that share a KV head into the query axis
    ([Hkv, .., G, D]) instead of repeating K/V (or SDPA's enable_gqa, ~10x slower in bfloat16).
    In bfloat16 on CPUs with AVX-512 BF16, decodes and prefill chunks run in native kernels
    (model/kernels) that read K/V through the block tables. Otherwise decodes use two batched
    matmuls around a float32 softmax (SDPA's CPU flash kernel runs at a few GB/s when each
    head has only G query rows) and prefill chunks use SDPA.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv = k.shape[1]
    group = num_heads // num_kv
    bs = meta.block_size
    single = len(meta.decode_groups) == 1 and meta.num_decodes == num_tokens
    quantized = k_cache.dtype == torch.int8
    native_ok = not quantized and _native_attention(q)   # the bfloat16 kernels
    native = native_ok and meta.native_decode          # for the decode groups
    native8 = quantized and kv_int8.supports(q)         # int8 pages, read as they are
    _write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    out = None if single else q.new_empty(q.shape)

    # native decode kernels (bfloat16 pages on AVX-512 BF16, or int8 pages read as they are):
    # K/V read through the block tables, no copy, written straight into this group's rows of
    # the step's output
    decode_kernel = (kernels.decode_attention if native
                     else kv_int8.decode_attention if native8 else None)
    for dg in meta.decode_groups:
        if decode_kernel is not None:
            qd = q[dg.start:dg.end]
            od = q.new_empty(qd.shape) if out is None else out[dg.start:dg.end]
            decode_kernel(qd, k_cache, v_cache, dg.block_tables, dg.positions, window, scale, od)
            if out is None:
                return od
            continue
        b, tables = dg.end - dg.start, dg.block_tables                       # (b, P)
        length = tables.shape[1] * bs
        if dg.gather_index is None:
            dg.gather_index = _flat_page_index(tables.flatten(), num_kv, k_cache.shape[1])
        kd = _read_pages(k_cache, dg.gather_index, meta, "k", q.dtype).view(num_kv * b, length,
                                                                            head_dim)
        vd = _read_pages(v_cache, dg.gather_index, meta, "v", q.dtype).view(num_kv * b, length,
                                                                            head_dim)
        qd = q[dg.start:dg.end].reshape(b, num_kv, group, head_dim).transpose(0, 1)
        qd = qd.reshape(num_kv * b, group, head_dim)                        # (Hkv*b, G, D)
        scores = torch.bmm(qd, kd.transpose(1, 2)).view(num_kv, b, group, length)
        scores = scores.float() * scale + dg.mask(window, bs)               # (Hkv, b, G, L)
        probs = torch.softmax(scores, dim=-1).to(q.dtype).view(num_kv * b, group, length)
        od = torch.bmm(probs, vd).view(num_kv, b, group, head_dim)          # (Hkv, b, G, D)
        od = od.transpose(0, 1).reshape(b, num_heads, head_dim)
        if out is None:   # one group of decodes and nothing else
            return od
        out[dg.start:dg.end] = od

    for seq in meta.prefills:
        rows = slice(seq.offset, seq.offset + seq.num_tokens)
        n = seq.num_tokens
        if native_ok and meta.native_prefill:
            # one kernel, no gathered copy
            size = kernels.workspace_numel(num_kv, seq.end, head_dim)
            ws = None if meta.workspace is None else (meta.workspace.get("kp", (size,), q),
                                                      meta.workspace.get("vp", (size,), q))
            kernels.prefill_attention(q[rows], k_cache, v_cache, seq.block_ids, seq.start,
                                      window, scale, out[rows], ws)
            continue
        if native8:   # int8 pages: every token of the chunk is a row of the int8 decode
            # kernel at its own position, all rows on the sequence's one block table. It beat
            # gathering + dequantizing the pages for SDPA at every size measured (1-512 rows,
            # 0-2K cached, SmolLM2 shapes, one thread: 1.8-40x at 2K, ~1.8x for a 512 prompt).
            kv_int8.decode_attention(q[rows], k_cache, v_cache, seq.block_ids[None].expand(n, -1),
                                     torch.arange(seq.start, seq.end), window, scale, out[rows])
            continue
        if seq.start == 0 and not quantized:   # nothing cached before: the fresh K/V
            ks, vs = k[rows].transpose(0, 1), v[rows].transpose(0, 1)        # (Hkv, n, D)
        else:                # read positions [0, end) through the block table
            if seq.gather_index is None:
                seq.gather_index = _flat_page_index(seq.block_ids, num_kv, k_cache.shape[1])
            ks = _read_pages(k_cache, seq.gather_index, meta, "k", q.dtype).view(num_kv, -1,
                                                                                 head_dim)
            vs = _read_pages(v_cache, seq.gather_index, meta, "v", q.dtype).view(num_kv, -1,
                                                                                 head_dim)
            ks, vs = ks[:, :seq.end], vs[:, :seq.end]                        # (Hkv, end, D)
        if group > 1:  # many query rows: repeating K/V per query head is cheap, and keeps
            ks = ks.repeat_interleave(group, dim=0)    # SDPA on its fast flash path
            vs = vs.repeat_interleave(group, dim=0)                          # (H, end, D)
        qs = q[rows].transpose(0, 1)[None]                                   # (1, H, n, D)
        if seq.start == 0 and window is None:
            os_ = F.scaled_dot_product_attention(qs, ks[None], vs[None], is_causal=True,
                                                 scale=scale)
        else:
            os_ = F.scaled_dot_product_attention(qs, ks[None], vs[None],
                                                 attn_mask=meta.prefill_mask(seq, window),
                                                 scale=scale)                # (1, H, n, D)
        out[rows] = os_[0].transpose(0, 1)                                  # (n, H, D)
    return out


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul."""

    def __init__(self, hidden: int, intermediate: int, bias: bool):
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (a scalar native silu * up measured 7x slower than these two vectorized torch ops)
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)
