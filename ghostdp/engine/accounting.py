"""Privacy accounting for DP-SGD with Poisson sampling: epsilon, noise calibration, and a ledger.

One DP-SGD step with Poisson rate q, noise multiplier sigma and clipping norm C is the Poisson-subsampled
Gaussian mechanism (SGM). With the sensitivity scaled to 1, the pair of output distributions that
dominates it is (remove one example)

    P = (1 - q) N(0, sigma^2) + q N(1, sigma^2)        (the example took part with probability q)
    Q = N(0, sigma^2)                                  (the example is absent).

Two accountants compose `steps` such mechanisms (possibly with different (sigma, q) segments):

* ``"prv"`` (default): the numerical composition of privacy random variables of Gopi, Lee & Wutschitz,
  "Numerical Composition of Differential Privacy", NeurIPS 2021, through ``prv-accountant`` 0.2.0. It
  returns (eps_low, eps_est, eps_up) with eps_low <= true epsilon <= eps_up; we report **eps_up**. The
  error budgets are ``eps_error`` (added to the estimate: eps_up ~ eps_est + eps_error) and
  ``delta_error`` (we use delta * 1e-3, the library's recommendation). We pick eps_error from the RDP
  bound eps_rdp (a cheap over-estimate of the answer): 0.005 * 2^floor(log2(max(1/8, eps_rdp))), i.e.
  between 0.25 % and 0.5 % of eps_rdp (0.0003125 absolute below 1/8), so eps_up stays within 1 % of the
  true epsilon while eps_rdp / eps <= 2 (e.g. sigma 0.6, q 0.0152, 328 steps, delta 7.4e-6: eps_up 7.17
  against 7.14 from prv-accountant at eps_error 0.01; a 1-2 % budget gave 7.29). It is a power of two
  times 0.005 so that it is piecewise constant in sigma: calibration then bisects a function that only
  decreases with sigma. (In practice eps_est is within ~1e-5 of the truth; eps_up - eps_est is this budget.) The cost is
  linear in the grid size 2 L / mesh, mesh = eps_error / sqrt(steps / 2 * log(12 / delta_error))
  (their Theorem 5.5); when that grid would exceed ``MAX_PRV_GRID_POINTS`` we raise eps_error up to
  10 % of max(1/8, eps_rdp), and past that we fall back (below). Where eps_error dominates (tiny
  epsilon) eps_up can exceed the RDP bound; it is still a valid bound and we still report it.
* ``"rdp"``: Renyi DP of the SGM (Mironov, Talwar & Zhang, "Renyi Differential Privacy of the Sampled
  Gaussian Mechanism", 2019), our own implementation, converted to (epsilon, delta) with the improved
  bound of Canonne, Kamath & Steinke 2020 (Prop. 12) / Balle et al. 2020 (Thm. 21):

      eps = min over alpha of  rdp(alpha) + log((alpha - 1) / alpha) - (log(delta) + log(alpha)) / (alpha - 1).

  RDP adds up under composition, so heterogeneous segments are summed order by order. It is looser
  than PRV, and serves as a second opinion and as the fallback.

Fallback. prv-accountant 0.2.0 fails in some corners: large epsilon, tiny sigma, large q with many
steps (it raises "Discrete mean differs from continuous mean significantly" or "Cannot compute
epsilon", returns nan/inf, or needs a grid of 10^8+ points). A training run must not crash on its
accountant, so every such case -- an exception, a non-finite or inconsistent triple, a grid over
budget, more than ``MAX_PRV_MECHANISMS`` distinct (sigma, q) pairs, or an eps_up below the exact
one-step epsilon (a rigorous lower bound on any composition that contains that step) -- is caught,
logged as a WARNING, and answered with the RDP bound, which is a valid (looser) upper bound. We never
return a value below the true epsilon on purpose.

This module must not import torch: accounting runs in tools and CI without it.
"""
from __future__ import annotations

import logging
import math
import numbers
import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy import special

logger = logging.getLogger(__name__)

__all__ = [
    "AccountantName",
    "DEFAULT_RDP_ORDERS",
    "MAX_PRV_GRID_POINTS",
    "MAX_PRV_MECHANISMS",
    "PrivacyAccountant",
    "calibrate_noise_multiplier",
    "compute_rdp",
    "epsilon",
    "rdp_to_epsilon",
    "single_step_epsilon",
]

AccountantName = Literal["prv", "rdp"]
_ACCOUNTANTS = ("prv", "rdp")

# Orders for RDP: fine steps near 1 (large epsilon), the usual 1.1 .. 63 (as in TF Privacy / Opacus),
# and a few large orders that win when sigma is large and delta tiny. Integer orders are exact and
# cheap; fractional ones use the series of Mironov et al. (2019), Sec. 3.3.
DEFAULT_RDP_ORDERS: tuple[float, ...] = tuple(
    [1.01, 1.02, 1.05]
    + [1.0 + x / 10.0 for x in range(1, 100)]
    + list(range(11, 64))
    + [72, 80, 96, 128, 160, 192, 256, 384, 512, 768, 1024]
)

# prv-accountant costs ~3-4 microseconds per grid point (build + FFT composition, long doubles), so
# 2^21 points is a few seconds. Calibration calls it ~15 times, usually on much smaller grids.
MAX_PRV_GRID_POINTS = 2**21
# Heterogeneous composition discretises every distinct (sigma, q) pair on that grid and convolves them
# pairwise; a schedule with more distinct pairs than this is accounted with RDP (with a warning).
MAX_PRV_MECHANISMS = 32
_PRV_REL_EPS_ERROR = 0.005  # eps_error ~ 0.25-0.5 % of the RDP bound, so eps_up is within ~1 % of epsilon
_PRV_MAX_REL_EPS_ERROR = 0.1  # beyond this the PRV bound is not worth it: fall back to RDP
_PRV_MIN_EPS_SCALE = 0.125  # below this eps_error stays at 0.01 / 8 (grid cost grows as 1 / eps_error)
_PRV_DELTA_ERROR_FACTOR = 1e-3  # delta_error = delta * 1e-3 (prv-accountant's recommendation)

# Fractional-order series: terms are summed in doubling chunks until the first omitted term is below
# 1e-16 of the sum, or this many terms; the tail bound is added in any case (see _log_a_fractional).
_SERIES_FIRST_CHUNK = 64
_SERIES_MAX_TERMS = 2**20
# Rounding in the series is bounded by this many ulps of its largest partial sum (terms are summed in
# log-space; the final subtraction of the negative part is the only cancellation). Where that bound is
# above _SERIES_REL_TOL of log A (orders just above 1, where log A = (alpha - 1) rdp is tiny), the value
# comes from quadrature instead (_rdp_by_quadrature): the series alone was up to 31 % below the KL limit
# at alpha = 1 + 1e-12 (sigma 1, q 0.00105).
_SERIES_ROUNDING_ULPS = 64.0
_SERIES_REL_TOL = 1e-9

Segment = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)


# ---------------------------------------------------------------------------------------------- checks
def _check_delta(delta: float) -> float:
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not (0.0 < delta < 1.0):
        raise ValueError(
            f"delta must be a probability in (0, 1), got {delta!r}. It is the chance the epsilon guarantee "
            f"fails; use something well below 1/dataset_size (e.g. 1e-5 for 60k examples)."
        )
    return float(delta)


def _check_sample_rate(sample_rate: float) -> float:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real) or not (0.0 < sample_rate <= 1.0):
        raise ValueError(
            f"sample_rate must be in (0, 1], got {sample_rate!r}. It is the Poisson probability q that an "
            f"example is in a step's batch: expected_batch_size / dataset_size (not the batch size)."
        )
    return float(sample_rate)


def _check_noise_multiplier(noise_multiplier: float) -> float:
    if (
        isinstance(noise_multiplier, bool)
        or not isinstance(noise_multiplier, numbers.Real)
        or not (noise_multiplier >= 0.0)
        or math.isinf(noise_multiplier)
    ):
        raise ValueError(
            f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}. It is sigma, the noise "
            f"standard deviation divided by the clipping norm C (0 means no noise and no privacy)."
        )
    return float(noise_multiplier)


def _check_steps(steps: int, *, name: str = "steps", minimum: int = 0) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} (a count of DP-SGD steps), got {steps!r}.")
    return int(steps)


def _check_accountant(accountant: str) -> str:
    if accountant not in _ACCOUNTANTS:
        raise ValueError(
            f"accountant must be 'prv' (tight numerical composition, the default) or 'rdp' (Renyi DP, looser), "
            f"got {accountant!r}."
        )
    return accountant


def _check_orders(orders: Sequence[float]) -> np.ndarray:
    arr = np.asarray(orders, dtype=np.float64).reshape(-1)
    if arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr <= 1.0):
        raise ValueError(f"RDP orders must be finite numbers > 1, got {orders!r}.")
    return arr


# ---------------------------------------------------------------------------------------------- RDP
def _log_a_integer(q: float, sigma: float, alpha: int) -> float:
    """log A_alpha for integer alpha >= 2, exactly (up to rounding), via the binomial expansion.

    A_alpha = E_{z ~ N(0, sigma^2)} [(1 - q + q exp((2 z - 1) / (2 sigma^2)))^alpha]
            = sum_{k=0}^{alpha} C(alpha, k) (1 - q)^(alpha - k) q^k exp((k^2 - k) / (2 sigma^2))
    (Mironov et al. 2019, Sec. 3.3). The binomial weights sum to one, so
        A_alpha - 1 = sum_k C(alpha, k) (1 - q)^(alpha - k) q^k expm1((k^2 - k) / (2 sigma^2)),
    a sum of non-negative terms we add in log-space; log A = log1p(A - 1) keeps full relative precision
    when the RDP is tiny (large sigma, small q), where log(sum) would round to ~1e-16 absolute.
    """
    k = np.arange(2, alpha + 1, dtype=np.float64)  # k = 0, 1 have expm1(0) = 0
    x = (k * k - k) / (2.0 * sigma * sigma)
    log_expm1_x = x + np.log(-np.expm1(-x))  # log(e^x - 1), stable for small and large x
    log_binom = special.gammaln(alpha + 1.0) - special.gammaln(k + 1.0) - special.gammaln(alpha - k + 1.0)
    with np.errstate(divide="ignore"):
        log_1mq = math.log1p(-q) if q < 1.0 else -math.inf
    tail = (alpha - k) * log_1mq
    tail = np.where(alpha - k == 0, 0.0, tail)  # (1 - q)^0 = 1 even at q = 1
    log_terms = log_binom + k * math.log(q) + tail + log_expm1_x
    log_a_minus_1 = float(special.logsumexp(log_terms))
    return float(np.logaddexp(0.0, log_a_minus_1))


def _log_signed_sum(log_mag: np.ndarray, sign: np.ndarray) -> tuple[float, float]:
    """(log of the positive part, log of the negative part) of sum(sign * exp(log_mag))."""
    pos = log_mag[sign > 0]
    neg = log_mag[sign < 0]
    lp = float(special.logsumexp(pos)) if pos.size else -math.inf
    ln = float(special.logsumexp(neg)) if neg.size else -math.inf
    return lp, ln


def _log_a_fractional(q: float, sigma: float, alpha: float) -> float:
    """An upper bound on log A_alpha for fractional alpha > 1 (tight to ~1e-16 relative when it converges).

    Mironov et al. (2019), Sec. 3.3: split the expectation at z0 = sigma^2 log(1/q - 1) + 1/2, where
    q exp((2z - 1) / (2 sigma^2)) = 1 - q, and expand each side with the (generalised) binomial series:
        A = sum_k C(alpha, k) (1 - q)^(alpha - k) q^k   e^{(k^2 - k) / (2 sigma^2)} Phi((z0 - k) / sigma)
          + sum_k C(alpha, k) q^(alpha - k) (1 - q)^k   e^{(j^2 - j) / (2 sigma^2)} Phi((j - z0) / sigma),
    with j = alpha - k and Phi the standard normal CDF (``log_ndtr`` keeps the tails in log-space).
    Both summands equal |C(alpha, k)| (1 - q)^alpha e^{-z0^2 / (2 sigma^2)} R(x_k) / sqrt(2 pi), R the
    (decreasing) Mills ratio and x_k increasing in k, so for k > alpha they alternate in sign with
    decreasing magnitude: the truncation error is at most the first omitted term. We add that term to
    the partial sum, which makes the result an upper bound even when we stop at ``_SERIES_MAX_TERMS``.
    """
    log_q, log_1mq = math.log(q), math.log1p(-q)
    z0 = sigma * sigma * (log_1mq - log_q) + 0.5
    two_s2 = 2.0 * sigma * sigma
    lgamma_a1 = special.gammaln(alpha + 1.0)
    pos, neg = -math.inf, -math.inf
    start, chunk = 0, _SERIES_FIRST_CHUNK + math.ceil(alpha)
    while True:
        k = np.arange(start, start + chunk, dtype=np.float64)
        j = alpha - k
        log_binom = lgamma_a1 - special.gammaln(k + 1.0) - special.gammaln(j + 1.0)  # log |C(alpha, k)|
        sign = special.gammasgn(j + 1.0)  # sign of C(alpha, k): that of Gamma(alpha - k + 1)
        t0 = log_binom + k * log_q + j * log_1mq + (k * k - k) / two_s2 + special.log_ndtr((z0 - k) / sigma)
        t1 = log_binom + j * log_q + k * log_1mq + (j * j - j) / two_s2 + special.log_ndtr((j - z0) / sigma)
        lp, ln = _log_signed_sum(np.concatenate([t0, t1]), np.concatenate([sign, sign]))
        pos, neg = np.logaddexp(pos, lp), np.logaddexp(neg, ln)
        start += chunk
        chunk *= 2
        # First omitted terms (k = start): both decrease from here on, since start > alpha.
        k_next = float(start)
        j_next = alpha - k_next
        lb_next = lgamma_a1 - special.gammaln(k_next + 1.0) - special.gammaln(j_next + 1.0)
        r0 = lb_next + k_next * log_q + j_next * log_1mq + (k_next**2 - k_next) / two_s2
        r0 += special.log_ndtr((z0 - k_next) / sigma)
        r1 = lb_next + j_next * log_q + k_next * log_1mq + (j_next**2 - j_next) / two_s2
        r1 += special.log_ndtr((j_next - z0) / sigma)
        remainder = float(np.logaddexp(r0, r1))
        if start > alpha + 1 and (remainder < pos - 37.0 or start >= _SERIES_MAX_TERMS):
            break
    if start >= _SERIES_MAX_TERMS and remainder >= pos - 37.0:
        logger.debug(
            "RDP series for alpha=%g, q=%g, sigma=%g stopped at %d terms; tail bound %.3g relative added",
            alpha, q, sigma, start, math.exp(remainder - pos),
        )
    if not neg < pos:  # cancellation beyond double precision; cannot happen for a convergent series
        raise FloatingPointError(f"RDP series cancelled for alpha={alpha}, q={q}, sigma={sigma}")
    log_a = pos + math.log1p(-math.exp(neg - pos))
    # Upper-round: add the rounding bound of the partial sums (relative to A, which is >= 1).
    rounding = _SERIES_ROUNDING_ULPS * np.finfo(np.float64).eps * math.exp(float(np.logaddexp(pos, neg)) - log_a)
    return float(np.logaddexp(log_a, remainder)) + rounding


def _h_over_beta(r: np.ndarray, alpha: float) -> np.ndarray:
    """((1 + r)^alpha - 1 - alpha r) / (alpha - 1) for r >= -1, alpha > 1, without cancellation (vectorised).

    It is >= 0 (x^alpha lies above its tangent at 1). For |r| < 1/8 the power series
    sum_{k>=2} alpha (alpha - 2) ... (alpha - k + 1) / k! r^k (the factor alpha - 1 divides out) is summed
    with 22 terms (the rest is below 8^-22 ~ 1e-20 of the first); otherwise (1 + r) expm1((alpha - 1) log1p(r)) / (alpha - 1) - r.
    """
    beta = alpha - 1.0
    small = np.abs(r) < 0.125
    rs = np.where(small, r, 0.0)
    term = alpha / 2.0 * rs * rs
    series = term.copy()
    for k in range(2, 23):
        term = term * (alpha - k) * rs / (k + 1)
        series += term
    rl = np.where(small, 0.0, r)
    with np.errstate(divide="ignore", invalid="ignore"):
        log1p_r = np.log1p(rl)
        closed = (1.0 + rl) * (np.expm1(beta * log1p_r) / beta) - rl
    return np.where(small, series, closed)


_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(24)


def _panel_integral(f, edges: np.ndarray) -> float:
    """Composite 24-point Gauss-Legendre rule of a vectorised ``f`` over panels ``edges`` (sorted)."""
    a, b = edges[:-1, None], edges[1:, None]
    z = 0.5 * (b - a) * _GL_NODES[None, :] + 0.5 * (a + b)
    return float(np.sum(0.5 * (b - a) * _GL_WEIGHTS[None, :] * f(z)))


def _rdp_by_quadrature(q: float, sigma: float, alpha: float) -> float:
    """rdp(alpha) where log A is tiny (alpha just above 1, or a tiny rdp), by quadrature without cancellation.

    With beta = alpha - 1 and r(z) = q expm1((2z - 1) / (2 sigma^2)) (so that P/Q = 1 + r, E_Q[r] = 0),
        A_alpha - 1 = E_Q[(1 + r)^alpha - 1 - alpha r] = beta I,   I = E_Q[h(r)],  h = _h_over_beta >= 0,
    and rdp(alpha) = log1p(beta I) / beta, which tends to I -> KL(P || Q) as alpha -> 1. The integral of
    this smooth, non-negative function is taken over z in [-40 sigma, alpha + 40 sigma] (the rest weighs
    below e^-800) with a composite 24-point Gauss-Legendre rule on 160 panels, and rounded up by the
    difference from 80 panels plus 1e-10 relative, so the value is an upper bound at every order > 1.
    """
    beta = alpha - 1.0
    two_s2 = 2.0 * sigma * sigma
    log_norm = -0.5 * math.log(2.0 * math.pi) - math.log(sigma)

    def f(z: np.ndarray) -> np.ndarray:
        with np.errstate(over="raise"):
            r = q * np.expm1((2.0 * z - 1.0) / two_s2)
            log_phi = log_norm - z * z / two_s2
            # r >= 1: phi (1 + r) expm1(beta L) / beta - phi r, L = log1p(r), in log-space (no overflow); the
            # first term is >= 1.38 times the second, so the difference loses at most ~2 bits.
            big = r >= 1.0
            rb = np.where(big, r, 1.0)
            L = np.log1p(rb)
            x = beta * L
            log_lead = L + log_phi
            lead = np.where(
                x < 1.0,
                np.exp(log_lead) * (np.expm1(np.minimum(x, 1.0)) / beta),
                (np.exp(log_lead + np.maximum(x, 1.0)) - np.exp(log_lead)) / beta,
            )
            large = lead - rb * np.exp(log_phi)
            return np.where(big, large, np.exp(log_phi) * _h_over_beta(np.where(big, 0.0, r), alpha))

    lo, hi = -40.0 * sigma, alpha + 40.0 * sigma  # the tilted mass sits near z = alpha at most
    try:
        fine = _panel_integral(f, np.linspace(lo, hi, 161))
        coarse = _panel_integral(f, np.linspace(lo, hi, 81))
    except FloatingPointError as exc:
        raise OverflowError(str(exc)) from exc
    upper = fine * (1.0 + 1e-10) + abs(fine - coarse)
    return math.log1p(beta * upper) / beta


def compute_rdp(
    *, noise_multiplier: float, sample_rate: float, orders: Sequence[float] = DEFAULT_RDP_ORDERS
) -> np.ndarray:
    """Renyi DP of ONE step of the Poisson-subsampled Gaussian mechanism, at each order.

    rdp(alpha) = log(A_alpha) / (alpha - 1), A_alpha = E_{z ~ N(0, s^2)} [((1 - q) + q e^{(2z - 1)/(2 s^2)})^alpha],
    the Renyi divergence D_alpha(P || Q) for P = (1 - q) N(0, s^2) + q N(1, s^2), Q = N(0, s^2), which
    dominates the reverse direction (Mironov, Talwar & Zhang 2019, Thm. 5). Integer orders are exact
    (binomial expansion, log-space); fractional orders use the two-sided series of the same paper with
    a rigorous tail bound and an upper bound on its rounding, so every value returned is an upper bound on
    the true RDP. Just above 1 (1 + 1e-12, say), where log A = (alpha - 1) rdp is tiny and the series
    cancels, a quadrature without cancellation takes over (``_rdp_by_quadrature``); it tends to the
    KL-divergence limit at alpha -> 1. Edge cases: q = 1 gives the Gaussian mechanism, alpha / (2 s^2); s = 0 gives inf.
    Multiply by the number of steps to compose (RDP adds up).
    """
    orders_arr = _check_orders(orders)
    sigma = _check_noise_multiplier(noise_multiplier)
    q = _check_sample_rate(sample_rate)
    if sigma == 0.0:
        return np.full(orders_arr.shape, np.inf)
    if q == 1.0:
        return orders_arr / (2.0 * sigma * sigma)
    out = np.empty_like(orders_arr)
    with np.errstate(over="ignore", under="ignore"):
        for i, alpha in enumerate(orders_arr):
            if float(alpha).is_integer():
                log_a = _log_a_integer(q, sigma, int(alpha))
            else:
                try:
                    log_a = _log_a_fractional(q, sigma, float(alpha))
                except FloatingPointError:
                    # RDP is non-decreasing in alpha, so the next integer order bounds this one.
                    logger.debug("fractional order %g replaced by its ceiling", alpha)
                    log_a = _log_a_integer(q, sigma, math.ceil(alpha)) * (alpha - 1) / (math.ceil(alpha) - 1)
                    log_a = max(log_a, 0.0)
                bound = _SERIES_ROUNDING_ULPS * np.finfo(np.float64).eps
                if bound > _SERIES_REL_TOL * log_a:  # rounding not negligible (alpha near 1, tiny rdp)
                    try:
                        out[i] = min(log_a / (alpha - 1.0), _rdp_by_quadrature(q, sigma, float(alpha)))
                        continue
                    except OverflowError:  # a large integrand: log A is not tiny after all
                        pass
            out[i] = log_a / (alpha - 1.0)
    return out


def rdp_to_epsilon(*, orders: Sequence[float], rdp: Sequence[float], delta: float) -> tuple[float, float]:
    """Convert a composed RDP curve to (epsilon, best order) at ``delta``.

    eps(alpha) = rdp(alpha) + log((alpha - 1) / alpha) - (log(delta) + log(alpha)) / (alpha - 1),
    minimised over the orders (Canonne, Kamath & Steinke 2020, Prop. 12; Balle et al. 2020, Thm. 21).
    It is never larger than Mironov's original rdp - log(delta) / (alpha - 1). Clamped at 0.
    """
    orders_arr = _check_orders(orders)
    rdp_arr = np.asarray(rdp, dtype=np.float64).reshape(-1)
    if rdp_arr.shape != orders_arr.shape:
        raise ValueError(f"rdp has {rdp_arr.size} values but there are {orders_arr.size} orders; they must pair up.")
    if np.any(np.isnan(rdp_arr)) or np.any(rdp_arr < 0):
        raise ValueError("rdp values must be >= 0 (Renyi divergences); got a negative or nan value.")
    delta = _check_delta(delta)
    with np.errstate(invalid="ignore"):
        eps = rdp_arr + np.log1p(-1.0 / orders_arr) - (math.log(delta) + np.log(orders_arr)) / (orders_arr - 1.0)
    if np.all(np.isinf(eps)):
        return math.inf, float("nan")
    i = int(np.nanargmin(eps))
    if i in (0, orders_arr.size - 1) and orders_arr.size > 1:
        logger.debug("RDP conversion picked the extreme order %g; a wider order range might be tighter", orders_arr[i])
    return max(0.0, float(eps[i])), float(orders_arr[i])


# ---------------------------------------------------------------------------------------------- one step, exactly
def _delta_one_step(eps: float, q: float, sigma: float) -> float:
    """Hockey-stick divergence delta(eps) = E_Q[(P/Q - e^eps)_+] for P = (1-q)N(0,s^2)+qN(1,s^2), Q = N(0,s^2).

    The privacy loss log(P/Q)(z) = log(1 - q + q e^{(2z-1)/(2 s^2)}) is increasing in z and exceeds eps
    for z > z_eps = s^2 log((e^eps - 1 + q) / q) + 1/2, so
        delta(eps) = q Phi_bar((z_eps - 1)/s) - (e^eps - 1 + q) Phi_bar(z_eps/s).
    """
    log_em1 = eps + math.log(-math.expm1(-eps)) if eps > 0 else -math.inf
    log_c = float(np.logaddexp(log_em1, math.log(q)))  # log(e^eps - 1 + q)
    z = sigma * sigma * (log_c - math.log(q)) + 0.5
    a = math.log(q) + float(special.log_ndtr(-(z - 1.0) / sigma))
    b = log_c + float(special.log_ndtr(-z / sigma))
    if not b < a:
        return 0.0
    return math.exp(a) * -math.expm1(b - a)


def single_step_epsilon(*, noise_multiplier: float, sample_rate: float, delta: float) -> float:
    """Exact epsilon of ONE Poisson-subsampled Gaussian step at ``delta`` (same pair as prv-accountant).

    Returned from below (bisection keeps the end where delta(eps) > delta), so it is a rigorous lower
    bound on the epsilon of any composition containing such a step: dropping the other outputs is
    post-processing. Used as a sanity floor for the numerical accountant.
    """
    sigma = _check_noise_multiplier(noise_multiplier)
    q = _check_sample_rate(sample_rate)
    delta = _check_delta(delta)
    if sigma == 0.0:
        return math.inf
    if _delta_one_step(0.0, q, sigma) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while _delta_one_step(hi, q, sigma) > delta:
        lo, hi = hi, 2.0 * hi
        if hi > 1e6:
            return lo
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if _delta_one_step(mid, q, sigma) > delta:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return lo


# ---------------------------------------------------------------------------------------------- composition
def _merge_segments(segments: Sequence[Segment]) -> list[Segment]:
    """Group equal (sigma, q) pairs, summing their steps (composition is commutative); drop 0-step ones."""
    totals: dict[tuple[float, float], int] = {}
    for sigma, q, n in segments:
        if n > 0:
            totals[(sigma, q)] = totals.get((sigma, q), 0) + n
    return [(s, q, n) for (s, q), n in totals.items()]


def _rdp_curves(segments: Sequence[Segment]) -> list[np.ndarray]:
    """Per-step RDP of each segment on DEFAULT_RDP_ORDERS."""
    return [compute_rdp(noise_multiplier=s, sample_rate=q, orders=DEFAULT_RDP_ORDERS) for s, q, _ in segments]


# prv-accountant sizes its grid with an RDP bound on these orders (prv_accountant.other_accountants.RDP);
# they are a subset of DEFAULT_RDP_ORDERS, so we reuse our curves (same values, computed faster).
_PRV_LIB_ORDERS = [1.0 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
_PRV_LIB_ORDER_INDEX = np.array([DEFAULT_RDP_ORDERS.index(a) for a in _PRV_LIB_ORDERS])


def _prv_domain_half_width(
    curves: Sequence[np.ndarray], counts: Sequence[int], eps_error: float, delta_error: float
) -> float:
    """prv-accountant's ``compute_safe_domain_size`` (Remark 5.6 of Gopi et al. 2021), from our RDP curves.

    L = max(eps_RDP(composition, delta_error / 4), max_i eps_RDP(mechanism i once, delta_error / (8 n)),
    eps_error) + 3, with the library's conversion and orders, so the grid is the one it would build.
    """
    orders = np.asarray(_PRV_LIB_ORDERS, dtype=np.float64)

    def to_eps(rdp: np.ndarray, d: float) -> float:
        with np.errstate(invalid="ignore"):
            eps = rdp - np.log(d * orders) / (orders - 1.0) + np.log1p(-1.0 / orders)
        return float(eps[np.nanargmin(eps)])

    sub = [c[_PRV_LIB_ORDER_INDEX] for c in curves]
    total = sum(counts)
    half_width = to_eps(sum(n * c for n, c in zip(counts, sub)), delta_error / 4.0)
    for c in sub:
        half_width = max(half_width, to_eps(c, delta_error / 8.0 / total))
    return max(half_width, eps_error) + 3.0


def _prv_eps_scale(eps_rdp: float) -> float:
    """The size of the answer the PRV error budget is relative to: the RDP bound, at least 1/8."""
    return max(_PRV_MIN_EPS_SCALE, eps_rdp)


def _prv_eps_error(eps_rdp: float) -> float:
    """0.005 * 2^floor(log2(scale)): 0.25-0.5 % of the RDP bound, piecewise constant in sigma."""
    return _PRV_REL_EPS_ERROR * 2.0 ** math.floor(math.log2(_prv_eps_scale(eps_rdp)))


def _fft_friendly_half_width(half_width: float, eps_error: float, total: int, delta_error: float) -> float:
    """Widen the domain [-L, L] a little so that the grid has a 5-smooth number of points.

    prv-accountant builds 2 (ceil(L / dt) + 1) points (``Domain.create_aligned``) and composes them with
    one real FFT; pocketfft on a length with a large prime factor is ~10x slower. A wider domain only
    truncates less of the privacy loss distribution, so this costs no accuracy (mesh dt is unchanged).
    """
    from scipy.fft import next_fast_len

    dt = eps_error / np.sqrt(total / 2 * np.log(12 / delta_error))  # the library's mesh, same expression
    m = math.ceil(half_width / dt)
    m_fast = next_fast_len(m + 1, real=True) - 1
    return (m_fast - 0.5) * float(dt)


class _PRVFailure(Exception):
    """prv-accountant could not give a trustworthy bound; the message says why."""


def _prv_epsilon(segments: Sequence[Segment], curves: Sequence[np.ndarray], delta: float, eps_rdp: float) -> float:
    """eps_up from prv-accountant for the composition of ``segments``; raises _PRVFailure on any doubt."""
    from prv_accountant import GaussianMechanism, PoissonSubsampledGaussianMechanism, PRVAccountant

    prvs = [
        GaussianMechanism(noise_multiplier=s) if q == 1.0
        else PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=s)
        for s, q, _ in segments
    ]
    if len(segments) > MAX_PRV_MECHANISMS:
        raise _PRVFailure(
            f"{len(segments)} distinct (noise_multiplier, sample_rate) pairs; prv-accountant discretises each on "
            f"the full grid, so more than {MAX_PRV_MECHANISMS} is too slow"
        )
    counts = [n for _, _, n in segments]
    total = sum(counts)
    delta_error = delta * _PRV_DELTA_ERROR_FACTOR
    scale = _prv_eps_scale(eps_rdp)
    eps_error = _prv_eps_error(eps_rdp)
    # Grid size before building it: 2 L / mesh, mesh = eps_error / sqrt(n / 2 log(12 / delta_error)) (Thm. 5.5).
    mesh_per_eps_error = 1.0 / math.sqrt(total / 2.0 * math.log(12.0 / delta_error))
    half_width = _prv_domain_half_width(curves, counts, eps_error, delta_error)
    points = 2.0 * half_width / (eps_error * mesh_per_eps_error)
    if not math.isfinite(points):
        raise _PRVFailure(f"grid size is not finite (domain half-width {half_width})")
    if points > MAX_PRV_GRID_POINTS:
        eps_error = eps_error * points / MAX_PRV_GRID_POINTS
        if eps_error > _PRV_MAX_REL_EPS_ERROR * scale:
            raise _PRVFailure(
                f"the PRV grid would need {points:.3g} points (limit {MAX_PRV_GRID_POINTS}) for a "
                f"useful eps_error (domain half-width {half_width:.3g})"
            )
        half_width = _prv_domain_half_width(curves, counts, eps_error, delta_error)
    half_width = _fft_friendly_half_width(half_width, eps_error, total, delta_error)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")  # eps_max's "assuming" warning, overflow warnings inside the CDFs
            accountant = PRVAccountant(
                prvs=prvs, max_self_compositions=counts, eps_error=eps_error, delta_error=delta_error,
                eps_max=half_width,
            )
            eps_low, eps_est, eps_up = accountant.compute_epsilon(delta=delta, num_self_compositions=counts)
    except Exception as exc:  # any failure of the third-party numerics (ValueError, RuntimeError, MemoryError, ...)
        raise _PRVFailure(f"prv-accountant raised {type(exc).__name__}: {exc}") from exc
    if not all(math.isfinite(v) for v in (eps_low, eps_est, eps_up)) or not eps_low <= eps_est <= eps_up:
        raise _PRVFailure(f"prv-accountant returned an invalid triple {(eps_low, eps_est, eps_up)}")
    for s, q, _ in segments:
        floor = single_step_epsilon(noise_multiplier=s, sample_rate=q, delta=delta)
        if eps_up < floor:
            raise _PRVFailure(f"eps_up={eps_up:.6g} is below the exact one-step epsilon {floor:.6g} (sigma={s}, q={q})")
    return float(eps_up)


def _compose(segments: Sequence[Segment], delta: float, accountant: str) -> tuple[float, str | None]:
    """(upper bound on epsilon at ``delta``, why PRV fell back to RDP or None) for (sigma, q, steps) segments."""
    merged = _merge_segments(segments)
    if not merged:
        return 0.0, None
    if any(s == 0.0 for s, _, _ in merged):
        return math.inf, None
    curves = _rdp_curves(merged)
    total_rdp = sum(n * c for (_, _, n), c in zip(merged, curves))
    eps_rdp = rdp_to_epsilon(orders=DEFAULT_RDP_ORDERS, rdp=total_rdp, delta=delta)[0]
    if accountant == "rdp" or not math.isfinite(eps_rdp):
        return eps_rdp, None
    try:
        return _prv_epsilon(merged, curves, delta, eps_rdp), None
    except _PRVFailure as exc:
        return eps_rdp, str(exc)


def _log_fallback(segments: Sequence[Segment], delta: float, eps: float, reason: str, level: int) -> None:
    logger.log(
        level,
        "PRV accountant failed for (noise_multiplier, sample_rate, steps) segments %s at delta=%g (%s); "
        "reporting the RDP upper bound eps=%.6g instead (valid, but looser).",
        _merge_segments(segments), delta, reason, eps,
    )


def _epsilon_of_segments(segments: Sequence[Segment], delta: float, accountant: str) -> float:
    eps, reason = _compose(segments, delta, accountant)
    if reason is not None:
        _log_fallback(segments, delta, eps, reason, logging.WARNING)
    return eps


def epsilon(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: AccountantName = "prv"
) -> float:
    """Upper bound on epsilon after ``steps`` DP-SGD steps with Poisson rate q and noise multiplier sigma.

    ``accountant="prv"`` reports prv-accountant's eps_up (falling back to RDP, with a warning, where
    prv-accountant fails); ``"rdp"`` the RDP bound with the improved conversion. sigma = 0 gives inf,
    steps = 0 gives 0. See the module docstring for the error budgets and references.
    """
    sigma = _check_noise_multiplier(noise_multiplier)
    q = _check_sample_rate(sample_rate)
    n = _check_steps(steps)
    delta = _check_delta(delta)
    _check_accountant(accountant)
    return _epsilon_of_segments([(sigma, q, n)], delta, accountant)


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: AccountantName = "prv",
    rtol: float = 1e-3,
) -> float:
    """Smallest noise multiplier sigma with epsilon(sigma) <= target_epsilon, to relative tolerance ``rtol``.

    Returns sigma_hi such that epsilon(sigma_hi) <= target_epsilon (the same upper bound ``epsilon``
    reports, same accountant) while epsilon(sigma_lo) > target_epsilon for some sigma_lo >= sigma_hi *
    (1 - rtol): the answer over-shoots the smallest admissible sigma by at most a factor 1 + rtol. The
    search starts at sigma = 1, doubles (or halves) until a bracket straddles the target, then bisects
    in log-space. It relies on epsilon decreasing in sigma (prv's eps_error is piecewise constant in
    sigma for that reason); the returned sigma meets the target in any case, since it was evaluated.
    """
    if (
        isinstance(target_epsilon, bool)
        or not isinstance(target_epsilon, numbers.Real)
        or not (0.0 < target_epsilon < math.inf)
    ):
        raise ValueError(
            f"target_epsilon must be a finite number > 0, got {target_epsilon!r}. "
            + ("epsilon = inf means no privacy: no noise multiplier is calibrated for it; train with "
               "noise_multiplier=0 (and report the run as not private)."
               if isinstance(target_epsilon, numbers.Real) and target_epsilon == math.inf else
               "epsilon = 0 would need infinite noise.")
        )
    delta = _check_delta(delta)
    q = _check_sample_rate(sample_rate)
    n = _check_steps(steps, minimum=1)
    _check_accountant(accountant)
    if not (isinstance(rtol, float) and 0.0 < rtol < 0.5):
        raise ValueError(f"rtol must be a float in (0, 0.5), got {rtol!r}; 1e-3 is plenty.")
    target = float(target_epsilon)

    cache: dict[float, tuple[float, str | None]] = {}

    def eps_at(sigma: float) -> float:
        if sigma not in cache:
            cache[sigma] = _compose([(sigma, q, n)], delta, accountant)
            if cache[sigma][1] is not None:  # expected while probing tiny sigma: quiet here
                _log_fallback([(sigma, q, n)], delta, cache[sigma][0], cache[sigma][1], logging.DEBUG)
        return cache[sigma][0]

    hi = 1.0
    lo = hi
    while eps_at(hi) > target:
        lo, hi = hi, hi * 2.0
        if hi > 2.0**30:
            raise ValueError(
                f"no noise_multiplier up to 2^30 reaches target_epsilon={target} at delta={delta}, "
                f"sample_rate={q}, steps={n}; raise target_epsilon or delta, or take fewer steps."
            )
    if lo == hi:  # sigma = 1 already meets the target: search downwards
        lo = hi / 2.0
        while eps_at(lo) <= target:
            hi, lo = lo, lo / 2.0
            if lo < 1e-6:
                logger.info("target_epsilon=%g is met by noise_multiplier down to 1e-6; returning %g", target, hi)
                return hi
    # Invariant: eps(lo) > target >= eps(hi).
    while hi / lo - 1.0 > rtol:
        mid = math.sqrt(lo * hi)
        if eps_at(mid) <= target:
            hi = mid
        else:
            lo = mid
    eps_hi, reason = cache[hi]
    if reason is not None:  # the answer itself rests on the RDP fallback: say so
        _log_fallback([(hi, q, n)], delta, eps_hi, reason, logging.WARNING)
    logger.info(
        "calibrated noise_multiplier=%.6g (epsilon=%.6g <= %g) at delta=%g, sample_rate=%g, steps=%d, accountant=%s",
        hi, eps_hi, target, delta, q, n, accountant,
    )
    return hi


# ---------------------------------------------------------------------------------------------- the ledger
class PrivacyAccountant:
    """A ledger of DP-SGD steps: (noise_multiplier, sample_rate, steps) segments, and epsilon so far.

    The engine calls ``step`` once per ``optimizer.step()`` (one Poisson batch, noise added once).
    Consecutive steps with the same (sigma, q) merge into one segment, so a constant schedule is one
    entry; ``epsilon`` composes all segments (equal pairs anywhere in the history are grouped first).
    ``state_dict`` is plain JSON-serialisable Python: it belongs in every checkpoint, since resuming
    without it would restart epsilon from zero.
    """

    _STATE_VERSION = 1

    def __init__(self) -> None:
        self._history: list[list] = []  # [[sigma, q, steps], ...]
        self._memo: tuple[tuple, float] | None = None  # last (key, epsilon): logging every step stays cheap

    def step(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record ``num_steps`` steps with noise multiplier sigma and Poisson rate q."""
        sigma = _check_noise_multiplier(noise_multiplier)
        q = _check_sample_rate(sample_rate)
        n = _check_steps(num_steps, name="num_steps", minimum=1)
        if self._history and self._history[-1][0] == sigma and self._history[-1][1] == q:
            self._history[-1][2] += n
        else:
            self._history.append([sigma, q, n])

    @property
    def steps(self) -> int:
        """Total number of steps recorded."""
        return sum(n for _, _, n in self._history)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """A copy of the segments, as (noise_multiplier, sample_rate, steps) tuples, in order."""
        return [(s, q, n) for s, q, n in self._history]

    def epsilon(self, delta: float, accountant: AccountantName = "prv") -> float:
        """Upper bound on epsilon at ``delta`` for everything recorded so far (0 before any step)."""
        delta = _check_delta(delta)
        _check_accountant(accountant)
        key = (tuple(self.history), delta, accountant)
        if self._memo is None or self._memo[0] != key:
            self._memo = (key, _epsilon_of_segments(self.history, delta, accountant))
        return self._memo[1]

    def state_dict(self) -> dict:
        return {"version": self._STATE_VERSION, "history": [[s, q, n] for s, q, n in self._history]}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "history" not in state:
            raise ValueError(
                "PrivacyAccountant.load_state_dict expects the dict from PrivacyAccountant.state_dict() "
                f"(with a 'history' key), got {type(state).__name__}."
            )
        if state.get("version", self._STATE_VERSION) != self._STATE_VERSION:
            raise ValueError(f"unknown PrivacyAccountant state version {state.get('version')!r}")
        history: list[list] = []
        for entry in state["history"]:
            if len(entry) != 3:
                raise ValueError(f"each history entry must be [noise_multiplier, sample_rate, steps], got {entry!r}")
            sigma = _check_noise_multiplier(float(entry[0]))
            q = _check_sample_rate(float(entry[1]))
            n = _check_steps(int(entry[2]), minimum=1)
            if history and history[-1][0] == sigma and history[-1][1] == q:
                history[-1][2] += n
            else:
                history.append([sigma, q, n])
        self._history = history

    def __repr__(self) -> str:
        return f"PrivacyAccountant(steps={self.steps}, segments={len(self._history)})"
