"""TorchExecutor: the engine's :class:`~tokenfactory.engine.executor.Executor` on PyTorch.

One ``execute(plan)`` = flatten the scheduled requests into one token batch (decodes first, then
multi-token prefill chunks), run the decoder once over all of them, compute logits only for the
rows that need them (the last token of chunks that sample, plus prompt-logprob positions), and
sample. What the sampler needs across steps (prompt ids, outputs so far, per-request caches)
is kept here by request id (``engine.step.SequenceStates``), sent by the engine once per request.

``device``: where the weights, the KV pages and the step's tensors live. The native kernels,
huge pages and the CPU linears are CPU-only: on any other device every path is torch's.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from tokenfactory.engine.step import (RequestStepOutput, ScheduledRequest, SequenceStates,
                                      StepPlan, StepResult)
from tokenfactory.model import hugepages, kernel_choice, kv_pages, native_step
from tokenfactory.model import kernels as native_kernels
from tokenfactory.model.config import ModelConfig
from tokenfactory.model.layers import (AttentionMetadata, DecodeGroup, PrefillSeq, Workspace,
                                       can_use_cpu_linears, use_cpu_linears)
from tokenfactory.model.loader import load_model
from tokenfactory.model.sampler import Sampler, position_logprobs

log = logging.getLogger(__name__)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _decode_groups(num_pages: list[int], min_size: int = 8, max_size: int = 16,
                   max_waste: float = 1.3) -> list[tuple[int, int]]:
    """Split decodes sorted by page count into row ranges of ``min_size``..``max_size`` rows
    whose longest member has at most ``max_waste`` times the pages of its shortest (smaller
    groups only where lengths jump). Padding each group's block tables to its longest sequence
    then costs little, and a group's gathered K/V (a few MB) is still in cache when the
    matmuls read it back: one 64-sequence group is ~1.5x slower than four of 16."""
    groups, lo = [], 0
    for i, n in enumerate(num_pages):
        if i - lo >= max_size or (i - lo >= min_size and n > max_waste * num_pages[lo]):
            groups.append((lo, i))
            lo = i
    if lo < len(num_pages):
        groups.append((lo, len(num_pages)))
    return groups


# Decode-only steps of at most this many sequences run on ``decode_threads``: they are a read
# of the weights, which one thread fewer streams nearly as fast; larger batches are compute
# enough to want every core (SmolLM2, 2 cores, serve: batch 1 ITL 15.3 -> 11.9 ms with one
# thread, but 16 concurrent chats 208 -> 155 tok/s when all decode steps used one thread).
DECODE_THREADS_MAX_BATCH = 4


def configure_threads(num_threads: int | None = None) -> int:
    """Use every core this process may run on (torch defaults to physical cores only)."""
    n = num_threads or len(os.sched_getaffinity(0))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


class TorchExecutor:
    """Runs a Llama-family checkpoint over a paged KV cache.

    ``native_decode``: run decode-only steps of up to 8 sequences as one native call each
    (``native_step.py``); None means wherever the model and CPU support it (bfloat16 with the
    native kernels). float32 keeps stock kernels, which match transformers bit for bit.
    ``kernels``: which bfloat16 CPU kernels run where (``kernel_choice.py``): "auto" times the
    candidates on this CPU when the cache is first allocated (or reads the cached decision),
    "native" forces the native kernels wherever they run, "torch" forces torch/oneDNN
    everywhere; None keeps the fixed rule (native wherever available, no measurement).
    ``native_decode``, when given, still overrides the decode-step part of the choice.
    ``quantization``: how a quantized GGUF file's weights run (``model/loader.py``): "gguf"
    executes its Q8_0/Q4_0/Q4_1 blocks as stored (``quant_linear.py``), "none"/None
    dequantizes them at load, "int8" quantizes linears per output channel at load.
    ``kv_cache_dtype``: how KV pages are stored (``kv_pages.kv_cache_spec``): "auto"/None the
    model's dtype, "int8" rows of int8 codes with a float32 scale each (about half the bytes;
    decodes then run layer by layer, the whole-layer native step reads bfloat16 pages only).
    """

    def __init__(self, model_dir: str | Path, *, dtype: str | torch.dtype | None = None,
                 device: str | torch.device = "cpu", num_threads: int | None = None,
                 seed: int | None = None, native_decode: bool | None = None,
                 kernels: str | None = None, compile: bool = False,
                 quantization: str | None = None, kv_cache_dtype: str | None = None):
        if compile:   # the argument stays (False only) until its last callers drop it
            raise ValueError("compiled decode graphs were removed: the native decode step "
                             "serves small decode batches")
        if kernels is not None and kernels not in kernel_choice.MODES:
            raise ValueError(f"kernels must be one of {', '.join(kernel_choice.MODES)}, "
                             f"not {kernels!r}")
        self.device = torch.device(device)
        self.num_threads = torch.get_num_threads()
        if self.device.type == "cpu":
            self.num_threads = configure_threads(num_threads)
        # Threads for small decode-only steps (None: all; DECODE_THREADS_MAX_BATCH). A server
        # sets one core fewer: its HTTP event loop then has a core of its own instead of
        # preempting a thread of the decode step's OpenMP team between barriers.
        self.decode_threads: int | None = None
        self.model = load_model(model_dir, dtype=dtype, device=self.device,
                                quantization=quantization)
        self.model_config: ModelConfig = self.model.config
        self.dtype = self.model.embed_tokens.weight.dtype
        self.kv_spec = kv_pages.kv_cache_spec(kv_cache_dtype, self.dtype)
        self.max_model_len = self.model_config.max_model_len
        fast_cpu = can_use_cpu_linears(self.dtype, self.device)   # False off the CPU
        # bfloat16 attention runs in native kernels where the CPU has AVX-512 BF16: build
        # (or load the cached build of) them now rather than on the first request
        native = False
        if fast_cpu:
            native = native_kernels.supports(self.dtype, self.model_config.head_dim)
            log.info("native attention kernels: %s", "on" if native else
                     f"off ({native_kernels.unavailable_reason or 'unsupported head size'})")
            # native small-batch linear kernel, oneDNN for large batches (see CpuLinear)
            # (no oneDNN-packed weight copy: measured, offline throughput was the same with,
            # 337 tok/s, and without, 345)
            use_cpu_linears(self.model)
        if self.device.type == "cpu":
            # every decode step streams all weights: huge pages make that stream ~25% faster
            # on this kind of host (see hugepages.py)
            hugepages.relocate(self.model)
        # the native library runs here at all (which paths suit this model is checked per path)
        lib_ok = self._lib_ok = fast_cpu and native_kernels.library() is not None
        if kernels == "native" and not lib_ok:
            raise ValueError("kernels='native' needs a bfloat16 model on a CPU with the native "
                             f"kernels ({native_kernels.unavailable_reason or 'unsupported shapes'})")
        supported = native_step.supports(self.model) and not self.kv_spec.quantized
        if native_decode and not supported:
            raise ValueError("native decode steps need a bfloat16 model and bfloat16 KV pages on "
                             "a CPU with the native kernels "
                             f"({native_kernels.unavailable_reason or 'unsupported shapes'})")
        self._native_supported = supported
        self._native_decode_arg = native_decode
        self.native_decode = supported if native_decode is None else bool(native_decode)
        self._native: native_step.NativeDecodeStep | None = None
        self._attn_native_prefill = self._attn_native_decode = True
        # "auto" with nothing native to choose from is the torch side, unmeasured
        self.kernel_mode = kernels
        self._choice_pending = kernels == "auto" and lib_ok
        self.kernel_choice = kernel_choice.forced(
            "default" if kernels in (None, "auto") else kernels, lib_ok)
        if kernels == "auto":
            self.kernel_choice.mode = "auto"
        self.apply_kernel_choice(self.kernel_choice)
        self.sampler = Sampler(self.device, seed)
        self.states = SequenceStates()
        self.block_size = 0
        self.num_blocks = 0
        self._workspace = Workspace()
        self._dynamic_rope = self.model_config.rope.rope_type == "dynamic"

    # ------------------------------------------------------------------ cache
    def kv_cache_bytes_per_block(self, block_size: int) -> int:
        cfg = self.model_config
        return self.kv_spec.bytes_per_block(cfg.num_layers, cfg.num_kv_heads, block_size,
                                            cfg.head_dim)

    def initialize_cache(self, num_blocks: int, block_size: int) -> None:
        """Allocate K and V pages for every layer: (Hkv, num_blocks + 1, block_size, D) each
        (head-major, see layers.py). The extra last page is scratch space (the kernel choice's
        decode-step probes write their K/V there)."""
        cfg = self.model_config
        shape = self.kv_spec.cache_shape(cfg.num_kv_heads, num_blocks + 1, block_size,
                                         cfg.head_dim)
        for layer in self.model.layers:
            attn = layer.self_attn
            if (attn.k_cache is not None and tuple(attn.k_cache.shape) == shape
                    and attn.k_cache.dtype == self.kv_spec.dtype):
                attn.k_cache.zero_()   # same geometry (a new engine on this executor): reuse
                attn.v_cache.zero_()
                continue
            attn.k_cache = attn.v_cache = None   # free the old cache before allocating anew
            # Zeros (not garbage) matter: masked slots must hold finite values, since 0 * NaN
            # would poison the attention output. On CPU the pages are fresh anonymous
            # mappings, which the kernel zero-fills as they are first touched (2 MiB at a time
            # with huge pages): no zero_() pass, which on a cache sized to the free RAM took
            # ~13 s of start-up (11 GB) and made the whole budget resident before any use.
            fresh_zeros = self.device.type == "cpu"
            attn.k_cache = self._empty(shape, self.kv_spec.dtype)
            attn.v_cache = self._empty(shape, self.kv_spec.dtype)
            if not fresh_zeros:
                attn.k_cache.zero_()
                attn.v_cache.zero_()
        self.num_blocks, self.block_size = num_blocks, block_size
        if self.device.type == "cpu":
            log.info("%s", self.kv_spec.describe())
        if self._choice_pending:   # measured on the allocated cache (its scratch page)
            self._choice_pending = False
            shape = kernel_choice.model_shape(self.model)
            if self.kv_spec.quantized:   # measured without the native step: a decision apart
                shape["kv_cache"] = self.kv_spec.name
            self.apply_kernel_choice(kernel_choice.choose(
                lambda: kernel_choice.measure(self), shape))
        if self.device.type == "cpu":   # one line, every mode: which backend runs what
            log.info("%s", self.kernel_choice.summary(self.model))
        if self.native_decode:
            self._native = native_step.NativeDecodeStep(self.model, num_blocks, block_size)

    def apply_kernel_choice(self, choice: kernel_choice.KernelChoice) -> None:
        """Route linears, attention and decode steps as ``choice`` says (where each native
        path runs at all: a layer the native kernel cannot take stays on oneDNN)."""
        if not self._native_supported:   # (int8 KV pages: the summary must not say native)
            choice.decode_step = False
        self.kernel_choice = choice
        kernel_choice.route_linears(self.model, choice)   # bf16 linears; quantized keep theirs
        for module in self.model.modules():   # norms, RoPE, silu * up as native calls
            if hasattr(module, "fused"):
                module.fused = self._lib_ok and choice.mode != "torch"
        self._attn_native_prefill = choice.prefill_attention == "native"
        self._attn_native_decode = choice.decode_attention == "native"
        if self._native_decode_arg is None:
            self.native_decode = self._native_supported and choice.decode_step
        if not self.native_decode:
            self._native = None
        elif self._native is None and getattr(self, "block_size", 0):
            self._native = native_step.NativeDecodeStep(self.model, self.num_blocks,
                                                        self.block_size)

    def _empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.device.type == "cpu":   # decode attention streams the pages too
            return hugepages.empty(shape, dtype)
        return torch.empty(shape, dtype=dtype, device=self.device)

    # ---------------------------------------------------------------- execute
    def _order(self, plan: StepPlan) -> tuple[list[int], list[ScheduledRequest]]:
        """Decodes first, then multi-token chunks: ``chunks[k] is plan.requests[order[k]]``."""
        if self.block_size == 0:
            raise RuntimeError("initialize_cache() must be called before execute()")
        if plan.block_size != self.block_size:
            raise ValueError(f"plan block_size {plan.block_size} != cache block_size "
                             f"{self.block_size}")
        chunks = plan.requests
        # decodes by context length (so similar lengths share a padded group), then the rest
        order = sorted(range(len(chunks)), key=lambda i: (chunks[i].num_tokens > 1,
                                                          chunks[i].end if chunks[i].num_tokens == 1
                                                          else 0))
        return order, [chunks[i] for i in order]

    def _flatten(self, chunks: list[ScheduledRequest]):
        """Per-token lists for the step: ids, positions, cache slots, and per-chunk pages."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        pages: list[list[int]] = []
        for c in chunks:
            start, end = c.start, c.end
            ids.extend(c.token_ids)
            ids.extend(c.draft_token_ids)
            positions.extend(range(start, end))
            blocks = c.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            pages.append(blocks[:_cdiv(end, bs)])
        return ids, positions, slots, pages

    def _run_eager(self, chunks: list[ScheduledRequest], ids, positions, slots, pages) -> torch.Tensor:
        """Hidden states (T, hidden) for the flattened chunks."""
        dev, bs = self.device, self.block_size
        nd = sum(1 for c in chunks if c.num_tokens == 1)
        meta = AttentionMetadata(block_size=bs,
                                 slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
                                 num_decodes=nd, workspace=self._workspace,
                                 native_prefill=self._attn_native_prefill,
                                 native_decode=self._attn_native_decode)
        for lo, hi in _decode_groups([len(p) for p in pages[:nd]]):
            width = len(pages[hi - 1])   # sorted: the last row has the most pages
            meta.decode_groups.append(DecodeGroup(
                lo, hi, torch.tensor([t + [0] * (width - len(t)) for t in pages[lo:hi]],
                                     dtype=torch.int64, device=dev),
                torch.tensor(positions[lo:hi], dtype=torch.int64, device=dev)))
        offset = nd
        for c, p in zip(chunks[nd:], pages[nd:]):
            meta.prefills.append(PrefillSeq(offset=offset, num_tokens=c.num_tokens, start=c.start,
                                            block_ids=torch.tensor(p, device=dev)))
            offset += c.num_tokens
        rope_lens = None
        if self._dynamic_rope:  # NTK base from each sequence's length at the end of its chunk
            rope_lens = torch.tensor([c.end for c in chunks for _ in range(c.num_tokens)],
                                     device=dev)
        return self.model(torch.tensor(ids, dtype=torch.int64, device=dev),
                          torch.tensor(positions, dtype=torch.int64, device=dev), meta, rope_lens)

    def _logits_fn(self, chunks: list[ScheduledRequest]):
        """Run the forward pass; returns ``logits(rows) -> (len(rows), vocab)`` float32."""
        ids, positions, slots, pages = self._flatten(chunks)
        native = self._native
        if (native is not None and native.serves(len(ids))
                and all(len(c.token_ids) == 1 for c in chunks)):
            # decodes, some with drafts to verify: every drafted position is a row of its own
            # over the same pages (the step writes each layer's K/V for all rows before any
            # row attends; a request's rows read their pages together and share the weight
            # reads, each row's arithmetic its own), so verification computes what a plain
            # decode step computes and greedy speculation reproduces plain decoding's tokens
            # in bfloat16 too
            if len(ids) != len(chunks):
                pages = [p for c, p in zip(chunks, pages) for _ in range(c.num_tokens)]
            all_logits = native(ids, positions, slots, pages)                   # (rows, V)
            return lambda rows: all_logits[rows]
        hidden = self._run_eager(chunks, ids, positions, slots, pages)         # (T, hidden)
        return lambda rows: self.model.compute_logits(hidden[rows])

    @torch.inference_mode()
    def forward_logits(self, plan) -> list[torch.Tensor]:
        """Logits (num_tokens, vocab) float32 for every token of every scheduled request, in
        plan order. Writes K/V like ``execute`` but samples nothing (for tests, debugging and
        the draft-model proposer's short runs, ``model/proposers/draft.py``:
        ``plan`` may also be an ``engine.executor.Batch`` of live requests, described by its
        ``to_plan()``; the model layer does not import the engine's executor module)."""
        if not isinstance(plan, StepPlan):
            plan = plan.to_plan()
        order, chunks = self._order(plan)
        logits = self._logits_fn(chunks)(slice(None))
        per_chunk, offset = {}, 0
        for i, c in zip(order, chunks):
            per_chunk[i] = logits[offset:offset + c.num_tokens]
            offset += c.num_tokens
        return [per_chunk[i] for i in range(len(chunks))]

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        small_decode = (len(plan.requests) <= DECODE_THREADS_MAX_BATCH
                        and all(c.num_tokens == 1 for c in plan.requests))
        threads = self.decode_threads if self.decode_threads and small_decode else self.num_threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return self._execute(plan)

    def _verify(self, chunks: list[ScheduledRequest], states: list, spec: list[tuple[int, int]],
                logits_of, results: list[RequestStepOutput]) -> None:
        """Check each speculating request's drafts against the target's logits
        (``spec_verify``): its result is the accepted drafts plus the target's own token. The
        executor's state learns the accepted drafts (every token but the last: the last one
        comes back as the next step's input)."""
        from tokenfactory.model.spec_verify import verify_batch
        drafts = [chunks[ci].draft_token_ids for ci, _ in spec]
        rows = torch.tensor([r0 + j for (_, r0), d in zip(spec, drafts)
                             for j in range(len(d) + 1)])
        logits = logits_of(rows)                                      # (sum k_i + 1, V)
        for (ci, _), state, v in zip(spec, states, verify_batch(logits, drafts, states,
                                                                 self.sampler.generator)):
            if v.error is not None:
                results[ci].error = v.error
                continue
            results[ci].token_ids = list(v.token_ids)
            state.output_token_ids.extend(v.token_ids[:-1])

    def _execute(self, plan: StepPlan) -> StepResult:
        states = self.states.update(plan)
        order, chunks = self._order(plan)
        logits_of = self._logits_fn(chunks)

        # Rows whose logits we need: sampling rows, draft-verification rows, then
        # prompt-logprob rows.
        sample_rows, sample_chunks = [], []
        spec: list[tuple[int, int]] = []   # (chunk index, row of the last known token)
        plp_spans = []  # (chunk index in `chunks`, first row, positions [start, stop))
        offset = 0
        for ci, c in enumerate(chunks):
            if c.sample and c.draft_token_ids:
                # rows r0 .. r0 + k: the distributions after the last known token and after
                # each draft (a short prefill chunk of the target, verified below)
                spec.append((ci, offset + len(c.token_ids) - 1))
            elif c.sample:
                sample_rows.append(offset + c.num_tokens - 1)
                sample_chunks.append(ci)
            if c.compute_prompt_logprobs:
                # position p predicts prompt token p + 1, for prompt tokens start+1 .. up to
                # the last prompt token (whose successor is the first output, not a prompt token)
                stop = min(c.end, len(states[order[ci]].prompt_token_ids) - 1)
                if stop > c.start:
                    plp_spans.append((ci, offset, c.start, stop))
            offset += c.num_tokens

        results = [RequestStepOutput(c.request_id) for c in chunks]
        if sample_rows:
            lo = sample_rows[0]
            # consecutive rows (every decode-only step): a view, no index tensor, no copy
            rows = (slice(lo, lo + len(sample_rows))
                    if sample_rows[-1] - lo == len(sample_rows) - 1 else torch.tensor(sample_rows))
            logits = logits_of(rows)                                            # (N, V)
            grammar_rows = None
            if plan.grammar_bitmask is not None:
                grammar_rows = [chunks[ci].grammar_row for ci in sample_chunks]
            out = self.sampler(logits, [states[order[ci]] for ci in sample_chunks],
                               plan.grammar_bitmask, grammar_rows)
            for k, ci in enumerate(sample_chunks):
                res = results[ci]
                if k in out.errors:
                    res.error = out.errors[k]
                    continue
                res.token_ids.append(out.token_ids[k])
                if out.logprobs[k] is not None:
                    res.logprobs.append(out.logprobs[k])
        if spec:
            self._verify(chunks, [states[order[ci]] for ci, _ in spec], spec, logits_of, results)
        for ci, row0, start, stop in plp_spans:
            state = states[order[ci]]
            lp = torch.log_softmax(logits_of(slice(row0, row0 + stop - start)), dim=-1)
            targets = torch.tensor(state.prompt_token_ids[start + 1:stop + 1], device=lp.device)
            results[ci].prompt_logprobs = position_logprobs(
                lp, targets, state.sampling_params.prompt_logprobs)

        final: list[RequestStepOutput] = [None] * len(chunks)  # type: ignore[list-item]
        for k, i in enumerate(order):
            final[i] = results[k]
        return StepResult(final)
