"""Issue 10, kind 4: accountant numerics at the edges.

Every RDP value is an upper bound at every order the API accepts (checked against the Renyi divergence
computed directly with 60-digit arithmetic, and the KL divergence it tends to at alpha -> 1), and the PRV
epsilon is within 1 % above a tight reference (prv-accountant at eps_error 0.01, or the exact epsilon).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from ghostdp.engine import accounting as acc

mpmath = pytest.importorskip("mpmath")


def mp_rdp(sigma: float, q: float, alpha: float | None) -> float:
    """D_alpha(P || Q) (alpha None: KL(P || Q)) for P = (1-q) N(0, s^2) + q N(1, s^2), Q = N(0, s^2), 60 digits."""
    with mpmath.workdps(60):
        s, qq = mpmath.mpf(sigma), mpmath.mpf(q)

        def ratio(z):  # P/Q
            return 1 - qq + qq * mpmath.exp((2 * z - 1) / (2 * s * s))

        def q_pdf(z):
            return mpmath.npdf(z, 0, s)

        pieces = [-mpmath.inf, -s, 0, mpmath.mpf(1) / 2, 1, 1 + s, mpmath.inf]
        if alpha is None:
            return float(mpmath.quad(lambda z: q_pdf(z) * ratio(z) * mpmath.log(ratio(z)), pieces))
        a = mpmath.mpf(alpha)
        big_a = mpmath.quad(lambda z: q_pdf(z) * ratio(z) ** a, pieces)
        return float(mpmath.log(big_a) / (a - 1))


NEAR_ONE = [1 + 1e-15, 1 + 1e-12, 1 + 1e-11, 1 + 1e-10, 1 + 1e-9, 1 + 1e-8, 1 + 1e-6, 1 + 1e-4, 1.003]


def test_rdp_just_above_order_one_is_not_below_the_kl_limit_issue_case():
    """sigma 1, q 0.00105: the series came out up to 31 % below KL at 1 + 1e-12; now >= KL, within 1e-6."""
    kl = mp_rdp(1.0, 0.00105, None)
    assert kl == pytest.approx(9.44548004213e-07, rel=1e-10)
    orders = [1 + 1e-8, 1 + 1e-9, 1 + 1e-10, 1 + 1e-11, 1 + 1e-12]
    ours = acc.compute_rdp(noise_multiplier=1.0, sample_rate=0.00105, orders=orders)
    assert np.all(ours >= kl)
    assert np.all(ours <= kl * (1 + 1e-6))


@pytest.mark.parametrize("sigma,q", [(1.0, 0.00105), (0.5, 0.3), (3.0, 1e-5), (0.8, 0.02), (1.5, 0.9)])
def test_rdp_near_one_is_an_upper_bound_at_every_order(sigma, q):
    """Against D_alpha itself in 60 digits (which the double-precision series cannot resolve there)."""
    ours = acc.compute_rdp(noise_multiplier=sigma, sample_rate=q, orders=NEAR_ONE)
    kl = mp_rdp(sigma, q, None)
    for alpha, value in zip(NEAR_ONE, ours):
        ref = mp_rdp(sigma, q, alpha) if alpha - 1 >= 1e-6 else kl  # D_alpha -> KL; 60 digits resolve >= 1e-6
        assert value >= ref * (1 - 1e-12), (alpha, value, ref)
        assert value <= max(ref, kl) * (1 + 1e-5) + 1e-300, (alpha, value, ref)
    assert np.all(np.diff(ours) >= -1e-12 * ours[:-1])  # D_alpha is non-decreasing in alpha


@pytest.mark.parametrize("sigma,q,alpha", [(5.0, 0.001, 2.5), (5.0, 0.001, 3.7), (10.0, 1e-4, 1.5), (3.0, 1e-5, 7.5)])
def test_tiny_rdp_at_fractional_orders_is_an_upper_bound(sigma, q, alpha):
    """Where rdp is tiny, log A = (alpha - 1) rdp is too: the same cancellation away from 1."""
    ours = float(acc.compute_rdp(noise_multiplier=sigma, sample_rate=q, orders=[alpha])[0])
    ref = mp_rdp(sigma, q, alpha)
    assert ref <= ours <= ref * (1 + 1e-8)


def test_prv_epsilon_within_one_percent_of_a_tight_reference_issue_case():
    """sigma 0.6, q 0.0152, 328 steps, delta 7.4e-6: was 7.29 against 7.14 (+2.1 %)."""
    from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant

    sigma, q, steps, delta = 0.6, 0.0152, 328, 7.4e-6
    ref = PRVAccountant(
        prvs=[PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=sigma)],
        max_self_compositions=[steps], eps_error=0.01, delta_error=delta * 1e-3,
    )
    low, est, up = ref.compute_epsilon(delta=delta, num_self_compositions=[steps])
    assert up == pytest.approx(7.144, abs=0.01)
    ours = acc.epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta)
    assert low <= ours <= 1.01 * up


def gaussian_exact_epsilon(mu_sigma: float, delta: float) -> float:
    """Exact epsilon of the Gaussian mechanism with sensitivity 1 and noise sigma (Balle & Wang 2018)."""
    from scipy import stats

    def d(eps):
        return stats.norm.cdf(-eps * mu_sigma + 1 / (2 * mu_sigma)) - math.exp(eps) * stats.norm.cdf(
            -eps * mu_sigma - 1 / (2 * mu_sigma))

    lo, hi = 0.0, 1.0
    while d(hi) > delta:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if d(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("sigma,steps", [(4.0, 64), (1.0, 16)])
def test_prv_epsilon_within_one_percent_of_the_exact_gaussian(sigma, steps):
    """q = 1: n Gaussian steps compose to one Gaussian with sigma / sqrt(n), whose epsilon is exact."""
    exact = gaussian_exact_epsilon(sigma / math.sqrt(steps), 1e-5)
    ours = acc.epsilon(noise_multiplier=sigma, sample_rate=1.0, steps=steps, delta=1e-5)
    assert exact <= ours <= 1.01 * exact


def test_prv_epsilon_within_one_percent_at_a_second_moderate_point():
    """sigma 1.0, q 0.01, 2000 steps, delta 1e-5 (epsilon about 1.6): against prv-accountant at eps_error 0.005."""
    from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant

    sigma, q, steps, delta = 1.0, 0.01, 2000, 1e-5
    ref = PRVAccountant(
        prvs=[PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=sigma)],
        max_self_compositions=[steps], eps_error=0.005, delta_error=delta * 1e-3,
    )
    low, est, up = ref.compute_epsilon(delta=delta, num_self_compositions=[steps])
    ours = acc.epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta)
    assert low <= ours <= 1.01 * up
