"""A fixed reward scale per objective: r~_j = (r_j - center_j) / scale_j.

The scale is computed once, from base-model samples on the training prompts, and stored in
the manifest (`reward_scale`). Backbones and specialists are then trained on the plain
weighted sum h_i = w_i^T r~ (Eq. 11), so for lambda = B^-1 mu,
sum_i lambda_i h_i = (B lambda)^T r~ = mu^T r~ holds exactly (Eq. 12); value models regress r~
(Eq. 16), and evaluation reports every metric on r~. Why a fixed scale rather than TRL's
per-group standardisation (`normalize_then_sum`): standardising each reward inside each
GRPO group makes h_i depend on the group, so the backbones no longer optimise w_i^T r of any
one r, and lambda = B^-1 mu no longer maps onto mu^T r.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HV_REFERENCE_SD = 2.0
"""Default hypervolume reference: this many base standard deviations below the base mean in
every objective (r~ = -2). Fixed with the store, before any method is evaluated."""


class ScaleError(ValueError):
    """A reward scale cannot be fitted or read; the message names the objective or file. A
    ValueError, so every command that reports bad input reports this too."""


@dataclass(frozen=True)
class RewardScale:
    """The affine map of each objective's raw reward onto the fixed scale."""

    center: tuple[float, ...]
    """Per objective: subtracted first (the base samples' mean)."""
    scale: tuple[float, ...]
    """Per objective: divided by next (the base samples' standard deviation, > 0)."""

    def __post_init__(self) -> None:
        if len(self.center) != len(self.scale) or not self.center:
            raise ValueError("reward scale: one center and one scale per objective")
        if not all(math.isfinite(v) for v in (*self.center, *self.scale)):
            raise ValueError("reward scale: values must be finite")
        if min(self.scale) <= 0:
            raise ValueError(f"reward scale: scales must be > 0, got {self.scale}")

    @classmethod
    def identity(cls, n: int) -> RewardScale:
        """Raw rewards (a store without `reward_scale`)."""
        return cls((0.0,) * n, (1.0,) * n)

    @classmethod
    def from_manifest(cls, manifest: object) -> RewardScale | None:
        """The store's scale (model_store.manifest.StoreManifest), or None if it has none."""
        spec = getattr(manifest, "reward_scale", None)
        return None if spec is None else cls(tuple(spec.center), tuple(spec.scale))

    def one(self, j: int) -> RewardScale:
        """The scale of objective j alone (a value model predicts one objective)."""
        return RewardScale((self.center[j],), (self.scale[j],))

    def apply(self, j: int, values: Sequence[float]) -> list[float]:
        """r~_j for raw rewards of objective j."""
        return [(float(v) - self.center[j]) / self.scale[j] for v in values]

    def apply_rows(self, rows: np.ndarray) -> np.ndarray:
        """r~ for an array whose last axis runs over the objectives."""
        return (np.asarray(rows, dtype=np.float64) - np.array(self.center)) / np.array(self.scale)


def fit_reward_scale(
    rewards: Mapping[str, Sequence[float]],
    source: str,
    reference_sd: float = HV_REFERENCE_SD,
) -> dict:
    """The manifest's `reward_scale` block from raw rewards of the same base responses per
    objective (objective order = mapping order): mean and population standard deviation,
    and the hypervolume reference r~ = -reference_sd in every objective."""
    names = list(rewards)
    if not names:
        raise ScaleError("reward scale: no objectives")
    counts = {len(v) for v in rewards.values()}
    if len(counts) != 1 or min(counts) < 2:
        raise ScaleError(f"reward scale: need >= 2 rewards per objective, same count: {counts}")
    centers, scales = [], []
    for name in names:
        values = [float(v) for v in rewards[name]]
        spread = statistics.pstdev(values)
        if not spread > 1e-9:
            raise ScaleError(
                f"reward scale: {name!r} is constant on the base samples ({values[0]}): "
                "it cannot be scaled, and cannot be trained on either"
            )
        centers.append(round(statistics.fmean(values), 6))
        scales.append(round(spread, 6))
    return {
        "center": centers,
        "scale": scales,
        "hv_reference": [-float(reference_sd)] * len(names),
        "samples": counts.pop(),
        "source": source,
    }


def scale_from_store(store: Path, objectives: Sequence[str]) -> RewardScale:
    """The `reward_scale` of a store folder (or of a manifest file), checked against the
    objectives a training run uses."""
    from model_store.manifest import MANIFEST_NAME, StoreManifest

    path = Path(store)
    path = path / MANIFEST_NAME if path.is_dir() else path
    try:
        manifest = StoreManifest.model_validate_json(path.read_text())
    except (OSError, ValueError) as exc:
        raise ScaleError(f"{path}: cannot read a store manifest ({exc})") from None
    scale = RewardScale.from_manifest(manifest)
    if scale is None:
        raise ScaleError(f"{path}: this store has no reward_scale")
    missing = [o for o in objectives if o not in manifest.objectives]
    if missing:
        raise ScaleError(f"{path}: reward_scale has no objective {missing}")
    index = [manifest.objectives.index(o) for o in objectives]
    return RewardScale(tuple(scale.center[i] for i in index), tuple(scale.scale[i] for i in index))
