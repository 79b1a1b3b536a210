"""ghostdp vs non-private training vs Opacus, whole optimizer steps: time, peak memory, largest batch.

    .venv/bin/python -m pytest bench/bench_engines.py --benchmark-only -q
    GHOSTDP_BENCH_CASES=smollm2-135m-lora .venv/bin/python -m pytest bench/bench_engines.py --benchmark-only

Every figure comes from :func:`ghostdp.integrations.bench.setup` (the setup ``ghostdp bench`` uses too):
same model, batch, optimizer and per-example loss for every engine; see that module for the engines and
for how memory is defined.

- Memory: for each case, first every engine once in a fresh process (two steps, so AdamW's state
  exists), before this process builds anything. On CUDA with ``GHOSTDP_BENCH_MAX_BATCH_GIB`` set, the
  largest batch size within that budget is searched there too (fresh process per try).
- Time: pytest-benchmark times ``step()`` in this process. Tests are ordered case by case, then round by
  round, with the engines rotated each round, so a burst of load from other processes lands on every
  engine rather than on one. The workloads of a case stay alive across rounds when their measured
  peaks fit in 60% of the free memory; otherwise each round rebuilds its workload (and warms it up).

Cases: on CUDA, SmolLM2-135M (LoRA and full, T = 128 / 512 / 1024, bf16), Llama-2-7B sizes (random
weights, LoRA r = 16 on all linear layers) and a 1.1B Llama (full); on CPU, a tiny Llama and SmolLM2-135M
at T = 128, fp32. ``GHOSTDP_BENCH_CASES`` (comma-separated substrings of case ids) selects cases;
``GHOSTDP_BENCH_ROUNDS`` / ``_STEPS`` / ``_WARMUP`` / ``_BATCH`` override the repetition counts and batch.

Results are merged, case by case, into bench/results/engines_<device>.{json,md}, with the device name,
library versions, commit and CPU load of the run; ratios only ever divide figures of one run.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from ghostdp.integrations import bench as core

logger = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = "bfloat16" if CUDA else "float32"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


# On a shared CPU: several short rounds (interleaving is what defeats the noise); on a GPU: one round
# of more steps (a dedicated device is steady, and big models do not fit twice).
ROUNDS = _env_int("GHOSTDP_BENCH_ROUNDS", 1 if CUDA else 3)
STEPS = _env_int("GHOSTDP_BENCH_STEPS", 5 if CUDA else 1)
WARMUP = _env_int("GHOSTDP_BENCH_WARMUP", 2 if CUDA else 1)
BATCH = _env_int("GHOSTDP_BENCH_BATCH", 8)
# One torch thread on CPU: with two, every op waits at a barrier for whichever thread the scheduler
# parked, and both wall and CPU time swell with the load of other jobs.
THREADS = _env_int("GHOSTDP_BENCH_THREADS", 0 if CUDA else 1) or None
MEMORY_STEPS = 2
MAX_BATCH_GIB = float(os.environ.get("GHOSTDP_BENCH_MAX_BATCH_GIB") or 0) or None
MAX_BATCH_SEQ_LENS = (512,)
CO_RESIDENT_FRACTION = 0.6


def _cases() -> list[core.Case]:
    if CUDA:
        seq_lens = (128, 512, 1024)
        cases = [core.Case("smollm2-135m", lora, t, BATCH, DEVICE, DTYPE) for lora in (True, False) for t in seq_lens]
        cases.append(core.Case("smollm2-135m", False, 512, BATCH, DEVICE, DTYPE, untie_embeddings=True))
        cases += [core.Case("llama2-7b", True, t, BATCH, DEVICE, DTYPE) for t in seq_lens]
        cases += [core.Case("llama-1b", False, t, BATCH, DEVICE, DTYPE) for t in seq_lens]
    else:
        cases = [
            core.Case("tiny-llama", True, 128, BATCH),
            core.Case("tiny-llama", False, 128, BATCH),
            core.Case("tiny-llama", False, 128, BATCH, untie_embeddings=True),
            core.Case("smollm2-135m", True, 128, BATCH),
            core.Case("smollm2-135m", False, 128, BATCH),
        ]
    wanted = [w for w in os.environ.get("GHOSTDP_BENCH_CASES", "").split(",") if w]
    return [c for c in cases if not wanted or any(w in c.id for w in wanted)]


CASES = _cases()
ENGINES = core.default_engines(DEVICE)
# Case by case, round by round, engines rotated: the interleaving that makes same-run ratios fair.
ITEMS = [(case, k, engine) for case in CASES for k in range(ROUNDS) for engine in core.rotated(ENGINES, k)]


def _free_bytes() -> int:
    if CUDA:
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class _Suite:
    """State across the tests of this module: cached weights, memory records, live workloads, times."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.run = datetime.datetime.now().strftime("%Y%m%dT%H%M%S") + "-pytest"
        self.env = core.environment(DEVICE)
        self.weights: dict[str, str | None] = {}
        self.memory: dict[core.Case, dict[str, dict]] = {}
        self.max_batch: dict[tuple[core.Case, str], int | None] = {}
        self.co_resident: dict[core.Case, bool] = {}
        self.workloads: dict[tuple[core.Case, str], core.Workload] = {}
        self.times: dict[tuple[core.Case, str], list[float]] = defaultdict(list)
        self.cpu_times: dict[tuple[core.Case, str], list[float]] = defaultdict(list)

    def weights_dir(self, case: core.Case) -> str | None:
        if case.model not in self.weights:
            needs = core.needs_weight_cache(case.model)
            self.weights[case.model] = core.cache_weights(case.model, self.tmp) if needs else None
        return self.weights[case.model]

    def _drop_workloads(self, keep: core.Case | None = None) -> None:
        for key in [k for k in self.workloads if k[0] != keep]:
            del self.workloads[key]
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()

    def memory_records(self, case: core.Case) -> dict[str, dict]:
        """Every engine of ``case`` in a fresh process, once, before this process holds any workload."""
        if case not in self.memory:
            self._drop_workloads()
            weights = self.weights_dir(case)
            records = {}
            for engine in ENGINES:
                rec = core.measure_in_subprocess(case, engine, steps=MEMORY_STEPS, warmup=0, weights_dir=weights,
                                                 threads=THREADS)
                logger.info("memory %s %s: %s %s", case.id, engine, rec["status"], rec["peak_bytes"])
                records[engine] = rec
                if (MAX_BATCH_GIB and CUDA and rec["status"] == "ok" and case.seq_len in MAX_BATCH_SEQ_LENS):
                    self.max_batch[(case, engine)] = core.max_batch_size(
                        case, engine, int(MAX_BATCH_GIB * 2**30), weights_dir=weights)
            self.memory[case] = records
            need = sum(r["peak_bytes"] or 0 for r in records.values() if r["status"] == "ok")
            self.co_resident[case] = need <= CO_RESIDENT_FRACTION * _free_bytes()
            logger.info("%s: workloads %s co-resident (%.1f GiB of peaks)", case.id,
                        "kept" if self.co_resident[case] else "not kept", need / 2**30)
        return self.memory[case]

    def workload(self, case: core.Case, engine: str) -> core.Workload:
        key = (case, engine)
        if key not in self.workloads:
            self._drop_workloads(keep=case if self.co_resident[case] else None)
            wl = core.setup(case, engine, weights_dir=self.weights_dir(case))
            for _ in range(WARMUP):
                wl.step()
            self.workloads[key] = wl
        return self.workloads[key]

    def rows(self) -> list[dict]:
        rows = []
        for case, records in self.memory.items():
            for engine in ENGINES:
                row = core.summarize(self.run, case, engine, [records[engine]],
                                     timing="pytest-benchmark, in-process, engines interleaved",
                                     times=self.times.get((case, engine), []),
                                     cpu_times=self.cpu_times.get((case, engine), []))
                if (case, engine) in self.max_batch:
                    row["max_batch"] = self.max_batch[(case, engine)]
                    row["max_batch_budget_bytes"] = int(MAX_BATCH_GIB * 2**30)
                rows.append(row)
        return rows


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """Yield the suite state; afterwards merge this run's cases into bench/results/engines_<device>."""
    threads = torch.get_num_threads()
    if THREADS:
        torch.set_num_threads(THREADS)
    state = _Suite(tmp_path_factory.mktemp("weights"))
    yield state
    torch.set_num_threads(threads)
    state._drop_workloads()
    rows = state.rows()
    if not rows:
        return
    if hasattr(os, "getloadavg"):
        state.env["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    settings = {"rounds": ROUNDS, "steps": STEPS, "warmup": WARMUP, "memory_steps": MEMORY_STEPS, "threads": THREADS,
                "timing": "pytest-benchmark in-process, engines interleaved by round"}
    result = core.new_result(state.run, state.env, settings, rows)
    title = "ghostdp vs non-private vs Opacus: whole training steps"
    core.write_results(result, RESULTS_DIR / f"engines_{DEVICE}", merge=True, title=title)


@pytest.mark.parametrize(("case", "round_", "engine"), ITEMS,
                         ids=[f"{c.id}-r{k}-{e}" for c, k, e in ITEMS])
def test_engine_step(benchmark, suite, case, round_, engine):
    record = suite.memory_records(case)[engine]
    if record["status"] != "ok":
        pytest.skip(f"{engine} on {case.id}: {record['status']}")
    wl = suite.workload(case, engine)
    benchmark.group = case.id
    benchmark.extra_info.update(case=case.id, engine=engine, round=round_,
                                peak_bytes=record["peak_bytes"], memory_kind=record.get("memory_kind"))
    cpu_times = suite.cpu_times[(case, engine)]

    def step() -> None:  # pytest-benchmark times the wall clock; the CPU time is kept beside it
        c0 = time.process_time()
        wl.step()
        cpu_times.append(time.process_time() - c0)

    benchmark.pedantic(step, rounds=STEPS, iterations=1, warmup_rounds=0)
    if benchmark.stats is not None:  # None under --benchmark-disable
        suite.times[(case, engine)].extend(benchmark.stats.stats.data)
