"""TorchExecutor: the engine's :class:`~tokenfactory.engine.executor.Executor` on PyTorch.

One ``execute(batch)`` = flatten the scheduled chunks into one token batch (decodes first, then
multi-token prefill chunks), run the decoder once over all of them, compute logits only for the
rows that need them (the last token of chunks that sample, plus prompt-logprob positions), and
sample.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from tokenfactory.engine.executor import Batch, SampleOutput, ScheduledChunk
from tokenfactory.model.config import ModelConfig
from tokenfactory.model.layers import AttentionMetadata, PrefillSeq
from tokenfactory.model.loader import load_model
from tokenfactory.model.sampler import Sampler, position_logprobs

log = logging.getLogger(__name__)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def configure_threads(num_threads: int | None = None) -> int:
    """Use every core this process may run on (torch defaults to physical cores only)."""
    n = num_threads or len(os.sched_getaffinity(0))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


class TorchExecutor:
    """Runs a Llama-family checkpoint over a paged KV cache.

    ``compile``: None means "where it pays" (CPU with bfloat16 weights); tests pass False.
    """

    def __init__(self, model_dir: str | Path, *, dtype: str | torch.dtype | None = None,
                 device: str | torch.device = "cpu", compile: bool | None = False,
                 num_threads: int | None = None, seed: int | None = None):
        self.device = torch.device(device)
        if self.device.type == "cpu":
            configure_threads(num_threads)
        self.model = load_model(model_dir, dtype=dtype, device=self.device)
        self.model_config: ModelConfig = self.model.config
        self.dtype = self.model.embed_tokens.weight.dtype
        self.max_model_len = self.model_config.max_model_len
        self.sampler = Sampler(self.device, seed)
        self.block_size = 0
        self.num_blocks = 0
        self.compile = compile
        self._dynamic_rope = self.model_config.rope.rope_type == "dynamic"

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, **kwargs) -> "TorchExecutor":
        return cls(model_dir, **kwargs)

    # ------------------------------------------------------------------ cache
    def kv_cache_bytes_per_block(self, block_size: int) -> int:
        cfg = self.model_config
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem

    def initialize_cache(self, num_blocks: int, block_size: int) -> None:
        cfg = self.model_config
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        for layer in self.model.layers:
            attn = layer.self_attn
            attn.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            attn.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.num_blocks, self.block_size = num_blocks, block_size

    # ---------------------------------------------------------------- execute
    def _prepare(self, chunks: list[ScheduledChunk], block_size: int):
        """Flat inputs for the step. ``chunks`` are ordered decodes first."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        decode_tables: list[list[int]] = []
        prefills: list[PrefillSeq] = []
        dev = self.device
        for c in chunks:
            req, start, end = c.request, c.start, c.end
            ids.extend(req.token_slice(start, end))
            positions.extend(range(start, end))
            blocks = req.block_ids
            slots.extend(blocks[p // block_size] * block_size + p % block_size
                         for p in range(start, end))
            if self._dynamic_rope:
                seq_lens.extend([end] * c.num_tokens)
            pages = blocks[:_cdiv(end, block_size)]
            if c.num_tokens == 1:
                decode_tables.append(pages)
            else:
                prefills.append(PrefillSeq(offset=len(ids) - c.num_tokens, num_tokens=c.num_tokens,
                                           start=start, block_ids=torch.tensor(pages, device=dev)))
        nd = len(decode_tables)
        meta = AttentionMetadata(block_size=block_size,
                                 slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
                                 num_decodes=nd, prefills=prefills)
        if nd:
            width = max(len(t) for t in decode_tables)
            meta.decode_block_tables = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables],
                                                    dtype=torch.int64, device=dev)
            meta.decode_positions = torch.tensor(positions[:nd], dtype=torch.int64, device=dev)
        input_ids = torch.tensor(ids, dtype=torch.int64, device=dev)
        pos = torch.tensor(positions, dtype=torch.int64, device=dev)
        rope_lens = torch.tensor(seq_lens, device=dev) if self._dynamic_rope else None
        return input_ids, pos, meta, rope_lens

    def _forward(self, batch: Batch) -> tuple[list[int], list[ScheduledChunk], torch.Tensor]:
        """Run the decoder over the batch. Returns (order, reordered chunks, hidden (T, hidden))
        where ``chunks[k] is batch.chunks[order[k]]``."""
        if self.block_size == 0:
            raise RuntimeError("initialize_cache() must be called before execute()")
        if batch.block_size != self.block_size:
            raise ValueError(f"batch block_size {batch.block_size} != cache block_size "
                             f"{self.block_size}")
        order = sorted(range(len(batch.chunks)), key=lambda i: batch.chunks[i].num_tokens > 1)
        chunks = [batch.chunks[i] for i in order]
        input_ids, positions, meta, rope_lens = self._prepare(chunks, self.block_size)
        return order, chunks, self.model(input_ids, positions, meta, rope_lens)

    @torch.inference_mode()
    def forward_logits(self, batch: Batch) -> list[torch.Tensor]:
        """Logits (num_tokens, vocab) float32 for every token of every chunk, in batch order.
        Writes K/V like ``execute`` but samples nothing (for tests and debugging)."""
        order, chunks, hidden = self._forward(batch)
        logits = self.model.compute_logits(hidden)
        per_chunk, offset = {}, 0
        for i, c in zip(order, chunks):
            per_chunk[i] = logits[offset:offset + c.num_tokens]
            offset += c.num_tokens
        return [per_chunk[i] for i in range(len(chunks))]

    @torch.inference_mode()
    def execute(self, batch: Batch) -> list[SampleOutput]:
        order, chunks, hidden = self._forward(batch)                       # hidden: (T, hidden)

        # Rows whose logits we need: sampling rows, then prompt-logprob rows.
        sample_rows, sample_chunks = [], []
        plp_spans = []  # (chunk index in `chunks`, first row, positions [start, stop))
        offset = 0
        for ci, c in enumerate(chunks):
            req = c.request
            if c.sample:
                sample_rows.append(offset + c.num_tokens - 1)
                sample_chunks.append(ci)
            if req.sampling_params.prompt_logprobs is not None \
                    and len(req.prompt_logprobs) == c.start + 1:
                # position p predicts prompt token p + 1, for prompt tokens start+1 .. up to
                # the last prompt token (whose successor is the first output, not a prompt token)
                stop = min(c.end, req.num_prompt_tokens - 1)
                if stop > c.start:
                    plp_spans.append((ci, offset, c.start, stop))
            offset += c.num_tokens

        results = [SampleOutput(None) for _ in chunks]
        if sample_rows:
            logits = self.model.compute_logits(hidden[torch.tensor(sample_rows)])  # (N, V)
            out = self.sampler(logits, [chunks[ci].request for ci in sample_chunks])
            for k, ci in enumerate(sample_chunks):
                results[ci] = SampleOutput(out.token_ids[k], out.logprobs[k])
        for ci, row0, start, stop in plp_spans:
            req = chunks[ci].request
            lp = torch.log_softmax(self.model.compute_logits(hidden[row0:row0 + stop - start]), -1)
            targets = torch.tensor(req.prompt_token_ids[start + 1:stop + 1], device=lp.device)
            results[ci].prompt_logprobs = position_logprobs(
                lp, targets, req.sampling_params.prompt_logprobs)

        final = [SampleOutput(None)] * len(chunks)
        for k, i in enumerate(order):
            final[i] = results[k]
        return final
