"""OpenAI's two log-probability shapes out of the engine's per-position {id: Logprob}: chat's
``logprobs.content`` entries (token, logprob, bytes, top_logprobs) and the completions API's
parallel lists (tokens, token_logprobs, top_logprobs, text_offset)."""
from __future__ import annotations

from tokenfactory.api.serving import ServingContext
from tokenfactory.text.grammar import compiler_for


def _token_bytes(ctx: ServingContext, token_id: int) -> bytes:
    """The exact bytes of one token (a piece of a multi-byte character stays a piece):
    llguidance's view of the tokenizer, which text/grammar.py builds once per tokenizer."""
    try:
        return compiler_for(ctx.tokenizer).ll_tokenizer.decode_bytes([token_id])
    except Exception:  # noqa: BLE001 - a tokenizer llguidance cannot read: its own decode
        return ctx.tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")


def _is_special(ctx: ServingContext, token_id: int) -> bool:
    try:
        return bool(compiler_for(ctx.tokenizer).ll_tokenizer.is_special_token(token_id))
    except Exception:  # noqa: BLE001 - as _token_bytes
        return False


def _token_str(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def _top(position: dict, k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely tokens of one position's {id: Logprob}, best first."""
    ranked = sorted(position.items(), key=lambda kv: -kv[1].logprob)
    return [(tid, lp.logprob) for tid, lp in ranked[:k]]


def chat_logprobs(ctx: ServingContext, comp, start: int, end: int, k: int) -> list[dict]:
    """OpenAI chat ``logprobs.content`` entries for output positions [start, end)."""
    entries = []
    for pos in range(start, end):
        tid, position = comp.token_ids[pos], comp.logprobs[pos]
        raw = _token_bytes(ctx, tid)
        entries.append({"token": _token_str(raw), "logprob": position[tid].logprob,
                        "bytes": list(raw), "top_logprobs": [
                            {"token": _token_str(b), "logprob": lp, "bytes": list(b)}
                            for b, lp in ((_token_bytes(ctx, t), lp)
                                          for t, lp in _top(position, k))]})
    return entries


class CompletionLogprobs:
    """The completions API's ``logprobs`` object (tokens, token_logprobs, top_logprobs,
    text_offset), built position by position; prompt positions first when echoing."""

    def __init__(self, ctx: ServingContext, k: int, offset: int = 0):
        self.ctx, self.k, self.offset = ctx, k, offset

    def build(self, token_ids: list[int], positions: list) -> dict:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                "text_offset": []}
        for tid, position in zip(token_ids, positions):
            tok = _token_str(_token_bytes(self.ctx, tid))
            out["tokens"].append(tok)
            out["text_offset"].append(self.offset)
            if not _is_special(self.ctx, tid):   # special tokens are not in the echoed text
                self.offset += len(tok)
            if position is None:   # the first prompt token: nothing before it to predict it
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(position[tid].logprob)
            out["top_logprobs"].append({_token_str(_token_bytes(self.ctx, t)): lp
                                        for t, lp in _top(position, self.k)})
        return out


def join_logprobs(a: dict | None, b: dict) -> dict:
    """Two completions ``logprobs`` objects as one (the echoed prompt's, then the output's)."""
    return b if a is None else {key: a[key] + b[key] for key in b}
