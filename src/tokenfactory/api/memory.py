"""Give freed heap memory back to the OS (glibc): a fixed trim threshold and a periodic
``malloc_trim``, set up by the server at start-up (``create_app``'s lifespan).

Each thread of the server allocates from its own glibc malloc arena: the event loop (the main
arena), the engine thread, and the threads that render chat templates and tokenize. The
engine thread allocates in bursts: when it runs ahead of the event loop, the RequestOutputs it
emits (each a snapshot of its request's whole token list and text) pile up until the loop takes
them, several MiB at a time. Once freed, glibc keeps that memory resident in two ways:

* at the top of the arena's heap: a heap is shrunk on ``free`` only when its free top exceeds
  the trim threshold, and glibc raises that threshold dynamically, up to 64 MiB, whenever a
  large mmapped block is freed (start-up work such as loading a model does that).
  ``malloc_trim`` does not shrink the top of a thread's (non-main) arena, so the
  engine thread kept the high-water mark of its largest burst for good: the one-off +8-12 MiB
  RSS step of the 10,000-request soak. ``mallopt(M_TRIM_THRESHOLD, 4 MiB)`` fixes the threshold
  (it also stops the dynamic adjustment, so the mmap threshold stays where glibc has learned it
  by then). Cost, measured on the demo model (batch 128, 4 MiB of logits per step): ~1,300
  more minor page faults per 48-token generate, no measurable change in time;
* in the middle of the heap (free chunks between live ones): only ``malloc_trim(0)`` gives those
  pages back (``madvise``). It runs in a worker thread at start-up and then every ``interval``
  seconds while requests come and go (one call took ~2 ms median in the soak server, 15-150 ms
  at worst per run on the shared 2-core machine; each arena is locked while it is walked); an
  idle server is left alone.

A leak is not hidden by either: only free memory is released. ``serve --malloc-trim-interval 0``
turns both off; where the C library is not glibc (musl, macOS) they do nothing.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
from typing import Callable

log = logging.getLogger("tokenfactory.api")


M_TRIM_THRESHOLD = -1   # mallopt parameter (malloc.h)


def set_trim_threshold(nbytes: int) -> bool:
    """Fix glibc's trim threshold at ``nbytes`` (``mallopt(M_TRIM_THRESHOLD)``); False where
    there is no glibc. This also stops the dynamic adjustment, so the mmap threshold stays at
    the value glibc has learned by then (large buffers keep coming from where they came from)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(M_TRIM_THRESHOLD, int(nbytes)) == 1


def find_malloc_trim() -> Callable[[], int] | None:
    """``malloc_trim(0)`` of the process's C library, or None where there is none."""
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return lambda: fn(0)


async def trim_periodically(interval: float, trim: Callable[[], int],
                            activity: Callable[[], int] | None = None) -> None:
    """Call ``trim`` in a worker thread at once (what start-up freed: model loading, tokenizer
    set-up) and then every ``interval`` seconds in which ``activity()`` changed (an idle server
    is left alone), until cancelled."""
    last: object = object()
    while True:
        now = activity() if activity is not None else None
        if activity is None or now != last:
            last = now
            try:
                await asyncio.to_thread(trim)
            except Exception:  # noqa: BLE001 - never take the server down over housekeeping
                log.exception("malloc_trim failed; not trying again")
                return
        await asyncio.sleep(interval)
