"""Anthropic prompt caching: breakpoints -> token positions -> engine pins -> usage numbers.

A ``cache_control`` marker on a block means "the prompt up to and including this block". The
prompt is what the chat template renders, so a block boundary is turned into a token position
by rendering the conversation truncated right after that block and counting the tokens the
truncated rendering shares with the full one (longest common prefix of the two token lists).
That count is exact whatever the template does around the block (role headers, end-of-turn
tokens, BPE merges across the boundary), and it is what a later request that repeats this
prefix will find in the prefix cache.

Usage arithmetic (documented in docs/api.md):
  P  = prompt tokens, c = ``RequestOutput.num_cached_tokens`` (reused KV, from pinned or plainly
       cached pages alike)
  cache_read_input_tokens     = c
  cache_creation_input_tokens = tokens after c up to the last breakpoint that reaches
       ``min_cache_tokens``, rounded down to a whole page (only whole pages are cached) and
       never past the last page the engine can reuse; split 1h / 5m by the breakpoint covering it
  input_tokens                = P - read - creation
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from tokenfactory.api.errors import APIError
from tokenfactory.engine.request import CacheBreakpoint

MAX_BREAKPOINTS = 4
TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}


@dataclass(frozen=True)
class BreakpointSpec:
    """Where a cache_control marker sits (protocol-specific position) and its TTL."""

    position: Any
    ttl: str = "5m"


@dataclass(frozen=True)
class ResolvedBreakpoint:
    num_tokens: int
    ttl: str


def validate_breakpoints(specs: Sequence[BreakpointSpec]) -> None:
    """At most 4 markers; longer TTLs must come before shorter ones (tools -> system -> messages)."""
    if len(specs) > MAX_BREAKPOINTS:
        raise APIError(400, f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be "
                            f"provided. Found {len(specs)}.")
    seen_5m = False
    for spec in specs:
        if spec.ttl not in TTL_SECONDS:
            raise APIError(400, f"cache_control.ttl must be '5m' or '1h', got {spec.ttl!r}")
        if spec.ttl == "5m":
            seen_5m = True
        elif seen_5m:
            raise APIError(400, "a cache_control block with ttl='1h' must not come after one with "
                                "ttl='5m' (longer TTLs must come before shorter ones)")


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def resolve_breakpoints(specs: Sequence[BreakpointSpec], full_ids: Sequence[int],
                        render_truncated: Callable[[Any], list[str]],
                        encode: Callable[[str], list[int]]) -> list[ResolvedBreakpoint]:
    """Token position of every breakpoint. ``render_truncated(position)`` returns one or more
    renderings of the conversation cut right after that block; the smallest common prefix wins
    (several renderings guard against a placeholder turn that happens to match what follows)."""
    out = []
    for spec in specs:
        texts = render_truncated(spec.position)
        n = min((common_prefix_len(full_ids, encode(t)) for t in texts), default=0)
        out.append(ResolvedBreakpoint(n, spec.ttl))
    return out


def engine_breakpoints(resolved: Sequence[ResolvedBreakpoint], min_cache_tokens: int
                       ) -> list[CacheBreakpoint]:
    """Breakpoints long enough to be written; shorter ones are silently not cached."""
    return [CacheBreakpoint(r.num_tokens, TTL_SECONDS[r.ttl]) for r in resolved
            if r.num_tokens >= min_cache_tokens and r.num_tokens > 0]


@dataclass
class CacheUsage:
    input_tokens: int
    cache_read_input_tokens: int
    cache_creation_input_tokens: int
    ephemeral_5m_input_tokens: int
    ephemeral_1h_input_tokens: int

    def anthropic(self) -> dict:
        return {"input_tokens": self.input_tokens,
                "cache_creation_input_tokens": self.cache_creation_input_tokens,
                "cache_read_input_tokens": self.cache_read_input_tokens,
                "cache_creation": {"ephemeral_5m_input_tokens": self.ephemeral_5m_input_tokens,
                                   "ephemeral_1h_input_tokens": self.ephemeral_1h_input_tokens}}


def cache_usage(num_prompt_tokens: int, num_cached_tokens: int,
                breakpoints: Sequence[CacheBreakpoint], block_size: int,
                prefix_caching: bool = True) -> CacheUsage:
    """Split the prompt into read / newly written / uncached tokens (sum = prompt tokens)."""
    p = num_prompt_tokens
    read = max(0, min(num_cached_tokens, p))
    created = {"5m": 0, "1h": 0}
    if prefix_caching and p > 0:
        reusable = ((p - 1) // block_size) * block_size  # the last token is always recomputed
        done = read
        for bp in sorted(breakpoints, key=lambda b: b.num_tokens):
            end = min((bp.num_tokens // block_size) * block_size, reusable)
            if end > done:
                created["1h" if bp.ttl_seconds >= 3600 else "5m"] += end - done
                done = end
    creation = created["5m"] + created["1h"]
    return CacheUsage(p - read - creation, read, creation, created["5m"], created["1h"])
