"""Fault injection for robustness tests: an executor wrapper, not a patched method.

``FaultyExecutor(inner, die_after_steps=N, step_delay=S)`` forwards everything to ``inner``;
every step with work first sleeps ``step_delay`` seconds (streams slow enough to be caught in
flight), and the step after ``die_after_steps`` steps raises :class:`ExecutorDeadError`, which
escapes ``EngineCore.step`` (the engine thread dies, as it would if a device were lost).
"""
from __future__ import annotations

import time
from typing import Any

from tokenfactory.engine.executor import ExecutorDeadError
from tokenfactory.engine.step import StepPlan, StepResult

__all__ = ["FaultyExecutor"]


class FaultyExecutor:
    def __init__(self, inner: Any, die_after_steps: int | None = None, step_delay: float = 0.0,
                 sleep=time.sleep):
        if die_after_steps is not None and die_after_steps < 0:
            raise ValueError(f"die_after_steps must be >= 0, got {die_after_steps}")
        if step_delay < 0:
            raise ValueError(f"step_delay must be >= 0, got {step_delay}")
        self.inner = inner
        self.die_after_steps = die_after_steps
        self.step_delay = step_delay
        self._sleep = sleep
        self.num_steps = 0    # steps handed to the inner executor

    # the engine reads these off its executor (the vocabulary check, the KV geometry)
    @property
    def model_config(self) -> Any:
        return getattr(self.inner, "model_config", None)

    def __getattr__(self, name: str) -> Any:
        # anything else an owner reads off the executor (decode_threads, max_model_len, ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def kv_cache_bytes_per_block(self, block_size: int) -> int:
        return self.inner.kv_cache_bytes_per_block(block_size)

    def initialize_cache(self, num_blocks: int, block_size: int) -> None:
        self.inner.initialize_cache(num_blocks, block_size)

    def execute(self, plan: StepPlan) -> StepResult:
        if self.die_after_steps is not None and self.num_steps >= self.die_after_steps:
            raise ExecutorDeadError(
                f"fault injection: engine thread killed after {self.die_after_steps} steps")
        if self.step_delay:
            self._sleep(self.step_delay)
        self.num_steps += 1
        return self.inner.execute(plan)
