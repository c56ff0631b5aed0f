"""Whole KV pages in and out of a model's paged cache, and the identity of what they mean.

Every attention layer holds its pages as ``k_cache``/``v_cache`` of shape
(Hkv, num_blocks + 1, block_size, D) (head-major, see ``layers.py``). A KV connector (disk
warehouse, prefill->decode transfer) moves pages as one tensor
(num_layers, 2, Hkv, n_blocks, block_size, D): index 0 of the second axis is K, 1 is V.

Pages are only meaningful to the same weights, KV dtype, layout and block size that wrote
them: :func:`model_fingerprint` condenses all of that into 16 bytes for connectors to key on.

KV cache dtypes (:func:`kv_cache_spec`): "auto" stores K/V in the model's dtype; "int8" stores
each token's K (and V) row of one KV head as D int8 codes followed by that row's float32 scale
(4 bytes), so the caches are int8 tensors (Hkv, num_blocks + 1, block_size, D + 4) and a page
carries its own scales. Everything that copies pages (prefix cache, warehouse, P/D transfer)
therefore moves quantized pages unchanged, and the fingerprint (which covers the page shape
and dtype) keeps int8 pages apart from bfloat16 ones.

Why a scale per (token slot, head) rather than one per (page, head): a page is filled token by
token, so a per-page absmax scale would have to grow -- requantizing the earlier slots, which
rounds them a second time -- whenever a new token is larger; a page's bytes would then depend
on how its tokens were chunked into steps (a prefix-cache hit would not reproduce a cold run's
pages), and rejected speculative drafts would leave their inflated scale behind. A per-slot
scale makes a slot's bytes a function of that token's K/V alone. It costs 4 bytes per D codes:
1.0625 bytes per element at D = 64 (the same as llama.cpp's q8_0 KV), against 2 for bfloat16.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

FINGERPRINT_VERSION = b"tokenfactory-kv-pages-1"
KV_CACHE_DTYPES = ("auto", "int8")
INT8_SCALE_BYTES = 4          # one float32 scale after each row's int8 codes
_SAMPLE_WINDOWS = 16          # evenly spaced windows of each weight tensor hashed ...
_WINDOW_ELEMENTS = 1024       # ... of this many elements each


@dataclass(frozen=True)
class KVCacheSpec:
    """How KV pages are stored: ``dtype`` of the k_cache/v_cache tensors (the model's float
    dtype, or int8 rows of codes + scale, see the module docstring)."""
    dtype: torch.dtype

    @property
    def quantized(self) -> bool:
        return self.dtype == torch.int8

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def row_width(self, head_dim: int) -> int:
        """Elements per (token, head) row of a page: D, or D codes + 4 scale bytes."""
        return head_dim + INT8_SCALE_BYTES if self.quantized else head_dim

    def cache_shape(self, num_kv_heads: int, num_pages: int, block_size: int,
                    head_dim: int) -> tuple[int, int, int, int]:
        """(Hkv, num_pages, block_size, row_width) of one layer's K (or V) cache."""
        return (num_kv_heads, num_pages, block_size, self.row_width(head_dim))

    def bytes_per_block(self, num_layers: int, num_kv_heads: int, block_size: int,
                        head_dim: int) -> int:
        """Bytes of one page across every layer, K and V."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * num_layers * num_kv_heads * block_size * self.row_width(head_dim) * elem

    def describe(self) -> str:
        """One start-up log line: what the pages hold and what attention runs on them."""
        if not self.quantized:
            return f"KV cache {self.name}"
        from tokenfactory.model.kernels import kv_int8
        where = ("the native int8 kernel (attention_int8.c; a prefill chunk's tokens are its "
                 "rows)" if kv_int8.library() is not None
                 else "torch, dequantizing each gathered page")
        return (f"KV cache int8 (per token and head float32 scale): attention runs as {where}; "
                "the whole-layer native decode step is off (bfloat16 pages only)")


def kv_cache_spec(kv_cache_dtype: str | None, model_dtype: torch.dtype) -> KVCacheSpec:
    """``--kv-cache-dtype``: "auto" (or None) = the model's dtype, "int8" = quantized rows."""
    if kv_cache_dtype in (None, "auto"):
        return KVCacheSpec(model_dtype)
    if kv_cache_dtype == "int8":
        return KVCacheSpec(torch.int8)
    raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                     f"not {kv_cache_dtype!r}")


def allocate_kv_cache(model: nn.Module, num_blocks: int, block_size: int, spec: KVCacheSpec,
                      empty: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None
                      ) -> None:
    """Bind zeroed K and V pages (Hkv, num_blocks + 1, block_size, row_width) to every
    attention layer (the last page is the executor's scratch page). ``empty(shape, dtype)``
    allocates zero-filled memory (e.g. fresh huge-page mappings); default ``torch.zeros`` on
    the model's device. Zeros matter for int8 too: a zero row dequantizes to zeros (scale 0),
    never NaN."""
    cfg = model.config
    shape = spec.cache_shape(cfg.num_kv_heads, num_blocks + 1, block_size, cfg.head_dim)
    device = model.norm.weight.device
    for layer in model.layers:
        attn = layer.self_attn
        attn.k_cache = attn.v_cache = None   # free the old pages before allocating new ones
        if empty is None:
            attn.k_cache = torch.zeros(shape, dtype=spec.dtype, device=device)
            attn.v_cache = torch.zeros(shape, dtype=spec.dtype, device=device)
        else:
            attn.k_cache, attn.v_cache = empty(shape, spec.dtype), empty(shape, spec.dtype)
    log.info("%s", spec.describe())


def quantize_int8_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., D) float -> (..., D + 4) int8 rows: symmetric codes round(x / s) with
    s = absmax(row) / 127, then s as float32 bytes. An all-zero row stores scale 0."""
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True) / 127.0                    # (..., 1)
    codes = torch.round(xf / scale.clamp_min(torch.finfo(torch.float32).tiny))
    codes = codes.clamp_(-127, 127).to(torch.int8)                     # (..., D)
    return torch.cat([codes, scale.view(torch.int8)], dim=-1)          # (..., D + 4)


def dequantize_int8_rows(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(..., D + 4) int8 rows -> (..., D) ``dtype``: codes * scale, in float32 then rounded."""
    d = rows.shape[-1] - INT8_SCALE_BYTES
    scale = rows[..., d:].contiguous().view(torch.float32)             # (..., 1)
    return (rows[..., :d].float() * scale).to(dtype)


def _caches(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for layer in model.layers:
        attn = layer.self_attn
        if attn.k_cache is None or attn.v_cache is None:
            raise RuntimeError("the KV cache is not allocated (initialize_cache first)")
        out.append((attn.k_cache, attn.v_cache))
    return out


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_numpy_bits(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's memory as a numpy array of same-size integers (no copy; bfloat16 has no
    numpy dtype). Page copies go through numpy because it copies on the calling thread only:
    torch's two-thread copies of a few MiB measured 100-300x slower than one thread when
    another process holds a core (each op waits at a barrier for a descheduled thread)."""
    return t.view(_BITS[t.element_size()]).numpy()


def read_blocks(model: nn.Module, block_ids: Sequence[int]) -> torch.Tensor:
    """A copy of pages ``block_ids``: (num_layers, 2, Hkv, n, block_size, D), on the CPU."""
    caches = _caches(model)
    k0 = caches[0][0]
    Hkv, _, bs, D = k0.shape
    out = torch.empty((len(caches), 2, Hkv, len(block_ids), bs, D), dtype=k0.dtype)
    if k0.device.type == "cpu":
        ids = np.asarray(block_ids, dtype=np.int64)
        dst = as_numpy_bits(out)
        for layer, (k, v) in enumerate(caches):
            dst[layer, 0] = as_numpy_bits(k)[:, ids]    # (Hkv, n, block_size, D)
            dst[layer, 1] = as_numpy_bits(v)[:, ids]
        return out
    idx = torch.tensor(list(block_ids), dtype=torch.int64, device=k0.device)
    for layer, (k, v) in enumerate(caches):
        out[layer, 0] = k.index_select(1, idx).cpu()
        out[layer, 1] = v.index_select(1, idx).cpu()
    return out


def write_blocks(model: nn.Module, block_ids: Sequence[int], pages: torch.Tensor) -> None:
    """Overwrite pages ``block_ids`` with ``pages`` (num_layers, 2, Hkv, n, block_size, D)."""
    caches = _caches(model)
    k0 = caches[0][0]
    Hkv, _, bs, D = k0.shape
    expect = (len(caches), 2, Hkv, len(block_ids), bs, D)
    if tuple(pages.shape) != expect or pages.dtype != k0.dtype:
        raise ValueError(f"pages of shape {tuple(pages.shape)} {pages.dtype} do not fit this "
                         f"cache: expected {expect} {k0.dtype}")
    if k0.device.type == "cpu":
        ids = np.asarray(block_ids, dtype=np.int64)
        src = as_numpy_bits(pages.cpu())
        for layer, (k, v) in enumerate(caches):
            as_numpy_bits(k)[:, ids] = src[layer, 0]
            as_numpy_bits(v)[:, ids] = src[layer, 1]
        return
    idx = torch.tensor(list(block_ids), dtype=torch.int64, device=k0.device)
    pages = pages.to(k0.device)
    for layer, (k, v) in enumerate(caches):
        k.index_copy_(1, idx, pages[layer, 0])
        v.index_copy_(1, idx, pages[layer, 1])


class ModelKVPageIO:
    """``read_kv_blocks``/``write_kv_blocks`` over a model's cache (a ``KVPageIO``), for
    executors that do not offer them themselves."""

    def __init__(self, model: nn.Module):
        self.model = model

    def read_kv_blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        return read_blocks(self.model, block_ids)

    def write_kv_blocks(self, block_ids: Sequence[int], pages: torch.Tensor) -> None:
        write_blocks(self.model, block_ids, pages)


def page_layout(model: nn.Module) -> tuple[tuple[int, ...], torch.dtype]:
    """Shape (num_layers, 2, Hkv, block_size, row_width) and dtype of one page (row_width is
    D, or D + 4 for int8 pages, whose rows carry their scales)."""
    k0 = _caches(model)[0][0]
    Hkv, _, bs, D = k0.shape
    return (len(model.layers), 2, Hkv, bs, D), k0.dtype


def _tensor_sample(t: torch.Tensor) -> bytes:
    """Bytes of evenly spaced windows of ``t``: enough to tell two checkpoints apart (any
    fine-tune moves nearly every weight) without hashing gigabytes at start-up."""
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n <= _SAMPLE_WINDOWS * _WINDOW_ELEMENTS:
        parts = [flat]
    else:
        step = (n - _WINDOW_ELEMENTS) // (_SAMPLE_WINDOWS - 1)
        parts = [flat[i * step:i * step + _WINDOW_ELEMENTS] for i in range(_SAMPLE_WINDOWS)]
    out = []
    for p in parts:
        p = p.contiguous().cpu()
        out.append(p.view(torch.uint8).numpy().tobytes())
    return b"".join(out)


def model_fingerprint(model: nn.Module) -> bytes:
    """16 bytes naming what a page means: the weights (every tensor's name, shape, dtype and a
    sample of its values), the model config, the KV dtype and the page layout (layers, KV
    heads, block size, head size). Pages written under one fingerprint are never valid under
    another."""
    h = hashlib.blake2b(FINGERPRINT_VERSION, digest_size=16)
    h.update(repr(getattr(model, "config", None)).encode())
    shape, dtype = page_layout(model)
    h.update(repr((shape, str(dtype))).encode())
    caches = {id(t) for pair in _caches(model) for t in pair}
    tensors = dict(model.named_parameters())
    tensors.update((n, b) for n, b in model.named_buffers() if id(b) not in caches)
    for name in sorted(tensors):
        t = tensors[name]
        h.update(repr((name, tuple(t.shape), str(t.dtype))).encode())
        if t.device.type != "meta" and t.numel():
            h.update(_tensor_sample(t))
    return h.digest()
