"""Incremental detokenization: same text as a full decode, no partial characters, stop strings."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenfactory.text.detokenizer import DetokenizerFinishedError, IncrementalDetokenizer
from tokenfactory.text.tokenizer import Tokenizer

VOCAB = 8192


def stream(detok: IncrementalDetokenizer, ids: list[int], chunks: list[int] | None = None):
    """Feed ids (in chunks of the given sizes, cycling); return (deltas, stop_string)."""
    deltas: list[str] = []
    i, c = 0, 0
    while i < len(ids):
        n = chunks[c % len(chunks)] if chunks else 1
        c += 1
        update = detok.update(ids[i : i + n])
        i += n
        deltas.append(update.text_delta)
        if update.stop_string is not None:
            return deltas, update.stop_string
    deltas.append(detok.flush())
    return deltas, detok.stop_string


token_ids = st.lists(st.integers(0, VOCAB - 1), max_size=40)
chunkings = st.lists(st.integers(1, 4), min_size=1, max_size=5)


@settings(max_examples=150, deadline=None)
@given(ids=token_ids, chunks=chunkings, skip=st.booleans(), prompt=st.lists(st.integers(0, VOCAB - 1), max_size=8))
def test_random_tokens_match_full_decode(demo_tokenizer: Tokenizer, ids, chunks, skip, prompt) -> None:
    detok = IncrementalDetokenizer(demo_tokenizer, skip_special_tokens=skip, prompt_token_ids=prompt or None)
    deltas, stop = stream(detok, ids, chunks)
    assert stop is None
    assert "".join(deltas) == demo_tokenizer.decode(ids, skip_special_tokens=skip)
    # no delta ends in a replacement character unless the reference text has one there
    reference = demo_tokenizer.decode(ids, skip_special_tokens=skip)
    if "\ufffd" not in reference:
        assert not any("\ufffd" in d for d in deltas)


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=40))
def test_multibyte_text_never_emits_replacement(demo_tokenizer: Tokenizer, text: str) -> None:
    ids = demo_tokenizer.encode(text)
    deltas, _ = stream(IncrementalDetokenizer(demo_tokenizer), ids)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas) or "\ufffd" in text


def test_emoji_split_across_tokens_is_held_until_complete(demo_tokenizer: Tokenizer) -> None:
    # one emoji as four single-byte tokens
    byte_tokens = [demo_tokenizer.token_to_id(t) for t in ["ð", "Ł", "ĺ", "Ģ"]]
    assert None not in byte_tokens and demo_tokenizer.decode(byte_tokens) == "😀"
    detok = IncrementalDetokenizer(demo_tokenizer)
    assert [detok.update([t]).text_delta for t in byte_tokens] == ["", "", "", "😀"]
    # an incomplete character at the very end comes out of flush() as U+FFFD, like a full decode
    detok = IncrementalDetokenizer(demo_tokenizer)
    assert detok.update(byte_tokens[:2]).text_delta == ""
    assert detok.flush() == demo_tokenizer.decode(byte_tokens[:2]) == "\ufffd"


@settings(max_examples=150, deadline=None)
@given(
    text=st.text(alphabet="ab c\n😀é", max_size=30),
    stops=st.lists(st.text(alphabet="ab c\n😀é", min_size=1, max_size=4), min_size=1, max_size=3),
    include=st.booleans(),
    chunks=chunkings,
)
def test_stop_strings(demo_tokenizer: Tokenizer, text, stops, include, chunks) -> None:
    ids = demo_tokenizer.encode(text)
    full = demo_tokenizer.decode(ids)
    detok = IncrementalDetokenizer(demo_tokenizer, stop=stops, include_stop_str_in_output=include)
    deltas, stop = stream(detok, ids, chunks)
    out = "".join(deltas)
    hits = [(full.find(s), -len(s), s) for s in stops if s in full]
    if not hits:
        assert stop is None and out == full
        return
    assert stop is not None
    pos = full.find(stop)
    # the text is cut exactly at the first stop (the earliest one the stream could see)
    assert out == full[: pos + (len(stop) if include else 0)]
    first = min(h[0] + len(h[2]) for h in hits)  # earliest position at which any stop completes
    assert pos + len(stop) <= first + max(len(s) for s in stops)
    # never a partial stop string in the emitted text when excluding it
    if not include:
        assert all(s not in out for s in stops)


def test_stop_string_split_over_tokens_is_never_shown(demo_tokenizer: Tokenizer) -> None:
    text = "The answer is 42.\nUser: next question"
    ids = demo_tokenizer.encode(text)
    detok = IncrementalDetokenizer(demo_tokenizer, stop=["\nUser:"])
    shown = ""
    for t in ids:
        update = detok.update([t])
        shown += update.text_delta
        assert "\nUser:"[:2] not in shown or shown.endswith("42.")  # the "\nU" is held back
        if update.stop_string:
            break
    assert shown == "The answer is 42." and update.stop_string == "\nUser:"
    with pytest.raises(DetokenizerFinishedError):
        detok.update([1])
    assert detok.flush() == ""


def test_include_stop_str_in_output(demo_tokenizer: Tokenizer) -> None:
    ids = demo_tokenizer.encode("abc STOP def")
    deltas, stop = stream(IncrementalDetokenizer(demo_tokenizer, stop=["STOP"], include_stop_str_in_output=True), ids)
    assert "".join(deltas) == "abc STOP" and stop == "STOP"


def test_held_back_prefix_is_released_when_it_is_not_a_stop(demo_tokenizer: Tokenizer) -> None:
    detok = IncrementalDetokenizer(demo_tokenizer, stop=["STOP"])
    assert detok.update(demo_tokenizer.encode("go ST")).text_delta == "go "
    assert detok.update(demo_tokenizer.encode("ay")).text_delta == "STay"
    assert detok.update(demo_tokenizer.encode(" STO")).text_delta == " "
    assert detok.flush() == "STO"


def test_special_tokens_skipped_or_kept(demo_tokenizer: Tokenizer) -> None:
    ids = demo_tokenizer.encode("hi<|im_end|>")
    assert "".join(stream(IncrementalDetokenizer(demo_tokenizer), ids)[0]) == "hi"
    kept = "".join(stream(IncrementalDetokenizer(demo_tokenizer, skip_special_tokens=False), ids)[0])
    assert kept == "hi<|im_end|>"


def test_window_stays_small(demo_tokenizer: Tokenizer) -> None:
    """Each update decodes a bounded window, not the whole sequence (O(new tokens))."""
    calls: list[int] = []
    real = demo_tokenizer.decode

    class Spy:
        def __getattr__(self, name):
            return getattr(demo_tokenizer, name)

        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return real(ids, skip_special_tokens)

    ids = demo_tokenizer.encode("word " * 3000)
    detok = IncrementalDetokenizer(Spy(), prompt_token_ids=ids[:100])
    out = "".join(detok.update([t]).text_delta for t in ids) + detok.flush()
    assert out == "word " * 3000
    assert max(calls) <= 8
