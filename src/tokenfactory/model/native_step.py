"""Decode-only steps of up to ``kernels.LINEAR_MAX_ROWS`` sequences through the native layer.

A small-batch decode step streams every weight once, so its floor is weight bytes / memory
bandwidth (2.5-5 ms for the 100M bench model on this host). Run as torch ops, the step adds
~15 dispatches per layer; compiled with torch.compile, still ~5 opaque calls per layer plus
inductor's own kernels, 1-3 ms per step in all. Here the whole step -- embedding, every layer,
final norm, ``lm_head`` -- is one call into ``kernels/decode_layer.c``. Python around it
matters too: the weight stream flushes the caches, so every bit of Python between two steps
runs cold (measured ~0.3 ms of it when embedding, norm and lm_head were torch ops).

The step is built from what each module offers, not from raw ``.weight`` tensors: the
embedding its table, each norm its weight (``RMSNorm.native_weight``), each attention its KV
pages (``Attention.native_kv``), each linear a description of its weights in whatever format
they are stored (``native_linear()``, see ``linear_kernels.py``: bfloat16, GGUF Q8_0/Q4_0/Q4_1,
int8). A module that offers nothing makes :func:`supports` False, and the executor decodes
with torch ops (logged once). So a quantized or sharded linear plugs in by offering a form.

Used by the executor for bfloat16-activation models on CPUs with the native kernels, whatever
the architecture switches (q/k/v bias, q/k norm, sliding windows, tied embeddings, every RoPE
variant: the tables come from the model's own ``RotaryEmbedding``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from tokenfactory.model import kernels
from tokenfactory.model.linear_kernels import NativeLinear, describe, native_linear_of
from tokenfactory.model.llama import LlamaForCausalLM

log = logging.getLogger(__name__)
_logged: set[str] = set()


def native_embedding(module: nn.Module) -> NativeLinear | None:
    """The embedding table as a (vocab, hidden) :class:`NativeLinear` (rows are looked up,
    quantized ones dequantized): the module's own ``native_embedding()`` when it has one (a
    quantized table), else an ``nn.Embedding``'s bfloat16 weight; None otherwise."""
    offer = getattr(module, "native_embedding", None)
    if callable(offer):
        return offer()
    w = getattr(module, "weight", None)
    if (not isinstance(module, nn.Embedding) or w.dtype != torch.bfloat16
            or w.device.type != "cpu" or not w.is_contiguous()):
        return None
    return NativeLinear("bf16", w.data_ptr(), 0, 0, w.shape[0], w.shape[1], owner=module)


@dataclass
class LayerOffer:
    """What one decoder layer's modules offer the native step."""
    norms: tuple[int, int | None, int | None, int]   # input, q, k, post-attention (addresses)
    linears: tuple[NativeLinear, NativeLinear, NativeLinear, NativeLinear]  # qkv, o, gate_up, down


@dataclass
class ModelOffer:
    embed: NativeLinear
    lm_head: NativeLinear
    final_norm: int
    layers: list[LayerOffer]


def offers(model: LlamaForCausalLM) -> tuple[ModelOffer | None, str | None]:
    """Every module's native form, or (None, why not) naming the first module without one.
    KV pages are not asked here (allocated later): :class:`NativeDecodeStep` asks for them."""
    cfg = model.config
    if not kernels.supports(torch.bfloat16, cfg.head_dim):
        return None, (f"attention kernel unavailable for head_dim {cfg.head_dim} "
                      f"({kernels.unavailable_reason or 'unsupported head size'})")
    H, NQ, NQKV = cfg.hidden_size, cfg.num_heads * cfg.head_dim, \
        (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    I = cfg.intermediate_size

    def linear(name: str, module, shape: tuple[int, int]) -> NativeLinear:
        form = native_linear_of(module)
        if form is None:
            raise _Unsupported(f"{name} ({type(module).__name__}) offers no native linear")
        if not kernels.linear_kind_supported(form.kind):
            raise _Unsupported(f"{name}: no native kernel for kind {form.kind!r} in this build")
        if (form.out_features, form.in_features) != shape:
            raise _Unsupported(f"{name}: native linear {form.out_features}x{form.in_features}, "
                               f"expected {shape[0]}x{shape[1]}")
        return form

    def norm(name: str, module) -> int:
        ptr = None if module is None else module.native_weight()
        if ptr is None:
            raise _Unsupported(f"{name} offers no bfloat16 weight")
        return ptr

    try:
        embed = native_embedding(model.embed_tokens)
        if embed is None or embed.in_features != H or embed.out_features < cfg.vocab_size:
            what = type(model.embed_tokens).__name__
            dtype = getattr(getattr(model.embed_tokens, "weight", None), "dtype", None)
            raise _Unsupported(f"embedding ({what}{f', {dtype}' if dtype else ''}) offers no "
                               "native table")
        layers = []
        for i, layer in enumerate(model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            qk = (None, None) if attn.q_norm is None else (
                norm(f"layer {i} q_norm", attn.q_norm), norm(f"layer {i} k_norm", attn.k_norm))
            layers.append(LayerOffer(
                norms=(norm(f"layer {i} input norm", layer.input_layernorm), *qk,
                       norm(f"layer {i} post-attention norm", layer.post_attention_layernorm)),
                linears=(linear(f"layer {i} qkv_proj", attn.qkv_proj, (NQKV, H)),
                         linear(f"layer {i} o_proj", attn.o_proj, (H, NQ)),
                         linear(f"layer {i} gate_up_proj", mlp.gate_up_proj, (2 * I, H)),
                         linear(f"layer {i} down_proj", mlp.down_proj, (H, I)))))
        head = linear("lm_head", model.lm_head, (cfg.vocab_size, H))
        return ModelOffer(embed, head, norm("final norm", model.norm), layers), None
    except _Unsupported as exc:
        return None, str(exc)


class _Unsupported(Exception):
    pass


def supports(model: LlamaForCausalLM) -> bool:
    """Whether this model's decode steps can run natively here: every module offers a native
    form. When not, says why once (the executor then decodes with torch ops)."""
    if model.norm.weight.device.type != "cpu":
        return False
    _, why = offers(model)
    allocated = [layer.self_attn for layer in model.layers
                 if layer.self_attn.k_cache is not None]
    if why is None and any(attn.native_kv() is None for attn in allocated):
        why = "KV pages are not bfloat16 (e.g. --kv-cache-dtype int8)"
    if why is not None and why not in _logged:
        _logged.add(why)
        log.info("native decode step off: %s; decode steps run as torch ops", why)
    return why is None


class NativeDecodeStep:
    """``__call__(input_ids, positions, slots, tables) -> logits (B, vocab)`` float32 for a
    decode-only batch of ``B <= max_batch`` sequences (one new token each)."""

    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int):
        cfg = model.config
        offer, why = offers(model)
        if offer is None:
            raise ValueError(f"no native decode step for this model: {why}")
        self.model = model
        self.offer = offer               # keeps every offered form's owner alive
        self.max_batch = kernels.LINEAR_MAX_ROWS
        self.dims = kernels.LayerDims(
            hidden=cfg.hidden_size, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim, intermediate=cfg.intermediate_size,
            num_blocks=model.layers[0].self_attn.k_cache.shape[1], block_size=block_size,
            eps=cfg.rms_norm_eps, scale=cfg.head_dim ** -0.5)
        self.layers = (kernels.LayerWeights * len(model.layers))()
        for i, (layer, lo) in enumerate(zip(model.layers, offer.layers)):
            kv = layer.self_attn.native_kv()
            if kv is None:
                raise ValueError(f"layer {i} attention offers no bfloat16 KV pages")
            qkv, o, gate_up, down = (describe(f) for f in lo.linears)
            self.layers[i] = kernels.LayerWeights(
                input_norm=lo.norms[0], q_norm=lo.norms[1], k_norm=lo.norms[2],
                post_norm=lo.norms[3], qkv=qkv, o=o, gate_up=gate_up, down=down,
                k_cache=kv[0], v_cache=kv[1], window=cfg.sliding_windows[i] or 0)
        self.embed, self.lm_head = describe(offer.embed), describe(offer.lm_head)
        self.final_norm = offer.final_norm
        # RoPE rows for every position, once (not for dynamic NTK, whose rows depend on the
        # sequence length too: computed per step)
        self.rope_table = None
        if not model.rotary.dynamic:
            positions = torch.arange(cfg.max_model_len, dtype=torch.int64)
            self.rope_table = tuple(t.contiguous() for t in model.rotary.cos_sin(
                positions, torch.bfloat16))
        self.work = torch.empty(kernels.decode_layer_workspace(self.max_batch, self.dims),
                                dtype=torch.bfloat16)
        # float32 sums of the quantized linears, one slice per output row (B x widest)
        widest = max([f.out_features for lo in offer.layers for f in lo.linears
                      if f.kind != "bf16"] + [offer.lm_head.out_features
                                              if offer.lm_head.kind != "bf16" else 1])
        self.fwork = torch.empty(self.max_batch * widest, dtype=torch.float32)
        self.weight_bytes = (sum(f.weight_bytes for lo in offer.layers for f in lo.linears)
                             + offer.lm_head.weight_bytes)   # read once per step
        self.x = torch.empty(self.max_batch, cfg.hidden_size, dtype=torch.bfloat16)
        self._ints = torch.zeros(3, self.max_batch, dtype=torch.int64)   # ids, positions, slots
        self._ints_np = self._ints.numpy()
        self._table = torch.zeros(self.max_batch, 64, dtype=torch.int64)  # (B, pages), grows
        self._table_np = self._table.numpy()
        # The structs hold raw cache pointers: the executor builds a new step whenever it
        # (re)allocates the cache (TorchExecutor.initialize_cache).

    def serves(self, batch: int) -> bool:
        return 0 < batch <= self.max_batch

    def __call__(self, input_ids: list[int], positions: list[int], slots: list[int],
                 tables: list[list[int]]) -> torch.Tensor:
        model = self.model
        b = len(input_ids)
        width = max(len(t) for t in tables)
        # the step's int64 arguments go into buffers kept across steps, written through numpy
        # views (a torch.tensor per argument, cold after the weight stream, cost ~0.1 ms each)
        if self._table.shape[1] < width:
            self._table = torch.zeros(self.max_batch, max(width, 2 * self._table.shape[1]),
                                      dtype=torch.int64)
            self._table_np = self._table.numpy()
        ints = self._ints_np
        ints[0, :b] = input_ids
        ints[1, :b] = positions
        ints[2, :b] = slots
        table = self._table[:b, :width]
        tnp = self._table_np
        for i, t in enumerate(tables):
            tnp[i, :len(t)] = t
            tnp[i, len(t):width] = 0
        ids, pos, slot = self._ints[0, :b], self._ints[1, :b], self._ints[2, :b]
        if self.rope_table is not None:
            (cos, sin), rows = self.rope_table, pos
        else:
            cos, sin = (t.contiguous() for t in model.rotary.cos_sin(pos, self.x.dtype, pos + 1))
            rows = torch.arange(b, dtype=torch.int64)
        logits = torch.empty(b, model.config.vocab_size, dtype=torch.float32)
        kernels.decode_step(self.layers, self.dims, ids, self.embed, self.final_norm,
                            self.lm_head, self.x, cos, sin, rows, slot, table, pos, self.work,
                            self.fwork, logits)
        return logits
