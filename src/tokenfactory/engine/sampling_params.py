"""Per-request sampling parameters, shaped like vLLM's so users feel at home.

Every field is bounded here, at the edge, because one request's values reach the sampler
batched with other tenants' requests: a value the sampler cannot represent (a ``top_k`` beyond
int64, a temperature whose reciprocal overflows, a million stop ids) must be turned away or
normalized before it gets there. Violations raise ``ValueError`` with a one-line message (the
HTTP layer answers 400 with it).
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field

# Below this temperature sampling is greedy: 1/T would only amplify rounding noise, and a
# subnormal T overflows the scaled logits (vLLM uses the same epsilon).
MIN_TEMPERATURE = 1e-5
# Above this the distribution is uniform for any practical purpose, and 1/T stays representable.
MAX_TEMPERATURE = 100.0
# top_k at or above the vocabulary disables top-k; larger values are clamped to this (the
# sampler clamps to the real vocabulary size), so no value overflows a tensor's int64.
MAX_TOP_K = 2**31 - 1
MAX_REPETITION_PENALTY = 100.0
MAX_STOP_TOKEN_IDS = 1024
MAX_STOP_TOKEN_ID = 2**31 - 1
MAX_STOP_STRINGS = 64            # the HTTP layer's own limit (32 by default) is below this
MAX_STOP_STRING_CHARS = 1024
MAX_LOGPROBS = 20
# logit_bias: OpenAI's bounds (at most 300 entries, each bias in [-100, 100]); -100 bans a token,
# +100 all but forces it.
MAX_LOGIT_BIAS_ENTRIES = 300
MAX_LOGIT_BIAS = 100.0
SEED_RANGE = (-(2**63), 2**64)   # [lo, hi): any signed or unsigned 64-bit seed
# A schema or regex is compiled into a parser per request: bound its size (a 10 MB schema would
# hold the engine's compile for seconds) before it reaches the grammar engine.
MAX_STRUCTURED_OUTPUT_CHARS = 256 * 1024


def _show(value) -> str:
    """A short rendering of an offending value: huge ints and long sequences are not printed
    (``str`` of a 5,000-digit int raises, a million-item list would flood the log)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        return f"a {type(value).__name__} of {len(value)} items"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _real(name: str, value) -> float:
    """``value`` as a finite float, or ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {_show(value)}")
    try:
        v = float(value)
    except (OverflowError, ValueError):
        raise ValueError(f"{name} must be a finite number, got {_show(value)}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v}")
    return v


def _int(name: str, value) -> int:
    if not _is_int(value):
        raise ValueError(f"{name} must be an integer, got {_show(value)}")
    return int(value)


@dataclass
class StructuredOutput:
    """Constrain the output to a grammar (``text/grammar.py`` compiles it).

    Exactly one of: ``json_schema`` (a JSON schema as a dict or as JSON text), ``json_object``
    (any JSON object), ``regex`` (the whole output matches it), ``lark`` (a context-free
    grammar in llguidance's Lark syntax, which may embed JSON schemas with ``%json``: tool
    calls in a model's own format are built this way, text/tool_parsers.py). ``strict`` (JSON schemas only)
    refuses a schema using keywords the grammar engine cannot enforce; without it those
    keywords are ignored (best effort, as OpenAI's non-strict mode). ``key`` is the canonical
    text of the constraint, the grammar cache's key. ValueError with a one-line message
    otherwise.
    """

    json_schema: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    lark: str | None = None
    strict: bool = True
    key: str = field(init=False, repr=False, compare=False, default="")

    def __post_init__(self) -> None:
        given = [name for name, on in (("json_schema", self.json_schema is not None),
                                       ("json_object", bool(self.json_object)),
                                       ("regex", self.regex is not None),
                                       ("lark", self.lark is not None)) if on]
        if len(given) != 1:
            raise ValueError("structured output needs exactly one of json_schema, json_object, "
                             f"regex, lark; got {', '.join(given) or 'none'}")
        self.json_object, self.strict = bool(self.json_object), bool(self.strict)
        if self.json_schema is not None:
            schema = self.json_schema
            if isinstance(schema, str):
                if len(schema) > MAX_STRUCTURED_OUTPUT_CHARS:
                    raise ValueError(f"json_schema: at most {MAX_STRUCTURED_OUTPUT_CHARS} "
                                     f"characters, got {len(schema)}")
                try:
                    schema = json.loads(schema)
                except (ValueError, RecursionError) as exc:
                    raise ValueError(f"json_schema is not valid JSON: {exc}") from None
            if not isinstance(schema, dict):
                raise ValueError(f"json_schema must be a JSON object, got {_show(schema)}")
            try:
                text = json.dumps(schema, sort_keys=True, separators=(",", ":"),
                                  ensure_ascii=False, allow_nan=False)
            except (TypeError, ValueError, RecursionError) as exc:
                raise ValueError(f"json_schema is not a JSON document: "
                                 f"{type(exc).__name__}: {str(exc)[:200]}") from None
            if len(text) > MAX_STRUCTURED_OUTPUT_CHARS:
                raise ValueError(f"json_schema: at most {MAX_STRUCTURED_OUTPUT_CHARS} "
                                 f"characters, got {len(text)}")
            self.json_schema = schema
            self.key = f"schema:{'strict' if self.strict else 'lenient'}:{text}"
        elif self.regex is not None:
            if not isinstance(self.regex, str) or not self.regex:
                raise ValueError(f"regex must be a non-empty string, got {_show(self.regex)}")
            if len(self.regex) > MAX_STRUCTURED_OUTPUT_CHARS:
                raise ValueError(f"regex: at most {MAX_STRUCTURED_OUTPUT_CHARS} characters, "
                                 f"got {len(self.regex)}")
            self.key = f"regex:{self.regex}"
        elif self.lark is not None:
            if not isinstance(self.lark, str) or not self.lark.strip():
                raise ValueError(f"lark must be a non-empty string, got {_show(self.lark)}")
            if len(self.lark) > MAX_STRUCTURED_OUTPUT_CHARS:
                raise ValueError(f"lark: at most {MAX_STRUCTURED_OUTPUT_CHARS} characters, "
                                 f"got {len(self.lark)}")
            self.key = f"lark:{self.lark}"
        else:
            self.key = "json_object"


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    Defaults follow vLLM: temperature 1.0, max_tokens 16. A temperature below
    ``MIN_TEMPERATURE`` (including 0) means greedy. ``top_k`` of 0 or -1 disables top-k; values
    above ``MAX_TOP_K`` are clamped (anything at least the vocabulary size is "off"). ``seed``
    makes sampling reproducible for this request regardless of which other requests share its
    batches (and across preemption).

    Bounds (ValueError otherwise; NaN and infinities are rejected everywhere): temperature
    in [0, 100]; top_p in (0, 1]; min_p in [0, 1]; presence/frequency penalty in [-2, 2];
    repetition_penalty in (0, 100]; seed a 64-bit integer; at most 1,024 ``stop_token_ids``
    (each in [0, 2**31)) and 64 ``stop`` strings of at most 1,024 characters; logprobs and
    prompt_logprobs in [0, 20]; max_tokens >= 1; 0 <= min_tokens <= max_tokens;
    ``logit_bias`` ({token id: bias} added to the logits before any other processing, as
    OpenAI's) at most 300 entries, ids in [0, 2**31), biases in [-100, 100] (the sampler ignores
    ids beyond its vocabulary; the HTTP layer refuses them first).
    ``structured_output`` (a ``StructuredOutput``, or a dict of its fields) constrains the
    output to a grammar; the request finishes with "stop" when the grammar is complete.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = field(default_factory=list)
    stop_token_ids: list[int] | None = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_output: StructuredOutput | None = None
    logit_bias: dict[int, float] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.structured_output, dict):
            try:
                self.structured_output = StructuredOutput(**self.structured_output)
            except TypeError as exc:   # an unknown field
                raise ValueError(f"structured_output: {exc}") from None
        elif not isinstance(self.structured_output, (StructuredOutput, type(None))):
            raise ValueError("structured_output must be a StructuredOutput, got "
                             f"{_show(self.structured_output)}")
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        else:
            raise ValueError(f"stop must be a string or a list of strings, got {_show(self.stop)}")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, (list, tuple)):
            self.stop_token_ids = list(self.stop_token_ids)
        else:
            raise ValueError(f"stop_token_ids must be a list of integers, "
                             f"got {_show(self.stop_token_ids)}")
        if _is_int(self.top_k):
            if self.top_k == -1:
                self.top_k = 0
            elif self.top_k > MAX_TOP_K:
                self.top_k = MAX_TOP_K
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            setattr(self, name, bool(getattr(self, name)))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with a clear message on any out-of-range parameter; floats are
        stored as Python floats and ints as Python ints once valid."""

        def bad(msg: str) -> None:
            raise ValueError(msg)

        if not _is_int(self.n) or self.n != 1:
            bad(f"n must be 1 (got {_show(self.n)}); several completions per prompt are not "
                "supported")
        self.temperature = _real("temperature", self.temperature)
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            bad(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature}")
        self.top_p = _real("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        self.top_k = _int("top_k", self.top_k)
        if not 0 <= self.top_k <= MAX_TOP_K:
            bad(f"top_k must be >= 0 (0 or -1 disables it), got {_show(self.top_k)}")
        self.min_p = _real("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            bad(f"min_p must be in [0, 1], got {self.min_p}")
        self.presence_penalty = _real("presence_penalty", self.presence_penalty)
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        self.frequency_penalty = _real("frequency_penalty", self.frequency_penalty)
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        self.repetition_penalty = _real("repetition_penalty", self.repetition_penalty)
        if not 0.0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            bad(f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}], "
                f"got {self.repetition_penalty}")
        if self.max_tokens is not None:
            self.max_tokens = _int("max_tokens", self.max_tokens)
            if self.max_tokens < 1:
                bad(f"max_tokens must be at least 1, got {_show(self.max_tokens)}")
        self.min_tokens = _int("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            bad(f"min_tokens must be >= 0, got {_show(self.min_tokens)}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad(f"min_tokens ({_show(self.min_tokens)}) must not exceed max_tokens "
                f"({_show(self.max_tokens)})")
        if len(self.stop) > MAX_STOP_STRINGS:
            bad(f"stop: at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            bad("stop strings must be non-empty strings")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            bad(f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            bad(f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} ids, got "
                f"{len(self.stop_token_ids)}")
        for t in self.stop_token_ids:
            if not _is_int(t) or not 0 <= t <= MAX_STOP_TOKEN_ID:
                bad(f"stop_token_ids must be integers in [0, {MAX_STOP_TOKEN_ID}], "
                    f"got {_show(t)}")
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                if not _is_int(value) or not 0 <= value <= MAX_LOGPROBS:
                    bad(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {_show(value)}")
                setattr(self, name, int(value))
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                bad(f"logit_bias must be a mapping of token id to bias, got {_show(self.logit_bias)}")
            if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
                bad(f"logit_bias: at most {MAX_LOGIT_BIAS_ENTRIES} entries, got "
                    f"{len(self.logit_bias)}")
            bias: dict[int, float] = {}
            for t, b in self.logit_bias.items():
                if not _is_int(t) or not 0 <= t <= MAX_STOP_TOKEN_ID:
                    bad(f"logit_bias keys must be token ids in [0, {MAX_STOP_TOKEN_ID}], "
                        f"got {_show(t)}")
                v = _real("logit_bias", b)
                if not -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS:
                    bad(f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                        f"got {v}")
                bias[int(t)] = v
            self.logit_bias = bias or None
        if self.seed is not None:
            if not _is_int(self.seed):
                bad(f"seed must be an integer, got {_show(self.seed)}")
            if not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
                bad(f"seed must be a 64-bit integer, got {_show(self.seed)}")
            self.seed = int(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def needs_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)
