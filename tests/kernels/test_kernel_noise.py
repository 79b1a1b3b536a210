"""Gaussian noise: distribution, independence, reproducibility per seed, precision.

The contract (ghostdp.kernels.noise) is distributional: the kernel's Philox stream and the twin's
torch.randn stream differ, so each is tested on its own against N(0, noise_std^2 scale^2).
Bounds are 5 standard errors of the statistic for n i.i.d. draws (two-sided false-alarm rate
~6e-7 per check), and the seeds are fixed, so the tests are deterministic.
"""

from __future__ import annotations

import math

import pytest
import torch

from ghostdp.kernels import add_noise_, noise_seed
from ghostdp.kernels import noise as noise_module

N_TWIN = 1 << 22  # 4.2M draws for the twin
N_KERNEL = 1 << 18  # 262k draws in the interpreter (~2 s); the GPU run uses the same size


def _stats_ok(z: torch.Tensor, std: float, what: str) -> None:
    z = z.double().flatten().cpu()
    n = z.numel()
    se_mean = std / math.sqrt(n)
    se_std = std / math.sqrt(2 * n)
    assert abs(z.mean().item()) < 5 * se_mean, f"{what}: mean {z.mean().item()} (se {se_mean})"
    assert abs(z.std().item() - std) < 5 * se_std, f"{what}: std {z.std().item()} (se {se_std})"
    # fourth moment: kurtosis 3 for a Gaussian; var of the sample kurtosis ~ 24 / n
    kurt = ((z / z.std()) ** 4).mean().item()
    assert abs(kurt - 3) < 5 * math.sqrt(24 / n), f"{what}: kurtosis {kurt}"
    # tail mass: P(|z| > 3 std) = 0.0026998
    p3 = 0.0026997960632601866
    tail = (z.abs() > 3 * std).double().mean().item()
    assert abs(tail - p3) < 5 * math.sqrt(p3 * (1 - p3) / n), f"{what}: 3-sigma tail {tail}"


def _corr(x: torch.Tensor, y: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([x.double().flatten().cpu(),
                                       y.double().flatten().cpu()]))[0, 1].item()


def _noise(n: int, *, seed: int, impl: str, device, noise_std=1.0, scale=1.0,
           dtype=torch.float32) -> torch.Tensor:
    x = torch.zeros(n, dtype=dtype, device=device)
    return add_noise_(x, noise_std=noise_std, seed=seed, scale=scale, impl=impl)


@pytest.fixture(params=["triton", "torch"])
def impl_device_n(request):
    """(impl, device, n): the twin at 4M draws on CPU, the kernel at 262k where it runs."""
    if request.param == "torch":
        return "torch", torch.device("cpu"), N_TWIN
    return "triton", request.getfixturevalue("kernel_device"), N_KERNEL


def test_mean_std_and_shape_of_the_distribution(impl_device_n):
    impl, device, n = impl_device_n
    z = _noise(n, seed=20240601, impl=impl, device=device, noise_std=2.5, scale=0.4)
    _stats_ok(z, 1.0, impl)


def test_kolmogorov_smirnov(impl_device_n):
    scipy_stats = pytest.importorskip("scipy.stats")
    impl, device, n = impl_device_n
    z = _noise(n, seed=77, impl=impl, device=device).double().cpu().numpy()
    assert scipy_stats.kstest(z, "norm").pvalue > 1e-4


def test_neighbours_are_uncorrelated(impl_device_n):
    impl, device, n = impl_device_n
    z = _noise(n, seed=5, impl=impl, device=device)
    bound = 5 / math.sqrt(n)
    for lag in (1, 2, 3, 4, 1024):  # 4: Philox words; 1024: a kernel block
        assert abs(_corr(z[:-lag], z[lag:])) < bound, f"{impl}: lag {lag}"
    # a (rows, 256) parameter: vertical neighbours too
    grid = z[: (n // 256) * 256].reshape(-1, 256)
    assert abs(_corr(grid[:-1], grid[1:])) < bound


def test_seeds_steps_and_parameters_give_independent_noise(impl_device_n):
    impl, device, n = impl_device_n
    base = 987654321
    seeds = [noise_seed(base, step, param) for step in (0, 1) for param in (0, 1)]
    seeds += [0, 1, 2]  # adjacent raw seeds too
    assert len(set(seeds)) == len(seeds)
    streams = [_noise(n, seed=s, impl=impl, device=device) for s in seeds]
    bound = 5 / math.sqrt(n)
    for i in range(len(streams)):
        for j in range(i + 1, len(streams)):
            assert abs(_corr(streams[i], streams[j])) < bound, (seeds[i], seeds[j])


def test_same_seed_reproduces_exactly(impl_device_n):
    impl, device, n = impl_device_n
    n = min(n, 1 << 16)
    first = _noise(n, seed=31337, impl=impl, device=device)
    assert torch.equal(first, _noise(n, seed=31337, impl=impl, device=device))
    # the kernel keys z by element index: a prefix of a longer tensor is the shorter tensor
    if impl == "triton":
        longer = _noise(n + 1000, seed=31337, impl=impl, device=device)
        assert torch.equal(longer[:n], first)


def test_noise_seed_derivation():
    assert noise_seed(1, 2, 3) == noise_seed(1, 2, 3)
    assert len({noise_seed(1, s, p) for s in range(50) for p in range(50)}) == 2500
    assert noise_seed(1, 2, 3) != noise_seed(1, 3, 2) != noise_seed(2, 2, 3)
    assert noise_seed(1, 12) != noise_seed(1, 1, 2)
    assert 0 <= noise_seed(123, "lm_head.weight", 7) < 2**63
    with pytest.raises(TypeError, match="base_seed"):
        noise_seed(1.5, 2)
    with pytest.raises(TypeError, match="keys"):
        noise_seed(1, 2.0)


def test_fresh_seed_when_none(kernel_device):
    a = _noise(4096, seed=None, impl="triton", device=kernel_device)
    b = _noise(4096, seed=None, impl="triton", device=kernel_device)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_low_precision_grad_is_computed_in_fp32(kernel_device, dtype):
    """grad <- scale * (grad + std * z) rounded ONCE: equals the fp32 computation, rounded."""
    n = 1 << 12
    gen = torch.Generator().manual_seed(3)
    grad = (torch.randn(n, generator=gen) * 3).to(dtype=dtype, device=kernel_device)
    z = _noise(n, seed=42, impl="triton", device=kernel_device)  # fp32 z of the same stream
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    expected = (0.7 * (grad.to(compute) + 1.3 * z.to(compute))).to(dtype)
    got = add_noise_(grad.clone(), noise_std=1.3, seed=42, scale=0.7, impl="triton")
    if dtype == torch.float64:
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    else:  # the fp32 intermediates may differ in the last bit; after rounding, <= 1 ulp
        ulp = torch.finfo(dtype).eps
        torch.testing.assert_close(got.float(), expected.float(), rtol=ulp, atol=ulp)
    twin = add_noise_(grad.clone().cpu(), noise_std=1.3, seed=42, scale=0.7, impl="torch")
    zt = noise_module.randn_twin((n,), seed=42, device=torch.device("cpu"))
    twin_expected = (0.7 * (grad.cpu().to(compute) + 1.3 * zt.to(compute))).to(dtype)
    torch.testing.assert_close(twin, twin_expected, rtol=0, atol=0)


def test_non_contiguous_grad_and_shapes(kernel_device):
    grad = torch.zeros(64, 96, device=kernel_device).T  # (96, 64) view
    add_noise_(grad, noise_std=1.0, seed=9, impl="triton")
    flat = _noise(96 * 64, seed=9, impl="triton", device=kernel_device)
    # keyed by the index in the logical (row-major) order, not by the storage order
    assert torch.equal(grad.reshape(-1), flat)
    twin = torch.zeros(64, 96).T
    add_noise_(twin, noise_std=1.0, seed=9, impl="torch")
    assert torch.equal(twin, noise_module.randn_twin((96, 64), seed=9, device=torch.device("cpu")))


def test_zero_noise_only_scales(kernel_device, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("random numbers drawn with noise_std == 0")

    monkeypatch.setattr(noise_module, "randn_twin", forbidden)
    x = torch.arange(10, dtype=torch.float32, device=kernel_device)
    assert torch.equal(add_noise_(x.clone(), noise_std=0.0, seed=1, scale=0.5, impl="triton"),
                       x * 0.5)
    assert torch.equal(add_noise_(x.clone().cpu(), noise_std=0.0, seed=1, scale=0.5,
                                  impl="torch"), x.cpu() * 0.5)
    empty = torch.zeros(0, device=kernel_device)
    assert add_noise_(empty, noise_std=1.0, seed=1, impl="triton").numel() == 0


def test_validation_errors():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="noise_std"):
        add_noise_(x, noise_std=float("inf"), seed=1)
    with pytest.raises(ValueError, match="seed"):
        add_noise_(x, noise_std=1.0, seed=2**63)
    with pytest.raises(ValueError, match="seed"):
        add_noise_(x, noise_std=1.0, seed=1.0)
    with pytest.raises(TypeError, match="dtype"):
        add_noise_(torch.zeros(4, dtype=torch.int32), noise_std=1.0, seed=1)
    with pytest.raises(ValueError, match="impl"):
        add_noise_(x, noise_std=1.0, seed=1, impl="gpu")


@pytest.mark.gpu
def test_gpu_noise_at_parameter_size(cuda_device):
    """A 4096 x 11008 parameter (45M draws), bf16 grad: distribution, memory, reproducibility."""
    p, d = 11008, 4096
    grad = torch.zeros(p, d, dtype=torch.float32, device=cuda_device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    add_noise_(grad, noise_std=2.0, seed=4242, scale=0.5, impl="triton")
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 1 << 20  # no noise tensor
    _stats_ok(grad, 1.0, "gpu")
    again = add_noise_(torch.zeros_like(grad), noise_std=2.0, seed=4242, scale=0.5, impl="triton")
    assert torch.equal(grad, again)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_twin_draws_in_chunks_the_same_stream_as_one_call(monkeypatch, dtype):
    """The CPU twin draws z chunk by chunk (no gradient-sized z): bit for bit randn_twin's stream, so the
    noise of a seed does not depend on the chunking (sizes around the chunk and 16-element boundaries)."""
    monkeypatch.setattr(noise_module, "NOISE_CHUNK", 64)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    for n in (65, 79, 80, 81, 127, 128, 129, 143, 144, 145, 64 * 7 + 3, 1001):
        grad = torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64).to(dtype)
        z = noise_module.randn_twin((n,), seed=n + 1, device=torch.device("cpu")).to(compute)
        want = ((grad.to(compute) + z * 1.7) * 0.3).to(dtype)
        got = noise_module.add_noise_torch_(grad.clone(), noise_std=1.7, seed=n + 1, scale=0.3)
        assert torch.equal(got, want), n
    grad = torch.randn(40, 30, dtype=torch.float64).to(dtype).T  # non-contiguous, (30, 40)
    z = noise_module.randn_twin((30, 40), seed=5, device=torch.device("cpu")).to(compute)
    want = ((grad.to(compute) + z * 2.0) * 0.5).to(dtype)
    assert torch.equal(noise_module.add_noise_torch_(grad.clone(), noise_std=2.0, seed=5, scale=0.5), want)
