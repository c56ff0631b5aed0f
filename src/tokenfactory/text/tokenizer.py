"""Tokenizer: a Hugging Face model directory's or a GGUF file's tokenizer, without `transformers`.

Loads `tokenizer.json` with the `tokenizers` library and the surrounding metadata
(`tokenizer_config.json`, `chat_template.jinja`, `generation_config.json`), or builds the same
kind of `tokenizers` object from a GGUF file's metadata (`gguf_tokenizer.py`), and renders chat
templates the way `transformers.PreTrainedTokenizerBase.apply_chat_template(tokenize=False)` does,
byte for byte (see `chat_template.py`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from tokenizers import AddedToken
from tokenizers import Tokenizer as _HFTokenizer

from tokenfactory.text.chat_template import ChatTemplateError, render_chat_template

__all__ = ["Tokenizer", "TokenizerLoadError", "ChatTemplateError"]

# The named special tokens `transformers` passes to chat templates (its SPECIAL_TOKENS_ATTRIBUTES).
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


# The sampling fields of generation_config.json a request inherits when it leaves them out.
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty")


class TokenizerLoadError(ValueError):
    """The model directory or GGUF file has no usable tokenizer (missing, corrupt or unsupported)."""


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json is a string or an AddedToken dict {"content": ...}."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict:
    """Read an optional JSON metadata file; a missing file is {}, a corrupt one an error naming it."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerLoadError(f"{path}: not valid JSON ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise TokenizerLoadError(f"{path}: expected a JSON object")
    return data


class Tokenizer:
    """Encode/decode text and render chat templates for one model."""

    def __init__(
        self,
        backend: _HFTokenizer,
        *,
        config: dict | None = None,
        generation_config: dict | None = None,
        chat_template: str | dict[str, str] | None = None,
        name_or_path: str = "",
    ) -> None:
        config = dict(config or {})
        generation_config = dict(generation_config or {})
        self._backend = backend
        self.name_or_path = name_or_path
        self._generation_config = generation_config
        # Named special tokens (strings) as the config declares them; these are what templates see.
        self.special_tokens_map: dict[str, str] = {}
        for attr in _NAMED_SPECIAL_TOKENS:
            content = _token_content(config.get(attr))
            if content is not None:
                self.special_tokens_map[attr] = content
        # Like transformers, named special tokens missing from the vocabulary are added as special tokens.
        missing = [t for t in self.special_tokens_map.values() if backend.token_to_id(t) is None]
        if missing:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)])

        # BOS/EOS on encode(add_special_tokens=True): tokenizer.json's post-processor decides, as in
        # transformers v5 (which ignores the config's add_bos_token/add_eos_token when tokenizer.json
        # exists). Without a post-processor we fall back to those flags (transformers v4 Llama behaviour).
        self._explicit_bos_eos = backend.post_processor is None
        self.add_bos_token = bool(config.get("add_bos_token", False))
        self.add_eos_token = bool(config.get("add_eos_token", False))

        self.bos_token: str | None = self.special_tokens_map.get("bos_token")
        self.eos_token: str | None = self.special_tokens_map.get("eos_token")
        self.pad_token: str | None = self.special_tokens_map.get("pad_token")
        self.unk_token: str | None = self.special_tokens_map.get("unk_token")
        self.bos_token_id: int | None = self.token_to_id(self.bos_token)
        self.pad_token_id: int | None = self.token_to_id(self.pad_token)
        self.unk_token_id: int | None = self.token_to_id(self.unk_token)
        eos_id = self.token_to_id(self.eos_token)
        self.eos_token_id: int | None = eos_id

        eos_ids: set[int] = set()
        gen_eos = generation_config.get("eos_token_id")
        if isinstance(gen_eos, int):
            eos_ids.add(gen_eos)
        elif isinstance(gen_eos, list):
            eos_ids.update(i for i in gen_eos if isinstance(i, int))
        if eos_id is not None:
            eos_ids.add(eos_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos_ids)
        if self.bos_token_id is None and isinstance(generation_config.get("bos_token_id"), int):
            self.bos_token_id = generation_config["bos_token_id"]

        added = backend.get_added_tokens_decoder()  # {id: AddedToken}
        special = {i for i, tok in added.items() if tok.special}
        special.update(i for i in (self.token_to_id(t) for t in self.special_tokens_map.values()) if i is not None)
        self.all_special_ids: frozenset[int] = frozenset(special)
        max_id = max(added, default=-1)
        self.vocab_size: int = max(backend.get_vocab_size(with_added_tokens=True), max_id + 1)
        self.model_max_length: int | None = config.get("model_max_length") if isinstance(
            config.get("model_max_length"), int
        ) else None

        self._chat_templates: dict[str, str] = {}
        if isinstance(chat_template, str):
            self._chat_templates["default"] = chat_template
        elif isinstance(chat_template, dict):
            self._chat_templates.update(chat_template)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer of a Hugging Face model directory."""
        root = Path(path)
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerLoadError(f"{tok_file}: file not found (a fast tokenizer.json is required)")
        try:
            backend = _HFTokenizer.from_file(str(tok_file))
        except Exception as exc:  # the Rust side raises a bare Exception on a corrupt file
            first_line = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            raise TokenizerLoadError(f"{tok_file}: cannot be loaded ({first_line})") from None
        config = _read_json(root / "tokenizer_config.json")
        generation_config = _read_json(root / "generation_config.json")

        template: str | dict[str, str] | None = None
        raw = config.get("chat_template")
        if isinstance(raw, str):
            template = raw
        elif isinstance(raw, list):
            template = {
                item["name"]: item["template"]
                for item in raw
                if isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("template"), str)
            }
        # transformers >= 4.43 saves the template to its own file, which takes precedence.
        jinja_file = root / "chat_template.jinja"
        if jinja_file.is_file():
            text = jinja_file.read_text(encoding="utf-8")
            if isinstance(template, dict):
                template = {**template, "default": text}
            else:
                template = text
        templates_dir = root / "additional_chat_templates"
        if templates_dir.is_dir():
            extra = {p.stem: p.read_text(encoding="utf-8") for p in sorted(templates_dir.glob("*.jinja"))}
            if extra:
                base = {"default": template} if isinstance(template, str) else dict(template or {})
                template = {**extra, **base}
        return cls(
            backend,
            config=config,
            generation_config=generation_config,
            chat_template=template,
            name_or_path=str(root),
        )

    @classmethod
    def from_gguf(cls, path: str | Path, reader: Any = None) -> Tokenizer:
        """Build the tokenizer a GGUF file's metadata describes (byte-level BPE vocabularies).

        `reader`: an already open `gguf.GGUFReader` of the same file, to parse its metadata once.
        """
        from tokenfactory.text.gguf_tokenizer import GGUFTokenizerError, read_gguf_tokenizer

        try:
            parts = read_gguf_tokenizer(path, reader=reader)
        except GGUFTokenizerError as exc:
            raise TokenizerLoadError(str(exc)) from None
        return cls(
            parts.backend,
            config=parts.config,
            generation_config=parts.generation_config,
            chat_template=parts.chat_template,
            name_or_path=str(path),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """A Hugging Face model directory or a GGUF file (recognized by its magic bytes, not its name)."""
        from tokenfactory.text.gguf_tokenizer import is_gguf_file

        p = Path(path)
        if p.is_dir():
            return cls.from_dir(p)
        if is_gguf_file(p):
            return cls.from_gguf(p)
        if not p.exists():
            raise TokenizerLoadError(f"{p}: no such file or directory")
        raise TokenizerLoadError(f"{p}: neither a model directory nor a GGUF file (no GGUF magic)")

    @property
    def generation_defaults(self) -> dict[str, Any]:
        """Sampling defaults the model ships (generation_config.json, or a GGUF's general.sampling.*):
        only the fields present among temperature, top_p, top_k, repetition_penalty."""
        return {k: self._generation_config[k] for k in _SAMPLING_FIELDS
                if isinstance(self._generation_config.get(k), (int, float))
                and not isinstance(self._generation_config.get(k), bool)}

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings in the text map to their ids (like HF)."""
        if not add_special_tokens:
            return self._backend.encode(text, add_special_tokens=False).ids
        if not self._explicit_bos_eos:
            return self._backend.encode(text, add_special_tokens=True).ids
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        if self.add_eos_token and self.eos_token_id is not None:
            ids = [*ids, self.eos_token_id]
        return ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Incomplete UTF-8 sequences decode to U+FFFD (as in HF)."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        out = []
        for i in ids:
            tok = self._backend.id_to_token(int(i))
            if tok is None:
                raise ValueError(f"token id {i} is out of range for a vocabulary of {self.vocab_size}")
            out.append(tok)
        return out

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    def get_vocab(self) -> dict[str, int]:
        return self._backend.get_vocab(with_added_tokens=True)

    @property
    def backend(self) -> _HFTokenizer:
        """The underlying `tokenizers.Tokenizer` (read-only use, please)."""
        return self._backend

    # ------------------------------------------------------------------ chat templates

    @property
    def chat_template(self) -> str | None:
        """The default chat template, or None if the model has none."""
        return self._chat_templates.get("default") if self._chat_templates else None

    @property
    def chat_templates(self) -> dict[str, str]:
        return dict(self._chat_templates)

    def get_chat_template(self, tools: list[dict] | None = None) -> str:
        """Pick the template like HF: 'tool_use' when tools are given and present, else 'default'."""
        if not self._chat_templates:
            raise ChatTemplateError(
                f"the tokenizer at {self.name_or_path or '<memory>'} has no chat template "
                "(no chat_template in tokenizer_config.json and no chat_template.jinja)"
            )
        if tools is not None and "tool_use" in self._chat_templates:
            return self._chat_templates["tool_use"]
        if "default" in self._chat_templates:
            return self._chat_templates["default"]
        raise ChatTemplateError(
            f"the tokenizer has several chat templates {sorted(self._chat_templates)} and none named 'default'"
        )

    def apply_chat_template(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        **template_kwargs: Any,
    ) -> str:
        """Render `messages` to the prompt string (same bytes as HF's apply_chat_template(tokenize=False)).

        `continue_final_message=True` leaves the last message open for the model to continue; it
        implies add_generation_prompt=False. Extra keyword arguments are passed to the template
        (e.g. `documents=`, `enable_thinking=`) and override the special tokens of the same name.
        """
        template = self.get_chat_template(tools)
        variables = {**self.special_tokens_map, **template_kwargs}
        return render_chat_template(
            template,
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message,
            **variables,
        )

    def __repr__(self) -> str:
        return f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size})"
