"""Privacy planning (ghostdp.engine.planning) against the accountant it is built on."""
from __future__ import annotations

import subprocess
import sys

import pytest

from ghostdp.engine import accounting as acc
from ghostdp.engine import planning

DELTA = 1e-5


def _ledger_epsilon(history, delta=DELTA, accountant="prv"):
    ledger = acc.PrivacyAccountant()
    for sigma, q, n in history:
        ledger.step(sigma, q, n)
    return ledger.epsilon(delta, accountant)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_epsilon_of_history_is_the_ledgers_epsilon(accountant):
    history = [(1.1, 0.01, 300), (0.8, 0.02, 50), (1.1, 0.01, 100)]
    assert planning.epsilon_of_history(history, DELTA, accountant) == _ledger_epsilon(history, accountant=accountant)
    then = (0.9, 0.01, 40)
    assert planning.epsilon_of_history(history, DELTA, accountant, then=then) == _ledger_epsilon(
        history + [then], accountant=accountant)
    assert planning.epsilon_of_history([], DELTA, accountant) == 0.0
    assert planning.epsilon_of_history([], DELTA, accountant, then=(1.0, 0.01, 0)) == 0.0


def test_steps_within_budget_is_the_last_step_within_the_target():
    sigma, q, target = 1.0, 0.02, 3.0
    k = planning.steps_within_budget([], noise_multiplier=sigma, sample_rate=q, delta=DELTA, target_epsilon=target,
                                     accountant="rdp", planned=2000)
    assert 0 < k < 2000
    assert acc.epsilon(noise_multiplier=sigma, sample_rate=q, steps=k, delta=DELTA, accountant="rdp") <= target
    assert acc.epsilon(noise_multiplier=sigma, sample_rate=q, steps=k + 1, delta=DELTA, accountant="rdp") > target
    # With a history: the count is in total steps, and the history's cost is included.
    history = [(1.5, 0.05, 100)]
    k2 = planning.steps_within_budget(history, noise_multiplier=sigma, sample_rate=q, delta=DELTA,
                                      target_epsilon=target, accountant="rdp", planned=2000)
    assert 100 < k2 < 100 + k
    assert _ledger_epsilon(history + [(sigma, q, k2 - 100)], accountant="rdp") <= target
    assert _ledger_epsilon(history + [(sigma, q, k2 - 99)], accountant="rdp") > target
    # A plan within the target is kept; a history already over it allows no further step.
    assert planning.steps_within_budget([], noise_multiplier=5.0, sample_rate=q, delta=DELTA, target_epsilon=target,
                                        accountant="rdp", planned=50) == 50
    assert planning.steps_within_budget([(0.5, 0.5, 200)], noise_multiplier=sigma, sample_rate=q, delta=DELTA,
                                        target_epsilon=target, accountant="rdp", planned=400) == 200


def test_plan_dp_sgd_calibrates_like_the_accountant_and_stays_within_the_target():
    plan = planning.plan_dp_sgd(num_examples=5000, expected_batch_size=100, steps=200, delta=DELTA,
                                target_epsilon=3.0)
    assert plan.sample_rate == 100 / 5000 and plan.steps_done == 0 and plan.budget_steps == 200
    assert plan.noise_multiplier == acc.calibrate_noise_multiplier(target_epsilon=3.0, delta=DELTA, sample_rate=0.02,
                                                                   steps=200)
    assert plan.planned_epsilon == acc.epsilon(noise_multiplier=plan.noise_multiplier, sample_rate=0.02, steps=200,
                                               delta=DELTA)
    assert plan.planned_epsilon <= 3.0


def test_plan_dp_sgd_with_a_given_sigma_and_a_history_cuts_at_the_budget():
    history = [(1.0, 0.02, 100)]
    plan = planning.plan_dp_sgd(num_examples=5000, expected_batch_size=100, steps=2000, delta=DELTA,
                                target_epsilon=3.0, noise_multiplier=0.8, history=history, accountant="rdp")
    assert plan.steps_done == 100 and plan.noise_multiplier == 0.8
    assert plan.planned_epsilon == _ledger_epsilon(history + [(0.8, 0.02, 1900)], accountant="rdp") > 3.0
    assert 100 < plan.budget_steps < 2000
    assert _ledger_epsilon(history + [(0.8, 0.02, plan.budget_steps - 100)], accountant="rdp") <= 3.0
    assert _ledger_epsilon(history + [(0.8, 0.02, plan.budget_steps - 99)], accountant="rdp") > 3.0
    # No target: no cut.
    free = planning.plan_dp_sgd(num_examples=5000, expected_batch_size=100, steps=2000, delta=DELTA,
                                noise_multiplier=0.8, accountant="rdp")
    assert free.budget_steps == 2000 and free.target_epsilon is None
    with pytest.raises(ValueError, match="target_epsilon"):
        planning.plan_dp_sgd(num_examples=5000, expected_batch_size=100, steps=10, delta=DELTA)
    with pytest.raises(ValueError, match="expected_batch_size"):
        planning.plan_dp_sgd(num_examples=50, expected_batch_size=100, steps=10, delta=DELTA, target_epsilon=1.0)


def test_steps_delta_and_the_runs_total():
    assert planning.planned_steps(sample_rate=0.01, epochs=3.0, max_steps=None) == 300
    assert planning.planned_steps(sample_rate=0.01, epochs=3.0, max_steps=-1) == 300
    assert planning.planned_steps(sample_rate=0.01, epochs=3.0, max_steps=7) == 7
    assert planning.planned_steps(sample_rate=0.9, epochs=0.1, max_steps=None) == 1
    assert planning.default_delta(60) == 1 / 120
    assert planning.check_delta(1e-3, 100) == 1e-3
    with pytest.raises(ValueError, match=r"train\.delta=0\.01 >= 1/N = 0\.01"):
        planning.check_delta(0.01, 100, where="train.delta")
    total = planning.run_epsilon(2.5, 0.1, 1e-5)
    assert total.epsilon_total == pytest.approx(2.6) and total.epsilon_labels == 0.1 and "basic" in total.composition
    assert planning.run_epsilon(2.5, None, 1e-5).epsilon_total == 2.5
    for bad in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="label_epsilon"):
            planning.label_release_epsilon(bad)
    assert planning.baseline_epsilon(None, 3.1) == 3.1 and planning.baseline_epsilon(1.0, 3.1) == 1.0


def test_planning_does_not_import_torch():
    code = "import sys, ghostdp.engine.planning; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
