"""The one-run audit's epsilon lower bound (Steinke, Nasr, Jagielski 2023) against scipy.stats.binom."""
from __future__ import annotations

import itertools
import math
import sys

import numpy as np
import pytest
from scipy import optimize, stats

from ghostdp.audit import epsilon_lower_bound, p_value
from ghostdp.integrations.audit.bounds import binomial_upper_tail


def q_of(eps):
    return math.exp(eps) / (1.0 + math.exp(eps))


def reference_p_value(m, r, v, eps, delta):
    """Steinke et al.'s Theorem 3 bound written directly with scipy: f(v) + 2 m delta max_i (f(v - i) - f(v)) / i."""
    q = q_of(eps)
    f = lambda x: 1.0 if x <= 0 else stats.binom.sf(x - 1, r, q)
    alpha = max(((f(v - i) - f(v)) / i for i in range(1, m + 1)), default=0.0)
    return min(1.0, f(v) + 2 * m * delta * alpha)


@pytest.mark.parametrize("r,v", [(10, 10), (50, 40), (256, 200), (1000, 600), (37, 30)])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_pure_dp_bound_solves_the_binomial_tail_equation(r, v, confidence):
    eps = epsilon_lower_bound(num_guesses=r, num_correct=v, confidence=confidence, delta=0.0, num_canaries=2 * r)
    assert eps > 0
    # P[Binomial(r, e^eps / (1 + e^eps)) >= v] = 1 - confidence, by scipy (independent of ghostdp's lgamma tail)
    assert stats.binom.sf(v - 1, r, q_of(eps)) == pytest.approx(1 - confidence, rel=1e-6)
    # and the root of that equation by scipy's own root finder agrees
    root = optimize.brentq(lambda e: stats.binom.sf(v - 1, r, q_of(e)) - (1 - confidence), 0.0, 50.0, xtol=1e-12)
    assert eps == pytest.approx(root, abs=1e-7)
    assert eps <= root + 1e-9  # returned from below: a lower bound is never rounded up


def test_all_correct_has_a_closed_form():
    # v = r: q^r = 1 - c  =>  q = (1 - c)^(1/r), eps = log(q / (1 - q))
    for r in (5, 64, 256, 1000):
        q = 0.05 ** (1 / r)
        assert epsilon_lower_bound(num_guesses=r, num_correct=r, confidence=0.95, num_canaries=r) == pytest.approx(
            math.log(q / (1 - q)), abs=1e-7
        )


@pytest.mark.parametrize("m,r,v,delta", [(1000, 600, 600, 1e-5), (1000, 100, 95, 1e-3), (256, 64, 60, 1e-4), (500, 200, 150, 1e-5)])
def test_approximate_dp_bound_matches_theorem_3_by_scipy(m, r, v, delta):
    eps = epsilon_lower_bound(num_guesses=r, num_correct=v, confidence=0.95, delta=delta, num_canaries=m)
    assert reference_p_value(m, r, v, eps, delta) == pytest.approx(0.05, rel=1e-5)
    assert reference_p_value(m, r, v, eps - 1e-3, delta) < 0.05 <= reference_p_value(m, r, v, eps + 1e-3, delta)
    # the delta term can only weaken the bound
    assert eps <= epsilon_lower_bound(num_guesses=r, num_correct=v, confidence=0.95, delta=0.0, num_canaries=m)


@pytest.mark.parametrize("r", [1, 2, 10, 101])
def test_not_above_chance_is_zero(r):
    for v in range(r // 2 + 1):
        assert epsilon_lower_bound(num_guesses=r, num_correct=v, confidence=0.95, delta=0.0, num_canaries=r) == 0.0


def test_zero_guesses_give_zero_and_bad_counts_raise():
    assert epsilon_lower_bound(num_guesses=0, num_correct=0, confidence=0.95, delta=0.0, num_canaries=10) == 0.0
    with pytest.raises(ValueError, match="cannot exceed num_guesses"):
        epsilon_lower_bound(num_guesses=3, num_correct=4, confidence=0.95, delta=0.0, num_canaries=10)
    with pytest.raises(ValueError, match="cannot exceed num_canaries"):
        epsilon_lower_bound(num_guesses=11, num_correct=4, confidence=0.95, delta=0.0, num_canaries=10)
    with pytest.raises(ValueError, match="num_correct"):
        epsilon_lower_bound(num_guesses=3, num_correct=-1, confidence=0.95)
    with pytest.raises(ValueError, match="needs num_canaries"):
        epsilon_lower_bound(num_guesses=3, num_correct=3, confidence=0.95, delta=1e-5)


@pytest.mark.parametrize("confidence", [0.0, 1.0, -0.1, 1.5, True])
def test_confidence_must_be_inside_0_1(confidence):
    with pytest.raises(ValueError, match="confidence"):
        epsilon_lower_bound(num_guesses=10, num_correct=9, confidence=confidence, delta=0.0, num_canaries=10)


def test_delta_range():
    with pytest.raises(ValueError, match="delta"):
        epsilon_lower_bound(num_guesses=10, num_correct=9, confidence=0.95, delta=-1e-5, num_canaries=10)


def test_monotone_in_correct_guesses_confidence_and_delta():
    r, m = 200, 400
    bounds = [epsilon_lower_bound(num_guesses=r, num_correct=v, confidence=0.95, num_canaries=m) for v in range(r + 1)]
    assert all(b2 >= b1 for b1, b2 in itertools.pairwise(bounds))
    assert bounds[r] > bounds[150] > 0
    by_conf = [epsilon_lower_bound(num_guesses=r, num_correct=170, confidence=c, num_canaries=m) for c in (0.5, 0.9, 0.95, 0.99, 0.999)]
    assert all(b2 < b1 for b1, b2 in itertools.pairwise(by_conf))  # more confidence, smaller bound
    by_delta = [epsilon_lower_bound(num_guesses=r, num_correct=170, confidence=0.95, delta=d, num_canaries=m) for d in (0, 1e-6, 1e-4, 1e-3)]
    assert all(b2 <= b1 for b1, b2 in itertools.pairwise(by_delta))
    # same accuracy, more guesses: stronger evidence
    assert epsilon_lower_bound(num_guesses=400, num_correct=340, confidence=0.95, num_canaries=400) > bounds[170]


def test_bound_is_valid_for_randomized_response():
    # An eps-DP mechanism (randomized response on each coin flip) must give bound > eps in at most 5% of runs.
    rng = np.random.default_rng(0)
    eps, r, runs = 1.0, 200, 400
    correct = rng.binomial(r, q_of(eps), size=runs)
    exceed = sum(epsilon_lower_bound(num_guesses=r, num_correct=int(v), confidence=0.95, num_canaries=r) > eps for v in correct)
    # P[Binomial(400, 0.05) >= 32] < 1e-3: the test fails only if the bound is anti-conservative.
    assert exceed < 32


def test_tail_against_scipy():
    for r, v, eps in [(10, 3, 0.3), (500, 400, 1.7), (1000, 999, 6.0), (40, 0, 1.0), (40, 41, 1.0)]:
        assert binomial_upper_tail(r, v, eps) == pytest.approx(stats.binom.sf(v - 1, r, q_of(eps)), rel=1e-9, abs=1e-300)
    assert p_value(num_guesses=50, num_correct=40, epsilon=1.0) == pytest.approx(stats.binom.sf(39, 50, q_of(1.0)), rel=1e-9)


def test_bound_math_does_not_import_torch():
    import subprocess

    code = "import sys; from ghostdp.audit import epsilon_lower_bound; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
