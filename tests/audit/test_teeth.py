"""The audit has teeth: a broken DP mechanism is caught, the real one is not (Steinke et al. 2023 game).

Tiny Llama (vocab 64, width 32), 64 random-token canaries of 8 tokens, 100 Poisson steps, expected batch 8,
no other data: a few seconds per run on one CPU thread.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ghostdp.accounting import calibrate_noise_multiplier
from ghostdp.integrations.audit.run import AuditConfig, audit_model

M, STEPS, BATCH, CLAIM = 64, 100, 8, 1.0


def small_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(seed: int, **kw):
    config = AuditConfig(num_canaries=M, canary_length=8, steps=STEPS, expected_batch_size=BATCH, learning_rate=1e-2,
                         seed=seed, **kw)
    return audit_model(small_llama(seed), config)


@pytest.mark.parametrize("seed", [0, 1])
def test_no_noise_while_claiming_epsilon_1_is_caught(seed):
    result, canaries = run(seed, noise_multiplier=0.0, claimed_epsilon=CLAIM)
    assert result.accountant_epsilon == math.inf
    assert result.epsilon_lower_bound > CLAIM
    assert result.exceeds_claim
    # the bound is the one of the reported guesses, Bonferroni over the tried guess counts
    assert result.best.num_correct > result.best.num_guesses / 2
    assert np.array_equal(result.included, canaries.included)


def test_clipping_disabled_is_caught():
    # Noise calibrated for epsilon 1 with clipping bound 0.01, but per-example gradients never clipped (C = 1e4):
    # the noise std sigma * 0.01 is what a correct run with C = 0.01 would add.
    sigma = calibrate_noise_multiplier(target_epsilon=CLAIM, delta=1e-5, sample_rate=BATCH / M, steps=STEPS)
    result, _ = run(0, noise_multiplier=sigma * 0.01 / 1e4, max_grad_norm=1e4, claimed_epsilon=CLAIM)
    assert result.epsilon_lower_bound > CLAIM
    assert result.exceeds_claim


@pytest.mark.parametrize("seed", [0, 1])
def test_real_mechanism_stays_below_its_epsilon(seed):
    result, _ = run(seed, target_epsilon=CLAIM)
    assert result.accountant_epsilon <= CLAIM
    assert result.claimed_epsilon == result.accountant_epsilon
    assert result.epsilon_lower_bound <= result.accountant_epsilon
    assert not result.exceeds_claim
    assert result.noise_multiplier > 1.0  # calibrated, not zero


def test_white_box_score_catches_no_noise():
    result, _ = run(0, noise_multiplier=0.0, claimed_epsilon=0.25, score="white_box")
    assert result.score_kind.startswith("white-box")
    assert result.epsilon_lower_bound > 0.25
