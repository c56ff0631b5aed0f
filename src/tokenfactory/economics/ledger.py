"""Per-request cost accounting for the server, independent of the engine that runs the steps.

The engine reports each step it ran and how many tokens each request processed in it::

    ledger = CostLedger(cost_per_hour=2.50, watts=700, prices=ApiPrices(3.0, 15.0))
    ledger.record_step(0.042, {"req-1": 1, "req-2": 1, "req-3": 512})   # 2 decodes + a prefill
    cost = ledger.finish("req-3", TokenUsage(input_tokens=512, output_tokens=1))

A request's machine time is its token share of every step it took part in; dollars and joules
follow from ``cost_per_hour`` and ``watts``. The API-price view prices its usage the way the
Anthropic API bills it (cache writes 1.25x / 2x, cache reads 0.1x of the base input price).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Mapping, Optional


@dataclass(frozen=True)
class ApiPrices:
    input_per_million: float = 3.0
    output_per_million: float = 15.0
    cache_write_5m_multiplier: float = 1.25
    cache_write_1h_multiplier: float = 2.0
    cache_read_multiplier: float = 0.1


@dataclass(frozen=True)
class TokenUsage:
    """Anthropic-style usage: ``input_tokens`` excludes the cache-read and cache-write ones."""
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0


def api_price(usage: TokenUsage, prices: ApiPrices) -> float:
    """What the usage would cost at the given list prices, in dollars."""
    input_units = (usage.input_tokens
                   + usage.cache_write_5m_tokens * prices.cache_write_5m_multiplier
                   + usage.cache_write_1h_tokens * prices.cache_write_1h_multiplier
                   + usage.cache_read_tokens * prices.cache_read_multiplier)
    return (input_units * prices.input_per_million
            + usage.output_tokens * prices.output_per_million) / 1e6


@dataclass(frozen=True)
class RequestCost:
    request_id: str
    machine_seconds: float       # this request's share of accelerator time
    dollars: float               # machine_seconds at cost_per_hour
    joules: float                # machine_seconds at watts
    tokens_processed: int        # tokens it contributed to steps (prefill + decode)
    steps: int
    usage: TokenUsage
    api_dollars: float           # list-price view of ``usage``

    def headers(self, prefix: str = "x-tokenfactory-") -> dict[str, str]:
        """HTTP response headers (extra headers do not disturb the official SDKs)."""
        return {
            f"{prefix}machine-seconds": f"{self.machine_seconds:.6f}",
            f"{prefix}cost-usd": f"{self.dollars:.8f}",
            f"{prefix}energy-joules": f"{self.joules:.3f}",
            f"{prefix}api-price-usd": f"{self.api_dollars:.8f}",
        }

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LedgerTotals:
    """Monotonic counters, suitable for Prometheus ``*_total`` metrics."""
    steps: int
    busy_seconds: float          # steps that processed at least one token
    idle_seconds: float          # steps recorded with no tokens (not charged to anyone)
    machine_seconds: float       # attributed to requests (== busy_seconds)
    dollars: float               # attributed machine_seconds at cost_per_hour
    joules: float                # attributed machine_seconds at watts
    tokens_processed: int
    requests_finished: int
    api_dollars: float           # summed over finished requests


@dataclass
class _Open:
    machine_seconds: float = 0.0
    tokens: int = 0
    steps: int = 0


class CostLedger:
    def __init__(self, cost_per_hour: float, watts: float,
                 prices: Optional[ApiPrices] = None) -> None:
        if cost_per_hour < 0 or watts < 0:
            raise ValueError("cost_per_hour and watts must be >= 0")
        self.cost_per_hour = float(cost_per_hour)
        self.watts = float(watts)
        self.prices = prices or ApiPrices()
        self._lock = threading.Lock()
        self._open: dict[str, _Open] = {}
        self._steps = 0
        self._busy = 0.0
        self._idle = 0.0
        self._tokens = 0
        self._finished = 0
        self._api_dollars = 0.0
        # Recently closed ids: a step already in flight when a request was closed (a client
        # that disconnected mid-step) must not re-open an entry nobody will close. Its time
        # still counts in the totals.
        self._closed: OrderedDict[str, None] = OrderedDict()
        self._max_closed = 4096

    def record_step(self, step_seconds: float, tokens_by_request: Mapping[str, int]) -> None:
        """Split one step's wall time across the requests in it, by tokens processed."""
        if step_seconds < 0:
            raise ValueError("step_seconds must be >= 0")
        if any(n < 0 for n in tokens_by_request.values()):
            raise ValueError("token counts must be >= 0")
        total = sum(tokens_by_request.values())
        with self._lock:
            self._steps += 1
            if total == 0:
                self._idle += step_seconds
                return
            self._busy += step_seconds
            self._tokens += total
            for request_id, n in tokens_by_request.items():
                if n == 0 or request_id in self._closed:
                    continue
                entry = self._open.setdefault(request_id, _Open())
                entry.machine_seconds += step_seconds * n / total
                entry.tokens += n
                entry.steps += 1

    def peek(self, request_id: str) -> float:
        """Machine seconds charged so far to an unfinished request (0 if unknown)."""
        with self._lock:
            entry = self._open.get(request_id)
            return entry.machine_seconds if entry else 0.0

    def finish(self, request_id: str, usage: Optional[TokenUsage] = None) -> RequestCost:
        """Close a request and return its bill. A request that never ran costs zero."""
        usage = usage or TokenUsage()
        with self._lock:
            entry = self._open.pop(request_id, None) or _Open()
            self._closed[request_id] = None
            if len(self._closed) > self._max_closed:
                self._closed.popitem(last=False)
            api = api_price(usage, self.prices)
            self._finished += 1
            self._api_dollars += api
        return RequestCost(
            request_id=request_id, machine_seconds=entry.machine_seconds,
            dollars=entry.machine_seconds * self.cost_per_hour / 3600.0,
            joules=entry.machine_seconds * self.watts, tokens_processed=entry.tokens,
            steps=entry.steps, usage=usage, api_dollars=api)

    def num_open(self) -> int:
        """Requests charged but not yet finished (for leak checks)."""
        with self._lock:
            return len(self._open)

    def totals(self) -> LedgerTotals:
        with self._lock:
            return LedgerTotals(
                steps=self._steps, busy_seconds=self._busy, idle_seconds=self._idle,
                machine_seconds=self._busy, dollars=self._busy * self.cost_per_hour / 3600.0,
                joules=self._busy * self.watts, tokens_processed=self._tokens,
                requests_finished=self._finished, api_dollars=self._api_dollars)
