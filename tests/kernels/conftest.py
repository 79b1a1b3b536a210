"""Kernel tests: the Triton kernels against their twins, the twins against float64 references.

Without CUDA the kernels run in Triton's interpreter. Triton decides compile vs interpret when a
``@triton.jit`` kernel is defined, so TRITON_INTERPRET is set here, at conftest import, before
any test imports the (lazily defined) kernels. With CUDA it is left alone: the kernels compile.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def kernel_device() -> torch.device:
    """Where the Triton kernels can run here: CUDA (compiled) or CPU (interpreter); else skip."""
    pytest.importorskip("triton")
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return torch.device("cpu")
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")


@pytest.fixture(scope="session")
def cuda_device() -> torch.device:
    """For @pytest.mark.gpu tests at real sizes: CUDA with compiled Triton, else skip."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("TRITON_INTERPRET=1: real-size runs need compiled kernels")
    return torch.device("cuda")
