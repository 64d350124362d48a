"""Write stores: the circulant B helper, adapters, heads, and a manifest with checksums."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedModel

from merging.coefficients import circulant_matrix
from model_store.architectures import default_lora_targets, linear_layer_names, uses_conv1d
from model_store.manifest import MANIFEST_NAME, StoreManifest
from model_store.validate import sha256_file
from model_store.value_head import ValueHead, save_value_head


def circulant_backbone_weights(objectives: list[str], beta: float) -> list[list[float]]:
    """w_i for each backbone i: the columns of the circulant B of Eq. (12)."""
    matrix = circulant_matrix(beta, len(objectives))
    return [[round(float(v), 12) for v in column] for column in matrix.T]


def write_random_lora(
    base: PreTrainedModel,
    path: Path,
    rank: int = 4,
    targets: tuple[str, ...] | None = None,
    seed: int = 0,
    std: float = 0.02,
    alpha: int | None = None,
) -> None:
    """A PEFT LoRA adapter with random A and B (PEFT leaves B at 0; we fill it) for tests
    and untrained demos; `targets` default to the base's (default_lora_targets). The base
    model is left unchanged."""
    torch.manual_seed(seed)
    targets = targets or default_lora_targets(base)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha or 2 * rank,
        target_modules=list(targets),
        lora_dropout=0.0,
        init_lora_weights=False,
        fan_in_fan_out=uses_conv1d(base, targets),
    )
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, std)
    peft_model.save_pretrained(str(path), safe_serialization=True)
    peft_model.unload()  # restore the base's original linears


def random_target_sets(base: PreTrainedModel) -> list[tuple[str, ...]]:
    """LoRA targets for a random store's backbones (the first three), value adapters and
    specialists: the base's default targets (PEFT's mapping for its type), and mixes of them
    with its other layers, so stores exercise adapters that target different modules."""
    default = default_lora_targets(base)
    other = [name for name in linear_layer_names(base) if name not in default]
    return [
        default,
        default[:1] + tuple(other[:2]),
        tuple(other[2:3] or other[:1]) + default[-1:],
        default[:1] + tuple(other[-1:]),
        default[-1:] + tuple(other[:1]),
    ]


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


def packaged_base_label(manifest: StoreManifest) -> str | None:
    """`package/file` for a base shipped as GGUF in a Python package; None for a folder."""
    base = manifest.base
    return None if base.gguf_package is None else f"{base.gguf_package}/{base.gguf_file}"


def name_packaged_base_in_adapters(root: Path, manifest: StoreManifest) -> None:
    """PEFT records the folder it loaded the base from as base_model_name_or_path; for a
    packaged GGUF base that is the training machine's conversion cache, meaningless
    anywhere else. The adapters name the package and file instead, as the manifest does."""
    label = packaged_base_label(manifest)
    if label is None:
        return
    for config_path in sorted(root.rglob("adapter_config.json")):
        config = json.loads(config_path.read_text())
        if config.get("base_model_name_or_path") != label:
            config["base_model_name_or_path"] = label
            config_path.write_text(json.dumps(config, indent=2) + "\n")


def write_manifest(root: Path, manifest: dict | StoreManifest) -> StoreManifest:
    """Validate the manifest, fill in the sha256 of every weight file, and write it
    (adapters over a packaged base name that base, not a local cache folder)."""
    parsed = StoreManifest.model_validate(manifest) if isinstance(manifest, dict) else manifest
    name_packaged_base_in_adapters(root, parsed)
    checksums = {
        p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*.safetensors"))
    }
    parsed = parsed.model_copy(update={"checksums": checksums})
    (root / MANIFEST_NAME).write_text(json.dumps(parsed.model_dump(), indent=2) + "\n")
    return parsed


def _random_backbones(base, root: Path, objectives, weights, target_sets, seed, std) -> list[dict]:
    """One random backbone LoRA per objective; ranks and targets differ between backbones, so
    the exact merge must cope with mismatched adapters."""
    backbones = []
    for i, objective in enumerate(objectives):
        path = f"backbones/{objective}"
        rank, targets = 2 + 2 * (i % 2), target_sets[i % 3]
        write_random_lora(
            base, root / path, rank=rank, targets=targets, seed=seed + 10 + i, std=std
        )
        backbones.append({"name": f"backbone-{objective}", "path": path, "weights": weights[i]})
    return backbones


def _random_value(
    base, root: Path, objective: str, i: int, kind: str, head_kind: str, targets, seed, stds, dims
) -> dict:
    """The manifest entry of a random value model of `kind` (lora, arm or a full model) for
    objective i, its files written under values/; `dims` is the base's (hidden, vocab)."""
    (lora_std, head_std), (hidden, vocab) = stds, dims
    spec = {"objective": objective, "kind": kind, "path": f"values/{objective}"}
    if kind in ("lora", "arm"):
        write_random_lora(
            base, root / spec["path"], rank=2, targets=targets, seed=seed + 20 + i, std=lora_std
        )
    else:
        torch.manual_seed(seed + 30 + i)
        type(base)(base.config).save_pretrained(str(root / spec["path"]))
    if kind == "arm":  # an autoregressive reward model: no head, V = beta log pi_r
        spec["beta"] = 0.5 + 0.25 * i  # unequal betas, so a test sees each one
        return spec
    head = random_value_head(hidden, vocab, head_kind, seed + 40 + i, head_std)
    spec["head"] = f"values/{objective}-head.safetensors"
    write_value_head(head, root / spec["head"])
    return spec


def _random_specialist(base, root: Path, objective: str, i: int, n: int, seed, std) -> dict:
    """A random Rewarded-Soup specialist for objective i (weights e_i)."""
    path = f"specialists/{objective}"
    targets = ("v_proj", "down_proj")
    write_random_lora(base, root / path, rank=2, targets=targets, seed=seed + 50 + i, std=std)
    weights = [float(i == j) for j in range(n)]
    return {"name": f"specialist-{objective}", "path": path, "weights": weights}


def build_random_store(
    root: Path,
    base_spec: dict,
    objectives: list[str],
    beta: float | None = 0.7,
    alpha: float = 0.0,
    value_kind: str | None = "lora",
    head_kind: str = "tied",
    lora_std: float = 0.02,
    head_std: float = 0.05,
    seed: int = 0,
    name: str = "random (untrained adapters)",
    with_specialists: bool = False,
) -> Path:
    """A complete store with random (untrained) adapters and heads over a given base.

    For tests, benchmarks and smoke-serving a real base before trained artifacts exist.
    beta=None gives B = I (Rewarded Soup). Backbones get different ranks and target
    modules, so the exact merge must cope with mismatched adapters. `with_specialists` adds
    random Rewarded-Soup specialists (weights e_i).
    """
    from model_store.validate import resolve_base

    root.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"name": name, "objectives": objectives, "base": base_spec}
    base_path = resolve_base(
        root,
        StoreManifest.model_validate(
            {**manifest, "backbones": [{"name": "x", "path": "x", "weights": [1.0]}]}
        ),
    )
    from transformers import AutoConfig, AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        str(base_path), use_safetensors=True, local_files_only=True
    ).eval()
    n = len(objectives)
    weights = circulant_backbone_weights(objectives, beta) if beta else torch.eye(n).tolist()
    target_sets = random_target_sets(base)
    backbones = _random_backbones(base, root, objectives, weights, target_sets, seed, lora_std)
    config = AutoConfig.from_pretrained(str(base_path), local_files_only=True)
    dims, stds = (config.hidden_size, config.vocab_size), (lora_std, head_std)
    explicit = [
        _random_value(
            base, root, objective, i, value_kind, head_kind, target_sets[3], seed, stds, dims
        )
        for i, objective in enumerate(objectives if value_kind else ())
    ]
    specialists = [
        _random_specialist(base, root, objective, i, n, seed, lora_std)
        for i, objective in enumerate(objectives if with_specialists else ())
    ]
    write_manifest(
        root,
        {
            **manifest,
            "backbones": backbones,
            "specialists": specialists,
            "alpha": alpha,
            "beta": beta,
            "guidance": {"explicit": explicit, "implicit": True},
            "defaults": {"guidance_mode": "none", "gamma": 1.0, "max_new_tokens": 8},
        },
    )
    return root
