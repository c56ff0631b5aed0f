import pytest


@pytest.fixture(scope="session")
def demo_tokenizer(tmp_path_factory):
    from tokenfactory.text.demo_tokenizer import train_demo_tokenizer
    return train_demo_tokenizer(tmp_path_factory.mktemp("demo-tok"))
