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
at T = 128, fp32 (the full fine-tuning cases also untied, so that Opacus' ghost clipping, which refuses
tied parameters, gets a row). ``GHOSTDP_BENCH_CASES`` (comma-separated substrings of case ids) selects cases;
``GHOSTDP_BENCH_ENGINES`` (comma-separated names) selects engines; ``GHOSTDP_BENCH_ROUNDS`` / ``_STEPS`` /
``_WARMUP`` / ``_BATCH`` / ``_THREADS`` override the repetition counts, batch size and CPU threads.

Results are merged, by (case, engine), into bench/results/engines_<device>.{json,md}, with the device
name, library versions, commit and CPU load of each run; a row names its run, and its ratios only ever
divide figures of that run.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
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
            core.Case("tiny-llama", True, 128, BATCH, quantization="4bit"),  # QLoRA: NF4 base (bitsandbytes)
            core.Case("tiny-llama", False, 128, BATCH),
            core.Case("tiny-llama", False, 128, BATCH, untie_embeddings=True),
            core.Case("smollm2-135m", True, 128, BATCH),
            core.Case("smollm2-135m", False, 128, BATCH),
            core.Case("smollm2-135m", False, 128, BATCH, untie_embeddings=True),
        ]
    wanted = [w for w in os.environ.get("GHOSTDP_BENCH_CASES", "").split(",") if w]
    return [c for c in cases if not wanted or any(w in c.id for w in wanted)]


CASES = _cases()
ENGINES = [e for e in os.environ.get("GHOSTDP_BENCH_ENGINES", "").split(",") if e] or core.default_engines(DEVICE)
# Case by case, round by round, engines rotated: the interleaving that makes same-run ratios fair.
ITEMS = [(case, k, engine) for case in CASES for k in range(ROUNDS) for engine in core.rotated(ENGINES, k)]


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """The shared :class:`~ghostdp.integrations.bench.Session`; afterwards this run's cases are merged
    into bench/results/engines_<device>.{json,md}."""
    run = datetime.datetime.now().strftime("%Y%m%dT%H%M%S") + "-pytest"
    budget = int(MAX_BATCH_GIB * 2**30) if MAX_BATCH_GIB and CUDA else None
    with core.Session(ENGINES, threads=THREADS, memory_steps=MEMORY_STEPS, warmup=WARMUP,
                      max_batch_budget=budget, max_batch_when=lambda c: c.seq_len in MAX_BATCH_SEQ_LENS,
                      co_resident_fraction=CO_RESIDENT_FRACTION,
                      weights_root=tmp_path_factory.mktemp("weights")) as state:
        env = core.environment(DEVICE)
        yield state
        state.drop_workloads()
        timing = "pytest-benchmark in-process, engines interleaved by round; memory in fresh processes"
        rows = state.rows(run, timing)
    if not rows:
        return
    if hasattr(os, "getloadavg"):
        env["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    settings = {"rounds": ROUNDS, "steps": STEPS, "warmup": WARMUP, "memory_steps": MEMORY_STEPS,
                "threads": THREADS, "timing": timing}
    result = core.new_result(run, env, settings, rows)
    title = "ghostdp vs non-private vs Opacus: whole training steps"
    core.write_results(result, RESULTS_DIR / f"engines_{DEVICE}", merge=True, title=title)


@pytest.mark.parametrize(("case", "round_", "engine"), ITEMS,
                         ids=[f"{c.id}-r{k}-{e}" for c, k, e in ITEMS])
def test_engine_step(benchmark, session, case, round_, engine):
    record = session.memory(case)[engine]
    if record["status"] != "ok":
        pytest.skip(f"{engine} on {case.id}: {record['status']}")
    wl = session.workload(case, engine)
    benchmark.group = case.id
    benchmark.extra_info.update(case=case.id, engine=engine, round=round_,
                                peak_bytes=record["peak_bytes"], memory_kind=record.get("memory_kind"))
    walls, cpus = [], []

    def step() -> None:  # pytest-benchmark times the wall clock; the CPU time is kept beside it
        c0 = time.process_time()
        wl.step()
        cpus.append(time.process_time() - c0)

    benchmark.pedantic(step, rounds=STEPS, iterations=1, warmup_rounds=0)
    if benchmark.stats is not None:  # None under --benchmark-disable
        walls = list(benchmark.stats.stats.data)
    for wall, cpu in zip(walls, cpus):
        session.record(case, engine, wall, cpu)
