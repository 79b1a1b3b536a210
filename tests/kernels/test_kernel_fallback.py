"""A kernel that fails to compile or launch: impl="auto" warns once and runs the twin, "triton" raises.

No GPU here, so the failure is simulated: the launcher raises what Triton raises for a kernel the
compiler rejects, and ``resolve_impl`` is made to pick the kernel (as "auto" does on CUDA).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from kernel_helpers import make_linear_inputs

from ghostdp.kernels import (
    KernelFallbackWarning,
    add_noise_,
    clipped_sum,
    dispatch,
    linear_clipped_sum,
    linear_norm2_ghost,
    linear_norm2_instantiated,
    linear_norms,
    noise,
)

pytest.importorskip("triton")


class FakeCompilationError(Exception):
    """Stands in for triton.compiler.errors.CompilationError."""


def _fail(*args, **kwargs):
    raise FakeCompilationError("Cannot access global variable _TWO_POW_M32 from within @jit'ed function")


@pytest.fixture
def kernels_fail(monkeypatch):
    """Every launcher raises; resolve_impl picks the kernel unless asked for the twin (as "auto" does
    on CUDA); no failure remembered yet."""
    from ghostdp.kernels import _clipped_sum_triton, _linear_norms_triton, _noise_triton

    monkeypatch.setattr(dispatch, "_failed_kernels", {})
    for module, name in ((_linear_norms_triton, "instantiated_norm2_triton"),
                         (_linear_norms_triton, "ghost_norm2_triton"),
                         (_clipped_sum_triton, "linear_clipped_sum_triton"),
                         (_noise_triton, "add_noise_triton_")):
        monkeypatch.setattr(module, name, _fail)
    for module in (linear_norms, clipped_sum, noise):
        monkeypatch.setattr(module, "resolve_impl",
                            lambda impl, *t, **k: "torch" if impl == "torch" else "triton")


def _calls():
    """(op, run(impl) -> result, twin() -> expected) for each public kernel function."""
    a, g = make_linear_inputs(3, 5, 7, 4, torch.float32, seed=1)
    c = torch.tensor([1.0, 0.5, 0.25])
    out0 = torch.randn(4, 7, generator=torch.Generator().manual_seed(2))
    grad0 = torch.randn(4, 7, generator=torch.Generator().manual_seed(3))

    def clipped(impl):
        out = out0.clone()
        return linear_clipped_sum(a, g, c, out=out, accumulate=True, impl=impl)

    def noisy(impl):
        return add_noise_(grad0.clone(), noise_std=2.0, seed=5, scale=0.25, impl=impl)

    return [
        ("linear_norm2_instantiated", lambda impl: linear_norm2_instantiated(a, g, impl=impl),
         lambda: linear_norm2_instantiated(a, g, impl="torch")),
        ("linear_norm2_ghost", lambda impl: linear_norm2_ghost(a, g, impl=impl),
         lambda: linear_norm2_ghost(a, g, impl="torch")),
        ("linear_clipped_sum", clipped, lambda: clipped("torch")),
        ("add_noise_", noisy, lambda: noisy("torch")),
    ]


OPS = [op for op, _, _ in _calls()]


@pytest.mark.parametrize("op", OPS)
def test_auto_falls_back_to_the_twin_with_one_warning(kernels_fail, op):
    _, run, twin = next(call for call in _calls() if call[0] == op)
    with pytest.warns(KernelFallbackWarning) as record:
        got = run("auto")
    assert len(record) == 1
    message = str(record[0].message)
    assert message.startswith(f"{op}: the Triton kernel failed")
    assert "FakeCompilationError: Cannot access global variable _TWO_POW_M32" in message
    # The same numbers as the twin, bit for bit: in-place outputs were not touched by the kernel.
    torch.testing.assert_close(got, twin(), rtol=0, atol=0)
    # Once per kernel: later calls run the twin silently (and do not retry the compile).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(run("auto"), twin(), rtol=0, atol=0)
    assert set(dispatch._failed_kernels) == {op}


@pytest.mark.parametrize("op", OPS)
def test_triton_raises_naming_the_kernel_and_the_error(kernels_fail, op):
    _, run, _ = next(call for call in _calls() if call[0] == op)
    with pytest.raises(RuntimeError, match=rf"^{op}\(impl='triton'\): the Triton kernel failed") as info:
        run("triton")
    assert isinstance(info.value.__cause__, FakeCompilationError)
    assert "impl='auto'" in str(info.value)
    assert dispatch._failed_kernels == {}


def test_one_failing_kernel_leaves_the_others_on_the_kernel(monkeypatch):
    """The memory of failures is per function: the noise kernel still runs after the norm's failed."""
    monkeypatch.setattr(dispatch, "_failed_kernels", {"linear_norm2_ghost": "FakeCompilationError"})
    launched = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = dispatch.run_kernel("add_noise_", "auto",
                                     lambda: launched.append("kernel") or 1, lambda: 2)
        assert (result, launched) == (1, ["kernel"])
        assert dispatch.run_kernel("linear_norm2_ghost", "auto", _fail, lambda: 2) == 2


def test_out_of_memory_is_not_a_fallback(monkeypatch):
    """The twin needs more memory than the kernel; an OOM must surface, not switch paths."""
    monkeypatch.setattr(dispatch, "_failed_kernels", {})

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        dispatch.run_kernel("linear_clipped_sum", "auto", oom, lambda: 0)
    assert dispatch._failed_kernels == {}
