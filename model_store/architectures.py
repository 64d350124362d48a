"""Which base architectures the server serves exactly, and how each turns hidden states into
logits.

The engine runs a base's decoder itself (guidance.kv) and scores the final hidden states
against the output embedding itself (guidance.batch), so it must apply whatever the model's
own `*ForCausalLM.forward` applies after `lm_head`: Cohere multiplies by `logit_scale`,
Granite divides by `logits_scaling`, Gemma 2/3 soft-cap by `final_logit_softcapping`.
An architecture is served only if it is in ARCHITECTURES, whose every entry the architecture
matrix test (tests/test_architectures.py) checks against transformers' own `generate` on an
independent PEFT merge; any other `model_type` is refused by name when the store is checked
(`mage store validate`, and `mage serve` before it binds its port). Loading then compares
our logits with the model's own forward once (`verify_output_head`), so a config option that
changes the head of an allowed architecture cannot slip through either.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import get_layer_types_and_kwargs

from model_store.errors import StoreError


@dataclass(frozen=True)
class Architecture:
    """One served `model_type` (a transformers config's)."""

    model_type: str
    """transformers' `model_type` (config.json)."""
    name: str
    """Its name in docs and messages."""
    head: str = "plain"
    """What forward does after lm_head: `plain` (nothing), `logit_scale` (times the model's
    logit_scale), `logits_scaling` (divided by config.logits_scaling) or `softcap`
    (cap * tanh(logits / cap), cap = config.final_logit_softcapping, when set)."""
    example: str = ""
    """A public checkpoint of this architecture, for the docs."""


ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture("llama", "Llama", example="meta-llama/Llama-3.2-1B-Instruct, SmolLM2"),
        Architecture("mistral", "Mistral (sliding window)", example="mistralai/Mistral-7B-v0.1"),
        Architecture("qwen2", "Qwen2 / Qwen2.5", example="Qwen/Qwen2.5-0.5B-Instruct"),
        Architecture("qwen3", "Qwen3", example="Qwen/Qwen3-0.6B"),
        Architecture("qwen3_moe", "Qwen3-MoE", example="Qwen/Qwen3-30B-A3B"),
        Architecture("gemma", "Gemma", example="google/gemma-2b-it"),
        Architecture("gemma2", "Gemma 2", "softcap", example="google/gemma-2-2b-it"),
        Architecture("gemma3_text", "Gemma 3 (text)", "softcap", example="google/gemma-3-1b-it"),
        Architecture("phi3", "Phi-3", example="microsoft/Phi-3-mini-4k-instruct"),
        Architecture("olmo2", "OLMo 2", example="allenai/OLMo-2-0425-1B-Instruct"),
        Architecture(
            "granite", "Granite", "logits_scaling", example="ibm-granite/granite-3.3-2b-instruct"
        ),
        Architecture("stablelm", "StableLM", example="stabilityai/stablelm-2-1_6b-chat"),
        Architecture("gpt_neox", "GPT-NeoX / Pythia", example="EleutherAI/pythia-160m"),
        Architecture("gpt2", "GPT-2 (Conv1D)", example="openai-community/gpt2"),
        Architecture(
            "cohere", "Cohere Command-R", "logit_scale", example="CohereLabs/c4ai-command-r-v01"
        ),
        Architecture("smollm3", "SmolLM3", example="HuggingFaceTB/SmolLM3-3B"),
        Architecture("gpt_oss", "gpt-oss (MoE, sliding + full)", example="openai/gpt-oss-20b"),
        Architecture("mixtral", "Mixtral (MoE)", example="mistralai/Mixtral-8x7B-Instruct-v0.1"),
        Architecture("qwen2_moe", "Qwen1.5/2-MoE", example="Qwen/Qwen1.5-MoE-A2.7B-Chat"),
        Architecture("phi", "Phi-1/2", example="microsoft/phi-2"),
        Architecture("olmo", "OLMo", example="allenai/OLMo-1B-hf"),
        Architecture("starcoder2", "StarCoder2 (sliding window)", example="bigcode/starcoder2-3b"),
        Architecture(
            "cohere2",
            "Cohere2 (sliding + full)",
            "logit_scale",
            example="CohereLabs/c4ai-command-r7b-12-2024",
        ),
        Architecture(
            "granitemoe",
            "Granite MoE",
            "logits_scaling",
            example="ibm-granite/granite-3.1-1b-a400m-instruct",
        ),
        Architecture("olmo3", "OLMo 3 (sliding + full)", example="allenai/Olmo-3-7B-Instruct"),
        Architecture(
            "ministral",
            "Ministral (sliding + full)",
            example="mistralai/Ministral-8B-Instruct-2410",
        ),
        Architecture("glm4", "GLM-4", example="zai-org/GLM-4-9B-0414"),
        Architecture("exaone4", "EXAONE 4 (sliding + full)", example="LGAI-EXAONE/EXAONE-4.0-1.2B"),
        Architecture("falcon", "Falcon", example="tiiuae/falcon-7b-instruct"),
        Architecture("opt", "OPT", example="facebook/opt-125m"),
        Architecture("gptj", "GPT-J", example="EleutherAI/gpt-j-6b"),
        Architecture("bloom", "BLOOM (ALiBi)", example="bigscience/bloom-560m"),
        Architecture("gpt_bigcode", "StarCoder (GPT-BigCode)", example="bigcode/starcoderbase-1b"),
    )
}
"""Every architecture the server serves, each checked by the architecture matrix test."""

SERVED_LAYER_KINDS = frozenset({"full_attention", "sliding_attention"})
"""Attention layers the KV lanes hold (guidance.kv)."""


def layer_windows(config) -> list[int | None]:
    """Per decoder layer, its attention window: None for full attention, W for a sliding
    window of W tokens (the query and the W - 1 before it: transformers' sliding mask).
    Mistral's single `sliding_window`, Gemma 2/3's and gpt-oss's alternating `layer_types`
    all read through transformers' own per-layer reading of the config. ValueError names any
    other kind of layer (chunked, linear or recurrent attention, shared KV), which these lanes
    do not hold."""
    types, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    unknown = sorted(set(types) - SERVED_LAYER_KINDS)
    if unknown:
        raise ValueError(
            f"layers of kind {unknown}: only full and sliding-window attention are served"
        )
    return [
        kw.get("sliding_window") if kind == "sliding_attention" else None
        for kind, kw in zip(types, kwargs, strict=True)
    ]


def read_config(model_path: Path) -> PretrainedConfig:
    """A model folder's config, local and without remote code; StoreError naming the file."""
    config_path = model_path / "config.json"
    if not config_path.is_file():
        raise StoreError(config_path, "missing model config")
    try:
        return AutoConfig.from_pretrained(
            str(model_path), local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:  # noqa: BLE001 -- any failure to parse user data is named, not raised
        raise StoreError(config_path, f"not a config transformers can read: {exc}") from None


def declared_model_type(model_path: Path) -> str | None:
    """config.json's model_type as written, read before transformers parses the config, so
    an architecture the server does not serve is refused by name even where transformers'
    own config class would fail on it."""
    config_path = model_path / "config.json"
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(config_path, f"not a readable JSON config: {exc}") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    return model_type if isinstance(model_type, str) else None


def check_architecture(model_path: Path) -> Architecture:
    """The model's Architecture; StoreError naming the config when the server cannot serve
    it exactly (an architecture outside ARCHITECTURES, a quantized checkpoint, attention
    layers other than full and sliding-window)."""
    config_path = model_path / "config.json"
    if not config_path.is_file():
        raise StoreError(config_path, "missing model config")
    model_type = declared_model_type(model_path)
    architecture = ARCHITECTURES.get(str(model_type))
    if architecture is None:
        served = ", ".join(sorted(ARCHITECTURES))
        raise StoreError(
            config_path,
            f"model_type {model_type!r} is not an architecture this server is tested to serve "
            f"exactly (served: {served})",
        )
    config = read_config(model_path)
    quantization = getattr(config, "quantization_config", None)
    if quantization:
        method = (
            quantization.get("quant_method")
            if isinstance(quantization, dict)
            else getattr(quantization, "quant_method", quantization)
        )
        raise StoreError(
            config_path,
            f"{architecture.name}: quantized checkpoints (quant_method={method!r}) are not "
            "served; LoRA rows need plain weights (dequantize to bf16 or fp32 first)",
        )
    try:
        layer_windows(config)
    except ValueError as exc:
        raise StoreError(config_path, f"{architecture.name}: {exc}") from None
    return architecture


@dataclass(frozen=True)
class OutputHead:
    """lm_head and what the model's forward applies after it (Architecture.head)."""

    weight: torch.Tensor
    """(vocab, hidden): the output embedding E."""
    bias: torch.Tensor | None
    """(vocab,) or None."""
    multiply: float | None = None
    """Cohere: logits * logit_scale."""
    divide: float | None = None
    """Granite: logits / logits_scaling."""
    softcap: float | None = None
    """Gemma 2/3: cap * tanh(logits / cap)."""

    def finish(self, raw: torch.Tensor) -> torch.Tensor:
        """The model's own transforms of E h + b, in the same order and dtype."""
        if self.multiply is not None:
            raw = raw * self.multiply
        if self.divide is not None:
            raw = raw / self.divide
        if self.softcap is not None:
            raw = torch.tanh(raw / self.softcap) * self.softcap
        return raw

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (..., vocab) exactly as the model's forward computes them."""
        return self.finish(functional.linear(hidden, self.weight, self.bias))


def output_head(model: PreTrainedModel, architecture: Architecture) -> OutputHead:
    embedding = model.get_output_embeddings()
    head = OutputHead(embedding.weight, getattr(embedding, "bias", None))
    config = model.config
    if architecture.head == "logit_scale":
        return OutputHead(head.weight, head.bias, multiply=float(model.logit_scale))
    if architecture.head == "logits_scaling":
        return OutputHead(head.weight, head.bias, divide=float(config.logits_scaling))
    if architecture.head == "softcap" and config.final_logit_softcapping is not None:
        return OutputHead(head.weight, head.bias, softcap=float(config.final_logit_softcapping))
    return head


@torch.inference_mode()
def verify_output_head(model: PreTrainedModel, head: OutputHead, where: Path) -> None:
    """Our logits against the model's own forward on a few tokens: StoreError if they differ
    beyond rounding (a transform this module does not know of)."""
    vocab = head.weight.shape[0]
    device = head.weight.device
    ids = (torch.arange(8, device=device) * 7 % vocab)[None]  # (1, 8)
    expected = model(input_ids=ids).logits[0].float()  # (8, vocab)
    hidden = model.get_decoder()(input_ids=ids).last_hidden_state[0]
    ours = head.logits(hidden).float()
    scale = max(1.0, float(expected.abs().max()))
    tolerance = (1e-5 if head.weight.dtype == torch.float32 else 1e-2) * scale
    difference = float((ours - expected).abs().max())
    if not math.isfinite(difference) or difference > tolerance:
        raise StoreError(
            where,
            f"the server's logits differ from the model's own forward by {difference:.3g} "
            f"(tolerance {tolerance:.3g}): refusing to serve wrong numbers",
        )


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """The last name segment of every Linear or Conv1D inside the decoder layers (what LoRA
    can target: q_proj, c_attn, query_key_value, ...), MoE routers excluded."""
    from transformers.pytorch_utils import Conv1D

    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.get_decoder().named_modules()
        if isinstance(module, torch.nn.Linear | Conv1D)
        and any(part.isdigit() for part in name.split("."))  # inside a numbered layer
    }
    return sorted(names - ROUTER_NAMES)


ROUTER_NAMES = frozenset({"gate", "router", "shared_expert_gate"})
"""MoE routing layers: never LoRA targets by default."""
FUSED_ATTENTION = (["qkv_proj"], ["query_key_value"], ["c_attn"], ["Wqkv"])
"""Fused query-key-value projections, the default target where q_proj/v_proj do not exist."""


def default_lora_targets(model: torch.nn.Module) -> tuple[str, ...]:
    """PEFT's default LoRA targets for the model's type (its own mapping), else q_proj and
    v_proj, else the fused query-key-value projection, whichever the model has (where PEFT
    has no mapping it asks for target_modules); ValueError otherwise, listing the layers."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    present = linear_layer_names(model)
    mapped = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model.config.model_type)
    for targets in (mapped, ["q_proj", "v_proj"], *FUSED_ATTENTION):
        if targets and set(targets) <= set(present):
            return tuple(targets)
    raise ValueError(
        f"no default LoRA targets for model_type {model.config.model_type!r}; "
        f"choose among its layers: {', '.join(present)}"
    )


def uses_conv1d(model: torch.nn.Module, targets: tuple[str, ...] | list[str]) -> bool:
    """Whether the targeted layers are GPT-2-style Conv1D (PEFT's `fan_in_fan_out`)."""
    from transformers.pytorch_utils import Conv1D

    return any(
        isinstance(module, Conv1D) and name.rsplit(".", 1)[-1] in targets
        for name, module in model.named_modules()
    )


def resolve_lora_targets(spec: str, model_path: Path) -> tuple[str, ...]:
    """LoRA target modules from a command-line spec: `auto` (the model's defaults, see
    default_lora_targets), `all-linear` (every Linear/Conv1D of its layers, routers aside),
    or comma-separated names. The model is built on the meta device: no weights are read."""
    if spec not in ("auto", "all-linear"):
        return tuple(name.strip() for name in spec.split(",") if name.strip())
    from transformers import AutoModelForCausalLM

    config = read_config(Path(model_path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if spec == "all-linear":
        return tuple(linear_layer_names(model))
    return default_lora_targets(model)
