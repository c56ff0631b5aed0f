"""Pydantic models of the OpenAI chat/completions and completions requests (unknown keys ignored).

Known fields are strictly typed, as OpenAI's API is (``"stream": "yes"`` or
``"max_tokens": true`` are 400s, an integer is still a valid float), list fields are capped,
and a lone UTF-16 surrogate anywhere in the body is a 400 (errors.py)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt,
                      field_validator, model_validator)

from tokenfactory.api.errors import reject_lone_surrogates
from tokenfactory.api.limits import check_nesting

# At most this many stop_token_ids (vLLM has no limit; the sampler checks them every step, so
# a million of them slowed every batch-mate). Each must also be in the vocabulary
# (openai_sampling.py).
MAX_STOP_TOKEN_IDS = 1024
# n choices per request: each is its own engine request (they share the prompt's cached pages).
MAX_N = 16
# Prompts per /v1/completions request, and choices (prompts x n) per request: each choice is
# an engine request, submitted and scheduled together.
MAX_PROMPTS = 256
MAX_CHOICES = 256
MAX_TOP_LOGPROBS = 20      # the engine's bound (SamplingParams.MAX_LOGPROBS); OpenAI's is 20


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class FunctionCall(_Open):
    name: str
    arguments: str | dict[str, Any] = "{}"

    @field_validator("arguments")
    @classmethod
    def _depth(cls, v):
        return v if isinstance(v, str) else check_nesting(v, "function.arguments")


class ToolCall(_Open):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(_Open):
    type: str
    text: str | None = None


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Open):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None   # arguments constrained to `parameters` by a grammar

    @field_validator("parameters")
    @classmethod
    def _depth(cls, v):
        return None if v is None else check_nesting(v, "function.parameters")


class ToolDef(_Open):
    type: Literal["function"] = "function"
    function: FunctionDef


class StreamOptions(_Open):
    include_usage: StrictBool | None = False


# Known OpenAI fields this server cannot honour: a clear 400 rather than silence. {field: why}
# (a falsy value - null, false, [], "" - asks for nothing and passes)
UNSUPPORTED_CHAT = {
    "functions": "the legacy `functions` field is not supported; send `tools`",
    "function_call": "the legacy `function_call` field is not supported; send `tool_choice`",
    "audio": "this model does not produce audio output",
    "prediction": "predicted outputs (`prediction`) are not supported",
    "web_search_options": "web search is not available on this server",
}
UNSUPPORTED_COMPLETION = {
    "suffix": "`suffix` (insertion) is not supported by this model",
}
# Fields whose value must be one this server has: {field: allowed values}
ONE_OF = {"service_tier": ("auto", "default"), "verbosity": ("medium",)}


def refuse_unsupported(data: Any, unsupported: dict[str, str]) -> Any:
    """400 (as a validation error) for a known field the server cannot honour."""
    if not isinstance(data, dict):
        return data
    for name, why in unsupported.items():
        if data.get(name) not in (None, False, [], "", {}):
            raise ValueError(f"{name}: {why}")
    for name, allowed in ONE_OF.items():
        value = data.get(name)
        if value is not None and value not in allowed:
            raise ValueError(f"{name}: this server has only {' / '.join(map(repr, allowed))}, "
                             f"got {str(value)[:40]!r}")
    modalities = data.get("modalities")
    if modalities is not None and (not isinstance(modalities, list)
                                   or any(m != "text" for m in modalities)):
        raise ValueError("modalities: this model produces text only (['text'])")
    return data


class _SamplingFields(_Open):
    model: str
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: StrictFloat | None = Field(default=None, ge=0.0, le=2.0)
    top_p: StrictFloat | None = Field(default=None, gt=0.0, le=1.0)
    top_k: StrictInt | None = None          # huge values are clamped to the vocabulary
    min_p: StrictFloat | None = None
    n: StrictInt | None = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    repetition_penalty: StrictFloat | None = None
    ignore_eos: StrictBool | None = False
    min_tokens: StrictInt | None = None
    stop_token_ids: list[StrictInt] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    user: str | None = None
    # {"token id": bias}: JSON keys are strings; openai_sampling.py turns them into ids in the
    # vocabulary
    logit_bias: dict[str, StrictFloat] | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        return reject_lone_surrogates(data)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    # how much a reasoning template's reply may think (text/reasoning.py): "none" renders the
    # template's switch off, the others bound the section to a share of max_tokens
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    # vLLM's extension: extra variables for the chat template (Qwen3's enable_thinking, ...)
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data):
        return refuse_unsupported(data, UNSUPPORTED_CHAT)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    tools: list[ToolDef] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(_SamplingFields):
    # a string, several strings, token ids, or several token-id lists (lm-eval's default)
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    echo: StrictBool | None = False
    # the completions API's logprobs: how many top alternatives per position (0: the chosen only)
    logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # best_of > n would sample more than it returns, ranked by likelihood: not implemented
    best_of: StrictInt | None = Field(default=None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data):
        return refuse_unsupported(data, UNSUPPORTED_COMPLETION)

    @field_validator("prompt")
    @classmethod
    def _num_prompts(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], (str, list)) and len(v) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(v)}")
        return v

    @model_validator(mode="after")
    def _best_of(self):
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ValueError("best_of: only best_of equal to n is supported (every sample "
                             "is returned)")
        return self
