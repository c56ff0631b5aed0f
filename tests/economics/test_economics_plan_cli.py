"""``tokenfactory plan`` through ``plan_cli.main(argv)``: JSON keys, fleet sizing, errors."""

import json

import pytest

from tokenfactory.economics import plan_cli

REQUIRED_KEYS = {"weight_bytes", "kv_bytes_per_token", "decode_floor_ms", "bound", "max_batch",
                 "cost_per_million_output_tokens"}


def run_json(capsys, *argv):
    assert plan_cli.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_json_has_the_documented_keys(capsys):
    r = run_json(capsys, "--model", "llama-3-70b", "--hardware", "h100", "--tp", "2",
                 "--precision", "bf16", "--kv-dtype", "bf16", "--context", "4096",
                 "--batch", "64", "--cost-per-hour", "2.50")
    assert REQUIRED_KEYS <= set(r)
    assert r["kv_bytes_per_token"] == 327_680
    assert r["tp"] == 2 and r["batch"] == 64 and r["max_batch"] == 14
    assert r["bound"] in ("memory", "compute")
    assert r["warnings"]                                  # batch 64 > 14 that fit
    assert r["cost_per_million_output_tokens"] > 0


def test_plan_table_is_readable(capsys):
    assert plan_cli.main(["--model", "mixtral-8x7b", "--hardware", "h100"]) == 0
    out = capsys.readouterr().out
    assert "KV per token" in out and "$ per M output tokens" in out and "memory" in out


def test_plan_picks_the_smallest_tp_that_fits(capsys):
    r = run_json(capsys, "--model", "llama-3-405b", "--hardware", "h200")
    assert r["tp"] == 8 and r["max_batch"] >= 1


def test_plan_on_an_hf_config_path_matches_the_catalog(tmp_path, capsys):
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 8192,
              "intermediate_size": 28672, "max_position_embeddings": 8192,
              "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8,
              "tie_word_embeddings": False, "vocab_size": 128256}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    from_path = run_json(capsys, "--model", str(path), "--hardware", "h100", "--tp", "2")
    from_catalog = run_json(capsys, "--model", "llama-3-70b", "--hardware", "h100", "--tp", "2")
    for key in ("kv_bytes_per_token", "kv_bytes_per_sequence", "weight_bytes", "max_batch",
                "decode_floor_ms"):
        assert from_path[key] == from_catalog[key]


def test_plan_sizes_a_fleet(capsys):
    r = run_json(capsys, "--model", "deepseek-v3", "--hardware", "b200", "--precision", "fp8",
                 "--demand", "1e12", "--workload", "agentic")
    fleet = r["fleet"]
    assert fleet["gpus"] > 0 and fleet["racks"] > 0 and fleet["facility_megawatts"] > 0
    assert fleet["capex_usd"] > 0 and fleet["rental_usd_per_year"] > 0
    assert fleet["workload"] == "agentic"


def test_plan_draws_a_plot(tmp_path, capsys):
    out = tmp_path / "cost.png"
    assert plan_cli.main(["--model", "llama-3-8b", "--context", "2048", "--plot", str(out),
                          "--plot-hardware", "h100,b200"]) == 0
    assert out.stat().st_size > 1000
    assert "plot written" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--hardware", "h1000"], "unknown hardware 'h1000'; valid: a100, h100"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--context", "0"], "--context must be >= 1"),
    (["--model", "llama-3-405b", "--hardware", "a100", "--tp", "1"], "does not fit"),
    (["--model", "llama-3-405b", "--hardware", "h100", "--tp", "2"], "try --tp 16"),
    (["--model", "no-such-model"], "unknown model"),
    (["--precision", "fp7"], "unknown precision"),
    (["--workload", "nope", "--demand", "1e9", "--tp", "2"], "unknown workload"),
    (["--tp", "two"], "invalid int value"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_invalid_inputs_give_one_clear_line(capsys, argv, message):
    assert plan_cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in captured.err


def test_help_exits_zero(capsys):
    assert plan_cli.main(["--help"]) == 0
    assert "--kv-dtype" in capsys.readouterr().out
