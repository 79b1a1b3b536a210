"""Ahead-of-time compilation: every kernel compiles for sm_80 and sm_90 and fits in shared memory.

The interpreter accepts kernels that the compiler rejects (a global it cannot read, a dot below 16),
so the test suite also compiles them, without a GPU, for the GPUs users run (see
:mod:`ghostdp.kernels.aot`). The compile runs in a subprocess: this process has TRITON_INTERPRET=1,
under which Triton defines the kernels as interpreted functions that it cannot compile. Compiled
kernels stay in Triton's cache (~/.triton/cache or TRITON_CACHE_DIR), so only the first run after
a kernel changes pays for the compiler (about 80 s of CPU for the 144 compiles).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections import defaultdict

import pytest
import torch

triton = pytest.importorskip("triton")

from ghostdp.kernels import _clipped_sum_triton as cs  # noqa: E402
from ghostdp.kernels import _linear_norms_triton as ln  # noqa: E402
from ghostdp.kernels import _noise_triton as nz  # noqa: E402
from ghostdp.kernels import aot  # noqa: E402
from ghostdp.kernels.dispatch import TRITON_DTYPES  # noqa: E402

KERNELS = {"_instantiated_norm2_kernel", "_ghost_norm2_kernel", "_clipped_sum_kernel",
           "_finish_splits_kernel", "_add_noise_kernel"}
DOT_KERNELS = {"_instantiated_norm2_kernel", "_ghost_norm2_kernel", "_clipped_sum_kernel"}
# Sizes off the powers of two, as real layers have them: the sweep of SIZE_CLASSES must still
# contain whatever the launchers choose for them (Llama-2-7B d=4096, p=11008, LoRA r=8/16, T=1..2048).
ODD_SIZES = (1, 3, 8, 17, 31, 100, 1000, 4097, 11008, 32000, 50257)


@pytest.fixture(scope="module")
def space() -> list[aot.Variant]:
    return aot.variants()


def test_every_launch_the_launchers_make_is_in_the_compile_matrix(space):
    """The matrix comes from the launchers' functions: any real shape maps onto a listed variant."""
    assert {v.kernel for v in space} == KERNELS
    listed = {(v.kernel, v.constexprs, v.num_warps) for v in space}

    def _find(kernel, constexprs, num_warps):
        return (kernel, tuple(sorted(constexprs.items())), num_warps) in listed

    for T, d, p in itertools.product(ODD_SIZES, repeat=3):
        for dtype in TRITON_DTYPES:
            for launch, kernel in ((ln.instantiated_launch(T, d, p, dtype, "cuda"),
                                    "_instantiated_norm2_kernel"),
                                   (ln.ghost_launch(T, d, p, dtype, "cuda"), "_ghost_norm2_kernel"),
                                   (cs.clipped_sum_launch(T, d, p, dtype, "cuda", split=False,
                                                          accumulate=True,
                                                          out_dtype=torch.bfloat16),
                                    "_clipped_sum_kernel")):
                assert _find(kernel, launch.constexprs, launch.num_warps), (
                    f"{kernel} for (T, d, p) = {(T, d, p)}, {dtype}: {launch} is not in the matrix")
    for dtype in (torch.float64, torch.float16):
        launch = nz.add_noise_launch(dtype, noise=False)
        assert _find("_add_noise_kernel", launch.constexprs, launch.num_warps)


def test_dot_tiles_are_at_least_16_and_powers_of_two(space):
    """tl.dot needs every dimension >= 16; tl.arange needs powers of two."""
    for v in space:
        if v.kernel not in DOT_KERNELS:
            continue
        for name, value in v.constexprs:
            if name.startswith("BLOCK"):
                assert value >= 16 and value & (value - 1) == 0, v.label()
        if dict(v.signature)["a_ptr"] == "*fp32":
            assert dict(v.constexprs)["INPUT_PRECISION"] == "ieee", v.label()


def test_the_compiled_subset_covers_every_pair_and_the_largest_tiles(space):
    chosen = aot.covering_subset(space)
    assert set(chosen) <= set(space)
    by_kernel = defaultdict(list)
    for v in space:
        by_kernel[v.kernel].append(v)
    for kernel, group in by_kernel.items():
        picked = [v for v in chosen if v.kernel == kernel]
        needed = set().union(*(itertools.combinations(v.settings(), 2) for v in group))
        covered = set().union(*(itertools.combinations(v.settings(), 2) for v in picked))
        assert needed <= covered, f"{kernel}: pairs never compiled: {sorted(needed - covered)[:5]}"
        if kernel in DOT_KERNELS:
            for dtype in ("*fp16", "*bf16", "*fp32"):
                area = max(aot._tile_area(v) for v in group if v.signature[0][1] == dtype)
                assert any(aot._tile_area(v) == area and v.signature[0][1] == dtype
                           for v in picked), f"{kernel} {dtype}: largest tile not compiled"


def test_with_ones_makes_every_int_argument_the_constant_1(space):
    v = next(v for v in space if v.kernel == "_ghost_norm2_kernel")
    ones = aot.with_ones(v)
    assert [t for _, t in ones.signature] == ["*" + v.signature[0][1][1:]] * 2 + ["*i32", "*fp32"]
    consts = dict(ones.constexprs)
    assert {k: consts[k] for k in ("T", "D", "P", "n_pairs")} == {"T": 1, "D": 1, "P": 1, "n_pairs": 1}
    assert {k: consts[k] for k, _ in v.constexprs} == dict(v.constexprs)


def test_problems_reports_errors_and_shared_memory_over_the_limit():
    base = {"variant": "k[...]", "arch": 80}
    assert aot.problems(dict(base, shared=100, limits={"80": 1000})) == []
    over = aot.problems(dict(base, shared=2000, limits={"80": 1000, "86": 500}))
    assert len(over) == 2 and "2000 bytes" in over[0] and "sm_86" in over[1]
    assert "does not compile: NameError" in aot.problems(dict(base, error="NameError: x"))[0]


def test_every_kernel_compiles_for_sm80_and_sm90_within_shared_memory(tmp_path):
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("OMP_NUM_THREADS", "1")
    jobs = str(min(2, os.cpu_count() or 1))
    res = subprocess.run([sys.executable, "-m", "ghostdp.kernels.aot", "--arch", "80", "--arch",
                          "90", "--jobs", jobs, "--json", str(out)],
                         env=env, capture_output=True, text=True, timeout=1800)
    assert out.is_file(), f"the AOT compile did not finish (rc {res.returncode}):\n{res.stderr[-4000:]}"
    summary = json.loads(out.read_text())
    assert summary["problems"] == [], "\n".join(summary["problems"])
    assert res.returncode == 0, res.stderr[-4000:]
    records = summary["records"]
    assert {(r["kernel"], r["arch"]) for r in records} == {(k, a) for k in KERNELS for a in (80, 90)}
    ones = {(r["kernel"], r["arch"]) for r in records
            if "i32" not in r["signature"].values()}
    assert ones == {(k, a) for k in KERNELS for a in (80, 90)}, "variants with ints of 1 missing"
    for r in records:
        assert "error" not in r, r["error"]
        assert 0 <= r["shared"] <= aot.SHARED_MEMORY_LIMIT[r["arch"]], r["variant"]
    # The GEMM kernels do stage their tiles in shared memory: a 0 here would mean the metadata
    # was not read.
    assert max(r["shared"] for r in records if r["kernel"] in DOT_KERNELS) > 0
