"""Connection-level defences that sit below the ASGI app (issue 13, item 5).

uvicorn's h11 protocol holds a connection that never finishes its request head for as long as
the client likes (its keep-alive timer starts only after a response, and any byte cancels it),
and it accepts connections until the process runs out of file descriptors. An unauthenticated
client could therefore pin every descriptor with idle or trickling sockets: ``/health`` then
timed out, and asyncio logged a traceback for every failed ``accept`` (77 MB of log in ~10 s).

``guarded_h11_protocol(limits)`` builds an ``H11Protocol`` subclass (``uvicorn.Config(http=...)``)
that adds, per server:

* a **head deadline**: a connection must deliver a complete request head within
  ``header_timeout`` seconds of being opened, or of its previous response completing (so a
  request body the app never read has to finish arriving by then too). Trickling bytes does not
  extend it. On expiry the connection is closed (with a 408 if part of a head had arrived);
* a **connection cap**: beyond ``max_connections`` open connections, the oldest connection that
  is waiting for a request head (idle, trickling, or kept alive between requests) is closed to
  make room, so a flood of idle sockets cannot lock out a client that sends its request at once
  (``/health`` keeps answering). Only when every connection is busy with a request does a new
  one get an immediate 503 (``retry-after: 1``) and a close.

Also here: ``raise_fd_limit`` (the soft descriptor limit to the hard one, at start-up) and
``quiet_repeats`` (a log filter that lets one of each repeated message through per interval,
with a count of what it held back, so an attack cannot turn into gigabytes of log).
"""
from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import h11

log = logging.getLogger("tokenfactory.api")


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 1024      # open HTTP connections (each costs one descriptor)
    header_timeout: float = 10.0     # seconds to deliver a request head (see module docstring)


_FULL_BODY = json.dumps({"type": "error", "error": {
    "type": "overloaded_error",
    "message": "too many open connections; retry later"}}).encode()
_FULL = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
         b"retry-after: 1\r\nconnection: close\r\ncontent-length: "
         + str(len(_FULL_BODY)).encode() + b"\r\n\r\n" + _FULL_BODY)
_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n"
            b"connection: close\r\n\r\n")


def guarded_h11_protocol(limits: ConnectionLimits) -> type:
    """An ``H11Protocol`` subclass enforcing ``limits``; build one per server (the class holds
    that server's table of connections)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    live: set = set()                    # open connections (not yet evicted or lost)
    waiting: OrderedDict = OrderedDict()   # connections waiting for a request head, oldest first
    stats = {"evicted": 0, "refused": 0, "head_timeouts": 0}   # counts, for /metrics

    class GuardedH11Protocol(H11Protocol):
        _head_timer = None
        _waited_cycle = None
        _head_bytes = 0

        # ---- lifecycle
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            live.add(self)
            if len(live) > limits.max_connections:
                victim = next((c for c in waiting if c is not self), None)
                if victim is None:       # every other connection is busy with a request
                    stats["refused"] += 1
                    self._drop(_FULL)
                    return
                stats["evicted"] += 1
                victim._drop(None)
            self._await_head()

        def connection_lost(self, exc) -> None:
            self._stop_waiting()
            live.discard(self)
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            if not self.transport.is_closing():
                self._await_head()       # before super(): it may parse a pipelined head
            super().on_response_complete()

        # ---- the head deadline
        def data_received(self, data: bytes) -> None:
            if self._head_timer is not None:
                self._head_bytes += len(data)
            super().data_received(data)

        def handle_events(self) -> None:
            super().handle_events()
            if self._head_timer is not None and self.cycle is not self._waited_cycle:
                self._stop_waiting()     # uvicorn made a new request cycle: the head is in

        def _await_head(self) -> None:
            self._stop_waiting()
            self._waited_cycle = self.cycle
            self._head_bytes = 0
            self._head_timer = self.loop.call_later(limits.header_timeout, self._head_expired)
            waiting[self] = None

        def _stop_waiting(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            waiting.pop(self, None)

        def _head_expired(self) -> None:
            self._head_timer = None
            stats["head_timeouts"] += 1
            partial_head = self._head_bytes > 0 and self.conn.their_state is h11.IDLE
            self._drop(_TIMEOUT if partial_head else None)

        def _drop(self, reply: bytes | None) -> None:
            """Close this connection now (after ``reply``, raw bytes, if given)."""
            self._stop_waiting()
            live.discard(self)
            if self.transport.is_closing():
                return
            if reply is not None:
                self.transport.write(reply)
            self.transport.close()

    GuardedH11Protocol.limits = limits
    GuardedH11Protocol.live = live
    GuardedH11Protocol.stats = stats
    return GuardedH11Protocol


def raise_fd_limit() -> int:
    """Raise the soft limit on open descriptors to the hard limit; returns the new soft limit
    (0 where the platform has no such limit)."""
    try:
        import resource
    except ImportError:
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    inf = resource.RLIM_INFINITY
    if soft != inf and (hard == inf or soft < hard):
        target = hard if hard != inf else max(soft, 1 << 16)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft if soft != inf else 1 << 20


FD_RESERVE = 128   # descriptors kept for the model file, threads' pipes, logs and the listener


def connection_budget(requested: int, fd_limit: int) -> tuple[int, int]:
    """(max_connections, listen backlog) that fit in ``fd_limit`` descriptors.

    asyncio accepts up to ``backlog`` connections per loop iteration before any of them runs
    ``connection_made`` (where the cap evicts), and a closed socket's descriptor is released
    an iteration later, so the transient peak is about max_connections + backlog. A backlog of
    a quarter of the cap also keeps a well-behaved client's fresh connection from being
    evicted before its first bytes are read (it would need the cap's worth of younger idle
    connections within one or two iterations)."""
    def backlog_for(cap: int) -> int:
        return max(16, min(2048, cap // 4))
    cap = max(1, requested)
    budget = fd_limit - FD_RESERVE if fd_limit else 0
    if budget > 0 and cap + backlog_for(cap) > budget:
        cap = max(1, budget * 4 // 5)
    return cap, backlog_for(cap)


class RepeatFilter(logging.Filter):
    """Lets the first record of each kind through, then at most one per ``interval`` seconds,
    noting how many were held back. A kind is the logger plus the first line of the message
    (and the exception type): asyncio's "socket.accept() out of system resource", uvicorn's
    "Invalid HTTP request received.", "Task exception was never retrieved", ..."""

    def __init__(self, interval: float = 10.0, clock=time.monotonic, max_kinds: int = 1024):
        super().__init__()
        self.interval = interval
        self.clock = clock
        self.max_kinds = max_kinds
        self._kinds: dict[tuple, list] = {}     # kind -> [time let through, held back since]

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            first = str(record.msg).split("\n", 1)[0][:200]
        except Exception:  # noqa: BLE001 - a filter must never raise
            return True
        exc = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        kind = (record.name, record.levelno, first, exc)
        now = self.clock()
        seen = self._kinds.get(kind)
        if seen is not None and now - seen[0] < self.interval:
            seen[1] += 1
            return False
        if seen is not None and seen[1]:
            record.msg = f"{record.msg}\n({seen[1]} similar messages suppressed in the last " \
                         f"{now - seen[0]:.0f} s)"
        if len(self._kinds) >= self.max_kinds and kind not in self._kinds:
            self._kinds.clear()
        self._kinds[kind] = [now, 0]
        return True


def quiet_repeats(names=("asyncio", "uvicorn.error", "tokenfactory.api"),
                  interval: float = 10.0) -> RepeatFilter:
    """Install one RepeatFilter on each named logger (after uvicorn configured logging)."""
    flt = RepeatFilter(interval)
    for name in names:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, RepeatFilter)]:
            logger.removeFilter(old)
        logger.addFilter(flt)
    return flt


def uvicorn_config(app, *, host: str, port: int, limits: ConnectionLimits = ConnectionLimits(),
                   **kwargs):
    """A ``uvicorn.Config`` serving ``app`` over the guarded h11 protocol. WebSocket upgrades
    are off (``ws="none"``): the API has none, and an upgraded connection would leave the
    protocol's head deadline and connection table."""
    import uvicorn
    kwargs.setdefault("ws", "none")
    return uvicorn.Config(app, host=host, port=port, http=guarded_h11_protocol(limits), **kwargs)
