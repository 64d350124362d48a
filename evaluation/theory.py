"""Analytic helpers for quadratic rewards (MAGE paper, Example 1 and Theorem 1). Pure numpy.

A quadratic reward is r(theta) = peak - (theta - opt)^T A (theta - opt) with A symmetric positive
definite (Theorem 1 uses A = k * I). A non-negative combination sum_j w_j r_j is again concave
quadratic, maximised where sum_j w_j A_j (theta - opt_j) = 0, i.e. at
theta = (sum_j w_j A_j)^{-1} sum_j w_j A_j opt_j, which we obtain with ``np.linalg.solve``.

Matrix convention (Section 3.3.4, Eq. 12): B = [w_1, ..., w_n] has the backbone combination
weights as *columns*, so h_i = sum_j B_ji r_j, and the merging coefficients solve mu = B lambda.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class QuadraticReward:
    """r(theta) = peak - (theta - optimum)^T hessian (theta - optimum)."""

    optimum: FloatArray  # (d,)
    hessian: FloatArray  # (d, d), symmetric positive definite
    peak: float = 0.0

    @classmethod
    def isotropic(cls, optimum: ArrayLike, k: float, peak: float = 0.0) -> QuadraticReward:
        """Theorem 1's reward r_i(theta) = r_i(theta_i) - k_i ||theta - theta_i||^2."""
        opt = np.asarray(optimum, dtype=np.float64)
        return cls(opt, k * np.eye(opt.shape[0]), peak)

    @classmethod
    def diagonal(cls, optimum: ArrayLike, scales: ArrayLike, peak: float = 0.0) -> QuadraticReward:
        """r(theta) = peak - sum_d scales_d (theta_d - optimum_d)^2 (e.g. Example 1's r_2)."""
        return cls(np.asarray(optimum, dtype=np.float64), np.diag(np.asarray(scales, float)), peak)

    def __call__(self, theta: ArrayLike) -> float:
        diff = np.asarray(theta, dtype=np.float64) - self.optimum  # (d,)
        return float(self.peak - diff @ self.hessian @ diff)


def weighted_reward(
    rewards: Sequence[QuadraticReward], weights: ArrayLike, theta: ArrayLike
) -> float:
    """sum_j weights_j * r_j(theta), e.g. the testing reward g_mu (Eq. 4) or a backbone h_i."""
    w = np.asarray(weights, dtype=np.float64)  # (n,)
    return float(sum(wj * r(theta) for wj, r in zip(w, rewards, strict=True)))


def argmax_weighted(rewards: Sequence[QuadraticReward], weights: ArrayLike) -> FloatArray:
    """Unique maximiser (d,) of sum_j weights_j r_j (weights >= 0, not all zero)."""
    w = np.asarray(weights, dtype=np.float64)  # (n,)
    lhs = sum(wj * r.hessian for wj, r in zip(w, rewards, strict=True))  # (d, d)
    rhs = sum(wj * r.hessian @ r.optimum for wj, r in zip(w, rewards, strict=True))  # (d,)
    return np.linalg.solve(lhs, rhs)


def symmetric_circulant(beta: float, n: int = 2) -> FloatArray:
    """Eq. (12): B (n, n) with beta on the diagonal and (1 - beta)/(n - 1) elsewhere."""
    off = (1.0 - beta) / (n - 1)
    return np.full((n, n), off) + (beta - off) * np.eye(n)


def backbone_optima(rewards: Sequence[QuadraticReward], b: ArrayLike) -> FloatArray:
    """Backbone models (n, d): row i maximises h_i = sum_j B_ji r_j (column i of B)."""
    mat = np.asarray(b, dtype=np.float64)  # (n, n)
    return np.stack([argmax_weighted(rewards, mat[:, i]) for i in range(mat.shape[1])])


def bone_soup_coefficients(b: ArrayLike, mu: ArrayLike) -> FloatArray:
    """Merging coefficients lambda (n,) solving mu = B lambda (Section 3.3.5)."""
    return np.linalg.solve(np.asarray(b, dtype=np.float64), np.asarray(mu, dtype=np.float64))


def bone_soup_solution(
    rewards: Sequence[QuadraticReward], b: ArrayLike, mu: ArrayLike
) -> FloatArray:
    """theta_bar^bone = sum_i lambda_i theta_i^bone, lambda = B^{-1} mu. Shape (d,)."""
    lam = bone_soup_coefficients(b, mu)  # (n,)
    return lam @ backbone_optima(rewards, b)  # (n,) @ (n, d) -> (d,)


def rewarded_soup_solution(rewards: Sequence[QuadraticReward], mu: ArrayLike) -> FloatArray:
    """theta_bar = sum_i mu_i theta_i (merge the specialised optima with lambda = mu). (d,)."""
    optima = np.stack([r.optimum for r in rewards])  # (n, d)
    return np.asarray(mu, dtype=np.float64) @ optima


def theorem1_interval(beta: float) -> tuple[float, float]:
    """Theorem 1's mu-interval ((1 - s)/2, (1 + s)/2), s = sqrt(2 beta^2 - 2 beta + 1)."""
    s = float(np.sqrt(2 * beta**2 - 2 * beta + 1))
    return (1 - s) / 2, (1 + s) / 2


def theorem1_backbones_closed_form(
    k1: float, k2: float, theta1: ArrayLike, theta2: ArrayLike, beta: float
) -> FloatArray:
    """Closed-form theta_1^bone, theta_2^bone (2, d) from the proof of Theorem 1."""
    t1 = np.asarray(theta1, dtype=np.float64)
    t2 = np.asarray(theta2, dtype=np.float64)
    bone1 = (beta * k1 * t1 + (1 - beta) * k2 * t2) / (beta * k1 + (1 - beta) * k2)
    bone2 = ((1 - beta) * k1 * t1 + beta * k2 * t2) / ((1 - beta) * k1 + beta * k2)
    return np.stack([bone1, bone2])


def theorem1_errors(
    k1: float, k2: float, theta1: ArrayLike, theta2: ArrayLike, beta: float, mu: float
) -> tuple[float, float]:
    """Closed-form (E(beta, mu), E(1, mu)) from the proof of Theorem 1 (squared distances)."""
    dist2 = float(np.sum((np.asarray(theta1, float) - np.asarray(theta2, float)) ** 2))
    denom_mu = mu * k1 + (1 - mu) * k2
    denom_b = (beta * k1 + (1 - beta) * k2) * ((1 - beta) * k1 + beta * k2)
    e_bone = (k1 * k2 * (k1 - k2) * (beta - mu) * (beta + mu - 1) / (denom_mu * denom_b)) ** 2
    e_rs = ((k1 - k2) * (1 - mu) * mu / denom_mu) ** 2
    return e_bone * dist2, e_rs * dist2
