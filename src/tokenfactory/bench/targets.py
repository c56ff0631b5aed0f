"""What the load generator talks to: a URL, our own server started for the run, or `naive`.

Every target answers `request(session, messages, max_tokens, rec, clock)` by filling a
RequestRecord. Only loopback addresses are accepted: the benchmark never leaves this machine.
HTTP targets also offer `spec_counters()`: the server's speculative-decoding counters from
/metrics (`tokenfactory_spec_decode_*`), read before and after a run so the report can show the
run's acceptance rate and mean accepted length (`spec_summary`).
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

from tokenfactory.bench import client
from tokenfactory.bench.client import RequestRecord
from tokenfactory.bench.workloads import Session

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
SPEC_PREFIX = "tokenfactory_spec_decode_"


def parse_spec_counters(text: str) -> dict[str, float]:
    """Every ``tokenfactory_spec_decode_*`` counter in a Prometheus text exposition, summed over
    its labels (proposers), keyed by the name without prefix and ``_total``:
    e.g. {"num_drafts": 12, "num_draft_tokens": 60, "num_accepted_tokens": 41}."""
    from prometheus_client.parser import text_string_to_metric_families
    out: dict[str, float] = {}
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError:
        return out
    for family in families:
        if not family.name.startswith(SPEC_PREFIX) or family.type not in ("counter", "untyped", "unknown"):
            continue
        key = family.name[len(SPEC_PREFIX):].removesuffix("_total")
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            out[key] = out.get(key, 0.0) + float(sample.value)
    return out


def spec_summary(before: dict[str, float], after: dict[str, float]) -> dict:
    """A run's speculation figures from counters read before and after it; {} when the server
    reports none. acceptance_rate = accepted / proposed tokens; mean_accepted_length = tokens
    per verification step = 1 + accepted / drafts (vLLM's definition)."""
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    drafts, proposed = delta.get("num_drafts", 0.0), delta.get("num_draft_tokens", 0.0)
    accepted = delta.get("num_accepted_tokens", 0.0)
    if not delta or (not drafts and not proposed):
        return {}
    return {"num_drafts": drafts, "num_draft_tokens": proposed, "num_accepted_tokens": accepted,
            "acceptance_rate": accepted / proposed if proposed else None,
            "mean_accepted_length": 1 + accepted / drafts if drafts else None}


class TargetError(RuntimeError):
    """The target could not be started or reached; the message says why in one line."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HttpTarget:
    """Any Anthropic- or OpenAI-compatible server on loopback."""

    kind = "url"

    def __init__(self, url: str, api: str = "anthropic", model_name: str = "default",
                 timeout: float = 600.0, metrics_key: str | None = None):
        host = urlparse(url).hostname or ""
        if host not in LOOPBACK:
            raise TargetError(f"refusing {url}: the benchmark only talks to loopback (127.0.0.1/localhost)")
        if api not in ("anthropic", "openai"):
            raise TargetError(f"--api must be anthropic or openai, got {api!r}")
        self.url, self.api, self.model_name, self.timeout = url.rstrip("/"), api, model_name, timeout
        self.metrics_key = metrics_key
        self._client: httpx.AsyncClient | None = None

    @property
    def name(self) -> str:
        return self.url

    async def start(self) -> None:
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout, connect=10.0),
                                         limits=limits, trust_env=False)

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def spec_counters(self) -> dict[str, float]:
        """The server's speculative-decoding counters now ({} if /metrics has none or fails)."""
        headers = {"authorization": f"Bearer {self.metrics_key}"} if self.metrics_key else {}
        try:
            r = await self._client.get(self.url + "/metrics", headers=headers, timeout=10.0)
        except httpx.HTTPError:
            return {}
        return parse_spec_counters(r.text) if r.status_code == 200 else {}

    async def request(self, session: Session, messages: list[dict], max_tokens: int,
                      rec: RequestRecord, clock) -> None:
        build = client.anthropic_body if self.api == "anthropic" else client.openai_body
        body = build(self.model_name, session, messages, max_tokens)
        await client.send(self._client, self.url, self.api, body, rec, clock)


class SelfTarget(HttpTarget):
    """`tokenfactory serve` started on a free loopback port for the run and stopped after."""

    kind = "self"

    def __init__(self, model_dir: str, api: str = "anthropic", server_args: list[str] | None = None,
                 startup_timeout: float = 300.0):
        self.port = free_port()
        super().__init__(f"http://127.0.0.1:{self.port}", api, model_name=Path(model_dir).name)
        self.model_dir = model_dir
        self.server_args = list(server_args or [])
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(tempfile.mkdtemp(prefix="tokenfactory-bench-")) / "server.log"

    @property
    def name(self) -> str:
        return "tokenfactory"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "tokenfactory.cli", "serve", "--host", "127.0.0.1",
                "--port", str(self.port), "--model", self.model_dir, *self.server_args]

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    async def start(self) -> None:
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        await super().start()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                await self.stop()
                raise TargetError(f"tokenfactory serve exited with status {self.proc.returncode} "
                                  f"before /health answered; last log lines:\n{self.log_tail()}")
            try:
                r = await self._client.get(self.url + "/health", timeout=2.0)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
        await self.stop()
        raise TargetError(f"tokenfactory serve did not answer /health within {self.startup_timeout:.0f} s; "
                          f"log: {self.log_path}\n{self.log_tail()}")

    async def stop(self) -> None:
        await super().stop()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, 20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)
        self.proc = None


class NaiveTarget:
    """The "no serving stack" reference: plain `transformers` generation, one request at a time,
    the whole prompt recomputed every request (no KV reuse between requests, no batching)."""

    kind = "naive"
    api = "neutral"

    def __init__(self, model_dir: str, dtype: str | None = None, threads: int | None = None):
        self.model_dir, self.dtype, self.threads = model_dir, dtype, threads
        self.model = self.tokenizer = None
        self._lock = asyncio.Lock()

    @property
    def name(self) -> str:
        return "naive"

    async def start(self) -> None:
        try:
            import torch
            import transformers
        except ImportError as exc:
            raise TargetError("--target naive needs the `transformers` package "
                              f"(pip install 'tokenfactory[test]'): {exc}") from None
        if self.threads:
            torch.set_num_threads(self.threads)
        dtype = getattr(torch, self.dtype) if self.dtype else "auto"
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.model_dir)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype)
        self.model.eval()

    async def stop(self) -> None:
        self.model = self.tokenizer = None

    async def request(self, session: Session, messages: list[dict], max_tokens: int,
                      rec: RequestRecord, clock) -> None:
        chat = [{"role": "system", "content": session.system}] + messages
        tools = [{"type": "function", "function": t} for t in session.tools] or None
        async with self._lock:                      # one generate() at a time: no batching
            try:
                await asyncio.to_thread(self._generate, chat, tools, max_tokens, rec, clock)
            except Exception as exc:                # noqa: BLE001 - a failed request is a data point
                rec.error = f"{type(exc).__name__}: {exc}"

    def _generate(self, chat, tools, max_tokens, rec, clock) -> None:
        import torch
        from transformers.generation.streamers import BaseStreamer

        ids = self.tokenizer.apply_chat_template(chat, tools=tools, add_generation_prompt=True,
                                                 tokenize=True, return_dict=True, return_tensors="pt")
        input_ids = ids["input_ids"]

        class Timer(BaseStreamer):
            first_put = True

            def put(self, value):
                if self.first_put:                  # generate() first hands over the prompt
                    self.first_put = False
                    return
                rec.chunk_times.append(clock())

            def end(self):
                pass

        rec.t_send = clock() if rec.t_send is None else rec.t_send
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=ids["attention_mask"],
                                      max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                      do_sample=False, streamer=Timer(), pad_token_id=self.tokenizer.eos_token_id)
        new = out[0, input_ids.shape[1]:]
        rec.t_end = clock()
        rec.t_first = rec.chunk_times[0] if rec.chunk_times else None
        rec.prompt_tokens = int(input_ids.shape[1])
        rec.cached_tokens = 0
        rec.output_tokens = int(new.shape[0])
        rec.text = self.tokenizer.decode(new, skip_special_tokens=True)
        rec.ok = rec.t_first is not None
        if not rec.ok:
            rec.error = "no tokens generated"
