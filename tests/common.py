"""Tiny random models and stores for CPU tests (built in seconds, no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from guidance.requests import GenerationRequest, SamplingParams
from model_store.builder import build_random_store

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
    seed: int = 0,
    specialists: bool = False,
) -> Path:
    """A complete store on a random 2-layer Llama: n backbones, n value models, manifest.

    Large random LoRA deltas (std 0.3) so that preferences visibly change the outputs.
    """
    root.mkdir(parents=True, exist_ok=True)
    write_tiny_base(root / "base", seed)
    return build_random_store(
        root,
        {"path": "base"},
        list(objectives),
        beta,
        alpha,
        value_kind,
        head_kind,
        lora_std=0.3,
        head_std=0.5,
        seed=seed,
        name="tiny",
        with_specialists=specialists,
    )


def make_request(
    store,
    prompt: str,
    mu=(0.5, 0.5),
    mode: str = "explicit",
    max_new: int = 8,
    sampling: SamplingParams | None = None,
    method: str = "bone-soup",
    gamma: float = 1.0,
    stop: tuple[str, ...] = (),
    name: str = "r",
) -> GenerationRequest:
    """An engine request for a raw prompt (no chat template)."""
    ids = store.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return GenerationRequest(
        name,
        tuple(ids),
        torch.tensor(mu, dtype=torch.float64),
        mode,
        gamma,
        sampling or SamplingParams(),
        max_new,
        tuple(stop),
        merge_method=method,
    )
