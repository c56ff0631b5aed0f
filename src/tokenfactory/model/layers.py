"""Building blocks of the decoder: RMSNorm, paged attention, gated MLP.

Shapes use T for the number of tokens in the step (all sequences flattened), H query heads,
Hkv key/value heads, G = H / Hkv queries per KV head, D head_dim.

The KV cache of one layer is two tensors of shape (num_blocks, block_size, Hkv, D). A token at
position p of a sequence lives in page ``block_ids[p // block_size]`` at slot
``p % block_size``; the runner turns that into one flat slot index per token
(``page * block_size + slot``) so new K/V are written with a single ``index_copy_``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = w * x / rms(x). One fused kernel (accumulating in float32); in float32 it equals
    transformers' formula exactly, in bfloat16 it rounds once where transformers rounds twice."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps
        self.shape = (dim,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.shape, self.weight, self.eps)


@torch.library.custom_op("tokenfactory::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed_weight: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T + b with W pre-packed by ``mkldnn._reorder_linear_weight``. A custom op so that
    torch.compile treats it as one opaque kernel call instead of re-lowering it."""
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


@packed_linear.register_fake
def _(x, packed_weight, bias):
    return x.new_empty((*x.shape[:-1], packed_weight.shape[0]))


class PackedLinear(nn.Module):
    """A linear layer whose weight is stored pre-packed in oneDNN's blocked layout.

    Stock ``F.linear`` reaches 10-20 GB/s on this CPU at batch 1 in bfloat16; the pre-packed
    weight reaches ~30 GB/s (see docs in shared/reference/cpu-performance.md). Same math as
    ``nn.Linear`` (bit-identical in bfloat16 in our checks)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed_weight",
                             torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1))
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed_weight, self.bias)


def can_pack_linears(dtype: torch.dtype, device: torch.device) -> bool:
    return (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def pack_linears(module: nn.Module) -> int:
    """Replace every ``nn.Linear`` under ``module`` by a :class:`PackedLinear`. Returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(child))
            count += 1
        else:
            count += pack_linears(child)
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

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


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

    def mask(self, window: int | None, block_size: int) -> torch.Tensor:
        """(b, 1, 1, pages * block_size) bool: key positions each row may attend to."""
        mask = self.masks.get(window)
        if mask is None:
            length = self.block_tables.shape[1] * block_size
            kv_pos = torch.arange(length, device=self.positions.device)[None, :]   # (1, L)
            q_pos = self.positions[:, None]                                        # (b, 1)
            mask = kv_pos <= q_pos
            if window is not None:
                mask &= kv_pos > q_pos - window
            mask = self.masks[window] = mask[:, None, None, :]
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

    def prefill_mask(self, seq: PrefillSeq, window: int | None, group: int) -> torch.Tensor:
        """(num_tokens * G, end) bool: query rows ordered (token, group member)."""
        mask = seq.masks.get(window)
        if mask is None:
            dev = seq.block_ids.device
            kv_pos = torch.arange(seq.end, device=dev)[None, :]              # (1, end)
            q_pos = torch.arange(seq.start, seq.end, device=dev)[:, None]    # (n, 1)
            mask = kv_pos <= q_pos
            if window is not None:
                mask &= kv_pos > q_pos - window
            mask = seq.masks[window] = mask.repeat_interleave(group, dim=0)  # (n * G, end)
        return mask


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    window: int | None, scale: float) -> torch.Tensor:
    """Write this step's K/V into the cache, then attend. q: (T, H, D); k, v: (T, Hkv, D).
    Returns (T, H, D).

    Grouped-query attention is done by folding the G query heads that share a KV head into the
    query-length axis ([.., Hkv, G, D]) rather than repeating K/V or using SDPA's enable_gqa,
    which is ~10x slower in bfloat16 on CPU.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv = k.shape[1]
    group = num_heads // num_kv
    bs = meta.block_size
    flat_k = k_cache.view(-1, num_kv, head_dim)  # (num_blocks * block_size, Hkv, D)
    flat_v = v_cache.view(-1, num_kv, head_dim)
    flat_k.index_copy_(0, meta.slot_mapping, k)
    flat_v.index_copy_(0, meta.slot_mapping, v)
    single = len(meta.decode_groups) == 1 and meta.num_decodes == num_tokens
    out = None if single else q.new_empty(q.shape)

    for dg in meta.decode_groups:
        b, tables = dg.end - dg.start, dg.block_tables                       # (b, P)
        length = tables.shape[1] * bs
        kd = k_cache[tables].view(b, length, num_kv, head_dim).transpose(1, 2)  # (b, Hkv, L, D)
        vd = v_cache[tables].view(b, length, num_kv, head_dim).transpose(1, 2)
        qd = q[dg.start:dg.end].view(b, num_kv, group, head_dim)            # (b, Hkv, G, D)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=dg.mask(window, bs),
                                            scale=scale)                    # (b, Hkv, G, D)
        if out is None:   # one group of decodes and nothing else
            return od.reshape(b, num_heads, head_dim)
        out[dg.start:dg.end] = od.reshape(b, num_heads, head_dim)

    for seq in meta.prefills:
        rows = slice(seq.offset, seq.offset + seq.num_tokens)
        n = seq.num_tokens
        if seq.start == 0:   # nothing cached before the chunk: attend to the fresh K/V
            ks, vs = k[rows], v[rows]                                        # (n, Hkv, D)
        else:                # read positions [0, end) through the block table
            ks = k_cache[seq.block_ids].view(-1, num_kv, head_dim)[:seq.end]  # (end, Hkv, D)
            vs = v_cache[seq.block_ids].view(-1, num_kv, head_dim)[:seq.end]
        qs = q[rows].view(n, num_kv, group, head_dim).permute(1, 0, 2, 3)   # (Hkv, n, G, D)
        qs = qs.reshape(num_kv, n * group, head_dim)
        os_ = F.scaled_dot_product_attention(
            qs, ks.transpose(0, 1), vs.transpose(0, 1),
            attn_mask=meta.prefill_mask(seq, window, group), scale=scale)  # (Hkv, n*G, D)
        out[rows] = os_.view(num_kv, n, group, head_dim).permute(1, 0, 2, 3).reshape(
            n, num_heads, head_dim)
    return out


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul."""

    def __init__(self, hidden: int, intermediate: int, bias: bool):
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)
