"""Through the engine: impl="auto" that resolves to a Triton kernel keeps the kernel's fallback.

A kernel that fails to compile or launch under the engine's impl="auto" runs its twin with one
``KernelFallbackWarning`` and the step is the twins' step; impl="triton" raises naming the kernel. No GPU
here, so "auto" is made to pick the kernels (as it does on CUDA) and one launcher is made to raise what
Triton raises for a kernel the compiler rejects; the other kernels run in the interpreter.
"""
from __future__ import annotations

import pytest
import torch

from ghostdp import kernels
from ghostdp.kernels import KernelFallbackWarning, clipped_sum, dispatch, linear_norms, noise
from tests.kernels.test_engine_kernels import dp_step
from tests.helpers import tiny_llama

pytest.importorskip("triton")


class FakeCompilationError(Exception):
    """Stands in for triton.compiler.errors.CompilationError."""


def _fail(*args, **kwargs):
    raise FakeCompilationError("Cannot access global variable _TWO_POW_M32 from within @jit'ed function")


# (launcher module, launcher, public op it serves, clipping that reaches it, sigma)
CASES = [
    ("_linear_norms_triton", "instantiated_norm2_triton", "linear_norm2_instantiated", "per_sample", 0.0),
    ("_linear_norms_triton", "ghost_norm2_triton", "linear_norm2_ghost", "ghost", 0.0),
    ("_clipped_sum_triton", "linear_clipped_sum_triton", "linear_clipped_sum", "ghost", 0.0),
    ("_noise_triton", "add_noise_triton_", "add_noise_", "ghost", 2.0),
]


@pytest.fixture
def auto_picks_kernels(monkeypatch, kernel_device):
    """resolve_impl picks the kernel unless asked for the twin, in the engine and in the kernels."""
    if kernel_device.type != "cpu":
        pytest.skip("simulated on CPU; on a GPU 'auto' already picks the kernels")
    monkeypatch.setattr(dispatch, "_failed_kernels", {})

    def pick(impl, *tensors, **kwargs):
        dispatch.check_impl(impl)
        return "torch" if impl == "torch" else "triton"

    for module in (kernels, linear_norms, clipped_sum, noise):
        monkeypatch.setattr(module, "resolve_impl", pick)


def _break(monkeypatch, module: str, launcher: str) -> None:
    import importlib

    monkeypatch.setattr(importlib.import_module(f"ghostdp.kernels.{module}"), launcher, _fail)


@pytest.mark.parametrize("module,launcher,op,clipping,sigma", CASES, ids=[c[2] for c in CASES])
def test_engine_auto_falls_back_with_one_warning(auto_picks_kernels, monkeypatch, module, launcher, op,
                                                 clipping, sigma):
    model = tiny_llama(True, bias=True, dtype=torch.float32)
    _break(monkeypatch, module, launcher)
    with pytest.warns(KernelFallbackWarning) as record:
        got = dp_step(model, "auto", sigma=sigma, clipping=clipping, seed=3)
    fallbacks = [w for w in record if issubclass(w.category, KernelFallbackWarning)]
    assert len(fallbacks) == 1, [str(w.message) for w in fallbacks]
    message = str(fallbacks[0].message)
    assert message.startswith(f"{op}: the Triton kernel failed") and "FakeCompilationError" in message
    assert set(dispatch._failed_kernels) == {op}
    # The step is the twins' step (the noise too: the twin draws it from the same seed).
    want = dp_step(model, "torch", sigma=sigma, clipping=clipping, seed=3)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=2e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("module,launcher,op,clipping,sigma", CASES, ids=[c[2] for c in CASES])
def test_engine_triton_raises_naming_the_kernel(auto_picks_kernels, monkeypatch, module, launcher, op,
                                                clipping, sigma):
    model = tiny_llama(True, bias=True, dtype=torch.float32)
    _break(monkeypatch, module, launcher)
    with pytest.raises(RuntimeError, match=rf"^{op}\(impl='triton'\): the Triton kernel failed") as info:
        dp_step(model, "triton", sigma=sigma, clipping=clipping, seed=3)
    assert isinstance(info.value.__cause__, FakeCompilationError)
    assert dispatch._failed_kernels == {}
