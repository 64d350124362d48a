"""Paired bootstrap over prompts for the front metrics (HV, Eq. 27; controllability,
Definition 1).

Every method is evaluated on the same prompts, so one resample of prompt indices (drawn with
replacement) is applied to every method at once: differences between methods are paired, and
the prompt-to-prompt noise they share cancels. For each replicate each method's front is its
mean reward per preference over the resampled prompts; its HV is taken against the fixed
reference point. Intervals are percentile intervals of the replicates.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from evaluation.metrics import chord_gaps, controllability, hypervolume

REPLICATES = 2000
"""Bootstrap replicates: enough for stable 2.5% / 97.5% percentiles."""

COMPARISONS: tuple[tuple[str, str], ...] = (
    ("bone-soup", "rewarded-soup"),
    ("bone-soup", "direct"),
    ("bone-soup", "bone-soup-a0"),
    ("rewarded-soup-a", "rewarded-soup"),
    ("bone-soup", "rewarded-soup-a"),
    ("mod", "bone-soup"),
    ("mage-e", "bone-soup"),
    ("mage-e-m", "bone-soup"),
    ("mage-i", "bone-soup"),
    ("mage-i-m", "bone-soup"),
    ("mage-e-m", "mage-e"),
    ("mage-i-m", "mage-i"),
    ("mage-i-m", "mage-i-m-naive"),
    ("mage-i", "mage-i-mu"),
    ("oracle-bok", "bone-soup"),
    ("oracle-cd", "bone-soup"),
    ("oracle-bok", "mage-e-m"),  # what a value model leaves of the oracle's room
    ("oracle-bok", "mage-i-m"),
    ("mage-e-m", "ric"),  # Table 2's discussed differences (Sec. 5.2)
    ("mage-i-m", "ric"),
    ("bone-soup", "morlhf"),
    ("mage-e-m", "morlhf"),
    ("mage-e-m", "modpo"),
    ("mage-i-m", "modpo"),
)
"""The (a, b) pairs whose HV difference a - b the docs discuss; beams are compared with
greedy mage-i-m, and each method at its tuned gamma with itself at gamma = 1."""


@dataclass(frozen=True)
class Replicates:
    """Bootstrap replicates of each method's HV and controllability."""

    hv: dict[str, np.ndarray]
    """(replicates,) HV per method."""
    controllability: dict[str, np.ndarray]
    """(replicates,) controllability per method."""


def bootstrap(
    per_prompt: dict[str, np.ndarray],
    preferences: np.ndarray,
    reference: np.ndarray,
    replicates: int = REPLICATES,
    seed: int = 0,
) -> Replicates:
    """per_prompt[label]: (preferences N, prompts P, objectives n) rewards on the scale the
    HV is taken on; every label has the same prompts in the same order."""
    shapes = {arr.shape[1] for arr in per_prompt.values()}
    if len(shapes) != 1:
        raise ValueError(f"paired bootstrap needs the same prompts for every method: {shapes}")
    weights = _draw_weights(shapes.pop(), replicates, seed)
    hv, ctrl = {}, {}
    for label, arr in per_prompt.items():
        fronts = _resampled_fronts(arr, weights)
        hv[label] = np.array([hypervolume(f, reference) for f in fronts])
        ctrl[label] = np.array([controllability(f, preferences) for f in fronts])
    return Replicates(hv, ctrl)


def _draw_weights(n_prompts: int, replicates: int, seed: int) -> np.ndarray:
    """(replicates, P): weights[b, p] = how often prompt p is drawn in replicate b, over P, so
    a resampled mean is a dot product. One seed gives every caller the same draws."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_prompts, size=(replicates, n_prompts))
    return np.stack([np.bincount(row, minlength=n_prompts) for row in draws]) / n_prompts


def _resampled_fronts(per_prompt: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(replicates, N, n) mean front of each replicate: per_prompt (N, P, n), weights (B, P)."""
    return np.einsum("npk,bp->bnk", per_prompt, weights)


def chord_gap_intervals(
    per_prompt: np.ndarray, preferences: np.ndarray, replicates: int = REPLICATES, seed: int = 0
) -> list[list[float]]:
    """95% interval of each objective's mean chord gap (Observation 3, `chord_gaps`) over the
    same prompt resamples as `bootstrap`; per_prompt: (preferences N, prompts P, 2)."""
    weights = _draw_weights(per_prompt.shape[1], replicates, seed)
    fronts = _resampled_fronts(per_prompt, weights)  # (replicates, N, 2)
    gaps = np.array([chord_gaps(f, preferences)["mean_gap"] for f in fronts])  # (replicates, 2)
    return [_interval(gaps[:, k]) for k in range(gaps.shape[1])]


def _interval(values: np.ndarray, level: float = 0.95) -> list[float]:
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return [float(lo), float(hi)]


def method_intervals(reps: Replicates) -> dict[str, dict[str, list[float]]]:
    """95% interval of each method's own HV and controllability."""
    return {
        label: {"hv": _interval(reps.hv[label]), "controllability": _interval(ctrl)}
        for label, ctrl in reps.controllability.items()
    }


def default_pairs(labels: Iterable[str]) -> list[tuple[str, str]]:
    """The README's comparisons among the labels present, then each beam vs greedy MAGE-I-M,
    each paper beam vs the flag-configured `beam`, and tuned vs gamma = 1 (labels ending in
    '@g1')."""
    present = list(labels)
    pairs = [(a, b) for a, b in COMPARISONS if a in present and b in present]
    pairs += [(label, "mage-i-m") for label in present if label.startswith("beam")]
    # `beam` run as b1c1: one sampled chain, no search; a paper beam against it isolates the
    # search from the sampling of Sec. 5.2.2 (greedy vs sampled mixes the two)
    pairs += [
        (label, "beam@g1" if label.endswith("@g1") else "beam")  # at the same gamma
        for label in present
        if label.startswith("beam-")
    ]
    pairs += [(label[: -len("@g1")], label) for label in present if label.endswith("@g1")]
    return [(a, b) for a, b in pairs if a in present and b in present and a != b]


def differences(
    reps: Replicates, points: dict[str, dict], pairs: list[tuple[str, str]]
) -> list[dict]:
    """For each (a, b): HV(a) - HV(b) and its relative size (% of HV(b)), controllability
    difference, each with its paired 95% interval; `holds` says whether the HV interval
    excludes zero. `points[label]` holds the full-sample metrics ("hv", "controllability")."""
    out = []
    for a, b in pairs:
        d_hv = reps.hv[a] - reps.hv[b]
        pct = 100 * d_hv / np.where(reps.hv[b] > 0, reps.hv[b], np.nan)
        d_ctrl = reps.controllability[a] - reps.controllability[b]
        hv_ci = _interval(d_hv)
        out.append(
            {
                "a": a,
                "b": b,
                "hv_diff": points[a]["hv"] - points[b]["hv"],
                "hv_diff_ci": hv_ci,
                "hv_pct": 100 * (points[a]["hv"] - points[b]["hv"]) / points[b]["hv"]
                if points[b]["hv"] > 0
                else None,
                "hv_pct_ci": _interval(pct[np.isfinite(pct)]) if np.isfinite(pct).any() else None,
                "ctrl_diff": points[a]["controllability"] - points[b]["controllability"],
                "ctrl_diff_ci": _interval(d_ctrl),
                "holds": bool(hv_ci[0] > 0 or hv_ci[1] < 0),
            }
        )
    return out
