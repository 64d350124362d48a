"""What the trained baselines (MORLHF, MODPO, RiC) share: the store they are trained for (its
base, objectives and fixed reward scale r~), the preference grid, folder names, and recording
their adapters in the store's manifest (`baselines`), so `mage eval` and the server find them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from objectives.scale import RewardScale
from training.common import TrainingError


@dataclass(frozen=True)
class StoreTask:
    """The training task a store defines."""

    store: Path
    """The store folder (adapters are written under ``store/baselines``)."""
    base: Path
    """The SFT base (also the reference policy of every baseline)."""
    rewards: tuple[str, ...]
    """Reward spec per objective, in the store's objective order."""
    scale: RewardScale | None
    """The store's fixed reward scale r~ (None: raw rewards)."""


def store_task(store: Path, rewards: list[str] | None = None) -> StoreTask:
    """The task of a checked store; `rewards` overrides the reward specs (default: the
    objective names, as `mage eval` scores them)."""
    from model_store.errors import StoreError
    from model_store.validate import check_store

    try:
        checked = check_store(store)
    except StoreError as exc:
        raise TrainingError(f"--store: {exc}") from None
    objectives = list(checked.manifest.objectives)
    specs = list(rewards or objectives)
    if len(specs) != len(objectives):
        raise TrainingError(f"--rewards: {len(specs)} given for {len(objectives)} objectives")
    scale = RewardScale.from_manifest(checked.manifest)
    return StoreTask(checked.root, checked.base_path, tuple(specs), scale)


def preference_grid(n: int, steps: int | None = None) -> tuple[tuple[float, ...], ...]:
    """The evaluation's preference sweep (both ends included): mage eval's own grid."""
    from evaluation.run import preference_sweep

    return preference_sweep(n, steps)


def check_preferences(preferences, n: int) -> tuple[tuple[float, ...], ...]:
    """Each mu has n weights >= 0 summing to 1; TrainingError names the first that does not."""
    checked = []
    for mu in preferences:
        mu = tuple(round(float(w), 6) for w in mu)
        if len(mu) != n or min(mu) < 0 or abs(sum(mu) - 1.0) > 1e-6:
            raise TrainingError(f"--preferences {list(mu)}: need {n} weights >= 0 summing to 1")
        checked.append(mu)
    if not checked:
        raise TrainingError("--preferences: give at least one preference")
    return tuple(checked)


def parse_preferences(text: str, n: int) -> tuple[tuple[float, ...], ...]:
    """'1,0;0.5,0.5;0,1' -> ((1, 0), (0.5, 0.5), (0, 1)); '' -> the evaluation grid."""
    if not text.strip():
        return preference_grid(n)
    try:
        rows = [tuple(float(v) for v in part.split(",")) for part in text.split(";") if part]
    except ValueError:
        raise TrainingError(f"--preferences {text!r}: expected '0.3,0.7;1,0'") from None
    return check_preferences(rows, n)


def preference_label(mu) -> str:
    """A folder name for a preference: (0.3, 0.7) -> 'mu-0.3-0.7'."""
    return "mu-" + "-".join(f"{round(float(w), 6):g}" for w in mu)


def record_baseline(store: Path, method: str, entry: object) -> None:
    """Write `entry` into the manifest's `baselines.<method>` (a preference entry replaces the
    one with the same preference; `ric` replaces the RiC spec) and refresh the checksums."""
    from model_store.builder import write_manifest
    from model_store.validate import read_manifest

    manifest = read_manifest(store).model_dump()
    baselines = manifest.setdefault("baselines", {})
    if method == "ric":
        baselines["ric"] = entry
    else:
        kept = [e for e in baselines.get(method, []) if e["preference"] != entry["preference"]]  # type: ignore[index]
        baselines[method] = sorted([*kept, entry], key=lambda e: [-w for w in e["preference"]])
    write_manifest(store, manifest)
