"""The attacks of issue 13 replayed against `tokenfactory serve` on the real default model
(SmolLM2-135M-Instruct GGUF) with two tenants, A (attacker) and B (victim).

Each attack reports what the attacker got and what it did to B or to /health. Front-door
attacks (connection floods, slowloris, large bodies) are in front_door_attacks.py.

    .venv/bin/python benchmarks/issue13_attacks.py [--src DIR] [--only NAME ...]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
KEY_A, KEY_B = "sk-tenant-a-1111", "sk-tenant-b-2222"
HA = {"x-api-key": KEY_A, "anthropic-version": "2023-06-01"}
HB = {"x-api-key": KEY_B, "anthropic-version": "2023-06-01"}
MODEL = {"name": "x"}   # the served name, read from /v1/models once the server is up
B_PROMPT = "Write a long story about a lighthouse keeper and the sea."


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, src: Path, args: list[str]):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkdtemp()) / "serve.log"
        self._log = open(self.log_path, "w")
        env = {**os.environ, "PYTHONPATH": str(src), "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "tokenfactory.cli", "serve", "--port", str(self.port),
               "--api-key", f"{KEY_A}:A", "--api-key", f"{KEY_B}:B", *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     cwd=tempfile.gettempdir())
        deadline = time.monotonic() + 600
        while True:
            assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.5)
        MODEL["name"] = httpx.get(self.base + "/v1/models", headers=HA,
                                  timeout=30).json()["data"][0]["id"]

    def rss_mib(self) -> float:
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def b_stream(base: str, max_tokens: int = 250) -> dict:
    """B's greedy stream: (text, number of events, whether it ended cleanly, seconds)."""
    body = {"model": MODEL["name"], "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": B_PROMPT}]}
    t0 = time.monotonic()
    text, error, stop = [], None, None
    with httpx.stream("POST", base + "/v1/messages", json=body, headers=HB, timeout=600) as r:
        event = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data = json.loads(line[5:])
                if event == "content_block_delta":
                    text.append(data["delta"].get("text", ""))
                elif event == "error":
                    error = data["error"]["message"]
                elif event == "message_delta":
                    stop = data["delta"]["stop_reason"]
    return {"text": "".join(text), "error": error, "stop_reason": stop,
            "seconds": round(time.monotonic() - t0, 2)}


class Loop:
    """Run ``fn`` repeatedly in a thread until stopped; collect what it returns."""

    def __init__(self, fn, threads: int = 1):
        self.fn, self.results = fn, []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                self.results.append(self.fn())
            except Exception as exc:  # noqa: BLE001 - recorded
                self.results.append(type(exc).__name__)

    def stop(self) -> dict:
        self._stop.set()
        for t in self._threads:
            t.join(600)
        counts: dict[str, int] = {}
        for r in self.results:
            counts[str(r)] = counts.get(str(r), 0) + 1
        return counts


def hostile_sampling(srv: Server, solo: dict) -> dict:
    out = {}
    for name, extra in {"benign_control": {"top_k": 40},
                        "top_k_1e20": {"top_k": 10**20}, "top_k_2e63": {"top_k": 2**63},
                        "temperature_1e-300": {"temperature": 1e-300},
                        "rep_penalty_1e-300": {"repetition_penalty": 1e-300}}.items():
        def attack(extra=extra):
            path = "/v1/messages" if "repetition_penalty" not in extra else "/v1/chat/completions"
            r = httpx.post(srv.base + path, headers=HA, timeout=120, json={
                "model": MODEL["name"], "max_tokens": 4,
                "messages": [{"role": "user", "content": "hi"}],
                **extra})
            return r.status_code
        loop = Loop(attack)
        victim = b_stream(srv.base)
        out[name] = {"attacker_statuses": loop.stop(),
                     "b_complete": victim["error"] is None and victim["stop_reason"] is not None,
                     "b_text_equals_solo": victim["text"] == solo["text"],
                     "b_seconds": victim["seconds"]}
    return out


def huge_prompt(srv: Server) -> dict:
    out = {}
    big = "lighthouse " * (30 * 2**20 // 11)   # ~30 MB
    for path, body in [("/v1/completions", {"model": MODEL["name"], "max_tokens": 4,
                                            "prompt": big}),
                       ("/v1/messages", {"model": MODEL["name"], "max_tokens": 4,
                                         "messages": [{"role": "user", "content": big}]})]:
        probes: list[float] = []
        stop = threading.Event()

        def probe():
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    httpx.get(srv.base + "/health", timeout=120)
                    probes.append(time.monotonic() - t0)
                except httpx.HTTPError:
                    probes.append(float("inf"))
                stop.wait(0.1)
        th = threading.Thread(target=probe, daemon=True)
        rss0 = srv.rss_mib()
        peak = [rss0]
        th.start()
        watcher_stop = threading.Event()

        def watch():
            while not watcher_stop.is_set():
                peak[0] = max(peak[0], srv.rss_mib())
                watcher_stop.wait(0.05)
        w = threading.Thread(target=watch, daemon=True)
        w.start()
        t0 = time.monotonic()
        r = httpx.post(srv.base + path, headers=HA, json=body, timeout=600)
        elapsed = time.monotonic() - t0
        stop.set()
        watcher_stop.set()
        th.join(130)
        w.join(5)
        out[path] = {"status": r.status_code, "seconds": round(elapsed, 2),
                     "health_max_ms": round(max(probes) * 1000, 1) if probes else None,
                     "health_probes": len(probes), "rss_peak_extra_mib": round(peak[0] - rss0)}
    return out


def stop_ids(srv: Server, baseline: dict) -> dict:
    body = json.dumps({"model": MODEL["name"], "max_tokens": 4,
                       "stop_token_ids": list(range(1_000_000)),
                       "messages": [{"role": "user", "content": "hi"}]}).encode()

    def attack():   # the body is encoded once: the attacker's CPU is not the victim's
        r = httpx.post(srv.base + "/v1/chat/completions", timeout=600, content=body,
                       headers={**HA, "content-type": "application/json"})
        return r.status_code
    loop = Loop(attack)
    victim = b_stream(srv.base)
    return {"attacker_statuses": loop.stop(), "b_seconds": victim["seconds"],
            "b_seconds_alone": baseline["seconds"], "b_text_equals_solo":
            victim["text"] == baseline["text"]}


def greedy_tenant(src: Path, seconds: float = 30.0) -> dict:
    srv = Server(src, ["--max-queued-requests", "4", "--max-queued-requests-per-tenant", "2"])
    try:
        stop = threading.Event()
        a: list[int] = []

        def flood():
            with httpx.Client(base_url=srv.base, timeout=600) as c:
                while not stop.is_set():
                    r = c.post("/v1/messages", headers=HA, json={
                        "model": MODEL["name"], "max_tokens": 16, "messages": [
                            {"role": "user", "content": "tell me a joke"}]})
                    a.append(r.status_code)
        threads = [threading.Thread(target=flood, daemon=True) for _ in range(8)]
        for t in threads:
            t.start()
        b: list[int] = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            r = httpx.post(srv.base + "/v1/messages", headers=HB, timeout=600, json={
                "model": MODEL["name"], "max_tokens": 16,
                "messages": [{"role": "user", "content": "tell me a joke"}]})
            b.append(r.status_code)
            if r.status_code != 200:
                time.sleep(float(r.headers.get("retry-after", "1")))
        stop.set()
        for t in threads:
            t.join(600)
        return {"seconds": seconds, "a_200": a.count(200), "a_529": a.count(529),
                "b_attempts": len(b), "b_200": b.count(200)}
    finally:
        srv.stop()


def surrogates_and_minor(srv: Server) -> dict:
    out = {}
    raw = b'{"model": "\\ud800x", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}'
    for stream in (False, True):
        body = raw if not stream else raw.replace(b'"max_tokens"', b'"stream": true, "max_tokens"')
        r = httpx.post(srv.base + "/v1/messages", content=body, timeout=120,
                       headers={**HA, "content-type": "application/json"})
        out[f"lone_surrogate_model_stream_{stream}"] = r.status_code
    out["head_health"] = httpx.head(srv.base + "/health", timeout=30).status_code
    r = httpx.post(srv.base + "/v1/messages", timeout=120, json={
        "model": MODEL["name"], "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-api-key": "", "authorization": f"Bearer {KEY_B}"})
    out["empty_x_api_key_with_bearer"] = r.status_code
    out["metrics_without_key"] = httpx.get(srv.base + "/metrics", timeout=30).status_code
    out["metrics_with_tenant_key"] = httpx.get(srv.base + "/metrics", headers=HB,
                                               timeout=30).status_code
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", type=Path, default=ROOT / "src")
    p.add_argument("--dtype", default=None, help="serve --dtype (float32: greedy text does not "
                   "depend on batch composition, so B's text can be compared with its solo run)")
    p.add_argument("--only", action="append",
                   choices=["sampling", "prompt", "stop_ids", "tenant", "minor"])
    a = p.parse_args()
    todo = a.only or ["sampling", "prompt", "stop_ids", "tenant", "minor"]
    results: dict = {"src": str(a.src), "dtype": a.dtype}
    if "tenant" in todo:
        results["tenant"] = greedy_tenant(a.src)
        print(json.dumps({"tenant": results["tenant"]}), flush=True)
    if set(todo) - {"tenant"}:
        srv = Server(a.src, ["--dtype", a.dtype] if a.dtype else [])
        try:
            solo = b_stream(srv.base)
            results["b_alone"] = {k: solo[k] for k in ("seconds", "stop_reason", "error")}
            print(json.dumps({"b_alone": results["b_alone"]}), flush=True)
            for name, fn in [("sampling", lambda: hostile_sampling(srv, solo)),
                             ("prompt", lambda: huge_prompt(srv)),
                             ("stop_ids", lambda: stop_ids(srv, solo)),
                             ("minor", lambda: surrogates_and_minor(srv))]:
                if name in todo:
                    results[name] = fn()
                    print(json.dumps({name: results[name]}), flush=True)
            results["server_alive"] = srv.proc.poll() is None
        finally:
            srv.stop()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
