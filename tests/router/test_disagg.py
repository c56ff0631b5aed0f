"""TransferConnector bookkeeping and export_prefix against a real engine's KV cache (no Ray)."""
from __future__ import annotations

import torch

from tokenfactory.router.disagg import PrefixPages, TransferConnector, export_prefix
from tokenfactory.router.policy import request_block_hashes

BS = 16


def test_export_then_load_moves_the_exact_pages_between_two_engines(demo_checkpoint):
    """Prefill on one engine, move the pages through the connector into a second engine of
    the same checkpoint: the second reuses them as cached tokens and generates what the first
    would (greedy); the connector keeps nothing afterwards."""
    from tokenfactory.engine.llm import build_engine_core
    from tokenfactory.engine.sampling_params import SamplingParams
    from tokenfactory.model.kv_pages import ModelKVPageIO

    args = dict(dtype="float32", kernels="torch", num_kv_blocks=64, block_size=BS,
                max_model_len=512)
    prefill, decode = (build_engine_core(demo_checkpoint, **args),
                       build_engine_core(demo_checkpoint, **args))
    conn = TransferConnector()
    conn.kv_io = ModelKVPageIO(decode.executor.model)
    decode.kv.attach_connector(conn)
    prompt = [(i * 37) % 4000 + 10 for i in range(70)]           # 4 full blocks + 6 tokens

    def run(core, rid, max_tokens):
        core.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0))
        outs = []
        while core.has_unfinished_requests():
            outs += core.step()
        return outs[-1]

    reference = run(prefill, "ref", 6)
    hashes = request_block_hashes(prompt, BS)
    pages = export_prefix(prefill, hashes, ModelKVPageIO(prefill.executor.model))
    assert pages.block_hashes == hashes and pages.pages.shape[3] == 4
    conn.receive(pages)
    assert conn.lookup(hashes) == 4
    out = run(decode, "pd", 6)
    assert out.num_cached_tokens == 64
    assert out.outputs[0].token_ids == reference.outputs[0].token_ids
    assert conn.loaded_blocks == 4 and conn.pending_blocks() == 0


class _Pages:
    """A page store standing in for a cache: block id -> page tensor."""

    def __init__(self):
        self.written: dict[int, torch.Tensor] = {}

    def write_kv_blocks(self, block_ids, pages):
        for i, b in enumerate(block_ids):
            self.written[b] = pages[:, :, :, i].clone()


def _prefix(hashes, tokens, fill):
    pages = torch.full((2, 2, 1, len(hashes), BS, 4), fill, dtype=torch.bfloat16)
    return PrefixPages(list(hashes), [tuple(t) for t in tokens],
                       pages.view(torch.int16).numpy(), "bfloat16")


def test_connector_verifies_tokens_drops_used_transfers_and_bounds_the_rest():
    io = _Pages()
    conn = TransferConnector(max_transfers=2)
    conn.kv_io = io
    h = [bytes([i]) * 16 for i in range(6)]
    toks = [[i] * BS for i in range(6)]
    conn.receive(_prefix(h[:3], toks[:3], 1.5))
    assert conn.lookup(h) == 3 and conn.lookup(h[3:]) == 0
    # token ids must match what the pages were computed for
    assert conn.load(h[:2], [7, 8], [toks[0], [99] * BS]) == 1
    assert io.written[7].dtype == torch.bfloat16 and float(io.written[7].flatten()[0]) == 1.5
    assert conn.pending_blocks() == 0            # the transfer is used: all of it is dropped
    conn.receive(_prefix(h[3:4], toks[3:4], 2.0))
    conn.receive(_prefix(h[4:5], toks[4:5], 3.0))
    conn.receive(_prefix(h[5:6], toks[5:6], 4.0))   # the oldest waiting transfer goes
    assert conn.lookup(h[3:4]) == 0 and conn.lookup(h[4:5]) == 1 and conn.pending_blocks() == 2


def test_tiered_connector_fills_leading_blocks_tier_by_tier():
    """Blocks 0-1 from the first tier, 2-3 from the second (which also holds 0, unused), the
    rest computed; a tier that raises supplies nothing instead of failing the request."""
    from tokenfactory.router.tiers import TieredConnector

    io = _Pages()
    first, second = TransferConnector(), TransferConnector()
    first.kv_io = second.kv_io = io
    h = [bytes([i]) * 16 for i in range(5)]
    toks = [[i] * BS for i in range(5)]
    first.receive(_prefix(h[:2], toks[:2], 1.0))
    second.receive(_prefix([h[0]] + h[2:4], [toks[0]] + toks[2:4], 2.0))
    tiered = TieredConnector([first, second])
    assert tiered.lookup(h) == 4 and tiered.lookup(h[2:]) == 2 and tiered.lookup(h[4:]) == 0
    assert tiered.load(h, [10, 11, 12, 13, 14], toks) == 4
    assert [float(io.written[b].flatten()[0]) for b in (10, 11, 12, 13)] == [1.0, 1.0, 2.0, 2.0]
    assert 14 not in io.written

    class Broken:
        def lookup(self, hashes):
            return len(hashes)

        def load(self, *args):
            raise OSError("disk gone")

    assert TieredConnector([Broken()]).load(h, [1, 2, 3, 4, 5], toks) == 0


def test_transferred_pages_are_billed_as_computed_unless_a_cache_held_them():
    """usage.cached = tokens the decode replica's RAM held, or the prefill replica's own cache
    held: both are prefixes of the prompt, the transfer follows the decode replica's hits."""
    from tokenfactory.engine.request import CompletionOutput, RequestOutput
    from tokenfactory.router.disagg import bill_transfer

    def out(cached):
        return RequestOutput("r", None, list(range(200)), cached,
                             [CompletionOutput(0, "", [1])], finished=False)

    assert bill_transfer(out(192), 192, 0).num_cached_tokens == 0      # all computed fresh
    assert bill_transfer(out(192), 128, 0).num_cached_tokens == 64     # decode RAM: 64
    assert bill_transfer(out(192), 128, 160).num_cached_tokens == 160  # prefill cache: 160
    assert bill_transfer(out(192), 192, 400).num_cached_tokens == 192  # never above reported
