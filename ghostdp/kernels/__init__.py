"""Fused kernels for DP-SGD on Linear layers, each a Triton kernel with a pure-PyTorch twin.

Public functions (all take ``impl="auto" | "triton" | "torch"``, see :mod:`.dispatch`):

- :func:`linear_norm2_instantiated`, :func:`linear_norm2_ghost`, :func:`bias_norm2`:
  per-example squared gradient norms, (B,) fp32; :func:`linear_norm2_ghost_shared` for several
  layers reading one input.
- :func:`linear_clipped_sum`, :func:`bias_clipped_sum`: out (+)= sum_i c_i G_i, the clipped
  sum of one physical batch (the step noise is added once, by :func:`add_noise_`).
- :func:`add_noise_`: grad <- scale * (grad + noise_std * z) in place; :func:`noise_seed`
  derives per-(step, parameter) seeds.
- :func:`norm_cost`: flops and scratch bytes of each norm method, for the engine's choice.

If a kernel fails to compile or launch, ``impl="auto"`` warns once (:class:`KernelFallbackWarning`)
and runs the twin; ``impl="triton"`` raises. :mod:`.aot` compiles every kernel variant for GPU
targets without a GPU (the test suite runs it).

Importing this package does not import Triton; the kernels are defined on first use.
"""

from ghostdp.kernels.clipped_sum import bias_clipped_sum, linear_clipped_sum
from ghostdp.kernels.dispatch import (
    KernelFallbackWarning,
    interpreter_enabled,
    resolve_impl,
    triton_available,
)
from ghostdp.kernels.linear_norms import (
    NormCost,
    bias_norm2,
    linear_norm2_ghost,
    linear_norm2_ghost_shared,
    linear_norm2_instantiated,
    norm_cost,
)
from ghostdp.kernels.noise import add_noise_, noise_seed

__all__ = [
    "KernelFallbackWarning",
    "NormCost",
    "add_noise_",
    "bias_clipped_sum",
    "bias_norm2",
    "interpreter_enabled",
    "linear_clipped_sum",
    "linear_norm2_ghost",
    "linear_norm2_ghost_shared",
    "linear_norm2_instantiated",
    "noise_seed",
    "norm_cost",
    "resolve_impl",
    "triton_available",
]
