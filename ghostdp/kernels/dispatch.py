"""Choosing between a Triton kernel and its pure-PyTorch twin, and the input checks they share.

Every public kernel function takes ``impl``:

- ``"torch"``: the pure-PyTorch twin. It runs anywhere and *defines* the correct result.
- ``"triton"``: the Triton kernel. On CUDA tensors it is compiled; on CPU tensors it only runs
  under Triton's interpreter (``TRITON_INTERPRET=1`` set before the kernels are first used), which
  is how the test-suite checks the kernels on machines without a GPU. Anything else raises: when
  a user asks for the kernel, ghostdp never quietly runs something else.
- ``"auto"``: the kernel when every tensor is on CUDA, Triton is importable, the interpreter is
  off and the dtype is one the kernel supports (fp16, bf16, fp32); the twin otherwise (CPU
  tensors, float64 reference runs, no Triton). Both compute the same quantity in at least fp32.
  If the kernel then fails to compile or launch (a Triton or driver version, a GPU, a shape the
  kernel was never built for), :func:`run_kernel` warns once (:class:`KernelFallbackWarning`,
  naming the function and the error) and runs the twin, for that call and the rest of the process.

Triton is imported lazily: ``import ghostdp.kernels`` works where Triton is not installed, and the
``@triton.jit`` kernels are only defined (so only then see ``TRITON_INTERPRET``) on first use.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import warnings
from typing import Callable, Literal, TypeVar

import torch

logger = logging.getLogger(__name__)

R = TypeVar("R")

Impl = Literal["auto", "triton", "torch"]
IMPLS: tuple[str, ...] = ("auto", "triton", "torch")

#: dtypes the Triton kernels read (they accumulate in fp32).
TRITON_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
#: dtypes the twins read; float64 is the reference dtype of the tests.
TWIN_DTYPES: tuple[torch.dtype, ...] = TRITON_DTYPES + (torch.float64,)


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` succeeds (cached: the answer cannot change within a process)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set now (Triton reads it when a kernel is defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs, float64 for float64 inputs: never accumulate below fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}: use 'auto' (kernel on CUDA, twin "
                         "elsewhere), 'triton' (the kernel, or an error) or 'torch' (the twin).")


def resolve_impl(impl: str, *tensors: torch.Tensor, op: str,
                 kernel_dtypes: tuple[torch.dtype, ...] = TRITON_DTYPES,
                 ) -> Literal["triton", "torch"]:
    """Turn ``impl`` into ``"triton"`` or ``"torch"`` for these tensors, or raise.

    ``op`` names the calling function in error messages; ``kernel_dtypes`` are the floating
    dtypes its kernel reads. ``"triton"`` is never downgraded: if the kernel cannot run here, the
    error says why and how to fix it.
    """
    check_impl(impl)
    if impl == "torch":
        return "torch"
    on_cuda = all(t.is_cuda for t in tensors)
    dtypes_ok = all(t.dtype in kernel_dtypes for t in tensors if t.is_floating_point())
    if impl == "auto":
        if on_cuda and dtypes_ok and triton_available() and not interpreter_enabled():
            return "triton"
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s(impl='auto'): PyTorch twin (cuda=%s, kernel dtypes=%s, triton=%s, "
                         "interpreter=%s)", op, on_cuda, dtypes_ok, triton_available(),
                         interpreter_enabled())
        return "torch"
    # impl == "triton": run the kernel or explain why it cannot run.
    if not triton_available():
        raise RuntimeError(f"{op}(impl='triton') needs Triton, which is not importable here. "
                           "Install it (`pip install 'ghostdp[kernels]'`) or pass impl='torch'.")
    if not dtypes_ok:
        found = sorted({str(t.dtype) for t in tensors if t.is_floating_point()})
        supported = [str(d) for d in kernel_dtypes]
        raise TypeError(f"{op}(impl='triton') supports {supported} inputs, got {found}. float64 "
                        "is the reference dtype of the GEMM kernels: pass impl='torch' (or "
                        "'auto') to run the float64 twin.")
    if not on_cuda and not interpreter_enabled():
        raise RuntimeError(f"{op}(impl='triton') got CPU tensors, and compiled Triton kernels "
                           "need CUDA tensors. Move the tensors to a GPU, pass impl='torch', or "
                           "set TRITON_INTERPRET=1 before ghostdp's kernels are first used to run "
                           "them (slowly) in Triton's interpreter.")
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{op}: tensors are on different devices {sorted(map(str, devices))}; "
                         "move them to one device.")
    return "triton"


class KernelFallbackWarning(RuntimeWarning):
    """A Triton kernel failed to compile or launch, and ``impl="auto"`` ran its PyTorch twin."""


#: Functions whose kernel failed under impl="auto" in this process -> the error. They run their twin
#: from then on: a compile that failed once fails again, and costs seconds each time.
_failed_kernels: dict[str, str] = {}


def run_kernel(op: str, impl: str, kernel: Callable[[], R], twin: Callable[[], R]) -> R:
    """Run ``kernel()`` (import, compile and launch a Triton kernel); on failure, the twin or raise.

    Call it once :func:`resolve_impl` has chosen ``"triton"``; ``impl`` is what the caller asked
    for. If ``kernel()`` raises (a compile error, "out of resource: shared memory", a missing
    Triton feature):

    - ``impl="auto"``: warn once per ``op`` with :class:`KernelFallbackWarning` (the function and
      the error), then return ``twin()``, now and for the rest of the process. The twin is the
      reference the kernel is tested against, so the result is the same quantity; noise keeps its
      distribution (torch.randn instead of in-kernel Philox) and its seed.
    - ``impl="triton"``: raise RuntimeError naming the function, chained to the error.

    Safe for in-place kernels: Triton raises compile and load errors before the launch that would
    write, so the twin starts from untouched outputs. CUDA out-of-memory is re-raised as it is (the
    twin needs more memory, not less), and so is any error of the twin itself.
    """
    if impl == "auto" and op in _failed_kernels:
        return twin()
    try:
        return kernel()
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        if impl != "auto":
            raise RuntimeError(
                f"{op}(impl='triton'): the Triton kernel failed to compile or launch ({error}). "
                "Pass impl='auto' to run the PyTorch twin instead (same result, slower) or "
                "impl='torch'; please report the error with your GPU and torch/triton versions."
            ) from e
        _failed_kernels[op] = error
        warnings.warn(
            f"{op}: the Triton kernel failed to compile or launch ({error}). impl='auto' runs the "
            "PyTorch twin instead, for the rest of this process: the same quantity (the twin is "
            "the kernel's reference), only slower. Pass impl='triton' to make this an error; "
            "please report it with your GPU and torch/triton versions.",
            KernelFallbackWarning, stacklevel=3)
        return twin()


def check_kernel_mode(kernel: object, device: torch.device, op: str) -> None:
    """Raise if a kernel defined in one Triton mode is about to be launched on the other.

    Triton decides at definition time whether ``@triton.jit`` compiles or interprets. A compiled
    kernel cannot read CPU tensors; setting ``TRITON_INTERPRET=1`` after ghostdp's kernels were
    first used does not change them.
    """
    from triton.runtime.interpreter import InterpretedFunction

    if device.type == "cpu" and not isinstance(kernel, InterpretedFunction):
        raise RuntimeError(f"{op}(impl='triton') on CPU tensors needs the interpreter, but "
                           "ghostdp's Triton kernels were defined before TRITON_INTERPRET=1 was "
                           "set. Set it at the start of the process (before the first kernel "
                           "call), or use CUDA tensors, or pass impl='torch'.")


def common_float_dtype(*tensors: torch.Tensor, op: str) -> torch.dtype:
    """The promoted dtype of the inputs; raise unless it is fp16, bf16, fp32 or fp64."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if dtype not in TWIN_DTYPES:
        raise TypeError(f"{op}: inputs have dtypes {[str(t.dtype) for t in tensors]}; ghostdp "
                        "kernels read float16, bfloat16, float32 or float64. Cast them first.")
    return dtype


def check_same_device(*tensors: torch.Tensor, op: str) -> None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{op}: tensors are on different devices {sorted(map(str, devices))}; "
                         "move them to one device.")
