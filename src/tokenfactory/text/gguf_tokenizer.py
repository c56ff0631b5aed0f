"""A GGUF file's tokenizer as a Hugging Face `tokenizers` object.

A GGUF (llama.cpp's format) carries no `tokenizer.json`: the vocabulary, the merges, the token
kinds, the special-token ids and the chat template are metadata under `tokenizer.*` keys. This
module reads them with the `gguf` package's reader and assembles the pipeline the model's own
`tokenizer.json` describes (BPE model, pre-tokenizer or normalizer, decoder, added tokens), so
encoding needs nothing from llama.cpp or `transformers`.

The pre-tokenizer is the part a GGUF only names (`tokenizer.ggml.pre`, a llama.cpp label). Each
supported label maps to the splitting llama.cpp applies for it (`llm_tokenizer_bpe` in its
`llama-vocab.cpp`), which is the splitting of the original model's tokenizer.json. One case where
`transformers` (5.x) differs: for labels it has no regex for, such as SmolLM's `smollm`, it keeps
GPT-2's plain byte-level regex and so does not isolate digits; SmolLM2's own tokenizer.json and
llama.cpp put every digit in its own piece (`Digits(individual_digits=True)` before `ByteLevel`),
and that is what we do.

Two vocabulary kinds are supported: byte-level BPE (`tokenizer.ggml.model == "gpt2"`: Llama 3,
Qwen, SmolLM, ...) and SentencePiece BPE (`"llama"`: Llama 2, Mistral, TinyLlama, ...), the latter
with llama.cpp's whitespace rules (see `_sentencepiece_backend`). Anything else (`t5`, `bert`, ...)
is a one-line `TokenizerLoadError`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Splitting regexes of the original tokenizer.json files (Split(..., "isolated") before a
# ByteLevel step that no longer splits). `(?i:...)` is understood by the Rust regex engine.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                 r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_GPT4O_SPLIT = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class PreTokenizerSpec:
    """How text is cut into pieces before BPE, for one family of `tokenizer.ggml.pre` labels."""

    split: str | None = None      # regex run first; None: GPT-2's regex inside ByteLevel
    digits: bool = False          # isolate every digit first (StarCoder/SmolLM family)
    ignore_merges: bool = False   # a piece that is a whole token stays whole (Llama 3 family)
    add_bos: bool = False         # llama.cpp's add-BOS default when the file does not say


_GPT2 = PreTokenizerSpec()
_DIGITS = PreTokenizerSpec(digits=True)
_LLAMA3 = PreTokenizerSpec(split=_LLAMA3_SPLIT, ignore_merges=True, add_bos=True)

# llama.cpp label -> splitting (grouped as llama.cpp's llm_tokenizer_bpe groups them)
PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    **dict.fromkeys(("default", "gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "gigachat",
                     "a.x-4.0", "mellum", "trillion", "granite-docling"), _GPT2),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva-7b", "mellum2"), _DIGITS),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2", "jina-v5-nano"), _LLAMA3),
    **dict.fromkeys(("dbrx", "smaug-bpe"), PreTokenizerSpec(split=_LLAMA3_SPLIT)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2",
                     "hunyuan", "solar-open"), PreTokenizerSpec(split=_QWEN2_SPLIT)),
    "qwen35": PreTokenizerSpec(split=_QWEN35_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"),
                    PreTokenizerSpec(split=_GPT4O_SPLIT)),
    "tekken": PreTokenizerSpec(split=_TEKKEN_SPLIT, ignore_merges=True, add_bos=True),
}

# general.sampling.* (the GGUF counterpart of generation_config.json) -> our request field names
_SAMPLING_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
                  "general.sampling.top_k": "top_k", "general.sampling.penalty_repeat": "repetition_penalty"}


class GGUFTokenizerError(ValueError):
    """One-line reason a GGUF file's tokenizer cannot be built (re-raised as TokenizerLoadError)."""


@dataclass
class GGUFTokenizerParts:
    """What `Tokenizer.__init__` needs, read from a GGUF file."""

    backend: _HFTokenizer
    config: dict[str, Any]              # tokenizer_config.json-like: named special tokens, add_bos/eos
    generation_config: dict[str, Any]   # eos_token_id list and general.sampling.* defaults
    chat_template: str | dict[str, str] | None
    pre: str = ""                       # the tokenizer.ggml.pre label
    notes: list[str] = field(default_factory=list)


def is_gguf_file(path: str | Path) -> bool:
    """True if `path` is a readable file starting with the 4-byte GGUF magic (whatever its name)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def open_reader(path: Path) -> Any:
    """`gguf.GGUFReader` over the file (memory-mapped; only metadata is read here)."""
    import gguf  # only GGUF users pay for the import

    if not path.exists():
        raise GGUFTokenizerError(f"{path}: file not found")
    if not path.is_file():
        raise GGUFTokenizerError(f"{path}: not a file")
    if not is_gguf_file(path):
        raise GGUFTokenizerError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # the reader runs past the end of a truncated map, bad lengths, ...
        raise GGUFTokenizerError(f"{path}: truncated or corrupt GGUF file ({_one_line(exc)})") from None


class _Metadata:
    """Typed lookups into a reader's fields that fail with one line naming the file and key."""

    def __init__(self, path: Path, reader: Any) -> None:
        self.path, self.fields = path, reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        f = self.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception as exc:
            raise GGUFTokenizerError(f"{self.path}: cannot read metadata {key} ({_one_line(exc)})") from None

    def require(self, key: str, what: str) -> Any:
        if key not in self.fields:
            raise GGUFTokenizerError(f"{self.path}: {what} missing from the GGUF metadata ({key})")
        return self.get(key)

    def token_id(self, key: str, n_vocab: int) -> int | None:
        value = self.get(key)
        if value is None:
            return None
        if not isinstance(value, int) or not 0 <= value < n_vocab:
            raise GGUFTokenizerError(f"{self.path}: {key} = {value!r} is not a token id (vocabulary of {n_vocab})")
        return value


def _pre_tokenizer(spec: PreTokenizerSpec) -> pre_tokenizers.PreTokenizer:
    steps: list[pre_tokenizers.PreTokenizer] = []
    if spec.digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if spec.split is not None:
        steps.append(pre_tokenizers.Split(Regex(spec.split), behavior="isolated", invert=False))
    # Bytes -> the GPT-2 printable alphabet; it splits with GPT-2's regex only if nothing split before.
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=spec.split is None))
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


def _byte_level_backend(meta: _Metadata, vocab: dict[str, int], notes: list[str]) -> tuple[_HFTokenizer, bool, str]:
    """GPT-2 style byte-level BPE: merges from the file, splitting by `tokenizer.ggml.pre`."""
    pre = meta.get("tokenizer.ggml.pre") or "default"
    spec = PRE_TOKENIZERS.get(pre)
    if spec is None:
        raise GGUFTokenizerError(f"{meta.path}: unsupported pre-tokenizer {pre!r} (tokenizer.ggml.pre)")
    if pre == "default":
        notes.append("no tokenizer.ggml.pre label: GPT-2's byte-level splitting assumed")
    merges = []
    for m in meta.require("tokenizer.ggml.merges", "the BPE merges"):
        cut = m.find(" ", 1)  # llama.cpp's rule: the separator is the first space after position 0
        if cut < 0:
            raise GGUFTokenizerError(f"{meta.path}: malformed merge {m!r} in tokenizer.ggml.merges")
        merges.append((m[:cut], m[cut + 1:]))
    try:
        bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=spec.ignore_merges)
    except Exception as exc:  # a merge naming a token that is not in the vocabulary
        raise GGUFTokenizerError(f"{meta.path}: inconsistent vocabulary and merges ({_one_line(exc)})") from None
    backend = _HFTokenizer(bpe)
    backend.pre_tokenizer = _pre_tokenizer(spec)
    backend.decoder = decoders.ByteLevel()
    return backend, spec.add_bos, pre


def _sentencepiece_merges(tokens: list[str], vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """The merges a SentencePiece BPE vocabulary implies: every split of a token into two tokens,
    best-scored result first (SentencePiece, and llama.cpp, merge the pair whose joined piece
    scores highest). Ties: longer left piece first, as transformers orders them."""
    found = []
    for token, score in zip(tokens, scores):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                found.append((-score, -len(left), -len(right), vocab[left], vocab[right], left, right))
    found.sort()
    return [(f[5], f[6]) for f in found]


def _sentencepiece_backend(meta: _Metadata, tokens: list[str], vocab: dict[str, int]) -> tuple[_HFTokenizer, bool, str]:
    """SentencePiece BPE (`tokenizer.ggml.model == "llama"`) the way llama.cpp runs it: spaces
    become U+2581, a U+2581 is put before each stretch of text that starts the input or follows a
    special token (`add_space_prefix`, on unless the file says otherwise), characters missing from
    the vocabulary fall back to <0xNN> byte tokens."""
    scores = meta.require("tokenizer.ggml.scores", "the token scores")
    if len(scores) != len(tokens):
        raise GGUFTokenizerError(f"{meta.path}: tokenizer.ggml.scores has {len(scores)} entries for "
                                 f"{len(tokens)} tokens")
    unk_id = meta.token_id("tokenizer.ggml.unknown_token_id", len(tokens))
    unk = tokens[unk_id] if unk_id is not None else ("<unk>" if "<unk>" in vocab else None)
    bpe = models.BPE(vocab=vocab, merges=_sentencepiece_merges(tokens, vocab, scores), unk_token=unk,
                     fuse_unk=True, byte_fallback=True)
    backend = _HFTokenizer(bpe)
    prefix = meta.get("tokenizer.ggml.add_space_prefix")
    prefix = True if prefix is None else bool(prefix)
    # The normalizer runs on each stretch of text between added tokens, hence "after each special".
    prepend = [normalizers.Prepend("\u2581")] if prefix else []
    backend.normalizer = normalizers.Sequence([*prepend, normalizers.Replace(" ", "\u2581")])
    strip = [decoders.Strip(" ", 1, 0)] if prefix else []
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    return backend, True, ""


def read_gguf_tokenizer(path: str | Path, reader: Any = None) -> GGUFTokenizerParts:
    """Build the tokenizer a GGUF file describes. `reader`: an already open `gguf.GGUFReader` of
    the same file (the weight loader's), so the metadata is parsed once (parsing the string arrays
    is most of the cost)."""
    path = Path(path)
    if reader is None:
        reader = open_reader(path)
    meta = _Metadata(path, reader)
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        raise GGUFTokenizerError(f"{path}: no tokenizer in the GGUF metadata (tokenizer.ggml.model missing)")
    if model not in ("gpt2", "llama"):
        raise GGUFTokenizerError(f"{path}: unsupported tokenizer model {model!r} (tokenizer.ggml.model; "
                                 "supported: 'gpt2' byte-level BPE, 'llama' SentencePiece BPE)")
    notes: list[str] = []
    tokens: list[str] = meta.require("tokenizer.ggml.tokens", "the vocabulary")
    n_vocab = len(tokens)
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * n_vocab
    if len(types) != n_vocab:
        raise GGUFTokenizerError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for "
                                 f"{n_vocab} tokens")

    # A BPE vocabulary maps each string to one id; a repeated string keeps its last id (as
    # llama.cpp's lookup does) and the earlier ids get unique placeholders, so every id exists.
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        if tok in vocab:
            prev = vocab[tok]
            vocab[f"<gguf-duplicate-{prev}>"] = prev
            notes.append(f"token {tok!r} appears more than once (ids {prev} and {i})")
        vocab[tok] = i
    if model == "gpt2":
        backend, add_bos_default, pre = _byte_level_backend(meta, vocab, notes)
    else:
        backend, add_bos_default, pre = _sentencepiece_backend(meta, tokens, vocab)

    # Control and unknown tokens (<|im_start|>, <s>, ...) are matched whole in text and are
    # "special" (dropped by decode(skip_special_tokens=True)); user-defined ones are matched whole
    # but kept. (llama.cpp matches user-defined tokens always, control ones when parsing specials.)
    control = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if t in (_CONTROL, _UNKNOWN)]
    user = [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == _USER_DEFINED]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)

    config: dict[str, Any] = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        tid = meta.token_id(f"tokenizer.ggml.{key}", n_vocab)
        if tid is not None:
            config[name] = tokens[tid]
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    config["add_bos_token"] = add_bos_default if add_bos is None else bool(add_bos)
    config["add_eos_token"] = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if config["add_bos_token"] and "bos_token" not in config:
        raise GGUFTokenizerError(f"{path}: the file asks for a BOS token but has no tokenizer.ggml.bos_token_id")
    arch = meta.get("general.architecture")
    context = meta.get(f"{arch}.context_length") if isinstance(arch, str) else None
    if isinstance(context, int):
        config["model_max_length"] = context

    # End-of-generation ids beyond eos that the file names explicitly (end of turn / of message).
    eos_ids = [i for i in (meta.token_id("tokenizer.ggml.eos_token_id", n_vocab),
                           meta.token_id("tokenizer.ggml.eot_token_id", n_vocab),
                           meta.token_id("tokenizer.ggml.eom_token_id", n_vocab)) if i is not None]
    generation_config: dict[str, Any] = {"eos_token_id": eos_ids} if eos_ids else {}
    for key, name in _SAMPLING_KEYS.items():
        value = meta.get(key)
        if isinstance(value, float):  # stored as float32: 0.6 reads back as 0.6000000238
            generation_config[name] = float(f"{value:.7g}")
        elif isinstance(value, int) and not isinstance(value, bool):
            generation_config[name] = value

    template: str | dict[str, str] | None = meta.get("tokenizer.chat_template")
    prefix = "tokenizer.chat_template."
    named = {k[len(prefix):]: meta.get(k) for k in meta.fields if k.startswith(prefix)}
    named = {k: v for k, v in named.items() if isinstance(v, str)}
    if named:
        template = {**named, **({"default": template} if isinstance(template, str) else {})}
    for note in notes:
        log.warning("%s: %s", path, note)
    return GGUFTokenizerParts(backend, config, generation_config, template, pre, notes)
