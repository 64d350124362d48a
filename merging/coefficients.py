"""Pure functions for the Stage-1 coefficient maths of Bone Soup (paper Section 3.3).

Everything here works on small float64 tensors of length n (the number of objectives);
nothing touches model weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

SIMPLEX_TOLERANCE = 1e-6


class PreferenceError(ValueError):
    """A user preference vector that cannot be used; the message says why."""


def circulant_matrix(beta: float, n: int) -> torch.Tensor:
    """The symmetric circulant reward-combination matrix B of Eq. (12).

    Column i is w_i, the reward weights of backbone i: beta on the diagonal and
    (1 - beta) / (n - 1) elsewhere, so every column lies on the simplex (Rule 3).
    """
    if n < 1:
        raise ValueError(f"need at least one objective, got n={n}")
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if not 1.0 / n < beta <= 1.0:
        # Rule 1 (dominance) needs beta in (1/n, 1]; beta = 1 is Rewarded Soup (B = I).
        raise ValueError(f"beta must be in (1/n, 1] = ({1.0 / n:.4g}, 1], got {beta}")
    off = (1.0 - beta) / (n - 1)
    matrix = torch.full((n, n), off, dtype=torch.float64)
    matrix.fill_diagonal_(beta)
    return matrix


def check_combination_matrix(matrix: torch.Tensor) -> None:
    """Raise ValueError unless B is square, invertible (Rule 2) and its columns lie on the
    simplex (Rule 3)."""
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"B must be square, got shape {tuple(matrix.shape)}")
    for i, column in enumerate(matrix.T):
        if (column < -SIMPLEX_TOLERANCE).any() or abs(float(column.sum()) - 1.0) > 1e-4:
            raise ValueError(
                f"column {i} of B ({[round(float(v), 6) for v in column]}) is not on the simplex"
            )
    if torch.linalg.matrix_rank(matrix.double()) < matrix.shape[0]:
        raise ValueError("B is singular: the backbones' reward weights are linearly dependent")


def normalise_preference(
    preference: Sequence[float] | Mapping[str, float], objectives: Sequence[str]
) -> torch.Tensor:
    """Validate a user preference mu and project it onto the simplex Delta_n (Section 3.1).

    Accepts a list in objective order or a {objective name: weight} map (missing names
    weigh 0). Weights must be finite and >= 0, not all zero; they are divided by their sum.
    """
    n = len(objectives)
    if isinstance(preference, Mapping):
        unknown = sorted(set(preference) - set(objectives))
        if unknown:
            raise PreferenceError(
                f"unknown objective(s) in `preference`: {_some(unknown)}; known: {list(objectives)}"
            )
        values = [preference.get(name, 0.0) for name in objectives]
    else:
        values = list(preference)
        if len(values) != n:
            raise PreferenceError(
                f"`preference` must have {n} weights (one per objective {list(objectives)}). "
                f"Given: {len(values)}"
            )
    for name, value in zip(objectives, values, strict=True):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PreferenceError(f"`preference` weight for {name!r} must be a number")
        if not math.isfinite(value):
            raise PreferenceError(f"`preference` weight for {name!r} must be finite")
        if value < 0:
            raise PreferenceError(f"`preference` weight for {name!r} must be >= 0. Given: {value}")
    try:
        total = math.fsum(values)
    except OverflowError:
        total = math.inf
    if not math.isfinite(total):
        # mu is scale-free: finite weights near the float maximum (1e308, 1e308) overflow
        # the sum, so divide by the largest first. Only then: it costs exactness elsewhere.
        largest = max(values)
        values = [v / largest for v in values]
        total = math.fsum(values)
    if total <= 0:
        raise PreferenceError("`preference` weights must not all be zero")
    return torch.tensor(values, dtype=torch.float64) / total


def solve_lambda(matrix: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Merging coefficients lambda with B lambda = mu (Section 3.3.5).

    Solved with a linear solve rather than by forming B^-1, which is both cheaper and
    more accurate. Entries may be negative: that is how Bone Soup undoes the reward
    mixing of the backbones.
    """
    return torch.linalg.solve(matrix.double(), mu.double())


def bone_soup_coefficients(matrix: torch.Tensor, mu: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-backbone coefficients of the merged policy's weight delta.

    With theta_sft the base: theta_hat = theta_sft + sum_i lambda_i Delta_i (Eq. 6, lambda
    on the simplex's affine hull so sum lambda = 1), and Eq. (13) extrapolates to
    theta_hat^b = theta_hat + alpha (theta_hat - theta_sft), i.e. the delta is
    (1 + alpha) * sum_i lambda_i Delta_i.
    """
    return (1.0 + alpha) * solve_lambda(matrix, mu)


def _some(names: list[str], most: int = 3, chars: int = 40) -> str:
    """A few of `names`, each cut short: an error quotes what a client sent, boundedly."""
    shown = [name if len(name) <= chars else name[: chars - 3] + "..." for name in names[:most]]
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return f"{shown}{more}"
