"""From canary scores to guesses to a bound (Steinke et al. 2023, Algorithm 1, the guessing step). No torch.

The auditor ranks the m canaries by score (higher = "looks trained on"), guesses "in" (+1) for the k+ highest,
"out" (-1) for the k- lowest and abstains on the rest. Guesses must not depend on the coin flips: ties are
broken by a random permutation drawn before looking at them. Trying several (k+, k-) and keeping the best
bound is a multiple comparison; each is therefore tested at level (1 - confidence) / (number tried)
(Bonferroni), so the reported maximum still holds at ``confidence``.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ghostdp.integrations.audit.bounds import epsilon_lower_bound

log = logging.getLogger(__name__)

__all__ = ["GuessResult", "best_guesses", "count_correct", "default_guess_counts"]


@dataclass(frozen=True)
class GuessResult:
    """One (k+, k-) choice and its bound."""

    k_plus: int
    k_minus: int
    num_guesses: int
    num_correct: int
    epsilon_lower_bound: float
    confidence: float  # the overall confidence (Bonferroni over ``tried`` choices)
    tried: int


def _order(scores: np.ndarray, seed: int) -> np.ndarray:
    """Indices from lowest to highest score; ties in a random order independent of the coin flips.

    The tie-break stream is keyed by (seed, "ties"), so it never replays the stream that drew the coin flips
    from ``seed`` (``make_canaries``).
    """
    perm = np.random.default_rng([seed, 0x7E5]).permutation(len(scores))
    return perm[np.argsort(scores[perm], kind="stable")]


def count_correct(scores: Sequence[float], included: Sequence[bool], k_plus: int, k_minus: int, *, seed: int = 0) -> tuple[int, int]:
    """(r, v): guesses made and correct ones, guessing in for the k+ highest scores and out for the k- lowest."""
    s = np.asarray(scores, dtype=float)
    inc = np.asarray(included, dtype=bool)
    if s.shape != inc.shape or s.ndim != 1:
        raise ValueError(f"scores and included must be 1-D of one length, got {s.shape} and {inc.shape}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN: a canary's loss was not finite; check the model and the canary lengths")
    m = len(s)
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
        raise ValueError(f"need 0 <= k_plus, k_minus and k_plus + k_minus <= m = {m}, got {k_plus}, {k_minus}")
    order = _order(s, seed)
    low, high = order[:k_minus], order[m - k_plus:] if k_plus else order[:0]
    correct = int(inc[high].sum()) + int((~inc[low]).sum())
    return k_plus + k_minus, correct


def default_guess_counts(m: int) -> list[tuple[int, int]]:
    """(k+, k-) pairs tried by default: k in {m/128, ..., m/2}, symmetric (k, k) and "in" only (k, 0).

    "In" only helps when some inserted canaries were never sampled (probability (1 - q)^steps each): they
    score like canaries that were out, so "out" guesses among the lowest scores are the error-prone ones.
    """
    ks = sorted({max(1, m // d) for d in (128, 64, 32, 16, 8, 4, 2)})
    return [(k, k) for k in ks if 2 * k <= m] + [(k, 0) for k in ks if k >= 2]


def best_guesses(
    scores: Sequence[float],
    included: Sequence[bool],
    *,
    confidence: float = 0.95,
    delta: float = 0.0,
    guess_counts: Sequence[tuple[int, int]] | None = None,
    seed: int = 0,
) -> tuple[GuessResult, list[GuessResult]]:
    """The best bound over ``guess_counts`` (default ``default_guess_counts(m)``), Bonferroni-corrected.

    Each choice is tested at confidence ``1 - (1 - confidence) / len(guess_counts)``; returns (best, all).
    """
    m = len(scores)
    counts = list(guess_counts) if guess_counts is not None else default_guess_counts(m)
    if not counts:
        raise ValueError(f"no (k+, k-) guess counts to try with m = {m} canaries; insert at least 2 canaries")
    each = 1.0 - (1.0 - confidence) / len(counts)
    results = []
    for k_plus, k_minus in counts:
        r, v = count_correct(scores, included, k_plus, k_minus, seed=seed)
        eps = epsilon_lower_bound(num_guesses=r, num_correct=v, confidence=each, delta=delta, num_canaries=m)
        results.append(GuessResult(k_plus, k_minus, r, v, eps, confidence, len(counts)))
        log.debug("k+=%d k-=%d: %d/%d correct, eps >= %.3f", k_plus, k_minus, v, r, eps)
    best = max(results, key=lambda g: (g.epsilon_lower_bound, g.num_correct))
    return best, results
