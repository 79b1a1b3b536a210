"""Synthetic-text scores and the report."""
from __future__ import annotations

import numpy as np

from ghostdp.integrations.audit.canaries import Canaries
from ghostdp.integrations.audit.guesses import best_guesses
from ghostdp.integrations.audit.report import markdown, write_report
from ghostdp.integrations.audit.run import AuditResult
from ghostdp.integrations.audit.synthetic import audit_synthetic_text, synthetic_scores


def secret_canaries(secrets, included):
    n = len(secrets)
    return Canaries("secret_text", tuple((1,) for _ in range(n)), tuple(() for _ in range(n)), np.asarray(included),
                    tuple(f"x {s}" for s in secrets), tuple(secrets))


class CharTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_secret_scores_count_occurrences_then_prefixes():
    c = secret_canaries(["123456", "987654", "555000"], [True, False, True])
    texts = ["my pin is 123456 ok", "call 123456", "code 9876 only", "nothing"]
    s = synthetic_scores(c, texts)
    assert s[0] == 2 + 6 / 7  # two texts contain it, and its whole prefix is present
    assert s[1] == 4 / 7  # not present; longest prefix "9876"
    assert s[2] == 1 / 7  # "5" occurs (in 123456), "55" does not
    assert synthetic_scores(c, ["55"])[2] == 2 / 7


def test_token_canaries_score_ngram_overlap():
    c = Canaries("random_tokens", ((97, 98, 99, 100), (120, 121, 122, 123)), ((1, 2, 3), (1, 2, 3)),
                 np.array([True, False]))
    s = synthetic_scores(c, ["zzabcd", "xy"], tokenizer=CharTokenizer(), ngram=3)
    assert list(s) == [1.0, 0.0]


def test_synthetic_audit_catches_verbatim_release():
    rng = np.random.default_rng(0)
    m = 128
    secrets = [f"{x:06d}" for x in rng.choice(10**6, size=m, replace=False)]
    included = rng.random(m) < 0.5
    c = secret_canaries(secrets, included)
    texts = [f"the number is {s}" for s, inc in zip(secrets, included) if inc]  # a generator that regurgitates
    result = audit_synthetic_text(c, texts, claimed_epsilon=1.0)
    assert result.what == "synthetic" and result.exceeds_claim and result.epsilon_lower_bound > 1.0
    nothing = audit_synthetic_text(c, ["no secrets here"] * 10, claimed_epsilon=1.0)
    assert nothing.epsilon_lower_bound <= 1.0


def test_report_files(tmp_path):
    rng = np.random.default_rng(0)
    inc = rng.random(64) < 0.5
    scores = inc + rng.normal(scale=0.1, size=64)
    best, tried = best_guesses(scores, inc)
    r = AuditResult(best.epsilon_lower_bound, 8.0, 8.0, 1e-5, 0.95, 0.7, 0.06, 48, 64, best, tried, scores, inc)
    paths = write_report([r, r], tmp_path)
    md = paths["markdown"].read_text()
    assert f"{best.num_correct}/{best.num_guesses}" in md and "8.000" in md and "audit_scores.png" in md
    assert paths["plot"].stat().st_size > 1000
    assert "consistent with the claim" in markdown([r])
