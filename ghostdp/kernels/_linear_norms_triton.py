"""Triton tier of :mod:`ghostdp.kernels.linear_norms`: per-example squared norms of a Linear's
weight gradient, without materialising per-example gradients or whole T x T Gram matrices.

Imported only on first use. The launchers take validated, contiguous (B, T, d) / (B, T, p)
tensors of one dtype (fp16, bf16 or fp32) on one device; the public functions in
``linear_norms.py`` do the checking.

Both kernels write one fp32 partial sum per (example, tile) and the launcher sums the partials
with ``torch.sum``: deterministic (no atomics), and the partials buffer is tiny (B x tiles floats).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ghostdp.kernels._tiles import LaunchConfig, ghost_blocks, instantiated_blocks
from ghostdp.kernels.dispatch import check_kernel_mode


def dot_config(dtype: torch.dtype, device_type: str) -> dict[str, object]:
    """``tl.dot`` settings for operands of ``dtype`` on ``device_type``: INPUT_PRECISION, UPCAST.

    fp32 operands use full fp32 products ("ieee"), as the twin's fp32 matmul; tf32 would round
    them to 10 mantissa bits. fp16/bf16 products are exact in fp32 accumulation on the GPU.
    Triton's interpreter multiplies bf16 operands as their raw uint16 bits, so there (and only
    there, ``device_type == "cpu"``) bf16 tiles are widened to fp32 before the dot: the same exact
    products, no tensor cores.
    """
    upcast = device_type == "cpu" and dtype == torch.bfloat16
    precision = "ieee" if dtype == torch.float32 or upcast else "tf32"
    return {"INPUT_PRECISION": precision, "UPCAST": upcast}


def instantiated_launch(T: int, d: int, p: int, dtype: torch.dtype,
                        device_type: str) -> LaunchConfig:
    """Constexprs and num_warps of :func:`_instantiated_norm2_kernel` for a (B, T, d), g (B, T, p)."""
    blocks = instantiated_blocks(T, d, p)
    return LaunchConfig(dict(BLOCK_P=blocks.rows, BLOCK_D=blocks.cols, BLOCK_T=blocks.inner,
                             **dot_config(dtype, device_type)), blocks.num_warps)


def ghost_launch(T: int, d: int, p: int, dtype: torch.dtype, device_type: str) -> LaunchConfig:
    """Constexprs and num_warps of :func:`_ghost_norm2_kernel` for a (B, T, d), g (B, T, p)."""
    blocks = ghost_blocks(T, d, p)
    return LaunchConfig(dict(BLOCK_T=blocks.rows, BLOCK_K=blocks.inner,
                             **dot_config(dtype, device_type)), blocks.num_warps)


@triton.jit
def mma(x, y, acc, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + x @ y in fp32 (see :func:`dot_config`)."""
    if UPCAST:
        x = x.to(tl.float32)
        y = y.to(tl.float32)
    return tl.dot(x, y, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _instantiated_norm2_kernel(
    a_ptr, g_ptr, partial_ptr,
    T, D, P, n_tiles_d, n_tiles,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """partial[i, tile] = ||(g_i^T a_i)[tile]||_F^2 for one (BLOCK_P, BLOCK_D) tile.

    Program (tile, i) keeps its tile of g_i^T a_i = sum_t g_it a_it^T in fp32 registers while it
    walks T in BLOCK_T rows, then squares and sums it: the (B, p, d) per-example gradient never
    reaches memory. Tiles vary fastest in the grid, so one example's a_i, g_i stay hot in L2.
    """
    tile = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    offs_p = (tile // n_tiles_d) * BLOCK_P + tl.arange(0, BLOCK_P)  # (BLOCK_P,)
    offs_d = (tile % n_tiles_d) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    mask_p = offs_p < P
    mask_d = offs_d < D
    a_rows = a_ptr + i * T * D
    g_rows = g_ptr + i * T * P
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)  # (BLOCK_T,)
        mask_t = offs_t < T
        g_tile = tl.load(g_rows + offs_t[:, None] * P + offs_p[None, :],
                         mask=mask_t[:, None] & mask_p[None, :], other=0.0)  # (BLOCK_T, BLOCK_P)
        a_tile = tl.load(a_rows + offs_t[:, None] * D + offs_d[None, :],
                         mask=mask_t[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_T, BLOCK_D)
        acc = mma(tl.trans(g_tile), a_tile, acc, INPUT_PRECISION, UPCAST)
    sq = tl.sum(tl.sum(acc * acc, axis=1), axis=0)
    tl.store(partial_ptr + i * n_tiles + tile, sq)


@triton.jit
def _ghost_norm2_kernel(
    a_ptr, g_ptr, pairs_ptr, partial_ptr,
    T, D, P, n_pairs,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """partial[i, k] = w_k sum_{t in tile u, s in tile v} (a_it . a_is)(g_it . g_is).

    Pair k = (u, v), u <= v, of BLOCK_T-row tiles of T; w_k = 2 off the diagonal (the Gram
    matrices are symmetric, so tile (v, u) equals tile (u, v)), 1 on it. The two BLOCK_T x
    BLOCK_T Gram tiles live in fp32 registers (no overflow for fp16 inputs); the B x T x T
    matrices are never stored.
    """
    pair = tl.program_id(0)
    i = tl.program_id(1).to(tl.int64)
    tu = tl.load(pairs_ptr + 2 * pair)
    tv = tl.load(pairs_ptr + 2 * pair + 1)
    offs_u = (tu * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # (BLOCK_T,) rows t
    offs_v = (tv * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # (BLOCK_T,) rows s
    mask_u = offs_u < T
    mask_v = offs_v < T
    a_rows = a_ptr + i * T * D
    g_rows = g_ptr + i * T * P

    gram_a = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)  # a_it . a_is
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < D
        x = tl.load(a_rows + offs_u[:, None] * D + offs_k[None, :],
                    mask=mask_u[:, None] & mask_k[None, :], other=0.0)  # (BLOCK_T, BLOCK_K)
        y = tl.load(a_rows + offs_v[:, None] * D + offs_k[None, :],
                    mask=mask_v[:, None] & mask_k[None, :], other=0.0)  # (BLOCK_T, BLOCK_K)
        gram_a = mma(x, tl.trans(y), gram_a, INPUT_PRECISION, UPCAST)

    gram_g = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)  # g_it . g_is
    for k0 in range(0, P, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < P
        x = tl.load(g_rows + offs_u[:, None] * P + offs_k[None, :],
                    mask=mask_u[:, None] & mask_k[None, :], other=0.0)
        y = tl.load(g_rows + offs_v[:, None] * P + offs_k[None, :],
                    mask=mask_v[:, None] & mask_k[None, :], other=0.0)
        gram_g = mma(x, tl.trans(y), gram_g, INPUT_PRECISION, UPCAST)

    weight = tl.where(tu == tv, 1.0, 2.0)
    tl.store(partial_ptr + i * n_pairs + pair, weight * tl.sum(tl.sum(gram_a * gram_g, axis=1), axis=0))


def instantiated_norm2_triton(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Launcher for :func:`_instantiated_norm2_kernel`; a (B, T, d), g (B, T, p) -> (B,) fp32."""
    check_kernel_mode(_instantiated_norm2_kernel, a.device, "linear_norm2_instantiated")
    B, T, d = a.shape
    p = g.shape[2]
    if B * T * d * p == 0:  # empty batch, sequence or layer: nothing to launch
        return torch.zeros(B, dtype=torch.float32, device=a.device)
    launch = instantiated_launch(T, d, p, a.dtype, a.device.type)
    n_tiles_d = triton.cdiv(d, launch.constexprs["BLOCK_D"])
    n_tiles = triton.cdiv(p, launch.constexprs["BLOCK_P"]) * n_tiles_d
    partial = torch.empty((B, n_tiles), dtype=torch.float32, device=a.device)  # (B, tiles)
    _instantiated_norm2_kernel[(n_tiles, B)](
        a, g, partial, T, d, p, n_tiles_d, n_tiles,
        num_warps=launch.num_warps, **launch.constexprs)
    return partial.sum(dim=1)


@functools.lru_cache(maxsize=64)
def tile_pairs(n_tiles: int, device: torch.device) -> torch.Tensor:
    """The (u, v), u <= v, pairs of ``n_tiles`` tiles, as an int32 (n_pairs, 2) tensor.

    Cached per (n_tiles, device): a layer's T rarely changes, and the copy to the GPU is not free.
    """
    u, v = torch.triu_indices(n_tiles, n_tiles)
    return torch.stack([u, v], dim=1).to(dtype=torch.int32, device=device).contiguous()


def ghost_norm2_triton(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Launcher for :func:`_ghost_norm2_kernel`; a (B, T, d), g (B, T, p) -> (B,) fp32."""
    check_kernel_mode(_ghost_norm2_kernel, a.device, "linear_norm2_ghost")
    B, T, d = a.shape
    p = g.shape[2]
    if B * T * d * p == 0:  # empty batch, sequence or layer: nothing to launch
        return torch.zeros(B, dtype=torch.float32, device=a.device)
    launch = ghost_launch(T, d, p, a.dtype, a.device.type)
    pairs = tile_pairs(triton.cdiv(T, launch.constexprs["BLOCK_T"]), a.device)  # (n_pairs, 2)
    n_pairs = pairs.shape[0]
    partial = torch.empty((B, n_pairs), dtype=torch.float32, device=a.device)  # (B, pairs)
    _ghost_norm2_kernel[(n_pairs, B)](
        a, g, pairs, partial, T, d, p, n_pairs,
        num_warps=launch.num_warps, **launch.constexprs)
    return partial.sum(dim=1)
