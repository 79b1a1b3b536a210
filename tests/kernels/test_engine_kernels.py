"""The whole DP step with the Triton kernels equals the step with the PyTorch twins.

On CPU the kernels run in Triton's interpreter (tiny shapes); on a GPU they compile (``gpu`` marker).
"""
from __future__ import annotations

import copy

import pytest
import torch

from ghostdp import PrivacyEngine
from tests.helpers import lm_batch, lm_losses, tiny_llama


def dp_step(model, impl, *, sigma=0.0, clipping="auto", seed=0, device="cpu"):
    model = copy.deepcopy(model).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    PrivacyEngine(model, opt, max_grad_norm=0.05, expected_batch_size=3, noise_multiplier=sigma, clipping=clipping,
                  impl=impl, generator=torch.Generator(device=device).manual_seed(seed))
    for lengths, s in (([6, 3, 5], 1), ([4, 7], 2)):
        batch = {k: v.to(device) for k, v in lm_batch(lengths, seed=s).items()}
        lm_losses(model, batch).mean().backward()
    opt.step()
    return {n: p.grad.detach().cpu() for n, p in model.named_parameters()}


@pytest.mark.parametrize("clipping", ["ghost", "per_sample"])
def test_step_with_kernels_equals_step_with_twins(kernel_device, clipping):
    model = tiny_llama(True, bias=True, dtype=torch.float32)
    twin = dp_step(model, "torch", clipping=clipping, device=kernel_device)
    fused = dp_step(model, "triton", clipping=clipping, device=kernel_device)
    for name in twin:
        torch.testing.assert_close(fused[name], twin[name], rtol=2e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_in_kernel_noise_has_the_right_scale_and_reproduces(kernel_device):
    model = tiny_llama(False, dtype=torch.float32)
    clean = dp_step(model, "triton", device=kernel_device)
    noisy = dp_step(model, "triton", sigma=2.0, seed=5, device=kernel_device)
    again = dp_step(model, "triton", sigma=2.0, seed=5, device=kernel_device)
    other = dp_step(model, "triton", sigma=2.0, seed=6, device=kernel_device)
    z = torch.cat([(noisy[n] - clean[n]).flatten() for n in clean])
    target, n = 2.0 * 0.05 / 3, z.numel()
    assert abs(float(z.std()) / target - 1) < 5 * (1 / (2 * n)) ** 0.5 + 1e-3
    assert abs(float(z.mean())) < 5 * target / n ** 0.5
    for name in clean:
        torch.testing.assert_close(again[name], noisy[name], rtol=0, atol=0)
    w = torch.cat([(other[n] - clean[n]).flatten() for n in clean])
    assert abs(float(torch.corrcoef(torch.stack([z, w]))[0, 1])) < 5 / n ** 0.5


@pytest.mark.gpu
def test_bf16_step_on_gpu_matches_fp32_reference(cuda_device):
    model = tiny_llama(True, dtype=torch.float32)
    ref = dp_step(model, "torch", device=cuda_device)
    got = dp_step(model.to(torch.bfloat16), "triton", device=cuda_device)
    for name in ref:
        err = (got[name].float() - ref[name]).norm() / ref[name].norm().clamp(min=1e-12)
        assert err < 0.1, (name, float(err))
