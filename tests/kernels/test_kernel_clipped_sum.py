"""Clipped (and noised) gradient sums: kernel vs twin vs float64 reference, and noise residuals."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_helpers import (
    INPUT_TOL,
    assert_close_rel,
    make_linear_inputs,
    reference_clipped_sum,
    tolerance,
)

from ghostdp.kernels import bias_clipped_sum, linear_clipped_sum
from ghostdp.kernels import clipped_sum as clipped_sum_module
from ghostdp.kernels import linear_norms

SHAPES = [
    (0, 5, 7, 3),
    (1, 1, 7, 13),
    (3, 7, 13, 37),
    (2, 37, 1, 16),  # d = rank 1
    (3, 11, 5, 64),  # p = 64
    (4, 17, 13, 1),  # p = 1
    (5, 3, 131, 2),  # two 128-wide tiles of d
]


def _id(shape):
    return "B{}T{}d{}p{}".format(*shape)


def _clip_factors(B: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(B)
    return torch.rand(B, generator=gen, dtype=torch.float64).clamp_min(0.05).to(dtype=dtype,
                                                                               device=device)


# ---------------------------------------------------------------------------------------------
# Twin against the reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_twin_float64_matches_reference(shape):
    a, g = make_linear_inputs(*shape, torch.float64, seed=1)
    c = _clip_factors(shape[0], dtype=torch.float64)
    got = linear_clipped_sum(a, g, c, impl="torch")
    assert got.dtype == torch.float64 and got.shape == (shape[3], shape[2])
    assert_close_rel(got, reference_clipped_sum(a, g, c), *INPUT_TOL[torch.float64])


def test_twin_out_accumulate_overwrite_scale_and_blocks(monkeypatch):
    a, g = make_linear_inputs(4, 5, 6, 7, torch.float64, seed=2)
    c = _clip_factors(4, dtype=torch.float64)
    ref = reference_clipped_sum(a, g, c)
    out = torch.full((7, 6), 2.0, dtype=torch.float64)
    linear_clipped_sum(a, g, c, out=out, scale=0.25, impl="torch")
    assert_close_rel(out, 2.0 + 0.25 * ref, 1e-14, 1e-12)
    linear_clipped_sum(a, g, c, out=out, accumulate=False, impl="torch")
    assert_close_rel(out, ref, 1e-14, 1e-12)
    monkeypatch.setattr(linear_norms, "TWIN_BLOCK_BYTES", 1)
    monkeypatch.setattr(clipped_sum_module, "TWIN_BLOCK_BYTES", 1)
    assert_close_rel(linear_clipped_sum(a, g, c, impl="torch"), ref, 1e-14, 1e-12)


def test_twin_low_precision_inputs_accumulate_in_fp32():
    a, g = make_linear_inputs(3, 29, 23, 19, torch.bfloat16, seed=3)
    c = _clip_factors(3)
    got = linear_clipped_sum(a, g, c, impl="torch")
    assert got.dtype == torch.float32
    assert_close_rel(got, reference_clipped_sum(a, g, c), *INPUT_TOL[torch.float32])


def test_bias_clipped_sum_matches_reference():
    _, g = make_linear_inputs(5, 7, 1, 13, torch.float64, seed=4)
    c = _clip_factors(5, dtype=torch.float64)
    expected = torch.einsum("b,btp->p", c, g)
    assert_close_rel(bias_clipped_sum(g, c, impl="torch"), expected, 1e-14, 1e-12)
    out = torch.ones(13, dtype=torch.bfloat16)
    bias_clipped_sum(g.bfloat16(), c.float(), out=out, scale=0.5, impl="torch")
    assert_close_rel(out, 1 + 0.5 * expected, *tolerance(torch.bfloat16, torch.bfloat16))
    assert_close_rel(bias_clipped_sum(g[:0], c[:0], impl="torch"), torch.zeros(13), 0, 0)


# ---------------------------------------------------------------------------------------------
# Kernel against twin, noiseless
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_kernel_matches_twin(kernel_device, shape, dtype):
    a, g = make_linear_inputs(*shape, dtype, seed=5, device=kernel_device)
    c = _clip_factors(shape[0], device=kernel_device)
    got = linear_clipped_sum(a, g, c, impl="triton")
    want = linear_clipped_sum(a, g, c, impl="torch")
    assert got.dtype == torch.float32
    assert_close_rel(got, want, *tolerance(dtype), msg=f"{dtype} {shape}")


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16,
                                       torch.float64], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_accumulates_into_out(kernel_device, dtype, out_dtype):
    B, T, d, p = 3, 7, 13, 37
    a, g = make_linear_inputs(B, T, d, p, dtype, seed=6, device=kernel_device)
    c = _clip_factors(B, device=kernel_device, dtype=torch.float64)
    start = torch.linspace(-1, 1, p * d, dtype=torch.float64).reshape(p, d).to(
        dtype=out_dtype, device=kernel_device)
    got, want = start.clone(), start.clone()
    linear_clipped_sum(a, g, c, out=got, scale=0.3, impl="triton")
    linear_clipped_sum(a, g, c, out=want, scale=0.3, impl="torch")
    assert got.dtype == out_dtype
    assert_close_rel(got, want, *tolerance(dtype, out_dtype))
    linear_clipped_sum(a, g, c, out=got, accumulate=False, impl="triton")
    linear_clipped_sum(a, g, c, out=want, accumulate=False, impl="torch")
    assert_close_rel(got, want, *tolerance(dtype, out_dtype))


@pytest.mark.parametrize("splits", [1, 2, 3, 64])
def test_kernel_split_over_examples(kernel_device, splits):
    """The split path (LoRA-sized outputs on a GPU) gives the same sum and the same noise."""
    from ghostdp.kernels._clipped_sum_triton import linear_clipped_sum_triton

    B, T, d, p = 5, 6, 40, 3
    a, g = make_linear_inputs(B, T, d, p, torch.bfloat16, seed=7, device=kernel_device)
    c = _clip_factors(B, device=kernel_device)
    want = torch.ones(p, d, device=kernel_device)
    linear_clipped_sum(a, g, c, out=want, scale=2.0, noise_std=0.5, seed=11, impl="triton")
    got = torch.ones(p, d, device=kernel_device)
    linear_clipped_sum_triton(a, g, c, got, accumulate=True, scale=2.0, noise_std=0.5, seed=11,
                              splits=splits)
    assert_close_rel(got, want, *tolerance(torch.bfloat16))


def test_kernel_non_contiguous_inputs_and_out(kernel_device):
    a, g = make_linear_inputs(7, 3, 13, 5, torch.float32, seed=8, device=kernel_device)
    c = _clip_factors(7, device=kernel_device)
    a_t = a.transpose(0, 1).contiguous().transpose(0, 1)
    g_t = g.transpose(0, 1).contiguous().transpose(0, 1)
    out = torch.zeros(13, 5, device=kernel_device).T  # (5, 13), non-contiguous
    linear_clipped_sum(a_t, g_t, c, out=out, impl="triton")
    assert_close_rel(out, linear_clipped_sum(a, g, c, impl="torch"), *tolerance(torch.float32))


def test_kernel_rejects_float64_inputs(kernel_device):
    a, g = make_linear_inputs(2, 3, 4, 5, torch.float64, device=kernel_device)
    with pytest.raises(TypeError, match="impl='torch'"):
        linear_clipped_sum(a, g, _clip_factors(2, device=kernel_device), impl="triton")


# ---------------------------------------------------------------------------------------------
# Noise inside the clipped sum: the residual out - noiseless is scale * noise_std * N(0, I)
# ---------------------------------------------------------------------------------------------

def _check_gaussian(z: torch.Tensor, std: float, what: str) -> None:
    """Mean 0 and the given std, within 5 standard errors of n i.i.d. draws."""
    z = z.double().flatten()
    n = z.numel()
    assert abs(z.mean().item()) < 5 * std / math.sqrt(n), f"{what}: mean {z.mean().item()}"
    # the sample std of n normals has standard error std / sqrt(2 n)
    assert abs(z.std().item() - std) < 5 * std / math.sqrt(2 * n), f"{what}: std {z.std().item()}"


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_noise_residual_statistics(kernel_device, impl):
    B, T, d, p = 3, 4, 128, 128  # 2^14 noise draws: ~4 s in the interpreter
    device = kernel_device if impl == "triton" else torch.device("cpu")
    a, g = make_linear_inputs(B, T, d, p, torch.float32, seed=9, device=device)
    c = _clip_factors(B, device=device)
    noiseless = linear_clipped_sum(a, g, c, scale=0.5, impl=impl)
    noisy = linear_clipped_sum(a, g, c, scale=0.5, noise_std=3.0, seed=1234, impl=impl)
    residual = (noisy - noiseless).cpu()
    _check_gaussian(residual, 1.5, impl)
    again = linear_clipped_sum(a, g, c, scale=0.5, noise_std=3.0, seed=1234, impl=impl)
    assert torch.equal(noisy, again), "the same seed must reproduce the noise exactly"
    other = linear_clipped_sum(a, g, c, scale=0.5, noise_std=3.0, seed=1235, impl=impl)
    r = torch.corrcoef(torch.stack([residual.flatten(), (other - noiseless).cpu().flatten()]))[0, 1]
    assert abs(r.item()) < 5 / math.sqrt(residual.numel())


def test_noise_on_an_empty_batch(kernel_device):
    """A Poisson batch may be empty; the step's noise is still added."""
    a, g = make_linear_inputs(0, 3, 64, 64, torch.bfloat16, device=kernel_device)
    c = _clip_factors(0, device=kernel_device)
    out = linear_clipped_sum(a, g, c, noise_std=2.0, seed=5, impl="triton")
    _check_gaussian(out.cpu(), 2.0, "empty batch")
    assert torch.equal(linear_clipped_sum(a, g, c, impl="triton"), torch.zeros_like(out))


def test_noise_std_zero_draws_nothing(kernel_device, monkeypatch):
    a, g = make_linear_inputs(2, 3, 4, 5, torch.float32, device=kernel_device)
    c = _clip_factors(2, device=kernel_device)

    def forbidden(*args, **kwargs):
        raise AssertionError("random numbers drawn with noise_std == 0")

    monkeypatch.setattr(clipped_sum_module, "randn_twin", forbidden)
    twin = linear_clipped_sum(a, g, c, impl="torch", seed=3)
    # The kernel compiles HAS_NOISE=False: the seed cannot matter.
    k1 = linear_clipped_sum(a, g, c, impl="triton", seed=3)
    k2 = linear_clipped_sum(a, g, c, impl="triton", seed=4)
    assert torch.equal(k1, k2)
    assert_close_rel(k1, twin, *tolerance(torch.float32))


def test_bias_noise(kernel_device):
    _, g = make_linear_inputs(3, 5, 1, 4096, torch.float32, seed=10, device=kernel_device)
    c = _clip_factors(3, device=kernel_device)
    noiseless = bias_clipped_sum(g, c, impl="triton")
    noisy = bias_clipped_sum(g, c, noise_std=2.0, scale=0.25, seed=8, impl="triton")
    _check_gaussian((noisy - 0.25 * noiseless).cpu(), 0.5, "bias")


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def test_validation_errors():
    a, g = make_linear_inputs(2, 3, 4, 5, torch.float32)
    c = _clip_factors(2)
    with pytest.raises(ValueError, match=r"expected \(2,\)"):
        linear_clipped_sum(a, g, c[:1])
    with pytest.raises(TypeError, match="float32 or float64"):
        linear_clipped_sum(a, g, c.bfloat16())
    with pytest.raises(ValueError, match="parameter's shape"):
        linear_clipped_sum(a, g, c, out=torch.zeros(4, 5))
    with pytest.raises(TypeError, match="out has dtype"):
        linear_clipped_sum(a, g, c, out=torch.zeros(5, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="noise_std"):
        linear_clipped_sum(a, g, c, noise_std=-1.0)
    with pytest.raises(ValueError, match="seed"):
        linear_clipped_sum(a, g, c, noise_std=1.0, seed=-3)
    with pytest.raises(ValueError, match="scale"):
        linear_clipped_sum(a, g, c, scale=float("nan"))
    with pytest.raises(ValueError, match=r"expected \(5,\)"):
        bias_clipped_sum(g, c, out=torch.zeros(4))


# ---------------------------------------------------------------------------------------------
# GPU, real sizes
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("p", [4096, 11008])
def test_gpu_llama7b_clipped_sum(cuda_device, p):
    B, T, d = 4, 1024, 4096
    a, g = make_linear_inputs(B, T, d, p, torch.bfloat16, seed=12, device=cuda_device)
    c = _clip_factors(B, device=cuda_device)
    twin = linear_clipped_sum(a, g, c, impl="torch")
    out = torch.zeros(p, d, device=cuda_device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    linear_clipped_sum(a, g, c, out=out, noise_std=1.0, scale=0.5, seed=2024, impl="triton")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 0.1 * p * d * 4, f"{extra} bytes: a noise tensor must not be allocated"
    _check_gaussian((out - 0.5 * twin).float(), 0.5, "llama residual")  # 45M draws
    noiseless = torch.zeros(p, d, dtype=torch.bfloat16, device=cuda_device)
    linear_clipped_sum(a, g, c, out=noiseless, impl="triton")
    assert_close_rel(noiseless, twin, *tolerance(torch.bfloat16, torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("r", [1, 16, 64])
def test_gpu_lora_clipped_sum(cuda_device, r):
    B, T, d = 8, 1024, 4096
    for shape in [(B, T, d, r), (B, T, r, d)]:
        a, g = make_linear_inputs(*shape, torch.bfloat16, seed=13, device=cuda_device)
        c = _clip_factors(B, device=cuda_device)
        assert_close_rel(linear_clipped_sum(a, g, c, impl="triton"),
                         linear_clipped_sum(a, g, c, impl="torch"), *tolerance(torch.bfloat16))
