"""Tile sizes of the Triton kernels, in plain Python so the cost model needs no Triton.

Fixed heuristics rather than ``triton.autotune``: every size is a power of two >= 16 (what
``tl.dot`` needs), capped by the problem size so rank-sized dimensions (LoRA, r = 1..64) do not
pay for 128-wide tiles. Revisit with autotuning once measured on the target GPUs.
"""

from __future__ import annotations

import math
from typing import NamedTuple


class Blocks(NamedTuple):
    """Tile sizes of one launch."""

    rows: int  # BLOCK_P (instantiated, clipped sum) or BLOCK_T (ghost)
    cols: int  # BLOCK_D (instantiated, clipped sum) or BLOCK_T (ghost, same as rows)
    inner: int  # chunk of the reduced dimension: BLOCK_T (instantiated, clipped sum), BLOCK_K (ghost)
    num_warps: int


def pow2_block(n: int, cap: int) -> int:
    """Smallest power of two >= n, clamped to [16, cap]."""
    return max(16, min(cap, 1 << max(n - 1, 0).bit_length()))


def instantiated_blocks(T: int, d: int, p: int) -> Blocks:
    """Tiles of g_i^T a_i: up to 128 x 128 outputs, T consumed 32 rows at a time."""
    rows, cols = pow2_block(p, 128), pow2_block(d, 128)
    return Blocks(rows, cols, pow2_block(T, 32), 8 if rows * cols >= 128 * 128 else 4)


def instantiated_tiles(T: int, d: int, p: int) -> int:
    """Number of (p, d) tiles, i.e. fp32 partials per example, of the instantiated-norm kernel."""
    b = instantiated_blocks(T, d, p)
    return math.ceil(p / b.rows) * math.ceil(d / b.cols)


def ghost_blocks(T: int, d: int, p: int) -> Blocks:
    """(t, s) tiles of the Gram matrices: up to 64 x 64, features consumed 64 at a time."""
    rows = pow2_block(T, 64)
    return Blocks(rows, rows, pow2_block(max(d, p), 64), 8 if rows >= 64 else 4)


def ghost_tile_rows(T: int) -> int:
    return pow2_block(T, 64)


def clipped_sum_blocks(T: int, d: int, p: int) -> Blocks:
    """Output tiles of sum_i c_i g_i^T a_i: up to 128 x 64, T consumed 32 rows at a time.

    Half the instantiated kernel's tile: each program holds two fp32 accumulators (g_i^T a_i and
    the running sum), and 2 x 128 x 64 fp32 over 8 warps is 64 registers a thread.
    """
    rows, cols = pow2_block(p, 128), pow2_block(d, 64)
    return Blocks(rows, cols, pow2_block(T, 32), 8 if rows * cols >= 128 * 64 else 4)


#: Problem sizes that reach every tile the functions above can choose: each depends on a size n
#: only through ``pow2_block(n, cap)``, i.e. through the smallest power of two >= n, and every cap
#: is <= 2**16, so sweeping the powers of two up to 2**16 visits every (rows, cols, inner) they can
#: return. The ahead-of-time compile matrix (:mod:`ghostdp.kernels.aot`) enumerates with it.
SIZE_CLASSES: tuple[int, ...] = tuple(1 << k for k in range(17))


class LaunchConfig(NamedTuple):
    """What a launcher hands Triton besides the tensors: the constexpr arguments and num_warps.

    Each launcher builds it with one function of the problem (sizes, dtypes, flags), so the
    ahead-of-time compile test can call the same function over every input it can see.
    """

    constexprs: dict[str, object]
    num_warps: int
