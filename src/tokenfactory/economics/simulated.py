"""An executor that runs no model: it advances a clock by the roofline time of each batch.

It satisfies the engine's ``Executor`` protocol (``kv_cache_bytes_per_block``,
``initialize_cache``, ``execute``), so the real scheduler and KV manager can be driven at
datacenter scale on a laptop: "how would this trace behave on 8 x H100?" Token ids come from
``next_token(scheduled)`` (default: always ``fallback_token``; ``scheduled`` is the step plan's
``ScheduledRequest``: request id, output index, ...), so stop conditions still work.

Wiring with the engine: pass ``clock=sim.now`` to ``EngineCore`` so request timings are in
simulated seconds, and ``step_hook=ledger.record_step`` so the engine charges each step to its
requests (or give the ledger here instead — not both, or every step is charged twice).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

from .analytics import kv_bytes_per_token, kv_replication, roofline_step
from .catalog import HardwareSpec, ModelSpec
from .ledger import CostLedger


class SimulatedExecutor:
    def __init__(self, model: ModelSpec, hardware: HardwareSpec, *, tp: int = 1,
                 precision: str = "bf16", kv_dtype: Optional[str] = None,
                 fallback_token: int = 0,
                 next_token: Optional[Callable[[Any], int]] = None,
                 ledger: Optional[CostLedger] = None) -> None:
        self.model, self.hardware, self.tp = model, hardware, tp
        self.precision, self.kv_dtype = precision, kv_dtype or precision
        self.next_token = next_token or (lambda request: fallback_token)
        self.ledger = ledger
        self.clock_seconds = 0.0          # simulated time spent in steps so far
        self.num_steps = 0
        self.last_step = None             # StepEstimate of the most recent step

    def now(self) -> float:
        """The simulated clock, usable as ``EngineCore(clock=...)``."""
        return self.clock_seconds

    def kv_cache_bytes_per_block(self, block_size: int) -> int:
        """KV bytes of one page across the whole tensor-parallel group (replicas included)."""
        per_token = kv_bytes_per_token(self.model, self.kv_dtype) \
            * kv_replication(self.model, self.tp)
        return int(math.ceil(per_token * block_size))

    def initialize_cache(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size

    def execute(self, plan):
        """Advance the clock by the plan's roofline time; returns a ``StepResult``."""
        # Imported here so the economics package never depends on the engine at import time.
        from tokenfactory.engine.step import RequestStepOutput, StepResult

        chunks = plan.requests
        step = roofline_step(self.model, self.hardware, [c.num_tokens for c in chunks],
                             [c.start for c in chunks], self.tp, self.precision, self.kv_dtype)
        self.last_step = step
        self.clock_seconds += step.seconds
        self.num_steps += 1
        if self.ledger is not None:
            shares: dict[str, int] = {}
            for c in chunks:
                shares[c.request_id] = shares.get(c.request_id, 0) + c.num_tokens
            self.ledger.record_step(step.seconds, shares)
        return StepResult([RequestStepOutput(c.request_id, [self.next_token(c)] if c.sample else [])
                           for c in chunks])
