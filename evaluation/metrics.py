"""Metrics over a front of reward vectors (MAGE paper, Section 5.4 and Definition 1).

Conventions
-----------
* A *front* is a float array ``points`` of shape ``(N, n)``: one row per evaluated preference
  (N solutions), one column per objective (n rewards). **Higher reward is better** for every
  objective.
* ``preferences`` is a float array of shape ``(N, n)``; row ``i`` is the user preference vector
  ``mu_i`` that produced ``points[i]``. Rows of ``points`` and ``preferences`` are aligned, and
  their order is the order of the preference sweep (used by :func:`sparsity`).

Reference point for the hypervolume
-----------------------------------
The hypervolume (Eq. 27) is only comparable between fronts measured against the *same*
reference point, and the paper's rewards can be negative (so the usual "origin" reference is
meaningless). Our convention: the reference point is the component-wise minimum over **all
points of all methods evaluated in one comparison**, minus a small margin (so that the extreme
points still contribute a non-zero volume); see :func:`default_reference_point`. It is always
passed to :func:`hypervolume` explicitly so that every method in one comparison shares it; it is
never derived from a single front inside :func:`hypervolume`.
"""

from __future__ import annotations

import moocore
import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]


def _as_front(points: ArrayLike, name: str = "points") -> FloatArray:
    """Validate and convert a front to a finite float array of shape (N, n)."""
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < 1:
        raise ValueError(f"{name} must have shape (N, n), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    return arr


def _as_pair(points: ArrayLike, preferences: ArrayLike) -> tuple[FloatArray, FloatArray]:
    """Validate an aligned (points, preferences) pair, both of shape (N, n)."""
    pts = _as_front(points)
    prefs = _as_front(preferences, "preferences")
    if pts.shape != prefs.shape:
        raise ValueError(f"points {pts.shape} and preferences {prefs.shape} must have equal shape")
    return pts, prefs


def default_reference_point(*fronts: ArrayLike, margin: float = 1e-2) -> FloatArray:
    """Shared reference point for one comparison: component-wise min over all fronts - margin.

    Args:
        *fronts: every front (each of shape (N_m, n)) that takes part in the comparison.
        margin: absolute amount subtracted from every coordinate (must be > 0) so that the
            worst point in each objective still spans a non-degenerate box.

    Returns:
        Reference point of shape (n,).
    """
    if not fronts:
        raise ValueError("need at least one front")
    if margin <= 0:
        raise ValueError("margin must be positive")
    stacked = np.concatenate([_as_front(f) for f in fronts], axis=0)  # (sum N_m, n)
    return stacked.min(axis=0) - margin  # (n,)


def hypervolume(points: ArrayLike, reference_point: ArrayLike) -> float:
    """Hypervolume (Eq. 27) of a maximisation front w.r.t. an explicit reference point.

    Delegates to ``moocore.hypervolume(points, ref=reference_point, maximise=True)`` (moocore
    minimises by default). Dominated and duplicate points add nothing; points that do not
    strictly dominate the reference point contribute zero volume.

    Args:
        points: front of shape (N, n), higher is better.
        reference_point: shape (n,), shared by all fronts in one comparison.
    """
    pts = _as_front(points)  # (N, n)
    ref = np.asarray(reference_point, dtype=np.float64)  # (n,)
    if ref.shape != (pts.shape[1],):
        raise ValueError(f"reference_point must have shape ({pts.shape[1]},), got {ref.shape}")
    return float(moocore.hypervolume(pts, ref=ref, maximise=True))


def non_dominated(points: ArrayLike) -> NDArray[np.bool_]:
    """Boolean mask (N,) of the points not Pareto-dominated by any other point (maximisation).

    ``a`` dominates ``b`` iff ``a >= b`` in every objective and ``a > b`` in at least one.
    Identical points therefore do not dominate each other: every copy of a non-dominated point
    is ``True`` in the mask.
    """
    pts = _as_front(points)  # (N, n)
    geq = np.all(pts[:, None, :] >= pts[None, :, :], axis=2)  # (N, N): [j, i] = p_j >= p_i
    gt = np.any(pts[:, None, :] > pts[None, :, :], axis=2)  # (N, N): [j, i] = p_j > p_i somewhere
    dominated = np.any(geq & gt, axis=0)  # (N,): some j dominates i
    return ~dominated


def front_length(points: ArrayLike) -> int:
    """Cardinality of the Pareto front: number of *unique* non-dominated points.

    Duplicates do not dominate each other (see :func:`non_dominated`), but a point reached by
    several preferences is a single point of the front, so it is counted once.
    """
    pts = _as_front(points)  # (N, n)
    return int(np.unique(pts[non_dominated(pts)], axis=0).shape[0])


def inner_product(points: ArrayLike, preferences: ArrayLike) -> float:
    """Mean over the N solutions of Eq. (28): IP(mu, r) = sum_k mu_k * r_k.

    Eq. (28) is defined per (preference, reward) pair; to report one number per front we take
    the arithmetic mean over the N pairs.
    """
    pts, prefs = _as_pair(points, preferences)  # (N, n), (N, n)
    per_point = np.sum(prefs * pts, axis=1)  # (N,)  Eq. (28)
    return float(per_point.mean())


def sparsity(points: ArrayLike) -> float:
    """Eq. (29): average squared Euclidean distance between consecutive solutions.

    Sparsity = 1/(N-1) * sum_{i=2}^{N} ||r_i - r_{i-1}||^2, where (as in the paper's text) the
    sum runs over the N solutions *in the order of their preference vectors*; the rows are used
    in the given order and are not re-sorted. (Eq. 29 writes the count as ``n``; here it is the
    number of solutions, not of objectives.) Returns NaN when N < 2.
    """
    pts = _as_front(points)  # (N, n)
    if pts.shape[0] < 2:
        return float("nan")
    steps = np.diff(pts, axis=0)  # (N-1, n): r_i - r_{i-1}
    return float(np.sum(steps**2) / (pts.shape[0] - 1))  # Eq. (29)


def spacing(points: ArrayLike) -> float:
    """Eq. (30): population standard deviation of nearest-neighbour distances.

    Spacing = sqrt(1/N * sum_i (d_i - p)^2), d_i = min_{j != i} ||r_i - r_j||. The paper writes
    p = 1/N sum_i p_i, an evident typo; we use p = 1/N sum_i d_i (mean nearest-neighbour
    distance). All N solutions are used (duplicates give d_i = 0). Returns NaN when N < 2.
    """
    pts = _as_front(points)  # (N, n)
    n_pts = pts.shape[0]
    if n_pts < 2:
        return float("nan")
    dist = np.linalg.norm(pts[:, None, :] - pts[None, :, :], axis=2)  # (N, N)
    np.fill_diagonal(dist, np.inf)  # exclude j == i
    d = dist.min(axis=1)  # (N,)
    p = d.mean()
    return float(np.sqrt(np.mean((d - p) ** 2)))  # Eq. (30)


def controllability(points: ArrayLike, preferences: ArrayLike) -> float:
    """Controllability score K (Definition 1, Section 4.2.3).

    K = 1/(N(N-1)) * sum_{i != j} 1[ for all k: sgn(mu_ik - mu_jk) == sgn(R_k(O_i) - R_k(O_j)) ].

    Implemented literally, with sgn(0) = 0 and no tolerance: a tie between two preferences in
    objective k is matched only by an *exact* tie of the rewards in k, and a reward tie is matched
    only by a preference tie. The indicator is symmetric in (i, j), so ordered and unordered pairs
    give the same value. Returns NaN when N < 2.
    """
    pts, prefs = _as_pair(points, preferences)  # (N, n), (N, n)
    n_pts = pts.shape[0]
    if n_pts < 2:
        return float("nan")
    pref_sign = np.sign(prefs[:, None, :] - prefs[None, :, :])  # (N, N, n)
    reward_sign = np.sign(pts[:, None, :] - pts[None, :, :])  # (N, N, n)
    agree = np.all(pref_sign == reward_sign, axis=2)  # (N, N)
    np.fill_diagonal(agree, False)  # i != j
    return float(agree.sum() / (n_pts * (n_pts - 1)))


def chord_gaps(points: ArrayLike, preferences: ArrayLike) -> dict[str, list[float]]:
    """Observation 3 (LMC): reward at mu minus the chord between the sweep's endpoints.

    Two objectives only. With lambda = mu_1, the endpoints are the points at mu = (1, 0) and
    (0, 1); for each interior point and objective k the gap is
    R_k(mu) - [lambda R_k(1, 0) + (1 - lambda) R_k(0, 1)]; LMC says every gap is >= 0.
    Returns per objective the share of interior points on or above the chord and the mean gap.
    """
    pts, prefs = _as_pair(points, preferences)
    if pts.shape[1] != 2:
        raise ValueError("chord gaps are defined for two objectives")
    first = int(np.argmax(prefs[:, 0]))
    last = int(np.argmin(prefs[:, 0]))
    lam = prefs[:, 0]
    inside = (lam > 0) & (lam < 1)
    if not inside.any():
        raise ValueError("no preference strictly between the endpoints")
    chord = lam[:, None] * pts[first] + (1 - lam[:, None]) * pts[last]
    gaps = (pts - chord)[inside]  # (interior, 2)
    return {
        "share_above": [float(np.mean(gaps[:, k] >= -1e-12)) for k in range(2)],
        "mean_gap": [float(np.mean(gaps[:, k])) for k in range(2)],
    }


def summarise_front(
    points: ArrayLike, preferences: ArrayLike, reference_point: ArrayLike
) -> dict[str, float | int]:
    """All metrics of one front.

    Args:
        points: (N, n) rewards, rows in preference-sweep order.
        preferences: (N, n) preference vectors aligned with ``points``.
        reference_point: (n,) shared reference point (see module docstring).

    Returns:
        Dict with keys hv, inner_product, sparsity, spacing, front_length, controllability.
    """
    pts, prefs = _as_pair(points, preferences)
    return {
        "hv": hypervolume(pts, reference_point),
        "inner_product": inner_product(pts, prefs),
        "sparsity": sparsity(pts),
        "spacing": spacing(pts),
        "front_length": front_length(pts),
        "controllability": controllability(pts, prefs),
    }
