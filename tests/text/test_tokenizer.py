"""Tokenizer loading, encode/decode and special tokens, compared with transformers where it matters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenfactory.text.tokenizer import ChatTemplateError, Tokenizer, TokenizerLoadError

from .conftest import make_tokenizer_dir


def test_demo_tokenizer_basics(demo_tokenizer: Tokenizer) -> None:
    tok = demo_tokenizer
    assert tok.vocab_size == 8192
    assert tok.bos_token == "<|begin_of_text|>" and tok.bos_token_id == tok.token_to_id("<|begin_of_text|>")
    assert tok.eos_token_ids == frozenset({tok.token_to_id("<|im_end|>")})
    assert tok.pad_token_id == tok.token_to_id("<|endoftext|>")
    assert tok.token_to_id("<|im_start|>") in tok.all_special_ids
    # tool markers are single tokens but not special
    for marker in ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"):
        ids = tok.encode(marker)
        assert len(ids) == 1 and ids[0] not in tok.all_special_ids
        assert tok.convert_ids_to_tokens(ids) == [marker]


def test_encode_adds_bos_only_when_asked(demo_tokenizer: Tokenizer) -> None:
    plain = demo_tokenizer.encode("hello world")
    with_bos = demo_tokenizer.encode("hello world", add_special_tokens=True)
    assert with_bos == [demo_tokenizer.bos_token_id, *plain]


def test_decode_skips_special_but_keeps_tool_markers(demo_tokenizer: Tokenizer) -> None:
    text = "<|im_start|>assistant\n<tool_call>\n{}\n</tool_call><|im_end|>"
    ids = demo_tokenizer.encode(text)
    assert demo_tokenizer.decode(ids, skip_special_tokens=False) == text
    assert demo_tokenizer.decode(ids) == "assistant\n<tool_call>\n{}\n</tool_call>"


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=60))
def test_encode_decode_matches_transformers(demo_tokenizer: Tokenizer, hf_demo_tokenizer, text: str) -> None:
    ids = demo_tokenizer.encode(text)
    assert ids == hf_demo_tokenizer.encode(text, add_special_tokens=False)
    assert demo_tokenizer.encode(text, add_special_tokens=True) == hf_demo_tokenizer.encode(text)
    assert demo_tokenizer.decode(ids) == hf_demo_tokenizer.decode(ids, skip_special_tokens=True)
    assert demo_tokenizer.decode(ids) == text  # byte-level BPE round-trips any unicode


def test_special_ids_and_vocab_match_transformers(demo_tokenizer: Tokenizer, hf_demo_tokenizer) -> None:
    assert demo_tokenizer.vocab_size == len(hf_demo_tokenizer)
    assert set(hf_demo_tokenizer.all_special_ids) <= demo_tokenizer.all_special_ids
    assert demo_tokenizer.convert_ids_to_tokens(range(50)) == hf_demo_tokenizer.convert_ids_to_tokens(list(range(50)))


def test_eos_ids_union_generation_config(demo_tokenizer_dir: Path, tmp_path: Path) -> None:
    d = make_tokenizer_dir(demo_tokenizer_dir, tmp_path / "t", {}, generation_config={"eos_token_id": [7, 9]})
    tok = Tokenizer.from_dir(d)
    assert tok.eos_token_ids == frozenset({7, 9, tok.token_to_id("<|im_end|>")})
    d2 = make_tokenizer_dir(demo_tokenizer_dir, tmp_path / "t2", {}, generation_config={"eos_token_id": 5})
    assert 5 in Tokenizer.from_dir(d2).eos_token_ids


def test_added_token_dicts_and_missing_special_tokens(template_dirs: dict[str, Path]) -> None:
    tok = Tokenizer.from_dir(template_dirs["llama31"])
    assert tok.eos_token == "<|eot_id|>"
    eot = tok.token_to_id("<|eot_id|>")
    assert eot is not None and eot in tok.eos_token_ids and eot in tok.all_special_ids
    assert tok.encode("a<|eot_id|>b")[1] == eot
    assert tok.vocab_size == 8193


def test_chat_template_sources(template_dirs: dict[str, Path], demo_tokenizer_dir: Path, tmp_path: Path) -> None:
    hermes = Tokenizer.from_dir(template_dirs["hermes"])  # list of {name, template}
    assert "<tools>" in hermes.chat_template
    assert hermes.bos_token is None and hermes.bos_token_id is None
    # chat_template.jinja wins over the config's template
    d = make_tokenizer_dir(demo_tokenizer_dir, tmp_path / "j", {"chat_template": "config"}, jinja="file{{ x }}")
    assert Tokenizer.from_dir(d).chat_template == "file{{ x }}"


def test_no_chat_template_is_a_clear_error(demo_tokenizer_dir: Path, tmp_path: Path) -> None:
    d = make_tokenizer_dir(demo_tokenizer_dir, tmp_path / "n", {"chat_template": None})
    tok = Tokenizer.from_dir(d)
    assert tok.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_missing_and_corrupt_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(TokenizerLoadError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerLoadError, match="tokenizer.json") as info:
        Tokenizer.from_dir(tmp_path)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_corrupt_tokenizer_config(demo_tokenizer_dir: Path, tmp_path: Path) -> None:
    d = make_tokenizer_dir(demo_tokenizer_dir, tmp_path / "c", {})
    (d / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerLoadError, match="tokenizer_config.json"):
        Tokenizer.from_dir(d)


def test_add_bos_eos_flags_follow_tokenizer_json(demo_tokenizer_dir: Path, tmp_path: Path) -> None:
    # Like transformers v5: with a post-processor in tokenizer.json, the config flags are ignored.
    d = make_tokenizer_dir(demo_tokenizer_dir, tmp_path / "f", {"add_bos_token": False, "add_eos_token": True})
    tok = Tokenizer.from_dir(d)
    ids = tok.encode("hi", add_special_tokens=True)
    import transformers
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    assert ids == hf.encode("hi") and ids[0] == tok.bos_token_id
    # Without a post-processor, the flags decide.
    raw = json.loads((d / "tokenizer.json").read_text())
    raw["post_processor"] = None
    (d / "tokenizer.json").write_text(json.dumps(raw))
    tok = Tokenizer.from_dir(d)
    ids = tok.encode("hi", add_special_tokens=True)
    assert ids[0] != tok.bos_token_id and ids[-1] == tok.token_to_id("<|im_end|>")
    assert tok.encode("hi") == ids[:-1]
