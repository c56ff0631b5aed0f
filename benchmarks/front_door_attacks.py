"""Front-door attacks on a real `tokenfactory serve` process (issue 13, item 5).

Starts the server (the demo model: what is measured here happens before any model work) with a
lowered descriptor limit so exhaustion is reachable, and runs, one after another:

* ``flood``: N idle TCP connections opened as fast as possible and held; /health is probed
  every 0.25 s meanwhile (5 s timeout per probe); the server's log growth, descriptors and RSS
  are read from /proc.
* ``slowloris``: M connections that each send a partial request head and one more header line
  per second; /health probed meanwhile; how long the server held the trickling connections.
* ``bigpost``: POST /health with content-length 31 MiB, sent in 64 KiB chunks while watching
  for the answer: bytes sent before the answer came, the time, and the server's RSS.

``--src DIR`` runs the server from another checkout's ``src`` (e.g. a ``git worktree`` at an
older commit) with this checkout's virtualenv, for before/after figures on the same machine.

    .venv/bin/python benchmarks/front_door_attacks.py [--src /tmp/before/src] [--fd-limit 4096]
        [--connections 5000] [--slow 500] [--seconds 10]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, src: Path, fd_limit: int, args: list[str]):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkdtemp()) / "serve.log"
        self._log = open(self.log_path, "w")
        env = {**os.environ, "PYTHONPATH": str(src), "PYTHONUNBUFFERED": "1"}

        def limit():
            resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))
        cmd = [sys.executable, "-m", "tokenfactory.cli", "serve", "--demo", "--port",
               str(self.port), "--max-model-len", "512", "--kv-cache-memory", "16M", *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=limit, cwd=tempfile.gettempdir())
        deadline = time.monotonic() + 300
        while True:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.3)

    def rss_mib(self) -> float:
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def log_bytes(self) -> int:
        return self.log_path.stat().st_size

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


class Prober:
    """GET /health every ``interval`` s on a fresh connection, in a thread."""

    def __init__(self, base: str, interval: float = 0.25, timeout: float = 5.0):
        self.base, self.interval, self.timeout = base, interval, timeout
        self.results: list[tuple[float, int | str]] = []   # (seconds, status or error)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                r = httpx.get(self.base + "/health", timeout=self.timeout,
                              headers={"connection": "close"})
                self.results.append((time.monotonic() - t0, r.status_code))
            except httpx.HTTPError as exc:
                self.results.append((time.monotonic() - t0, type(exc).__name__))
            self._stop.wait(self.interval)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(30)
        ok = [t for t, s in self.results if s == 200]
        other: dict[str, int] = {}
        for _, s in self.results:
            if s != 200:
                other[str(s)] = other.get(str(s), 0) + 1
        return {"probes": len(self.results), "ok": len(ok),
                "p50_ms": round(statistics.median(ok) * 1000, 1) if ok else None,
                "max_ms": round(max(ok) * 1000, 1) if ok else None, "failed": other}


def open_many(base: str, n: int, seconds: float) -> list[socket.socket]:
    host, port = base.removeprefix("http://").split(":")
    socks = []
    deadline = time.monotonic() + seconds
    while len(socks) < n and time.monotonic() < deadline:
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect_ex((host, int(port)))
        except OSError:
            s.close()
            break
        socks.append(s)
    return socks


def readable(sock: socket.socket) -> bool:
    poller = select.poll()      # (select() cannot take descriptors above 1023)
    poller.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
    return bool(poller.poll(0))


def count_closed(socks: list[socket.socket]) -> int:
    poller = select.poll()
    by_fd = {}
    for s in socks:
        poller.register(s, select.POLLIN | select.POLLHUP | select.POLLERR)
        by_fd[s.fileno()] = s
    closed = 0
    for fd, _ in poller.poll(0):
        try:
            if by_fd[fd].recv(65536) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    return closed


def flood(srv: Server, n: int, seconds: float) -> dict:
    log0, rss0 = srv.log_bytes(), srv.rss_mib()
    prober = Prober(srv.base)
    t0 = time.monotonic()
    socks = open_many(srv.base, n, seconds)
    opened = time.monotonic() - t0
    peak_fds = srv.fds()
    while time.monotonic() - t0 < seconds:
        time.sleep(0.5)
        peak_fds = max(peak_fds, srv.fds())
    probes = prober.stop()
    closed = count_closed(socks)
    out = {"connections_opened": len(socks), "open_seconds": round(opened, 2),
           "closed_by_server": closed, "server_fds_peak": peak_fds,
           "server_rss_mib": [round(rss0), round(srv.rss_mib())],
           "log_growth_bytes": srv.log_bytes() - log0, "health": probes}
    for s in socks:
        s.close()
    time.sleep(1)
    out["health_after"] = httpx.get(srv.base + "/health", timeout=30).status_code
    return out


def slowloris(srv: Server, n: int, seconds: float) -> dict:
    host, port = srv.base.removeprefix("http://").split(":")
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n")
        socks.append(s)
    prober = Prober(srv.base)
    t0 = time.monotonic()
    alive = list(socks)
    held = []   # seconds until the server closed each one
    while alive and time.monotonic() - t0 < seconds:
        time.sleep(1.0)
        still = []
        for s in alive:
            try:
                s.sendall(b"x-trickle: 1\r\n")
                if readable(s) and s.recv(65536) == b"":
                    raise ConnectionResetError
                still.append(s)
            except OSError:
                held.append(time.monotonic() - t0)
        alive = still
    probes = prober.stop()
    for s in socks:
        s.close()
    return {"connections": n, "still_open_after_s": [round(seconds), len(alive)],
            "closed_after_s_median": round(statistics.median(held), 1) if held else None,
            "health": probes}


def bigpost(srv: Server, size: int = 31 * 2**20) -> dict:
    host, port = srv.base.removeprefix("http://").split(":")
    rss0 = srv.rss_mib()
    s = socket.create_connection((host, int(port)), timeout=120)
    s.sendall(f"POST /health HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
              f"content-length: {size}\r\n\r\n".encode())
    chunk = b"x" * 65536
    sent, reply = 0, b""
    t0 = time.monotonic()
    while sent < size:
        if readable(s):
            reply = s.recv(65536)
            break
        try:
            sent += s.send(chunk[:size - sent])
        except OSError:
            break
    if not reply:
        s.settimeout(120)
        try:
            reply = s.recv(65536)
        except OSError as exc:
            reply = repr(exc).encode()
    elapsed = time.monotonic() - t0
    s.close()
    return {"declared_bytes": size, "sent_before_answer": sent,
            "answer": reply.split(b"\r\n", 1)[0].decode(errors="replace"),
            "seconds": round(elapsed, 3), "server_rss_mib": [round(rss0), round(srv.rss_mib())]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", type=Path, default=ROOT / "src")
    p.add_argument("--fd-limit", type=int, default=4096, help="the server's descriptor limit")
    p.add_argument("--connections", type=int, default=5000)
    p.add_argument("--slow", type=int, default=500)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--only", choices=["flood", "slowloris", "bigpost"], action="append")
    p.add_argument("server_args", nargs="*", help="extra serve flags (after --)")
    a = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results = {"src": str(a.src), "fd_limit": a.fd_limit}
    for attack in a.only or ["bigpost", "slowloris", "flood"]:
        srv = Server(a.src, a.fd_limit, a.server_args)   # a fresh server per attack
        try:
            if attack == "flood":
                results[attack] = flood(srv, a.connections, a.seconds)
            elif attack == "slowloris":
                results[attack] = slowloris(srv, a.slow, a.seconds * 2)
            else:
                results[attack] = bigpost(srv)
            results[attack]["server_alive"] = srv.proc.poll() is None
        finally:
            srv.stop()
        print(json.dumps({attack: results[attack]}), flush=True)


if __name__ == "__main__":
    main()
