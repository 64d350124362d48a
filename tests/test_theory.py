"""Numerical checks of the paper's Example 1 (Section 3.3.2) and Theorem 1 (Section 4.1.1)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from evaluation.theory import (
    QuadraticReward,
    argmax_weighted,
    backbone_optima,
    bone_soup_coefficients,
    bone_soup_solution,
    rewarded_soup_solution,
    symmetric_circulant,
    theorem1_backbones_closed_form,
    theorem1_errors,
    theorem1_interval,
    weighted_reward,
)

BETAS = [0.6, 0.7, 0.8, 0.9]
K_PAIRS = [(1.0, 2.0), (1.0, 5.0), (3.0, 0.5), (0.2, 7.0)]

# ------------------------------------------------------------------------------ Example 1

# r_1 = -(x-1)^2 - (y-1)^2, r_2 = -(x-3)^2 - 4(y+1)^2   (Eqs. 9, 10)
EX1 = [
    QuadraticReward.diagonal([1.0, 1.0], [1.0, 1.0]),
    QuadraticReward.diagonal([3.0, -1.0], [1.0, 4.0]),
]
# columns of B are the backbone weights: h_1 = 0.4 r_1 + 0.6 r_2, h_2 = 0.6 r_1 + 0.4 r_2
EX1_B = np.array([[0.4, 0.6], [0.6, 0.4]])


def test_example1_rewards_match_paper() -> None:
    assert EX1[0]([2.0, 3.0]) == pytest.approx(-(1.0**2) - 2.0**2)
    assert EX1[1]([2.0, 3.0]) == pytest.approx(-(1.0**2) - 4 * 4.0**2)


def test_example1_backbones() -> None:
    # h_1: x = .4*1 + .6*3 = 2.2; y = (.4*1 + .6*4*(-1)) / (.4 + .6*4) = -2/2.8 = -5/7
    # h_2: x = .6*1 + .4*3 = 1.8; y = (.6*1 + .4*4*(-1)) / (.6 + .4*4) = -1/2.2 = -5/11
    bones = backbone_optima(EX1, EX1_B)
    np.testing.assert_allclose(bones[0], [2.2, -5 / 7])
    np.testing.assert_allclose(bones[1], [1.8, -5 / 11])
    # first-order optimality of h_i at its backbone (central finite differences).
    for i, bone in enumerate(bones):
        for e in np.eye(2) * 1e-5:
            grad = weighted_reward(EX1, EX1_B[:, i], bone + e) - weighted_reward(
                EX1, EX1_B[:, i], bone - e
            )
            assert abs(grad) < 1e-8


def test_example1_bone_soup_closer_than_rewarded_soup() -> None:
    mu = np.array([0.5, 0.5])
    theta_star = argmax_weighted(EX1, mu)
    # y* = (.5*1 - .5*4) / (.5 + .5*4) = -1.5/2.5 = -0.6
    np.testing.assert_allclose(theta_star, [2.0, -0.6])
    np.testing.assert_allclose(rewarded_soup_solution(EX1, mu), [2.0, 0.0])
    # lambda = B^{-1} mu = (.5, .5); merge -> (2, -(5/7 + 5/11)/2) = (2, -45/77) ~ (2, -0.584)
    np.testing.assert_allclose(bone_soup_coefficients(EX1_B, mu), [0.5, 0.5])
    bone = bone_soup_solution(EX1, EX1_B, mu)
    np.testing.assert_allclose(bone, [2.0, -45 / 77])
    assert bone[1] == pytest.approx(-0.58, abs=5e-3)
    rs = rewarded_soup_solution(EX1, mu)
    assert np.linalg.norm(bone - theta_star) < np.linalg.norm(rs - theta_star)
    assert weighted_reward(EX1, mu, bone) > weighted_reward(EX1, mu, rs)


def test_example1_mu_equal_backbone_weight_is_optimal() -> None:
    # mu' = (0.4, 0.6) is column 1 of B -> lambda = (1, 0) -> theta_1^bone, the exact optimum.
    mu = np.array([0.4, 0.6])
    np.testing.assert_allclose(bone_soup_coefficients(EX1_B, mu), [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(bone_soup_solution(EX1, EX1_B, mu), argmax_weighted(EX1, mu))


# ------------------------------------------------------------------------------ Theorem 1


def _theorem_setup(k1: float, k2: float, seed: int) -> tuple[list[QuadraticReward], np.ndarray]:
    rng = np.random.default_rng(seed)
    optima = rng.normal(size=(2, 2))  # theta_1, theta_2 in 2-D
    peaks = rng.normal(size=2)
    rewards = [
        QuadraticReward.isotropic(optima[0], k1, peaks[0]),
        QuadraticReward.isotropic(optima[1], k2, peaks[1]),
    ]
    return rewards, optima


def test_theorem1_interval_length() -> None:
    for beta in BETAS:
        lo, hi = theorem1_interval(beta)
        assert hi - lo == pytest.approx(np.sqrt(2 * beta**2 - 2 * beta + 1))
        assert hi - lo >= np.sqrt(2) / 2
        assert lo < 1 - beta < beta < hi  # the interval contains both backbone weights


@pytest.mark.parametrize(("beta", "ks"), list(itertools.product(BETAS, K_PAIRS)))
def test_theorem1_bone_soup_beats_rewarded_soup(beta: float, ks: tuple[float, float]) -> None:
    k1, k2 = ks
    rewards, optima = _theorem_setup(k1, k2, seed=int(100 * beta + 10 * k1 + k2))
    b = symmetric_circulant(beta, 2)
    np.testing.assert_allclose(b, [[beta, 1 - beta], [1 - beta, beta]])
    # backbones from the generic solver agree with the proof's closed form
    np.testing.assert_allclose(
        backbone_optima(rewards, b),
        theorem1_backbones_closed_form(k1, k2, optima[0], optima[1], beta),
    )
    lo, hi = theorem1_interval(beta)
    rng = np.random.default_rng(0)
    mus = np.concatenate([rng.uniform(lo, hi, size=25), [0.5, lo + 1e-3, hi - 1e-3]])
    for mu_1 in mus:
        mu = np.array([mu_1, 1 - mu_1])
        # lambda from the proof: (beta + mu - 1) / (2 beta - 1)
        lam = bone_soup_coefficients(b, mu)
        np.testing.assert_allclose(lam, [(beta + mu_1 - 1) / (2 * beta - 1), 1 - lam[0]])
        theta_star = argmax_weighted(rewards, mu)
        bone = bone_soup_solution(rewards, b, mu)
        rs = rewarded_soup_solution(rewards, mu)
        e_bone = float(np.sum((bone - theta_star) ** 2))
        e_rs = float(np.sum((rs - theta_star) ** 2))
        # the proof's closed-form errors match the numerical ones
        np.testing.assert_allclose(
            [e_bone, e_rs], theorem1_errors(k1, k2, optima[0], optima[1], beta, mu_1), atol=1e-12
        )
        assert e_bone < e_rs
        assert weighted_reward(rewards, mu, bone) > weighted_reward(rewards, mu, rs)


def test_theorem1_interval_is_not_vacuous() -> None:
    # Outside the interval Bone Soup can lose (it extrapolates): mu = 0.01, beta = 0.6.
    k1, k2, beta = 1.0, 2.0, 0.6
    rewards, _ = _theorem_setup(k1, k2, seed=1)
    mu = np.array([0.01, 0.99])
    assert not theorem1_interval(beta)[0] < mu[0]
    theta_star = argmax_weighted(rewards, mu)
    bone = bone_soup_solution(rewards, symmetric_circulant(beta), mu)
    rs = rewarded_soup_solution(rewards, mu)
    assert np.linalg.norm(bone - theta_star) > np.linalg.norm(rs - theta_star)


def test_theorem1_equal_curvatures_rewarded_soup_is_exact() -> None:
    # k_1 == k_2 (excluded by the theorem): theta* = mu theta_1 + (1-mu) theta_2 exactly.
    rewards, _ = _theorem_setup(2.0, 2.0, seed=3)
    mu = np.array([0.3, 0.7])
    np.testing.assert_allclose(rewarded_soup_solution(rewards, mu), argmax_weighted(rewards, mu))
