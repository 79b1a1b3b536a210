"""Canaries (coin flips, kinds) and the guessing step."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from ghostdp.audit import best_guesses, count_correct, epsilon_lower_bound
from ghostdp.integrations.audit.canaries import make_canaries
from ghostdp.integrations.audit.guesses import default_guess_counts


def test_random_token_canaries_and_fair_coins():
    c = make_canaries(2000, vocab_size=50, length=8, seed=0, exclude_ids=(0,))
    assert len(c) == 2000 and all(len(ids) == 8 for ids in c.token_ids)
    assert all(0 < t < 50 for ids in c.token_ids for t in ids)
    assert all(p == tuple(range(1, 8)) for p in c.score_positions)
    # coin flips are fair: two-sided binomial test at 1e-3
    assert stats.binomtest(int(c.included.sum()), 2000, 0.5).pvalue > 1e-3
    assert len(c.in_training()) == int(c.included.sum())
    again = make_canaries(2000, vocab_size=50, length=8, seed=0, exclude_ids=(0,))
    assert again.token_ids == c.token_ids and np.array_equal(again.included, c.included)


def test_canary_arguments_are_checked():
    with pytest.raises(ValueError, match="vocab_size"):
        make_canaries(10)
    with pytest.raises(ValueError, match="tokenizer"):
        make_canaries(10, kind="secret_text")
    with pytest.raises(ValueError, match="num_canaries"):
        make_canaries(1, vocab_size=10)


def test_secret_text_canaries_score_the_secret(smollm_tokenizer):
    c = make_canaries(20, kind="secret_text", tokenizer=smollm_tokenizer, secret_digits=6, seed=1)
    assert len(set(c.secrets)) == 20
    for ids, pos, text, secret in zip(c.token_ids, c.score_positions, c.texts, c.secrets):
        assert text.endswith(" " + secret) and len(secret) == 6 and secret.isdigit()
        scored = smollm_tokenizer.decode([ids[t] for t in pos])
        assert scored.strip() == secret


def test_guesses_count_and_ties_ignore_coins():
    included = np.array([True, False, True, False, True, False])
    scores = np.array([5.0, -1.0, 4.0, -2.0, 3.0, 0.0])
    assert count_correct(scores, included, 3, 3) == (6, 6)
    assert count_correct(scores, included, 1, 1) == (2, 2)
    assert count_correct(-scores, included, 3, 3) == (6, 0)
    # all tied: guesses are a coin-independent permutation; over many seeds accuracy is about 1/2
    m = 400
    inc = np.random.default_rng(0).random(m) < 0.5
    correct = [count_correct(np.zeros(m), inc, 100, 100, seed=s)[1] for s in range(20)]
    assert abs(np.mean(correct) / 200 - 0.5) < 0.05


def test_best_guesses_is_bonferroni_corrected():
    m = 256
    inc = np.random.default_rng(1).random(m) < 0.5
    scores = inc.astype(float)  # a perfect attack
    best, tried = best_guesses(scores, inc, confidence=0.95)
    assert len(tried) == len(default_guess_counts(m))
    # symmetric guesses: with #in != m/2 the all-guess choice misses |#in - m/2| canaries at most
    assert best.num_correct >= best.num_guesses - abs(int(inc.sum()) - m // 2)
    per_test = 1 - 0.05 / len(tried)
    expected = epsilon_lower_bound(num_guesses=best.num_guesses, num_correct=best.num_correct, confidence=per_test, num_canaries=m)
    assert best.epsilon_lower_bound == pytest.approx(expected)
    # the correction costs something: one fixed guess count at 95% gives more
    uncorrected = epsilon_lower_bound(num_guesses=best.num_guesses, num_correct=best.num_correct, confidence=0.95, num_canaries=m)
    assert best.epsilon_lower_bound < uncorrected


def test_random_scores_rarely_certify_anything():
    # scores independent of the coins: the bound is > 0 in at most ~5% of trials (it is a valid 95% bound)
    rng = np.random.default_rng(2)
    positive = 0
    for _ in range(100):
        inc = rng.random(128) < 0.5
        positive += best_guesses(rng.normal(size=128), inc)[0].epsilon_lower_bound > 0
    assert positive <= 12  # P[Binomial(100, 0.05) > 12] < 1e-3
