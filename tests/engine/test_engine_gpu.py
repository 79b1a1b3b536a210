"""CUDA checks (skipped without a GPU): bf16 models, and no host synchronisation inside backward."""
from __future__ import annotations

import copy

import pytest
import torch

from ghostdp import PrivacyEngine
from tests.helpers import lm_batch, lm_losses, reference_dp_grads, tiny_llama

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False))


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_bf16_on_cuda_matches_float64_reference(use_lora):
    base = lora(tiny_llama(True)) if use_lora else tiny_llama(True)
    model = copy.deepcopy(base).to("cuda", torch.bfloat16)
    reference_model = copy.deepcopy(model).to("cpu", torch.float64)  # same rounded weights, exact arithmetic
    batch = lm_batch([7, 4, 9, 5], seed=2)
    ref, ref_norms = reference_dp_grads(reference_model, [batch], lm_losses, 0.5, 4.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = PrivacyEngine(model, opt, max_grad_norm=0.5, expected_batch_size=4.0, noise_multiplier=0.0)
    lm_losses(model, {k: v.cuda() for k, v in batch.items()}).mean().backward()
    assert engine.per_sample_norms.dtype == torch.float32
    torch.testing.assert_close(engine.per_sample_norms.cpu().double(), torch.tensor(ref_norms, dtype=torch.float64), rtol=5e-2, atol=1e-3)
    opt.step()
    for name, p in model.named_parameters():
        if name in ref:
            err = (p.grad.double().cpu() - ref[name]).norm() / ref[name].norm().clamp(min=1e-12)
            assert err < 0.1, (name, float(err))


def test_no_host_sync_inside_backward():
    model = lora(tiny_llama(True, dtype=torch.float32)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    PrivacyEngine(model, opt, max_grad_norm=1.0, expected_batch_size=4, noise_multiplier=1.0)
    batch = {k: v.cuda() for k, v in lm_batch([7, 4, 9, 5], seed=2).items()}
    loss = lm_losses(model, batch).mean()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss.backward()  # norms, clip factors and clipped sums: all on the device
    finally:
        torch.cuda.set_sync_debug_mode("default")
    opt.step()
