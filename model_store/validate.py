"""Static checks of a store, cheap enough for `mage store validate` and start-up.

Nothing here loads model weights: shapes come from safetensors headers, so a store can be
checked in a second. Every failure is a StoreError naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import safe_open

from merging.coefficients import check_combination_matrix
from model_store.adapters import ADAPTER_WEIGHTS, LoraAdapter, load_lora_adapter
from model_store.architectures import Architecture, check_architecture
from model_store.errors import StoreError
from model_store.manifest import MANIFEST_NAME, StoreManifest
from model_store.value_head import load_value_head


@dataclass(frozen=True)
class CheckedStore:
    """A store whose manifest, files, checksums and shapes passed every static check."""

    root: Path
    """Store folder."""
    manifest: StoreManifest
    """Parsed manifest."""
    base_path: Path
    """Resolved base model folder."""
    combination_matrix: torch.Tensor
    """B (n, n), float64; column i = w_i of backbone i (Eq. 12)."""
    vocab_size: int
    """Base model vocabulary size (logit width)."""
    architecture: Architecture
    """The base's architecture, one the server serves exactly (model_store.architectures)."""


def resolve(root: Path, relative: str) -> Path:
    path = Path(relative)
    return path if path.is_absolute() else root / path


def resolve_base(root: Path, manifest: StoreManifest) -> Path:
    """The base model folder; a package-shipped GGUF base is converted once into the cache."""
    if manifest.base.gguf_package:
        from model_store.gguf import packaged_base

        return packaged_base(manifest.base.gguf_package, manifest.base.gguf_file or "")
    return resolve(root, manifest.base.path or "")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(root: Path) -> StoreManifest:
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise StoreError(root, "store folder does not exist")
    if not path.is_file():
        raise StoreError(path, "missing store manifest")
    try:
        return StoreManifest.model_validate_json(path.read_text())
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise StoreError(path, f"invalid manifest: {problems}") from None


# Files whose sha256 this process has verified, keyed by (path, expected digest), with the
# stat signature they had then. `mage serve` checks the store before binding and the server
# checks it again when it loads (as do `mage eval`/`tune`): without this every weight file
# was hashed twice. A file is hashed again whenever its size, mtime, ctime or inode changed.
_verified: dict[tuple[str, str], tuple[int, ...]] = {}
_verified_lock = threading.Lock()
# Like git's "racy" index entries: a file modified this recently may change again within the
# same coarse filesystem timestamp tick, so its signature is not trusted and it is re-hashed.
RACY_SECONDS = 2.0


def _signature(stat: os.stat_result) -> tuple[int, ...]:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def verify_file(path: Path, expected: str) -> None:
    """Raise StoreError unless `path` has sha256 `expected`; hash it once per process."""
    key = (str(path.resolve()), expected.lower())
    before = path.stat()
    with _verified_lock:
        if _verified.get(key) == _signature(before):
            return
    actual = sha256_file(path)
    if actual != key[1]:
        raise StoreError(path, f"checksum mismatch: expected {expected}, got {actual}")
    after = path.stat()
    changed = max(after.st_mtime, after.st_ctime)
    if _signature(after) == _signature(before) and time.time() - changed > RACY_SECONDS:
        with _verified_lock:
            _verified[key] = _signature(after)


def verify_checksums(root: Path, manifest: StoreManifest) -> None:
    """Every *.safetensors file inside the store must be listed and match its sha256."""
    listed = manifest.checksums
    for weight_file in sorted(root.rglob("*.safetensors")):
        relative = weight_file.relative_to(root).as_posix()
        if relative not in listed:
            raise StoreError(weight_file, "weight file has no sha256 in the manifest's checksums")
    for relative, expected in listed.items():
        path = root / relative
        if not path.is_file():
            raise StoreError(path, "listed in checksums but missing")
        verify_file(path, expected)


def base_weight_shapes(base_path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape for every tensor of the base model, from safetensors headers."""
    files = sorted(base_path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in base_path.glob("*.bin"))
        hint = f" (found {pickles}: pickle weights are never loaded)" if pickles else ""
        raise StoreError(base_path, f"base model folder has no *.safetensors weights{hint}")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def read_vocab_size(model_path: Path) -> int:
    config_path = model_path / "config.json"
    if not config_path.is_file():
        raise StoreError(config_path, "missing model config")
    config = json.loads(config_path.read_text())
    config = config.get("text_config", config)
    if "vocab_size" not in config:
        raise StoreError(config_path, "config has no vocab_size")
    return int(config["vocab_size"])


def check_adapter_fits(adapter: LoraAdapter, shapes: dict[str, tuple[int, ...]]) -> None:
    """An adapter shaped for another base fails here, naming its file and module."""
    weights = adapter.path / ADAPTER_WEIGHTS
    for module, factors in adapter.modules.items():
        base_shape = shapes.get(f"{module}.weight")
        if base_shape is None:
            raise StoreError(weights, f"targets {module}, which the base model does not have")
        lora_shape = (factors.lora_b.shape[0], factors.lora_a.shape[1])  # (out, in)
        if adapter.fan_in_fan_out:  # Conv1D stores its weight as (in, out)
            lora_shape = lora_shape[::-1]
        if tuple(base_shape) != lora_shape:
            raise StoreError(
                weights,
                f"{module}: adapter is for a weight of shape {lora_shape}, "
                f"the base's is {tuple(base_shape)} (adapter for another base?)",
            )


def check_objectives(manifest: StoreManifest, manifest_path: Path) -> torch.Tensor:
    n = len(manifest.objectives)
    if len(set(manifest.objectives)) != n:
        raise StoreError(manifest_path, f"objective names repeat: {manifest.objectives}")
    if len(manifest.backbones) != n:
        raise StoreError(manifest_path, f"{n} objectives but {len(manifest.backbones)} backbones")
    for backbone in manifest.backbones:
        if len(backbone.weights) != n:
            raise StoreError(
                manifest_path,
                f"backbone {backbone.name!r} has "
                f"{len(backbone.weights)} weights for {n} objectives",
            )
    matrix = torch.tensor([b.weights for b in manifest.backbones], dtype=torch.float64).T
    try:
        check_combination_matrix(matrix)
    except ValueError as exc:
        raise StoreError(manifest_path, f"backbone weights: {exc}") from None
    check_specialists(manifest, manifest_path)
    explicit = manifest.guidance.explicit
    if explicit:
        named = [spec.objective for spec in explicit]
        if sorted(named) != sorted(manifest.objectives):
            raise StoreError(
                manifest_path,
                f"explicit value models cover {named}, "
                f"need exactly one per objective {manifest.objectives}",
            )
        if len({spec.kind for spec in explicit}) != 1:
            kinds = sorted({spec.kind for spec in explicit})
            raise StoreError(manifest_path, f"explicit value models mix kinds {kinds}")
    return matrix


def check_specialists(manifest: StoreManifest, manifest_path: Path) -> None:
    """Rewarded-Soup specialists, when given: specialist i has weights e_i (B = I)."""
    specialists, n = manifest.specialists, len(manifest.objectives)
    if not specialists:
        return
    if len(specialists) != n:
        raise StoreError(manifest_path, f"{n} objectives but {len(specialists)} specialists")
    for i, spec in enumerate(specialists):
        expected = [1.0 if j == i else 0.0 for j in range(n)]
        if [float(w) for w in spec.weights] != expected:
            raise StoreError(
                manifest_path,
                f"specialist {spec.name!r} has weights {spec.weights}; specialist {i} "
                f"must have the one-hot weights {expected} (Rewarded Soup: B = I)",
            )


def baseline_adapters(manifest: StoreManifest) -> dict[str, str]:
    """The baselines' adapters by slot name ('ric', 'morlhf:<mu>', 'modpo:<mu>') -> path."""
    baselines = manifest.baselines
    found = {"ric": baselines.ric.path} if baselines.ric is not None else {}
    for method in ("morlhf", "modpo"):
        for spec in getattr(baselines, method):
            found[preference_slot_name(method, spec.preference)] = spec.path
    return found


def preference_slot_name(method: str, preference: list[float] | tuple[float, ...]) -> str:
    """'morlhf:0.3,0.7': the slot name of a per-preference baseline adapter (weights rounded to
    6 decimals, as plans round preferences)."""
    return f"{method}:" + ",".join(f"{round(float(w), 6):g}" for w in preference)


def check_store(root: Path | str) -> CheckedStore:
    """Run every static check; return what loading needs."""
    root = Path(root).resolve()
    manifest = read_manifest(root)
    matrix = check_objectives(manifest, root / MANIFEST_NAME)
    verify_checksums(root, manifest)
    base_path = resolve_base(root, manifest)
    if not base_path.is_dir():
        raise StoreError(base_path, "base model folder does not exist")
    architecture = check_architecture(base_path)
    vocab_size = read_vocab_size(base_path)
    shapes = base_weight_shapes(base_path)
    for backbone in [*manifest.backbones, *manifest.specialists]:
        adapter = load_lora_adapter(resolve(root, backbone.path), backbone.name, torch.float32)
        check_adapter_fits(adapter, shapes)
    for name, path in baseline_adapters(manifest).items():
        check_adapter_fits(load_lora_adapter(resolve(root, path), name, torch.float32), shapes)
    for spec in manifest.guidance.explicit:
        if spec.head is not None:  # an 'arm' value scores with the base's own lm_head
            head_path = resolve(root, spec.head)
            head = load_value_head(head_path)
            if head.vocab_size != vocab_size:
                raise StoreError(
                    head_path,
                    f"head gives {head.vocab_size} values, the base vocabulary has {vocab_size}",
                )
        model_path = resolve(root, spec.path)
        if spec.kind in ("lora", "arm"):
            check_adapter_fits(load_lora_adapter(model_path, spec.objective, torch.float32), shapes)
        else:
            check_architecture(model_path)
            if read_vocab_size(model_path) != vocab_size:
                raise StoreError(
                    model_path / "config.json",
                    f"standalone value model's vocabulary differs from the base's ({vocab_size})",
                )
    return CheckedStore(root, manifest, base_path, matrix, vocab_size, architecture)
