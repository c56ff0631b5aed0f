"""Which kernel runs where, decided by measuring on the CPU the server landed on.

The native kernels (``model/kernels``) were written for AVX-512 BF16 CPUs without matrix
units, where they beat torch's paths 2-3x. On a CPU with AMX tiles oneDNN's bfloat16 GEMMs
run several times faster than on that kind, and a hard-coded "native for small batches" rule
can pick the slower path. So at start-up :func:`choose` times each candidate for this model's
shapes and keeps the fastest:

- linear layers at decode sizes (1, 8 rows) and prefill sizes (32, 128 rows): the native
  small-batch kernel vs oneDNN (AMX where the CPU has it). The result is one threshold, the
  number of rows up to which ``CpuLinear`` calls the native kernel;
- prefill attention (a 64- and a 512-token chunk): the native kernel vs SDPA;
- decode attention (1 and 8 sequences of 512 tokens): the native kernel vs batched matmuls;
- the whole native decode step vs the torch step built from the choices above (batch 1).

What the model's modules offer is part of the decision and of its one log line
(:meth:`KernelChoice.summary`): each linear's native form (``native_linear()``: bfloat16,
GGUF Q8_0/Q4_0/Q4_1 or int8 weights, see ``linear_kernels.py``) and whether every module has
one, without which the native decode step is off whatever was measured (``native_step.py``).

The decision is cached as JSON in ``$TOKENFACTORY_CACHE/kernel-choice/`` (default
``~/.cache/tokenfactory``), keyed by the CPU model name, its flags, the thread count, the
model's shapes and the torch version: only the first start on a machine pays (about a second
for SmolLM2-135M). ``kernels="native"`` or ``"torch"`` skip the measurement and force one side.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from tokenfactory.model import kernels, native_step
from tokenfactory.model.linear_kernels import native_linear_of

log = logging.getLogger(__name__)

MODES = ("auto", "native", "torch")
VERSION = 3   # bump when the candidates or the meaning of a field change
DECODE_ROWS = (1, 8)
PREFILL_ROWS = (16, 32)
SWITCH_MARGIN = 0.1
NOISY_SPREAD = 1.5   # median / best of a candidate above this: the host was busy
BUSY_SHARE = 0.75    # CPU time / (wall time x threads) below this while measuring: busy too
MAX_SECONDS = 10.0   # a measurement running longer than this stops, untrusted


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]

    @property
    def amx(self) -> bool:
        return "amx_bf16" in self.flags

    @classmethod
    def read(cls) -> "CpuInfo":
        name, flags = "unknown", ""
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and name == "unknown":
                    name = value.strip()
                elif key == "flags" and not flags:
                    flags = value
        except OSError:
            pass
        return cls(name, frozenset(flags.split()))


@dataclass
class KernelChoice:
    """What runs where. ``linear_native_max_rows``: ``CpuLinear`` calls the native kernel up
    to this many rows, oneDNN above (0: always oneDNN). ``rates``: candidate -> measured ms
    (one pass of the named work; empty unless measured)."""
    decode_step: bool
    linear_native_max_rows: int
    prefill_attention: str          # "native" | "sdpa"
    decode_attention: str           # "native" | "torch"
    source: str                     # "measured" | "cache" | "forced" | "default"
    mode: str = "auto"
    cpu: str = ""
    amx: bool = False
    threads: int = 0
    rates: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0            # measurement time (0 when read from the cache)
    noisy: list[str] = field(default_factory=list)   # decisive races the host disturbed
    # what the model's linear modules offer the native step: kind -> how many ("torch": none)
    linears: dict[str, int] = field(default_factory=dict)

    def labels(self) -> dict[str, str]:
        """String labels for an info metric."""
        return {"mode": self.mode, "source": self.source, "cpu": self.cpu,
                "amx": str(self.amx).lower(), "threads": str(self.threads),
                "decode_step": "native" if self.decode_step else "torch",
                "linear_native_max_rows": str(self.linear_native_max_rows),
                "prefill_attention": self.prefill_attention,
                "decode_attention": self.decode_attention,
                "linears": ",".join(f"{k}={n}" for k, n in sorted(self.linears.items()))}

    def summary(self, model=None) -> str:
        """The start-up log line: which backend runs what. With ``model``, its modules are
        asked now (their kinds, and why the native decode step is off if a module has no
        native form); without, the kinds recorded when the choice was made."""
        linears, step = self.linears, "native" if self.decode_step else "torch"
        quant_rows = "at decode sizes"
        if model is not None:
            linears = linear_kinds(model)
            rows = sorted({m.native_max_rows for m in model.modules()
                           if getattr(native_linear_of(m), "kind", "bf16") != "bf16"
                           and isinstance(getattr(m, "native_max_rows", None), int)})
            if rows:
                quant_rows = "up to " + "/".join(map(str, rows)) + " rows"
            _, why = native_step.offers(model)
            if why is not None:
                step = f"torch ({why})"
        rates = ", ".join(f"{k} {v:.2f}{'' if k == 'cpu_share' else 'ms'}"
                          for k, v in sorted(self.rates.items()))
        quant = {k: n for k, n in linears.items() if k not in ("bf16", "torch")}
        parts = []
        if linears.get("bf16") or not linears:   # (counts unknown: a forced choice)
            parts.append(f"{linears['bf16']} " if linears else "")
            parts[-1] += (f"bf16 (native kernel up to {self.linear_native_max_rows} rows, "
                          "oneDNN above)")
        if quant:
            parts.append(" + ".join(f"{n} {k}" for k, n in sorted(quant.items()))
                         + f" (quant.c {quant_rows}, the module's own path above)")
        if linears.get("torch"):
            parts.append(f"{linears['torch']} without a native form (torch)")
        return (f"kernels ({self.mode}, {self.source}) on {self.cpu!r}{' [AMX]' if self.amx else ''}"
                f" x{self.threads} threads: decode step {step}; linears {', '.join(parts)}; "
                f"prefill attention {self.prefill_attention}, "
                f"decode attention {self.decode_attention}" + (f"; measured {rates}" if rates else ""))


def linear_kinds(model) -> dict[str, int]:
    """Kind -> how many of ``model``'s linear modules offer that native form (``native_linear()``,
    see linear_kernels.py); "torch" counts those that offer none."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if callable(getattr(module, "native_embedding", None)):
            continue                  # a table offering rows, not a linear layer
        if isinstance(module, torch.nn.Linear) or callable(getattr(module, "native_linear", None)):
            form = native_linear_of(module)
            kind = "torch" if form is None else form.kind
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def route_linears(model, choice: "KernelChoice") -> int:
    """Set the row threshold of every bfloat16 linear that offers the native kernel (a
    ``CpuLinear``) from ``choice``; linears of other kinds keep their own rule (a quantized
    layer picks its kernels by rows itself). Returns how many were set."""
    count = 0
    for module in model.modules():
        form = native_linear_of(module) if hasattr(module, "native_max_rows") else None
        if form is not None and form.kind == "bf16":
            module.native_max_rows = choice.linear_native_max_rows
            count += 1
    return count


def forced(mode: str, native_available: bool, cpu: CpuInfo | None = None,
           threads: int | None = None) -> KernelChoice:
    """The choice for ``mode`` "native" (every native path this model supports), "torch"
    (none) or "default" (native wherever available: the rule before measurement existed)."""
    cpu = cpu or CpuInfo.read()
    native = native_available and mode != "torch"
    return KernelChoice(decode_step=native,
                        linear_native_max_rows=kernels.LINEAR_MAX_ROWS if native else 0,
                        prefill_attention="native" if native else "sdpa",
                        decode_attention="native" if native else "torch",
                        source="default" if mode == "default" else "forced", mode=mode,
                        cpu=cpu.model, amx=cpu.amx, threads=threads or torch.get_num_threads())


def cache_dir() -> Path:
    base = Path(os.environ.get("TOKENFACTORY_CACHE", Path.home() / ".cache" / "tokenfactory"))
    return base / "kernel-choice"


def cache_key(cpu: CpuInfo, threads: int, shape: dict) -> str:
    text = json.dumps({"version": VERSION, "cpu": cpu.model, "flags": sorted(cpu.flags),
                       "threads": threads, "shape": shape, "torch": torch.__version__},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def model_shape(model) -> dict:
    cfg = model.config
    return {"hidden": cfg.hidden_size, "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim, "intermediate": cfg.intermediate_size,
            "vocab": cfg.vocab_size, "layers": cfg.num_layers,
            "dtype": str(model.norm.weight.dtype), "linears": linear_kinds(model)}


def choose(measure: Callable[[], KernelChoice], shape: dict, *, cpu: CpuInfo | None = None,
           threads: int | None = None, directory: Path | None = None) -> KernelChoice:
    """The cached choice for this CPU, thread count and model shape, else ``measure()``'s
    (then written to the cache). ``cpu``/``threads``/``directory`` are injectable for tests."""
    cpu = cpu or CpuInfo.read()
    threads = threads or torch.get_num_threads()
    path = (directory or cache_dir()) / f"{cache_key(cpu, threads, shape)}.json"
    linears = dict(shape.get("linears", {}))
    try:
        data = json.loads(path.read_text())
        data.update(source="cache", seconds=0.0, linears=linears)
        return KernelChoice(**data)
    except (OSError, ValueError, TypeError):
        pass
    t0 = time.perf_counter()
    choice = measure()
    choice.linears = linears
    choice.source, choice.mode, choice.cpu, choice.amx, choice.threads = (
        "measured", "auto", cpu.model, cpu.amx, threads)
    choice.seconds = time.perf_counter() - t0
    if choice.noisy:
        # Timings taken while other processes held the cores decide nothing (measured here:
        # a loaded 2-core host slowed every candidate alike to seconds a pass and picked
        # oneDNN at batch 1, 2x slower on a quiet host). Keep the fixed rule for this
        # process, cache nothing: the next start measures again.
        log.warning("kernel choice measured on a busy host (%s): not used or cached, native "
                    "kernels wherever they run", ", ".join(choice.noisy))
        fallback = forced("default", True, cpu, threads)
        fallback.mode, fallback.source = "auto", "busy-host-default"
        fallback.rates, fallback.noisy, fallback.seconds = choice.rates, choice.noisy, choice.seconds
        fallback.linears = linears
        return fallback
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(choice), indent=1))
        os.replace(tmp, path)   # atomic: concurrent starts each write a whole file
    except OSError as exc:
        log.warning("kernel choice not cached (%s)", exc)
    return choice


# ------------------------------------------------------------------------ measurement
def _race(candidates: dict[str, Callable[[], object]], budget: float = 0.25,
          max_reps: int = 9, noise: list[str] | None = None,
          tag: str = "") -> dict[str, float]:
    """Best-of-n ms per candidate, timed in alternation (so a busy neighbour slows both
    alike) for at least 3 rounds and until ``budget`` seconds have passed. A candidate whose
    median is far above its best (another process held a core) is named in ``noise``."""
    for fn in candidates.values():
        fn()                               # warm-up: buffers, thread pool, first touch
    times: dict[str, list[float]] = {name: [] for name in candidates}
    start = time.perf_counter()
    for rep in range(max_reps):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
        if rep >= 2 and time.perf_counter() - start > budget:
            break
    best = {name: min(ts) for name, ts in times.items()}
    if noise is not None:
        noise.extend(f"{tag}_{name}" for name, ts in times.items()
                     if statistics.median(ts) > NOISY_SPREAD * best[name])
    return best


def _native_wins(native_ms: float, other_ms: float) -> bool:
    """The native path stays unless the other is clearly faster: a wrong switch away from
    the tuned kernels on a noisy measurement costs more than a missed few percent, and where
    oneDNN wins for real (AMX) it wins by far more than this margin."""
    return other_ms >= native_ms * (1 - SWITCH_MARGIN)


def _linear_candidates(model, rows: int, max_layers: int) -> dict[str, Callable[[], None]]:
    """One pass over the layers' bfloat16 linears (those offering a "bf16" native form) at
    ``rows`` rows, native kernel and oneDNN. Decode sizes go over every layer, so the weights
    stream from memory as in a real step. (Quantized linears pick their own kernels.)"""
    mods = [m for layer in model.layers[:max_layers]
            for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                      layer.mlp.gate_up_proj, layer.mlp.down_proj)
            if getattr(native_linear_of(m), "kind", None) == "bf16"]
    xs = {m.in_features: torch.randn(rows, m.in_features, dtype=torch.bfloat16) for m in mods}

    def native():
        for m in mods:
            kernels.linear(xs[m.in_features], m.weight, m.bias)

    def onednn():
        for m in mods:
            F.linear(xs[m.in_features], m.weight, m.bias)

    return {"native": native, "onednn": onednn} if mods else {}


def measure(executor) -> KernelChoice:
    """Time the candidates on ``executor``'s model (bfloat16, native kernels available, KV
    cache allocated: its scratch page takes the decode-step probes' K/V)."""
    from tokenfactory.model.layers import (AttentionMetadata, DecodeGroup, PrefillSeq, Workspace,
                                           paged_attention)
    model, cfg = executor.model, executor.model_config
    rates: dict[str, float] = {}
    noise: list[str] = []
    wall0, cpu0 = time.perf_counter(), time.process_time()

    def over() -> bool:   # a slow host: stop early (the choice then falls back, see choose)
        if time.perf_counter() - wall0 > MAX_SECONDS:
            noise.append(f"stopped after {MAX_SECONDS:.0f}s")
            return True
        return False

    with torch.inference_mode():
        # linears: native while it wins at every size up to there
        max_rows = 0
        for rows in (*DECODE_ROWS, *PREFILL_ROWS):
            cands = _linear_candidates(model, rows, cfg.num_layers if rows <= 8 else 8)
            if not cands or over():
                break
            t = _race(cands, noise=noise if rows in DECODE_ROWS else None,
                      tag=f"linear_{rows}")
            rates[f"linear_{rows}_native"], rates[f"linear_{rows}_onednn"] = t["native"], t["onednn"]
            if not _native_wins(t["native"], t["onednn"]):
                break
            max_rows = rows
        # attention, one layer's shapes on a private cache
        H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bs, ctx = 16, 512
        pages = ctx // bs
        kc = torch.randn(Hkv, 8 * pages + 1, bs, D, dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        scale = D ** -0.5
        ws = Workspace()
        wins = {"prefill": [0, 0], "decode": [0, 0]}
        for n in (64, 512):
            if over():
                break
            q = torch.randn(n, H, D, dtype=torch.bfloat16)
            k = torch.randn(n, Hkv, D, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            cands = {}
            for name in ("native", "sdpa"):
                meta = AttentionMetadata(block_size=bs, slot_mapping=torch.arange(n),
                                         workspace=ws, native_prefill=name == "native")
                meta.prefills.append(PrefillSeq(0, n, 0, torch.arange(-(-n // bs))))
                cands[name] = (lambda m: lambda: paged_attention(q, k, v, kc, vc, m, None,
                                                                 scale))(meta)
            t = _race(cands, budget=0.1)
            for name, ms in t.items():
                rates[f"prefill_attention_{n}_{name}"] = ms
            wins["prefill"][not _native_wins(t["native"], t["sdpa"])] += 1
        for b in (1, 8):
            if over():
                break
            q = torch.randn(b, H, D, dtype=torch.bfloat16)
            k = torch.randn(b, Hkv, D, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            tables = torch.arange(b * pages).view(b, pages)
            positions = torch.full((b,), ctx - 1)
            cands = {}
            for name in ("native", "torch"):
                meta = AttentionMetadata(block_size=bs, slot_mapping=tables[:, -1] * bs + bs - 1,
                                         num_decodes=b, workspace=ws,
                                         native_decode=name == "native")
                meta.decode_groups.append(DecodeGroup(0, b, tables, positions))
                cands[name] = (lambda m: lambda: paged_attention(q, k, v, kc, vc, m, None,
                                                                 scale))(meta)
            t = _race(cands, budget=0.1)
            for name, ms in t.items():
                rates[f"decode_attention_{b}_{name}"] = ms
            wins["decode"][not _native_wins(t["native"], t["torch"])] += 1
        choice = KernelChoice(decode_step=False, linear_native_max_rows=max_rows,
                              prefill_attention="native" if wins["prefill"][0] >= wins["prefill"][1]
                              else "sdpa",
                              decode_attention="native" if wins["decode"][0] >= wins["decode"][1]
                              else "torch", source="measured")
        # the whole native step vs the torch step made of the choices above, batch 1, its K/V
        # written to the scratch page (the executor's cache has one past num_blocks)
        if native_step.supports(model) and not over():
            executor.apply_kernel_choice(choice)
            step = native_step.NativeDecodeStep(model, executor.num_blocks, executor.block_size)
            scratch = executor.num_blocks
            t = _race({"native": lambda: step([0], [0], [scratch * executor.block_size],
                                              [[scratch]]),
                       "torch": lambda: _torch_step(executor, choice, scratch)}, budget=0.5,
                      noise=noise, tag="decode_step")
            rates["decode_step_native"], rates["decode_step_torch"] = t["native"], t["torch"]
            choice.decode_step = _native_wins(t["native"], t["torch"])
    # every candidate keeps all threads busy (OpenMP workers spin between calls): much less
    # CPU time than threads x wall time means other processes had the cores
    share = (time.process_time() - cpu0) / ((time.perf_counter() - wall0)
                                            * torch.get_num_threads())
    rates["cpu_share"] = share
    if share < BUSY_SHARE:
        noise.append(f"cpu_share_{share:.2f}")
    choice.rates = {k: round(v, 4) for k, v in rates.items()}
    choice.noisy = sorted(set(noise))
    return choice


def _torch_step(executor, choice: KernelChoice, scratch: int) -> torch.Tensor:
    from tokenfactory.model.layers import AttentionMetadata, DecodeGroup
    bs = executor.block_size
    meta = AttentionMetadata(block_size=bs, slot_mapping=torch.tensor([scratch * bs]),
                             num_decodes=1, workspace=executor._workspace,
                             native_decode=choice.decode_attention == "native")
    meta.decode_groups.append(DecodeGroup(0, 1, torch.tensor([[scratch]]), torch.tensor([0])))
    hidden = executor.model(torch.tensor([0]), torch.tensor([0]), meta)
    return executor.model.compute_logits(hidden)
