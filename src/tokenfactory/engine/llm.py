"""Offline API, vLLM-shaped: ``LLM(model_dir).generate(prompts, SamplingParams(...))``."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Sequence

from tokenfactory.engine.core import EngineConfig, EngineCore
from tokenfactory.engine.request import RequestOutput
from tokenfactory.engine.sampling_params import SamplingParams

Prompt = str | Sequence[int]


def build_engine_core(model_dir: str | Path, *, dtype: str | None = None,
                      device: str = "cpu", step_hook=None, clock=None,
                      kernels: str | None = "auto", kv_connector=None,
                      compile: bool = False, quantization: str | None = None,
                      kv_cache_dtype: str | None = None, **engine_args) -> EngineCore:
    """Load a model (a GGUF file or a Hugging Face directory: weights + tokenizer) and build an
    EngineCore on it. ``device``: where the weights and KV pages live ("cpu", "cuda", ...;
    the native CPU kernels only run on "cpu"). ``kernels``: "auto" (measured per CPU,
    model/kernel_choice.py), "native" or "torch" (forced), None (the fixed
    native-where-available rule). ``kv_connector``: a KV tier beyond RAM (engine/kv_connector.py).
    ``quantization``: "gguf" (a quantized GGUF file's blocks run as stored), "none"/None
    (dequantized at load), "int8" (linears quantized per channel at load).
    ``kv_cache_dtype``: "auto"/None (KV pages in the model's dtype) or "int8" (int8 rows with a
    float32 scale each, about half the bytes: model/kv_pages.py). ``engine_args``:
    ``EngineConfig`` fields."""
    from tokenfactory.model.gguf import is_gguf_file, open_gguf
    from tokenfactory.model.runner import TorchExecutor
    from tokenfactory.text.tokenizer import Tokenizer

    executor = TorchExecutor(model_dir, dtype=dtype, device=device, kernels=kernels,
                             compile=compile, quantization=quantization,
                             kv_cache_dtype=kv_cache_dtype)
    if is_gguf_file(model_dir):   # model/gguf's reader parses the vocabulary 3x faster
        tokenizer = Tokenizer.from_gguf(model_dir, reader=open_gguf(model_dir).reader)
    else:
        tokenizer = Tokenizer.from_pretrained(model_dir)
    extra = {"clock": clock} if clock is not None else {}
    return EngineCore(executor, EngineConfig(**engine_args), model_max_len=executor.max_model_len,
                      tokenizer=tokenizer, eos_token_ids=tokenizer.eos_token_ids,
                      step_hook=step_hook, kv_connector=kv_connector, **extra)


class LLM:
    """Generate offline with continuous batching and prefix caching.

    >>> llm = LLM("path/to/model.gguf or hf-model-dir", dtype="bfloat16", max_model_len=4096)
    >>> # device="cuda" runs the same code on a GPU (torch paths only);
    >>> # speculative="ngram" | "suffix" | "draft:PATH", num_speculative_tokens=K: drafts;
    >>> # quantization="gguf", kv_cache_dtype="int8": fewer bytes per weight / per KV token
    >>> outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=8))
    >>> outs[0].outputs[0].text
    """

    def __init__(self, model: str | Path, *, dtype: str | None = None, device: str = "cpu",
                 **engine_args):
        self.engine = build_engine_core(model, dtype=dtype, device=device, **engine_args)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt given as a string or a list of token ids
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling params")

        order: dict[str, int] = {}
        for i, (prompt, params) in enumerate(zip(prompts, params_list)):
            if isinstance(prompt, str):
                text, ids = prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
            else:
                text, ids = None, list(prompt)
            rid = f"offline-{next(self._ids)}"
            # Each request owns its params (max_tokens may be filled in per prompt).
            self.engine.add_request(rid, ids, _copy(params), prompt=text)
            order[rid] = i

        results: list[RequestOutput | None] = [None] * len(prompts)
        bar = None
        if use_tqdm and len(prompts) > 1:
            from tqdm import tqdm
            bar = tqdm(total=len(prompts), desc="generate", unit="req", dynamic_ncols=True)
        try:
            while any(r is None for r in results):
                for out in self.engine.step():
                    if out.finished and out.request_id in order:
                        results[order[out.request_id]] = out
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return results  # type: ignore[return-value]


def _copy(params: SamplingParams) -> SamplingParams:
    import copy
    return copy.deepcopy(params)
