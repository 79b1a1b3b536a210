"""Result tables: rows per (case, engine), same-run ratios to non-private, the goals, JSON and Markdown.

Every ratio divides figures of the same run: a row's ratio is taken against the ``non-private`` row of the
same case and the same ``run`` id only (:func:`add_ratios`), and merging a new run into an old file keeps
the old base rows its other rows still divide by (:func:`merge_results`). Each run records the device
name, library versions, commit, date and CPU load (:func:`environment`).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ghostdp.integrations.bench.engines import NON_PRIVATE
from ghostdp.integrations.bench.workloads import Case

log = logging.getLogger(__name__)

#: Goals of issue 6, as ratios ghostdp / non-private of the same run (and against Opacus).
GOALS = {
    "lora": {"memory_ratio": 1.05, "time_ratio": 1.15},
    "full": {"memory_ratio": 1.15, "time_ratio": 1.30, "opacus_hooks_memory_factor": 3.0},
}



def _git_commit() -> str | None:
    import ghostdp

    root = Path(ghostdp.__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "ghostdp", "bench"],
                               cwd=root, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+uncommitted-changes" if dirty.strip() else "")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    """Device name, library versions, commit, date and CPU load: what a figure needs to be read."""
    import importlib.metadata as md

    import torch

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = f"CPU: {_cpu_name()}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"
    env = {
        "device": name,
        "commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        **{pkg: version(pkg) for pkg in ("torch", "transformers", "peft", "opacus", "triton", "ghostdp")},
    }
    if hasattr(os, "getloadavg"):
        env["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    return env


def summarize(run: str, case: Case, engine: str, records: Sequence[dict], *, timing: str,
              times: Sequence[float] | None = None, cpu_times: Sequence[float] | None = None) -> dict:
    """One table row from the records of one (case, engine): min / median wall and CPU time per step
    over every timed step (``times`` / ``cpu_times`` override the records' own), median peak memory.

    CPU time (``time.process_time``) is kept beside wall time because on a shared CPU a process that
    is descheduled loses wall time but not CPU time: with one torch thread it is the steadier figure.
    """
    status = next((r["status"] for r in records if r["status"] != "ok"), "ok") if records else "not run"
    all_times = list(times) if times is not None else [t for r in records for t in r["step_times"]]
    all_cpu = list(cpu_times) if cpu_times is not None else [t for r in records for t in r.get("cpu_times", [])]
    if case.device.startswith("cuda"):
        all_cpu = []  # host CPU time says nothing about GPU work
    peaks = [r["peak_bytes"] for r in records if r.get("peak_bytes") is not None and r["status"] == "ok"]
    trainable = next((r["trainable"] for r in records if r.get("trainable")), None)
    row = {
        "run": run, "case": case.id, "model": case.model, "mode": case.mode, "untied": case.untie_embeddings,
        "seq_len": case.seq_len, "batch_size": case.batch_size, "device": case.device, "dtype": case.dtype,
        "engine": engine, "status": status, "trainable": trainable, "timing": timing,
        "n_steps": len(all_times),
        "step_min_s": min(all_times) if all_times else None,
        "step_median_s": statistics.median(all_times) if all_times else None,
        "cpu_min_s": min(all_cpu) if all_cpu else None,
        "cpu_median_s": statistics.median(all_cpu) if all_cpu else None,
        "peak_bytes": int(statistics.median(peaks)) if peaks else None,
        "memory_kind": next((r.get("memory_kind") for r in records if r.get("memory_kind")), None),
        "isolated_step_s": [round(t, 6) for r in records if r.get("isolated") for t in r["step_times"]],
        "isolated_cpu_s": [round(t, 6) for r in records if r.get("isolated") for t in r.get("cpu_times", [])],
        "max_batch": None, "max_batch_budget_bytes": None,
    }
    if status == "ok" and not all_times:
        row["status"] = "ok (memory only)"
    return row


def add_ratios(rows: list[dict]) -> list[dict]:
    """Ratios to the ``non-private`` row of the same case *and the same run*; None where there is none."""
    base = {(r["run"], r["case"]): r for r in rows if r["engine"] == NON_PRIVATE}

    def ratio(a, b):
        return a / b if a is not None and b else None

    for r in rows:
        b = base.get((r["run"], r["case"]))
        r["time_ratio_min"] = ratio(r["step_min_s"], b["step_min_s"]) if b else None
        r["time_ratio_median"] = ratio(r["step_median_s"], b["step_median_s"]) if b else None
        r["cpu_ratio_min"] = ratio(r.get("cpu_min_s"), b.get("cpu_min_s")) if b else None
        r["cpu_ratio_median"] = ratio(r.get("cpu_median_s"), b.get("cpu_median_s")) if b else None
        r["memory_ratio"] = ratio(r["peak_bytes"], b["peak_bytes"]) if b else None
    return rows


def goal_engine(rows: Iterable[dict], case: str) -> dict | None:
    """The ghostdp row a goal is judged on: clipping=auto, the Triton kernels when they ran, else the twins."""
    by = {r["engine"]: r for r in rows if r["case"] == case}
    for name in ("ghostdp-auto-triton", "ghostdp-auto-torch"):
        if name in by and by[name]["status"] == "ok":
            return by[name]
    return None


def goals(rows: list[dict]) -> list[dict]:
    """Issue 6's goals per case, met or missed, from the rows' same-run ratios."""
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        g = goal_engine(rows, case)
        limits = None if g is None else GOALS.get(g["mode"])
        if limits is None:  # no ghostdp row that ran, or a mode without stated goals
            continue
        by = {r["engine"]: r for r in rows if r["case"] == case and r["run"] == g["run"]}

        def check(goal: str, measured: float | None, ok: Callable[[float], bool]) -> None:
            out.append({"case": case, "engine": g["engine"], "goal": goal, "measured": measured,
                        "met": None if measured is None else bool(ok(measured))})

        check(f"memory / non-private <= {limits['memory_ratio']}", g["memory_ratio"],
              lambda m: m <= limits["memory_ratio"])
        # On a CPU shared with other processes, CPU time is the steadier figure; wall time on CUDA.
        cpu = g.get("cpu_ratio_min") is not None
        check(f"{'CPU' if cpu else 'wall'} time / non-private (min) <= {limits['time_ratio']}",
              g["cpu_ratio_min"] if cpu else g["time_ratio_min"], lambda m: m <= limits["time_ratio"])
        if g["mode"] == "full":
            hooks = by.get("opacus-hooks")
            factor = (hooks["peak_bytes"] / g["peak_bytes"]
                      if hooks and hooks["peak_bytes"] and g["peak_bytes"] else None)
            need = limits["opacus_hooks_memory_factor"]
            check(f"opacus-hooks memory / ghostdp memory >= {need}", factor, lambda m: m >= need)
            og = by.get("opacus-ghost")
            key = "cpu_min_s" if cpu else "step_min_s"
            rel = g[key] / og[key] if og and og.get(key) and g.get(key) else None
            check(f"ghostdp {'CPU' if cpu else 'wall'} time / opacus-ghost (min) < 1", rel, lambda m: m < 1)
    return out


def new_result(run: str, env: dict, settings: dict, rows: list[dict]) -> dict:
    return {"runs": {run: {**env, "settings": settings}}, "rows": add_ratios(rows)}


def merge_results(old: dict | None, new: dict) -> dict:
    """Rows of ``new`` replace the rows of ``old`` for the same (case, engine), except that an old
    ``non-private`` row stays while an old row of its run and case does: it is their ratios' base.
    Runs no row refers to are dropped; the table names the run of every row."""
    if not old:
        return new
    keys = {(r["case"], r["engine"]) for r in new["rows"]}
    kept = [r for r in old.get("rows", []) if (r["case"], r["engine"]) not in keys]
    based = {(r["run"], r["case"]) for r in kept if r["engine"] != NON_PRIVATE}
    bases = [r for r in old.get("rows", []) if r["engine"] == NON_PRIVATE and (r["case"], r["engine"]) in keys
             and (r["run"], r["case"]) in based]
    rows = kept + bases + new["rows"]
    order = {case: i for i, case in enumerate(dict.fromkeys(r["case"] for r in rows))}
    runs = {**old.get("runs", {}), **new["runs"]}
    run_order = {run: i for i, run in enumerate(runs)}
    rows.sort(key=lambda r: (order[r["case"]], run_order.get(r["run"], -1), r["engine"] != NON_PRIVATE))
    used = {r["run"] for r in rows}
    return {"runs": {k: v for k, v in runs.items() if k in used}, "rows": rows}


def format_bytes(n: float | None) -> str:
    """A byte count for tables: "512 B", "1.5 MiB"; "-" for None."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def timing_cells(r: dict) -> str:
    """A result row's four timing columns: wall s min / median, x np, CPU s min / median, x np."""
    return (f"| {_fmt(r['step_min_s'], '.3f')} / {_fmt(r['step_median_s'], '.3f')} "
            f"| {_fmt(r['time_ratio_min'], '.2f')} / {_fmt(r['time_ratio_median'], '.2f')} "
            f"| {_fmt(r.get('cpu_min_s'), '.3f')} / {_fmt(r.get('cpu_median_s'), '.3f')} "
            f"| {_fmt(r.get('cpu_ratio_min'), '.2f')} / {_fmt(r.get('cpu_ratio_median'), '.2f')} ")


def markdown(result: dict, *, title: str = "ghostdp vs non-private vs Opacus") -> str:
    """The result as Markdown: each run's environment, one table, the goals."""
    lines = [f"# {title}", ""]
    label = {run: f"r{i + 1}" for i, run in enumerate(result["runs"])}
    for run, env in result["runs"].items():
        s = env.get("settings", {})
        lines.append(
            f"- {label[run]} = run `{run}`: {env['device']}; torch {env.get('torch')}, "
            f"transformers {env.get('transformers')}, "
            f"peft {env.get('peft')}, opacus {env.get('opacus')}, triton {env.get('triton')}; commit "
            f"{env.get('commit')}; {env.get('date')}; load average at start {env.get('load_average_start')}"
            + (f", at end {env.get('load_average_end')}" if env.get("load_average_end") else "")
            + (f"; timing: {s.get('timing')}" if s.get("timing") else "")
            + (f"; {s.get('rounds')} rounds x {s.get('steps')} steps after {s.get('warmup')} warm-up"
               if s.get("rounds") is not None else "")
            + (f"; {s['threads']} torch thread(s) in measured processes" if s.get("threads") else "")
        )
    lines += [
        "",
        "Step: forward, per-example loss, backward, optimizer step (AdamW), zero_grad; C = 1, sigma = 1. "
        "`x np`: ratio to the non-private row of the same case and run, of the minima (least disturbed "
        "by other processes) / of the medians. CPU s: process CPU time per step (CPU runs only; steadier "
        "than wall time on a shared machine, and the figure CPU goals are judged on). Peak memory: CUDA "
        "max_memory_allocated; CPU: peak RSS of a fresh process during the steps minus its RSS after "
        "imports and a throwaway miniature step (glibc mmap threshold fixed at 64 KiB, so freed tensors "
        "leave RSS). Both include weights and optimizer state.",
        *(["", "CPU runs: on a machine other jobs share, the step times of one run move by 10-30% between "
               "steps; read ratios within a run, and trust rows with more timed steps (n) more. The PyTorch "
               "twins run there, never the Triton kernels."]
          if any(env.get("device", "").startswith("CPU") for env in result["runs"].values()) else []),
        "",
        "| case | engine | run | trainable | wall s min / median | x np | CPU s min / median | x np | n "
        "| peak memory | memory x np | max batch | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        mb = "-" if r.get("max_batch_budget_bytes") is None else (
            f"{r['max_batch'] if r['max_batch'] is not None else 'none'} @ {format_bytes(r['max_batch_budget_bytes'])}")
        lines.append(
            f"| {r['case']} | {r['engine']} | {label.get(r['run'], r['run'])} | {_fmt(r['trainable'], ',')} "
            f"{timing_cells(r)}| {r['n_steps']} "
            f"| {format_bytes(r['peak_bytes'])} | {_fmt(r['memory_ratio'], '.3f')} | {mb} | {r['status']} |")
    checks = goals(result["rows"])
    if checks:
        lines += ["", "## Goals", "", "| case | engine | goal | measured | met |", "|---|---|---|---|---|"]
        for c in checks:
            met = "n/a" if c["met"] is None else ("yes" if c["met"] else "**no**")
            lines.append(f"| {c['case']} | {c['engine']} | {c['goal']} | {_fmt(c['measured'], '.3f')} | {met} |")
    return "\n".join(lines) + "\n"


def write_results(result: dict, stem: str | Path, *, merge: bool = False, title: str | None = None) -> dict:
    """Write ``<stem>.json`` and ``<stem>.md``; with ``merge``, keep the other cases already in the JSON."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path = stem.with_suffix(".json")
    if merge and json_path.exists():
        result = merge_results(json.loads(json_path.read_text()), result)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result, **({"title": title} if title else {})))
    log.info("wrote %s.{json,md}", stem)
    return result
