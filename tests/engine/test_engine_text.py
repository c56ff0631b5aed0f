"""Stop strings through the engine's output path: cut exactly, never leaked, reported."""
from __future__ import annotations

from tokenfactory.engine.core import EngineConfig, EngineCore
from tokenfactory.engine.executor import ScriptedExecutor
from tokenfactory.engine.sampling_params import SamplingParams


def core_saying(tokenizer, text: str) -> EngineCore:
    ids = tokenizer.encode(text, add_special_tokens=False)
    eos = min(tokenizer.eos_token_ids)
    return EngineCore(ScriptedExecutor(lambda r: ids + [eos], eos), EngineConfig(num_kv_blocks=64),
                      model_max_len=1024, tokenizer=tokenizer, eos_token_ids=tokenizer.eos_token_ids)


def stream(core, params, prompt=(5, 6, 7)):
    core.add_request("r", list(prompt), params)
    deltas, final = [], None
    while core.has_unfinished_requests():
        for out in core.step():
            deltas.append(out.outputs[0].new_text)
            final = out
    return deltas, final


def test_stop_string_is_cut_exactly_and_never_streamed(demo_tokenizer):
    core = core_saying(demo_tokenizer, "The answer is 42.\nUser: and then more text")
    deltas, final = stream(core, SamplingParams(max_tokens=50, stop=["\nUser:"]))
    out = final.outputs[0]
    assert out.text == "The answer is 42."
    assert "".join(deltas) == out.text
    assert all("User" not in d and "\n" not in d for d in deltas)
    assert out.finish_reason == "stop" and out.stop_reason == "\nUser:"
    assert core.num_free_blocks() == core.kv.num_blocks


def test_include_stop_str_in_output(demo_tokenizer):
    core = core_saying(demo_tokenizer, "alpha beta gamma delta")
    _, final = stream(core, SamplingParams(max_tokens=50, stop=["gamma"], include_stop_str_in_output=True))
    assert final.outputs[0].text == "alpha beta gamma"


def test_text_without_stop_is_the_full_decode(demo_tokenizer):
    text = "Unicode survives streaming: héllo wörld ✓ 日本語 🙂"
    core = core_saying(demo_tokenizer, text)
    deltas, final = stream(core, SamplingParams(max_tokens=200))
    assert final.outputs[0].finish_reason == "stop"  # the scripted EOS
    assert "".join(deltas) == final.outputs[0].text == text
    assert all("\ufffd" not in d for d in deltas)


def test_max_tokens_flushes_held_back_text(demo_tokenizer):
    text = "one two three four five six seven"
    core = core_saying(demo_tokenizer, text)
    n = len(demo_tokenizer.encode(text))
    deltas, final = stream(core, SamplingParams(max_tokens=n, stop=["seven eight"]))
    assert final.outputs[0].finish_reason == "length"
    assert "".join(deltas) == final.outputs[0].text == text
