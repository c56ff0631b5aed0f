"""Hardware and model catalogs: plain dataclasses loaded from the JSON files in ``data/``.

A model can also be any Hugging Face ``config.json`` (a file, or a directory holding one), read
by the one config parser the model layer uses too (``tokenfactory.model_description``) into the
same ``ModelSpec`` the catalog produces.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from tokenfactory.model_description import (
    DTYPE_BYTES, MlaSpec, ModelDescription, ModelDescriptionError, describe_hf_config,
    dtype_bytes,
)

__all__ = ["DTYPE_BYTES", "CatalogError", "HardwareSpec", "MlaSpec", "ModelSpec", "dtype_bytes",
           "hardware_names", "load_hardware", "load_model", "model_from_hf_config",
           "model_names", "workload_table"]


class CatalogError(ValueError):
    """An unknown name or an unreadable/unsupported config; the message is meant for users."""


# The economics' name for the shared model description (dimensions, experts, windows, KV bytes).
ModelSpec = ModelDescription


# ---------------------------------------------------------------------------------------------
# Hardware
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HardwareSpec:
    key: str
    name: str
    memory_bytes: float
    bandwidth_bytes_per_s: float
    flops: dict[str, float]          # dense peak FLOP/s per precision
    tdp_watts: float
    cost_per_hour: float              # default $/hour per accelerator
    capex_usd: float
    source: str
    rack_accelerators: int = 1
    rack_kw: Optional[float] = None
    estimates: tuple[str, ...] = ()
    measured: bool = False

    def peak_flops(self, precision: str) -> float:
        """Dense peak for ``precision``; falls back to bf16 (then fp32) when the part has no
        native unit for it — e.g. fp8 weights on an A100 are upcast and multiplied in bf16."""
        p = precision.lower()
        aliases = {"bfloat16": "bf16", "float16": "bf16", "fp16": "bf16", "float32": "fp32",
                   "nvfp4": "fp4", "mxfp4": "fp4", "int4": "fp4", "fp8_e4m3": "fp8",
                   "fp8_e5m2": "fp8"}
        p = aliases.get(p, p)
        for candidate in (p, "bf16", "fp32"):
            value = self.flops.get(candidate)
            if value:
                return float(value)
        raise CatalogError(f"hardware {self.key!r} has no FLOP/s figure for {precision!r}")

    @property
    def watts_per_accelerator_in_rack(self) -> float:
        """IT power per accelerator including its share of CPUs, NICs, switches and fans."""
        if self.rack_kw and self.rack_accelerators:
            return self.rack_kw * 1000.0 / self.rack_accelerators
        return self.tdp_watts


def _data_text(name: str) -> str:
    return resources.files("tokenfactory.economics").joinpath("data").joinpath(name).read_text("utf-8")


@lru_cache(maxsize=None)
def _hardware_table() -> dict[str, dict[str, Any]]:
    table = json.loads(_data_text("hardware.json"))
    return {k: v for k, v in table.items() if not k.startswith("_")}


@lru_cache(maxsize=None)
def _model_table() -> dict[str, dict[str, Any]]:
    table = json.loads(_data_text("models.json"))
    return {k: v for k, v in table.items() if not k.startswith("_")}


@lru_cache(maxsize=None)
def workload_table() -> dict[str, dict[str, Any]]:
    table = json.loads(_data_text("workloads.json"))
    return {k: v for k, v in table.items() if not k.startswith("_")}


def hardware_names() -> list[str]:
    return list(_hardware_table())


def model_names() -> list[str]:
    return list(_model_table())


def _resolve(table: dict[str, dict[str, Any]], name: str) -> Optional[str]:
    wanted = name.strip().lower()
    for key, entry in table.items():
        if wanted == key or wanted in (a.lower() for a in entry.get("aliases", ())):
            return key
    return None


def load_hardware(name: str, host_seconds_budget: float = 5.0) -> HardwareSpec:
    """A catalog entry by name or alias. ``host`` runs ``measure_host`` (once per process)."""
    table = _hardware_table()
    key = _resolve(table, name)
    if key is None:
        raise CatalogError(f"unknown hardware {name!r}; valid: {', '.join(table)}")
    entry = table[key]
    if entry.get("measured"):
        return _host_spec(key, entry, host_seconds_budget)
    rack = entry.get("rack") or {}
    return HardwareSpec(
        key=key, name=entry["name"], memory_bytes=float(entry["memory_bytes"]),
        bandwidth_bytes_per_s=float(entry["bandwidth_bytes_per_s"]),
        flops={k: float(v) for k, v in entry["flops"].items()},
        tdp_watts=float(entry["tdp_watts"]), cost_per_hour=float(entry["cost_per_hour"]),
        capex_usd=float(entry["capex_usd"]), source=entry["source"],
        rack_accelerators=int(rack.get("accelerators", 1)), rack_kw=rack.get("kw"),
        estimates=tuple(entry.get("estimates", ())),
    )


@lru_cache(maxsize=4)
def _measured_host(seconds_budget: float):
    from .host import measure_host  # lazy: only ``--hardware host`` pays for the benchmark
    return measure_host(seconds_budget=seconds_budget)


def _host_spec(key: str, entry: dict[str, Any], seconds_budget: float) -> HardwareSpec:
    m = _measured_host(seconds_budget)
    flops = {"fp32": m.fp32_flops}
    if m.bf16_flops:
        flops["bf16"] = m.bf16_flops
    return HardwareSpec(
        key=key, name=entry["name"], memory_bytes=float(m.memory_bytes),
        bandwidth_bytes_per_s=m.bandwidth_bytes_per_s, flops=flops,
        tdp_watts=float(entry["tdp_watts"]), cost_per_hour=float(entry["cost_per_hour"]),
        capex_usd=float(entry["capex_usd"]), source=entry["source"],
        estimates=tuple(entry.get("estimates", ())), measured=True,
    )


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

def model_from_hf_config(config: dict[str, Any], name: str = "hf-config",
                         source: str = "Hugging Face config.json") -> ModelSpec:
    """Normalize a Hugging Face ``config.json`` dict into a ``ModelSpec``."""
    try:
        return describe_hf_config(config, name=name, source=source)
    except ModelDescriptionError as exc:
        raise CatalogError(str(exc)) from None


def load_model(name_or_path: str) -> ModelSpec:
    """A catalog model by name/alias, or a Hugging Face config.json (file or directory)."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            config = json.loads(path.read_text("utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CatalogError(f"cannot read model config {str(path)!r}: {exc}") from None
        return model_from_hf_config(config, name=str(path),
                                    source=f"{path} (Hugging Face config)")
    table = _model_table()
    key = _resolve(table, name_or_path)
    if key is None:
        if os.sep in name_or_path or name_or_path.endswith(".json"):
            raise CatalogError(f"model config {name_or_path!r} not found")
        raise CatalogError(f"unknown model {name_or_path!r}; valid: {', '.join(table)} "
                           "or a path to a Hugging Face config.json")
    return _model_from_catalog(key, table[key])


def _pattern_windows(layers: int, window: Optional[int], pattern: list[str]) -> tuple:
    if not window or not pattern:
        return (None,) * layers
    return tuple(window if pattern[i % len(pattern)] == "local" else None for i in range(layers))


def _model_from_catalog(key: str, e: dict[str, Any]) -> ModelSpec:
    layers = int(e["layers"])
    moe = e.get("moe")
    moe_kwargs: dict[str, Any] = {}
    if moe:
        step = int(moe.get("layer_step", 1))
        dense = set(moe.get("dense_layers", ()))
        moe_kwargs = dict(
            num_experts=int(moe["experts"]), experts_per_token=int(moe["top_k"]),
            expert_intermediate_size=int(moe["expert_intermediate_size"]),
            shared_expert_intermediate_size=int(moe.get("shared_experts", 0))
            * int(moe["expert_intermediate_size"]),
            moe_layers=tuple(i for i in range(step - 1, layers, step) if i not in dense),
        )
    mla = MlaSpec(**e["mla"]) if e.get("mla") else None
    attention = e.get("attention") or {}
    return ModelSpec(
        name=key, source=e["source"], num_layers=layers, hidden_size=int(e["hidden_size"]),
        num_heads=int(e["heads"]), num_kv_heads=int(e["kv_heads"]), head_dim=int(e["head_dim"]),
        vocab_size=int(e["vocab_size"]), intermediate_size=int(e["intermediate_size"]),
        tied_embeddings=bool(e.get("tied_embeddings", False)),
        max_context=int(e.get("max_context", 0)), mla=mla,
        layer_windows=_pattern_windows(layers, attention.get("window"),
                                       attention.get("pattern", [])),
        **moe_kwargs,
    )
