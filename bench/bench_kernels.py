"""Benchmarks of ghostdp's kernels at Llama-2-7B Linear shapes (CUDA) or tiny shapes (CPU).

    .venv/bin/python -m pytest bench/bench_kernels.py --benchmark-only -q

Per-example norms: the fused instantiated-norm kernel and the ghost kernel against their PyTorch
twins and against the weight-gradient GEMM of non-private training, g.flatten(0,1)^T a.flatten(0,1)
(the same 2 B T p d flops as the fused kernel, so the ratio is the price of the norms).
Clipped sum: the fused kernel (clip, sum, accumulate into the gradient) against its twin (fp32
GEMMs) and the clip-weighted GEMM in the input dtype plus an add an unfused engine would run. (The
step noise is added once per step by add_noise_, not per physical batch: not benchmarked here.)

On CPU only the twins and baselines run (Triton's interpreter is not a benchmark), in fp32 at tiny
shapes: a smoke test of the harness, not a measurement to quote.
Results go to bench/results/kernels_<device>.{json,md} with the device, versions and git commit;
peak memory above the inputs is torch.cuda.max_memory_allocated on CUDA (not measured on CPU,
where the cost model's extra bytes are reported instead).
"""

from __future__ import annotations

import datetime
import json
import logging
import platform
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from ghostdp.integrations.bench.results import format_bytes
from ghostdp.kernels import (
    linear_clipped_sum,
    linear_norm2_ghost,
    linear_norm2_instantiated,
    norm_cost,
    triton_available,
)

logger = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# bf16 on CUDA (the training dtype); fp32 on CPU, where bf16 GEMMs are usually emulated and would
# time the emulation rather than the algorithm.
DTYPE = torch.bfloat16 if CUDA else torch.float32
ROUNDS = 10


@dataclass(frozen=True)
class Case:
    B: int
    T: int
    d: int
    p: int

    @property
    def id(self) -> str:
        return f"B{self.B}-T{self.T}-d{self.d}-p{self.p}"


def _cases() -> list[Case]:
    if CUDA:  # Llama-2-7B: attention / o_proj (4096 x 4096) and MLP (11008 x 4096) weights
        return [Case(B, T, 4096, p) for p in (4096, 11008) for T in (256, 1024, 4096)
                for B in (1, 8, 32)]
    return [Case(B, T, 256, p) for p in (256, 688) for T in (64, 256) for B in (1, 4)]


CASES = _cases()


@dataclass
class Inputs:
    a: torch.Tensor  # (B, T, d)
    g: torch.Tensor  # (B, T, p)
    c: torch.Tensor  # (B,)
    out: torch.Tensor  # (p, d) fp32 gradient buffer


def setup_inputs(case: Case) -> Inputs:
    """One setup for the speed and the memory runs."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    a = torch.randn(case.B, case.T, case.d, generator=gen, device=DEVICE, dtype=DTYPE)
    g = torch.randn(case.B, case.T, case.p, generator=gen, device=DEVICE, dtype=DTYPE)
    c = torch.rand(case.B, generator=gen, device=DEVICE, dtype=torch.float32)
    out = torch.zeros(case.p, case.d, device=DEVICE, dtype=torch.float32)
    return Inputs(a, g, c, out)


# ---------------------------------------------------------------------------------------------
# What is timed
# ---------------------------------------------------------------------------------------------

def _weight_grad_gemm(x: Inputs) -> torch.Tensor:
    """Non-private training's weight gradient: sum over the batch, no per-example anything."""
    return x.g.flatten(0, 1).T @ x.a.flatten(0, 1)  # (p, d)


def _gemm_plus_add(x: Inputs) -> torch.Tensor:
    """An unfused engine: clip-weighted GEMM in the input dtype, then an add into the gradient."""
    summed = (x.g * x.c.to(x.g.dtype)[:, None, None]).flatten(0, 1).T @ x.a.flatten(0, 1)
    return x.out.add_(summed.float())


NORM_VARIANTS: dict[str, tuple[str, Callable[[Inputs], object]]] = {
    # name: (impl needed, function)
    "instantiated-triton": ("triton", lambda x: linear_norm2_instantiated(x.a, x.g, impl="triton")),
    "instantiated-torch": ("torch", lambda x: linear_norm2_instantiated(x.a, x.g, impl="torch")),
    "ghost-triton": ("triton", lambda x: linear_norm2_ghost(x.a, x.g, impl="triton")),
    "ghost-torch": ("torch", lambda x: linear_norm2_ghost(x.a, x.g, impl="torch")),
    "gemm-nonprivate": ("torch", _weight_grad_gemm),
}
CLIP_VARIANTS: dict[str, tuple[str, Callable[[Inputs], object]]] = {
    "clip-triton": ("triton", lambda x: linear_clipped_sum(x.a, x.g, x.c, out=x.out, impl="triton")),
    "clip-torch": ("torch", lambda x: linear_clipped_sum(x.a, x.g, x.c, out=x.out, impl="torch")),
    "gemm+add": ("torch", _gemm_plus_add),
}


def _cost_method(variant: str) -> tuple[str, str] | None:
    if variant.startswith(("instantiated", "ghost")):
        method, impl = variant.split("-")
        return method, impl
    return None


# ---------------------------------------------------------------------------------------------
# Running and recording
# ---------------------------------------------------------------------------------------------

RESULTS: list[dict] = []


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _peak_extra_bytes(fn: Callable[[Inputs], object], x: Inputs) -> int | None:
    """Peak CUDA memory above what was allocated before the call (inputs, output buffer)."""
    if not CUDA:
        return None
    _sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn(x)
    _sync()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return peak


def _fits(case: Case, variant: str) -> bool:
    """Skip variants whose scratch would not fit in half the free GPU memory."""
    cm = _cost_method(variant)
    if not CUDA or cm is None:
        return True
    free, _ = torch.cuda.mem_get_info()
    return norm_cost(case.B, case.T, case.d, case.p, *cm).extra_bytes < free // 2


def _run(benchmark, group: str, case: Case, variant: str,
         variants: dict[str, tuple[str, Callable[[Inputs], object]]]) -> None:
    needs, fn = variants[variant]
    if needs == "triton" and not (CUDA and triton_available()):
        pytest.skip("Triton kernels are benchmarked on CUDA only (the interpreter is no benchmark)")
    if not _fits(case, variant):
        pytest.skip(f"{variant} scratch exceeds half the free GPU memory at {case.id}")
    x = setup_inputs(case)
    fn(x)  # warm-up: Triton compilation, cuBLAS heuristics
    peak = _peak_extra_bytes(fn, x)

    def timed() -> None:
        fn(x)
        _sync()

    benchmark.group = f"{group} {case.id}"
    benchmark.extra_info.update(case=case.id, variant=variant, peak_extra_bytes=peak)
    benchmark.pedantic(timed, rounds=ROUNDS, iterations=1, warmup_rounds=2)
    stats = benchmark.stats.stats if benchmark.stats is not None else None
    cm = _cost_method(variant)
    model = norm_cost(case.B, case.T, case.d, case.p, *cm) if cm else None
    RESULTS.append({
        "group": group, **asdict(case), "variant": variant,
        "median_ms": stats.median * 1e3 if stats else None,
        "min_ms": stats.min * 1e3 if stats else None,
        "peak_extra_bytes": peak,
        "model_flops": model.flops if model else 2 * case.B * case.T * case.d * case.p,
        "model_extra_bytes": model.extra_bytes if model else None,
    })


@pytest.mark.parametrize("variant", list(NORM_VARIANTS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_per_example_norms(benchmark, case, variant, record_results):
    _run(benchmark, "norms", case, variant, NORM_VARIANTS)


@pytest.mark.parametrize("variant", list(CLIP_VARIANTS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_clipped_sum(benchmark, case, variant, record_results):
    _run(benchmark, "clipped sum", case, variant, CLIP_VARIANTS)


def _environment() -> dict:
    try:
        here = Path(__file__).parent
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=here, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "../ghostdp/kernels", "bench_kernels.py"],
            capture_output=True, text=True, cwd=here, check=True).stdout
        if dirty.strip():
            commit += "+uncommitted-changes"
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cpu = platform.processor() or platform.machine()
    return {
        "device": torch.cuda.get_device_name() if CUDA else f"CPU ({cpu})",
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit,
        "dtype": str(DTYPE),
        "rounds": ROUNDS,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _markdown(env: dict, rows: list[dict]) -> str:
    lines = [
        "# ghostdp kernel benchmarks",
        "",
        f"Device: {env['device']}; torch {env['torch']}; triton {env['triton']}; commit "
        f"{env['commit']}; inputs {env['dtype']}; {env['rounds']} rounds; {env['date']}.",
        "",
        *([] if CUDA else [
            "CPU run: PyTorch twins and baselines only, at toy shapes, on whatever else the machine "
            "is running; it checks the harness and is not a measurement to quote.", ""]),
        "`vs gemm`: min time over the min time of the non-private weight-gradient GEMM of the same "
        "case (min: least disturbed by other processes). Peak extra: CUDA memory above the inputs "
        "during the call; model extra: the cost model's scratch bytes.",
        "",
        "| group | B | T | d | p | variant | median ms | min ms | vs gemm | peak extra | model extra |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    gemm = {(r["B"], r["T"], r["d"], r["p"]): r["min_ms"] for r in rows
            if r["variant"] == "gemm-nonprivate"}

    def ms(v: float | None) -> str:
        return f"{v:.3f}" if v is not None else "-"

    for r in rows:
        ref = gemm.get((r["B"], r["T"], r["d"], r["p"]))
        ratio = f"{r['min_ms'] / ref:.2f}x" if ref and r["min_ms"] else "-"
        lines.append(f"| {r['group']} | {r['B']} | {r['T']} | {r['d']} | {r['p']} | {r['variant']} "
                     f"| {ms(r['median_ms'])} | {ms(r['min_ms'])} | {ratio} "
                     f"| {format_bytes(r['peak_extra_bytes'])} | {format_bytes(r['model_extra_bytes'])} |")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def record_results():
    """Write every result of this module to bench/results/ once all have run."""
    yield
    if not RESULTS:
        return
    env = _environment()
    rows = sorted(RESULTS, key=lambda r: (r["group"], r["p"], r["T"], r["B"], r["variant"]))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = RESULTS_DIR / f"kernels_{'cuda' if CUDA else 'cpu'}"
    stem.with_suffix(".json").write_text(json.dumps({"environment": env, "results": rows},
                                                    indent=2) + "\n")
    stem.with_suffix(".md").write_text(_markdown(env, rows))
    logger.info("wrote %s.{json,md}", stem)
