"""The DP step equals one built from per-example gradients computed one example at a time (float64, noise 0).

Covers every clipping mode on tiny Llama models (tied and untied embeddings, with and without biases), full
fine-tuning and LoRA, right-padded variable-length batches, and two physical batches before one step. C is
set to the median per-example norm so that some examples clip and some do not.
"""
from __future__ import annotations

import copy
import statistics

import pytest
import torch

from ghostdp import PrivacyEngine
from tests.helpers import lm_batch, lm_losses, reference_dp_grads, slice_example, tiny_llama

MODES = ["auto", "ghost", "per_sample"]
# Lengths, right-padded to the longest of each batch. Batch sizes are powers of two: Hugging Face's
# RMSNorm runs in float32 even in a float64 model, which turns the last-bit difference of (g / b) * b
# into 1e-8 noise; with b = 2^k the "mean" undo is exact. Odd batch sizes are covered by the layer tests.
BATCHES = [[5, 9, 3, 7], [6, 2]]


def run_engine(model, batches, loss_fn, *, C, expected, clipping, reduction="mean"):
    model = copy.deepcopy(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    engine = PrivacyEngine(
        model, opt, max_grad_norm=C, expected_batch_size=expected, noise_multiplier=0.0,
        clipping=clipping, loss_reduction=reduction,
    )
    for batch in batches:
        losses = loss_fn(model, batch)
        (losses.mean() if reduction == "mean" else losses.sum()).backward()
    opt.step()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return grads, engine


def lora(model, seed=1):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj"],
                     lora_dropout=0.0, init_lora_weights=False)
    return get_peft_model(model, cfg)


def check_against_reference(model, batches, clipping, reduction="mean", expected=6.5):
    all_norms = []
    for b in batches:
        all_norms += reference_dp_grads(model, [b], lm_losses, float("inf"), 1.0)[1]
    C = statistics.median(all_norms)
    ref, ref_norms = reference_dp_grads(model, batches, lm_losses, C, expected)
    got, engine = run_engine(model, batches, lm_losses, C=C, expected=expected, clipping=clipping, reduction=reduction)
    assert sum(n > C for n in all_norms) >= 1 and sum(n < C for n in all_norms) >= 1  # some clip, some not
    torch.testing.assert_close(engine.per_sample_norms, torch.tensor(ref_norms, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")
    return got


@pytest.mark.parametrize("clipping", MODES)
@pytest.mark.parametrize("tie,bias", [(True, False), (False, False), (False, True)], ids=["tied", "untied", "untied-bias"])
def test_full_finetune_matches_reference(tie, bias, clipping):
    model = tiny_llama(tie, bias=bias)
    batches = [lm_batch(BATCHES[0], seed=1), lm_batch(BATCHES[1], seed=2)]
    got = check_against_reference(model, batches, clipping)
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert any(g.abs().sum() > 0 for g in got.values())


@pytest.mark.parametrize("clipping", MODES)
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_lora_matches_reference(tie, clipping):
    model = lora(tiny_llama(tie))
    batches = [lm_batch(BATCHES[0], seed=3), lm_batch(BATCHES[1], seed=4)]
    got = check_against_reference(model, batches, clipping)
    assert all("lora_" in n for n in got)


@pytest.mark.parametrize("clipping", MODES)
def test_sum_reduction_matches_reference(clipping):
    check_against_reference(tiny_llama(False), [lm_batch([4, 7, 2], seed=5)], clipping, reduction="sum")
    check_against_reference(tiny_llama(True), [lm_batch([4, 7, 2], seed=5)], clipping, reduction="sum")


def test_clipping_modes_agree_to_float64_precision():
    model = tiny_llama(True, bias=True)
    batches = [lm_batch([9, 4, 6, 8, 3], seed=6)]
    results = [run_engine(model, batches, lm_losses, C=0.5, expected=5.0, clipping=m)[0] for m in MODES]
    for other in results[1:]:
        for name in results[0]:
            torch.testing.assert_close(other[name], results[0][name], rtol=1e-11, atol=1e-14)


def test_padded_batch_loss_equals_unpadded_example_loss():
    """Right padding changes nothing: each row's loss equals the loss of that example run alone."""
    model = tiny_llama(True)
    batch = lm_batch([5, 9, 3, 7], seed=7)
    with torch.no_grad():
        batched = lm_losses(model, batch)
        alone = torch.cat([lm_losses(model, slice_example(batch, i)) for i in range(4)])
    torch.testing.assert_close(batched, alone, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_matches_reference(reentrant):
    """Recomputed forwards (activation checkpointing) still hand the engine each example's gradient once."""
    model = tiny_llama(False)
    batches = [lm_batch(BATCHES[0], seed=8)]
    ref, _ = reference_dp_grads(model, batches, lm_losses, 0.3, 4.0)
    model = copy.deepcopy(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    PrivacyEngine(model, opt, max_grad_norm=0.3, expected_batch_size=4.0, noise_multiplier=0.0)
    if reentrant:  # reentrant checkpointing needs an input that requires grad to run the backward at all
        model.enable_input_require_grads()
    lm_losses(model, batches[0]).mean().backward()
    opt.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")
