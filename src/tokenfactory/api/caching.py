"""Anthropic prompt caching: breakpoints -> token positions -> engine pins -> usage numbers.

A ``cache_control`` marker on a block means "the prompt up to and including this block". The
prompt is what the chat template renders, so a block boundary is turned into a token position
by rendering the conversation truncated right after that block and counting the tokens the
truncated rendering shares with the full one (longest common prefix of the two token lists).
That count is exact whatever the template does around the block (role headers, end-of-turn
tokens, BPE merges across the boundary), and it is what a later request that repeats this
prefix will find in the prefix cache. The full prompt is tokenized once: of a truncated
rendering only the part from its last turn marker on is (``shared_prefix_tokens``).

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

import bisect
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


def common_text_prefix_len(a: str, b: str) -> int:
    """Length of the longest common prefix of two strings (binary search over C-level
    comparisons: a few dozen slices even for megabytes of text)."""
    if a.startswith(b):
        return len(b)
    lo, hi = 0, min(len(a), len(b))   # a[:lo] == b[:lo]; a[:hi + 1] != b[:hi + 1]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a.startswith(b[lo:mid], lo):
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True)
class TokenizedText:
    """A text, its token ids and each token's character span (None: the tokenizer gives none)."""

    text: str
    ids: list[int]
    offsets: list[tuple[int, int]] | None = None


def split_tokens(tokenizer) -> dict[int, str]:
    """Added tokens at whose start a text can be cut and tokenized in two independent halves.

    ``tokenizers`` first cuts the text around its added tokens (leftmost-longest match) and
    then normalizes, pre-tokenizes and BPE-encodes each piece on its own, so if ``text[s:]``
    starts with an added token the encoding of ``text`` is the encoding of ``text[:s]``
    followed by that of ``text[s:]``. That holds for tokens that swallow no neighbouring
    whitespace (no lstrip/rstrip), match anywhere (not single_word), are matched on the raw
    text (not normalized), and whose text appears inside no other added token (else a longer
    match could start before ``s``). Chat templates put such a token (``<|im_start|>``,
    ``<|start_header_id|>``) at every turn boundary.
    """
    backend = getattr(tokenizer, "backend", None)
    getter = getattr(backend, "get_added_tokens_decoder", None)
    if getter is None:
        return {}
    added = getter()
    contents = [t.content for t in added.values()]
    safe = {}
    for i, t in added.items():
        if t.lstrip or t.rstrip or t.single_word or t.normalized or not t.content:
            continue
        if any(t.content in other and t.content != other for other in contents):
            continue
        safe[i] = t.content
    return safe


def shared_prefix_tokens(full: TokenizedText, text: str, encode: Callable[[str], list[int]],
                         splits: dict[int, str]) -> int:
    """``common_prefix_len(full.ids, encode(text))`` (what a breakpoint's position is defined
    as), computed by tokenizing only the end of ``text``: from the last split token (see
    ``split_tokens``) that lies inside the part ``text`` shares with ``full.text``, the tokens
    before it are ``full.ids``' own. A breakpoint then costs the tokens of its last turn, not
    of the whole prompt again."""
    if full.offsets is None or not splits:
        return common_prefix_len(full.ids, encode(text))
    m = common_text_prefix_len(full.text, text)
    j, start = 0, 0
    # tokens ending inside the shared text (token end offsets never decrease)
    k = bisect.bisect_right(full.offsets, m, key=lambda span: span[1])
    for k in range(k - 1, -1, -1):
        content = splits.get(full.ids[k])
        s, e = full.offsets[k]
        if content is not None and e == s + len(content) and full.text.startswith(content, s):
            j, start = k, s
            break
    tail = encode(text[start:])
    return j + common_prefix_len(full.ids[j:], tail)


def resolve_breakpoints(specs: Sequence[BreakpointSpec], full: TokenizedText,
                        render_truncated: Callable[[Any], list[str]],
                        encode: Callable[[str], list[int]],
                        splits: dict[int, str] | None = None) -> list[ResolvedBreakpoint]:
    """Token position of every breakpoint. ``render_truncated(position)`` returns one or more
    renderings of the conversation cut right after that block; the smallest common prefix wins
    (several renderings guard against a placeholder turn that happens to match what follows).
    The full prompt is tokenized once (``full``); each rendering only from its last turn."""
    out = []
    for spec in specs:
        texts = render_truncated(spec.position)
        n = min((shared_prefix_tokens(full, t, encode, splits or {}) for t in texts), default=0)
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
