"""Serving techniques priced: prompt caching, speculative decoding, disaggregated KV transfer."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .analytics import kv_bytes_for_context
from .catalog import ModelSpec


@dataclass(frozen=True)
class CachedSessionPrice:
    effective_input_price_per_million: float
    uncached_input_price_per_million: float
    reduction: float             # uncached / effective
    input_tokens: int
    dollars: float


def cached_session_input_price(turns: int, prefix_tokens: int, delta_tokens: int = 0,
                               base_input_per_million: float = 3.0,
                               write_multiplier: float = 1.25,
                               read_multiplier: float = 0.1) -> CachedSessionPrice:
    """Effective $/M input for a session that resends a stable prefix every turn: turn 1
    writes the prefix (write_multiplier; 1.25 for the 5-minute TTL, 2.0 for 1 hour), turns
    2..N read it (read_multiplier), and each turn's new delta is billed at the base rate."""
    if turns < 1 or prefix_tokens < 0 or delta_tokens < 0:
        raise ValueError("turns must be >= 1 and token counts >= 0")
    units = prefix_tokens * write_multiplier + (turns - 1) * prefix_tokens * read_multiplier \
        + turns * delta_tokens
    tokens = turns * (prefix_tokens + delta_tokens)
    dollars = units * base_input_per_million / 1e6
    effective = dollars / tokens * 1e6 if tokens else 0.0
    return CachedSessionPrice(effective, base_input_per_million,
                              base_input_per_million / effective if effective else math.inf,
                              tokens, dollars)


def speculative_expected_tokens(alpha: float, k: int) -> float:
    """Tokens one verification step yields with k drafted tokens at per-token acceptance
    alpha: (1 - alpha^(k+1)) / (1 - alpha)."""
    if not 0.0 <= alpha <= 1.0 or k < 0:
        raise ValueError("alpha must be in [0, 1] and k >= 0")
    if alpha == 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def speculative_speedup(alpha: float, k: int, draft_cost_ratio: float) -> float:
    """Net speedup over plain decoding when one draft step costs ``draft_cost_ratio`` of a
    target step and the verification pass costs one target step (decode is memory-bound)."""
    return speculative_expected_tokens(alpha, k) / (1.0 + k * draft_cost_ratio)


def draft_cost_ratio_for_speedup(alpha: float, k: int, speedup: float) -> float:
    """The draft/target cost ratio at which the net speedup equals ``speedup``."""
    return (speculative_expected_tokens(alpha, k) / speedup - 1.0) / k


def kv_transfer_seconds(model: ModelSpec, prompt_tokens: int, link_gbps: float,
                        kv_dtype: str = "bf16") -> float:
    """Time to ship a prefill's KV cache from a prefill to a decode pool over a
    ``link_gbps`` (gigabits per second, decimal) link, ignoring protocol overhead."""
    if link_gbps <= 0:
        raise ValueError("link_gbps must be positive")
    return kv_bytes_for_context(model, prompt_tokens, kv_dtype) / (link_gbps * 1e9 / 8.0)
