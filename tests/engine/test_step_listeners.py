"""EngineCore step listeners: every observer sees every step, failed chunks are not reported."""
from __future__ import annotations

from tokenfactory.engine.core import EngineConfig, EngineCore
from tokenfactory.engine.executor import ScriptedExecutor
from tokenfactory.engine.sampling_params import SamplingParams

EOS = 0


def test_listeners_all_see_each_step_in_order():
    seen: list[tuple[str, dict]] = []
    core = EngineCore(ScriptedExecutor(lambda r: [5, 6], EOS), EngineConfig(num_kv_blocks=16),
                      model_max_len=256, eos_token_ids=[EOS],
                      step_hook=lambda dt, toks: seen.append(("hook", dict(toks))))
    core.add_step_listener(lambda dt, toks: seen.append(("second", dict(toks))))
    core.add_request("a", [1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True))
    while core.has_unfinished_requests():
        core.step()
    # prefill of 3 tokens, then one decode token; both listeners, constructor hook first
    assert seen == [("hook", {"a": 3}), ("second", {"a": 3}), ("hook", {"a": 1}),
                    ("second", {"a": 1})]
    assert core.num_steps == 2
