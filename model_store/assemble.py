"""Assemble a store from adapters trained anywhere (`mage store assemble`), and refresh a
store's checksums after an edit (`mage store rehash`).

A store holds exactly what serving reads: each adapter's adapter_config.json and
adapter_model.safetensors, each value head, the manifest, and (optionally) a copy of the
base's config, tokenizer and safetensors weights. Trainer leftovers beside an adapter
(TRL's checkpoint-*/ folders, optimizer and RNG pickles, training_args.bin, logs) are never
copied. The store is written in a staging folder, checked by check_store (the same checks
as `mage store validate`, architecture included), and only then moved into place.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from model_store.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PICKLE_WEIGHTS
from model_store.costs import COST_FILE, record_store_cost, recorded_cost, run_cost
from model_store.errors import StoreError
from model_store.manifest import StoreManifest
from model_store.validate import CheckedStore, check_store, read_manifest, resolve, resolve_base

VALUE_HEAD = "head.safetensors"
"""The head file `mage train value` writes beside its `adapter/` folder."""
MODEL_FILES = re.compile(
    r"(config|generation_config|tokenizer|tokenizer_config|special_tokens_map|added_tokens"
    r"|vocab|chat_template|preprocessor_config)\.json|merges\.txt|vocab\.txt|tokenizer\.model"
    r"|chat_template\.jinja|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
)
"""The files of a Hugging Face model folder that loading a base (or standalone value model)
reads; anything else there (pickled weights, optimizer state, READMEs) stays behind."""


@dataclass(frozen=True)
class ValueSource:
    """One explicit value model to put in a store."""

    kind: str
    """'lora' (an adapter over the base), 'standalone' (a model folder) or 'arm' (an
    autoregressive reward model: an adapter, no head)."""
    path: Path
    """Adapter folder, or model folder."""
    head: Path | None
    """Value head safetensors file (None for 'arm')."""
    beta: float | None = None
    """'arm' only: beta of r = beta sum_t log pi_r."""


@dataclass(frozen=True)
class StoreParts:
    """Everything `assemble_store` puts in a store; paths are where the parts are now."""

    objectives: list[str]
    """Objective names, in the order of preferences and of B's columns."""
    base: dict
    """The manifest's base entry: {"path": absolute folder} or a gguf_package entry."""
    backbones: list[Path]
    """Backbone adapter folders, backbone i first trained on w_i (Eq. 11)."""
    weights: list[list[float]]
    """w_i per backbone: the columns of B (Eq. 12)."""
    specialists: list[Path] = field(default_factory=list)
    """Rewarded-Soup specialists (weights e_i), one per objective, or none."""
    values: dict[str, ValueSource] = field(default_factory=dict)
    """Explicit value models by objective: all of them, or none."""
    alpha: float = 0.0
    """Extrapolation alpha of Eq. (13)."""
    beta: float | None = None
    """The circulant's beta, when B is circulant (informational)."""
    name: str = "mage-store"
    """The store's name (/info)."""
    defaults: dict = field(default_factory=dict)
    """The manifest's `defaults` (DefaultsSpec fields)."""
    reward_scale: dict | None = None
    """The manifest's `reward_scale`, when the backbones were trained on one."""
    implicit: bool = True
    """Offer implicit guidance (Eq. 23)."""
    copy_base: bool = False
    """Copy the base's model files into store/base instead of referring to its folder."""


def find_adapter(folder: Path) -> Path:
    """The PEFT adapter folder `folder` names: itself, or its `adapter/` (what `mage train
    backbone` and `mage train value` write). A folder holding only TRL checkpoints is
    refused with their names, since which one to serve is the user's choice."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StoreError(folder, "adapter folder does not exist")
    for candidate in (folder, folder / "adapter"):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    checkpoints = sorted(
        (p for p in folder.glob("checkpoint-*") if (p / ADAPTER_CONFIG).is_file()),
        key=lambda p: int(p.name.rsplit("-", 1)[-1]) if p.name[11:].isdigit() else -1,
    )
    if checkpoints:
        names = ", ".join(p.name for p in checkpoints)
        raise StoreError(
            folder,
            f"has no {ADAPTER_CONFIG} of its own, only trainer checkpoints ({names}): pass "
            f"the one to serve, e.g. {checkpoints[-1]}",
        )
    if (folder / PICKLE_WEIGHTS).is_file():
        raise StoreError(folder / PICKLE_WEIGHTS, f"pickle weights without {ADAPTER_CONFIG}")
    raise StoreError(folder, f"not a PEFT adapter folder (no {ADAPTER_CONFIG})")


def trained_value(folder: Path) -> ValueSource:
    """A value model as `mage train value --out FOLDER` writes it: FOLDER/adapter/ and
    FOLDER/head.safetensors (or an adapter folder with head.safetensors inside); for
    `--kind arm`, FOLDER/adapter/ and the beta recorded in FOLDER/metrics.json."""
    folder = Path(folder)
    adapter = find_adapter(folder)
    metrics = folder / "metrics.json"
    if metrics.is_file() and not (folder / VALUE_HEAD).is_file():
        try:
            recorded = json.loads(metrics.read_text())
        except json.JSONDecodeError as exc:
            raise StoreError(metrics, f"not valid JSON: {exc}") from None
        if isinstance(recorded, dict) and recorded.get("kind") == "arm":
            if not isinstance(recorded.get("beta"), int | float):
                raise StoreError(metrics, "an 'arm' run's metrics need its beta (a number)")
            return ValueSource("arm", adapter, None, float(recorded["beta"]))
    for head in (folder / VALUE_HEAD, adapter / VALUE_HEAD):
        if head.is_file():
            return ValueSource("lora", adapter, head)
    raise StoreError(folder / VALUE_HEAD, "missing: the value head `mage train value` writes")


def parts_of_store(root: Path) -> StoreParts:
    """The parts of an existing store, to assemble a new one from (`--from`)."""
    root = Path(root).resolve()
    manifest = read_manifest(root)
    base = manifest.base.model_dump(exclude_none=True)
    if manifest.base.path is not None:
        base = {"path": str(resolve(root, manifest.base.path).resolve())}
    values = {
        spec.objective: ValueSource(
            spec.kind,
            resolve(root, spec.path),
            None if spec.head is None else resolve(root, spec.head),
            spec.beta,
        )
        for spec in manifest.guidance.explicit
    }
    return StoreParts(
        objectives=list(manifest.objectives),
        base=base,
        backbones=[resolve(root, b.path) for b in manifest.backbones],
        weights=[list(b.weights) for b in manifest.backbones],
        specialists=[resolve(root, s.path) for s in manifest.specialists],
        values=values,
        alpha=manifest.alpha,
        beta=manifest.beta,
        name=manifest.name,
        defaults=manifest.defaults.model_dump(),
        reward_scale=manifest.reward_scale.model_dump() if manifest.reward_scale else None,
        implicit=manifest.guidance.implicit,
    )


def _slug(name: str) -> str:
    """A folder name for an objective ('hf-classifier:/m/rm' -> 'hf-classifier-m-rm')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "objective"


def _copy_adapter(source: Path, target: Path) -> None:
    source = find_adapter(source)
    target.mkdir(parents=True)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (source / name).is_file():
            hint = " (pickle weights are never loaded)" if name == ADAPTER_WEIGHTS else ""
            raise StoreError(source / name, f"missing{hint}")
        shutil.copy2(source / name, target / name)


def _copy_model(source: Path, target: Path) -> None:
    """A model folder's loading files (MODEL_FILES) only."""
    if not (source / "config.json").is_file():
        raise StoreError(source / "config.json", "missing (not a Hugging Face model folder)")
    target.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        if path.is_file() and MODEL_FILES.fullmatch(path.name):
            shutil.copy2(path, target / path.name)


def _manifest(parts: StoreParts) -> dict:
    n = len(parts.objectives)
    for label, count in (
        ("backbones", len(parts.backbones)),
        ("weight vectors", len(parts.weights)),
    ):
        if count != n:
            raise ValueError(f"{n} objectives {parts.objectives} but {count} {label}")
    if parts.specialists and len(parts.specialists) != n:
        raise ValueError(f"{n} objectives but {len(parts.specialists)} specialists")
    if parts.values and sorted(parts.values) != sorted(parts.objectives):
        raise ValueError(
            f"value models for {sorted(parts.values)}: need one for each of {parts.objectives}"
        )
    slugs = [_slug(o) for o in parts.objectives]
    if len(set(slugs)) != n:
        raise ValueError(f"objective names {parts.objectives} give the same folder names")
    explicit = [
        {
            "objective": objective,
            "kind": parts.values[objective].kind,
            "path": f"values/{slug}",
            **(
                {"beta": parts.values[objective].beta}
                if parts.values[objective].kind == "arm"
                else {"head": f"values/{slug}-head.safetensors"}
            ),
        }
        for objective, slug in zip(parts.objectives, slugs, strict=True)
        if objective in parts.values
    ]
    return {
        "name": parts.name,
        "objectives": parts.objectives,
        "base": {"path": "base"} if parts.copy_base else parts.base,
        "backbones": [
            {"name": f"backbone-{o}", "path": f"backbones/{s}", "weights": w}
            for o, s, w in zip(parts.objectives, slugs, parts.weights, strict=True)
        ],
        "specialists": [
            {"name": f"specialist-{o}", "path": f"specialists/{s}", "weights": one_hot(n, i)}
            for i, (o, s) in enumerate(zip(parts.objectives, slugs, strict=True))
            if parts.specialists
        ],
        "alpha": parts.alpha,
        "beta": parts.beta,
        "guidance": {"explicit": explicit, "implicit": parts.implicit},
        "defaults": parts.defaults,
        "reward_scale": parts.reward_scale,
    }


def one_hot(n: int, i: int) -> list[float]:
    return [1.0 if j == i else 0.0 for j in range(n)]


def _write_parts(parts: StoreParts, root: Path) -> None:
    slugs = [_slug(o) for o in parts.objectives]
    for slug, source in zip(slugs, parts.backbones, strict=True):
        _copy_adapter(source, root / "backbones" / slug)
    for slug, source in zip(slugs, parts.specialists, strict=False):
        _copy_adapter(source, root / "specialists" / slug)
    for objective, slug in zip(parts.objectives, slugs, strict=True):
        value = parts.values.get(objective)
        if value is None:
            continue
        copy = _copy_model if value.kind == "standalone" else _copy_adapter
        copy(value.path, root / "values" / slug)
        if value.head is None:  # an 'arm' value model has no head
            continue
        if not value.head.is_file():
            raise StoreError(value.head, "missing value head file")
        shutil.copy2(value.head, root / "values" / f"{slug}-head.safetensors")
    if parts.copy_base:
        if "path" not in parts.base:
            raise ValueError("--copy-base needs a base folder, not a packaged GGUF base")
        _copy_model(Path(parts.base["path"]), root / "base")


def _carry_costs(parts: StoreParts, root: Path) -> None:
    """The new store's training_costs.json (training/costs.py): each part's cost as the store
    it comes from recorded it, else the ledger of the `mage train` folder it was trained in
    (the folder itself or, for its ``adapter``, the one above). Unknown costs stay absent."""
    slugs = [_slug(o) for o in parts.objectives]
    sources = [
        *(("backbones", s, p) for s, p in zip(slugs, parts.backbones, strict=True)),
        *(("specialists", s, p) for s, p in zip(slugs, parts.specialists, strict=False)),
        *(("values", s, parts.values[o].path) for o, s in zip(parts.objectives, slugs, strict=True)
          if o in parts.values),
    ]  # fmt: skip
    for component, name, source in sources:
        source = Path(source).resolve()
        cost = recorded_cost(source.parent.parent, component, source.name)
        if cost is None:
            ledger = [f for f in (source, source.parent) if (f / COST_FILE).is_file()]
            cost = run_cost(ledger[0]) if ledger else None
        if cost is not None:
            record_store_cost(root, component, name, cost)


def assemble_store(parts: StoreParts, out: Path, force: bool = False) -> CheckedStore:
    """Write `parts` as a store at `out`: staged beside it, checked, then moved into place,
    so a failed check leaves nothing half-written at `out`."""
    from model_store.builder import write_manifest

    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()) and not force:
        raise StoreError(out, "exists and is not empty (pass --force to replace it)")
    manifest = StoreManifest.model_validate(_manifest(parts))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_parts(parts, staging)
        _carry_costs(parts, staging)
        write_manifest(staging, manifest)
        checked = check_store(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return replace(checked, root=out, base_path=resolve_base(out, checked.manifest))


def rehash_store(root: Path) -> dict[str, tuple[str | None, str | None]]:
    """Recompute the sha256 of every weight file in the store and rewrite the manifest with
    them; returns what changed: path -> (old digest or None, new digest or None). The
    manifest must still parse; the store is then checked as `mage store validate` does."""
    from model_store.builder import write_manifest

    root = Path(root).resolve()
    manifest = read_manifest(root)
    old = dict(manifest.checksums)
    new = write_manifest(root, manifest).checksums
    changes = {
        path: (old.get(path), new.get(path))
        for path in sorted(set(old) | set(new))
        if old.get(path) != new.get(path)
    }
    check_store(root)
    return changes
