"""CostLedger: each request pays its token share of every step it took part in."""

import threading

import pytest

from tokenfactory.economics import ApiPrices, CostLedger, TokenUsage, api_price


def test_step_time_is_split_by_tokens_processed():
    ledger = CostLedger(cost_per_hour=3.60, watts=1000)
    ledger.record_step(0.100, {"a": 1, "b": 3})          # a: 0.025 s, b: 0.075 s
    ledger.record_step(0.050, {"a": 1, "c": 1})          # a: 0.025 s, c: 0.025 s
    ledger.record_step(0.200, {"b": 512})                # b alone: 0.200 s
    a, b, c = ledger.finish("a"), ledger.finish("b"), ledger.finish("c")
    assert a.machine_seconds == pytest.approx(0.050)
    assert b.machine_seconds == pytest.approx(0.275)
    assert c.machine_seconds == pytest.approx(0.025)
    assert (a.steps, b.steps, c.steps) == (2, 2, 1)
    assert b.tokens_processed == 515
    assert a.dollars == pytest.approx(0.050 * 3.60 / 3600)   # $3.60/h = $0.001/s
    assert a.joules == pytest.approx(50.0)                   # 1000 W x 0.05 s
    totals = ledger.totals()
    assert totals.machine_seconds == pytest.approx(0.350)
    assert totals.machine_seconds == pytest.approx(
        a.machine_seconds + b.machine_seconds + c.machine_seconds)
    assert totals.requests_finished == 3 and totals.steps == 3


def test_idle_steps_and_zero_token_entries_charge_nobody():
    ledger = CostLedger(cost_per_hour=1.0, watts=100)
    ledger.record_step(0.5, {})
    ledger.record_step(0.1, {"a": 0, "b": 2})
    assert ledger.peek("a") == 0.0
    assert ledger.peek("b") == pytest.approx(0.1)
    totals = ledger.totals()
    assert totals.idle_seconds == pytest.approx(0.5)
    assert totals.busy_seconds == pytest.approx(0.1)
    assert ledger.finish("never-ran").machine_seconds == 0.0


def test_invalid_steps_are_rejected():
    ledger = CostLedger(cost_per_hour=1.0, watts=100)
    with pytest.raises(ValueError):
        ledger.record_step(-1.0, {"a": 1})
    with pytest.raises(ValueError):
        ledger.record_step(1.0, {"a": -1})
    with pytest.raises(ValueError):
        CostLedger(cost_per_hour=-1, watts=0)


def test_api_price_view_uses_the_cache_multipliers():
    prices = ApiPrices(input_per_million=3.0, output_per_million=15.0)
    usage = TokenUsage(input_tokens=100, output_tokens=500, cache_read_tokens=10_000,
                       cache_write_5m_tokens=1_000, cache_write_1h_tokens=1_000)
    # (100 + 1000 x 1.25 + 1000 x 2.0 + 10000 x 0.1) x $3/M + 500 x $15/M
    expected = 4350 * 3.0 / 1e6 + 500 * 15.0 / 1e6
    assert api_price(usage, prices) == pytest.approx(expected)
    ledger = CostLedger(cost_per_hour=2.5, watts=700, prices=prices)
    ledger.record_step(0.04, {"r": 1})
    cost = ledger.finish("r", usage)
    assert cost.api_dollars == pytest.approx(expected)
    assert ledger.totals().api_dollars == pytest.approx(expected)
    headers = cost.headers()
    assert float(headers["x-tokenfactory-cost-usd"]) == pytest.approx(cost.dollars, abs=1e-8)
    assert set(cost.to_dict()) >= {"machine_seconds", "dollars", "joules", "api_dollars"}


def test_concurrent_recording_loses_nothing():
    ledger = CostLedger(cost_per_hour=1.0, watts=1.0)

    def engine(worker: int) -> None:
        for _ in range(2000):
            ledger.record_step(0.001, {f"r{worker}": 1, "shared": 1})

    threads = [threading.Thread(target=engine, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ledger.totals().steps == 8000
    assert ledger.finish("shared").machine_seconds == pytest.approx(4.0)
    assert sum(ledger.finish(f"r{i}").machine_seconds for i in range(4)) == pytest.approx(4.0)


def test_a_step_landing_after_finish_does_not_reopen_the_request():
    # A client disconnects: its request is billed at once, but a forward pass that was already
    # running still reports it. That late charge must not leave an entry nobody will close.
    ledger = CostLedger(cost_per_hour=3.6, watts=100.0)
    ledger.record_step(1.0, {"gone": 10, "stays": 10})
    bill = ledger.finish("gone")
    ledger.record_step(1.0, {"gone": 10, "stays": 10})
    assert ledger.num_open() == 1                       # only "stays"
    assert bill.machine_seconds == 0.5
    assert ledger.totals().machine_seconds == 2.0       # the late step still counts in the totals
    assert ledger.finish("stays").machine_seconds == 1.0
    assert ledger.num_open() == 0
