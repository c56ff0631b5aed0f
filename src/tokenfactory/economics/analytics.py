"""Inference arithmetic from the hardware up: bytes, FLOPs, the roofline and what they cost.

Every function is plain arithmetic on ``ModelSpec`` / ``HardwareSpec``; docs/economics.md
derives each formula. Units: bytes, FLOPs, seconds, dollars (``*_ms`` fields are milliseconds).
"""

from __future__ import annotations

import functools

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from .catalog import HardwareSpec, ModelSpec, dtype_bytes

# ---------------------------------------------------------------------------------------------
# Parameters and weight bytes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamCount:
    total: int                 # every weight (biases and MoE router biases ignored)
    active: int                # weights touched by one token (top-k experts + shared)
    embedding: int             # input embedding table
    lm_head: int               # output projection (0 when tied to the embedding)
    attention_per_layer: int
    expert: int                # one routed expert's weights
    layer_dense_mlp: int


def attention_params(model: ModelSpec) -> int:
    h, n = model.hidden_size, model.num_heads
    if model.mla:
        m = model.mla
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank:
            q = h * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * n * qk
        else:
            q = h * n * qk
        kv = h * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank \
            + m.kv_lora_rank * n * (m.qk_nope_head_dim + m.v_head_dim)
        return q + kv + n * m.v_head_dim * h
    d = model.head_dim
    return h * n * d + 2 * h * model.num_kv_heads * d + n * d * h


def param_count(model: ModelSpec) -> ParamCount:
    """Parameters of ``model`` (total and active per token). Cached per (frozen) spec: the
    simulated executor asks for it every step."""
    try:
        return _param_count(model)
    except TypeError:   # a spec with an unhashable field: compute it afresh
        return _param_count.__wrapped__(model)


@functools.lru_cache(maxsize=256)
def _param_count(model: ModelSpec) -> ParamCount:
    h = model.hidden_size
    attn = attention_params(model)
    dense_mlp = 3 * h * model.intermediate_size              # gate, up, down (SwiGLU)
    expert = 3 * h * model.expert_intermediate_size
    shared = 3 * h * model.shared_expert_intermediate_size
    moe = set(model.moe_layers) if model.is_moe else set()
    total = active = 0
    for layer in range(model.num_layers):
        norms = 2 * h
        if layer in moe:
            router = h * model.num_experts
            total += attn + norms + router + shared + model.num_experts * expert
            active += attn + norms + router + shared + model.experts_per_token * expert
        else:
            total += attn + norms + dense_mlp
            active += attn + norms + dense_mlp
    embedding = model.vocab_size * h
    lm_head = 0 if model.tied_embeddings else model.vocab_size * h
    total += embedding + lm_head + h
    active += embedding + lm_head + h
    return ParamCount(total=total, active=active, embedding=embedding, lm_head=lm_head,
                      attention_per_layer=attn, expert=expert, layer_dense_mlp=dense_mlp)


def weight_bytes(model: ModelSpec, precision: str = "bf16") -> float:
    """All weights resident in memory (every expert of an MoE)."""
    return param_count(model).total * dtype_bytes(precision)


def embedding_bytes(model: ModelSpec, precision: str = "bf16") -> float:
    """One vocab x hidden table (the input embedding; lm_head is the same size when untied)."""
    return model.vocab_size * model.hidden_size * dtype_bytes(precision)


def expected_experts_touched(num_experts: int, top_k: int, tokens: float) -> float:
    """Distinct experts one MoE layer reads for ``tokens`` tokens routed uniformly:
    E * (1 - (1 - k/E)^T). One token reads k; a large batch reads all E."""
    if num_experts <= 0 or tokens <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def streamed_weight_bytes(model: ModelSpec, tokens: float, precision: str = "bf16") -> float:
    """Weight bytes one forward step reads from memory for ``tokens`` tokens in the batch.

    Every matmul weight is read once per step; the input embedding is a row gather (not
    streamed) unless it is tied to lm_head; an MoE layer reads only the experts its tokens
    were routed to (see ``expected_experts_touched``)."""
    p = param_count(model)
    params = p.total - (p.embedding if not model.tied_embeddings else 0)
    if model.is_moe:
        untouched = model.num_experts - expected_experts_touched(
            model.num_experts, model.experts_per_token, tokens)
        params -= len(model.moe_layers) * untouched * p.expert
    return params * dtype_bytes(precision)


# ---------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------


def kv_bytes_per_token_per_layer(model: ModelSpec, kv_dtype: str = "bf16") -> float:
    """K and V for one token in one layer: 2 * kv_heads * head_dim * bytes (MHA/GQA/MQA), or
    the MLA latent plus its decoupled RoPE key: (kv_lora_rank + qk_rope_head_dim) * bytes."""
    return model.kv_bytes_per_token_per_layer(kv_dtype)


def kv_bytes_per_token(model: ModelSpec, kv_dtype: str = "bf16") -> float:
    """Cache bytes one more token costs while the context is shorter than every window
    (i.e. summed over all layers, sliding ones included)."""
    return model.kv_bytes_per_token(kv_dtype)


def kv_bytes_for_context(model: ModelSpec, context: int, kv_dtype: str = "bf16") -> float:
    """Cache bytes of one sequence holding ``context`` tokens: a sliding-window (or chunked)
    layer keeps at most ``window`` tokens, a global layer keeps all of them."""
    per_layer = kv_bytes_per_token_per_layer(model, kv_dtype)
    kept = sum(context if w is None else min(context, w) for w in model.layer_windows)
    return kept * per_layer


def kv_replication(model: ModelSpec, tp: int) -> float:
    """How many copies of each KV byte tensor parallelism stores. Heads shard across ranks
    until there are fewer KV heads than ranks; the MLA latent is shared by all heads, so each
    rank keeps a full copy."""
    if model.mla:
        return float(tp)
    return max(1.0, tp / model.num_kv_heads)


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------


def _attention_flops_per_pair(model: ModelSpec) -> float:
    """FLOPs for one (query, key) pair in one layer: QK^T and PV, 2 FLOPs per multiply-add."""
    if model.mla:
        qk = model.mla.qk_nope_head_dim + model.mla.qk_rope_head_dim
        return 2.0 * model.num_heads * (qk + model.mla.v_head_dim)
    return 4.0 * model.num_heads * model.head_dim


def _keys_attended(start: int, new_tokens: int, window: Optional[int]) -> float:
    """Sum over the new tokens (positions start+1 .. start+n) of the keys each one sees."""
    lo, hi = start + 1, start + new_tokens
    if new_tokens <= 0:
        return 0.0
    if window is None or hi <= window:
        return (lo + hi) * new_tokens / 2.0
    if lo > window:
        return float(window) * new_tokens
    below = (lo + window) * (window - lo + 1) / 2.0
    return below + float(window) * (hi - window)


def attention_flops(model: ModelSpec, new_tokens: int, cached_tokens: int = 0) -> float:
    """The quadratic term: each new token attends to every earlier (and its own) position."""
    per_pair = _attention_flops_per_pair(model)
    return per_pair * sum(_keys_attended(cached_tokens, new_tokens, w)
                          for w in model.layer_windows)


def linear_flops_per_token(model: ModelSpec, with_lm_head: bool = True) -> float:
    """2 FLOPs per active weight (embedding lookup excluded: it is a gather)."""
    p = param_count(model)
    params = p.active - p.embedding - p.lm_head
    if with_lm_head:
        params += model.vocab_size * model.hidden_size
    return 2.0 * params


def prefill_flops(model: ModelSpec, prompt_tokens: int, cached_tokens: int = 0) -> float:
    """FLOPs to prefill ``prompt_tokens`` new tokens after ``cached_tokens`` cached ones:
    linear layers for every token, lm_head for the last only, plus attention's quadratic term."""
    if prompt_tokens <= 0:
        return 0.0
    linear = linear_flops_per_token(model, with_lm_head=False) * prompt_tokens
    lm_head = 2.0 * model.vocab_size * model.hidden_size
    return linear + lm_head + attention_flops(model, prompt_tokens, cached_tokens)


# ---------------------------------------------------------------------------------------------
# The roofline
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepEstimate:
    seconds: float
    memory_seconds: float
    compute_seconds: float
    bytes_moved: float
    flops: float
    bound: str                 # "memory" or "compute"

    @property
    def ms(self) -> float:
        return self.seconds * 1e3

    @property
    def arithmetic_intensity(self) -> float:
        return self.flops / self.bytes_moved if self.bytes_moved else math.inf


def ridge_point(hardware: HardwareSpec, precision: str = "bf16") -> float:
    """FLOP per byte where compute time equals memory time: peak FLOP/s / bandwidth."""
    return hardware.peak_flops(precision) / hardware.bandwidth_bytes_per_s


def roofline_step(model: ModelSpec, hardware: HardwareSpec, batch_tokens: Sequence[int],
                  contexts: Sequence[int], tp: int = 1, precision: str = "bf16",
                  kv_dtype: Optional[str] = None) -> StepEstimate:
    """One engine step: sequence i processes ``batch_tokens[i]`` new tokens on top of
    ``contexts[i]`` cached ones. Time = max(bytes / bandwidth, FLOPs / peak) across ``tp``
    accelerators (communication not modelled)."""
    if len(batch_tokens) != len(contexts):
        raise ValueError("batch_tokens and contexts must have one entry per sequence")
    if tp < 1:
        raise ValueError("tp must be >= 1")
    if any(t < 0 for t in batch_tokens) or any(c < 0 for c in contexts):
        raise ValueError("token counts and contexts must be >= 0")
    kv_dtype = kv_dtype or precision
    total_tokens = sum(batch_tokens)
    running = [(t, c) for t, c in zip(batch_tokens, contexts) if t > 0]
    if not running:
        return StepEstimate(0.0, 0.0, 0.0, 0.0, 0.0, "memory")
    linear = linear_flops_per_token(model, with_lm_head=False) * total_tokens
    lm_head = 2.0 * model.vocab_size * model.hidden_size * len(running)  # last token each
    attn = sum(attention_flops(model, t, c) for t, c in running)
    flops = linear + lm_head + attn
    kv_read = sum(kv_bytes_for_context(model, c, kv_dtype) for _, c in running)
    kv_write = sum(kv_bytes_for_context(model, c + t, kv_dtype)
                   - kv_bytes_for_context(model, c, kv_dtype) for t, c in running)
    moved = streamed_weight_bytes(model, total_tokens, precision) \
        + (kv_read + kv_write) * kv_replication(model, tp)
    mem_s = moved / (hardware.bandwidth_bytes_per_s * tp)
    cmp_s = flops / (hardware.peak_flops(precision) * tp)
    return StepEstimate(seconds=max(mem_s, cmp_s), memory_seconds=mem_s, compute_seconds=cmp_s,
                        bytes_moved=moved, flops=flops,
                        bound="memory" if mem_s >= cmp_s else "compute")


def step_time_seconds(model: ModelSpec, hardware: HardwareSpec, batch_tokens: Sequence[int],
                      contexts: Sequence[int], tp: int = 1, precision: str = "bf16",
                      kv_dtype: Optional[str] = None) -> float:
    """Seconds one step takes on the roofline: what a simulated executor adds to its clock."""
    return roofline_step(model, hardware, batch_tokens, contexts, tp, precision,
                         kv_dtype).seconds


def decode_floor(model: ModelSpec, hardware: HardwareSpec, batch: int = 1, context: int = 0,
                 tp: int = 1, precision: str = "bf16",
                 kv_dtype: Optional[str] = None) -> StepEstimate:
    """One decode step for ``batch`` sequences that each hold ``context`` tokens."""
    if batch < 1:
        raise ValueError("batch must be >= 1")
    return roofline_step(model, hardware, [1] * batch, [context] * batch, tp, precision,
                         kv_dtype)


# ---------------------------------------------------------------------------------------------
# Capacity and cost
# ---------------------------------------------------------------------------------------------


def max_batch(model: ModelSpec, hardware: HardwareSpec, context: int, tp: int = 1,
              precision: str = "bf16", kv_dtype: Optional[str] = None,
              memory_fraction: float = 1.0) -> int:
    """Largest number of sequences of ``context`` tokens whose KV fits next to the weights:
    floor((tp * memory * fraction - weights) / (KV per sequence * replication)). 0 = none."""
    if context < 1:
        raise ValueError("context must be >= 1")
    free = tp * hardware.memory_bytes * memory_fraction - weight_bytes(model, precision)
    per_seq = kv_bytes_for_context(model, context, kv_dtype or precision) \
        * kv_replication(model, tp)
    if free <= 0:
        return 0
    return int(free // per_seq)


def min_tp_to_fit(model: ModelSpec, hardware: HardwareSpec, context: int,
                  precision: str = "bf16", kv_dtype: Optional[str] = None,
                  memory_fraction: float = 1.0, limit: int = 1024) -> Optional[int]:
    """Smallest power-of-two tensor-parallel size that holds the weights and one sequence."""
    tp = 1
    while tp <= limit:
        if max_batch(model, hardware, context, tp, precision, kv_dtype, memory_fraction) >= 1:
            return tp
        tp *= 2
    return None


def cost_per_million_output_tokens(model: ModelSpec, hardware: HardwareSpec, batch: int,
                                   context: int = 0, tp: int = 1,
                                   cost_per_hour: Optional[float] = None,
                                   precision: str = "bf16",
                                   kv_dtype: Optional[str] = None) -> float:
    """$ per 1M decoded tokens: step time x tp accelerators x $/hour / batch."""
    rate = hardware.cost_per_hour if cost_per_hour is None else cost_per_hour
    step = decode_floor(model, hardware, batch, context, tp, precision, kv_dtype)
    return step.seconds * tp * rate / 3600.0 / batch * 1e6


def cost_per_million_from_step(step_seconds: float, batch: int, cost_per_hour: float,
                               accelerators: int = 1) -> float:
    """The same formula for a step time you already have (e.g. the seed's 41.8 ms)."""
    return step_seconds * accelerators * cost_per_hour / 3600.0 / batch * 1e6


@dataclass(frozen=True)
class Throughput:
    tokens_per_s: float          # whole tensor-parallel replica
    tokens_per_s_per_gpu: float
    tokens_per_s_per_rack: float
    tokens_per_s_per_mw: float   # per MW of facility power (IT power x PUE)
    watts_per_gpu: float         # facility watts per accelerator


def decode_throughput(model: ModelSpec, hardware: HardwareSpec, batch: int, context: int = 0,
                      tp: int = 1, precision: str = "bf16", kv_dtype: Optional[str] = None,
                      pue: float = 1.2) -> Throughput:
    step = decode_floor(model, hardware, batch, context, tp, precision, kv_dtype)
    replica = batch / step.seconds
    per_gpu = replica / tp
    watts = hardware.watts_per_accelerator_in_rack * pue
    return Throughput(tokens_per_s=replica, tokens_per_s_per_gpu=per_gpu,
                      tokens_per_s_per_rack=per_gpu * hardware.rack_accelerators,
                      tokens_per_s_per_mw=per_gpu / watts * 1e6, watts_per_gpu=watts)
