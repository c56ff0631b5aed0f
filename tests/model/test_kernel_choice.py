"""Kernel choice by measurement (model/kernel_choice.py): forced settings compute the same
model as transformers' float32 reference, the cached decision survives a restart and is
invalidated by another CPU or thread count, and a busy host's measurement is not cached."""
from __future__ import annotations

import random

import pytest
import torch
import transformers

from tokenfactory.engine.sampling_params import SamplingParams
from tokenfactory.model import kernel_choice, kernels
from tokenfactory.model.kernel_choice import CpuInfo, KernelChoice
from tokenfactory.model.runner import TorchExecutor

from .conftest import run_engine

NATIVE = pytest.mark.skipif(kernels.library() is None,
                            reason=f"native kernels unavailable: {kernels.unavailable_reason}")
# head_dim 64 and widths that are multiples of 32: every native path can run this model
CONFIG = dict(hidden_size=256, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=512, max_position_embeddings=512,
              initializer_range=0.6, head_dim=64)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("kernel_choice_model")
    model.save_pretrained(path)
    return path, model


def _prompts(n=4, seed=3):
    gen = random.Random(seed)
    return [[gen.randrange(512) for _ in range(gen.randrange(6, 40))] for _ in range(n)]


@pytest.mark.parametrize("mode", [pytest.param("native", marks=NATIVE), "torch"])
def test_forced_setting_routes_and_matches_transformers(model_dir, mode):
    """Greedy tokens of each forced setting against transformers in float32: the first
    token (a prefill) and every decode step's token, where float32's top two are not a
    near tie that bfloat16 may flip."""
    path, hf = model_dir
    ex = TorchExecutor(path, dtype="bfloat16", kernels=mode)
    choice = ex.kernel_choice
    assert (choice.source, choice.mode) == ("forced", mode)
    native = mode == "native"
    assert ex.native_decode == native
    assert ex.model.layers[0].mlp.down_proj.native_max_rows == (kernels.LINEAR_MAX_ROWS
                                                                 if native else 0)
    assert choice.labels()["decode_attention"] == ("native" if native else "torch")
    prompts = _prompts()
    outs, _ = run_engine(ex, prompts, SamplingParams(temperature=0, max_tokens=8,
                                                     ignore_eos=True))
    compared = agreed = 0
    for prompt, out in zip(prompts, outs):
        tokens = out.outputs[0].token_ids
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
        top2 = logits.topk(2, dim=-1)
        for row, tok in enumerate(tokens):
            if top2.values[row, 0] - top2.values[row, 1] < 0.3:
                break           # a near tie: the sequences may part here, stop comparing
            compared += 1
            agreed += int(top2.indices[row, 0]) == tok
    assert compared >= 10 and agreed == compared


@NATIVE
def test_forced_settings_agree_with_each_other(model_dir):
    """native and torch kernels: the same greedy tokens, logprobs within bfloat16 noise."""
    path, _ = model_dir
    prompts = _prompts(3, seed=8)
    params = SamplingParams(temperature=0, max_tokens=5, logprobs=2, ignore_eos=True)
    a, _ = run_engine(TorchExecutor(path, dtype="bfloat16", kernels="native"), prompts, params)
    b, _ = run_engine(TorchExecutor(path, dtype="bfloat16", kernels="torch"), prompts, params)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids[0] == y.outputs[0].token_ids[0]
        tok = x.outputs[0].token_ids[0]
        assert x.outputs[0].logprobs[0][tok].logprob == pytest.approx(
            y.outputs[0].logprobs[0][tok].logprob, abs=0.15)


def test_bad_mode_is_refused(model_dir):
    with pytest.raises(ValueError, match="kernels must be one of"):
        TorchExecutor(model_dir[0], dtype="bfloat16", kernels="fastest")


def test_native_refused_where_it_cannot_run(model_dir):
    with pytest.raises(ValueError, match="kernels='native' needs"):
        TorchExecutor(model_dir[0], dtype="float32", kernels="native")


# ------------------------------------------------------------------------------ cache
def _fake(calls: list) -> KernelChoice:
    calls.append(1)
    return KernelChoice(decode_step=True, linear_native_max_rows=8, prefill_attention="sdpa",
                        decode_attention="native", source="measured",
                        rates={"decode_step_native": 1.0, "decode_step_torch": 2.0})


def test_cache_survives_restart_and_follows_cpu_and_threads(tmp_path):
    shape = {"hidden": 576, "layers": 30}
    cpu = CpuInfo("Zen 4 test part", frozenset({"avx512f", "avx512_bf16"}))
    calls: list = []

    def choose(cpu=cpu, threads=2, shape=shape):
        return kernel_choice.choose(lambda: _fake(calls), shape, cpu=cpu, threads=threads,
                                    directory=tmp_path)

    first = choose()
    assert (first.source, len(calls), first.cpu, first.threads) == ("measured", 1, cpu.model, 2)
    again = choose()                                          # a restart: read, not timed
    assert (again.source, len(calls)) == ("cache", 1)
    assert (again.prefill_attention, again.rates) == ("sdpa", first.rates)
    amx = CpuInfo("Xeon test part", cpu.flags | {"amx_bf16", "amx_tile"})
    assert amx.amx and not cpu.amx
    assert choose(cpu=amx).source == "measured" and len(calls) == 2
    assert choose(cpu=amx).amx and choose(cpu=amx).labels()["amx"] == "true"
    assert choose(threads=4).source == "measured" and len(calls) == 3
    assert choose(shape={**shape, "layers": 12}).source == "measured" and len(calls) == 4
    assert choose().source == "cache" and len(calls) == 4    # the first entry still holds


def test_busy_host_measurement_is_not_cached(tmp_path):
    calls: list = []

    def noisy():
        choice = _fake(calls)
        choice.noisy = ["decode_step_native"]
        return choice

    cpu = CpuInfo("test part", frozenset())
    for n in (1, 2):
        choice = kernel_choice.choose(noisy, {"x": 1}, cpu=cpu, threads=2, directory=tmp_path)
        # not the busy measurement's verdict (sdpa) but the fixed native-wherever rule
        assert (choice.source, len(calls)) == ("busy-host-default", n)
        assert (choice.prefill_attention, choice.noisy) == ("native", ["decode_step_native"])
        assert choice.rates == {"decode_step_native": 1.0, "decode_step_torch": 2.0}
    assert not list(tmp_path.iterdir())


def test_cpu_info_reads_this_machine():
    cpu = CpuInfo.read()
    assert cpu.model and isinstance(cpu.flags, frozenset)


@NATIVE
def test_auto_measures_once_then_reads_the_cache(model_dir, tmp_path, monkeypatch):
    """The real measurement on the executor: its decision is applied, written, and the next
    executor (a restart) takes it from the file; another CPU string measures again."""
    monkeypatch.setenv("TOKENFACTORY_CACHE", str(tmp_path))
    for name, value in (("NOISY_SPREAD", float("inf")), ("BUSY_SHARE", 0.0),
                        ("MAX_SECONDS", float("inf"))):   # decide and cache even when busy
        monkeypatch.setattr(kernel_choice, name, value)
    path, _ = model_dir
    ex = TorchExecutor(path, dtype="bfloat16", kernels="auto")
    ex.initialize_cache(64, 16)
    choice = ex.kernel_choice
    assert choice.source == "measured" and choice.mode == "auto"
    assert {"linear_1_native", "linear_1_onednn", "decode_step_native", "decode_step_torch",
            "prefill_attention_64_sdpa", "decode_attention_8_torch", "cpu_share"} <= set(choice.rates)
    assert ex.native_decode == choice.decode_step
    assert (ex._native is not None) == choice.decode_step
    assert ex.model.layers[1].self_attn.qkv_proj.native_max_rows == choice.linear_native_max_rows
    assert len(list((tmp_path / "kernel-choice").iterdir())) == 1

    def no_timing(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(kernel_choice, "measure", no_timing)
    again = TorchExecutor(path, dtype="bfloat16", kernels="auto")
    again.initialize_cache(64, 16)
    assert again.kernel_choice.source == "cache"
    assert again.kernel_choice.rates == choice.rates
    out, _ = run_engine(again, _prompts(2), SamplingParams(temperature=0, max_tokens=3))
    assert all(len(o.outputs[0].token_ids) == 3 for o in out)

    other = CpuInfo("another CPU", CpuInfo.read().flags)
    monkeypatch.setattr(CpuInfo, "read", classmethod(lambda cls: other))
    third = TorchExecutor(path, dtype="bfloat16", kernels="auto")
    with pytest.raises(AssertionError, match="measured again"):
        third.initialize_cache(64, 16)


def test_choice_is_exported_as_an_info_metric():
    from tokenfactory.api.metrics import Metrics
    choice = _fake([])
    choice.cpu, choice.threads = "Zen 4 test part", 2
    metrics = Metrics()
    metrics.attach_kernel_choice(choice.labels())
    text = metrics.render().decode()
    line = next(line for line in text.splitlines() if line.startswith("tokenfactory_kernels_info"))
    for label in ('decode_step="native"', 'prefill_attention="sdpa"', 'cpu="Zen 4 test part"',
                  'linear_native_max_rows="8"', 'source="measured"', 'threads="2"'):
        assert label in line
    assert line.endswith(" 1.0")


def test_serve_accepts_kernels_flag():
    from tokenfactory.api.serve_cli import build_parser
    assert build_parser().parse_args([]).kernels == "auto"
    assert build_parser().parse_args(["--kernels", "torch"]).kernels == "torch"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--kernels", "fastest"])
