"""Fixtures the router tests share: one demo-model checkpoint (random weights, its own trained
tokenizer) for the whole session, read by the engines and Ray replicas that need a model."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenfactory.model.demo import build_demo_checkpoint
    return build_demo_checkpoint(tmp_path_factory.mktemp("router-demo"))
