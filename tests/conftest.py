"""Session fixtures every suite shares: one locally trained demo tokenizer (no downloads)."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenfactory.text.demo_tokenizer import train_demo_tokenizer
    out = tmp_path_factory.mktemp("demo_tokenizer")
    train_demo_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def demo_tokenizer(demo_tokenizer_dir: Path):
    from tokenfactory.text.tokenizer import Tokenizer
    return Tokenizer.from_dir(demo_tokenizer_dir)


@pytest.fixture(scope="session")
def tokenizer(demo_tokenizer):
    """The name the API, robustness and Claude Code suites use."""
    return demo_tokenizer
