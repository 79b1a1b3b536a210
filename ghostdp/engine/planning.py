"""Privacy planning: what a DP run will spend, decided before its first step, in one place.

Built on :mod:`ghostdp.engine.accounting` (and, like it, free of torch), and called by every caller that
plans a spend: the Hugging Face ``DPTrainer`` (its ``PrivacyPlan``), the synthetic-text app (the generator's
training and label release, the DP-on-real baseline classifier, the run's total) so none re-derives it.

* :func:`default_delta`, :func:`check_delta`: delta = 1/(2N) unless given; delta >= 1/N is refused (a
  mechanism that publishes one random example verbatim meets (epsilon, 1/N)-DP).
* :func:`planned_steps`: ``max_steps``, or ``round(epochs / q)`` (at least 1).
* :func:`epsilon_of_history`: epsilon of a ledger's (sigma, q, steps) segments, optionally followed by
  more steps at one (sigma, q): how a resumed run's plan is priced.
* :func:`steps_within_budget`: the largest total step count whose epsilon stays within a target.
* :func:`plan_dp_sgd`: the above together, the noise multiplier calibrated (or given, or taken over from a
  checkpoint's history) -> :class:`DPSGDPlan`.
* :func:`label_release_epsilon`, :func:`run_epsilon`: the pure-epsilon label-count release and the run's
  total by basic composition, ``epsilon_total = epsilon_train + epsilon_labels`` at DP-SGD's delta.
* :func:`baseline_epsilon`: the budget of a DP baseline that should pay what the release paid.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ghostdp.engine.accounting import (
    AccountantName,
    PrivacyAccountant,
    calibrate_noise_multiplier,
)

__all__ = [
    "COMPOSITION",
    "DPSGDPlan",
    "RunEpsilon",
    "baseline_epsilon",
    "check_delta",
    "default_delta",
    "epsilon_of_history",
    "label_release_epsilon",
    "plan_dp_sgd",
    "planned_steps",
    "run_epsilon",
    "steps_within_budget",
]

Segment = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)

#: How the app composes DP-SGD with the label-count release (recorded beside the figures).
COMPOSITION = "basic: epsilon_total = epsilon_train + epsilon_labels (labels: pure epsilon-DP)"


def default_delta(num_examples: int) -> float:
    """delta = 1 / (2N): well below the 1/N at which publishing one random example would qualify."""
    if num_examples < 1:
        raise ValueError(f"default_delta: num_examples={num_examples}; need at least one example.")
    return 1.0 / (2 * num_examples)


def check_delta(delta: float, num_examples: int, where: str = "delta") -> float:
    """``delta`` if it is below 1/N, else ValueError naming ``where`` and the fix."""
    if delta >= 1.0 / num_examples:
        raise ValueError(f"{where}={delta:g} >= 1/N = {1 / num_examples:g}: use delta well below 1/N "
                         "(none gives 1/(2N)).")
    return delta


def planned_steps(*, sample_rate: float, epochs: float, max_steps: int | None) -> int:
    """``max_steps`` when set (> 0), else ``round(epochs / q)``, at least 1."""
    if max_steps is not None and max_steps > 0:
        return int(max_steps)
    return max(1, round(epochs / sample_rate))


def _ledger(history: Sequence[Sequence[float]]) -> PrivacyAccountant:
    acc = PrivacyAccountant()
    acc.load_state_dict({"history": [list(h) for h in history]})
    return acc


def epsilon_of_history(history: Sequence[Sequence[float]], delta: float, accountant: AccountantName = "prv", *,
                       then: Segment | None = None) -> float:
    """epsilon at ``delta`` of the (sigma, q, steps) segments of ``history``, followed by ``then`` if given.

    0 for an empty ledger. The composition is the accountant's (segments with equal (sigma, q) grouped).
    """
    acc = _ledger(history)
    if then is not None and then[2] > 0:
        acc.step(then[0], then[1], int(then[2]))
    return acc.epsilon(delta, accountant) if acc.steps else 0.0


def steps_within_budget(history: Sequence[Sequence[float]], *, noise_multiplier: float, sample_rate: float,
                        delta: float, target_epsilon: float, accountant: AccountantName, planned: int) -> int:
    """Largest total step count K <= planned with epsilon(history + (K - done) steps at (sigma, q)) <= target.

    ``done`` is the history's step count; K is never below it (what was spent is spent). Bisection over K,
    relying on epsilon growing with the number of steps.
    """
    done = sum(int(h[2]) for h in history)

    def eps(total: int) -> float:
        return epsilon_of_history(history, delta, accountant, then=(noise_multiplier, sample_rate, total - done))

    if planned <= done or eps(planned) <= target_epsilon:
        return max(planned, done)
    if eps(done) > target_epsilon:
        return done
    lo, hi = done, planned  # eps(lo) <= target < eps(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if eps(mid) <= target_epsilon else (lo, mid)
    return lo


@dataclass(frozen=True)
class DPSGDPlan:
    """A DP-SGD run's plan: the mechanism (sigma, q), its length, and what it will spend."""

    num_examples: int  # N
    expected_batch_size: int  # q * N, the public normaliser
    sample_rate: float  # q
    planned_steps: int
    noise_multiplier: float  # sigma
    delta: float
    target_epsilon: float | None
    planned_epsilon: float  # epsilon after planned_steps, history included
    budget_steps: int  # total steps that fit in target_epsilon (<= planned_steps; = planned without a target)
    steps_done: int  # steps already in the history (a resumed run)
    accountant: str


def plan_dp_sgd(*, num_examples: int, expected_batch_size: int, steps: int, delta: float,
                target_epsilon: float | None = None, noise_multiplier: float | None = None,
                history: Sequence[Sequence[float]] = (), accountant: AccountantName = "prv") -> DPSGDPlan:
    """Plan ``steps`` DP-SGD steps at Poisson rate q = expected_batch_size / num_examples.

    sigma is ``noise_multiplier`` when given (a resumed run passes its checkpoint's), else the smallest one
    whose ``steps`` steps stay within ``target_epsilon`` (:func:`calibrate_noise_multiplier`). With a target,
    ``budget_steps`` is where training must stop to stay within it (:func:`steps_within_budget`).
    """
    if num_examples < 1 or not 1 <= expected_batch_size <= num_examples:
        raise ValueError(f"plan_dp_sgd: expected_batch_size={expected_batch_size} must be between 1 and "
                         f"num_examples={num_examples} (q = expected_batch_size / N <= 1).")
    q = expected_batch_size / num_examples
    history = [tuple(h) for h in history]
    done = sum(int(h[2]) for h in history)
    if noise_multiplier is not None:
        sigma = float(noise_multiplier)
    elif target_epsilon is not None:
        sigma = calibrate_noise_multiplier(target_epsilon=target_epsilon, delta=delta, sample_rate=q, steps=steps,
                                           accountant=accountant)
    else:
        raise ValueError("plan_dp_sgd: give target_epsilon (to calibrate the noise) or noise_multiplier.")
    planned_eps = epsilon_of_history(history, delta, accountant, then=(sigma, q, max(0, steps - done)))
    budget = steps
    if target_epsilon is not None and not (math.isfinite(planned_eps) and planned_eps <= target_epsilon
                                           and steps >= done):
        budget = steps_within_budget(history, noise_multiplier=sigma, sample_rate=q, delta=delta,
                                     target_epsilon=target_epsilon, accountant=accountant, planned=steps)
    return DPSGDPlan(num_examples=num_examples, expected_batch_size=expected_batch_size, sample_rate=q,
                     planned_steps=steps, noise_multiplier=sigma, delta=delta, target_epsilon=target_epsilon,
                     planned_epsilon=planned_eps, budget_steps=budget, steps_done=done, accountant=accountant)


def label_release_epsilon(label_epsilon: float | None) -> float:
    """epsilon of the label-count release (pure epsilon-DP, discrete Laplace): 0 when there is none."""
    if label_epsilon is None:
        return 0.0
    if not (isinstance(label_epsilon, (int, float)) and math.isfinite(label_epsilon) and label_epsilon > 0):
        raise ValueError(f"label_epsilon={label_epsilon!r}: need a finite number > 0 (or none for no release).")
    return float(label_epsilon)


@dataclass(frozen=True)
class RunEpsilon:
    """A run's total: DP-SGD's (epsilon_train, delta) and the labels' pure epsilon, composed basically."""

    epsilon_train: float
    epsilon_labels: float
    delta: float

    @property
    def epsilon_total(self) -> float:
        return self.epsilon_train + self.epsilon_labels

    composition: str = COMPOSITION


def run_epsilon(epsilon_train: float, label_epsilon: float | None, delta: float) -> RunEpsilon:
    """The run's total guarantee ``(epsilon_train + epsilon_labels, delta)`` (basic composition)."""
    return RunEpsilon(epsilon_train=float(epsilon_train), epsilon_labels=label_release_epsilon(label_epsilon),
                      delta=float(delta))


def baseline_epsilon(dp_epsilon: float | None, epsilon_total: float) -> float:
    """A DP baseline's budget: ``dp_epsilon`` if set, else the release's total (both then pay the same)."""
    return float(epsilon_total) if dp_epsilon is None else float(dp_epsilon)
