"""Triton tier of :mod:`ghostdp.kernels.noise`: in-kernel Gaussian noise from Philox.

Imported only on first use (it imports Triton and defines ``@triton.jit`` kernels). Callers go
through :func:`ghostdp.kernels.noise.add_noise_`, which validates the arguments.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ghostdp.kernels._tiles import LaunchConfig
from ghostdp.kernels.dispatch import check_kernel_mode

# Module-level constants a @triton.jit function reads must be ``tl.constexpr`` *objects*: the
# compiler rejects a plain global (NameError: Cannot access global variable ...), and an
# annotation ``x: tl.constexpr = 1.0`` leaves a plain float, which only the interpreter accepts.
# Keep them on the right of a tensor operand: the interpreter turns ``constexpr * tensor`` into a
# constexpr wrapping a tensor, which tl.cos and friends then reject.
_TWO_POW_M32 = tl.constexpr(2.3283064365386963e-10)  # 2**-32, exact in fp32
_TWO_PI = tl.constexpr(6.283185307179586)


@triton.jit
def philox_normal(seed, offsets):
    """One N(0, 1) float32 per element of ``offsets`` (int64), keyed by ``(seed, offset)``.

    Philox-4x32-10 (``tl.randint4x``) turns the 64-bit key ``seed`` and the 128-bit counter
    ``(offset, 0)`` into four uint32 words r0..r3, and Box-Muller maps them to
    z = sqrt(-2 ln u1) cos(2 pi u2) with

        u1 = (r0 + (r1 + 1/2) 2^-32) 2^-32  in (0, 1]   (64 random bits)
        u2 = (r2 + 1/2) 2^-32               in (0, 1)

    Spending two words on the radius keeps the Gaussian tail out to |z| = sqrt(130 ln 2) = 9.49
    (probability beyond: ~2e-21); ``tl.randn`` clamps u1 at 1e-7, which cuts the tail at 5.68
    sigma (probability beyond: ~1.3e-8, i.e. dozens of coordinates per step of a 7B model).
    """
    r0, r1, r2, _ = tl.randint4x(seed, offsets)
    hi = r0.to(tl.float32)
    lo = r1.to(tl.float32)
    u1 = (hi + (lo + 0.5) * _TWO_POW_M32) * _TWO_POW_M32
    u2 = (r2.to(tl.float32) + 0.5) * _TWO_POW_M32
    radius = tl.sqrt(tl.maximum(-2.0 * tl.log(u1), 0.0))
    return radius * tl.cos(u2 * _TWO_PI)


@triton.jit
def _add_noise_kernel(x_ptr, n, scale, noise_std, seed,
                      HAS_NOISE: tl.constexpr, COMPUTE_FP64: tl.constexpr, BLOCK: tl.constexpr):
    """x[k] = scale * (x[k] + noise_std * z_k), z_k = philox_normal(seed, k), in place.

    Computed in fp32 (fp64 for float64 ``x``) and rounded once to x's dtype on the store.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) element ids
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if COMPUTE_FP64:
        y = x.to(tl.float64)
    else:
        y = x.to(tl.float32)
    if HAS_NOISE:
        y = y + noise_std * philox_normal(seed, offs)
    y = y * scale
    tl.store(x_ptr + offs, y.to(x_ptr.dtype.element_ty), mask=mask)


#: Elements per program of :func:`_add_noise_kernel`.
NOISE_BLOCK = 1024


def add_noise_launch(dtype: torch.dtype, *, noise: bool) -> LaunchConfig:
    """Constexprs and num_warps of :func:`_add_noise_kernel` for an ``x`` of ``dtype``."""
    return LaunchConfig(dict(HAS_NOISE=noise, COMPUTE_FP64=dtype == torch.float64,
                             BLOCK=NOISE_BLOCK), 4)


def add_noise_triton_(x: torch.Tensor, *, noise_std: float, seed: int, scale: float) -> None:
    """Launcher: ``x`` is a validated, contiguous tensor; noise keyed by the flat element index."""
    check_kernel_mode(_add_noise_kernel, x.device, "add_noise_")
    n = x.numel()
    if n == 0:
        return
    launch = add_noise_launch(x.dtype, noise=noise_std > 0)
    grid = (triton.cdiv(n, NOISE_BLOCK),)
    _add_noise_kernel[grid](x, n, float(scale), float(noise_std), int(seed),
                            num_warps=launch.num_warps, **launch.constexprs)
