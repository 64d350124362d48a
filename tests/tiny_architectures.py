"""Tiny random bases of every served architecture (model_store.architectures), for the
architecture matrix test and the bring-your-own-model tests.

Each config is the architecture's own transformers config at toy sizes, with the settings
that make it differ from Llama set so that a server ignoring them would be caught: a sliding
window shorter than the test prompts, hybrid sliding/full layers, an output soft-cap, scale
or divisor far from 1, MoE experts, Conv1D layers, fused QKV projections.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from tests.common import tiny_tokenizer

WINDOW = 6
"""Sliding window of the windowed architectures: shorter than every test prompt."""
HYBRID = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]

_SIZES = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
_MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 16}

CONFIGS: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": WINDOW},
    "qwen2": {},
    "qwen3": {"head_dim": 8},
    "qwen3_moe": {"head_dim": 8, "num_experts": 4, **_MOE},
    "gemma": {"head_dim": 8},
    "gemma2": {
        "head_dim": 8,
        "num_hidden_layers": 4,
        "sliding_window": WINDOW,
        "layer_types": HYBRID,
        "final_logit_softcapping": 0.5,
    },
    "gemma3_text": {
        "head_dim": 8,
        "num_hidden_layers": 4,
        "sliding_window": WINDOW,
        "layer_types": HYBRID,
        "final_logit_softcapping": 0.5,
    },
    "phi3": {"original_max_position_embeddings": 256},
    "olmo2": {},
    "granite": {"logits_scaling": 0.25},
    "stablelm": {},
    "gpt_neox": {},
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256},
    "cohere": {"logit_scale": 4.0},
    "smollm3": {},
    "gpt_oss": {
        "head_dim": 8,
        "num_hidden_layers": 4,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": WINDOW,
        "layer_types": HYBRID,
    },
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, **_MOE, "shared_expert_intermediate_size": 32},
    "phi": {},
    "olmo": {},
    "starcoder2": {"sliding_window": WINDOW},
    "cohere2": {
        "num_hidden_layers": 4,
        "sliding_window": WINDOW,
        "layer_types": HYBRID,
        "logit_scale": 4.0,
    },
    "granitemoe": {"num_local_experts": 4, "num_experts_per_tok": 2, "logits_scaling": 0.25},
    "olmo3": {"num_hidden_layers": 4, "sliding_window": WINDOW, "layer_types": HYBRID},
    "ministral": {
        "num_hidden_layers": 4,
        "sliding_window": WINDOW,
        "layer_types": HYBRID,
        "head_dim": 8,
    },
    "glm4": {},
    "exaone4": {"num_hidden_layers": 4, "sliding_window": WINDOW, "layer_types": HYBRID},
    "falcon": {},
    "opt": {"ffn_dim": 64, "word_embed_proj_dim": 32},
    "gptj": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256, "rotary_dim": 4},
    "bloom": {"n_layer": 2, "n_head": 4},
    "gpt_bigcode": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256},
}
"""Per served model_type, what its tiny config sets beyond the common sizes."""


def tiny_config(model_type: str, vocab_size: int, eos: int) -> PretrainedConfig:
    extra = CONFIGS[model_type]
    sizes = {} if model_type in ("gpt2", "gptj", "gpt_bigcode") else _SIZES
    ids = {"eos_token_id": eos, "bos_token_id": eos, "pad_token_id": eos}
    return AutoConfig.for_model(model_type, vocab_size=vocab_size, **{**sizes, **ids, **extra})


def write_tiny_base(path: Path, model_type: str, seed: int = 0) -> Path:
    """A random base of `model_type` with the tiny tokenizer, saved as a HF folder."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = tiny_config(model_type, len(tokenizer), tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger random weights than the init, so choices are not ties
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed" not in name and "wte" not in name:
                param.normal_(0.0, 0.2)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path
