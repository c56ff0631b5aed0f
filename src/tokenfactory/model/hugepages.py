"""Weights and KV pages in transparent-huge-page memory.

Decode at small batch is a stream over every weight byte, and on this kind of host (a KVM
guest) how fast that stream runs depends on the page size behind it: with 4 KiB pages each TLB
miss costs a two-level (guest and host) page walk. Measured on the 2-core Zen 4 guest, an
AVX-512 read of 178 MB ran at ~27.6 GB/s from ordinary torch allocations and ~35 GB/s from
memory advised with ``MADV_HUGEPAGE`` (which numpy already does for its large arrays, so a
STREAM-style bandwidth measurement sees the huge-page figure). The kernel's THP setting here is
``madvise``: memory gets huge pages only when asked.

:func:`empty` hands out tensors carved from anonymous mmaps advised ``MADV_HUGEPAGE``;
:func:`relocate` moves a module's parameters and buffers into one such arena. Where THP is off
or madvise is unavailable this is ordinary memory, and everything still works.
"""
from __future__ import annotations

import logging
import mmap

import torch
from torch import nn

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
ALIGN = 4096          # every tensor starts on its own page (and a 64-byte cache line)


def _arena(nbytes: int) -> torch.UntypedStorage:
    """Storage over a fresh anonymous mapping of at least ``nbytes`` advised for huge pages;
    it keeps the mapping alive. The length is rounded up to whole huge pages: recent kernels
    then start the mapping on a huge-page boundary (where they do not, only the partial huge
    pages at either end stay small)."""
    length = (max(nbytes, 1) + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
    mm = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except OSError as exc:      # THP compiled out: plain pages
            log.debug("madvise(MADV_HUGEPAGE) failed: %s", exc)
    return torch.frombuffer(mm, dtype=torch.uint8).untyped_storage()


def _tensor_at(storage: torch.UntypedStorage, byte_offset: int, shape: tuple[int, ...],
               dtype: torch.dtype) -> torch.Tensor:
    """A tensor over ``storage`` from ``byte_offset`` -- a base tensor, not a view of another.
    (torch.compile functionalizes an in-place write to a view by rewriting its whole base: a
    KV cache carved as a view of a bigger buffer got copied entirely on every decode step.)"""
    t = torch.empty(0, dtype=dtype)
    itemsize = t.element_size()
    assert byte_offset % itemsize == 0
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return t.set_(storage, byte_offset // itemsize, tuple(shape), tuple(reversed(strides)))


def _round_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)`` on huge-page-advised memory of its own (CPU)."""
    numel = 1
    for n in shape:
        numel *= n
    itemsize = torch.empty((), dtype=dtype).element_size()
    return _tensor_at(_arena(max(numel * itemsize, 1)), 0, tuple(shape), dtype)


def _movable(t: torch.Tensor | None) -> bool:
    return (t is not None and t.device.type == "cpu" and t.layout == torch.strided
            and not t.is_meta and t.is_contiguous() and t.numel() > 0)


def relocate(module: nn.Module) -> int:
    """Move every contiguous CPU parameter and buffer of ``module`` into one huge-page arena,
    in module order (the order a forward pass reads them). Tensors shared between modules
    (tied weights, a buffer viewing a parameter) stay shared. Returns the bytes moved.

    Each old tensor is released as soon as it is copied, so the peak is about one model plus
    the largest tensor, not two models."""
    slots: list[tuple[nn.Module, str, bool, int]] = []   # (owner, name, is_param, offset)
    seen: dict[tuple[int, int, tuple, torch.dtype], int] = {}
    total = 0
    for owner in module.modules():
        for is_param, table in ((True, owner._parameters), (False, owner._buffers)):
            for name, t in table.items():
                if not _movable(t):
                    continue
                key = (t.data_ptr(), t.numel(), tuple(t.shape), t.dtype)
                if key not in seen:
                    seen[key] = total
                    total += _round_up(t.numel() * t.element_size())
                slots.append((owner, name, is_param, seen[key]))
    t = None                 # the loop variable's reference to the last tensor
    if total == 0:
        return 0
    storage = _arena(total)
    placed: dict[int, torch.Tensor] = {}
    for owner, name, is_param, offset in slots:
        table = owner._parameters if is_param else owner._buffers
        old = table[name]
        new = placed.get(offset)
        if new is None:
            new = _tensor_at(storage, offset, tuple(old.shape), old.dtype)
            new.copy_(old)
            placed[offset] = new
        if is_param:
            old.data = new        # same Parameter object: ties and references survive
        else:
            table[name] = new
        del old               # the last reference to the old storage goes here
    return total
