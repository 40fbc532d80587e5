"""Sweep verdicts of the toy suite: whole-sweep trends and stated optima (toy_experiments/verdicts.py).

Expected values are worked out by hand in the comments, not taken from the code under test."""

import numpy as np
import pytest

from toy_experiments.verdicts import monotone_trend, spearman, stated_optimum

TAUS = (0.05, 0.1, 0.2, 0.5, 1.0)


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks of y = (0, 2, 1, 3): sum d^2 = 0 + 1 + 1 + 0 = 2, rho = 1 - 6*2 / (4*15) = 0.8
    assert spearman([1, 2, 3, 4], [1.0, 5.0, 2.0, 9.0]) == pytest.approx(0.8)
    # a tie: y ranks (0.5, 0.5, 2) against (0, 1, 2): Pearson of (-0.5,-0.5,1) and (-1,0,1) = 1.5/sqrt(1.5*2)
    assert spearman([1, 2, 3], [7, 7, 9]) == pytest.approx(1.5 / np.sqrt(3.0))
    assert spearman([1, 2, 3], [5, 5, 5]) == 0.0


def test_u_shape_fails_a_trend_that_its_end_points_pass():
    """The defect of issue 13: uniformity lowest at tau = 0.1, ends ordered (0.05 below 1.0)."""
    u_shaped = [-3.30, -3.46, -3.35, -3.10, -2.90]
    assert u_shaped[0] < u_shaped[-1]  # the end-point check would pass
    v = monotone_trend(TAUS, u_shaped, "increasing", min_spearman=0.9, what="uniformity", along="tau")
    assert not v.holds and not bool(v)
    assert v.stats["violations"] == [[0.05, 0.1, pytest.approx(-0.16)]]
    assert "whole sweep" in v.criterion and "0.05 -> 0.1" in v.detail


def test_trend_holds_and_respects_the_tolerance():
    rising = [-3.5, -3.4, -3.2, -3.0, -2.9]
    assert monotone_trend(TAUS, rising, "increasing", min_spearman=1.0).holds
    assert not monotone_trend(TAUS, rising, "decreasing", min_spearman=0.0).holds
    wobble = [10.0, 20.0, 19.0, 30.0, 40.0]  # one step back by 1 (5 % of 20); Spearman 0.9
    assert not monotone_trend(TAUS, wobble, "increasing", min_spearman=0.8).holds
    assert monotone_trend(TAUS, wobble, "increasing", min_spearman=0.8, tol=1.0).holds
    assert monotone_trend(TAUS, wobble, "increasing", min_spearman=0.8, tol=0.05, relative=True).holds
    assert not monotone_trend(TAUS, wobble, "increasing", min_spearman=0.8, tol=0.04, relative=True).holds
    assert not monotone_trend(TAUS, wobble, "increasing", min_spearman=0.95, tol=1.0).holds


def test_trend_sorts_by_position():
    # given out of order, the points sorted by x are (1, 1), (2, 2), (3, 3): increasing
    assert monotone_trend([3, 1, 2], [3.0, 1.0, 2.0], "increasing").holds


def test_peak_inside_the_sweep_fails_a_rising_trend():
    """Barlow Twins' rank peaking at lambda = 0.1 and falling at 1.0 is not 'rank rises with lambda'."""
    lams = (1e-4, 1e-3, 1 / 64, 0.1, 1.0)
    ranks = [18.0, 22.0, 35.0, 45.0, 38.0]
    v = monotone_trend(lams, ranks, "increasing", min_spearman=0.8, tol=0.1, relative=True)
    assert not v.holds  # 45 -> 38 is a fall of 16 % > 10 %
    assert monotone_trend(lams, ranks, "increasing", min_spearman=0.8, tol=0.2, relative=True).holds


def test_stated_optimum():
    u_shaped = [-3.30, -3.46, -3.35, -3.10, -2.90]
    at_01 = stated_optimum(TAUS, u_shaped, 0.1, kind="min")
    assert at_01.holds and at_01.stats["best_at"] == 0.1 and at_01.stats["interior"]
    at_005 = stated_optimum(TAUS, u_shaped, 0.05, kind="min")
    assert not at_005.holds and at_005.stats["gap"] == pytest.approx(0.16)
    assert stated_optimum(TAUS, u_shaped, 0.05, kind="min", tol=0.2).holds
    assert stated_optimum(TAUS, u_shaped, 1.0, kind="max").holds
    assert not stated_optimum(TAUS, u_shaped, 1.0, kind="max").stats["interior"]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="direction"):
        monotone_trend([1, 2], [1, 2], "up")
    with pytest.raises(ValueError, match="values"):
        monotone_trend([1, 2], [1, float("nan")], "increasing")
    with pytest.raises(ValueError, match="same length"):
        monotone_trend([1, 2, 3], [1, 2], "increasing")
    with pytest.raises(ValueError, match="at="):
        stated_optimum([1, 2, 3], [1, 2, 3], 4)
    with pytest.raises(ValueError, match="kind"):
        stated_optimum([1, 2, 3], [1, 2, 3], 2, kind="best")
