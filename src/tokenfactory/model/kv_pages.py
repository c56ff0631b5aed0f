"""Whole KV pages in and out of a model's paged cache, and the identity of what they mean.

Every attention layer holds its pages as ``k_cache``/``v_cache`` of shape
(Hkv, num_blocks + 1, block_size, D) (head-major, see ``layers.py``). A KV connector (disk
warehouse, prefill->decode transfer) moves pages as one tensor
(num_layers, 2, Hkv, n_blocks, block_size, D): index 0 of the second axis is K, 1 is V.

Pages are only meaningful to the same weights, KV dtype, layout and block size that wrote
them: :func:`model_fingerprint` condenses all of that into 16 bytes for connectors to key on.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import torch
from torch import nn

FINGERPRINT_VERSION = b"tokenfactory-kv-pages-1"
_SAMPLE_WINDOWS = 16          # evenly spaced windows of each weight tensor hashed ...
_WINDOW_ELEMENTS = 1024       # ... of this many elements each


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
    """Shape (num_layers, 2, Hkv, block_size, D) and dtype of one page."""
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
