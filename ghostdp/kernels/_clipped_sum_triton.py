"""Triton tier of :mod:`ghostdp.kernels.clipped_sum`: the clipped weight-gradient sum of a Linear
layer, written straight into the gradient buffer.

    out (+)= sum_i c_i g_i^T a_i

Imported only on first use; ``clipped_sum.py`` validates the arguments.

Each program owns one (BLOCK_P, BLOCK_D) tile of the output. For every example i it forms
g_i^T a_i over T in an fp32 register tile, then adds c_i times it to a second fp32 tile: the
clip factor multiplies an fp32 result instead of rounding c_i * g_i to the input dtype (which
could push a clipped gradient past the clipping norm). The result is rounded once into ``out``;
no fp32 copy of ``out`` exists. (No noise: the engine adds it once per step, after every physical
batch, with :func:`ghostdp.kernels.add_noise_`.)

When the output has fewer tiles than the GPU has SMs (LoRA: p or d = r), the examples are split
over ``splits`` programs per tile writing fp32 partial tiles to a (splits, p, d) workspace, and a
second elementwise kernel sums them and writes ``out``.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from ghostdp.kernels._linear_norms_triton import dot_config, mma
from ghostdp.kernels._tiles import LaunchConfig, clipped_sum_blocks
from ghostdp.kernels.dispatch import check_kernel_mode

logger = logging.getLogger(__name__)


@triton.jit
def _finish(out_ptr, offs, mask, acc, ACCUMULATE: tl.constexpr, OUT_FP64: tl.constexpr):
    """out[offs] (+)= acc; one rounding into out's dtype.

    ``offs`` are int64 flat indices row * d + col into the contiguous (p, d) output. Accumulation
    into ``out`` is in fp32, or fp64 for a float64 ``out``.
    """
    if OUT_FP64:
        res = acc.to(tl.float64)
    else:
        res = acc
    if ACCUMULATE:
        res = res + tl.load(out_ptr + offs, mask=mask, other=0.0).to(res.dtype)
    tl.store(out_ptr + offs, res.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _clipped_sum_kernel(
    a_ptr, g_ptr, c_ptr, out_ptr, work_ptr,
    B, T, D, P, n_tiles_d, examples_per_split,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SPLIT: tl.constexpr, ACCUMULATE: tl.constexpr,
    OUT_FP64: tl.constexpr,
):
    """One (BLOCK_P, BLOCK_D) tile of sum_{i in split} c_i g_i^T a_i, in fp32.

    SPLIT False: one split holds every example; finish the tile into ``out``.
    SPLIT True: store the partial tile to work[split] for :func:`_finish_splits_kernel`.
    """
    tile = tl.program_id(0)
    split = tl.program_id(1)
    offs_p = (tile // n_tiles_d) * BLOCK_P + tl.arange(0, BLOCK_P)  # (BLOCK_P,)
    offs_d = (tile % n_tiles_d) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    mask_p = offs_p < P
    mask_d = offs_d < D
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)  # sum_i c_i g_i^T a_i
    i_start = split * examples_per_split
    i_stop = tl.minimum(i_start + examples_per_split, B)
    for i in range(i_start, i_stop):
        a_rows = a_ptr + tl.cast(i, tl.int64) * T * D
        g_rows = g_ptr + tl.cast(i, tl.int64) * T * P
        grad = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)  # g_i^T a_i
        for t0 in range(0, T, BLOCK_T):
            offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)  # (BLOCK_T,)
            mask_t = offs_t < T
            g_tile = tl.load(g_rows + offs_t[:, None] * P + offs_p[None, :],
                             mask=mask_t[:, None] & mask_p[None, :], other=0.0)  # (BLOCK_T, BLOCK_P)
            a_tile = tl.load(a_rows + offs_t[:, None] * D + offs_d[None, :],
                             mask=mask_t[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_T, BLOCK_D)
            grad = mma(tl.trans(g_tile), a_tile, grad, INPUT_PRECISION, UPCAST)
        acc += tl.load(c_ptr + i).to(tl.float32) * grad
    offs = offs_p.to(tl.int64)[:, None] * D + offs_d[None, :]  # (BLOCK_P, BLOCK_D) flat indices
    mask = mask_p[:, None] & mask_d[None, :]
    if SPLIT:
        tl.store(work_ptr + split.to(tl.int64) * P * D + offs, acc, mask=mask)
    else:
        _finish(out_ptr, offs, mask, acc, ACCUMULATE, OUT_FP64)


@triton.jit
def _finish_splits_kernel(
    work_ptr, out_ptr, n, n_splits,
    BLOCK: tl.constexpr, ACCUMULATE: tl.constexpr, OUT_FP64: tl.constexpr,
):
    """out (+)= sum_s work[s], elementwise over the p * d entries."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, n_splits):
        acc += tl.load(work_ptr + s * n + offs, mask=mask, other=0.0)
    _finish(out_ptr, offs, mask, acc, ACCUMULATE, OUT_FP64)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # interpreter: splitting only adds work


def choose_splits(n_tiles: int, B: int, device: torch.device) -> int:
    """How many programs share one output tile's examples: enough tiles to fill the SMs twice."""
    want = -(-2 * _sm_count(device) // max(n_tiles, 1))
    return max(1, min(B, want, 64))


def clipped_sum_launch(T: int, d: int, p: int, dtype: torch.dtype, device_type: str, *,
                       split: bool, accumulate: bool,
                       out_dtype: torch.dtype) -> LaunchConfig:
    """Constexprs and num_warps of :func:`_clipped_sum_kernel` for a (B, T, d), g (B, T, p).

    With ``split`` the kernel only stores fp32 partial tiles (the epilogue runs in
    :func:`_finish_splits_kernel`), so the epilogue flags are fixed to False there: one compiled
    variant per tile and dtype instead of one per (accumulate, output dtype) as well.
    """
    blocks = clipped_sum_blocks(T, d, p)
    flags = (dict(ACCUMULATE=False, OUT_FP64=False) if split else
             dict(ACCUMULATE=accumulate, OUT_FP64=out_dtype == torch.float64))
    return LaunchConfig(dict(BLOCK_P=blocks.rows, BLOCK_D=blocks.cols, BLOCK_T=blocks.inner,
                             **dot_config(dtype, device_type), SPLIT=split, **flags),
                        blocks.num_warps)


#: Elements per program of the elementwise epilogue kernel.
FINISH_BLOCK = 1024


def finish_splits_launch(*, accumulate: bool, out_dtype: torch.dtype) -> LaunchConfig:
    """Constexprs and num_warps of :func:`_finish_splits_kernel` (Triton's default 4 warps)."""
    return LaunchConfig(dict(BLOCK=FINISH_BLOCK, ACCUMULATE=accumulate,
                             OUT_FP64=out_dtype == torch.float64), 4)


def linear_clipped_sum_triton(a: torch.Tensor, g: torch.Tensor, c: torch.Tensor, out: torch.Tensor,
                              *, accumulate: bool, splits: int | None = None) -> None:
    """Launcher. a (B, T, d), g (B, T, p) contiguous, one dtype; c (B,) float32 or float64; out
    (p, d) contiguous, written (accumulate False) or accumulated into. ``splits`` overrides the
    split heuristic (tests use it to exercise both paths).

    ``c`` is passed as float32: the kernel reads c_i in fp32 either way (a float64 c_i is rounded
    to nearest, as here), and one pointer dtype means one compiled variant fewer.
    """
    check_kernel_mode(_clipped_sum_kernel, a.device, "linear_clipped_sum")
    B, T, d = a.shape
    p = g.shape[2]
    if p * d == 0:
        return
    c = c.to(torch.float32)  # (B,)
    blocks = clipped_sum_blocks(T, d, p)
    n_tiles_d = triton.cdiv(d, blocks.cols)
    n_tiles = triton.cdiv(p, blocks.rows) * n_tiles_d
    if splits is None:
        n_splits = choose_splits(n_tiles, B, a.device)
    else:
        n_splits = max(1, min(splits, max(B, 1)))
    per_split = triton.cdiv(B, n_splits) if B else 0
    logger.debug("linear_clipped_sum: (p, d) = (%d, %d), %d tiles of %s, %d split(s) of %d "
                 "examples", p, d, n_tiles, blocks, n_splits, per_split)
    flags = dict(accumulate=accumulate, out_dtype=out.dtype)
    launch = clipped_sum_launch(T, d, p, a.dtype, a.device.type, split=n_splits > 1, **flags)
    if n_splits == 1:
        _clipped_sum_kernel[(n_tiles, 1)](
            a, g, c, out, out, B, T, d, p, n_tiles_d, per_split,
            num_warps=launch.num_warps, **launch.constexprs)
        return
    work = torch.empty((n_splits, p, d), dtype=torch.float32, device=a.device)  # partial tiles
    # out_ptr is unused when SPLIT: pass the workspace, so the variant does not depend on out's dtype.
    _clipped_sum_kernel[(n_tiles, n_splits)](
        a, g, c, work, work, B, T, d, p, n_tiles_d, per_split,
        num_warps=launch.num_warps, **launch.constexprs)
    finish = finish_splits_launch(**flags)
    _finish_splits_kernel[(triton.cdiv(p * d, FINISH_BLOCK),)](
        work, out, p * d, n_splits,
        num_warps=finish.num_warps, **finish.constexprs)
