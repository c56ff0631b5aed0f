"""Rotary position embeddings, computed per token from arbitrary positions.

Chunks start anywhere (prefix-cache hits, chunked prefill, decodes of different lengths in one
batch), so cos/sin are computed from each token's own position rather than sliced from a table:
for a few thousand tokens that is cheaper than keeping a table of ``max_position_embeddings``
rows (128k x head_dim for Llama 3.1). Frequencies follow ``transformers``' RoPE variants exactly:
default, ``linear``, ``dynamic`` (NTK), ``yarn`` and ``llama3``.
"""
from __future__ import annotations

import math

import torch

from tokenfactory.model.config import RopeConfig


def _default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    exps = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    return 1.0 / (theta ** exps)  # (dim/2,)


def _llama3_inv_freq(r: RopeConfig, dim: int) -> torch.Tensor:
    inv_freq = _default_inv_freq(r.theta, dim)
    old_len = r.original_max_position_embeddings
    low_wavelen, high_wavelen = old_len / r.low_freq_factor, old_len / r.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are interpolated by `factor`, short ones kept, the band between blended
    scaled = torch.where(wavelen > low_wavelen, inv_freq / r.factor, inv_freq)
    smooth = (old_len / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
    smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(r: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    factor = r.factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if r.attention_factor is not None:
        attention_factor = float(r.attention_factor)
    elif r.mscale and r.mscale_all_dim:
        attention_factor = mscale(factor, r.mscale) / mscale(factor, r.mscale_all_dim)
    else:
        attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        orig = r.original_max_position_embeddings
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(r.theta))

    low, high = correction_dim(r.beta_fast), correction_dim(r.beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = r.theta ** (torch.arange(0, dim, 2).to(torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1: keep the original frequency (high-frequency dims)
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


class RotaryEmbedding:
    """cos/sin for given positions. A plain object (not an nn.Module): nothing to load."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_position_embeddings: int,
                 device: torch.device | str = "cpu"):
        if rope.partial_rotary_factor != 1.0:
            raise ValueError("partial rotary embeddings are not supported by these architectures")
        self.config = rope
        self.dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.attention_scaling = 1.0
        with torch.device("cpu"):  # real numbers even when the model is built on "meta"
            inv_freq = self._inv_freq(rope, head_dim)
        self.inv_freq = inv_freq.to(device)  # (head_dim/2,) float32
        self.dynamic = rope.rope_type == "dynamic"

    def _inv_freq(self, rope: RopeConfig, head_dim: int) -> torch.Tensor:
        if rope.rope_type in ("default", "dynamic"):
            inv_freq = _default_inv_freq(rope.theta, head_dim)
        elif rope.rope_type == "linear":
            inv_freq = _default_inv_freq(rope.theta, head_dim) / rope.factor
        elif rope.rope_type == "llama3":
            inv_freq = _llama3_inv_freq(rope, head_dim)
        elif rope.rope_type == "yarn":
            inv_freq, self.attention_scaling = _yarn_inv_freq(rope, head_dim)
        else:
            raise ValueError(f"unsupported RoPE type {rope.rope_type!r}")
        return inv_freq

    def to(self, device: torch.device | str) -> "RotaryEmbedding":
        self.inv_freq = self.inv_freq.to(device)
        return self

    def _dynamic_inv_freq(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """NTK-aware scaling as transformers applies it: the base grows with the length of the
        sequence seen so far in the forward call (``seq_lens``, one per token, float32); at or
        below ``max_position_embeddings`` the original frequencies are used."""
        r, dim, max_pos = self.config, self.dim, self.max_position_embeddings
        s = torch.clamp(seq_lens.to(torch.float32), min=max_pos)
        base = r.theta * ((r.factor * s / max_pos) - (r.factor - 1)) ** (dim / (dim - 2))  # (T,)
        exps = torch.arange(0, dim, 2, dtype=torch.int64, device=s.device).to(torch.float32) / dim
        scaled = 1.0 / (base[:, None] ** exps[None, :])  # (T, dim/2)
        return torch.where((seq_lens > max_pos)[:, None], scaled, self.inv_freq[None, :])

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype,
                seq_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (T,) int. ``seq_lens`` (T,): for dynamic NTK, the length of the token's
        sequence at the end of its chunk. Returns cos, sin of shape (T, head_dim) in ``dtype``,
        with sin's first half negated so that :func:`apply_rope` needs no negation."""
        pos = positions.to(torch.float32)
        if self.dynamic and seq_lens is not None:
            freqs = pos[:, None] * self._dynamic_inv_freq(seq_lens)
        else:
            freqs = pos[:, None] * self.inv_freq[None, :]   # (T, dim/2)
        cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1)           # (T, dim)
        sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (T, heads, head_dim); cos/sin from :meth:`RotaryEmbedding.cos_sin`, (T, head_dim).
    Rotates pairs (i, i + head_dim/2): x * cos + [-x2, x1] * sin, like transformers'."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)   # sign lives in sin
    return x * cos[:, None, :] + swapped * sin[:, None, :]
