"""Tiny random models and stores for CPU tests (built in seconds, no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from model_store.builder import (
    circulant_backbone_weights,
    random_value_head,
    write_manifest,
    write_random_lora,
    write_value_head,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Héllo wörld, naïve café — ünïcödé 東京 ありがとう 😀 ✓",
    "Merge and guide: controllable multi-objective generation with value models.",
    "How do I bake bread? Mix flour, water, salt and yeast, then wait.",
] * 20


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (multi-byte characters span several tokens), trained in memory."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|end|>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", pad_token="<|end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=0,
        bos_token_id=None,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def write_tiny_base(path: Path, seed: int = 0) -> LlamaForCausalLM:
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer), seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return model


def build_tiny_store(
    root: Path,
    objectives: tuple[str, ...] = ("helpful", "harmless"),
    beta: float | None = 0.7,
    alpha: float = 0.0,
    value_kind: str | None = "lora",
    head_kind: str = "tied",
    lora_std: float = 0.3,
    seed: int = 0,
) -> Path:
    """A complete store on a random 2-layer Llama: n backbones, n value models, manifest.

    beta=None gives B = I (a Rewarded-Soup store). Backbones get different ranks and
    target modules, so merging must handle mismatched adapters.
    """
    root.mkdir(parents=True, exist_ok=True)
    base = write_tiny_base(root / "base", seed)
    n = len(objectives)
    weights = (
        circulant_backbone_weights(list(objectives), beta)
        if beta is not None
        else torch.eye(n).tolist()
    )
    target_sets = [("q_proj", "v_proj"), ("q_proj", "o_proj", "down_proj"), ("k_proj", "up_proj")]
    backbones = []
    for i, name in enumerate(objectives):
        write_random_lora(
            base,
            root / f"backbones/{name}",
            rank=2 + 2 * (i % 2),
            targets=target_sets[i % 3],
            seed=seed + 10 + i,
            std=lora_std,
        )
        backbones.append({"name": f"bb-{name}", "path": f"backbones/{name}", "weights": weights[i]})
    explicit = []
    hidden, vocab = base.config.hidden_size, base.config.vocab_size
    for i, name in enumerate(objectives if value_kind else ()):
        if value_kind == "lora":
            write_random_lora(
                base,
                root / f"values/{name}",
                rank=2,
                targets=("q_proj", "gate_proj"),
                seed=seed + 20 + i,
                std=lora_std,
            )
        else:
            tiny_llama(vocab, seed=seed + 30 + i).save_pretrained(str(root / f"values/{name}"))
        write_value_head(
            random_value_head(hidden, vocab, head_kind, seed=seed + 40 + i, std=0.5),
            root / f"values/{name}-head.safetensors",
        )
        explicit.append(
            {
                "objective": name,
                "kind": value_kind,
                "path": f"values/{name}",
                "head": f"values/{name}-head.safetensors",
            }
        )
    write_manifest(
        root,
        {
            "name": "tiny",
            "objectives": list(objectives),
            "base": {"path": "base"},
            "backbones": backbones,
            "alpha": alpha,
            "beta": beta,
            "guidance": {"explicit": explicit, "implicit": True},
            "defaults": {"guidance_mode": "none", "gamma": 1.0, "max_new_tokens": 8},
        },
    )
    return root
