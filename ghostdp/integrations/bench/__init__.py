"""ghostdp against non-private training and Opacus: peak memory, step time, largest batch; ``ghostdp bench``.

The harness, one module per concern:

- :mod:`~ghostdp.integrations.bench.engines`: the engine names (non-private, ghostdp's clipping modes and
  implementations, Opacus' modes) and the shared privacy settings (C = 1, sigma = 1).
- :mod:`~ghostdp.integrations.bench.workloads`: model settings (:class:`Case`, random-weight Llama
  presets) and :func:`setup`, the one setup behind every speed and memory figure.
- :mod:`~ghostdp.integrations.bench.opacus_adapter`: Opacus attached through its own ``make_private``.
- :mod:`~ghostdp.integrations.bench.measure`: peak memory and step times in a fresh process per
  (case, engine), and the largest batch within a memory budget.
- :mod:`~ghostdp.integrations.bench.session`: :class:`Session` and :func:`compare`, memory in fresh processes
  then time in-process with the engines interleaved.
- :mod:`~ghostdp.integrations.bench.results`: rows, same-run ratios, the goals, JSON and Markdown.
- :mod:`~ghostdp.integrations.bench.fsdp2`: ghostdp against non-private FSDP2 (``fully_shard``), per-rank
  peak memory and step time over forked gloo process groups; ``ghostdp bench --fsdp2``.
- :mod:`~ghostdp.integrations.bench.cli`: ``ghostdp bench`` (``add_arguments``, ``run``; ``--fsdp2``).

The names below are re-exported so that ``from ghostdp.integrations import bench; bench.run(...)`` keeps
working for the CLI, the pytest-benchmark suites in ``bench/`` and the tests.
"""
from __future__ import annotations

from ghostdp.integrations.bench.cli import add_arguments, main, run
from ghostdp.integrations.bench.engines import (
    CLIPPINGS,
    IMPLS,
    LR,
    MAX_GRAD_NORM,
    NOISE_MULTIPLIER,
    NON_PRIVATE,
    OPACUS_MODES,
    EngineSpec,
    default_engines,
    engine_names,
    parse_engine,
)
from ghostdp.integrations.bench.measure import (
    CHILD_TIMEOUT_S,
    max_batch_size,
    measure,
    measure_in_subprocess,
    predict_max_batch,
    search_max,
)
from ghostdp.integrations.bench.results import (
    GOALS,
    add_ratios,
    environment,
    goal_engine,
    goals,
    markdown,
    merge_results,
    new_result,
    summarize,
    write_results,
)
from ghostdp.integrations.bench.session import Session, compare, rotated
from ghostdp.integrations.bench.workloads import (
    DTYPES,
    PRESETS,
    Case,
    Workload,
    build_model,
    cache_weights,
    needs_weight_cache,
    setup,
)

__all__ = [
    "CHILD_TIMEOUT_S", "CLIPPINGS", "DTYPES", "GOALS", "IMPLS", "LR", "MAX_GRAD_NORM", "NOISE_MULTIPLIER",
    "NON_PRIVATE", "OPACUS_MODES", "PRESETS", "Case", "EngineSpec", "Session", "Workload", "add_arguments",
    "add_ratios", "build_model", "cache_weights", "compare", "default_engines", "engine_names", "environment",
    "goal_engine", "goals", "main", "markdown", "max_batch_size", "measure", "measure_in_subprocess",
    "merge_results", "needs_weight_cache", "new_result", "parse_engine", "predict_max_batch", "rotated",
    "run", "search_max", "setup", "summarize", "write_results",
]
