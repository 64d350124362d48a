"""Read PEFT LoRA adapter folders without PEFT's model wrapping (safetensors only).

The server applies an adapter as scale * B @ A on nn.Linear layers and nothing else, so
an adapter_config.json option that changes what an adapter computes (DoRA magnitudes,
LoRA biases, extra trained modules, LoRA on MoE expert parameters, ...) is refused by name
rather than silently dropped. Options PEFT only uses at training or initialisation are
ignored. GPT-2's Conv1D layers (`fan_in_fan_out`) are served: their weight is stored
transposed, (in, out), but the adapter's contribution x A^T B^T is the same as for a Linear.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError
from safetensors.torch import load_file

from merging.lora import LoraFactors
from model_store.errors import StoreError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"
HONOURED_OPTIONS = frozenset(
    {"r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "peft_type"}
    # Which modules got adapters: the weights file holds exactly those, so loading it by
    # tensor names honours these without reading them.
    | {"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"}
    # The base weight's orientation (Conv1D stores (in, out)); the loader reads it from the
    # layer itself, as PEFT does, and the static shape check from this flag.
    | {"fan_in_fan_out"}
)
"""adapter_config.json keys whose meaning the server implements."""
IGNORED_OPTIONS = frozenset(
    {"task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision"}
    | {"inference_mode", "lora_dropout", "runtime_config", "ensure_weight_tying"}
    # initialisation only (the saved A and B are what counts)
    | {"init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config"}
    # meaningful only with an option refused below (megatron_config, use_qalora)
    | {"megatron_core", "qalora_group_size"}
)
"""Keys that do not change what a loaded adapter computes."""
_PEFT_DEFAULTS = {f.name: f.default for f in dataclasses.fields(LoraConfig)}


def _is_set(key: str, value: Any) -> bool:
    if key == "bias":
        return value != "none"
    return value not in (None, False, "", {}, [])


def refused_options(config: dict[str, Any]) -> list[str]:
    """Options set in `config` that the server does not implement: use_dora, bias,
    lora_bias, modules_to_save, trainable_token_indices, layer_replication, target_parameters
    (LoRA on MoE expert parameters), alora_invocation_tokens, use_qalora, megatron_config,
    arrow_config, ... and any key this PEFT version does not know, unless it is unset."""
    return sorted(
        key
        for key, value in config.items()
        if key not in HONOURED_OPTIONS | IGNORED_OPTIONS and _is_set(key, value)
    )


@dataclass(frozen=True)
class LoraAdapter:
    """One adapter: its factors for each targeted module of the base model."""

    name: str
    """Name for messages."""
    path: Path
    """Adapter folder."""
    modules: dict[str, LoraFactors]
    """Base-model module name (e.g. model.layers.0.self_attn.q_proj) -> factors."""
    fan_in_fan_out: bool = False
    """The targeted weights are stored (in, out), as GPT-2's Conv1D (PEFT's flag)."""


def _scale(config: dict[str, Any], module: str, rank: int, where: Path) -> float:
    """PEFT's scaling for `module` (its full name, e.g. model.layers.0.self_attn.q_proj):
    rank_pattern and alpha_pattern keys are matched as PEFT matches them (get_pattern_key:
    a regex against the end of the full name), not by the module's last segment."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(
        get_pattern_key(rank_pattern.keys(), module), config.get("r", _PEFT_DEFAULTS["r"])
    )
    if r != rank:
        raise StoreError(where, f"{module}: tensors have rank {rank}, the config says r={r}")
    alpha = alpha_pattern.get(
        get_pattern_key(alpha_pattern.keys(), module),
        config.get("lora_alpha", _PEFT_DEFAULTS["lora_alpha"]),
    )
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        with path.open("rb") as handle:
            head = handle.read(4)
        # torch.save writes a zip archive (PK..) or, in its legacy format, a raw pickle
        # (protocol opcode 0x80): say so, since the file name claims safetensors.
        if head.startswith(b"PK") or head[:1] == b"\x80":
            raise StoreError(
                path, "is a pickle (torch.save) file, not safetensors: pickle is never loaded"
            ) from None
        raise StoreError(path, f"not a readable safetensors file: {exc}") from None


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
    if not weights_path.is_file() and (path / PICKLE_WEIGHTS).is_file():
        raise StoreError(
            path / PICKLE_WEIGHTS,
            f"pickle weights are never loaded; convert them to {ADAPTER_WEIGHTS}",
        )
    for required in (config_path, weights_path):
        if not required.is_file():
            raise StoreError(required, "missing (a PEFT adapter needs config and safetensors)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise StoreError(config_path, f"not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise StoreError(config_path, "not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise StoreError(config_path, f"peft_type {config.get('peft_type')!r} is not LORA")
    refused = refused_options(config)
    if refused:
        settings = ", ".join(f"{key}={config[key]!r}" for key in refused)
        raise StoreError(config_path, f"LoRA options the server does not implement: {settings}")
    tensors = _read_weights(weights_path)
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
            lora_a.to(dtype), lora_b.to(dtype), _scale(config, module, rank, config_path)
        )
    if not modules:
        raise StoreError(weights_path, "holds no LoRA tensors")
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    return LoraAdapter(name=name, path=path, modules=modules, fan_in_fan_out=fan_in_fan_out)
