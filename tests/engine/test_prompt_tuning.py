"""PEFT prompt tuning (random-init virtual tokens) against the one-example-at-a-time float64 reference.

PEFT looks the virtual tokens up once, as indices (1, n), and repeats the output over the batch; the engine
replaces that by a per-example lookup while attached (engine/layers/prompt.py). Checked here: per-example
norms and the clipped sum equal the reference (noise 0, C = median norm so some clip, two physical batches,
right-padded), the prompts the model sees are PEFT's own values, and detach restores PEFT's get_prompt.
"""
from __future__ import annotations

import copy
import statistics

import pytest
import torch

from ghostdp import PrivacyEngine
from ghostdp.engine.loss import per_example_lm_loss
from tests.helpers import lm_batch, reference_dp_grads, tiny_llama

N_VIRTUAL = 5
BATCHES = [[5, 9, 3, 7], [6, 2]]


def prompt_model(tie: bool, seed: int = 1):
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    torch.manual_seed(seed)
    cfg = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=N_VIRTUAL,
                             prompt_tuning_init=PromptTuningInit.RANDOM)
    model = get_peft_model(tiny_llama(tie), cfg)
    model.prompt_encoder.to(torch.float64)  # PEFT keeps the table in float32; the reference runs in float64
    return model


def prompt_losses(model, batch):
    """Per-example losses; PEFT's prompt positions are not scored (label -100, as PEFT does with labels)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    labels = batch["labels"]
    prefix = torch.full((labels.shape[0], N_VIRTUAL), -100, dtype=labels.dtype)
    return per_example_lm_loss(out.logits, torch.cat([prefix, labels], dim=1))


def run_engine(model, batches, *, C, expected, clipping, lr=0.0):
    model = copy.deepcopy(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    engine = PrivacyEngine(model, opt, max_grad_norm=C, expected_batch_size=expected, noise_multiplier=0.0,
                           clipping=clipping)
    for batch in batches:
        prompt_losses(model, batch).mean().backward()
    opt.step()  # adds the (zero) noise and divides by the expected batch size
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, engine, model


@pytest.mark.parametrize("clipping", ["auto", "ghost", "per_sample"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_prompt_tuning_matches_reference(tie, clipping):
    model = prompt_model(tie)
    batches = [lm_batch(BATCHES[0], seed=5), lm_batch(BATCHES[1], seed=6)]
    all_norms = []
    for b in batches:
        all_norms += reference_dp_grads(model, [b], prompt_losses, float("inf"), 1.0)[1]
    C = statistics.median(all_norms)
    assert sum(n > C for n in all_norms) >= 1 and sum(n < C for n in all_norms) >= 1  # some clip, some not
    ref, ref_norms = reference_dp_grads(model, batches, prompt_losses, C, 6.5)
    got, engine, _ = run_engine(model, batches, C=C, expected=6.5, clipping=clipping)
    assert set(got) == set(ref) == {"prompt_encoder.default.embedding.weight"}
    torch.testing.assert_close(engine.per_sample_norms, torch.tensor(ref_norms, dtype=torch.float64),
                               rtol=1e-9, atol=1e-12)
    for name in ref:
        assert ref[name].abs().sum() > 0
        torch.testing.assert_close(got[name], ref[name], rtol=1e-9, atol=1e-12)


def test_unclipped_sum_would_differ():
    """The clipped sum is not the summed gradient clipped as a whole (what PEFT's repeat would hand over)."""
    model = prompt_model(False)
    batch = lm_batch(BATCHES[0], seed=5)
    norms = reference_dp_grads(model, [batch], prompt_losses, float("inf"), 1.0)[1]
    C = statistics.median(norms)
    got, _, _ = run_engine(model, [batch], C=C, expected=4.0, clipping="auto")
    summed, _ = reference_dp_grads(model, [batch], prompt_losses, float("inf"), 4.0)
    (g,) = got.values()
    (s,) = summed.values()
    whole = s * min(1.0, C / float(s.norm() * 4.0))
    assert not torch.allclose(g, whole, rtol=1e-3)


def test_prompts_unchanged_trained_and_detach_restores_peft():
    model = prompt_model(False)
    batch = lm_batch(BATCHES[0], seed=7)
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    table = model.prompt_encoder.default.embedding.weight.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine = PrivacyEngine(model, opt, max_grad_norm=1.0, expected_batch_size=4.0, noise_multiplier=0.0)
    assert "get_prompt" in model.__dict__
    prompts = model.get_prompt(batch_size=4)
    assert prompts.shape == (4, N_VIRTUAL, 16)
    torch.testing.assert_close(prompts, table.unsqueeze(0).expand(4, -1, -1), rtol=0, atol=0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(logits, before, rtol=1e-12, atol=1e-12)  # same values as PEFT's repeat
    prompt_losses(model, batch).mean().backward()
    opt.step()
    assert not torch.equal(model.prompt_encoder.default.embedding.weight, table)  # trained (Opacus #820)
    engine.detach()
    assert "get_prompt" not in model.__dict__
