"""What both protocols share: options, model names, the max_tokens policy, and one generation
run (engine outputs -> text / tool-call events), independent of any wire format."""
from __future__ import annotations

import asyncio
import fnmatch
import functools
import itertools
import logging
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from tokenfactory.api.errors import APIError
from tokenfactory.api.metrics import Metrics
from tokenfactory.engine.async_engine import (
    AsyncEngine, EngineDeadError, EngineOverloadedError, PendingOutput,
)
from tokenfactory.engine.request import CacheBreakpoint, RequestOutput
from tokenfactory.engine.sampling_params import SamplingParams
from tokenfactory.engine.scheduler import AdmissionError

log = logging.getLogger("tokenfactory.api")


@dataclass
class ServerOptions:
    served_model_name: str = "tokenfactory"
    aliases: list[tuple[str, str]] = field(default_factory=list)   # (glob pattern, served name)
    api_keys: dict[str, str] = field(default_factory=dict)         # key -> tenant
    min_cache_tokens: int = 1024
    max_tokens_policy: str = "clamp"                               # "clamp" | "reject"
    max_output_tokens: int | None = None
    strip_system_prefix: str | None = None
    ping_interval: float = 10.0
    max_body_bytes: int = 32 * 1024 * 1024
    max_stop_sequences: int = 32
    tool_parser: str | None = None            # None: detect from the chat template
    random_weights: bool = False              # the built-in demo model: say so
    # Sampling values for requests that leave them out (the model's generation config, as vLLM
    # uses generation_config.json): temperature, top_p, top_k, repetition_penalty, ...
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    retry_after_seconds: int = 1
    enable_cors: bool = False
    malloc_trim_interval: float = 1.0         # seconds between malloc_trim calls (memory.py); 0: off
    malloc_trim_threshold: int = 4 << 20      # glibc M_TRIM_THRESHOLD (memory.py); 0: glibc's own
    prompt_threads: int = 2                   # threads rendering templates + tokenizing (see off_loop)
    # The cost ledger: machine time priced at cost_per_hour, energy at watts, and the API-price
    # view of each request's usage at these list prices ($ per million tokens).
    cost_per_hour: float = 0.10
    watts: float = 120.0
    price_input_per_million: float = 3.0
    price_output_per_million: float = 15.0


@dataclass
class TextEvent:
    text: str


@dataclass
class Started:
    """The first engine output arrived: num_cached_tokens is known (message_start can go)."""
    output: RequestOutput


@dataclass
class Finished:
    output: RequestOutput
    cost: Any = None   # economics.ledger.RequestCost


def cost_headers(gen: "Generation") -> dict[str, str]:
    """x-tokenfactory-* headers with the request's machine time, $, joules and API price
    (non-streaming responses; a stream's headers leave before its cost is known)."""
    heads = gen.cost.headers() if gen.cost is not None else {}
    if gen.spec_tokens is not None:   # a speculating engine: this request's drafts
        heads["x-tokenfactory-spec-proposed"] = str(gen.spec_tokens[0])
        heads["x-tokenfactory-spec-accepted"] = str(gen.spec_tokens[1])
    return heads


class GenerationFailed(RuntimeError):
    """The engine ended the request with an error (or aborted it) after it started."""


class ServingContext:
    def __init__(self, engine: AsyncEngine, tokenizer, options: ServerOptions, metrics: Metrics):
        from tokenfactory.text.tool_parsers import detect_tool_parser

        self.engine = engine
        self.tokenizer = tokenizer
        self.options = options
        self.metrics = metrics
        self.parser_name = options.tool_parser or detect_tool_parser(
            getattr(tokenizer, "chat_template", None))
        self.template_shows_tools = template_shows_tools(tokenizer)
        self.strip_re = (re.compile(options.strip_system_prefix, re.MULTILINE)
                         if options.strip_system_prefix else None)
        self._ids = itertools.count()
        self.encoded_chars = 0   # characters handed to the tokenizer (tests read it)
        # drafts proposed from the context (--speculative): responses count them per request
        core = getattr(engine, "core", None)
        self.speculative = bool(getattr(core, "proposer", None)
                                or getattr(getattr(core, "config", None), "speculative", None))
        self.activity = 0   # bumped when a generation starts or ends (memory.trim_periodically)
        from tokenfactory.economics.ledger import ApiPrices, CostLedger
        self.ledger = CostLedger(options.cost_per_hour, options.watts,
                                 ApiPrices(options.price_input_per_million,
                                           options.price_output_per_million))
        # Every forward pass is charged to the requests in it, by tokens processed.
        engine.core.add_step_listener(self.ledger.record_step)
        metrics.attach_ledger(self.ledger)
        self._prompt_pool = ThreadPoolExecutor(max_workers=max(1, options.prompt_threads),
                                               thread_name_prefix="tokenfactory-prompt")
        # computed once now rather than inside the first request (a pass over the vocabulary)
        self.max_bytes_per_token, self.split_tokens  # noqa: B018

    async def off_loop(self, fn, /, *args, **kwargs):
        """Run blocking prompt work (chat template rendering, tokenizing) off the event loop.

        On a small fixed pool (``prompt_threads``, default 2) rather than asyncio's default
        executor, whose size grows with the machine (min(32, cores + 4) threads): that work holds
        the GIL (Jinja is Python; ``tokenizers``' encode does not release it), so more threads
        add no throughput, while each thread that tokenizes keeps state of its own for the life
        of the process: a glibc malloc arena and, since tokenizers 0.23, a thread-local BPE word
        cache of up to 10,000 words that is never freed (clear_cache only starts a new one).
        A fixed pool bounds that memory independently of the core count.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._prompt_pool, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._prompt_pool.shutdown(wait=False, cancel_futures=True)

    def bill(self, request_id: str, out: RequestOutput | None,
             breakpoints: list[CacheBreakpoint]):
        """Close a request in the ledger: its machine time plus the API-price view of its usage."""
        from tokenfactory.api.caching import cache_usage
        from tokenfactory.economics.ledger import TokenUsage
        usage = None
        if out is not None:
            u = cache_usage(len(out.prompt_token_ids), out.num_cached_tokens, breakpoints,
                            self.block_size, self.prefix_caching)
            usage = TokenUsage(input_tokens=u.input_tokens,
                               output_tokens=len(out.outputs[0].token_ids),
                               cache_read_tokens=u.cache_read_input_tokens,
                               cache_write_5m_tokens=u.ephemeral_5m_input_tokens,
                               cache_write_1h_tokens=u.ephemeral_1h_input_tokens)
        return self.ledger.finish(request_id, usage)

    # ------------------------------------------------------------------ names
    @property
    def core(self):
        return self.engine.core

    @property
    def block_size(self) -> int:
        return self.core.kv.block_size

    @property
    def prefix_caching(self) -> bool:
        return self.core.kv.pool.enable_prefix_caching

    @property
    def context_limit(self) -> int:
        """Most tokens (prompt + output) one request can ever hold."""
        return min(self.core.max_model_len, self.core.kv.num_blocks * self.block_size)

    def resolve_model(self, name: str) -> str:
        served = self.options.served_model_name
        if name == served:
            return served
        for pattern, target in self.options.aliases:
            if fnmatch.fnmatchcase(name, pattern):
                return target
        raise APIError(404, f"model '{name}' not found; this server serves '{served}'"
                            + (" (and aliases " + ", ".join(p for p, _ in self.options.aliases) + ")"
                               if self.options.aliases else ""), param="model",
                       code="model_not_found")

    def sampling_default(self, name: str, requested: Any, fallback: Any) -> Any:
        """The request's value, else the model's default, else the API's own default."""
        if requested is not None:
            return requested
        return self.options.sampling_defaults.get(name, fallback)

    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}{secrets.token_hex(12)}"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; see ``encode_with_offsets`` for why the backend is called
        through its batch API."""
        return self.encode_with_offsets(text, add_special_tokens)[0]

    def encode_with_offsets(self, text: str, add_special_tokens: bool = False
                            ) -> tuple[list[int], list[tuple[int, int]] | None]:
        """(token ids, character span of each token or None when the tokenizer gives none).

        Through ``tokenizers``' ``encode_batch`` when the tokenizer wraps one: unlike
        ``encode``, it releases the interpreter lock while it works, so a long prompt being
        tokenized on a prompt thread does not freeze the event loop (/health, other streams).
        The ids are the same as ``Tokenizer.encode``'s (BOS/EOS added the same way).
        """
        self.encoded_chars += len(text)
        backend = getattr(self.tokenizer, "backend", None)
        if backend is None or not hasattr(backend, "encode_batch"):
            return self._plain_encode(text, add_special_tokens), None
        tok = self.tokenizer
        explicit = add_special_tokens and backend.post_processor is None
        try:
            enc = backend.encode_batch([text], add_special_tokens=add_special_tokens
                                       and not explicit)[0]
        except (TypeError, UnicodeError):
            return self._plain_encode(text, add_special_tokens), None
        ids, offsets = list(enc.ids), list(enc.offsets)
        if explicit:   # what Tokenizer.encode does without a post-processor
            if getattr(tok, "add_bos_token", False) and tok.bos_token_id is not None:
                ids, offsets = [tok.bos_token_id, *ids], [(0, 0), *offsets]
            if getattr(tok, "add_eos_token", False) and tok.eos_token_id is not None:
                ids, offsets = [*ids, tok.eos_token_id], [*offsets, (len(text), len(text))]
        return ids, offsets

    def _plain_encode(self, text: str, add_special_tokens: bool) -> list[int]:
        try:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        except TypeError:  # lone UTF-16 surrogates (the API refuses them; offline callers may not)
            clean = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return self.tokenizer.encode(clean, add_special_tokens=add_special_tokens)

    @functools.cached_property
    def split_tokens(self) -> dict[int, str]:
        """Added tokens a prompt can be cut at without changing its tokens (caching.py)."""
        from tokenfactory.api.caching import split_tokens
        return split_tokens(self.tokenizer)

    # ------------------------------------------------------- cheap rejections
    @functools.cached_property
    def max_bytes_per_token(self) -> int:
        """An upper bound on how many UTF-8 bytes of input one token can stand for.

        A token's string in the vocabulary is never shorter in UTF-8 than the text it covers:
        byte-level BPE writes each byte as a character of 1-2 UTF-8 bytes, SentencePiece
        writes a space as the 3-byte "\u2581" and a byte-fallback token as "<0xAB>", added
        tokens are their own text. A normalizer may compose several characters into one
        (NFC/NFKC: Hangul jamo 9 bytes -> 3), so with one the bound is multiplied by 4.
        Computed once (one pass over the vocabulary, ~50 ms for 49K tokens).
        """
        vocab_of = getattr(self.tokenizer, "get_vocab", None)
        vocab = vocab_of() if vocab_of is not None else {}
        if not vocab:
            return 0   # unknown tokenizer: no early bound
        longest = max(len(t.encode("utf-8", "surrogatepass")) for t in vocab)
        backend = getattr(self.tokenizer, "backend", None)
        if getattr(backend, "normalizer", None) is not None:
            longest *= 4
        return max(1, longest)

    def check_prompt_bytes(self, num_bytes: int, *, reserve: int = 1, param: str | None = None
                           ) -> None:
        """400 "prompt is too long" from the size of the text alone, before any rendering or
        tokenizing: ``num_bytes`` UTF-8 bytes of text that will surely be tokenized make at
        least ``num_bytes / max_bytes_per_token`` tokens, so beyond ``(context_limit - reserve)
        * max_bytes_per_token`` bytes the prompt cannot fit whatever its exact token count."""
        per_token = self.max_bytes_per_token
        room = self.context_limit - reserve
        if per_token and num_bytes > room * per_token:
            at_least = -(-num_bytes // per_token)
            raise APIError(400, f"prompt is too long: its text alone is {num_bytes} bytes, at "
                                f"least {at_least} tokens, but the context holds "
                                f"{self.context_limit} tokens (prompt + max_tokens)",
                           param=param)

    def check_capacity(self, tenant: str | None, overload_status: int) -> None:
        """The engine's queue-full answer (429/529) before the prompt is rendered and tokenized;
        ``AsyncEngine.generate`` checks again, atomically, when the request is submitted."""
        engine = self.engine
        limit = getattr(engine, "max_queued_requests", None)
        full = None
        if limit is not None and engine.stats().num_waiting >= limit:
            full = f"{limit} requests are already queued"
        per_tenant = getattr(engine, "max_queued_per_tenant", None)
        if full is None and per_tenant is not None and hasattr(engine, "num_waiting_for") \
                and engine.num_waiting_for(tenant) >= per_tenant:
            full = f"{per_tenant} requests of this tenant are already queued"
        if full is not None:
            self.metrics.requests_rejected.inc()
            raise APIError(overload_status, f"the server is overloaded ({full}); retry later",
                           headers={"retry-after": str(self.options.retry_after_seconds)})

    # ------------------------------------------------------------- max tokens
    def effective_max_tokens(self, num_prompt: int, requested: int | None) -> tuple[int, bool]:
        """(max_tokens to serve, whether it was clamped). Raises 400 when nothing fits."""
        limit = self.context_limit
        room = limit - num_prompt
        if room < 1:
            raise APIError(400, f"prompt is too long: {num_prompt} tokens, but the context holds "
                                f"{limit} tokens (prompt + max_tokens)")
        cap = self.options.max_output_tokens
        if requested is None:  # OpenAI lets it default to "whatever fits"
            wanted = min(room, cap) if cap else room
            return wanted, False
        if self.options.max_tokens_policy == "reject":
            if num_prompt + requested > limit:
                raise APIError(400, f"prompt ({num_prompt} tokens) + max_tokens ({requested}) = "
                                    f"{num_prompt + requested} exceeds the context length of "
                                    f"{limit} tokens")
            if cap and requested > cap:
                raise APIError(400, f"max_tokens ({requested}) exceeds this server's "
                                    f"--max-output-tokens ({cap})")
            return requested, False
        served = min(requested, room, cap or requested)
        return served, served != requested


_TOOL_PROBE = "tokenfactory_probe_tool_7f3a"


def template_shows_tools(tokenizer) -> bool:
    """Whether the chat template puts tool definitions into the prompt at all (SmolLM2's, for
    one, has no tool section: tools given to it would vanish without a word)."""
    tools = [{"type": "function", "function": {"name": _TOOL_PROBE, "description": "probe",
                                               "parameters": {"type": "object"}}}]
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=tools)
    except Exception:  # no template, or one that rejects the probe: nothing is shown either way
        return False
    return _TOOL_PROBE in text


def make_sampling_params(**kw) -> SamplingParams:
    """SamplingParams, or a 400 naming the parameter its bounds refused (its messages start
    with the field's name: "top_p must be in (0, 1], got 5.0")."""
    try:
        return SamplingParams(**kw)
    except ValueError as exc:
        msg = str(exc)
        head = re.match(r"[a-z_]+", msg)
        param = head.group(0) if head and head.group(0) in kw else None
        raise APIError(400, msg, param=param) from None


class Generation:
    """One engine request, turned into protocol-neutral events.

    ``start()`` submits it and surfaces admission / overload errors as HTTP errors (the engine
    raises them before its first output, which is before any response byte is sent). ``events()``
    then yields Started, TextEvent / tool-parser events, and Finished. Closing or cancelling the
    iteration aborts the engine request (its pages are freed at once). A consumer slower than
    the engine gets the outputs that piled up merged into one (``_pump``): a request holds at
    most one undelivered output, whatever the client's speed.
    """

    def __init__(self, ctx: ServingContext, request_id: str, prompt_ids: list[int],
                 params: SamplingParams, *, cache_salt: str | None,
                 breakpoints: list[CacheBreakpoint], parser=None,
                 overload_status: int = 529, trace=None):
        self.ctx = ctx
        self.trace = trace   # api.trace.RequestTrace, or None when tracing is off
        ctx.activity += 1
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.parser = parser
        self.overload_status = overload_status
        self.t_start = time.monotonic()
        self.breakpoints = breakpoints
        self.billed = False
        self.cost = None  # economics.ledger.RequestCost once finished
        # (draft tokens proposed, accepted) once finished, when the engine speculates
        self.spec_tokens: tuple[int, int] | None = None
        # The tenant (the API key's, which is also the cache salt) drives fair admission and
        # the per-tenant queue limit in the engine.
        self._agen = ctx.engine.generate(request_id, prompt_ids, params, cache_salt=cache_salt,
                                         cache_breakpoints=breakpoints, tenant=cache_salt)
        # The pump task drains the engine's stream as fast as it arrives and keeps only what the
        # consumer has not taken yet, merged into one output (see _pump).
        self._pump_task: asyncio.Task | None = None
        self._pending = PendingOutput()   # newest output not yet taken, deltas merged
        self._num_delivered = 0
        self._error: BaseException | None = None
        self._pump_done = False
        self._ready = asyncio.Event()
        # the engine output whose events are being yielded (a stream attaches the logprobs of
        # exactly the tokens a chunk carries)
        self.last_output: RequestOutput | None = None

    def _map_error(self, exc: BaseException) -> APIError:
        if isinstance(exc, AdmissionError):
            return APIError(400, str(exc))
        if isinstance(exc, EngineOverloadedError):
            return APIError(self.overload_status, f"the server is overloaded ({exc}); retry later",
                            headers={"retry-after": str(self.ctx.options.retry_after_seconds)})
        if isinstance(exc, EngineDeadError):
            return APIError(500, f"the engine is not running: {exc}")
        if isinstance(exc, ValueError):
            return APIError(400, str(exc))
        return APIError(500, f"internal error: {type(exc).__name__}")

    async def _pump(self) -> None:
        """Move the engine's outputs into ``_pending`` as soon as they arrive.

        The engine thread can run far ahead of the client (a scripted or small model steps
        faster than the event loop frames SSE), and every RequestOutput it emits is a snapshot
        carrying the request's whole token list and text so far. Left queued until the consumer
        asked for them, a long request's outputs cost O(n^2) memory (the soak server held ~11k
        queued outputs, 30 MiB, at once) and the malloc arena of the engine thread kept
        that high-water mark as RSS. Here, an output the consumer has not taken yet is replaced
        by the next one, whose delta (``new_text``, ``new_token_ids``) is appended: at most
        one pending output per request, and a slow client receives the text that accumulated
        in one frame instead of one frame per token (the engine's ``PendingOutput``, which
        also merges between the engine thread and the event loop). When the consumer keeps
        up, every output is delivered on its own.
        """
        try:
            async for out in self._agen:
                if self.trace is not None:
                    self.trace.mark_output(out)
                self._pending.add(out)
                self._ready.set()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer (_outputs)
            self._error = exc
        finally:
            self._pump_done = True
            self._ready.set()

    def _take(self) -> RequestOutput:
        self._num_delivered += 1
        self.last_output = self._pending.take()
        return self.last_output

    async def prefilled(self) -> None:
        """Wait for the first engine output (the prompt is then in the KV cache and its full
        pages in the prefix cache) or the end of the request, without consuming anything."""
        while not self._pending and not self._pump_done:
            self._ready.clear()
            await self._ready.wait()

    async def start(self) -> None:
        if self.trace is not None:
            self.trace.mark_submitted(self.request_id)
        self._pump_task = asyncio.ensure_future(self._pump())
        await asyncio.sleep(0)  # run generate() up to its first suspension (where it raises)
        if self._pump_done and self._error is not None and not self._pending:
            exc, self._error = self._error, None
            self.ctx.metrics.requests_rejected.inc()
            raise self._map_error(exc)

    async def close(self) -> None:
        if self._pump_task is not None and not self._pump_task.done():
            self._pump_task.cancel()   # aborts the engine request (generate()'s finally)
            try:
                await self._pump_task
            except BaseException:  # noqa: BLE001 - cancelled on purpose
                pass
        self._pending = PendingOutput()
        self.ctx.activity += 1
        await self._agen.aclose()
        cost = self.cost
        if not self.billed:  # failed or abandoned: close its ledger entry (time already spent)
            self.billed = True
            cost = self.ctx.bill(self.request_id, None, self.breakpoints)
        if self.trace is not None:
            self.trace.mark_done(cost)

    async def _outputs(self) -> AsyncIterator[RequestOutput]:
        if self._pump_task is None:
            await self.start()
        while True:
            if self._pending:
                yield self._take()
                continue
            if self._pump_done:
                break
            self._ready.clear()
            await self._ready.wait()
        exc, self._error = self._error, None
        if exc is not None:
            if self._num_delivered == 0:   # before the first output: an HTTP error
                raise self._map_error(exc) from None
            raise exc
        if self._pump_task.cancelled():
            raise GenerationFailed("the generation was cancelled")

    async def events(self) -> AsyncIterator[Any]:
        m = self.ctx.metrics
        parser = self.parser
        started = False
        t_last = None
        try:
            async for out in self._outputs():
                now = time.monotonic()
                if not started:
                    started = True
                    m.ttft.observe(now - self.t_start)
                    yield Started(out)
                elif t_last is not None:
                    m.itl.observe(now - t_last)
                t_last = now
                comp = out.outputs[0]
                failed = out.finished and comp.finish_reason in ("error", "abort")
                # (a failed output carries no text of its own; merged with earlier outputs it
                # carries theirs, which was generated before the failure and is sent first)
                if parser is not None:
                    evs = parser.feed(comp.new_text) if comp.new_text else []
                    if out.finished and not failed:
                        evs += parser.finish()
                    for ev in evs:
                        yield ev
                elif comp.new_text:
                    yield TextEvent(comp.new_text)
                if failed:
                    m.requests_failed.inc()
                    raise GenerationFailed(out.error or f"request {comp.finish_reason}ed by the engine")
                if out.finished:
                    m.observe_finished(out, now - self.t_start)
                    self.billed = True
                    self.cost = self.ctx.bill(self.request_id, out, self.breakpoints)
                    if self.ctx.speculative and out.metrics is not None:
                        self.spec_tokens = (out.metrics.num_spec_proposed_tokens,
                                            out.metrics.num_spec_accepted_tokens)
                    yield Finished(out, self.cost)
                    return
        finally:
            await self.close()
