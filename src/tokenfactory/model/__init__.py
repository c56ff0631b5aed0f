"""The forward pass: checkpoint config and loader, RoPE, paged attention, the Llama decoder
family (Llama, Mistral, Qwen2, Qwen3), the sampler, and :class:`TorchExecutor` tying them to
the engine."""
from tokenfactory.model.config import ModelConfig, ModelLoadError, load_model_config

__all__ = ["ModelConfig", "ModelLoadError", "load_model_config", "TorchExecutor"]


def __getattr__(name: str):
    # Lazy: importing the config does not need the runner (and its torch model code).
    if name == "TorchExecutor":
        from tokenfactory.model.runner import TorchExecutor
        return TorchExecutor
    raise AttributeError(name)
