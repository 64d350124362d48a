"""Unit tests for evaluation.metrics on small fronts computed by hand (maximisation)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evaluation.metrics import (
    chord_gaps,
    controllability,
    default_reference_point,
    front_length,
    hypervolume,
    inner_product,
    non_dominated,
    spacing,
    sparsity,
    summarise_front,
)

STAIRS = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])
STAIRS_PREFS = np.array([[0.2, 0.8], [0.5, 0.5], [0.8, 0.2]])


# ----------------------------------------------------------------------------- hypervolume


def test_hypervolume_staircase_maximise() -> None:
    # ref (0,0): slabs x in [0,1] height 3, [1,2] height 2, [2,3] height 1 -> 3 + 2 + 1 = 6.
    # (Under moocore's default minimisation this would be 0, so this checks maximise=True.)
    assert hypervolume(STAIRS, [0.0, 0.0]) == pytest.approx(6.0)


def test_hypervolume_ignores_dominated_and_duplicates() -> None:
    # (1,1) is dominated by (2,2) and (2,2) is duplicated: the union of boxes is unchanged = 6.
    pts = np.vstack([STAIRS, [[1.0, 1.0], [2.0, 2.0]]])
    assert hypervolume(pts, [0.0, 0.0]) == pytest.approx(6.0)


def test_hypervolume_negative_rewards() -> None:
    # ref (-3,-2): box of (-1,-1) is 2x1 = 2, box of (-2,0) is 1x2 = 2,
    # overlap [-3,-2]x[-2,-1] = 1 -> 2 + 2 - 1 = 3.
    assert hypervolume([[-1.0, -1.0], [-2.0, 0.0]], [-3.0, -2.0]) == pytest.approx(3.0)


def test_hypervolume_point_not_beyond_reference_adds_nothing() -> None:
    # (5, 0) ties the reference in objective 2 -> zero-width box; only (1,1) counts: 1*1 = 1.
    assert hypervolume([[1.0, 1.0], [5.0, 0.0]], [0.0, 0.0]) == pytest.approx(1.0)


def test_hypervolume_rejects_bad_reference() -> None:
    with pytest.raises(ValueError):
        hypervolume(STAIRS, [0.0, 0.0, 0.0])


def test_default_reference_point_shared_min_minus_margin() -> None:
    # min over both fronts: x = min(0, 2, -1) = -1, y = min(1, -3, 5) = -3; minus 0.5.
    ref = default_reference_point([[0.0, 1.0], [2.0, -3.0]], [[-1.0, 5.0]], margin=0.5)
    np.testing.assert_allclose(ref, [-1.5, -3.5])


# ------------------------------------------------------------------ dominance, front length

MIXED = np.array(
    [
        [1.0, 3.0],  # non-dominated
        [2.0, 2.0],  # non-dominated
        [2.0, 2.0],  # duplicate of the above: still non-dominated
        [1.0, 1.0],  # dominated by (2,2)
        [3.0, 1.0],  # non-dominated
        [3.0, 0.5],  # weakly dominated by (3,1): equal x, lower y
        [0.0, 3.0],  # weakly dominated by (1,3)
    ]
)


def test_non_dominated_mask() -> None:
    expected = [True, True, True, False, True, False, False]
    np.testing.assert_array_equal(non_dominated(MIXED), expected)


def test_front_length_counts_unique_non_dominated() -> None:
    # non-dominated rows: (1,3), (2,2), (2,2), (3,1) -> unique: 3.
    assert front_length(MIXED) == 3


def test_identical_points_do_not_dominate_each_other() -> None:
    pts = np.array([[1.0, 1.0], [1.0, 1.0]])
    np.testing.assert_array_equal(non_dominated(pts), [True, True])
    assert front_length(pts) == 1


def test_front_length_fully_dominated_chain() -> None:
    # (3,3) dominates (2,2) dominates (1,1) -> front length 1.
    assert front_length([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]) == 1


# --------------------------------------------------------------------------- inner product


def test_inner_product_mean_of_eq28() -> None:
    # 0.2*1 + 0.8*3 = 2.6; 0.5*2 + 0.5*2 = 2.0; 1*4 + 0*0 = 4.0 -> mean 8.6/3.
    pts = [[1.0, 3.0], [2.0, 2.0], [4.0, 0.0]]
    prefs = [[0.2, 0.8], [0.5, 0.5], [1.0, 0.0]]
    assert inner_product(pts, prefs) == pytest.approx(8.6 / 3)


def test_inner_product_shape_mismatch() -> None:
    with pytest.raises(ValueError):
        inner_product(STAIRS, STAIRS_PREFS[:2])


# -------------------------------------------------------------------------------- sparsity


def test_sparsity_eq29() -> None:
    # ||(1,1)-(0,0)||^2 = 2, ||(1,3)-(1,1)||^2 = 4 -> (2 + 4)/(3 - 1) = 3.
    assert sparsity([[0.0, 0.0], [1.0, 1.0], [1.0, 3.0]]) == pytest.approx(3.0)


def test_sparsity_uses_given_order() -> None:
    # order (1,1),(0,0),(1,3): 2 + (1 + 9) = 12 -> 12/2 = 6 (not re-sorted).
    assert sparsity([[1.0, 1.0], [0.0, 0.0], [1.0, 3.0]]) == pytest.approx(6.0)


def test_sparsity_duplicates_and_single_point() -> None:
    # consecutive duplicates contribute 0: (0 + ||(3,4)||^2)/2 = 25/2.
    assert sparsity([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0]]) == pytest.approx(12.5)
    assert math.isnan(sparsity([[1.0, 2.0]]))


# --------------------------------------------------------------------------------- spacing


def test_spacing_eq30() -> None:
    # x = 0,1,3,6 on a line: d = 1,1,2,3; p = 7/4; (d-p)^2 = .5625,.5625,.0625,1.5625
    # sum 2.75, /4 = 0.6875 -> sqrt(0.6875).
    pts = [[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [6.0, 0.0]]
    assert spacing(pts) == pytest.approx(math.sqrt(0.6875))


def test_spacing_even_front_is_zero() -> None:
    # every nearest-neighbour distance is sqrt(2) -> zero deviation.
    assert spacing(STAIRS) == pytest.approx(0.0, abs=1e-12)


def test_spacing_with_duplicates() -> None:
    # d = 0, 0, 5; p = 5/3; (d-p)^2 = 25/9, 25/9, 100/9 -> mean 50/9 -> sqrt(50/9).
    assert spacing([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0]]) == pytest.approx(math.sqrt(50 / 9))
    assert math.isnan(spacing([[1.0, 2.0]]))


# ------------------------------------------------------------------------- controllability


def test_controllability_perfect() -> None:
    # reward ranks follow preference ranks in both objectives for all 3 pairs -> 1.
    assert controllability(STAIRS, STAIRS_PREFS) == pytest.approx(1.0)


def test_controllability_one_swapped_pair() -> None:
    # rewards (1,3),(3,1),(2,2) for mu_1 = .2,.5,.8: pairs (0,1) ok, (0,2) ok,
    # (1,2): sgn(.5-.8) = -1 but sgn(3-2) = +1 -> fails. 4 of 6 ordered pairs -> 2/3.
    pts = [[1.0, 3.0], [3.0, 1.0], [2.0, 2.0]]
    assert controllability(pts, STAIRS_PREFS) == pytest.approx(2 / 3)


def test_controllability_preference_tie_needs_reward_tie() -> None:
    prefs = [[0.5, 0.5], [0.5, 0.5], [0.8, 0.2]]
    # tied preferences with tied rewards: every pair matches -> 1.
    assert controllability([[2.0, 2.0], [2.0, 2.0], [3.0, 1.0]], prefs) == pytest.approx(1.0)
    # pair (0,1): sgn(0) = 0 vs sgn(2 - 2.1) = -1 -> fails; other 2 pairs ok -> 4/6.
    pts = [[2.0, 2.0], [2.1, 1.9], [3.0, 1.0]]
    assert controllability(pts, prefs) == pytest.approx(2 / 3)


def test_controllability_reward_tie_without_preference_tie() -> None:
    # objective 1: sgn(.2-.8) = -1 but sgn(1-1) = 0 -> the only pair fails -> 0.
    assert controllability([[1.0, 2.0], [1.0, 1.0]], [[0.2, 0.8], [0.8, 0.2]]) == 0.0


def test_controllability_requires_all_objectives() -> None:
    # objective 1 agrees (-,-) but objective 2 does not (+ vs -) -> 0.
    assert controllability([[1.0, 1.0], [2.0, 2.0]], [[0.2, 0.8], [0.8, 0.2]]) == 0.0
    assert math.isnan(controllability([[1.0, 1.0]], [[0.5, 0.5]]))


# ------------------------------------------------------------------------------- summarise


def test_summarise_front_hand_values() -> None:
    # hv 6 (see above); IP: 2.6, 2.0, 2.6 -> 2.4; sparsity (2 + 2)/2 = 2; spacing 0;
    # front length 3; controllability 1.
    out = summarise_front(STAIRS, STAIRS_PREFS, [0.0, 0.0])
    assert set(out) == {
        "hv",
        "inner_product",
        "sparsity",
        "spacing",
        "front_length",
        "controllability",
    }
    assert out["hv"] == pytest.approx(6.0)
    assert out["inner_product"] == pytest.approx(2.4)
    assert out["sparsity"] == pytest.approx(2.0)
    assert out["spacing"] == pytest.approx(0.0, abs=1e-12)
    assert out["front_length"] == 3
    assert out["controllability"] == pytest.approx(1.0)


def test_chord_gaps_by_hand() -> None:
    # mu_1 = 1, 0.5, 0.25, 0: endpoints (1, 0) -> (2, 0) and (0, 1) -> (0, 4).
    prefs = [[1, 0], [0.5, 0.5], [0.25, 0.75], [0, 1]]
    points = [[2, 0], [1.5, 2.0], [0.25, 3.5], [0, 4]]
    # chords: 0.5 -> (1, 2); 0.25 -> (0.5, 3); gaps (0.5, 0) and (-0.25, 0.5)
    gaps = chord_gaps(points, prefs)
    assert gaps["share_above"] == [0.5, 1.0]
    assert gaps["mean_gap"] == pytest.approx([0.125, 0.25])


def test_chord_gaps_needs_two_objectives_and_an_interior_point() -> None:
    with pytest.raises(ValueError, match="two objectives"):
        chord_gaps([[1, 2, 3], [3, 2, 1]], [[1, 0, 0], [0, 0, 1]])
    with pytest.raises(ValueError, match="between"):
        chord_gaps([[1, 0], [0, 1]], [[1, 0], [0, 1]])
