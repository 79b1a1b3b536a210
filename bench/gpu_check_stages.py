"""The stages of the GPU check that run Python of their own (see ``bench/gpu_check.py``, the driver), each
in a fresh process started by the driver::

    python bench/gpu_check_stages.py --stage env --stage-out record.json --results-dir bench/results \
        --bench-stem engines_gpu_check_nvidia-h200

A stage writes its record (status, summary, details) as JSON to ``--stage-out``; the bench stages also
merge their rows into ``<results-dir>/<bench-stem>.{json,md}`` after every engine.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("gpu_check")
REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("prv_accountant", "opacus", "gguf")  # what ghostdp must run without (env stage)
ENGINES = ("non-private", "ghostdp-auto-triton", "opacus-ghost", "opacus-hooks")
STAGES = ("env", "engine", "bench-lora-7b", "bench-full-1b", "max-batch")


def bench_cases():
    from ghostdp.integrations.bench import Case

    return {"bench-lora-7b": Case("llama2-7b", True, 1024, 8, device="cuda", dtype="bfloat16", lora_rank=16),
            "bench-full-1b": Case("llama-1b", False, 1024, 8, device="cuda", dtype="bfloat16")}


def engines() -> list[str]:
    chosen = os.environ.get("GHOSTDP_GPU_CHECK_ENGINES")
    return [e.strip() for e in chosen.split(",") if e.strip()] if chosen else list(ENGINES)


def stage_env() -> dict:
    """Import ghostdp from the checkout with the optional packages blocked, run what must work without them,
    then report the versions and the device."""
    for name in BLOCKED:
        sys.modules[name] = None  # an import of any of them now raises ImportError
    import torch

    import ghostdp
    import ghostdp.integrations.bench  # noqa: F401 - imports without opacus
    from ghostdp import PrivacyEngine, accounting
    from tests.helpers import lm_batch, lm_losses, tiny_llama

    eps_rdp = accounting.epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=1000, delta=1e-5, accountant="rdp")
    model = tiny_llama(True, dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    PrivacyEngine(model, opt, max_grad_norm=1.0, expected_batch_size=4, noise_multiplier=1.0, impl="torch")
    lm_losses(model, lm_batch([7, 4, 9, 5])).mean().backward()
    opt.step()
    for name in BLOCKED:
        del sys.modules[name]
    found = {name: importlib.util.find_spec(name) is not None for name in BLOCKED}
    eps_prv = (accounting.epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=1000, delta=1e-5)
               if found["prv_accountant"] else None)
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "triton", "transformers", "peft", "opacus", "prv-accountant", "numpy", "scipy", "pytest"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    cuda = torch.cuda.is_available()
    out = {"status": "passed", "ghostdp": ghostdp.__file__, "python": sys.version.split()[0], "versions": versions,
           "cuda": cuda, "torch_cuda": torch.version.cuda, "epsilon_rdp": eps_rdp, "epsilon_prv": eps_prv,
           "optional_importable": found, "device": torch.cuda.get_device_name() if cuda else "cpu"}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        out.update(capability=f"sm_{props.major}{props.minor}", memory_bytes=props.total_memory)
    out["summary"] = (f"ghostdp imports and steps without {', '.join(BLOCKED)}; RDP eps {eps_rdp:.3f}, "
                      f"PRV eps {'-' if eps_prv is None else f'{eps_prv:.3f}'}; {out['device']}")
    return out


def stage_engine() -> dict:
    sys.path.insert(0, str(REPO / "bench"))
    from gpu_engine_check import run_checks

    records = run_checks()
    bad = [r for r in records if not r["passed"]]
    synced = [r for r in records if r.get("sync_error")]
    return {"status": "failed" if bad else "passed", "records": records,
            "summary": f"{len(records) - len(bad)}/{len(records)} exact-reference checks passed (fp32, bf16 x "
                       f"torch, triton x full, LoRA); host syncs inside backward: {len(synced)}"}


TITLE = "GPU check: ghostdp vs non-private vs Opacus"


def _save_rows(results: Path, new: dict) -> dict:
    """Merge ``new`` into ``<results>.json`` and recompute every row's ratios; written at once, so a stage
    stopped at its limit keeps the engines it finished."""
    from ghostdp.integrations import bench

    path = results.with_suffix(".json")
    table = bench.merge_results(json.loads(path.read_text()) if path.exists() else None, new)
    bench.add_ratios(table["rows"])
    return bench.write_results(table, results, title=TITLE)


def stage_bench(name: str, results: Path) -> dict:
    """One case, one engine at a time (memory in a fresh process, then timed steps here), all rows of one
    run id, so each ratio divides figures of this run; non-private first, as every ratio's base."""
    from ghostdp.integrations import bench

    case = bench_cases()[name]
    steps = 3 if case.model == "llama2-7b" else 5
    run = f"gpu-check-{name}-{datetime.datetime.now():%Y%m%dT%H%M%S}"
    for engine in engines():
        table = _save_rows(results, bench.compare([case], [engine], rounds=1, steps=steps, warmup=1, run=run))
    keys = ("engine", "status", "step_min_s", "peak_bytes", "time_ratio_min", "memory_ratio")
    rows = [{k: r.get(k) for k in keys} for r in table["rows"] if r["run"] == run]
    failed = [r["engine"] for r in rows if r["status"].startswith("error")]
    return {"status": "failed" if failed else "passed", "rows": rows,
            "summary": "; ".join(f"{r['engine']}: {r['status']}" + (
                f", {r['time_ratio_min']:.2f}x time, {r['memory_ratio']:.2f}x memory"
                if r["time_ratio_min"] and r["memory_ratio"] else "") for r in rows)}


def memory_budget() -> int:
    """The memory a batch may fill: the GPU's, less 2 GiB for the CUDA context, cuBLAS workspaces and the
    caching allocator's slack (none of which ``max_memory_allocated`` counts)."""
    import torch

    return torch.cuda.get_device_properties(0).total_memory - 2 * 2**30


def stage_max_batch(results: Path) -> dict:
    """Per case and engine: peaks at B=2 (measured here) and at the case's B (from the bench stage, else
    measured here), the line through them, the largest B within the GPU's memory less 2 GiB."""
    import dataclasses as dc

    from ghostdp.integrations import bench

    budget = memory_budget()
    verify = os.environ.get("GHOSTDP_GPU_CHECK_VERIFY") == "1"
    path = results.with_suffix(".json")
    table = json.loads(path.read_text()) if path.exists() else {"runs": {}, "rows": []}
    known = {(r["case"], r["engine"]): r for r in table["rows"]}
    found = []
    for case in bench_cases().values():
        for engine in engines():
            peaks = {}
            row = known.get((case.id, engine))
            if row and row["status"] == "ok" and row["peak_bytes"]:
                peaks[case.batch_size] = row["peak_bytes"]
            for b in (2, case.batch_size):
                if b not in peaks:
                    rec = bench.measure_in_subprocess(dc.replace(case, batch_size=b), engine, steps=2, warmup=0)
                    if rec["status"] != "ok":
                        break
                    peaks[b] = rec["peak_bytes"]
            best = bench.predict_max_batch(peaks, budget) if len(peaks) == 2 else None
            how = f"predicted from peaks at B={sorted(peaks)}" if best else "no prediction: " + (
                "a batch did not run" if len(peaks) < 2 else "B=2 does not fit")
            if best and verify:
                rec = bench.measure_in_subprocess(dc.replace(case, batch_size=best), engine, steps=1, warmup=1,
                                                  memory_budget=budget)
                how += f"; verified: {rec['status']}"
            log.info("max batch %s %s: %s (%s)", case.id, engine, best, how)
            found.append({"case": case.id, "engine": engine, "max_batch": best, "method": how})
            if row:  # written at once, so a stage stopped at its limit keeps what it found
                row.update(max_batch=best, max_batch_budget_bytes=budget, max_batch_method=how)
                bench.write_results(table, results, title=TITLE)
    return {"status": "passed", "budget_bytes": budget, "max_batch": found,
            "summary": "; ".join(f"{f['case'].split('-T')[0]} {f['engine']}: {f['max_batch']}" for f in found)}


def run_stage(name: str, out: Path, results: Path) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if name == "env":
        record = stage_env()
    elif name == "engine":
        record = stage_engine()
    elif name.startswith("bench-"):
        record = stage_bench(name, results)
    elif name == "max-batch":
        record = stage_max_batch(results)
    else:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    out.write_text(json.dumps(record, default=str))
    return 0 if record["status"] == "passed" else 1



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", required=True, choices=STAGES)
    p.add_argument("--stage-out", required=True, help="where the stage's record goes (JSON)")
    p.add_argument("--results-dir", required=True)
    p.add_argument("--bench-stem", required=True, help="file stem of the benchmark table in --results-dir")
    ns = p.parse_args(argv)
    return run_stage(ns.stage, Path(ns.stage_out), Path(ns.results_dir) / ns.bench_stem)


if __name__ == "__main__":
    sys.exit(main())
