import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A random 2-layer Llama with the demo tokenizer, built in a temporary cache."""
    import os

    from tokenfactory.bench.checkpoint import build_bench_checkpoint

    cache = tmp_path_factory.mktemp("tf-cache")
    old = os.environ.get("TOKENFACTORY_CACHE")
    os.environ["TOKENFACTORY_CACHE"] = str(cache)
    try:
        return str(build_bench_checkpoint("tiny", "float32"))
    finally:
        if old is None:
            os.environ.pop("TOKENFACTORY_CACHE", None)
        else:
            os.environ["TOKENFACTORY_CACHE"] = old
