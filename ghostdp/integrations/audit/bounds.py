"""Epsilon lower bounds from one training run (Steinke, Nasr, Jagielski, NeurIPS 2023). No torch.

The game (their Algorithm 1): m canaries, each included in the training set independently with probability
1/2 (coin flips S in {-1, +1}^m, the auditor's secret); after training, the auditor guesses T_i in {-1, 0, +1}
for every canary (0 = abstain), r = ||T||_1 guesses, and W = the number of correct guesses.

Pure DP (their Theorem 1 / the delta = 0 case of Theorem 3): if the training run is epsilon-DP then W is
stochastically dominated by a Binomial(r, q) with ``q = e^eps / (1 + e^eps)``, so for every v

    P[W >= v] <= f_eps(v) := P[Binomial(r, q_eps) >= v].                                            (1)

(epsilon, delta)-DP (their Theorem 3, the delta term; computed as in the paper's appendix code
``p_value_DP_audit``):

    P[W >= v] <= f_eps(v) + 2 m delta * max_{i = 1..v} (f_eps(v - i) - f_eps(v)) / i,                  (2)

where f_eps(v - i) - f_eps(v) = P[v - i <= Binomial(r, q_eps) < v]. The right-hand side is the p-value of
"the run is (eps, delta)-DP" given v correct guesses. The lower bound at confidence c is the largest eps
that this p-value rejects at level 1 - c: every eps below it is rejected, i.e. the smallest eps with

    p_value(eps) >= 1 - c                                                                            (3)

(for delta = 0, ``P[Binomial(r, e^eps / (1 + e^eps)) >= v] = 1 - c``). 0.0 when no eps >= 0 is rejected,
which includes every v not above chance (v <= r / 2). The tails are computed here in log space from
``lgamma`` (numpy, no scipy), so the tests can check them against ``scipy.stats.binom`` independently.
"""
from __future__ import annotations

import functools
import math
import numbers

import numpy as np

__all__ = ["binomial_upper_tail", "epsilon_lower_bound", "p_value"]

#: eps beyond which the bisection stops: q = 1 - e^-60 is 1 in double precision.
EPS_MAX = 60.0


def _check_count(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _logsumexp(xs: np.ndarray) -> float:
    if xs.size == 0:
        return -math.inf
    top = float(xs.max())
    if top == -math.inf:
        return -math.inf
    return top + math.log(float(np.exp(xs - top).sum()))


@functools.lru_cache(maxsize=64)
def _log_binomial_coefficients(r: int) -> np.ndarray:
    """log C(r, k) for k = 0..r (cached: the bisection evaluates one r at many eps)."""
    lg = np.array([math.lgamma(k + 1) for k in range(r + 1)])
    return lg[r] - lg - lg[::-1]


def _log_q(eps: float) -> tuple[float, float]:
    """(log q, log(1 - q)) for q = e^eps / (1 + e^eps), stable for large eps."""
    return -math.log1p(math.exp(-eps)), -(eps + math.log1p(math.exp(-eps)))


def _log_pmfs(r: int, eps: float) -> np.ndarray:
    """log P[Binomial(r, q_eps) = k] for k = 0..r."""
    log_q, log_1mq = _log_q(eps)
    k = np.arange(r + 1)
    return _log_binomial_coefficients(r) + k * log_q + (r - k) * log_1mq


def binomial_upper_tail(r: int, v: int, eps: float) -> float:
    """f_eps(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v], eq. (1); 1 for v <= 0, 0 for v > r."""
    if v <= 0:
        return 1.0
    if v > r:
        return 0.0
    return min(1.0, math.exp(_logsumexp(_log_pmfs(r, eps)[v:])))


def p_value(*, num_guesses: int, num_correct: int, epsilon: float, delta: float = 0.0, num_canaries: int | None = None) -> float:
    """Probability, under the hypothesis "the run is (epsilon, delta)-DP", of >= v correct of r guesses: eq. (2).

    With delta = 0 this is eq. (1), f_eps(v). ``num_canaries`` (m) enters only the delta term.
    """
    r, v = num_guesses, num_correct
    if not 0 <= v <= r:
        raise ValueError(f"need 0 <= num_correct <= num_guesses, got num_correct={v}, num_guesses={r}")
    m = r if num_canaries is None else num_canaries
    if v == 0:
        return 1.0
    log_pmf = _log_pmfs(r, epsilon)
    tail = min(1.0, math.exp(_logsumexp(log_pmf[v:])))
    if delta == 0.0:
        return tail
    # alpha = max_i P[v - i <= Bin < v] / i, with the partial sums P[v - i <= Bin < v] accumulated over i.
    partial = np.cumsum(np.exp(log_pmf[v - 1::-1]))  # partial[i - 1] = P[v - i <= Bin < v], i = 1..v
    alpha = float((partial / np.arange(1, v + 1)).max())
    return min(1.0, tail + 2.0 * m * delta * alpha)


def epsilon_lower_bound(
    *,
    num_guesses: int,
    num_correct: int,
    confidence: float = 0.95,
    delta: float = 0.0,
    num_canaries: int | None = None,
    tol: float = 1e-9,
) -> float:
    """Lower bound on epsilon at ``confidence`` from ``num_correct`` (v) correct of ``num_guesses`` (r): eq. (3).

    The smallest eps >= 0 with p_value(eps) >= 1 - confidence (eq. (1) for delta = 0, eq. (2) for delta > 0),
    found by bisection to ``tol`` and returned from below (a lower bound must not be rounded up). Every
    eps below the returned value is rejected at level 1 - confidence, so "the run is (eps, delta)-DP" is
    false with that confidence. 0.0 when v is not above chance or nothing is rejected; 0.0 for r = 0.

    Args:
        num_guesses: r, the canaries the auditor did not abstain on.
        num_correct: v, the correct guesses among them (0 <= v <= r).
        confidence: c in (0, 1), e.g. 0.95.
        delta: the delta of the hypothesis (eq. (2)); 0 for pure DP.
        num_canaries: m, all canaries including abstentions (r <= m); needed when delta > 0.
    """
    r = _check_count("num_guesses", num_guesses)
    v = _check_count("num_correct", num_correct)
    if v > r:
        raise ValueError(f"num_correct ({v}) cannot exceed num_guesses ({r}): v counts correct guesses among the r made")
    if num_canaries is None:
        if delta > 0:
            raise ValueError(
                "delta > 0 needs num_canaries (m, every canary inserted, abstentions included): the delta term of "
                "Steinke et al.'s Theorem 3 is 2 m delta times a binomial increment."
            )
        m = r
    else:
        m = _check_count("num_canaries", num_canaries)
        if r > m:
            raise ValueError(f"num_guesses ({r}) cannot exceed num_canaries ({m}): at most one guess per canary")
    if isinstance(confidence, bool) or not isinstance(confidence, numbers.Real) or not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95, got {confidence!r}")
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta!r}")
    if r == 0 or 2 * v <= r:
        return 0.0
    level = 1.0 - float(confidence)

    def pv(eps: float) -> float:
        return p_value(num_guesses=r, num_correct=v, epsilon=eps, delta=float(delta), num_canaries=m)

    if pv(0.0) >= level:
        return 0.0
    lo, hi = 0.0, 1.0  # invariant: pv(lo) < level <= pv(hi)
    while pv(hi) < level:
        if hi >= EPS_MAX:
            return EPS_MAX  # every eps up to EPS_MAX is rejected (q rounds to 1 beyond it)
        lo, hi = hi, min(2.0 * hi, EPS_MAX)
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if pv(mid) < level:
            lo = mid
        else:
            hi = mid
    return lo
