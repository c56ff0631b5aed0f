"""Incremental detokenizer with stop strings (station 9: tokens back to text, as they stream).

Two problems sit between sampled token ids and the text a client may see:

1. A byte-level BPE token can end in the middle of a UTF-8 character (one emoji is often two or
   three tokens). Decoding token by token would emit U+FFFD garbage, so text is released only
   once the decoded window no longer ends in an incomplete character.
2. A stop string ("\\nUser:") may arrive split across tokens and must never be shown, not even
   partly. Text that could be the beginning of a stop string is held back until it either
   completes the stop (cut there) or turns out to be ordinary text (released).

Cost per update is O(new tokens + longest stop): the decoder keeps two offsets into the token
list (the vLLM/TGI scheme) and decodes only the window `tokens[prefix_offset:]`, where
`tokens[prefix_offset:read_offset]` has already been released. The leading context tokens make
decoders that depend on their left neighbour (SentencePiece's leading-space rule) produce the
same text they produce inside the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from tokenfactory.text.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer", "DetokenizerUpdate", "DetokenizerFinishedError"]

_REPLACEMENT = "\ufffd"
# Context tokens kept to the left of the released position (vLLM uses 5 too).
_CONTEXT_TOKENS = 5


class DetokenizerFinishedError(RuntimeError):
    """update() was called after a stop string matched or after flush()."""


@dataclass
class DetokenizerUpdate:
    text_delta: str
    stop_string: str | None = None


class IncrementalDetokenizer:
    """Turns a stream of output token ids into text deltas, honouring stop strings."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        prompt_token_ids: Sequence[int] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop: tuple[str, ...] = tuple(s for s in stop if s)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.output_token_ids: list[int] = []
        self.stop_string: str | None = None
        self.finished = False
        self._max_stop = max((len(s) for s in self.stop), default=0)

        # Token window: the last few prompt tokens give the first output tokens their context.
        context = list(prompt_token_ids[-_CONTEXT_TOKENS:]) if prompt_token_ids else []
        if context:
            context_text = tokenizer.decode(context, skip_special_tokens=skip_special_tokens)
            if context_text.endswith(_REPLACEMENT):  # prompt ends mid-character: context would mislead
                context = []
        self._tokens: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        # Decoded text released by the decoder but held back by the stop-string check.
        self._pending = ""

    # ---------------------------------------------------------------- decoding

    def _decode_new_text(self, final: bool) -> str:
        """Text of tokens beyond read_offset, once it no longer ends mid-character (or if final)."""
        if self._read_offset >= len(self._tokens):
            return ""
        decode = self.tokenizer.decode
        prefix_text = decode(self._tokens[self._prefix_offset : self._read_offset], self.skip_special_tokens)
        full_text = decode(self._tokens[self._prefix_offset :], self.skip_special_tokens)
        if not final and (len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT)):
            # Nothing new, or an incomplete UTF-8 sequence at the end: wait for more tokens.
            return ""
        if not full_text.startswith(prefix_text):
            # Defensive: decoders whose window text is not a prefix-stable extension. Fall back to
            # the common prefix so no character is ever emitted twice.
            common = 0
            for a, b in zip(prefix_text, full_text):
                if a != b:
                    break
                common += 1
            new_text = full_text[common:]
        else:
            new_text = full_text[len(prefix_text) :]
        # Advance the window; keep a few released tokens as left context.
        self._read_offset = len(self._tokens)
        self._prefix_offset = max(self._read_offset - _CONTEXT_TOKENS, 0)
        if self._prefix_offset > 4096:  # drop tokens that will never be decoded again
            del self._tokens[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return new_text

    # ---------------------------------------------------------------- stop strings

    def _hold_back_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def _release(self, new_text: str) -> DetokenizerUpdate:
        if not self.stop:
            return DetokenizerUpdate(new_text)
        self._pending += new_text
        pending = self._pending
        # Earliest match wins (ties: the longer stop string).
        match_pos, match = -1, None
        for stop in self.stop:
            pos = pending.find(stop)
            if pos != -1 and (match is None or pos < match_pos or (pos == match_pos and len(stop) > len(match))):
                match_pos, match = pos, stop
        if match is not None:
            end = match_pos + len(match) if self.include_stop_str_in_output else match_pos
            self._pending = ""
            self.stop_string = match
            self.finished = True
            return DetokenizerUpdate(pending[:end], match)
        keep = self._hold_back_len(pending)
        cut = len(pending) - keep
        self._pending = pending[cut:]
        return DetokenizerUpdate(pending[:cut])

    # ---------------------------------------------------------------- public API

    def update(self, new_token_ids: Sequence[int]) -> DetokenizerUpdate:
        """Add sampled tokens; return the text that may now be shown and whether a stop string hit."""
        if self.finished:
            raise DetokenizerFinishedError("detokenizer already finished (stop string matched or flushed)")
        self.output_token_ids.extend(new_token_ids)
        self._tokens.extend(new_token_ids)
        return self._release(self._decode_new_text(final=False))

    def flush(self) -> str:
        """End of generation: return all held-back text (an incomplete trailing character decodes as U+FFFD).

        If the held-back text completes a stop string, the text is cut there and `stop_string` is set.
        Returns "" when a stop string already matched.
        """
        if self.finished:
            return ""
        result = self._release(self._decode_new_text(final=True))
        text = result.text_delta
        if result.stop_string is None:
            text += self._pending
            self._pending = ""
        self.finished = True
        return text

    @property
    def text(self) -> str:  # pragma: no cover - convenience for debugging
        return self.tokenizer.decode(self.output_token_ids, self.skip_special_tokens)
