"""Pydantic models of the Anthropic Messages request.

Tolerance (issue 7): every model accepts and ignores unknown keys (``thinking``,
``context_management``, ``output_config``, ``defer_loading`` on tools, ...); known keys are
still validated strictly, so a malformed known field is a 400.

Strict types (issue 13), as the real API: ``"stream": "yes"``, ``"max_tokens": true`` or
``"max_tokens": 5.0`` are 400s, not coerced (an integer is still a valid float). A lone UTF-16
surrogate anywhere in the body is a 400 before anything else looks at it (errors.py).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt,
                      field_validator, model_validator)

from tokenfactory.api.errors import reject_lone_surrogates
from tokenfactory.api.limits import check_nesting


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class CacheControl(_Open):
    type: Literal["ephemeral"] = "ephemeral"
    ttl: Literal["5m", "1h"] | None = None


class TextBlock(_Open):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None


class ImageBlock(_Open):
    type: Literal["image"]
    source: dict[str, Any] | None = None
    cache_control: CacheControl | None = None


class DocumentBlock(_Open):
    type: Literal["document"]
    source: dict[str, Any] | None = None
    cache_control: CacheControl | None = None


class ToolUseBlock(_Open):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: CacheControl | None = None

    @field_validator("input")
    @classmethod
    def _input_depth(cls, v):
        return check_nesting(v, "tool_use input")


class ToolResultBlock(_Open):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[Annotated[Union[TextBlock, ImageBlock, DocumentBlock],
                                  Field(discriminator="type")]] | None = None
    is_error: StrictBool | None = None
    cache_control: CacheControl | None = None


class ThinkingBlock(_Open):
    type: Literal["thinking"]
    thinking: str = ""
    signature: str | None = None
    cache_control: CacheControl | None = None


class RedactedThinkingBlock(_Open):
    type: Literal["redacted_thinking"]
    data: str = ""
    cache_control: CacheControl | None = None


ContentBlock = Annotated[
    Union[TextBlock, ImageBlock, DocumentBlock, ToolUseBlock, ToolResultBlock, ThinkingBlock,
          RedactedThinkingBlock],
    Field(discriminator="type")]


class Message(_Open):
    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlock]


class Tool(_Open):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None          # "custom" or a server tool type (those are not supported)
    cache_control: CacheControl | None = None
    strict: StrictBool | None = None  # input constrained to input_schema by a grammar

    @field_validator("input_schema")
    @classmethod
    def _schema_depth(cls, v):
        return None if v is None else check_nesting(v, "input_schema")

    @model_validator(mode="after")
    def _schema(self):
        if self.type not in (None, "custom"):
            raise ValueError(f"server tool type '{self.type[:60]}' (tool '{self.name}') is "
                             "not supported by this server: only custom tools (with an "
                             "input_schema) are")
        if self.type in (None, "custom"):
            if self.input_schema is None:
                raise ValueError("input_schema: Field required")
            if self.input_schema.get("type", "object") != "object":
                raise ValueError("input_schema.type must be 'object'")
        return self


class ToolChoice(_Open):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: StrictBool | None = None

    @model_validator(mode="after")
    def _named(self):
        if self.type == "tool" and not self.name:
            raise ValueError("tool_choice.name is required when tool_choice.type is 'tool'")
        return self


class ThinkingConfig(_Open):
    """Extended thinking, as the API takes it. ``enabled`` needs a ``budget_tokens`` of at
    least 1024 below ``max_tokens`` (checked by the handler, which knows both). ``display``
    "omitted" returns thinking blocks without their text (the signature carries it back)."""
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: StrictInt | None = Field(default=None, ge=1024)
    display: Literal["summarized", "omitted"] | None = None


class Metadata(BaseModel):
    """The API's ``metadata``: only ``user_id`` (an opaque id of the end user; Claude Code
    sends a JSON string). Other keys are a 400, as the real API answers."""
    model_config = ConfigDict(extra="forbid")
    user_id: str | None = Field(default=None, max_length=4096)


# Known request fields this server cannot honour: a clear 400 rather than silence.
UNSUPPORTED = {
    "container": "code-execution containers are not available on this server",
    "mcp_servers": "MCP servers (the mcp-client beta) are not available on this server",
}
# Fields whose value must be one this server has: {field: allowed values}
ONE_OF = {"service_tier": ("auto", "standard_only"), "speed": ("standard",)}


class MessagesRequest(_Open):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: StrictInt = Field(ge=1)
    system: str | list[TextBlock] | None = None
    temperature: StrictFloat | None = Field(default=None, ge=0.0, le=1.0)
    top_p: StrictFloat | None = Field(default=None, ge=0.0, le=1.0)
    # huge values are clamped to the vocabulary (SamplingParams), not refused
    top_k: StrictInt | None = Field(default=None, ge=0)
    stop_sequences: list[str] | None = None
    stream: StrictBool | None = False
    metadata: Metadata | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    cache_control: CacheControl | None = None
    thinking: ThinkingConfig | None = None
    # tokenfactory extensions (vLLM-style; benchmarks use them for fixed-length outputs)
    ignore_eos: StrictBool | None = False
    min_tokens: StrictInt | None = Field(default=None, ge=0)
    seed: StrictInt | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        data = reject_lone_surrogates(data)
        if isinstance(data, dict):
            for name, why in UNSUPPORTED.items():
                if data.get(name) not in (None, [], {}):
                    raise ValueError(f"{name}: {why}")
            for name, allowed in ONE_OF.items():
                if data.get(name) is not None and data[name] not in allowed:
                    raise ValueError(f"{name}: this server has only "
                                     f"{' / '.join(map(repr, allowed))}, "
                                     f"got {str(data[name])[:40]!r}")
        return data

    @model_validator(mode="after")
    def _thinking_budget(self):
        t = self.thinking
        if t is not None and t.type == "enabled":
            if t.budget_tokens is None:
                raise ValueError("thinking.budget_tokens: Field required")
            if self.max_tokens is not None and t.budget_tokens >= self.max_tokens:
                raise ValueError("`max_tokens` must be greater than `thinking.budget_tokens`")
        return self

    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, v):
        if v is not None and any(s == "" for s in v):
            raise ValueError("stop sequences must be non-empty strings")
        return v


class CountTokensRequest(MessagesRequest):
    max_tokens: StrictInt | None = Field(default=None, ge=1)  # type: ignore[assignment]
