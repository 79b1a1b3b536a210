"""Clipped per-example gradient sums of a Linear layer (the book-keeping step of ghost clipping).

    weight:  out (+)= sum_i c_i g_i^T a_i
    bias:    out (+)= sum_i c_i sum_t g_it

with a (B, T, d) the layer inputs, g (B, T, p) the gradients of its outputs (g_i example i's own),
c (B,) the clip factors c_i = min(1, C / ||grad_i||) (Bu et al., "Differentially Private
Optimization on Large Model at Small Cost", ICML 2023): the clipped sum is one weighted GEMM over
the batch, no second backward pass.

No noise here: the engine adds the Gaussian noise once per step at ``optimizer.step()``
(:func:`ghostdp.kernels.add_noise_`), after every physical batch of the step has added its clipped
sum, so it cannot be fused into one batch's sum. The Triton kernel writes or accumulates straight
into ``out``, accumulating in fp32; the twin uses fp32 torch GEMMs.
"""

from __future__ import annotations

import math

import torch

from ghostdp.kernels.dispatch import (
    TWIN_DTYPES,
    accumulation_dtype,
    resolve_impl,
    run_kernel,
)
from ghostdp.kernels.linear_norms import TWIN_BLOCK_BYTES, as_linear_inputs


def _check_clip_factors(c: torch.Tensor, B: int, device: torch.device, op: str) -> None:
    if not isinstance(c, torch.Tensor):
        raise TypeError(f"{op}: clip factors c must be a torch.Tensor, got {type(c).__name__}.")
    if c.shape != (B,):
        raise ValueError(f"{op}: clip factors c have shape {tuple(c.shape)}, expected ({B},): one "
                         "factor c_i = min(1, C / ||grad_i||) per example of the batch.")
    if c.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: clip factors c have dtype {c.dtype}; pass float32 or float64 (a "
                        "low-precision c_i can round above its true value and break the clip).")
    if c.device != device:
        raise ValueError(f"{op}: clip factors are on {c.device} but the activations on {device}; "
                         "move them to one device.")


def _check_out(out: torch.Tensor | None, shape: tuple[int, ...], device: torch.device,
               op: str) -> None:
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{op}: out must be a torch.Tensor or None, got {type(out).__name__}.")
    if tuple(out.shape) != shape:
        raise ValueError(f"{op}: out has shape {tuple(out.shape)}, expected {shape} (the "
                         "parameter's shape).")
    if out.dtype not in TWIN_DTYPES:
        raise TypeError(f"{op}: out has dtype {out.dtype}; it must be float16, bfloat16, float32 "
                        "or float64.")
    if out.device != device:
        raise ValueError(f"{op}: out is on {out.device} but the inputs on {device}; move them to "
                         "one device.")


def linear_clipped_sum_torch(a: torch.Tensor, g: torch.Tensor, c: torch.Tensor,
                             out: torch.Tensor | None, *, accumulate: bool) -> torch.Tensor:
    """Twin of :func:`linear_clipped_sum` (validated inputs, a (B, T, d), g (B, T, p)).

    sum_i c_i g_i^T a_i as fp32 GEMMs over blocks of examples, c_i applied in fp32 to the narrower of
    g_i and a_i (no rounding to the input dtype), then one rounding into ``out`` (or, for an fp32/fp64
    ``out``, addmm straight into it).
    """
    B, T, d = a.shape
    p = g.shape[2]
    acc = accumulation_dtype(a.dtype)
    if out is not None and out.dtype == torch.float64:
        acc = torch.float64
    # Accumulate straight into ``out`` when it already has the accumulation dtype; otherwise into an
    # fp32/fp64 buffer that is rounded into ``out`` once.
    # The first GEMM writes with beta = 0 (the old contents are never read, so no zero-fill) unless it
    # accumulates into ``out``.
    direct = out is not None and out.dtype == acc
    if direct:
        total, beta = out, 1 if accumulate else 0
    else:
        total, beta = torch.empty((p, d), dtype=acc, device=a.device), 0  # (p, d)
    if B == 0 and beta == 0:
        total.zero_()
    itemsize = torch.finfo(acc).bits // 8
    step = max(1, min(max(B, 1), TWIN_BLOCK_BYTES // max(1, itemsize * T * (p + d))))
    for s in range(0, B, step):
        c_blk = c[s:s + step].to(acc)[:, None, None]
        g_blk, a_blk = g[s:s + step].to(acc), a[s:s + step].to(acc)  # (b, T, p), (b, T, d)
        if d <= p:  # scale the narrower side: c_i g_i^T a_i = g_i^T (c_i a_i)
            a_blk = a_blk * c_blk
        else:
            g_blk = g_blk * c_blk
        total.addmm_(g_blk.flatten(0, 1).T, a_blk.flatten(0, 1), beta=beta)  # (p, d)
        beta = 1
    if direct or out is None:
        return total
    if accumulate:
        total += out.to(acc)
    out.copy_(total)
    return out


def linear_clipped_sum(a: torch.Tensor, g: torch.Tensor, c: torch.Tensor, *,
                       out: torch.Tensor | None = None, accumulate: bool = True,
                       impl: str = "auto") -> torch.Tensor:
    """``out (+)= sum_i c_i g_i^T a_i``: a Linear weight's clipped per-example gradient sum.

    Args:
        a: layer inputs, (B, T, d) (or (B, d), or (B, *, d)).
        g: gradients of the layer outputs, (B, T, p).
        c: (B,) float32/float64 clip factors.
        out: (p, d) buffer (fp16, bf16, fp32 or fp64, any strides). None allocates a new fp32
            (fp64 for float64 inputs) tensor.
        accumulate: with ``out`` given, add into it (True, e.g. across physical batches) or
            overwrite it (False: no zero-fill of ``out`` is needed first).
        impl: "auto" | "triton" | "torch" (see :mod:`ghostdp.kernels.dispatch`).

    Returns:
        ``out`` (or the new tensor), (p, d). Everything before the final rounding into ``out`` is
        fp32 (fp64 for float64 inputs or a float64 ``out``). B = 0 (an empty Poisson batch) gives
        zeros (or leaves an accumulated ``out`` as it was).
    """
    op = "linear_clipped_sum"
    a, g = as_linear_inputs(a, g, op)
    B, T, d = a.shape
    p = g.shape[2]
    _check_clip_factors(c, B, a.device, op)
    _check_out(out, (p, d), a.device, op)
    accumulate = accumulate and out is not None

    def twin() -> torch.Tensor:
        return linear_clipped_sum_torch(a, g, c, out, accumulate=accumulate)

    if resolve_impl(impl, a, g, op=op) == "torch":
        return twin()

    def kernel() -> torch.Tensor:
        from ghostdp.kernels._clipped_sum_triton import linear_clipped_sum_triton

        if out is None:
            target = torch.empty((p, d), dtype=accumulation_dtype(a.dtype), device=a.device)
        else:
            target = out if out.is_contiguous() else out.contiguous()  # (p, d)
        linear_clipped_sum_triton(a.contiguous(), g.contiguous(), c.contiguous(), target,
                                  accumulate=accumulate)
        if out is not None and target is not out:
            out.copy_(target)
        return target if out is None else out

    return run_kernel(op, impl, kernel, twin)


def bias_clipped_sum(g: torch.Tensor, c: torch.Tensor, *, out: torch.Tensor | None = None,
                     accumulate: bool = True) -> torch.Tensor:
    """``out (+)= sum_i c_i sum_t g_it``: a Linear bias's clipped per-example gradient sum.

    g (B, T, p) (or (B, p)), c (B,); other arguments as :func:`linear_clipped_sum`. A p-sized fp32
    torch reduction (memory-bound, no kernel needed).
    """
    op = "bias_clipped_sum"
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"{op}: g must be a torch.Tensor, got {type(g).__name__}.")
    if g.dim() < 2:
        raise ValueError(f"{op}: g has shape {tuple(g.shape)}; expected (B, T, p) or (B, p).")
    if g.dtype not in TWIN_DTYPES:
        raise TypeError(f"{op}: g has dtype {g.dtype}; expected float16, bfloat16, float32 or "
                        "float64.")
    B, p = g.shape[0], g.shape[-1]
    _check_clip_factors(c, B, g.device, op)
    _check_out(out, (p,), g.device, op)
    acc = accumulation_dtype(g.dtype)
    if out is not None and out.dtype == torch.float64:
        acc = torch.float64
    per_example = g.reshape(B, math.prod(g.shape[1:-1]), p).sum(dim=1, dtype=acc)  # (B, p)
    total = c.to(acc) @ per_example  # (p,): sum_i c_i sum_t g_it
    if out is None:
        return total
    if accumulate:
        total += out.to(acc)
    out.copy_(total)
    return out
