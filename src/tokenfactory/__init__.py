"""tokenfactory: an LLM inference server that knows what every token cost."""
from tokenfactory.engine.llm import LLM
from tokenfactory.engine.request import CompletionOutput, RequestOutput
from tokenfactory.engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
