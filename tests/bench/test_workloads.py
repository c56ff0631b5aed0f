import json

import pytest

from tokenfactory.bench.client import anthropic_body, neutral_messages, openai_body
from tokenfactory.bench.workloads import WORKLOADS, agentic, build_workload, read_trace, write_trace


@pytest.mark.parametrize("name", WORKLOADS)
def test_same_seed_same_workload(name):
    a, b = build_workload(name, seed=7), build_workload(name, seed=7)
    assert a.to_dict() == b.to_dict()
    assert a.to_dict() != build_workload(name, seed=8).to_dict()
    assert a.num_requests > 0


def test_agentic_shape():
    w = agentic(seed=1, sessions=3, turns=5, prefix_tokens=1000, tool_min=200, tool_max=2000,
                output_tokens=64, tokens_per_word=1.0)
    assert len(w.sessions) == 3 and w.max_concurrency == 3
    assert all(len(s.turns) == 5 for s in w.sessions)
    # the stable prefix is shared by every session; the tasks differ
    assert len({s.system for s in w.sessions}) == 1
    assert len({json.dumps(s.tools) for s in w.sessions}) == 1
    assert len({s.turns[0].user for s in w.sessions}) == 3
    assert all(t.max_tokens == 64 for s in w.sessions for t in s.turns)
    for s in w.sessions:
        assert s.turns[0].assistant is None
        assert all(t.assistant and t.user.startswith("Result of ") for t in s.turns[1:])
        # tool results grow the context: within ~2x of the 200..2000-token range (1 word ~ 1 token)
        sizes = [len(t.user.split()) for t in s.turns[1:]]
        assert all(50 <= n <= 2000 for n in sizes), sizes


def test_messages_append_history_each_turn():
    w = agentic(seed=0, sessions=1, turns=3, prefix_tokens=200, tool_min=20, tool_max=40)
    s = w.sessions[0]
    m0 = neutral_messages(s, 0, [])
    m2 = neutral_messages(s, 2, ["model answer 0", "model answer 1"])
    assert [m["role"] for m in m2] == ["user", "assistant", "user", "assistant", "user"]
    assert m2[:1] == m0                                   # earlier turns are a prefix of later ones
    assert m2[1]["content"] == s.turns[1].assistant      # scripted replies by default
    s.reply = "model"
    assert neutral_messages(s, 2, ["a0", "a1"])[3]["content"] == "a1"


def test_request_bodies_ask_for_fixed_output_and_caching():
    s = agentic(seed=0, sessions=1, turns=2, prefix_tokens=200).sessions[0]
    msgs = neutral_messages(s, 1, ["x"])
    a = anthropic_body("m", s, msgs, 64)
    assert a["stream"] and a["max_tokens"] == 64 and a["ignore_eos"] and a["min_tokens"] == 64
    assert a["system"][0]["cache_control"] == {"type": "ephemeral"}
    assert a["messages"][-1]["content"][-1]["cache_control"] == {"type": "ephemeral"}
    assert a["tools"][-1]["cache_control"] and "input_schema" in a["tools"][0]
    assert sum(1 for t in a["tools"] if "cache_control" in t) + 2 <= 4   # at most 4 breakpoints
    o = openai_body("m", s, msgs, 64)
    assert o["messages"][0] == {"role": "system", "content": s.system}
    assert o["stream_options"] == {"include_usage": True} and o["ignore_eos"] and o["min_tokens"] == 64
    assert o["tools"][0]["type"] == "function"


@pytest.mark.parametrize("name", WORKLOADS)
def test_trace_round_trip(tmp_path, name):
    w = build_workload(name, seed=3)
    path = tmp_path / "trace.jsonl"
    write_trace(w, str(path))
    lines = path.read_text().splitlines()
    assert len(lines) == 1 + len(w.sessions)
    back = read_trace(str(path))
    assert back.to_dict() == w.to_dict()


def test_hand_written_trace_and_errors(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"id": "s0", "arrival": 0.5, "system": "sys",
                                "turns": [{"user": "hi", "max_tokens": 4}]}) + "\n\n")
    w = read_trace(str(path))
    assert w.name == "trace" and w.sessions[0].turns[0].user == "hi" and w.sessions[0].reply == "scripted"
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=":1: not JSON"):
        read_trace(str(path))
    path.write_text(json.dumps({"id": "s0"}) + "\n")
    with pytest.raises(ValueError, match="not a session"):
        read_trace(str(path))


def test_unknown_workload():
    with pytest.raises(ValueError, match="unknown workload"):
        build_workload("nope")
