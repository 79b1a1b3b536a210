"""Tolerances and comparison helpers shared by the kernel tests (imported by name; tests/kernels is
on sys.path under pytest's default import mode)."""

from __future__ import annotations

import torch

# Kernel vs twin, by input dtype: (atol, rtol), atol taken relative to the largest |expected|.
# Both sides read the same rounded inputs and accumulate in fp32 (fp16/bf16 products are exact in
# fp32), so every input dtype lands near fp32 accumulation error; fp16/bf16 get 10x for the GPU's
# tensor-core accumulation order. float64: the twins against exact float64 references.
INPUT_TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-6, 1e-5),
    torch.float16: (1e-5, 1e-4),
    torch.bfloat16: (1e-5, 1e-4),
}
# Extra allowance when a result is rounded into an output dtype (one rounding each side, so up to
# one ulp apart): bf16 has 8 significant bits (2^-8 = 3.9e-3), fp16 11 (2^-11 = 4.9e-4).
OUTPUT_TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (0.0, 0.0),
    torch.float32: (1e-6, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3),
}


def tolerance(input_dtype: torch.dtype, output_dtype: torch.dtype | None = None) -> tuple[float, float]:
    atol, rtol = INPUT_TOL[input_dtype]
    if output_dtype is not None:
        o_atol, o_rtol = OUTPUT_TOL[output_dtype]
        atol, rtol = max(atol, o_atol), max(rtol, o_rtol)
    return atol, rtol


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float,
                     msg: str = "") -> None:
    """assert_close with atol scaled by max |expected| (norms of random data are not O(1))."""
    assert actual.shape == expected.shape, f"{msg} shape {actual.shape} != {expected.shape}"
    if expected.numel() == 0:
        return
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol,
                               atol=atol * max(scale, 1e-30), msg=lambda m: f"{msg}\n{m}")


def make_linear_inputs(B: int, T: int, d: int, p: int, dtype: torch.dtype, *, seed: int = 0,
                       device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random activations a (B, T, d) and output gradients g (B, T, p), rounded to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(B, T, d, generator=gen, dtype=torch.float64)
    g = torch.randn(B, T, p, generator=gen, dtype=torch.float64) / max(T, 1) ** 0.5
    return a.to(dtype=dtype, device=device), g.to(dtype=dtype, device=device)


def reference_per_example_grads(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The obviously correct, slow way: G_i = g_i^T a_i one example at a time, in float64."""
    B, p, d = a.shape[0], g.shape[-1], a.shape[-1]
    grads = torch.zeros(B, p, d, dtype=torch.float64)
    for i in range(B):
        a_i = a[i].reshape(-1, d).double().cpu()  # (T, d)
        g_i = g[i].reshape(-1, p).double().cpu()  # (T, p)
        grads[i] = torch.einsum("tp,td->pd", g_i, a_i)
    return grads


def reference_norm2(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """||G_i||_F^2 from materialised float64 per-example gradients, (B,)."""
    return reference_per_example_grads(a, g).square().sum(dim=(1, 2))


def reference_clipped_sum(a: torch.Tensor, g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """sum_i c_i G_i in float64, (p, d)."""
    grads = reference_per_example_grads(a, g)
    return torch.einsum("b,bpd->pd", c.double().cpu(), grads)
