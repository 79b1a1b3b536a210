"""Per-example squared norms of a Linear's gradient: kernels vs twins vs float64 references."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import (
    INPUT_TOL,
    assert_close_rel,
    make_linear_inputs,
    reference_norm2,
    tolerance,
)

from ghostdp.kernels import (
    bias_norm2,
    linear_norm2_ghost,
    linear_norm2_instantiated,
    norm_cost,
)
from ghostdp.kernels import linear_norms

NORMS = {"instantiated": linear_norm2_instantiated, "ghost": linear_norm2_ghost}

# (B, T, d, p): primes, empty and single batches, T = 1, rank-sized d or p (LoRA, 1..64), T past
# one tile of the instantiated kernel (32) and of the ghost kernel (64: off-diagonal tile pairs),
# d past one 128-wide tile.
SHAPES = [
    (0, 5, 7, 3),
    (1, 1, 7, 13),
    (1, 13, 37, 7),
    (3, 7, 13, 37),
    (2, 37, 1, 16),  # d = rank 1
    (2, 5, 64, 3),  # d = 64
    (3, 11, 5, 64),  # p = 64
    (4, 17, 13, 1),  # p = 1
    (2, 70, 9, 5),  # two ghost tiles of T
    (1, 3, 131, 2),  # two 128-wide tiles of d
]
KERNEL_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _id(shape):
    return "B{}T{}d{}p{}".format(*shape)


# ---------------------------------------------------------------------------------------------
# Twins against the dumb reference (float64, per-example gradients materialised one at a time)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", list(NORMS))
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_twin_float64_matches_reference(method, shape):
    a, g = make_linear_inputs(*shape, torch.float64, seed=1)
    got = NORMS[method](a, g, impl="torch")
    assert got.dtype == torch.float64
    assert_close_rel(got, reference_norm2(a, g), *INPUT_TOL[torch.float64], msg=method)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("method", list(NORMS))
def test_twin_low_precision_accumulates_in_fp32(method, dtype):
    """Twins on fp32/bf16/fp16 inputs equal the exact norm of those (rounded) inputs to fp32
    accumulation error, and return fp32."""
    a, g = make_linear_inputs(3, 29, 23, 19, dtype, seed=2)
    got = NORMS[method](a, g, impl="torch")
    assert got.dtype == torch.float32
    assert_close_rel(got, reference_norm2(a, g), *INPUT_TOL[torch.float32], msg=method)


def test_ghost_equals_instantiated_float64():
    a, g = make_linear_inputs(4, 23, 11, 17, torch.float64, seed=3)
    assert_close_rel(linear_norm2_ghost(a, g, impl="torch"),
                     linear_norm2_instantiated(a, g, impl="torch"), 1e-12, 1e-10)


@pytest.mark.parametrize("method", list(NORMS))
def test_twin_blocking_does_not_change_the_result(method, monkeypatch):
    """A tiny scratch budget forces the twins to loop over many blocks (examples / rows of T)."""
    a, g = make_linear_inputs(5, 9, 7, 6, torch.float64, seed=4)
    whole = NORMS[method](a, g, impl="torch")
    monkeypatch.setattr(linear_norms, "TWIN_BLOCK_BYTES", 1)
    assert_close_rel(NORMS[method](a, g, impl="torch"), whole, 1e-14, 1e-12)


@pytest.mark.parametrize("T,rows", [(63, 64), (64, 64), (65, 64), (130, 64), (10, 3), (9, 1)])
def test_ghost_twin_symmetric_blocks_match_reference(T, rows, monkeypatch):
    """The ghost twin multiplies each block of Gram rows with the columns from its start on only
    (diagonal block once, the rest twice): exact for blocks that do and do not divide T."""
    monkeypatch.setattr(linear_norms, "GHOST_TWIN_ROWS", rows)
    a, g = make_linear_inputs(3, T, 7, 5, torch.float64, seed=T)
    assert_close_rel(linear_norm2_ghost(a, g, impl="torch"), reference_norm2(a, g), 1e-12, 1e-10)


@pytest.mark.parametrize("T", [1, 9, 130])
def test_ghost_shared_input_matches_reference(T):
    """Several layers reading one input (q/k/v): each norm as if computed alone, Gram of a shared."""
    from ghostdp.kernels import linear_norm2_ghost_shared

    a, _ = make_linear_inputs(3, T, 7, 1, torch.float64, seed=T)
    gs = [make_linear_inputs(3, T, 1, p, torch.float64, seed=T + p)[1] for p in (5, 2, 11)]
    got = linear_norm2_ghost_shared(a, gs, impl="torch")
    assert len(got) == 3
    for g, n2 in zip(gs, got):
        assert_close_rel(n2, reference_norm2(a, g), 1e-12, 1e-10)
    assert linear_norm2_ghost_shared(a, [], impl="torch") == []
    mixed = linear_norm2_ghost_shared(a.float(), [gs[0].float(), gs[1]], impl="torch")  # one at a time
    assert_close_rel(mixed[1], reference_norm2(a.float().double(), gs[1]), *INPUT_TOL[torch.float32])


def test_bias_norm2_matches_reference():
    _, g = make_linear_inputs(5, 7, 1, 13, torch.float64, seed=5)
    expected = g.sum(dim=1).square().sum(dim=1)
    assert_close_rel(bias_norm2(g), expected, 1e-14, 1e-12)
    assert bias_norm2(g.float()).dtype == torch.float32
    assert bias_norm2(g.bfloat16()).dtype == torch.float32
    assert bias_norm2(g[:0]).shape == (0,)
    assert_close_rel(bias_norm2(g[:, 0]), g[:, 0].square().sum(dim=1), 1e-14, 1e-12)


@pytest.mark.parametrize("method", list(NORMS))
def test_input_forms(method):
    """(B, d) reads as T = 1; (B, H, W, d) flattens H, W into T; mixed dtypes are promoted."""
    a, g = make_linear_inputs(3, 6, 5, 4, torch.float64, seed=6)
    f = NORMS[method]
    assert_close_rel(f(a[:, 0], g[:, 0], impl="torch"), reference_norm2(a[:, :1], g[:, :1]),
                     1e-12, 1e-10)
    assert_close_rel(f(a.reshape(3, 2, 3, 5), g.reshape(3, 2, 3, 4), impl="torch"),
                     reference_norm2(a, g), 1e-12, 1e-10)
    mixed = f(a.bfloat16(), g.float(), impl="torch")  # bf16 activations, fp32 gradients
    assert mixed.dtype == torch.float32
    assert_close_rel(mixed, reference_norm2(a.bfloat16(), g.float()), 1e-6, 1e-5)


# ---------------------------------------------------------------------------------------------
# Kernels against twins
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("method", list(NORMS))
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_kernel_matches_twin(kernel_device, shape, method, dtype):
    a, g = make_linear_inputs(*shape, dtype, seed=7, device=kernel_device)
    got = NORMS[method](a, g, impl="triton")
    want = NORMS[method](a, g, impl="torch")
    assert got.dtype == torch.float32 and got.shape == (shape[0],)
    assert_close_rel(got, want, *tolerance(dtype), msg=f"{method} {dtype} {shape}")


@pytest.mark.parametrize("method", list(NORMS))
def test_kernel_non_contiguous_inputs(kernel_device, method):
    """Transposed views (e.g. activations stored (T, B, d)) are made contiguous by the launcher."""
    a, g = make_linear_inputs(7, 3, 13, 5, torch.float32, seed=8, device=kernel_device)
    a_t = a.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    g_t = g.transpose(0, 1).contiguous().transpose(0, 1)
    assert not a_t.is_contiguous() and not g_t.is_contiguous()
    f = NORMS[method]
    assert_close_rel(f(a_t, g_t, impl="triton"), f(a, g, impl="torch"), *tolerance(torch.float32))


def test_kernel_fp16_gram_entries_beyond_fp16_range(kernel_device):
    """fp16 inputs whose Gram products exceed 65504: fp32 accumulation keeps the norms finite."""
    a, g = make_linear_inputs(2, 5, 37, 29, torch.float64, seed=9)
    a, g = (a * 60).half().to(kernel_device), (g * 60).half().to(kernel_device)
    expected = reference_norm2(a, g)
    assert expected.max() > 1e10  # far past fp16's range
    for method, f in NORMS.items():
        got = f(a, g, impl="triton")
        assert torch.isfinite(got).all(), method
        assert_close_rel(got.cpu(), expected.float(), *INPUT_TOL[torch.float16], msg=method)


def test_kernel_rejects_float64(kernel_device):
    a, g = make_linear_inputs(2, 3, 4, 5, torch.float64, device=kernel_device)
    for f in NORMS.values():
        with pytest.raises(TypeError, match="impl='torch'"):
            f(a, g, impl="triton")


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", list(NORMS))
def test_validation_errors(method):
    f = NORMS[method]
    a, g = make_linear_inputs(2, 3, 4, 5, torch.float32)
    with pytest.raises(ValueError, match="every dimension but the last"):
        f(a, g[:1])
    with pytest.raises(ValueError, match="expected"):
        f(a[0, 0], g[0, 0])
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        f(a.to(torch.int32), g.to(torch.int32))
    with pytest.raises(ValueError, match="impl="):
        f(a, g, impl="cuda")
    with pytest.raises(TypeError, match="torch.Tensor"):
        f(a.numpy(), g)


# ---------------------------------------------------------------------------------------------
# Cost model
# ---------------------------------------------------------------------------------------------

def test_norm_cost_fused_instantiation_needs_no_per_example_gradients():
    B, T, d, p = 32, 1024, 4096, 11008
    fused = norm_cost(B, T, d, p, "instantiated", "triton")
    twin = norm_cost(B, T, d, p, "instantiated", "torch")
    assert fused.flops == twin.flops >= 2 * B * T * d * p
    assert fused.extra_bytes < 1e-3 * B * p * d * 4  # partials only
    assert twin.extra_bytes >= p * d * 4  # at least one example's gradient


def test_norm_cost_ghost_scales_with_t_squared():
    small = norm_cost(8, 256, 4096, 4096, "ghost", "triton")
    big = norm_cost(8, 1024, 4096, 4096, "ghost", "triton")
    assert 12 < big.flops / small.flops < 16  # ~16x, less the diagonal tiles counted once
    # both do the upper triangle of the Grams only (kernel: tile pairs; twin: row blocks from the diagonal)
    twin = norm_cost(8, 1024, 4096, 4096, "ghost", "torch")
    assert 0.9 < big.flops / twin.flops < 1.1
    assert norm_cost(8, 128, 4096, 4096, "ghost", "torch").flops == 3 * 8 * 64 * 64 * (2 * 8192 + 2)
    assert twin.extra_bytes >= 8 * 1024 * (4096 + 4096) * 4
    # LoRA at T = 4096, r = 16, d = 4096 (docs/design.md): instantiating is far cheaper than ghost
    lora_inst = norm_cost(8, 4096, 4096, 16, "instantiated", "triton")
    lora_ghost = norm_cost(8, 4096, 4096, 16, "ghost", "triton")
    assert lora_ghost.flops > 100 * lora_inst.flops


def test_norm_cost_validation():
    assert norm_cost(0, 7, 3, 2, "ghost", "torch") == (0, 0)
    with pytest.raises(ValueError, match="method"):
        norm_cost(1, 2, 3, 4, "exact", "torch")
    with pytest.raises(ValueError, match="resolve_impl"):
        norm_cost(1, 2, 3, 4, "ghost", "auto")
    with pytest.raises(ValueError, match="B must be"):
        norm_cost(-1, 2, 3, 4, "ghost", "torch")


# ---------------------------------------------------------------------------------------------
# GPU, real sizes (Llama-2-7B layers)
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("T", [256, 1024])
@pytest.mark.parametrize("p", [4096, 11008])
def test_gpu_llama7b_norms(cuda_device, p, T):
    B, d = 4, 4096
    a, g = make_linear_inputs(B, T, d, p, torch.bfloat16, seed=10, device=cuda_device)
    twin = linear_norm2_instantiated(a, g, impl="torch")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fused = linear_norm2_instantiated(a, g, impl="triton")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 0.01 * B * p * d * 4, f"fused kernel used {extra} bytes"
    assert_close_rel(fused, twin, *tolerance(torch.bfloat16))
    ghost = linear_norm2_ghost(a, g, impl="triton")
    assert_close_rel(ghost, linear_norm2_ghost(a, g, impl="torch"), *tolerance(torch.bfloat16))
    assert_close_rel(ghost, fused, 1e-4, 1e-4)  # two routes to the same norm, both fp32


@pytest.mark.gpu
@pytest.mark.parametrize("r", [1, 16, 64])
def test_gpu_lora_norms(cuda_device, r):
    B, T, d = 8, 1024, 4096
    for shape in [(B, T, d, r), (B, T, r, d)]:  # lora_A: (r, d) weight; lora_B: (d, r)
        a, g = make_linear_inputs(*shape, torch.bfloat16, seed=11, device=cuda_device)
        for f in NORMS.values():
            assert_close_rel(f(a, g, impl="triton"), f(a, g, impl="torch"),
                             *tolerance(torch.bfloat16))


@pytest.mark.parametrize("shape", [(2, 0, 5, 3), (2, 4, 0, 3), (2, 4, 5, 0)], ids=_id)
def test_empty_sequence_or_features_give_zero_norms(kernel_device, shape):
    a, g = make_linear_inputs(*shape, torch.float32, device=kernel_device)
    for method, f in NORMS.items():
        for impl in ("triton", "torch"):
            got = f(a, g, impl=impl)
            assert got.shape == (2,) and not got.any(), (method, impl)
