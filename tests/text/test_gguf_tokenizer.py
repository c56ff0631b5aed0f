"""The tokenizer and chat template of a GGUF file, against transformers' GGUF tokenizer.

Reference: `transformers.AutoTokenizer.from_pretrained(dir, gguf_file=...)` on the default model
(SmolLM2-135M-Instruct, Q4_1 GGUF). Text: the heads of the Python standard library's modules (every
machine has them), every non-ASCII line of those modules, a few sentences in other scripts, and
special-token strings inside text.

One known disagreement, settled in favour of the real model: the file's pre-tokenizer label is
`smollm`. llama.cpp (`llm_tokenizer_bpe` in llama-vocab.cpp, the code that defines what a GGUF
label means) splits that label with `\\p{N}` first and then GPT-2's regex, and SmolLM2's own
tokenizer.json does the same with `Digits(individual_digits=True)` before `ByteLevel`. transformers
5.x has no entry for `smollm` and falls back to GPT-2's regex alone, so it lets a run of spaces
before a number cut differently: "  42" is [Ġ, Ġ, 4, 2] there and [ĠĠ, 4, 2] in SmolLM2's tokenizer.
(Digits themselves come out one per token either way: the vocabulary has no multi-digit tokens.)
So transformers is the reference on text without numeric characters, and on all text the reference
is transformers' own vocabulary and merges behind SmolLM2's tokenizer.json pre-tokenizer.
"""

from __future__ import annotations

import sysconfig
import unicodedata
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFBackend
from tokenizers import pre_tokenizers

from tokenfactory.text.gguf_tokenizer import PRE_TOKENIZERS, is_gguf_file
from tokenfactory.text.tokenizer import Tokenizer, TokenizerLoadError

from .conftest import make_tokenizer_dir

gguf = pytest.importorskip("gguf")

OTHER_SCRIPTS = [
    "Le cœur a ses raisons que la raison ne connaît point. Où êtes-vous allés à Noël ?",
    "我们今天去公园散步，天气很好。机器学习模型需要大量的数据。",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "日本語のテキストも少し：東京は日本の首都です。",
    "مرحبا بالعالم، هذه جملة عربية.",
    "Größenwahn und Straße; naïve façade; ﬁ ligature; e\u0301 combining accent.",
    "नमस्ते दुनिया, यह एक हिंदी वाक्य है।",
    "Emoji 🚀🔥👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and ½ ² Ⅻ ٣ numbers",
    "tabs\tand\u00a0non-breaking\u2009spaces\r\nwindows line\n\n\n    indented",
]
SPECIAL_TEXTS = [
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "<file_sep>path/to/file.py\n<jupyter_code>print(1)",
    "<|im_start|><|im_start|>  <|im_end|> <|im_end|>",
    "almost special: <|im_start| and < |im_end|> and <|IM_END|>",
]


def _is_numeric(ch: str) -> bool:
    return unicodedata.category(ch).startswith("N")  # \p{N}: Nd, Nl, No


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """~5,000 lines and ~170 multi-line chunks of stdlib source, its non-ASCII lines, the extras."""
    root = Path(sysconfig.get_paths()["stdlib"])
    lines, chunks, non_ascii = [], [], []
    for path in sorted(root.glob("*.py")) + sorted((root / "encodings").glob("*.py")):
        try:
            body = path.read_text(encoding="utf-8").splitlines(keepends=True)
        except (OSError, UnicodeDecodeError):
            continue
        if path.parent == root:
            lines += body[:30]
            chunks.append("".join(body[:40]))
        non_ascii += [ln for ln in body if not ln.isascii()]
    # Chinese, Japanese and Korean prose from the codec tests, where the installation ships them
    for path in sorted((root / "test" / "cjkencodings").glob("*-utf8.txt")):
        non_ascii += path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[:20]
    return lines + chunks + non_ascii[:600] + OTHER_SCRIPTS + SPECIAL_TEXTS


@pytest.fixture(scope="module")
def smollm2_reference(hf_gguf_tokenizer) -> HFBackend:
    """transformers' vocabulary, merges and added tokens with SmolLM2's tokenizer.json pre-tokenizer."""
    backend = HFBackend.from_str(hf_gguf_tokenizer.backend_tokenizer.to_str())  # a copy
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return backend


# ---------------------------------------------------------------- 1. token ids

def test_ids_equal_transformers_on_text_without_numbers(gguf_tokenizer, hf_gguf_tokenizer, texts) -> None:
    plain = [t for t in texts if not any(_is_numeric(c) for c in t)]
    assert len(plain) > 3000 and any(not t.isascii() for t in plain)
    ours = gguf_tokenizer.encode_batch(plain)
    ref = hf_gguf_tokenizer(plain, add_special_tokens=False)["input_ids"]
    bad = [t for t, a, b in zip(plain, ours, ref) if a != b]
    assert not bad, f"{len(bad)} texts differ, first: {bad[0]!r}"


def test_ids_equal_smollm2_pretokenizer_on_all_text(gguf_tokenizer, smollm2_reference, texts) -> None:
    ours = gguf_tokenizer.encode_batch(texts)
    ref = [e.ids for e in smollm2_reference.encode_batch(texts, add_special_tokens=False)]
    bad = [t for t, a, b in zip(texts, ours, ref) if a != b]
    assert not bad, f"{len(bad)} texts differ, first: {bad[0]!r}"
    assert sum(any(_is_numeric(c) for c in t) for t in texts) > 500  # the digit rule was exercised


def test_every_numeric_character_is_its_own_piece(gguf_tokenizer, texts) -> None:
    """llama.cpp's `smollm` rule (`\\p{N}` split first): no token spans a number character and
    anything else. Checked on the character spans the tokens cover."""
    assert PRE_TOKENIZERS["smollm"].digits
    for text in [t for t in texts if any(_is_numeric(c) for c in t)]:
        for start, end in gguf_tokenizer.backend.encode(text, add_special_tokens=False).offsets:
            span = text[start:end]
            assert len(span) == 1 or not any(_is_numeric(c) for c in span), (text, span)
    tok = gguf_tokenizer
    assert tok.convert_ids_to_tokens(tok.encode("  42")) == ["ĠĠ", "4", "2"]  # transformers: Ġ Ġ 4 2
    assert tok.convert_ids_to_tokens(tok.encode("x = 2024\n")) == ["x", "Ġ=", "Ġ", "2", "0", "2", "4", "Ċ"]


def test_decode_round_trips(gguf_tokenizer, hf_gguf_tokenizer, texts) -> None:
    for text in texts:
        ids = gguf_tokenizer.encode(text)
        assert gguf_tokenizer.decode(ids, skip_special_tokens=False) == text
    for text in SPECIAL_TEXTS:  # special tokens dropped like transformers drops them
        ids = gguf_tokenizer.encode(text)
        assert gguf_tokenizer.decode(ids) == hf_gguf_tokenizer.decode(ids, skip_special_tokens=True)


def test_streamed_text_equals_whole_decode(gguf_tokenizer) -> None:
    """Token-by-token streaming (station 9) releases exactly the text, emoji split across tokens included."""
    from tokenfactory.text.detokenizer import IncrementalDetokenizer
    for text in OTHER_SCRIPTS:
        detok = IncrementalDetokenizer(gguf_tokenizer)
        streamed = "".join(detok.update([i]).text_delta for i in gguf_tokenizer.encode(text)) + detok.flush()
        assert streamed == text


# ---------------------------------------------------------------- 2. chat template

CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."},
     {"role": "user", "content": "And of Japan? 日本"}],
    [{"role": "user", "content": "Write a haiku about numbers: 1, 22, 333."}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! <|im_end|> is my end."}],
]


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_chat_template_renders_and_tokenizes_like_transformers(
        gguf_tokenizer, hf_gguf_tokenizer, conversation, generation_prompt) -> None:
    messages = CONVERSATIONS[conversation]
    ours = gguf_tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    ref = hf_gguf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert ours == ref
    ref_ids = hf_gguf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    assert gguf_tokenizer.encode(ours) == list(ref_ids["input_ids"])


def test_chat_template_comes_from_the_file(gguf_tokenizer, hf_gguf_tokenizer) -> None:
    assert gguf_tokenizer.chat_template == hf_gguf_tokenizer.chat_template
    assert "<|im_start|>" in gguf_tokenizer.chat_template


# ---------------------------------------------------------------- 3. special tokens

def test_special_tokens_match_transformers(gguf_tokenizer, hf_gguf_tokenizer) -> None:
    tok, hf = gguf_tokenizer, hf_gguf_tokenizer
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == \
        (hf.bos_token, hf.eos_token, hf.unk_token, hf.pad_token)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == \
        (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id, hf.pad_token_id)
    assert tok.eos_token_ids == frozenset({hf.eos_token_id}) == frozenset({2})
    assert tok.vocab_size == len(hf) == 49152
    assert tok.get_vocab() == hf.get_vocab()
    # the 17 control tokens (<|endoftext|>, <|im_start|>, <repo_name>, ...) are special
    assert set(hf.all_special_ids) <= tok.all_special_ids == frozenset(range(17))
    assert tok.generation_defaults == {}
    for text in ("Hello there", "<|im_start|>user\nhi<|im_end|>", ""):
        assert tok.encode(text, add_special_tokens=True) == hf(text).input_ids  # add_bos_token is False


# ---------------------------------------------------------------- 4. small files: options and failures

def write_gguf(path: Path, **meta) -> Path:
    """A GGUF with metadata only (no tensors). Values: str, bool, int (uint32), float, list[str|int]."""
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for key, value in meta.items():
        key = key.replace("__", ".")
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_vocab() -> tuple[list[str], list[str], list[int]]:
    """Tokens (all 256 byte symbols + merges + 2 added), merges, token types."""
    specials = ["<|eot|>", "<think>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d"]
    tokens = specials + alphabet + [m.replace(" ", "") for m in merges]
    types = [3, 4] + [1] * (len(tokens) - 2)
    return tokens, merges, types


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    tokens, merges, types = tiny_vocab()
    return write_gguf(
        tmp_path / "tiny.bin",  # recognized by its magic bytes, not its name
        tokenizer__ggml__model="gpt2", tokenizer__ggml__pre="llama-bpe",
        tokenizer__ggml__tokens=tokens, tokenizer__ggml__merges=merges, tokenizer__ggml__token_type=types,
        tokenizer__ggml__bos_token_id=tokens.index("!"), tokenizer__ggml__eos_token_id=tokens.index("#"),
        tokenizer__ggml__eot_token_id=0,
        tokenizer__chat_template="{{ messages[0]['content'] }}",
        tokenizer__chat_template__tool_use="TOOLS {{ messages[0]['content'] }}",
        general__sampling__temp=0.7, general__sampling__top_k=40,
        llama__context_length=4096,
    )


def test_tiny_gguf_options(tiny_gguf: Path) -> None:
    tok = Tokenizer.from_pretrained(tiny_gguf)
    assert is_gguf_file(tiny_gguf)
    ids = tok.encode("hello world<|eot|><think>")
    assert tok.convert_ids_to_tokens(ids) == ["hello", "Ġworld", "<|eot|>", "<think>"]
    assert tok.decode(ids) == "hello world<think>"  # control tokens are special, user-defined ones are not
    # llama.cpp's default for the Llama 3 labels: add BOS when the file does not say
    assert tok.add_bos_token
    assert tok.encode("hello", add_special_tokens=True) == [tok.token_to_id("!"), *tok.encode("hello")]
    assert tok.eos_token_ids == frozenset({tok.token_to_id("#"), 0})
    assert tok.generation_defaults == {"temperature": 0.7, "top_k": 40}
    assert tok.model_max_length == 4096
    msgs = [{"role": "user", "content": "x"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == "x"
    assert tok.apply_chat_template(msgs, tools=[{"type": "function"}], add_generation_prompt=False) == "TOOLS x"


def test_tokens_outside_the_byte_alphabet_and_duplicates(tmp_path: Path) -> None:
    """Added tokens are stored as plain text in a GGUF (DeepSeek's <｜begin▁of▁sentence｜>) and must
    decode as such; a repeated token string keeps its last id, and every id still exists."""
    tokens, merges, types = tiny_vocab()
    path = write_gguf(tmp_path / "odd.gguf", tokenizer__ggml__model="gpt2", tokenizer__ggml__pre="gpt-2",
                      tokenizer__ggml__tokens=tokens + ["<｜begin▁of▁sentence｜>", "日本", "<think>"],
                      tokenizer__ggml__merges=merges, tokenizer__ggml__token_type=types + [3, 4, 1])
    tok = Tokenizer.from_gguf(path)
    text = "<｜begin▁of▁sentence｜>hello 日本 world"
    ids = tok.encode(text)
    assert tok.convert_ids_to_tokens(ids) == ["<｜begin▁of▁sentence｜>", "hello", "Ġ", "日本", "Ġworld"]
    assert tok.decode(ids, skip_special_tokens=False) == text and tok.decode(ids) == "hello 日本 world"
    assert tok.vocab_size == len(tokens) + 3 and tok.encode("<think>") == [len(tokens) + 2]


def test_generation_defaults_of_a_model_directory(demo_tokenizer_dir: Path, tmp_path: Path) -> None:
    out = make_tokenizer_dir(demo_tokenizer_dir, tmp_path / "gen", {}, generation_config={
        "temperature": 0.6, "top_p": 0.9, "do_sample": True, "eos_token_id": [1, 2], "max_new_tokens": 5})
    tok = Tokenizer.from_pretrained(out)
    assert tok.generation_defaults == {"temperature": 0.6, "top_p": 0.9}


def _error(path: Path, loader=Tokenizer.from_gguf) -> str:
    with pytest.raises(TokenizerLoadError) as info:
        loader(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    assert "not found" in _error(tmp_path / "absent.gguf")
    assert "no such file" in _error(tmp_path / "absent.gguf", Tokenizer.from_pretrained)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_text("hello")
    assert "not a GGUF file" in _error(path)
    assert "neither a model directory nor a GGUF file" in _error(path, Tokenizer.from_pretrained)


def test_truncated_file(tiny_gguf: Path) -> None:
    data = tiny_gguf.read_bytes()
    tiny_gguf.write_bytes(data[: len(data) // 2])  # cut inside the token list
    assert "truncated or corrupt GGUF file" in _error(tiny_gguf, Tokenizer.from_pretrained)


def test_gguf_without_tokenizer(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "bare.gguf", llama__context_length=128)
    assert "no tokenizer in the GGUF metadata (tokenizer.ggml.model missing)" in _error(path)


def test_unsupported_tokenizer_model(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "t5.gguf", tokenizer__ggml__model="t5", tokenizer__ggml__tokens=["<unk>", "a"],
                      tokenizer__ggml__scores=[0.0, -1.0])
    assert "unsupported tokenizer model 't5'" in _error(path)
    path = write_gguf(tmp_path / "spm.gguf", tokenizer__ggml__model="llama", tokenizer__ggml__tokens=["<unk>", "a"])
    assert "the token scores missing from the GGUF metadata (tokenizer.ggml.scores)" in _error(path)


def test_unsupported_pre_tokenizer_and_missing_merges(tmp_path: Path) -> None:
    tokens, merges, types = tiny_vocab()
    path = write_gguf(tmp_path / "pre.gguf", tokenizer__ggml__model="gpt2", tokenizer__ggml__pre="martian",
                      tokenizer__ggml__tokens=tokens, tokenizer__ggml__merges=merges)
    assert "unsupported pre-tokenizer 'martian'" in _error(path)
    path = write_gguf(tmp_path / "nomerges.gguf", tokenizer__ggml__model="gpt2", tokenizer__ggml__pre="gpt-2",
                      tokenizer__ggml__tokens=tokens)
    assert "the BPE merges missing from the GGUF metadata (tokenizer.ggml.merges)" in _error(path)
    path = write_gguf(tmp_path / "badeos.gguf", tokenizer__ggml__model="gpt2", tokenizer__ggml__pre="gpt-2",
                      tokenizer__ggml__tokens=tokens, tokenizer__ggml__merges=merges,
                      tokenizer__ggml__eos_token_id=10**6)
    assert "tokenizer.ggml.eos_token_id = 1000000 is not a token id" in _error(path)


def test_pre_tokenizer_labels_split_like_transformers(texts) -> None:
    """Every label we know splits text as transformers' GGUF loader does, except where transformers
    has no entry and falls back to GPT-2's regex while llama.cpp's splitting differs: the digit family
    (`smollm`, `starcoder`, ...; see the module docstring) and `stablelm2`, `hunyuan`, `solar-open`
    (Qwen2's regex in llama.cpp). There llama.cpp, which defines the labels, is followed."""
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    splits = mapping.GGUF_PRE_TOKENIZER_SPLITS
    sample = [t for t in texts if "\n" in t[:-1] or not t.isascii()][::2]  # multi-line chunks, non-ASCII
    assert len(sample) > 80
    from tokenizers import Regex
    from tokenfactory.text.gguf_tokenizer import _pre_tokenizer
    checked, seen = 0, set()
    for label, spec in PRE_TOKENIZERS.items():
        if spec.digits or (label not in splits and spec.split is not None):
            continue
        checked += 1
        if (spec.split, splits.get(label)) in seen:  # labels sharing both regexes: checked once
            continue
        seen.add((spec.split, splits.get(label)))
        if label in splits:
            ref = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(splits[label]), behavior="isolated"),
                                           pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:  # transformers keeps GPT-2's byte-level regex for labels it has no entry for
            ref = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        ours = _pre_tokenizer(spec)
        for text in sample:
            assert ours.pre_tokenize_str(text) == ref.pre_tokenize_str(text), (label, text[:80])
    assert checked >= 30 and len(seen) >= 6


# ---------------------------------------------------------------- 5. SentencePiece vocabularies

@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory: pytest.TempPathFactory, texts) -> Path:
    """A SentencePiece-style BPE GGUF laid out as llama.cpp's converter writes one (<unk> <s> </s>,
    256 byte tokens, merged pieces scored by merge order, then single characters), with pieces
    learned from stdlib text by the `tokenizers` BPE trainer (no sentencepiece dependency)."""
    import json
    from tokenizers import models, trainers
    trainer_backend = HFBackend(models.BPE())
    trainer_backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer_backend.train_from_iterator(texts[:3000], trainers.BpeTrainer(vocab_size=1500, show_progress=False))
    model = json.loads(trainer_backend.to_str())["model"]
    merged = ["".join(m) if isinstance(m, list) else m.replace(" ", "") for m in model["merges"]]
    chars = [t for t in model["vocab"] if t not in set(merged)]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + merged + chars
    return write_gguf(
        tmp_path_factory.mktemp("spm") / "spm.gguf",
        tokenizer__ggml__model="llama", tokenizer__ggml__tokens=tokens,
        tokenizer__ggml__token_type=[2, 3, 3] + [6] * 256 + [1] * (len(merged) + len(chars)),
        tokenizer__ggml__scores=[0.0] * 259 + [-float(i) for i in range(len(merged) + len(chars))],
        tokenizer__ggml__bos_token_id=1, tokenizer__ggml__eos_token_id=2, tokenizer__ggml__unknown_token_id=0,
    )


def test_sentencepiece_ids_equal_transformers(spm_gguf: Path, texts) -> None:
    """Equal where transformers and llama.cpp agree: text that neither starts with whitespace nor
    holds special tokens (see the next test for those). Non-Latin text exercises the byte fallback."""
    import transformers
    hf = transformers.AutoTokenizer.from_pretrained(str(spm_gguf.parent), gguf_file=spm_gguf.name)
    tok = Tokenizer.from_gguf(spm_gguf)
    sample = [t for t in texts if t.strip() and not t[0].isspace() and "<" not in t]
    assert len(sample) > 2000
    ours = tok.encode_batch(sample)
    ref = hf(sample, add_special_tokens=False)["input_ids"]
    bad = [t for t, a, b in zip(sample, ours, ref) if a != b]
    assert not bad, f"{len(bad)} texts differ, first: {bad[0]!r}"
    for text, ids in zip(sample, ours):
        assert tok.decode(ids) == text
    assert any("<0x" in t for ids in ours for t in tok.convert_ids_to_tokens(ids))  # byte fallback used
    assert tok.encode("hello", add_special_tokens=True) == hf("hello").input_ids  # BOS by default
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0) == \
        (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id)


def test_sentencepiece_whitespace_follows_llama_cpp(spm_gguf: Path, tmp_path: Path) -> None:
    """llama.cpp (the GGUF reference) puts U+2581 before every stretch of text at the start or after
    a special token, even one starting with a space; transformers' Metaspace(prepend_scheme="first")
    only at the very start and not before a leading space."""
    tok = Tokenizer.from_gguf(spm_gguf)
    pieces = tok.convert_ids_to_tokens
    assert pieces(tok.encode(" x")) == ["\u2581", "\u2581x"]                  # transformers: ["\u2581x"]
    assert pieces(tok.encode("<s>x</s> x")) == ["<s>", "\u2581x", "</s>", "\u2581", "\u2581x"]
    # add_space_prefix = false: no U+2581 is added anywhere
    reader = gguf.GGUFReader(spm_gguf)
    meta = {k: reader.fields[k].contents() for k in reader.fields if k.startswith("tokenizer.")}
    path = write_gguf(tmp_path / "noprefix.gguf", **{k.replace(".", "__"): v for k, v in meta.items()},
                      tokenizer__ggml__add_space_prefix=False)
    plain = Tokenizer.from_gguf(path)
    assert plain.convert_ids_to_tokens(plain.encode("x y")) == ["x", "\u2581y"]
    assert plain.decode(plain.encode(" x y")) == " x y"
