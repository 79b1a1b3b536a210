"""Per-example squared gradient norms of a Linear layer y = x W^T + b, W of shape (p, d).

With activations a_i (T, d) and output gradients g_i (T, p) of example i, the per-example weight
gradient is G_i = g_i^T a_i (p, d) and its squared norm has two forms (Li et al., "Large Language
Models Can Be Strong Differentially Private Learners", ICLR 2022, Sec. 4):

    instantiated  ||G_i||_F^2 = ||g_i^T a_i||_F^2                 ~ 2 T p d flops per example
    ghost         ||G_i||_F^2 = <a_i a_i^T, g_i g_i^T>_F
                              = sum_{t,s} (a_it . a_is)(g_it . g_is)   ~ T^2 (d + p) flops

and the bias gradient's ||sum_t g_it||^2. Each function has a Triton kernel (``impl="triton"``)
and a pure-PyTorch twin (``impl="torch"``) that defines the result; both accumulate in fp32
(float64 for float64 inputs, twin only) and return a (B,) fp32 (or float64) tensor.

Memory: the fused instantiated kernel keeps each (p, d) tile of G_i in registers, so unlike the
textbook instantiation it needs no B x p x d buffer; the ghost kernel never stores the T x T Gram
matrices. :func:`norm_cost` gives the engine's "auto" rule flops and extra bytes for each choice.
"""

from __future__ import annotations

import logging
import math
from typing import Literal, NamedTuple

import torch

from ghostdp.kernels._tiles import ghost_tile_rows, instantiated_tiles
from ghostdp.kernels.dispatch import (
    accumulation_dtype,
    check_same_device,
    common_float_dtype,
    resolve_impl,
    run_kernel,
)

logger = logging.getLogger(__name__)

#: Bytes of scratch the twins may use for one block of work (they loop over blocks).
TWIN_BLOCK_BYTES = 256 * 2**20


def as_linear_inputs(a: torch.Tensor, g: torch.Tensor, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a Linear's activations and output gradients; return them as (B, T, d), (B, T, p).

    Accepts (B, d) (read as T = 1) or (B, *, d) (the middle dimensions flattened into T), as
    nn.Linear does; both must share B and the middle dimensions, one device, and a float dtype.
    Mixed dtypes are promoted (e.g. bf16 activations with fp32 gradients read as fp32).
    """
    for name, t in (("a", a), ("g", g)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}.")
        if t.dim() < 2:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}; expected (B, T, features) "
                             "or (B, features), with the batch first.")
    if a.shape[:-1] != g.shape[:-1]:
        raise ValueError(f"{op}: activations a {tuple(a.shape)} and output gradients g "
                         f"{tuple(g.shape)} must agree in every dimension but the last (B, T, .). "
                         "Pass the layer's input and the gradient of its output for the same batch.")
    check_same_device(a, g, op=op)
    dtype = common_float_dtype(a, g, op=op)
    if a.dtype != g.dtype:
        logger.debug("%s: promoting a (%s) and g (%s) to %s", op, a.dtype, g.dtype, dtype)
    B, T = a.shape[0], math.prod(a.shape[1:-1])
    a3 = a.reshape(B, T, a.shape[-1]).to(dtype)  # (B, T, d)
    g3 = g.reshape(B, T, g.shape[-1]).to(dtype)  # (B, T, p)
    return a3, g3


# ---------------------------------------------------------------------------------------------
# Twins
# ---------------------------------------------------------------------------------------------

#: Rows of the Gram blocks of the ghost twin: small enough that the symmetric half saves work (a block
#: of rows meets only the columns from its own start on), large enough for efficient GEMMs on a CPU.
GHOST_TWIN_ROWS = 64


def _examples_per_block(B: int, per_example_bytes: int) -> int:
    return max(1, min(B, TWIN_BLOCK_BYTES // max(per_example_bytes, 1)))


def linear_norm2_instantiated_torch(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Twin: ||g_i^T a_i||_F^2 by materialising G_i for a block of examples at a time.

    a (B, T, d), g (B, T, p) of one dtype; computed in fp32 (float64 for float64 inputs).
    Scratch: at most ``TWIN_BLOCK_BYTES`` of G_i blocks (at least one example's p x d).
    """
    B, T, d = a.shape
    p = g.shape[2]
    acc = accumulation_dtype(a.dtype)
    out = torch.empty(B, dtype=acc, device=a.device)
    itemsize = torch.finfo(acc).bits // 8
    step = _examples_per_block(B, itemsize * (p * d + T * (p + d)))
    for s in range(0, B, step):
        a_blk = a[s:s + step].to(acc)  # (b, T, d)
        g_blk = g[s:s + step].to(acc)  # (b, T, p)
        grads = torch.bmm(g_blk.transpose(1, 2), a_blk)  # (b, p, d): G_i = g_i^T a_i
        out[s:s + step] = grads.square().sum(dim=(1, 2))
    return out


def linear_norm2_ghost_torch(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Twin: sum_{t,s} (a_it . a_is)(g_it . g_is), a block of rows t of the Grams at a time.

    a (B, T, d), g (B, T, p) of one dtype; computed in fp32 (float64 for float64 inputs).
    Both Grams are symmetric, so each block of rows [t0, t0 + rows) is multiplied with columns s >= t0
    only: the diagonal block counts once, the blocks right of it twice (as the Triton kernel's tile
    pairs u <= v). With blocks of 64 rows that is 3/4 of the Gram flops at T = 128, 9/16 at T = 256.
    Scratch: two (B, rows, T) Gram blocks within ``TWIN_BLOCK_BYTES``, never all of B x T x T.
    """
    return linear_norm2_ghost_shared_torch(a, [g])[0]


def linear_norm2_ghost_shared_torch(a: torch.Tensor, gs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Twin of :func:`linear_norm2_ghost_shared`: :func:`linear_norm2_ghost_torch` for each g in ``gs``,
    each block of the Gram of ``a`` formed once for all of them."""
    B, T, _ = a.shape
    acc = accumulation_dtype(a.dtype)
    outs = [torch.zeros(B, dtype=acc, device=a.device) for _ in gs]
    if B == 0 or T == 0:
        return outs
    a_acc = a.to(acc)  # (B, T, d)
    g_accs = [g.to(acc) for g in gs]  # (B, T, p_k)
    itemsize = torch.finfo(acc).bits // 8
    rows = max(1, min(T, GHOST_TWIN_ROWS, TWIN_BLOCK_BYTES // (2 * itemsize * B * T)))
    for t0 in range(0, T, rows):
        gram_a = torch.bmm(a_acc[:, t0:t0 + rows], a_acc[:, t0:].transpose(1, 2))  # (B, rows, T - t0)
        for g_acc, out in zip(g_accs, outs):
            gram_g = torch.bmm(g_acc[:, t0:t0 + rows], g_acc[:, t0:].transpose(1, 2))  # (B, rows, T - t0)
            prod = gram_g.mul_(gram_a)
            out += prod[:, :, :rows].sum(dim=(1, 2))  # the diagonal block, once
            if T - t0 > rows:
                out += 2 * prod[:, :, rows:].sum(dim=(1, 2))  # (t, s) and (s, t), s beyond the block
    return outs


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def linear_norm2_instantiated(a: torch.Tensor, g: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """Per-example ||a_i^T g_i||_F^2 = ||g_i^T a_i||_F^2 of a Linear's weight gradient.

    Args:
        a: layer inputs, (B, T, d) (or (B, d), or (B, *, d)).
        g: gradients of the layer outputs, (B, T, p); g_i is example i's own loss gradient.
        impl: "auto" | "triton" | "torch" (see :mod:`ghostdp.kernels.dispatch`).

    Returns:
        (B,) fp32 (float64 for float64 inputs): the squared Frobenius norm of each example's
        weight gradient. The Triton kernel tiles (p, d), loops over T in registers and never
        allocates the (B, p, d) per-example gradients; cost ~ 2 B T p d flops, the same as the
        non-private weight-gradient GEMM.
    """
    op = "linear_norm2_instantiated"
    a, g = as_linear_inputs(a, g, op)
    if resolve_impl(impl, a, g, op=op) == "torch":
        return linear_norm2_instantiated_torch(a, g)

    def kernel() -> torch.Tensor:
        from ghostdp.kernels._linear_norms_triton import instantiated_norm2_triton

        return instantiated_norm2_triton(a.contiguous(), g.contiguous())

    return run_kernel(op, impl, kernel, lambda: linear_norm2_instantiated_torch(a, g))


def linear_norm2_ghost(a: torch.Tensor, g: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """Per-example <a_i a_i^T, g_i g_i^T> = sum_{t,s} (a_it . a_is)(g_it . g_is) (ghost norm).

    Equal to :func:`linear_norm2_instantiated` (the same ||G_i||_F^2), cheaper when
    2 T^2 < p d. The Triton kernel computes the Gram products tile pair by tile pair (u <= v,
    off-diagonal pairs counted twice by symmetry) in fp32 registers; the B x T x T Grams are never
    stored, and fp16 inputs cannot overflow them.

    Args and returns as :func:`linear_norm2_instantiated`.
    """
    op = "linear_norm2_ghost"
    a, g = as_linear_inputs(a, g, op)
    if resolve_impl(impl, a, g, op=op) == "torch":
        return linear_norm2_ghost_torch(a, g)

    def kernel() -> torch.Tensor:
        from ghostdp.kernels._linear_norms_triton import ghost_norm2_triton

        return ghost_norm2_triton(a.contiguous(), g.contiguous())

    return run_kernel(op, impl, kernel, lambda: linear_norm2_ghost_torch(a, g))


def linear_norm2_ghost_shared(a: torch.Tensor, gs: list[torch.Tensor], *,
                              impl: str = "auto") -> list[torch.Tensor]:
    """:func:`linear_norm2_ghost` of several Linear layers that read one input ``a`` (a transformer's
    q/k/v projections, an MLP's gate and up projections): ``[norm2(a, g) for g in gs]``.

    The twin forms each block of the Gram a_i a_i^T once for all of them; the Triton kernel runs per
    layer (it never stores a Gram to share).
    """
    op = "linear_norm2_ghost_shared"
    pairs = [as_linear_inputs(a, g, op) for g in gs]
    if not pairs:
        return []
    a3 = pairs[0][0]
    if len({p[1].dtype for p in pairs}) > 1 or any(p[0].dtype != a3.dtype for p in pairs):
        return [linear_norm2_ghost(a, g, impl=impl) for g in gs]  # mixed dtypes: one at a time
    if resolve_impl(impl, a3, *(p[1] for p in pairs), op=op) == "torch":
        return linear_norm2_ghost_shared_torch(a3, [p[1] for p in pairs])
    return [linear_norm2_ghost(a, g, impl=impl) for g in gs]


def bias_norm2(g: torch.Tensor) -> torch.Tensor:
    """Per-example ||sum_t g_it||^2 of a Linear's bias gradient; g (B, T, p) or (B, p) -> (B,).

    fp32 accumulation (float64 for float64 ``g``). Memory-bound, so a single torch reduction.
    """
    op = "bias_norm2"
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"{op}: g must be a torch.Tensor, got {type(g).__name__}.")
    if g.dim() < 2:
        raise ValueError(f"{op}: g has shape {tuple(g.shape)}; expected (B, T, p) or (B, p).")
    acc = accumulation_dtype(common_float_dtype(g, op=op))
    g3 = g.reshape(g.shape[0], math.prod(g.shape[1:-1]), g.shape[-1])  # (B, T, p)
    summed = g3.sum(dim=1, dtype=acc)  # (B, p)
    return summed.square().sum(dim=1)


# ---------------------------------------------------------------------------------------------
# Cost model for the engine's per-layer choice
# ---------------------------------------------------------------------------------------------

class NormCost(NamedTuple):
    """Work and scratch memory of one per-example norm computation for one layer."""

    flops: int  # multiply-adds count 2
    extra_bytes: int  # scratch beyond the inputs and the (B,) result


def norm_cost(B: int, T: int, d: int, p: int, method: Literal["instantiated", "ghost"],
              impl: Literal["triton", "torch"]) -> NormCost:
    """Flops and extra memory of a Linear's per-example norms by ``method`` with ``impl``.

    - instantiated, triton: 2 B T p d flops; extra memory B x (tiles) fp32 partials only: the
      fused kernel needs no B x p x d buffer.
    - instantiated, torch: same flops; per-example gradients for a block of examples (fp32) plus
      fp32 copies of that block's inputs (bounded by ``TWIN_BLOCK_BYTES``, at least one example).
    - ghost, triton: ~B T^2 (d + p) flops (upper-triangle tile pairs only), partials only.
    - ghost, torch: ~B T^2 (d + p) flops for T >> 64 (blocks of 64 rows meet only the columns from
      their start on; 3/4 of 2 B T^2 (d + p) at T = 128); fp32 copies of a and g plus two (B, rows, T)
      blocks.

    Byte counts assume fp16/bf16 inputs (the fp32 copies are then real) and fp32 accumulation.
    """
    for name, v in (("B", B), ("T", T), ("d", d), ("p", p)):
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"norm_cost: {name} must be an int >= 0, got {v!r}.")
    if method not in ("instantiated", "ghost"):
        raise ValueError(f"norm_cost: method={method!r}; expected 'instantiated' or 'ghost'.")
    if impl not in ("triton", "torch"):
        raise ValueError(f"norm_cost: impl={impl!r}; expected the resolved 'triton' or 'torch' "
                         "(ghostdp.kernels.resolve_impl turns 'auto' into one of them).")
    f32 = 4
    if method == "instantiated":
        flops = 2 * B * T * p * d + 2 * B * p * d
        if impl == "triton":
            return NormCost(flops, B * instantiated_tiles(T, d, p) * f32)
        step = _examples_per_block(B, f32 * (p * d + T * (p + d))) if B else 0
        return NormCost(flops, step * f32 * (p * d + T * (p + d)))
    if impl == "triton":
        rows = ghost_tile_rows(T)
        n_tiles = math.ceil(T / rows)
        n_pairs = n_tiles * (n_tiles + 1) // 2
        flops = B * n_pairs * rows * rows * (2 * (d + p) + 2)
        return NormCost(flops, B * n_pairs * f32 + n_pairs * 2 * 4)
    rows = max(1, min(T, GHOST_TWIN_ROWS, TWIN_BLOCK_BYTES // (2 * f32 * B * T))) if B and T else 0
    # Row block [t0, t0 + rows) meets the columns s >= t0 only (the Grams are symmetric).
    pairs = sum(min(rows, T - t0) * (T - t0) for t0 in range(0, T, rows)) if rows else 0
    flops = 2 * B * pairs * (d + p) + 2 * B * pairs
    return NormCost(flops, f32 * B * T * (d + p) + 2 * f32 * B * rows * T)
