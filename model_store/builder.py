"""Write stores: the circulant B helper, adapters, heads, and a manifest with checksums."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedModel

from guidance.value_head import ValueHead, save_value_head
from merging.coefficients import circulant_matrix
from model_store.manifest import MANIFEST_NAME, StoreManifest
from model_store.validate import sha256_file


def circulant_backbone_weights(objectives: list[str], beta: float) -> list[list[float]]:
    """w_i for each backbone i: the columns of the circulant B of Eq. (12)."""
    matrix = circulant_matrix(beta, len(objectives))
    return [[round(float(v), 12) for v in column] for column in matrix.T]


def write_random_lora(
    base: PreTrainedModel,
    path: Path,
    rank: int = 4,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 0,
    std: float = 0.02,
    alpha: int | None = None,
) -> None:
    """A PEFT LoRA adapter with random A and B (PEFT leaves B at 0; we fill it) for tests
    and untrained demos. The base model is left unchanged."""
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha or 2 * rank,
        target_modules=list(targets),
        lora_dropout=0.0,
        init_lora_weights=False,
    )
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, std)
    peft_model.save_pretrained(str(path), safe_serialization=True)
    peft_model.unload()  # restore the base's original linears


def random_value_head(
    hidden: int, vocab: int, kind: str = "tied", seed: int = 0, std: float = 0.05
) -> ValueHead:
    gen = torch.Generator().manual_seed(seed)
    if kind == "dense":
        tensors = {
            "weight": torch.randn(vocab, hidden, generator=gen) * std,
            "bias": torch.randn(vocab, generator=gen) * std,
        }
    else:
        tensors = {
            "proj": torch.randn(hidden, hidden, generator=gen) * std,
            "proj_bias": torch.randn(hidden, generator=gen) * std,
            "out_bias": torch.randn(vocab, generator=gen) * std,
        }
    return ValueHead(kind, tensors)


def write_value_head(head: ValueHead, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_value_head(head, path)


def write_manifest(root: Path, manifest: dict | StoreManifest) -> StoreManifest:
    """Validate the manifest, fill in the sha256 of every weight file, and write it."""
    parsed = StoreManifest.model_validate(manifest) if isinstance(manifest, dict) else manifest
    checksums = {
        p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*.safetensors"))
    }
    parsed = parsed.model_copy(update={"checksums": checksums})
    (root / MANIFEST_NAME).write_text(json.dumps(parsed.model_dump(), indent=2) + "\n")
    return parsed
