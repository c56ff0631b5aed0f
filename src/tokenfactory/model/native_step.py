"""Decode-only steps of up to ``kernels.LINEAR_MAX_ROWS`` sequences through the native layer.

A small-batch decode step streams every weight once, so its floor is weight bytes / memory
bandwidth (2.5-5 ms for the 100M bench model on this host). Run as torch ops, the step adds
~15 dispatches per layer; compiled with torch.compile, still ~5 opaque calls per layer plus
inductor's own kernels, 1-3 ms per step in all. Here the whole step -- embedding, every layer,
final norm, ``lm_head`` -- is one call into ``kernels/decode_layer.c``. Python around it
matters too: the weight stream flushes the caches, so every bit of Python between two steps
runs cold (measured ~0.3 ms of it when embedding, norm and lm_head were torch ops).

Used by the executor for bfloat16 models on CPUs with the native kernels, whatever the
architecture switches (q/k/v bias, q/k norm, sliding windows, tied embeddings, every RoPE
variant: the tables come from the model's own ``RotaryEmbedding``).
"""
from __future__ import annotations

import torch

from tokenfactory.model import kernels
from tokenfactory.model.llama import LlamaForCausalLM


def _ptr(t: torch.Tensor | None) -> int | None:
    if t is None:
        return None
    assert t.dtype == torch.bfloat16 and t.is_contiguous() and t.device.type == "cpu"
    return t.data_ptr()


def supports(model: LlamaForCausalLM) -> bool:
    """Whether this model's decode steps can run natively here."""
    cfg = model.config
    dtype = model.embed_tokens.weight.dtype
    return (model.embed_tokens.weight.device.type == "cpu"
            and kernels.supports(dtype, cfg.head_dim)
            and all(kernels.supports_linear(dtype, n) for n in
                    (cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.intermediate_size))
            and all(getattr(layer.mlp.gate_up_proj, "native", False)
                    for layer in model.layers)
            and getattr(model.lm_head, "native", False) and model.lm_head.bias is None)


class NativeDecodeStep:
    """``__call__(input_ids, positions, slots, tables) -> logits (B, vocab)`` float32 for a
    decode-only batch of ``B <= max_batch`` sequences (one new token each)."""

    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int):
        cfg = model.config
        self.model = model
        self.max_batch = kernels.LINEAR_MAX_ROWS
        self.dims = kernels.LayerDims(
            hidden=cfg.hidden_size, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim, intermediate=cfg.intermediate_size,
            num_blocks=model.layers[0].self_attn.k_cache.shape[1], block_size=block_size,
            eps=cfg.rms_norm_eps, scale=cfg.head_dim ** -0.5)
        self.layers = (kernels.LayerWeights * len(model.layers))()
        for i, layer in enumerate(model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            self.layers[i] = (kernels.LayerWeights(
                input_norm=_ptr(layer.input_layernorm.weight),
                qkv_w=_ptr(attn.qkv_proj.weight), qkv_b=_ptr(attn.qkv_proj.bias),
                q_norm=_ptr(attn.q_norm.weight) if attn.q_norm is not None else None,
                k_norm=_ptr(attn.k_norm.weight) if attn.k_norm is not None else None,
                o_w=_ptr(attn.o_proj.weight), o_b=_ptr(attn.o_proj.bias),
                post_norm=_ptr(layer.post_attention_layernorm.weight),
                gate_up_w=_ptr(mlp.gate_up_proj.weight), gate_up_b=_ptr(mlp.gate_up_proj.bias),
                down_w=_ptr(mlp.down_proj.weight), down_b=_ptr(mlp.down_proj.bias),
                k_cache=_ptr(attn.k_cache), v_cache=_ptr(attn.v_cache),
                window=cfg.sliding_windows[i] or 0))
        # RoPE rows for every position, once (not for dynamic NTK, whose rows depend on the
        # sequence length too: computed per step)
        self.rope_table = None
        if not model.rotary.dynamic:
            positions = torch.arange(cfg.max_model_len, dtype=torch.int64)
            self.rope_table = tuple(t.contiguous() for t in model.rotary.cos_sin(
                positions, model.embed_tokens.weight.dtype))
        self.work = torch.empty(kernels.decode_layer_workspace(self.max_batch, self.dims),
                                dtype=torch.bfloat16)
        for t in (model.norm.weight, model.embed_tokens.weight, model.lm_head.weight):
            _ptr(t)                          # checks dtype and layout
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
        kernels.decode_step(self.layers, self.dims, ids, model.embed_tokens.weight,
                            model.norm.weight, model.lm_head.weight, self.x, cos, sin, rows,
                            slot, table, pos, self.work, logits)
        return logits
