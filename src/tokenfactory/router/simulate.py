"""The router at fleet scale, without hardware: N replicas, each a real ``EngineCore`` (real
scheduler, block pool, prefix cache) on ``economics.simulated.SimulatedExecutor`` (a roofline
clock instead of a model), fed a replayed agentic trace and routed by ``policy.choose_replica``
over a ``PrefixIndex`` kept from the replicas' KV events.

Time is discrete-event: each replica has its own simulated clock (the executor's step time plus
the idle time it waited for work); the driver always advances whichever comes first, the next
arrival or the replica furthest behind, so requests meet the fleet state of their arrival time.
Sessions are closed loops: turn k is sent ``think_time`` after turn k-1 finished.

Prompts are token-id lists: the agentic generator's text (bench/workloads.py) cut into word and
punctuation pieces, each mapped to a stable id (crc32), so no tokenizer is needed and a 1,000
session trace builds in seconds. Turn k's prompt extends turn k-1's (system, tools, then user /
scripted-assistant turns), as a chat template would render them.
"""
from __future__ import annotations

import heapq
import json
import random
import re
import zlib
from dataclasses import dataclass, field

from tokenfactory.router.index import ReplicaIndex
from tokenfactory.router.policy import (LoadBound, RecentLoad, ReplicaState, RoundRobin,
                                        choose_replica, request_block_hashes)

_PIECES = re.compile(r"\w+|[^\w\s]")


def text_to_ids(text: str, vocab_size: int = 32000) -> list[int]:
    """A stand-in tokenizer: word / punctuation pieces -> stable ids in [1, vocab_size)."""
    return [1 + zlib.crc32(p.encode()) % (vocab_size - 1) for p in _PIECES.findall(text)]


@dataclass
class SimTurn:
    new_ids: list[int]        # appended to the conversation before this turn is sent
    max_tokens: int
    think_time: float         # seconds after the previous turn finished


@dataclass
class SimSession:
    arrival: float
    turns: list[SimTurn]
    cache_salt: str | None = None
    shared_len: int = 0       # leading tokens shared with other sessions (system + tools)


def agentic_trace(num_sessions: int, *, groups: int = 8, turns: int = 10,
                  prefix_tokens: int = 2048, tool_min: int = 100, tool_max: int = 1000,
                  output_tokens: int = 32, think_time: float = 1.0, arrival_rate: float = 20.0,
                  seed: int = 0) -> list[SimSession]:
    """``num_sessions`` agentic sessions from ``groups`` agents (each its own system prompt and
    tool schemas, as bench.workloads.agentic makes them), arriving as a Poisson process of
    ``arrival_rate`` sessions per second in a shuffled group order."""
    from tokenfactory.bench.workloads import agentic

    per_group = -(-num_sessions // groups)
    sessions: list[SimSession] = []
    for g in range(groups):
        wl = agentic(seed=seed * 1000 + g, sessions=per_group, turns=turns,
                     prefix_tokens=prefix_tokens, tool_min=tool_min, tool_max=tool_max,
                     output_tokens=output_tokens, think_time=think_time)
        for s in wl.sessions:
            head = text_to_ids(s.system + "\n" + json.dumps(s.tools))
            sim_turns = []
            for k, t in enumerate(s.turns):
                ids = head if k == 0 else text_to_ids(t.assistant or "")
                sim_turns.append(SimTurn(ids + text_to_ids(t.user), t.max_tokens, t.think_time))
            sessions.append(SimSession(0.0, sim_turns, shared_len=len(head)))
    rng = random.Random(f"router-trace/{seed}")
    rng.shuffle(sessions)
    sessions = sessions[:num_sessions]
    t = 0.0
    for s in sessions:
        s.arrival = t
        t += rng.expovariate(arrival_rate)
    return sessions


def trace_hit_ceiling(sessions: list[SimSession], block_size: int = 16) -> float:
    """The best hit rate any routing could reach on this trace: every turn reuses all full
    blocks of the previous turn's prompt (the reply that follows it is re-rendered), every
    first turn those of its shared system prompt; a request always recomputes its last token."""
    prompt = cached = 0
    for s in sessions:
        n = prev = 0
        for k, t in enumerate(s.turns):
            n += len(t.new_ids)
            reusable = s.shared_len if k == 0 else prev
            prompt += n
            cached += min(reusable // block_size, (n - 1) // block_size) * block_size
            prev = n
    return cached / prompt if prompt else 0.0


@dataclass
class SimConfig:
    num_replicas: int = 64
    policy: str = "prefix"
    model: str = "llama-3-8b"
    hardware: str = "h100"
    block_size: int = 16
    num_kv_blocks: int = 28000           # per replica: 448k tokens, ~60 GB of llama-3-8b KV
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    bound: LoadBound = field(default_factory=LoadBound)
    recent_half_life: float = 5.0        # simulated seconds (policy.RecentLoad)


@dataclass
class SimResult:
    policy: str
    num_replicas: int
    num_sessions: int
    num_requests: int
    prompt_tokens: int
    cached_tokens: int
    requests_per_replica: list[int]
    makespan_seconds: float              # simulated time until the last request finished
    leaked_pages: int                    # pages still held by requests at the end (should be 0)

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def imbalance(self) -> float:
        """max / mean requests per replica (1.0 = perfectly even)."""
        mean = sum(self.requests_per_replica) / len(self.requests_per_replica)
        return max(self.requests_per_replica) / mean if mean else 0.0


class _Replica:
    """One simulated engine plus the router's view of it."""

    def __init__(self, config: SimConfig, model, hardware) -> None:
        from tokenfactory.economics.simulated import SimulatedExecutor
        from tokenfactory.engine.core import EngineConfig, EngineCore

        self.sim = SimulatedExecutor(model, hardware)
        self.idle = 0.0          # simulated seconds spent waiting for work
        self.core = EngineCore(
            self.sim, EngineConfig(num_kv_blocks=config.num_kv_blocks,
                                   block_size=config.block_size,
                                   max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens),
            model_max_len=1 << 20, eos_token_ids=(), clock=self.now)
        self.index = ReplicaIndex()
        self.core.kv.pool.subscribe(self.index.apply)
        self.state = ReplicaState(self.index, total_pages=config.num_kv_blocks)
        self.num_routed = 0

    def now(self) -> float:
        return self.idle + self.sim.now()

    def wait_until(self, t: float) -> None:
        if not self.core.has_unfinished_requests() and t > self.now():
            self.idle += t - self.now()


def simulate(sessions: list[SimSession], config: SimConfig) -> SimResult:
    """Replay ``sessions`` on ``config.num_replicas`` simulated engines routed by
    ``config.policy``; returns hit rate (cached / prompt tokens over all requests, as the
    engines report them) and requests per replica."""
    from tokenfactory.economics import load_hardware, load_model
    from tokenfactory.engine.sampling_params import SamplingParams

    model, hardware = load_model(config.model), load_hardware(config.hardware)
    replicas = [_Replica(config, model, hardware) for _ in range(config.num_replicas)]
    states = [r.state for r in replicas]
    rr = RoundRobin()
    recent = RecentLoad(len(replicas), config.recent_half_life)
    bs = config.block_size
    # per session: the conversation so far and the hashes of its full blocks (a turn's
    # prompt extends the previous one, so the hashes only ever grow)
    convo: list[list[int]] = [[] for _ in sessions]
    hashes: list[list[bytes]] = [[] for _ in sessions]
    owner: dict[str, tuple[int, int, int]] = {}       # request id -> (session, turn, replica)
    arrivals = [(s.arrival, i, 0) for i, s in enumerate(sessions)]
    heapq.heapify(arrivals)
    busy: list[tuple[float, int]] = []                # (replica clock, replica) with work
    prompt_tokens = cached_tokens = num_requests = 0
    end_time = 0.0

    while arrivals or busy:
        if arrivals and (not busy or arrivals[0][0] <= busy[0][0]):
            t, si, k = heapq.heappop(arrivals)
            sess = sessions[si]
            ids = convo[si]
            ids.extend(sess.turns[k].new_ids)
            hs = hashes[si]
            hs.extend(request_block_hashes(ids[len(hs) * bs:], bs, sess.cache_salt,
                                           parent=hs[-1] if hs else None))
            for i, (st, rep) in enumerate(zip(states, replicas)):
                st.free_pages = rep.core.kv.pool.num_free_blocks()
                st.recent = recent.get(i, t)
            ri = choose_replica(hs, states, config.policy, round_robin=rr, bound=config.bound)
            rep = replicas[ri]
            was_busy = rep.core.has_unfinished_requests()
            rep.wait_until(t)
            rid = f"s{si}-t{k}"
            rep.core.add_request(rid, list(ids), SamplingParams(
                max_tokens=sess.turns[k].max_tokens, ignore_eos=True), cache_salt=sess.cache_salt)
            owner[rid] = (si, k, ri)
            rep.state.queue_depth += 1
            rep.num_routed += 1
            recent.add(ri, t)
            num_requests += 1
            if not was_busy:
                heapq.heappush(busy, (rep.now(), ri))
            continue
        _, ri = heapq.heappop(busy)
        rep = replicas[ri]
        for out in rep.core.step():
            if not out.finished:
                continue
            si, k, _ = owner.pop(out.request_id)
            rep.state.queue_depth -= 1
            prompt_tokens += len(out.prompt_token_ids)
            cached_tokens += out.num_cached_tokens
            end_time = max(end_time, rep.now())
            if k + 1 < len(sessions[si].turns):
                heapq.heappush(arrivals, (rep.now() + sessions[si].turns[k + 1].think_time,
                                          si, k + 1))
        if rep.core.has_unfinished_requests():
            heapq.heappush(busy, (rep.now(), ri))

    leaked = sum(r.core.kv.num_blocks - r.core.kv.num_free_blocks() for r in replicas)
    return SimResult(config.policy, config.num_replicas, len(sessions), num_requests,
                     prompt_tokens, cached_tokens, [r.num_routed for r in replicas],
                     end_time, leaked)

