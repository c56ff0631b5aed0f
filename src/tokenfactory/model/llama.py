"""The Llama decoder family: Llama 2/3/3.1/3.2, Mistral, Qwen2, Qwen3.

They differ only in switches carried by :class:`ModelConfig`: q/k/v bias (Qwen2), per-head
q/k RMSNorm (Qwen3), sliding-window attention (Mistral, optionally Qwen2/3), tied embeddings,
the RoPE variant. One plain ``nn.Module`` covers all of them.

Parameters are stored fused where that saves matmuls: ``qkv_proj`` = [q; k; v] and
``gate_up_proj`` = [gate; up]. ``loader.py`` maps the checkpoint's tensor names onto them.
"""
from __future__ import annotations

import torch
from torch import nn

from tokenfactory.model import kernels
from tokenfactory.model.config import ModelConfig
from tokenfactory.model.layers import AttentionMetadata, GatedMLP, RMSNorm, paged_attention
from tokenfactory.model.rope import RotaryEmbedding, apply_rope

LOGITS_NATIVE_MAX_ROWS = 64   # the native kernel re-reads lm_head per 4 rows: fine for sampling rows


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.window = cfg.sliding_windows[layer]
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.fused = False   # RoPE in place, one native call (bfloat16 CPU; set by the runner)
        # Bound by the runner: (Hkv, num_blocks + 1, block_size, D) each, head-major (see
        # layers.py); the last page is scratch for padded rows and kernel-choice probes.
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def native_kv(self) -> tuple[int, int] | None:
        """Addresses of the K and V pages for the native decode step (bfloat16, contiguous,
        CPU, allocated), or None: then the model decodes with torch ops."""
        caches = (self.k_cache, self.v_cache)
        if any(c is None or c.dtype != torch.bfloat16 or c.device.type != "cpu"
               or not c.is_contiguous() for c in caches):
            return None
        return self.k_cache.data_ptr(), self.v_cache.data_ptr()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        T, H, Hkv, D = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)                                       # (T, (H + 2 Hkv) D)
        v = qkv[:, self.q_size + self.kv_size:].view(T, Hkv, D)     # (T, Hkv, D)
        if self.q_norm is None and self.fused:
            # rotate q and k in place in qkv, one native call
            qk = kernels.rope_(qkv[:, :self.q_size + self.kv_size].view(T, H + Hkv, D), cos, sin)
            q, k = qk[:, :H], qk[:, H:]
        elif self.q_norm is None:
            # rotate q and k in one pass: (T, H + Hkv, D)
            qk = apply_rope(qkv[:, :self.q_size + self.kv_size].view(T, H + Hkv, D), cos, sin)
            q, k = qk[:, :H], qk[:, H:]
        else:
            q = self.q_norm(qkv[:, :self.q_size].view(T, H, D))
            k = self.k_norm(qkv[:, self.q_size:self.q_size + self.kv_size].view(T, Hkv, D))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = paged_attention(q, k, v, self.k_cache, self.v_cache, meta, self.window, self.scale)
        return self.o_proj(o.reshape(T, self.q_size))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual stream x (T, hidden) plus the previous layer's output ``delta`` (None for
        the first layer) -> (the stream, this layer's MLP output): each residual add is done
        together with the norm that follows it (RMSNorm.add_norm)."""
        x, h = self.input_layernorm.add_norm(x, delta)
        x, h = self.post_attention_layernorm.add_norm(x, self.self_attn(h, cos, sin, meta))
        return x, self.mlp(h)


class LlamaForCausalLM(nn.Module):
    """input ids (T,) + positions (T,) -> hidden states (T, hidden); ``compute_logits`` maps
    selected hidden states to vocabulary logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Not a module: computed from the config, never loaded, survives meta-device init.
        self.rotary = RotaryEmbedding(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                rope_seq_lens: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)                                  # (T, hidden)
        cos, sin = self.rotary.cos_sin(positions, x.dtype, rope_seq_lens)  # (T, D) each
        delta = None
        for layer in self.layers:
            x, delta = layer(x, delta, cos, sin, meta)
        return self.norm.add_norm(x, delta)[1]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (N, hidden) already normed -> (N, vocab) float32.

        With the native kernels (bfloat16 on CPU) the rows that sample are summed in float32
        and not rounded to bfloat16, as the native decode step does: rounded logits tie often
        and greedy then depends on which path (prefill chunk, cached prefix, decode) computed
        them. Many rows (prompt logprobs of a long prompt) take oneDNN, rounded."""
        head = self.lm_head
        if (getattr(head, "native", False) and head.bias is None
                and hidden.shape[0] <= LOGITS_NATIVE_MAX_ROWS):
            return kernels.linear_f32(hidden if hidden.stride(-1) == 1 else hidden.contiguous(),
                                      head.weight)
        return head(hidden).float()
