"""Privacy accounting: agreement with prv-accountant and with independent RDP computations, published
figures, one-sided bounds, the PRV fallback, calibration, and the ledger."""
from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
from scipy import integrate, special, stats

import ghostdp.accounting as acc
from ghostdp.engine import accounting as impl

DELTA = 1e-5
MNIST_Q = 256 / 60000  # TF Privacy / Abadi et al. MNIST setting: batch 256 of 60,000
TF_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # TF Privacy tutorial orders


# ------------------------------------------------------------------------------- independent references
def quad_rdp(sigma: float, q: float, alpha: float) -> float:
    """RDP by numerical integration: D_alpha((1-q)N(0,s^2)+qN(1,s^2) || N(0,s^2)).

    A - 1 = E_{z~N(0,s^2)}[(1 - q + q e^{(2z-1)/(2s^2)})^alpha - 1], integrated with quad (expm1 keeps
    the small-RDP regime exact); a different route from the series in the code.
    """
    log_norm = math.log(sigma * math.sqrt(2 * math.pi))

    def integrand(z: float) -> float:
        u = (2 * z - 1) / (2 * sigma * sigma)
        log_ratio = float(np.logaddexp(math.log1p(-q), math.log(q) + u))
        log_pdf = -z * z / (2 * sigma * sigma) - log_norm
        x = alpha * log_ratio
        if x > 30:
            return math.exp(log_pdf + x + math.log1p(-math.exp(-x)))
        return math.exp(log_pdf) * math.expm1(x)

    with warnings.catch_warnings():  # quad may warn it cannot certify 1e-13; agreement to 1e-9 is what we assert
        warnings.simplefilter("ignore", integrate.IntegrationWarning)
        value, _ = integrate.quad(
            integrand, -40 * sigma, alpha + 40 * sigma, epsabs=0, epsrel=1e-13, limit=1000, points=[0, 0.5, 1, alpha]
        )
    return math.log1p(value) / (alpha - 1)


def plain_integer_rdp(sigma: float, q: float, alpha: int) -> float:
    """Integer-order RDP with math.comb and plain floats (no log-space), for moderate alpha."""
    a = sum(
        math.comb(alpha, k) * (1 - q) ** (alpha - k) * q**k * math.exp((k * k - k) / (2 * sigma * sigma))
        for k in range(alpha + 1)
    )
    return math.log(a) / (alpha - 1)


def improved_conversion(orders, rdp, delta):
    """eps = min_a rdp + log((a-1)/a) - (log delta + log a)/(a-1), written out again for the test."""
    best = math.inf
    for a, r in zip(orders, rdp):
        best = min(best, r + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1))
    return max(best, 0.0)


def mironov_conversion(orders, rdp, delta):
    """The original RDP conversion eps = min_a rdp - log(delta)/(a-1) (TF Privacy's get_privacy_spent era)."""
    return min(r - math.log(delta) / (a - 1) for a, r in zip(orders, rdp))


def gaussian_exact_epsilon(sigma_eff: float, delta: float) -> float:
    """Exact epsilon of the Gaussian mechanism N(0,s^2) vs N(1,s^2) (Balle & Wang 2018, Thm. 8)."""
    def d(eps):
        return stats.norm.cdf(-eps * sigma_eff + 1 / (2 * sigma_eff)) - math.exp(eps) * stats.norm.cdf(
            -eps * sigma_eff - 1 / (2 * sigma_eff)
        )
    lo, hi = 0.0, 1.0
    while d(hi) > delta:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if d(mid) > delta else (lo, mid)
    return hi


def direct_prv_up(mechanisms, counts, delta, eps_rdp):
    """prv-accountant called directly, with the error budgets the module documents."""
    from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant

    eps_error = 0.005 * 2.0 ** math.floor(math.log2(max(0.125, eps_rdp)))
    prvs = [PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=s) for s, q in mechanisms]
    accountant = PRVAccountant(prvs=prvs, max_self_compositions=counts, eps_error=eps_error, delta_error=delta * 1e-3)
    return accountant.compute_epsilon(delta=delta, num_self_compositions=counts)


# ------------------------------------------------------------------------------- RDP correctness
@pytest.mark.parametrize("sigma,q", [(1.1, 0.01), (0.7, 0.1), (2.0, 0.5), (5.0, 0.001), (0.5, 0.3)])
def test_rdp_matches_numerical_integration(sigma, q):
    orders = [1.5, 2, 2.5, 3.7, 8, 12.3]
    ours = acc.compute_rdp(noise_multiplier=sigma, sample_rate=q, orders=orders)
    ref = [quad_rdp(sigma, q, a) for a in orders]
    np.testing.assert_allclose(ours, ref, rtol=1e-9)


@pytest.mark.parametrize("sigma,q", [(0.6, 0.02), (1.0, 0.25), (3.0, 0.9)])
def test_rdp_integer_orders_match_plain_binomial_sum(sigma, q):
    orders = [2, 3, 5, 8, 13, 21]
    ours = acc.compute_rdp(noise_multiplier=sigma, sample_rate=q, orders=orders)
    np.testing.assert_allclose(ours, [plain_integer_rdp(sigma, q, a) for a in orders], rtol=1e-11)


def test_rdp_edge_cases():
    orders = [1.5, 2, 10]
    # q = 1 is the plain Gaussian mechanism: alpha / (2 sigma^2).
    np.testing.assert_allclose(acc.compute_rdp(noise_multiplier=2.0, sample_rate=1.0, orders=orders),
                               [a / 8 for a in orders], rtol=1e-15)
    assert np.all(np.isinf(acc.compute_rdp(noise_multiplier=0.0, sample_rate=0.1, orders=orders)))
    # Tiny RDP (large sigma) keeps its relative precision: A - 1 = q^2 (e^{1/s^2} - 1) at alpha = 2.
    s, q = 100.0, 1e-3
    expected = math.log1p(q * q * math.expm1(1 / s**2))
    assert acc.compute_rdp(noise_multiplier=s, sample_rate=q, orders=[2])[0] == pytest.approx(expected, rel=1e-12)


def test_rdp_epsilon_equals_independent_composition_and_conversion():
    sigma, q, steps = 1.0, 0.02, 3000
    ours = acc.epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA, accountant="rdp")
    orders = impl.DEFAULT_RDP_ORDERS
    rdp = [steps * quad_rdp(sigma, q, a) if a <= 16 else math.inf for a in orders]
    assert ours == pytest.approx(improved_conversion(orders, rdp, DELTA), rel=1e-9)


def test_rdp_matches_opacus():
    opacus_rdp = pytest.importorskip("opacus.accountants.analysis.rdp")
    integer_orders = [2, 3, 4, 8, 16, 32, 63]
    fractional_orders = [1.1, 1.5, 2.5, 4.75, 10.5]
    for sigma, q in [(0.5, 0.01), (1.0, 0.004), (1.1, 0.1), (2.0, 0.5), (0.8, 0.9)]:
        for orders, rtol in [(integer_orders, 1e-9), (fractional_orders, 1e-6)]:
            ours = acc.compute_rdp(noise_multiplier=sigma, sample_rate=q, orders=orders)
            theirs = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders)
            # Integer orders: both exact. Fractional: Opacus stops its series once a term is below e^-30
            # in absolute value, which costs it up to ~4e-8 relative where the RDP is small; ours agrees
            # with quad integration to 1e-10 (test_rdp_matches_numerical_integration).
            np.testing.assert_allclose(ours, theirs, rtol=rtol)


def test_conversion_is_never_looser_than_mironov():
    orders = list(impl.DEFAULT_RDP_ORDERS)
    rdp = 500 * acc.compute_rdp(noise_multiplier=1.0, sample_rate=0.01, orders=orders)
    eps, order = acc.rdp_to_epsilon(orders=orders, rdp=rdp, delta=DELTA)
    assert eps <= mironov_conversion(orders, rdp, DELTA)
    assert eps == pytest.approx(improved_conversion(orders, rdp, DELTA), rel=1e-12)
    assert order in orders


# ------------------------------------------------------------------------------- PRV
@pytest.mark.parametrize("sigma,q,steps", [(1.1, MNIST_Q, 3000), (0.8, 0.02, 1000), (2.0, 0.1, 500)])
def test_prv_equals_prv_accountant_upper_bound(sigma, q, steps):
    eps_rdp = acc.epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA, accountant="rdp")
    low, est, up = direct_prv_up([(sigma, q)], [steps], DELTA, eps_rdp)
    ours = acc.epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA, accountant="prv")
    # Not bit-equal: we widen the domain a little so the FFT length is 5-smooth (speed); that only
    # truncates less of the privacy-loss tail and moves the result by ~1e-9 relative.
    assert ours == pytest.approx(up, rel=1e-7)
    assert low <= est <= ours


def test_prv_gaussian_q1_brackets_the_exact_gaussian_epsilon():
    # q = 1: n steps of N(0, s^2) compose to one Gaussian mechanism with s / sqrt(n), whose epsilon is exact.
    sigma, steps = 4.0, 64
    exact = gaussian_exact_epsilon(sigma / math.sqrt(steps), DELTA)
    prv = acc.epsilon(noise_multiplier=sigma, sample_rate=1.0, steps=steps, delta=DELTA)
    rdp = acc.epsilon(noise_multiplier=sigma, sample_rate=1.0, steps=steps, delta=DELTA, accountant="rdp")
    eps_error = 0.005 * 2.0 ** math.floor(math.log2(max(0.125, rdp)))
    assert exact <= prv <= exact + 2 * eps_error
    assert exact <= rdp
    single = acc.single_step_epsilon(noise_multiplier=sigma / math.sqrt(steps), sample_rate=1.0, delta=DELTA)
    assert single == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize("sigma", [0.8, 1.5])
@pytest.mark.parametrize("q", [0.004, 0.05])
@pytest.mark.parametrize("steps", [1000, 10000])
def test_prv_is_tighter_than_rdp(sigma, q, steps):
    prv = acc.epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA, accountant="prv")
    rdp = acc.epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA, accountant="rdp")
    one = acc.single_step_epsilon(noise_multiplier=sigma, sample_rate=q, delta=DELTA)
    assert one <= prv <= rdp


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_epsilon_monotone_in_steps_and_sigma(accountant):
    def eps(sigma, steps):
        return acc.epsilon(noise_multiplier=sigma, sample_rate=0.01, steps=steps, delta=DELTA, accountant=accountant)

    by_steps = [eps(1.0, n) for n in (10, 100, 1000, 5000)]
    assert all(a < b for a, b in zip(by_steps, by_steps[1:])), by_steps
    by_sigma = [eps(s, 1000) for s in (0.6, 0.8, 1.2, 2.0, 4.0)]
    assert all(a > b for a, b in zip(by_sigma, by_sigma[1:])), by_sigma


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_epsilon_edge_cases(accountant):
    assert acc.epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=0, delta=DELTA, accountant=accountant) == 0.0
    assert acc.epsilon(noise_multiplier=0.0, sample_rate=0.01, steps=5, delta=DELTA, accountant=accountant) == math.inf
    assert acc.epsilon(noise_multiplier=0.0, sample_rate=0.01, steps=0, delta=DELTA, accountant=accountant) == 0.0


# ------------------------------------------------------------------------------- published figures
# TensorFlow Privacy, tutorials/README.md, "Select Parameters" table: MNIST, 60,000 examples, 256 per
# batch, delta = 1e-5, steps = epochs * 60000 // 256 (as the tutorial's compute_epsilon), RDP accountant
# (TF's orders, the original conversion eps = rdp - log(delta)/(alpha - 1)):
#   noise 1.12, 60 epochs -> eps 2.92;  noise 0.6, 30 epochs -> 9.74;  noise 1.2, 10 epochs -> 1.20.
# Abadi et al., "Deep Learning with Differential Privacy", CCS 2016, Sec. 3.1: q = 0.01, sigma = 4,
# delta = 1e-5, T = 10,000 gives eps ~ 1.26 with the moments accountant (9.34 with strong composition).
PUBLISHED = [
    (1.12, MNIST_Q, 60 * 60000 // 256, 2.92),
    (0.6, MNIST_Q, 30 * 60000 // 256, 9.74),
    (1.2, MNIST_Q, 10 * 60000 // 256, 1.20),
    (4.0, 0.01, 10000, 1.26),
]


@pytest.mark.parametrize("sigma,q,steps,published", PUBLISHED)
def test_published_rdp_figures(sigma, q, steps, published):
    # Our per-step RDP with the publication's conversion and orders reproduces the figure to its rounding
    # (0.005), plus 0.01 for the tutorial code's drift between versions (we get 9.753 for 9.74).
    rdp = steps * acc.compute_rdp(noise_multiplier=sigma, sample_rate=q, orders=TF_ORDERS)
    assert mironov_conversion(TF_ORDERS, rdp, DELTA) == pytest.approx(published, abs=0.015)
    # The improved conversion and the PRV accountant may only be tighter.
    ours_rdp = acc.epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA, accountant="rdp")
    ours_prv = acc.epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA, accountant="prv")
    assert ours_prv <= ours_rdp <= published + 0.005
    assert ours_prv >= 0.5 * published  # and not absurdly so: PRV gains 10-35 % on these


# ------------------------------------------------------------------------------- the fallback
def composed_lower_bound(sigma, q, steps, delta):
    """A lower bound on the epsilon of `steps` Poisson-subsampled Gaussian steps, from one concrete test.

    Observe the sum S of the n outputs. Without the example S ~ N(0, n s^2); with it S ~ N(K, n s^2),
    K ~ Binomial(n, q). Any (eps, delta) guarantee needs P_with(S > t) <= e^eps P_without(S > t) + delta,
    so eps >= log(P_with(S > t) - delta) - log P_without(S > t); P_with(S > t) >= P(K >= k) P(N(k, n s^2) > t).
    No RDP and no PRV involved.
    """
    sd = sigma * math.sqrt(steps)
    best = -math.inf
    k = int(steps * q - 3 * math.sqrt(steps * q * (1 - q)))
    for t in np.linspace(0, k, 200):
        p_with = stats.binom.sf(k - 1, steps, q) * stats.norm.sf((t - k) / sd)
        log_p_without = special.log_ndtr(-t / sd)
        if p_with > delta:
            best = max(best, math.log(p_with - delta) - log_p_without)
    return best


def test_prv_failure_falls_back_to_a_valid_rdp_bound(caplog):
    # sigma = 0.3, q = 0.5, 10,000 steps: prv-accountant 0.2.0 raises "Discrete mean differs from
    # continuous mean significantly". The run must get a finite upper bound, not an exception.
    sigma, q, steps = 0.3, 0.5, 10_000
    with caplog.at_level(logging.WARNING, logger="ghostdp.engine.accounting"):
        eps = acc.epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA)
    assert any("PRV accountant failed" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    rdp = acc.epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA, accountant="rdp")
    assert math.isfinite(eps) and eps == rdp
    lower = composed_lower_bound(sigma, q, steps, DELTA)
    assert lower > 10_000  # the bound is meaningful: this run has no privacy to speak of
    assert eps >= lower
    # ... and the ledger takes the same path without raising.
    ledger = acc.PrivacyAccountant()
    ledger.step(sigma, q, num_steps=steps)
    assert ledger.epsilon(DELTA) == eps


def test_prv_direct_call_really_fails_there():
    # Guards the test above: if a future prv-accountant handles this case, pick another one.
    from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant

    with pytest.raises(RuntimeError), np.errstate(all="ignore"):
        PRVAccountant(
            prvs=[PoissonSubsampledGaussianMechanism(sampling_probability=0.5, noise_multiplier=0.3)],
            max_self_compositions=[10_000], eps_error=0.01 * 2**15, delta_error=DELTA * 1e-3,
        ).compute_epsilon(delta=DELTA, num_self_compositions=[10_000])


def test_prv_bad_outputs_and_oversized_grids_fall_back(monkeypatch, caplog):
    import prv_accountant

    sigma, q, steps = 1.0, 0.01, 200
    rdp = acc.epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA, accountant="rdp")
    good = acc.epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA)
    assert good < rdp
    caplog.set_level(logging.WARNING, logger="ghostdp.engine.accounting")

    monkeypatch.setattr(impl, "MAX_PRV_GRID_POINTS", 100)
    assert acc.epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA) == rdp
    assert "grid" in caplog.records[-1].getMessage()
    monkeypatch.undo()

    for bad in [(math.nan, math.nan, math.nan), (0.1, 0.2, math.inf), (-1.0, -1.0, 1e-4)]:
        monkeypatch.setattr(prv_accountant.PRVAccountant, "compute_epsilon", lambda *args, b=bad, **kwargs: b)
        caplog.clear()
        assert acc.epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA) == rdp
        assert "PRV accountant failed" in caplog.records[-1].getMessage()
    # 1e-4 above is below the exact one-step epsilon, so it was rejected by the sanity floor.
    assert acc.single_step_epsilon(noise_multiplier=sigma, sample_rate=q, delta=DELTA) > 1e-4


# ------------------------------------------------------------------------------- calibration
@pytest.mark.parametrize("accountant,target,q,steps", [("prv", 2.0, 0.01, 2000), ("rdp", 3.0, MNIST_Q, 14062),
                                                       ("prv", 0.5, 0.02, 300)])
def test_calibration_round_trip(accountant, target, q, steps):
    sigma = acc.calibrate_noise_multiplier(target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps,
                                           accountant=accountant)
    kw = dict(sample_rate=q, steps=steps, delta=DELTA, accountant=accountant)
    assert acc.epsilon(noise_multiplier=sigma, **kw) <= target
    assert acc.epsilon(noise_multiplier=sigma * (1 - 2e-3), **kw) > target


def test_calibration_bad_inputs_name_the_argument():
    good = dict(target_epsilon=1.0, delta=DELTA, sample_rate=0.01, steps=100)
    for key, value in [("target_epsilon", 0.0), ("target_epsilon", -1.0), ("target_epsilon", math.inf),
                       ("delta", 0.0), ("delta", 1.0), ("delta", -1e-5), ("sample_rate", 0.0),
                       ("sample_rate", 1.5), ("steps", 0), ("steps", -3), ("steps", 2.5)]:
        with pytest.raises(ValueError, match=key):
            acc.calibrate_noise_multiplier(**{**good, key: value})
    with pytest.raises(ValueError, match="accountant"):
        acc.calibrate_noise_multiplier(**good, accountant="moments")


def test_epsilon_bad_inputs_name_the_argument():
    good = dict(noise_multiplier=1.0, sample_rate=0.01, steps=100, delta=DELTA)
    for key, value in [("noise_multiplier", -0.1), ("noise_multiplier", math.nan), ("sample_rate", 256),
                       ("delta", 2.0), ("steps", -1)]:
        with pytest.raises(ValueError, match=key):
            acc.epsilon(**{**good, key: value})
    with pytest.raises(TypeError):
        acc.epsilon(1.0, 0.01, 100, DELTA)  # keyword-only


# ------------------------------------------------------------------------------- the ledger
def test_ledger_merges_consecutive_segments_and_counts_steps():
    ledger = acc.PrivacyAccountant()
    assert ledger.epsilon(DELTA) == 0.0 and ledger.steps == 0
    ledger.step(1.0, 0.01)
    ledger.step(1.0, 0.01, num_steps=9)
    ledger.step(noise_multiplier=2.0, sample_rate=0.01, num_steps=5)
    ledger.step(1.0, 0.01, num_steps=3)
    assert ledger.history == [(1.0, 0.01, 10), (2.0, 0.01, 5), (1.0, 0.01, 3)]
    assert ledger.steps == 18
    with pytest.raises(ValueError, match="num_steps"):
        ledger.step(1.0, 0.01, num_steps=0)
    with pytest.raises(ValueError, match="sample_rate"):
        ledger.step(1.0, 64)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_ledger_equal_segments_equal_single_segment(accountant):
    ledger = acc.PrivacyAccountant()
    for n in (300, 1, 199):
        ledger.step(1.1, 0.02, num_steps=n)
    single = acc.epsilon(noise_multiplier=1.1, sample_rate=0.02, steps=500, delta=DELTA, accountant=accountant)
    assert ledger.epsilon(DELTA, accountant=accountant) == single


def test_ledger_heterogeneous_composition():
    a, b = (1.0, 0.01), (0.7, 0.05)
    ledger = acc.PrivacyAccountant()
    ledger.step(*a, num_steps=300)
    ledger.step(*b, num_steps=50)
    ledger.step(*a, num_steps=200)  # not adjacent to the first: still the same mechanism, 500 steps in all

    # RDP adds up: compare with the sum written out here.
    orders = impl.DEFAULT_RDP_ORDERS
    rdp_sum = 500 * acc.compute_rdp(noise_multiplier=a[0], sample_rate=a[1], orders=orders) + 50 * acc.compute_rdp(
        noise_multiplier=b[0], sample_rate=b[1], orders=orders)
    eps_rdp = ledger.epsilon(DELTA, accountant="rdp")
    assert eps_rdp == pytest.approx(improved_conversion(orders, rdp_sum, DELTA), rel=1e-12)

    # PRV: prv-accountant's heterogeneous composition called directly.
    up = direct_prv_up([a, b], [500, 50], DELTA, eps_rdp)[2]
    eps_prv = ledger.epsilon(DELTA, accountant="prv")
    assert eps_prv == pytest.approx(up, rel=1e-7)
    assert eps_prv <= eps_rdp

    # Composition can only cost more than each of its parts.
    only_a = acc.epsilon(noise_multiplier=a[0], sample_rate=a[1], steps=500, delta=DELTA, accountant="rdp")
    only_b = acc.epsilon(noise_multiplier=b[0], sample_rate=b[1], steps=50, delta=DELTA, accountant="rdp")
    assert eps_rdp > max(only_a, only_b)


def test_ledger_state_dict_round_trip():
    ledger = acc.PrivacyAccountant()
    ledger.step(1.0, 0.01, num_steps=10)
    ledger.step(0.9, 1 / 3, num_steps=7)
    state = json.loads(json.dumps(ledger.state_dict()))  # plain Python, survives JSON
    restored = acc.PrivacyAccountant()
    restored.load_state_dict(state)
    assert restored.history == ledger.history and restored.steps == 17
    assert restored.epsilon(DELTA, accountant="rdp") == ledger.epsilon(DELTA, accountant="rdp")
    restored.step(0.9, 1 / 3)  # keeps merging into the restored last segment
    assert restored.history[-1] == (0.9, 1 / 3, 8)
    with pytest.raises(ValueError, match="history"):
        restored.load_state_dict({"steps": 3})
    with pytest.raises(ValueError, match="sample_rate"):
        restored.load_state_dict({"version": 1, "history": [[1.0, 2.0, 3]]})


def test_accounting_does_not_import_torch():
    code = "import sys, ghostdp.accounting, ghostdp.engine.accounting; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_too_many_distinct_mechanisms_fall_back_to_rdp(monkeypatch, caplog):
    monkeypatch.setattr(impl, "MAX_PRV_MECHANISMS", 2)
    ledger = acc.PrivacyAccountant()
    for sigma in (1.0, 1.1, 1.2):
        ledger.step(sigma, 0.01, num_steps=100)
    with caplog.at_level(logging.WARNING, logger="ghostdp.engine.accounting"):
        eps = ledger.epsilon(DELTA)
    assert eps == ledger.epsilon(DELTA, accountant="rdp")
    assert "distinct" in caplog.records[-1].getMessage()


def test_public_contract_through_the_package():
    import ghostdp

    eps = ghostdp.accounting.epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=100, delta=DELTA, accountant="rdp")
    assert eps == acc.epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=100, delta=DELTA, accountant="rdp") > 0
    assert ghostdp.accounting.PrivacyAccountant is impl.PrivacyAccountant
