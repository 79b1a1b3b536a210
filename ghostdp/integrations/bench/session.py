"""Comparisons: memory in fresh processes, then time in this process with the engines interleaved.

Times are seconds per optimizer step, taken in the calling process (:class:`Session`), wall clock and
process CPU time. On a shared CPU the noise is large, so steps are taken in rounds with the engines
interleaved (order rotated each round), the minimum (least disturbed) and the median are both kept, and
every ratio divides figures of the same run (:mod:`ghostdp.integrations.bench.results`).
"""
from __future__ import annotations

import datetime
import gc
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from ghostdp.integrations.bench.engines import parse_engine
from ghostdp.integrations.bench.measure import (
    max_batch_size,
    measure,
    measure_in_subprocess,
)
from ghostdp.integrations.bench.results import (
    environment,
    format_bytes,
    new_result,
    summarize,
)
from ghostdp.integrations.bench.workloads import (
    Case,
    Workload,
    cache_weights,
    needs_weight_cache,
    setup,
)

log = logging.getLogger(__name__)


def rotated(items: Sequence[str], k: int) -> list[str]:
    """``items`` rotated left by k: round k of an interleaved run starts with a different engine."""
    k %= max(1, len(items))
    return list(items[k:]) + list(items[:k])


def _free_bytes(device: str) -> int:
    """Memory this process could still use: free CUDA memory, or MemAvailable on the host."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class Session:
    """Memory in fresh processes, then time in this one, engines interleaved: the procedure behind both
    ``ghostdp bench`` (:func:`compare`) and the pytest-benchmark suite in ``bench/``.

    Why two places: a process's peak memory is only its own in a fresh process, and the CPU figure needs
    glibc's fixed mmap threshold (see :func:`_child_env`), which costs page faults and so slows the
    steps unevenly; times are therefore taken here, where steps of different engines can alternate
    within seconds of each other (on a shared CPU the load changes faster than a process starts).

    - :meth:`memory` runs every engine of a case once in a fresh process (``memory_steps`` steps, so
      AdamW's state exists), before this process builds anything for that case; with
      ``max_batch_budget`` it also searches the largest batch within that budget (for the cases
      ``max_batch_when`` accepts).
    - :meth:`workload` builds (and warms up) a case's workload here. All the case's workloads stay alive
      when the peaks measured in :meth:`memory` fit in ``co_resident_fraction`` of the free memory;
      otherwise only one does, and each round rebuilds (and warms up) its own.
    - :meth:`record` collects the wall and CPU time of timed steps; :meth:`rows` summarises.
    """

    def __init__(self, engines: Sequence[str], *, threads: int | None = None, memory_steps: int = 2,
                 warmup: int = 1, isolate: bool = True, max_batch_budget: int | None = None,
                 max_batch_when: Callable[[Case], bool] | None = None, co_resident_fraction: float = 0.6,
                 weights_root: str | Path | None = None):
        for e in engines:
            parse_engine(e)
        self.engines = list(engines)
        self.threads, self.memory_steps, self.warmup = threads, memory_steps, warmup
        self.isolate, self.max_batch_budget = isolate, max_batch_budget
        self.max_batch_when = max_batch_when or (lambda case: True)
        self.co_resident_fraction = co_resident_fraction
        self._own_tmp = weights_root is None
        self.weights_root = Path(weights_root or tempfile.mkdtemp(prefix="ghostdp-bench-weights-"))
        self.weights: dict[str, str | None] = {}
        self.records: dict[Case, dict[str, dict]] = {}
        self.max_batch: dict[tuple[Case, str], int | None] = {}
        self.co_resident: dict[Case, bool] = {}
        self.workloads: dict[tuple[Case, str], Workload] = {}
        self.times: dict[tuple[Case, str], list[float]] = {}
        self.cpu_times: dict[tuple[Case, str], list[float]] = {}
        self._threads_before = None

    def __enter__(self) -> "Session":
        if self.threads:
            import torch

            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(self.threads)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.drop_workloads()
        if self._threads_before is not None:
            import torch

            torch.set_num_threads(self._threads_before)
            self._threads_before = None
        if self._own_tmp:
            shutil.rmtree(self.weights_root, ignore_errors=True)

    def weights_dir(self, case: Case) -> str | None:
        if case.model not in self.weights:
            cached = cache_weights(case.model, self.weights_root) if needs_weight_cache(case.model) else None
            self.weights[case.model] = cached
        return self.weights[case.model]

    def drop_workloads(self, keep: Case | None = None) -> None:
        for key in [k for k in self.workloads if k[0] != keep]:
            del self.workloads[key]
        gc.collect()
        if any(c.device.startswith("cuda") for c in self.records):
            import torch

            torch.cuda.empty_cache()

    def memory(self, case: Case) -> dict[str, dict]:
        """Per engine, the record of its fresh-process run on ``case`` (once per case)."""
        if case in self.records:
            return self.records[case]
        self.drop_workloads()
        weights = self.weights_dir(case)
        records = {}
        for engine in self.engines:
            if self.isolate:
                rec = measure_in_subprocess(case, engine, steps=self.memory_steps, warmup=0,
                                            weights_dir=weights, threads=self.threads)
            else:
                rec = measure(case, engine, steps=self.memory_steps, warmup=0, weights_dir=weights)
            log.info("memory %s %s: %s, peak %s", case.id, engine, rec["status"], format_bytes(rec["peak_bytes"]))
            records[engine] = rec
            if (self.max_batch_budget is not None and self.isolate and rec["status"] == "ok"
                    and self.max_batch_when(case)):
                self.max_batch[(case, engine)] = max_batch_size(case, engine, self.max_batch_budget,
                                                                weights_dir=weights)
        self.records[case] = records
        need = sum(r["peak_bytes"] or 0 for r in records.values() if r["status"] == "ok")
        self.co_resident[case] = self.isolate and need <= self.co_resident_fraction * _free_bytes(case.device)
        log.info("%s: workloads %s (%s of measured peaks)", case.id,
                 "kept alive together" if self.co_resident[case] else "built one at a time", format_bytes(need))
        return records

    def workload(self, case: Case, engine: str) -> Workload:
        """The live workload of (case, engine), built and warmed up if needed."""
        key = (case, engine)
        if key not in self.workloads:
            self.memory(case)
            self.drop_workloads(keep=case if self.co_resident[case] else None)
            wl = setup(case, engine, weights_dir=self.weights_dir(case))
            for _ in range(self.warmup):
                wl.step()
            self.workloads[key] = wl
        return self.workloads[key]

    def record(self, case: Case, engine: str, wall: float, cpu: float) -> None:
        self.times.setdefault((case, engine), []).append(wall)
        self.cpu_times.setdefault((case, engine), []).append(cpu)

    def timed_step(self, case: Case, engine: str) -> None:
        """One step of (case, engine), its wall and CPU time recorded."""
        wl = self.workload(case, engine)
        t0, c0 = time.perf_counter(), time.process_time()
        wl.step()
        self.record(case, engine, time.perf_counter() - t0, time.process_time() - c0)

    def rows(self, run: str, timing: str) -> list[dict]:
        rows = []
        for case, records in self.records.items():
            for engine in self.engines:
                row = summarize(run, case, engine, [records[engine]], timing=timing,
                                times=self.times.get((case, engine), []),
                                cpu_times=self.cpu_times.get((case, engine), []))
                if (case, engine) in self.max_batch:
                    row["max_batch"] = self.max_batch[(case, engine)]
                    row["max_batch_budget_bytes"] = self.max_batch_budget
                rows.append(row)
        return rows


def compare(cases: Sequence[Case], engines: Sequence[str], *, rounds: int, steps: int, warmup: int,
            isolate: bool = True, max_batch_budget: int | None = None, run: str | None = None,
            threads: int | None = None, memory_steps: int = 2) -> dict:
    """Every engine on every case: memory in fresh processes, then ``rounds`` interleaved rounds of
    ``steps`` timed steps each (engine order rotated every round), see :class:`Session`.

    ``isolate=False`` skips the fresh processes (quick looks and tests): the memory figures are then
    not reported on CPU, and are this process's on CUDA.
    """
    run = run or datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    env = environment(cases[0].device if cases else "cpu")
    with Session(engines, threads=threads, memory_steps=memory_steps, warmup=warmup, isolate=isolate,
                 max_batch_budget=max_batch_budget) as session:
        for case in cases:
            records = session.memory(case)
            for k in range(rounds):
                for engine in rotated(session.engines, k):
                    if records[engine]["status"] != "ok":
                        continue
                    for _ in range(steps):
                        session.timed_step(case, engine)
            session.drop_workloads()
        timing = "in-process, engines interleaved by round; memory " + (
            "in fresh processes" if isolate else "not isolated")
        rows = session.rows(run, timing)
    if hasattr(os, "getloadavg"):
        env["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    settings = {"rounds": rounds, "steps": steps, "warmup": warmup, "threads": threads,
                "memory_steps": memory_steps, "timing": timing}
    return new_result(run, env, settings, rows)
