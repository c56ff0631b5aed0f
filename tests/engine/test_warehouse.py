"""The token warehouse end to end on the real PyTorch executor (issue 18).

A tiny random Llama runs with a deliberately small RAM pool, so a prefix is evicted by later
requests; the warehouse must then supply it: greedy output identical to a cold run (an engine
without a warehouse), the loaded tokens counted as cached tokens, damaged files recomputed,
another model / dtype / block size never served, and pages surviving ``kill -9`` of another
process that wrote them.
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenfactory.engine.core import EngineConfig, EngineCore
from tokenfactory.engine.request import CacheBreakpoint
from tokenfactory.engine.sampling_params import SamplingParams
from tokenfactory.engine.warehouse import open_warehouse
from tokenfactory.model.runner import TorchExecutor

BS = 8
PROMPT = [(7 * i + 3) % 500 + 3 for i in range(57)]       # 7 full blocks + 1 token
OTHERS = [[(11 * i + k) % 500 + 3 for i in range(60)] for k in (1, 2)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
MAX_BLOCKS = (len(PROMPT) - 1) // BS


def make_core(model_dir, num_blocks: int, *, dtype: str = "float32",
              block_size: int = BS) -> EngineCore:
    ex = TorchExecutor(model_dir, dtype=dtype, compile=False, seed=0)
    return EngineCore(ex, EngineConfig(num_kv_blocks=num_blocks, block_size=block_size),
                      eos_token_ids=[2], model_max_len=ex.max_model_len)


def run(core: EngineCore, rid: str, prompt, params=GREEDY, **kw):
    core.add_request(rid, prompt, params, **kw)
    out = None
    while core.has_unfinished_requests():
        for o in core.step():
            if o.finished:
                out = o
    assert out is not None and out.error is None
    assert core.num_free_blocks() == core.kv.num_blocks, "pages leaked"
    return out


@pytest.fixture(scope="module")
def cold(tiny_llama_dir) -> list[int]:
    """The prompt's greedy tokens on an engine with no warehouse and a roomy pool."""
    return run(make_core(tiny_llama_dir, 64), "cold", PROMPT).outputs[0].token_ids


@pytest.fixture(scope="module")
def warm(tiny_llama_dir, tmp_path_factory):
    """An engine whose 12-page RAM pool cannot keep PROMPT while OTHERS run, on a warehouse."""
    core = make_core(tiny_llama_dir, 12)
    wh = open_warehouse(core.executor, tmp_path_factory.mktemp("warehouse"), max_bytes=1 << 30)
    core.kv.attach_connector(wh)
    return core, wh


def evict_prompt(core: EngineCore) -> None:
    for i, other in enumerate(OTHERS):
        run(core, f"evict-{i}-{core.num_steps}", other)
    assert not core.kv.pool.lookup_prefix(
        _hashes(core), [PROMPT[i * BS:(i + 1) * BS] for i in range(MAX_BLOCKS)])


def _hashes(core: EngineCore) -> list[bytes]:
    from tokenfactory.engine.block_pool import hash_block
    out, parent = [], None
    for i in range(MAX_BLOCKS):
        parent = hash_block(parent, PROMPT[i * BS:(i + 1) * BS])
        out.append(parent)
    return out


def test_an_evicted_prefix_comes_back_from_the_warehouse(warm, cold):
    core, wh = warm
    first = run(core, "first", PROMPT)
    assert first.outputs[0].token_ids == cold
    wh.flush()
    evict_prompt(core)
    before = core.kv.stats()
    again = run(core, "again", PROMPT)
    after = core.kv.stats()
    assert again.outputs[0].token_ids == cold
    assert after.connector_hits - before.connector_hits == MAX_BLOCKS * BS
    assert again.usage["cached_tokens"] == MAX_BLOCKS * BS      # billed like RAM hits


def test_a_cache_breakpoint_ttl_reaches_the_warehouse(warm):
    """ttl "1h": the breakpoint's pages get a retention far beyond the pages around them."""
    import time
    core, wh = warm
    prompt = [p + 1 for p in PROMPT]
    run(core, "pinned", prompt, cache_breakpoints=(CacheBreakpoint(32, 3600.0),))
    wh.flush()
    from tokenfactory.engine.block_pool import hash_block
    parent, mtimes = None, []
    for i in range(MAX_BLOCKS):
        parent = hash_block(parent, prompt[i * BS:(i + 1) * BS])
        mtimes.append(os.stat(wh.store.path(parent)).st_mtime)
    now = time.time()
    assert all(m > now + 3000 for m in mtimes[:4])              # the 32 tokens: 4 blocks
    assert all(m < now + 60 for m in mtimes[4:])
    core.kv.pool.release_pins()      # the RAM pins would crowd the small pool for later tests


DAMAGE = st.lists(st.tuples(st.integers(0, MAX_BLOCKS - 1),
                            st.sampled_from(["delete", "truncate", "flip_payload", "flip_token",
                                             "swap", "empty"])), min_size=1, max_size=3)


def run_prefetched(core: EngineCore, rid: str, prompt, *, wait: bool):
    """``run``, with the request's pages read ahead as soon as it is queued (``wait``: the
    read-ahead finishes before the step that admits it; else the two race)."""
    req = core.add_request(rid, prompt, GREEDY)
    asked = core.kv.prefetch(req)
    if wait:
        core.kv.connector.wait_prefetched()
        assert not core.kv.loading(req)
    out = None
    while core.has_unfinished_requests():
        for o in core.step():
            if o.finished:
                out = o
    assert out is not None and out.error is None
    assert core.num_free_blocks() == core.kv.num_blocks, "pages leaked"
    return out, asked


@pytest.mark.parametrize("wait,buffer_pages", [(True, None), (False, None), (True, 3)],
                         ids=["read ahead", "racing the load", "buffer of 3 pages"])
def test_prefetched_pages_are_loaded_without_reading_again(warm, cold, wait, buffer_pages):
    core, wh = warm
    run(core, f"seed-{core.num_steps}", PROMPT)
    wh.flush()
    evict_prompt(core)
    before = (wh.prefetch_hits, wh.store.stats.reads, core.kv.stats().connector_hits,
              wh.prefetch_skipped)
    default_buffer = wh.prefetch_bytes
    if buffer_pages:
        wh.prefetch_bytes = buffer_pages * wh.page_bytes
    try:
        out, asked = run_prefetched(core, f"prefetched-{core.num_steps}", PROMPT, wait=wait)
    finally:
        wh.prefetch_bytes = default_buffer
    assert asked == MAX_BLOCKS
    assert out.outputs[0].token_ids == cold
    assert out.usage["cached_tokens"] == MAX_BLOCKS * BS
    assert core.kv.stats().connector_hits - before[2] == MAX_BLOCKS * BS
    # each page file was read once, by the reader or by the load, never by both
    assert wh.store.stats.reads - before[1] == MAX_BLOCKS
    if wait:
        read_ahead = buffer_pages or MAX_BLOCKS      # a full buffer: the rest read at admission
        assert wh.prefetch_hits - before[0] == read_ahead
        assert wh.prefetch_skipped - before[3] == MAX_BLOCKS - read_ahead
    # pages already in RAM are not asked for
    assert core.kv.prefetch(core.add_request("again", PROMPT, GREEDY)) == 0
    core.abort("again")


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damage=DAMAGE, prefetch=st.booleans())
def test_damaged_pages_are_recomputed_never_served(warm, cold, damage, prefetch):
    """Pages are damaged at random on disk; the RAM cache is emptied; the prompt runs again
    (its pages read ahead when queued, or read at admission). Exactly the pages before the
    first damaged one are loaded, the rest recomputed, and the output is the cold run's."""
    core, wh = warm
    paths = [wh.store.path(h) for h in _hashes(core)]
    for p in paths:                  # damage left by an earlier example past its first bad page
        p.unlink(missing_ok=True)
    core.reset_prefix_cache()
    run(core, f"fill-{core.num_steps}", PROMPT)      # recomputes and writes every page
    wh.flush()
    assert all(p.is_file() for p in paths)
    for idx, kind in damage:
        p = paths[idx]
        if not p.exists():           # already deleted by an earlier operation
            continue
        if kind == "swap" and not paths[(idx + 1) % MAX_BLOCKS].exists():
            kind = "delete"
        data = bytearray(p.read_bytes())
        if len(data) < 68 + 8 * BS and kind != "delete":
            continue                     # emptied or truncated by an earlier operation
        if kind == "delete":
            p.unlink()
            continue
        if kind == "truncate":
            data = data[:len(data) * 2 // 3]
        elif kind == "flip_payload":
            data[len(data) // 2] ^= 0x10
        elif kind == "flip_token":
            data[68 + 8 * (idx % BS)] ^= 0x02
        elif kind == "swap":
            data = bytearray(paths[(idx + 1) % MAX_BLOCKS].read_bytes())
        else:
            data = bytearray()
        p.write_bytes(bytes(data))
    core.reset_prefix_cache()
    before = core.kv.stats().connector_hits
    if prefetch:
        out, _ = run_prefetched(core, f"damaged-{core.num_steps}", PROMPT, wait=True)
    else:
        out = run(core, f"damaged-{core.num_steps}", PROMPT)
    assert out.outputs[0].token_ids == cold
    first_bad = min(idx for idx, _ in damage)
    assert core.kv.stats().connector_hits - before == first_bad * BS
    assert out.usage["cached_tokens"] == first_bad * BS


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    """The tiny checkpoint's shape with other random weights."""
    import torch
    import transformers
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        initializer_range=0.5, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2)
    out = tmp_path_factory.mktemp("tiny-llama-other")
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(out)
    return out


@pytest.mark.parametrize("variant", ["other weights", "bfloat16", "block size 16"])
def test_another_model_dtype_or_block_size_gets_no_hits(warm, tiny_llama_dir, other_model_dir,
                                                        variant):
    core, wh = warm
    run(core, f"seed-{core.num_steps}", PROMPT)
    wh.flush()
    model_dir = other_model_dir if variant == "other weights" else tiny_llama_dir
    other = make_core(model_dir, 16, dtype="bfloat16" if variant == "bfloat16" else "float32",
                      block_size=16 if variant == "block size 16" else BS)
    other_wh = open_warehouse(other.executor, wh.store.root, max_bytes=1 << 30)
    assert other_wh.store.fingerprint != wh.store.fingerprint
    other.kv.attach_connector(other_wh)
    out = run(other, "other", PROMPT)
    assert other.kv.stats().connector_hits == 0 and out.usage["cached_tokens"] == 0


WRITER = textwrap.dedent("""
    import sys
    from tokenfactory.engine.core import EngineConfig, EngineCore
    from tokenfactory.engine.sampling_params import SamplingParams
    from tokenfactory.engine.warehouse import open_warehouse
    from tokenfactory.model.runner import TorchExecutor
    model_dir, wh_dir = sys.argv[1], sys.argv[2]
    prompt = [int(t) for t in sys.argv[3].split(",")]
    ex = TorchExecutor(model_dir, dtype="float32", compile=False, seed=0)
    core = EngineCore(ex, EngineConfig(num_kv_blocks=64, block_size=8), eos_token_ids=[2],
                      model_max_len=ex.max_model_len)
    wh = open_warehouse(ex, wh_dir, max_bytes=1 << 30)
    core.kv.attach_connector(wh)
    def run(rid, ids):
        core.add_request(rid, ids, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        while core.has_unfinished_requests():
            core.step()
    run("shared", prompt)
    wh.flush()
    print("saved", flush=True)
    i = 0
    while True:   # keep writing pages until killed
        i += 1
        run(f"more-{i}", [(i * 37 + j) % 500 + 3 for j in range(120)])
""")


def test_a_second_process_reuses_pages_after_the_first_is_killed(tiny_llama_dir, tmp_path, cold):
    """Another engine process fills the warehouse and is killed with SIGKILL mid-write; an
    engine started afterwards on the same directory (a restart, or a replica) reads the prefix
    from it, and nothing the killed process left behind is served damaged."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tiny_llama_dir), str(tmp_path),
                             ",".join(map(str, PROMPT))], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "saved"
        import time
        time.sleep(1.0)                  # let it write (and be mid-write) for a moment
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    core = make_core(tiny_llama_dir, 64)
    wh = open_warehouse(core.executor, tmp_path, max_bytes=1 << 30)
    core.kv.attach_connector(wh)
    out = run(core, "after-restart", PROMPT)
    assert out.outputs[0].token_ids == cold
    assert out.usage["cached_tokens"] == MAX_BLOCKS * BS
    # every page file the killed process committed reads back whole
    pages = [p for p in Path(wh.store.dir).rglob("*.kvp")]
    assert len(pages) > MAX_BLOCKS
    for p in pages:
        assert wh.store.read(bytes.fromhex(p.stem)) is not None
    assert wh.store.stats.rejected == 0


def test_bfloat16_pages_round_trip(tiny_llama_dir, tmp_path):
    """The native-kernel dtype: pages restored from disk give the same greedy tokens."""
    core = make_core(tiny_llama_dir, 16, dtype="bfloat16")
    wh = open_warehouse(core.executor, tmp_path, max_bytes=1 << 30)
    core.kv.attach_connector(wh)
    first = run(core, "bf16-first", PROMPT)
    wh.flush()
    core.reset_prefix_cache()
    again = run(core, "bf16-again", PROMPT)
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert again.usage["cached_tokens"] == MAX_BLOCKS * BS == core.kv.stats().connector_hits


def test_a_1h_breakpoint_outlives_ram_pins_and_the_byte_budget_then_is_reclaimed(
        tiny_llama_dir, tmp_path, cold):
    """Anthropic ``ttl: "1h"``: the breakpoint's pages are pinned in RAM and retained in the
    warehouse. Other requests make the RAM pins give way and push the warehouse over its byte
    budget: unretained pages are evicted, the breakpoint's stay and serve the prompt again.
    Once the hour is over they are reclaimed like any other page."""
    from tokenfactory.engine.warehouse import PageStore, WarehouseConnector
    from tokenfactory.model.kv_pages import ModelKVPageIO, model_fingerprint, page_layout
    engine_now, disk_now = [0.0], [1_000_000.0]
    ex = TorchExecutor(tiny_llama_dir, dtype="float32", compile=False, seed=0)
    core = EngineCore(ex, EngineConfig(num_kv_blocks=12, block_size=BS), eos_token_ids=[2],
                      model_max_len=ex.max_model_len, clock=lambda: engine_now[0])
    shape, dtype = page_layout(ex.model)
    page_bytes = math.prod(shape) * dtype.itemsize
    file_bytes = 68 + BS * 8 + page_bytes + 4                # header, tokens, page, crc
    store = PageStore(tmp_path, model_fingerprint(ex.model), max_bytes=10 * file_bytes,
                      clock=lambda: disk_now[0])
    wh = WarehouseConnector(store, ModelKVPageIO(ex.model), shape, dtype, async_writes=False)
    core.kv.attach_connector(wh)
    mine = _hashes(core)

    run(core, "pinned", PROMPT, cache_breakpoints=(CacheBreakpoint(MAX_BLOCKS * BS, 3600.0),))
    assert core.kv.pool.stats().num_pinned == core.kv.pool.max_pinned   # RAM pins, as many as allowed
    others = [[(13 * i + 17 * k) % 500 + 3 for i in range(57)] for k in range(1, 5)]
    for k, other in enumerate(others):
        disk_now[0] += 60
        engine_now[0] += 60
        run(core, f"other-{k}", other)
    assert core.kv.pool.stats().num_pinned == 0          # the pins gave way to the others
    assert not core.kv.pool.lookup_prefix(mine, [PROMPT[i * BS:(i + 1) * BS]
                                                 for i in range(MAX_BLOCKS)])
    assert wh.store.stats.evicted > 0                    # the budget evicted other pages ...
    assert all(wh.store.contains(h) for h in mine)       # ... and kept the retained ones
    assert wh.store.total_bytes() <= 10 * file_bytes

    before = core.kv.stats().connector_hits
    again = run(core, "again", PROMPT)                   # no breakpoint this time
    assert again.outputs[0].token_ids == cold
    assert again.usage["cached_tokens"] == MAX_BLOCKS * BS
    assert core.kv.stats().connector_hits - before == MAX_BLOCKS * BS

    disk_now[0] += 7200                                  # the hour is over
    for k in range(5, 7):
        disk_now[0] += 60
        run(core, f"later-{k}", [(19 * i + 23 * k) % 500 + 3 for i in range(57)])
    assert not any(wh.store.contains(h) for h in mine)   # reclaimed before the newer pages
