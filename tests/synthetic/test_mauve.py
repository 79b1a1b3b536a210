"""MAUVE: hand-computed divergence curves, closed forms, and behaviour on feature sets."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ghostdp.integrations.synthetic.mauve import (
    MauveConfig,
    compute_mauve,
    default_lambdas,
    divergence_curve,
    mauve_from_histograms,
)

FINE = np.linspace(1e-6, 1 - 1e-6, 4001)


def test_two_bin_case_by_hand():
    """P = (1/2, 1/2), Q = (1, 0), one lambda = 1/2, c = 1.

    R = (3/4, 1/4); KL(Q||R) = log(4/3) -> x = 3/4; KL(P||R) = (1/2) log(2/3) + (1/2) log 2 = (1/2) log(4/3)
    -> y = sqrt(3)/2. Curve (0,1), (3/4, sqrt(3)/2), (1,0); trapezoids:
    3/4 * (1 + sqrt(3)/2) / 2 + 1/4 * (sqrt(3)/2) / 2 = 3/8 + sqrt(3)/4.
    """
    x, y = divergence_curve(np.array([1.0, 1.0]), np.array([3.0, 0.0]), scaling=1.0, lambdas=np.array([0.5]))
    np.testing.assert_allclose(x, [0, 0.75, 1])
    np.testing.assert_allclose(y, [1, math.sqrt(3) / 2, 0])
    got = mauve_from_histograms([1.0, 1.0], [3.0, 0.0], scaling=1.0, lambdas=np.array([0.5]))
    assert got == pytest.approx(3 / 8 + math.sqrt(3) / 4, abs=1e-12)


@pytest.mark.parametrize("c", [1, 2, 5])
def test_disjoint_supports_closed_form(c):
    """Disjoint P, Q: x = (1 - lambda)^c, y = lambda^c, so the area is the integral of (1 - x^(1/c))^c,
    which is c * B(c, c + 1) = (c!)^2 / (2c)!: 1/2, 1/6, 1/252."""
    exact = math.factorial(c) ** 2 / math.factorial(2 * c)
    got = mauve_from_histograms([1.0, 0.0], [0.0, 1.0], scaling=c, lambdas=FINE)
    assert got == pytest.approx(exact, rel=1e-4)
    # With the default 25-point grid the value is still near 0 for c = 5.
    if c == 5:
        assert mauve_from_histograms([1, 0], [0, 1]) < 0.01


def test_identical_histograms_give_one_and_symmetry():
    assert mauve_from_histograms([3, 1, 0, 2], [3, 1, 0, 2]) == pytest.approx(1.0, abs=1e-12)
    p, q = np.array([5.0, 3, 1, 1]), np.array([1.0, 2, 3, 4])
    # Swapping P and Q mirrors the curve in x = y (lambda -> 1 - lambda on a symmetric grid): same area.
    assert mauve_from_histograms(p, q) == pytest.approx(mauve_from_histograms(q, p), abs=1e-12)
    a = mauve_from_histograms(p, q)
    assert 0 < a < 1
    # Moving Q towards P raises MAUVE.
    assert mauve_from_histograms(p, 0.5 * (p / p.sum()) + 0.5 * (q / q.sum())) > a


def test_curve_is_monotone_frontier():
    x, y = divergence_curve(np.array([5.0, 3, 1, 1]), np.array([1.0, 2, 3, 4]))
    assert (x[0], y[0], x[-1], y[-1]) == (0.0, 1.0, 1.0, 0.0)
    assert np.all(np.diff(x) >= 0) and np.all(np.diff(y) <= 0)
    assert len(x) == len(default_lambdas()) + 2


def test_histogram_errors():
    with pytest.raises(ValueError, match="same bins"):
        mauve_from_histograms([1, 1], [1, 1, 1])
    with pytest.raises(ValueError, match="all zeros"):
        mauve_from_histograms([0, 0], [1, 1])
    with pytest.raises(ValueError, match="open interval"):
        mauve_from_histograms([1, 1], [1, 2], lambdas=np.array([0.0, 0.5]))
    with pytest.raises(ValueError, match="num_clusters"):
        MauveConfig(num_clusters=1)


def mixture(rng, n, modes, centers):
    m = rng.choice(modes, size=n)
    return centers[m] + 0.5 * rng.normal(size=(n, centers.shape[1]))


def test_features_identical_same_disjoint_and_mode_collapse():
    rng = np.random.default_rng(0)
    centers = 5 * rng.normal(size=(8, 16))
    p = mixture(rng, 400, np.arange(8), centers)
    same = mixture(rng, 400, np.arange(8), centers)
    collapsed = mixture(rng, 400, np.arange(4), centers)  # the generator lost half the modes
    far = mixture(rng, 400, np.arange(8), -centers + 40.0)

    identical = compute_mauve(p, p.copy())
    assert identical.mauve == pytest.approx(1.0, abs=1e-9)
    r_same = compute_mauve(p, same)
    r_collapsed = compute_mauve(p, collapsed)
    r_far = compute_mauve(p, far)
    assert r_same.mauve > 0.7
    assert r_collapsed.mauve < r_same.mauve - 0.3
    assert r_far.mauve < 0.02
    assert r_same.num_clusters == 80  # n / 10 with n = 800 points in the union
    assert 1 <= r_same.num_components <= 16
    assert r_same.p_hist.sum() == 400 and r_same.q_hist.sum() == 400
    assert compute_mauve(p, same).mauve == r_same.mauve  # seeded
    assert r_same.to_dict()["mauve"] == r_same.mauve


def test_feature_errors():
    with pytest.raises(ValueError, match=r"\(n_p, d\) and \(n_q, d\)"):
        compute_mauve(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="needs at least 50 points"):
        compute_mauve(np.random.rand(10, 3), np.random.rand(10, 3), MauveConfig(num_clusters=50))
