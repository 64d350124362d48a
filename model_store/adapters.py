"""Read PEFT LoRA adapter folders without PEFT's model wrapping (safetensors only)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from merging.lora import LoraFactors
from model_store.errors import StoreError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_UNSUPPORTED_FLAGS = ("use_dora", "fan_in_fan_out")


@dataclass(frozen=True)
class LoraAdapter:
    """One adapter: its factors for each targeted module of the base model."""

    name: str
    """Name for messages."""
    path: Path
    """Adapter folder."""
    modules: dict[str, LoraFactors]
    """Base-model module name (e.g. model.layers.0.self_attn.q_proj) -> factors."""


def _scale(config: dict, module: str, rank: int) -> float:
    alpha = config.get("alpha_pattern", {}).get(module, config.get("lora_alpha", rank))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _module_name(key: str) -> tuple[str, str]:
    """'base_model.model.model.layers.0.q_proj.lora_A.weight' -> ('model.layers.0.q_proj', 'A')."""
    stem = key.removeprefix("base_model.model.")
    for part in ("A", "B"):
        for suffix in (f".lora_{part}.weight", f".lora_{part}.default.weight"):
            if stem.endswith(suffix):
                return stem.removesuffix(suffix), part
    raise ValueError(key)


def load_lora_adapter(path: Path, name: str, dtype: torch.dtype) -> LoraAdapter:
    """Load a PEFT LoRA adapter; any problem raises StoreError naming the file."""
    config_path = path / ADAPTER_CONFIG
    weights_path = path / ADAPTER_WEIGHTS
    for required in (config_path, weights_path):
        if not required.is_file():
            raise StoreError(required, "missing (a PEFT adapter needs config and safetensors)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise StoreError(config_path, f"not valid JSON: {exc}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise StoreError(config_path, f"peft_type {config.get('peft_type')!r} is not LORA")
    for flag in _UNSUPPORTED_FLAGS:
        if config.get(flag):
            raise StoreError(config_path, f"{flag}=true is not supported")
    if config.get("modules_to_save"):
        raise StoreError(config_path, "modules_to_save is not supported (one base serves all)")
    tensors = load_file(str(weights_path))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        try:
            module, part = _module_name(key)
        except ValueError:
            raise StoreError(weights_path, f"unexpected tensor {key!r} (only LoRA A/B)") from None
        pairs.setdefault(module, {})[part] = tensor
    modules: dict[str, LoraFactors] = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise StoreError(weights_path, f"{module} lacks lora_{'A' if 'A' not in pair else 'B'}")
        lora_a, lora_b = pair["A"], pair["B"]
        if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.shape[0] != lora_b.shape[1]:
            raise StoreError(
                weights_path,
                f"{module}: A {tuple(lora_a.shape)} and B "
                f"{tuple(lora_b.shape)} do not form a LoRA pair",
            )
        rank = lora_a.shape[0]
        modules[module] = LoraFactors(
            lora_a.to(dtype), lora_b.to(dtype), _scale(config, module.rsplit(".", 1)[-1], rank)
        )
    if not modules:
        raise StoreError(weights_path, "holds no LoRA tensors")
    return LoraAdapter(name=name, path=path, modules=modules)
