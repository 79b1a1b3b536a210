"""Ahead-of-time compilation of the Triton kernels for GPU targets, on a machine without a GPU.

A kernel that Triton's interpreter runs can still fail to compile for a GPU (a global the compiler
cannot read, a ``tl.dot`` below 16 in some dimension, too much shared memory, a dtype a target
lacks), and on CUDA ``impl="auto"`` takes the Triton path, so such a kernel would fail a user's
first step. This module lists every variant the launchers can choose and compiles it with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, which needs no device.

- :func:`variants` derives the variants from the launchers' own configuration functions
  (``instantiated_launch``, ``ghost_launch``, ``clipped_sum_launch``, ``finish_splits_launch``,
  ``add_noise_launch``) called over every input class they can see: each tile-size class
  (:data:`~ghostdp.kernels._tiles.SIZE_CLASSES`), each dtype, each flag. Nothing is listed by hand
  but the argument types of each kernel.
- :func:`covering_subset` picks, per (kernel, architecture), the variants that cover every pair of
  settings (pairwise coverage) plus, per input dtype, the variant with the largest tiles (shared
  memory grows with the tiles, so it bounds the rest). The test suite compiles this subset; the
  full product (``--matrix full``) is for a machine with time to spare.
- :func:`with_ones` adds, per kernel, the variant with every integer argument equal to 1 (which
  Triton compiles as a constant).
- :func:`compile_variant` compiles one variant and reports its shared memory against
  :data:`SHARED_MEMORY_LIMIT`.

The kernels must be defined *compiled*: run this in a process where ``TRITON_INTERPRET`` is not
``1`` (the test suite sets it, so its test runs ``python -m ghostdp.kernels.aot`` in a subprocess).
Compiled kernels land in Triton's cache (``TRITON_CACHE_DIR``, default ``~/.triton/cache``), so a
second run only compiles kernels whose source changed.

Usage: ``python -m ghostdp.kernels.aot --arch 80 --arch 90 [--matrix covering|full] [--jobs N]
[--json results.json]``; exit status 1 if any variant fails to compile or exceeds the limit.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import logging
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Iterator

logger = logging.getLogger(__name__)

#: Largest shared memory one thread block may use, in bytes, by compute capability: the opt-in
#: maximum from the CUDA C++ Programming Guide, "Technical Specifications per Compute Capability"
#: (maximum amount of shared memory per thread block: 8.0 163 KB, 8.6 and 8.9 99 KB, 9.0 227 KB).
#: Triton allocates its shared memory dynamically and raises a kernel's limit to this opt-in
#: maximum (cuFuncSetAttribute), so the 48 KB limit of *static* shared memory does not apply; above
#: it the launch fails with "out of resource: shared memory".
SHARED_MEMORY_LIMIT: dict[int, int] = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
#: The architectures the test suite compiles for: A100 (sm_80) and H100/H200 (sm_90).
DEFAULT_ARCHS: tuple[int, ...] = (80, 90)
#: Other parts that run the sm_80 code with less shared memory (A10, A40, L4, RTX 30xx/40xx): an
#: sm_80 compile is also checked against these limits.
SAME_CODE_ARCHS: dict[int, tuple[int, ...]] = {80: (86, 89)}

_MODULES = {
    "norms": "ghostdp.kernels._linear_norms_triton",
    "clipped_sum": "ghostdp.kernels._clipped_sum_triton",
    "noise": "ghostdp.kernels._noise_triton",
}


@dataclass(frozen=True)
class Variant:
    """One compiled form of a kernel: argument types, constexpr values and num_warps.

    ``signature`` lists the runtime arguments in order as Triton types ("*bf16" a pointer to bf16,
    "i32", "fp32"); ``constexprs`` the compile-time ones. Pointers and i32 arguments are compiled
    as divisible by 16 (Triton's specialisation for aligned tensors and sizes such as d = 4096),
    the common case on a GPU and the one that vectorises and pipelines loads through shared memory.
    """

    module: str
    kernel: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int

    def settings(self) -> tuple[tuple[str, object], ...]:
        """(name, value) of everything that varies between variants: the pairs to cover."""
        return self.signature + self.constexprs + (("num_warps", self.num_warps),)

    def label(self) -> str:
        types = ",".join(f"{k}:{v}" for k, v in self.signature if v.startswith("*") or k == "seed")
        consts = ",".join(f"{k}={v}" for k, v in self.constexprs)
        return f"{self.kernel}[{types}][{consts}][warps={self.num_warps}]"


def _triton_type(dtype) -> str:
    import torch

    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
            torch.float64: "fp64"}[dtype]


def _variant(module: str, kernel: str, args: dict[str, str], launch) -> Variant:
    return Variant(_MODULES[module], kernel, tuple(args.items()),
                   tuple(sorted(launch.constexprs.items())), launch.num_warps)


def _shape_classes() -> Iterator[tuple[int, int, int]]:
    from ghostdp.kernels._tiles import SIZE_CLASSES

    return itertools.product(SIZE_CLASSES, repeat=3)


#: Triton types an int argument can take: i32 below 2**31, i64 above (seeds are up to 2**63).
SEED_TYPES = ("i32", "i64")


def variants() -> list[Variant]:
    """Every (kernel, argument dtypes, constexprs, num_warps) the launchers can choose on CUDA.

    Sizes: the launchers' tile functions over :data:`~ghostdp.kernels._tiles.SIZE_CLASSES`
    (every tile they can return). Dtypes: ``TRITON_DTYPES`` for the GEMM kernels' inputs (what
    ``resolve_impl`` lets through), ``TWIN_DTYPES`` for outputs and the elementwise noise kernel.
    Flags: both values of each. Integer sizes are i32 (the GEMM kernels index with int64 inside).
    """
    from ghostdp.kernels import _clipped_sum_triton as cs
    from ghostdp.kernels import _linear_norms_triton as ln
    from ghostdp.kernels import _noise_triton as nz
    from ghostdp.kernels.dispatch import TRITON_DTYPES, TWIN_DTYPES

    found: dict[Variant, None] = {}  # insertion-ordered set
    bools = (False, True)
    for dtype in TRITON_DTYPES:
        t = _triton_type(dtype)
        for T, d, p in _shape_classes():
            found[_variant("norms", "_instantiated_norm2_kernel", {
                "a_ptr": f"*{t}", "g_ptr": f"*{t}", "partial_ptr": "*fp32", "T": "i32", "D": "i32",
                "P": "i32", "n_tiles_d": "i32", "n_tiles": "i32",
            }, ln.instantiated_launch(T, d, p, dtype, "cuda"))] = None
            found[_variant("norms", "_ghost_norm2_kernel", {
                "a_ptr": f"*{t}", "g_ptr": f"*{t}", "pairs_ptr": "*i32", "partial_ptr": "*fp32",
                "T": "i32", "D": "i32", "P": "i32", "n_pairs": "i32",
            }, ln.ghost_launch(T, d, p, dtype, "cuda"))] = None
            for split, acc, out_dtype in itertools.product(bools, bools, TWIN_DTYPES):
                launch = cs.clipped_sum_launch(T, d, p, dtype, "cuda", split=split,
                                               accumulate=acc, out_dtype=out_dtype)
                out_t = "fp32" if split else _triton_type(out_dtype)  # SPLIT: the workspace
                found[_variant("clipped_sum", "_clipped_sum_kernel", {
                    "a_ptr": f"*{t}", "g_ptr": f"*{t}", "c_ptr": "*fp32", "out_ptr": f"*{out_t}",
                    "work_ptr": f"*{out_t}", "B": "i32", "T": "i32", "D": "i32", "P": "i32",
                    "n_tiles_d": "i32", "examples_per_split": "i32",
                }, launch)] = None
    for acc, out_dtype in itertools.product(bools, TWIN_DTYPES):
        found[_variant("clipped_sum", "_finish_splits_kernel", {
            "work_ptr": "*fp32", "out_ptr": f"*{_triton_type(out_dtype)}", "n": "i32",
            "n_splits": "i32",
        }, cs.finish_splits_launch(accumulate=acc, out_dtype=out_dtype))] = None
    for dtype, noise, seed in itertools.product(TWIN_DTYPES, bools, SEED_TYPES):
        found[_variant("noise", "_add_noise_kernel", {
            "x_ptr": f"*{_triton_type(dtype)}", "n": "i32", "scale": "fp32", "noise_std": "fp32",
            "seed": seed,
        }, nz.add_noise_launch(dtype, noise=noise))] = None
    return list(found)


def _tile_area(v: Variant) -> int:
    area = 1
    for name, value in v.constexprs:
        if name.startswith("BLOCK"):
            area *= int(value)
    return area


def _weight(v: Variant) -> tuple[int, int]:
    """(tile area, flags on): what the shared memory and the code size grow with."""
    return _tile_area(v), sum(1 for _, x in v.constexprs if x is True)


def covering_subset(space: Iterable[Variant]) -> list[Variant]:
    """Per kernel: every pair of settings that occurs in ``space`` occurs in some chosen variant.

    Greedy pairwise covering (each step takes the variant that covers the most uncovered pairs),
    plus, per kernel and input dtype (its first pointer argument's), the variant with the largest tiles and the most
    flags on: shared memory (pipelined tiles, layout conversions) grows with the tiles, so it is
    the maximum that the limit check must see. Deterministic: ties go to the earlier variant.
    """
    by_kernel: dict[str, list[Variant]] = defaultdict(list)
    for v in space:
        by_kernel[v.kernel].append(v)
    chosen: dict[Variant, None] = {}
    for group in by_kernel.values():
        largest: dict[str, Variant] = {}  # input dtype (the first pointer's) -> the variant
        for v in group:
            key = next(t for _, t in v.signature if t.startswith("*"))
            if key not in largest or _weight(v) > _weight(largest[key]):
                largest[key] = v
        pairs_of = {v: set(itertools.combinations(v.settings(), 2)) for v in group}
        uncovered = set().union(*pairs_of.values())
        for v in largest.values():
            chosen[v] = None
            uncovered -= pairs_of[v]
        while uncovered:
            best = max(group, key=lambda v: len(pairs_of[v] & uncovered))
            chosen[best] = None
            uncovered -= pairs_of[best]
    return list(chosen)


def with_ones(v: Variant) -> Variant:
    """``v`` with every i32 argument equal to 1, which Triton compiles as the constant 1.

    Triton specialises an integer argument equal to 1 into a constexpr (B = 1, T = 1 for (B, d)
    inputs, a single tile or split), so each kernel also has this variant on a GPU.
    """
    ones = tuple((k, 1) for k, t in v.signature if t == "i32")
    return Variant(v.module, v.kernel, tuple((k, t) for k, t in v.signature if t != "i32"),
                   tuple(sorted(v.constexprs + ones)), v.num_warps)


def compile_variant(v: Variant, arch: int) -> dict[str, object]:
    """Compile ``v`` for sm_``arch``; return its record (shared bytes or the error, seconds).

    Needs the kernels defined compiled (``TRITON_INTERPRET`` not ``1``) and no GPU.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(v.module), v.kernel)
    names = list(fn.arg_names)
    signature = {k: "constexpr" for k, _ in v.constexprs}
    signature.update(v.signature)
    signature = {k: signature[k] for k in names}  # in the kernel's argument order
    divisible = [["tt.divisibility", 16]]
    attrs = {(names.index(k),): divisible for k, t in v.signature
             if t.startswith("*") or t == "i32"}
    record: dict[str, object] = {"variant": v.label(), "kernel": v.kernel, "arch": arch,
                                 "num_warps": v.num_warps, "constexprs": dict(v.constexprs),
                                 "signature": dict(v.signature)}
    start = time.perf_counter()
    try:
        compiled = triton.compile(
            ASTSource(fn=fn, signature=signature, constexprs=dict(v.constexprs), attrs=attrs),
            target=GPUTarget("cuda", arch, 32), options={"num_warps": v.num_warps})
    except Exception as e:  # every compiler failure is a finding to report, not to stop on
        root = e
        while root.__cause__ is not None or root.__context__ is not None:
            root = root.__cause__ or root.__context__
        record["error"] = f"{type(e).__name__}: {e}" + (
            f"\ncaused by {type(root).__name__}: {root}" if root is not e else "")
    else:
        record["shared"] = int(compiled.metadata.shared)
        record["limits"] = {str(a): SHARED_MEMORY_LIMIT[a]
                            for a in (arch,) + SAME_CODE_ARCHS.get(arch, ())}
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def problems(record: dict[str, object]) -> list[str]:
    """What is wrong with one compile record, as sentences (empty when it compiled and fits)."""
    where = f"{record['variant']} for sm_{record['arch']}"
    if "error" in record:
        return [f"{where} does not compile: {record['error']}"]
    return [f"{where} needs {record['shared']} bytes of shared memory, over sm_{a}'s {limit}: "
            "shrink the tile (ghostdp/kernels/_tiles.py) or num_stages for it"
            for a, limit in record["limits"].items() if record["shared"] > limit]


def _compile_job(job: tuple[Variant, int]) -> dict[str, object]:
    return compile_variant(*job)


def run(archs: Iterable[int], matrix: str = "covering", jobs: int = 1) -> list[dict[str, object]]:
    """Compile the ``matrix`` ("covering" or "full") of variants for each arch; the records."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("ghostdp.kernels.aot compiles kernels, but TRITON_INTERPRET=1 makes "
                           "Triton define them as interpreted functions. Run it in a process "
                           "without TRITON_INTERPRET (e.g. `env -u TRITON_INTERPRET python -m "
                           "ghostdp.kernels.aot`).")
    space = variants()
    chosen = space if matrix == "full" else covering_subset(space)
    first = {v.kernel: v for v in reversed(chosen)}  # each kernel's first chosen variant
    ones = [with_ones(v) for v in first.values()]
    todo = [(v, arch) for arch in archs for v in chosen + ones]
    logger.info("compiling %d of the %d variants the launchers can choose, and %d with integer "
                "arguments of 1, for sm_%s with %d job(s)", len(chosen), len(space), len(ones),
                "/sm_".join(map(str, archs)), jobs)
    if jobs <= 1:
        return [_compile_job(job) for job in todo]
    import multiprocessing

    # fork: the workers inherit the imported kernels; nothing here has touched a GPU.
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(_compile_job, todo, chunksize=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ghostdp.kernels.aot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_MEMORY_LIMIT),
                        help="compute capability to compile for, e.g. 80 or 90 (repeatable; "
                             "default 80 and 90)")
    parser.add_argument("--matrix", choices=("covering", "full"), default="covering",
                        help="covering: pairwise cover plus the largest tiles (the test suite's); "
                             "full: every variant (hours on a CPU)")
    parser.add_argument("--jobs", type=int, default=1, help="compiler processes (default 1)")
    parser.add_argument("--json", help="write the compile records to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import triton

    start = time.perf_counter()
    records = run(tuple(args.arch or DEFAULT_ARCHS), args.matrix, max(1, args.jobs))
    wall = time.perf_counter() - start
    found = [msg for r in records for msg in problems(r)]
    summary = {"triton": triton.__version__, "matrix": args.matrix, "variants": len(records),
               "wall_seconds": round(wall, 1), "problems": found, "records": records}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1, default=str)
    for msg in found:
        logger.error("%s", msg)
    logger.info("triton %s: %d compiles in %.1f s, %d problem(s)", triton.__version__,
                len(records), wall, len(found))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
