"""Small-batch decode steps through ``torch.compile``.

At batch 1 an eager decode step is a few hundred small ops; Python dispatch and per-op overhead
then cost as much as reading the weights. Compiling the whole decode step (embedding ->
layers -> lm_head) removes that overhead and fuses the pointwise work, which is what brings
batch-1 decode near the memory-bandwidth floor on CPU (shared/reference/cpu-performance.md).

Shapes are kept few: the batch is padded up to a bucket (``batch_sizes``), padded rows write
their K/V into a scratch page nobody reads, and the number of pages per sequence is a dynamic
dimension, so one graph per batch bucket serves every context length. Larger batches and
prefill chunks stay eager, where the work per op amortizes the overhead anyway.

The compiled artifacts are cached on disk by inductor (``TORCHINDUCTOR_CACHE_DIR``; the default
set here lives under ~/.cache/tokenfactory, outside the repository).
"""
from __future__ import annotations

import logging
import os
import time
import types
from pathlib import Path

import torch

from tokenfactory.model.layers import AttentionMetadata, DecodeGroup
from tokenfactory.model.llama import LlamaForCausalLM

log = logging.getLogger(__name__)

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      str(Path.home() / ".cache" / "tokenfactory" / "inductor"))


MAX_CONTEXT = 4096


class CompiledDecode:
    """``__call__(input_ids, positions, slot_mapping, block_tables) -> logits (B, vocab)`` for
    decode-only batches of at most ``max(batch_sizes)`` sequences."""

    def __init__(self, model: LlamaForCausalLM, block_size: int, scratch_page: int,
                 max_pages: int, batch_sizes: tuple[int, ...] = (1, 2, 4),
                 max_autotune: bool = True):
        self.model = model
        # Pages of the longest context a compiled step serves: the model's limit, capped at
        # MAX_CONTEXT tokens (inductor's CPU reductions guard on their length, so one dynamic
        # graph cannot span longer contexts); longer contexts run eager.
        self.max_pages = max(2, min(max_pages, MAX_CONTEXT // block_size))
        self.block_size = block_size
        self.scratch_page = scratch_page
        self.batch_sizes = tuple(sorted(batch_sizes))
        options = {}
        if max_autotune:
            options.update(max_autotune=True, coordinate_descent_tuning=True)
        # A code object of its own: dynamo keeps one cache (and its guards) per code object, so
        # this instance's graphs never compete with another instance's (other caches/models).
        step = types.FunctionType(CompiledDecode._step.__code__.replace(), globals(), "_step")
        self._compiled = torch.compile(types.MethodType(step, self), fullgraph=True,
                                       options=options)
        self._warm: set[int] = set()
        self._caches = self._cache_ids()

    def warmup(self) -> None:
        """Compile every batch bucket now (rows write only to the scratch page)."""
        scratch = self.scratch_page
        for b in self.batch_sizes:
            if b not in self._warm:
                self(([0] * b), [0] * b, [scratch * self.block_size] * b, [[scratch]] * b)

    def _cache_ids(self) -> tuple[int, ...]:
        return tuple(id(t) for layer in self.model.layers
                     for t in (layer.self_attn.k_cache, layer.self_attn.v_cache))

    def bucket(self, batch: int) -> int | None:
        return next((b for b in self.batch_sizes if b >= batch), None)

    def serves(self, tables: list[list[int]]) -> bool:
        """Whether a decode-only batch with these block tables runs compiled."""
        return (self.bucket(len(tables)) is not None
                and max(len(t) for t in tables) <= self.max_pages)

    def _step(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
              block_tables: torch.Tensor) -> torch.Tensor:
        b = input_ids.shape[0]
        meta = AttentionMetadata(block_size=self.block_size, slot_mapping=slot_mapping,
                                 num_decodes=b,
                                 decode_groups=[DecodeGroup(0, b, block_tables, positions)])
        rope_lens = positions + 1 if self.model.rotary.dynamic else None
        hidden = self.model(input_ids, positions, meta, rope_lens)       # (B, hidden)
        return self.model.compute_logits(hidden)                         # (B, vocab)

    def __call__(self, input_ids: list[int], positions: list[int], slots: list[int],
                 tables: list[list[int]]) -> torch.Tensor:
        n = len(input_ids)
        b = self.bucket(n)
        pad = b - n
        width = max(2, max(len(t) for t in tables))   # >= 2: no 0/1 specialization of pages
        scratch = self.scratch_page
        ids = torch.tensor(input_ids + [0] * pad, dtype=torch.int64)
        pos = torch.tensor(positions + [0] * pad, dtype=torch.int64)
        slot = torch.tensor(slots + [scratch * self.block_size] * pad, dtype=torch.int64)
        table = torch.tensor([t + [scratch] * (width - len(t)) for t in tables]
                             + [[scratch] * width] * pad, dtype=torch.int64)
        torch._dynamo.mark_dynamic(table, 1, min=2, max=self.max_pages)
        # Freezing (weights become constants that inductor packs and specializes its GEMMs
        # for) is decided by dynamo while it traces, from the global inductor config, so it
        # has to be on around the call: passing it in torch.compile's ``options`` only reaches
        # inductor, after dynamo has already lifted the weights to graph inputs (no freezing).
        with torch._inductor.config.patch(freezing=True):
            if b not in self._warm:
                t0 = time.perf_counter()
                out = self._compiled(ids, pos, slot, table)
                self._warm.add(b)
                log.info("compiled decode step for batch %d in %.1fs", b,
                         time.perf_counter() - t0)
            elif torch.is_inference_mode_enabled() and self._cache_ids() == self._caches:
                # Skip dynamo's guard evaluation (~0.3 ms a step at batch 1). Safe here: each
                # bucket has exactly one graph, traced in inference mode, dynamic in the page
                # count over every width ``serves`` admits, and bound to the very cache
                # tensors checked just above (the runner builds a new CompiledDecode when it
                # reallocates them); only the batch shape tells the graphs apart, and those
                # differentiating guards still run.
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    out = self._compiled(ids, pos, slot, table)
            else:
                out = self._compiled(ids, pos, slot, table)
        return out[:n]
