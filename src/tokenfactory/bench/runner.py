"""The load generator: sessions arrive on schedule, send their turns closed-loop, bounded by
count and time, with a progress bar."""
from __future__ import annotations

import asyncio
import time

from tokenfactory.bench.client import RequestRecord, neutral_messages
from tokenfactory.bench.workloads import Session, Workload


async def run_workload(workload: Workload, target, *, max_duration: float | None = None,
                       max_requests: int | None = None, progress: bool = True,
                       desc: str = "") -> tuple[list[RequestRecord], float]:
    """Run `workload` against a started target. Returns (records, wall-clock duration).

    No new request is sent after `max_duration` seconds or once `max_requests` were sent; requests
    in flight at the deadline are cancelled (they count as failed: "cut by --max-duration").
    """
    t0 = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - t0

    total = workload.num_requests if max_requests is None else min(max_requests, workload.num_requests)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, desc=desc or f"{workload.name} → {target.name}", unit="req", leave=False)
    records: list[RequestRecord] = []
    sent = 0
    limit = asyncio.Semaphore(workload.max_concurrency) if workload.max_concurrency > 0 else None

    def may_send() -> bool:
        if max_requests is not None and sent >= max_requests:
            return False
        return max_duration is None or clock() < max_duration

    async def run_session(session: Session) -> None:
        nonlocal sent
        await asyncio.sleep(max(0.0, session.arrival - clock()))
        if limit is not None:
            await limit.acquire()
        try:
            replies: list[str] = []
            for k, turn in enumerate(session.turns):
                if k > 0 and turn.think_time > 0:
                    await asyncio.sleep(turn.think_time)
                if not may_send():
                    return
                sent += 1
                rec = RequestRecord(session=session.id, turn=k, t_send=clock())
                records.append(rec)
                try:
                    await target.request(session, neutral_messages(session, k, replies),
                                         turn.max_tokens, rec, clock)
                except asyncio.CancelledError:
                    rec.error = "cut by --max-duration"
                    raise
                if bar is not None:
                    bar.update(1)
                if not rec.ok:
                    return                      # an agent cannot go on without an answer
                replies.append(rec.text)
        finally:
            if limit is not None:
                limit.release()

    tasks = [asyncio.create_task(run_session(s)) for s in workload.sessions]
    try:
        if max_duration is None:
            await asyncio.gather(*tasks)
        else:
            done, pending = await asyncio.wait(tasks, timeout=max_duration + 30.0)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    finally:
        if bar is not None:
            bar.close()
    ends = [r.t_end for r in records if r.t_end is not None]
    duration = max(ends) if ends else clock()
    return records, duration
