"""Clipped gradient sums: kernel vs twin vs float64 reference (the step noise is not added here: see
test_kernel_noise.py and the engine tests)."""

from __future__ import annotations

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


@pytest.mark.parametrize("out_dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_twin_out_accumulate_overwrite_and_blocks(monkeypatch, out_dtype):
    a, g = make_linear_inputs(4, 5, 6, 7, torch.float64, seed=2)
    c = _clip_factors(4, dtype=torch.float64)
    ref = reference_clipped_sum(a, g, c)
    tol = (1e-14, 1e-12) if out_dtype == torch.float64 else tolerance(torch.float64, out_dtype)
    out = torch.full((7, 6), 2.0, dtype=out_dtype)
    linear_clipped_sum(a, g, c, out=out, impl="torch")
    assert_close_rel(out.double(), 2.0 + ref, *tol)
    out.fill_(float("nan"))  # overwrite: nothing of the old out may survive (no zero-fill needed)
    linear_clipped_sum(a, g, c, out=out, accumulate=False, impl="torch")
    assert_close_rel(out.double(), ref, *tol)
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
    assert_close_rel(bias_clipped_sum(g, c), expected, 1e-14, 1e-12)
    out = torch.ones(13, dtype=torch.bfloat16)
    bias_clipped_sum(g.bfloat16(), c.float(), out=out)
    assert_close_rel(out, 1 + expected, *tolerance(torch.bfloat16, torch.bfloat16))
    assert_close_rel(bias_clipped_sum(g[:0], c[:0]), torch.zeros(13), 0, 0)


# ---------------------------------------------------------------------------------------------
# Kernel against twin
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
    linear_clipped_sum(a, g, c, out=got, impl="triton")
    linear_clipped_sum(a, g, c, out=want, impl="torch")
    assert got.dtype == out_dtype
    assert_close_rel(got, want, *tolerance(dtype, out_dtype))
    linear_clipped_sum(a, g, c, out=got, accumulate=False, impl="triton")
    linear_clipped_sum(a, g, c, out=want, accumulate=False, impl="torch")
    assert_close_rel(got, want, *tolerance(dtype, out_dtype))


@pytest.mark.parametrize("splits", [1, 2, 3, 64])
def test_kernel_split_over_examples(kernel_device, splits):
    """The split path (LoRA-sized outputs on a GPU) gives the same sum, accumulated or written."""
    from ghostdp.kernels._clipped_sum_triton import linear_clipped_sum_triton

    B, T, d, p = 5, 6, 40, 3
    a, g = make_linear_inputs(B, T, d, p, torch.bfloat16, seed=7, device=kernel_device)
    c = _clip_factors(B, device=kernel_device)
    for accumulate in (True, False):
        want = torch.ones(p, d, device=kernel_device)
        linear_clipped_sum(a, g, c, out=want, accumulate=accumulate, impl="torch")
        got = torch.ones(p, d, device=kernel_device)
        linear_clipped_sum_triton(a, g, c, got, accumulate=accumulate, splits=splits)
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


def test_kernel_on_an_empty_batch(kernel_device):
    """A Poisson batch may be empty: its clipped sum is zero (written) or nothing (accumulated)."""
    a, g = make_linear_inputs(0, 3, 64, 64, torch.bfloat16, device=kernel_device)
    c = _clip_factors(0, device=kernel_device)
    assert torch.equal(linear_clipped_sum(a, g, c, impl="triton"), torch.zeros(64, 64, device=kernel_device))
    out = torch.ones(64, 64, device=kernel_device)
    assert torch.equal(linear_clipped_sum(a, g, c, out=out, impl="triton"), torch.ones_like(out))


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
    with pytest.raises(TypeError, match="noise_std"):  # no noise options: the engine adds it at step()
        linear_clipped_sum(a, g, c, noise_std=1.0)
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
    out = torch.ones(p, d, device=cuda_device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    linear_clipped_sum(a, g, c, out=out, impl="triton")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 0.1 * p * d * 4, f"{extra} bytes: no (p, d) temporary may be allocated"
    assert_close_rel(out - 1, twin, *tolerance(torch.bfloat16))
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
