"""impl resolution: "auto" picks, "triton" runs or raises (never a silent fallback)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from ghostdp.kernels import dispatch, linear_clipped_sum, linear_norm2_instantiated, resolve_impl


def test_auto_on_cpu_is_the_twin():
    x = torch.zeros(2, 3)
    assert resolve_impl("auto", x, op="t") == "torch"
    assert resolve_impl("torch", x, op="t") == "torch"


def test_unknown_impl_raises():
    with pytest.raises(ValueError, match="'auto'"):
        resolve_impl("fast", torch.zeros(1), op="t")


def test_triton_without_triton_raises(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="not importable"):
        resolve_impl("triton", torch.zeros(1), op="t")
    assert resolve_impl("auto", torch.zeros(1), op="t") == "torch"


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_impl("triton", torch.zeros(1), op="t")


def test_auto_on_cuda_picks_the_kernel_for_fp16_bf16_fp32_only():
    if not torch.cuda.is_available() or not dispatch.triton_available():
        pytest.skip("needs CUDA and Triton")
    if dispatch.interpreter_enabled():
        pytest.skip("auto never picks the interpreter")
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert resolve_impl("auto", torch.zeros(1, dtype=dtype, device="cuda"), op="t") == "triton"
    assert resolve_impl("auto", torch.zeros(1, dtype=torch.float64, device="cuda"), op="t") == "torch"


def test_kernel_defined_in_compiled_mode_refuses_cpu_tensors(monkeypatch):
    """If the kernels were defined before TRITON_INTERPRET=1, CPU launches fail with a fix."""
    pytest.importorskip("triton")

    class NotInterpreted:
        pass

    with pytest.raises(RuntimeError, match="before TRITON_INTERPRET=1 was set"):
        dispatch.check_kernel_mode(NotInterpreted(), torch.device("cpu"), "op")


def test_package_imports_and_twins_run_without_triton():
    """`import ghostdp.kernels` must not need Triton; impl='triton' then raises, 'auto' runs."""
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch
        import ghostdp.kernels as k
        assert not k.triton_available()
        a, g = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
        n = k.linear_norm2_instantiated(a, g)
        s = k.linear_clipped_sum(a, g, torch.ones(2))
        k.add_noise_(torch.zeros(3), noise_std=1.0, seed=2)
        try:
            k.linear_norm2_ghost(a, g, impl="triton")
        except RuntimeError as e:
            assert "not importable" in str(e)
        else:
            raise SystemExit("impl='triton' ran without triton")
        print("ok", tuple(n.shape), tuple(s.shape))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "ok (2,) (5, 4)" in res.stdout


def test_mixed_devices_raise():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device type")
    with pytest.raises(ValueError, match="different devices"):
        linear_norm2_instantiated(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4, device="cuda"))
    with pytest.raises(ValueError, match="one device"):
        linear_clipped_sum(torch.zeros(1, 2, 3, device="cuda"), torch.zeros(1, 2, 4, device="cuda"),
                           torch.ones(1))
