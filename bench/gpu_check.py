"""The GPU check: one command, run once on a machine with one CUDA GPU (H100/H200 class), about 8 minutes.

    bash bench/gpu_check.sh                                # every stage
    bash bench/gpu_check.sh --skip kernels,max-batch       # leave out the slow parts
    bash bench/gpu_check.sh --only bench-lora-7b --limit bench-lora-7b=300
    bash bench/gpu_check.sh --dry-run --results-dir /tmp/x # what would run; no GPU work, nothing installed

Stages, in order, each in its own process group under its own time limit (seconds; the sum stays within
the overall ``--budget-s``, 480 by default, and a stage never runs past what is left of it):

==============  =====  ===========================================================================
wheels             15  install what is missing (opacus, prv-accountant, pytest, ...) from ``.whl/`` into
                       ``.whl/site`` (``make gpu-wheels`` downloads them where pip can reach PyPI)
env                40  versions, the device; ghostdp imports from the checkout (PYTHONPATH=.) and runs a
                       step and an RDP epsilon with prv-accountant, opacus and gguf blocked
kernels-real       55  ``pytest tests/kernels -m gpu``: the Triton kernels against their twins at Llama-2-7B
                       sizes (compiled, not interpreted)
kernels            75  ``pytest tests/kernels -m "not gpu"``: every kernel test, compiled for this GPU (but
                       the ahead-of-time compile matrix, which CI runs)
engine             55  ``pytest tests/engine/test_engine_gpu.py`` and ``bench/gpu_engine_check.py``: one DP
                       step vs the float64 reference in fp32 and bf16, twins and kernels, full and LoRA,
                       backward under ``torch.cuda.set_sync_debug_mode("error")``
bench-lora-7b     100  Llama-2-7B shapes (random weights), LoRA r=16 on all linear layers, T=1024, B=8, bf16
bench-full-1b      65  a 1.1B Llama (random weights), full fine-tuning, T=1024, B=8, bf16
max-batch          65  the largest batch of each engine in the GPU's memory, predicted from peaks at B=2
                       and B=8 (``predict_max_batch``); ``GHOSTDP_GPU_CHECK_VERIFY=1`` confirms each by a run
==============  =====  ===========================================================================

The bench stages compare non-private training, ghostdp (clipping auto, Triton kernels) and Opacus (ghost
and hooks) with ``ghostdp.integrations.bench`` (memory in a fresh process per engine, then 3-5 timed steps);
``GHOSTDP_GPU_CHECK_ENGINES`` (comma-separated) changes the engines. Without CUDA, or with ``--dry-run``,
every GPU stage is skipped with its reason. Results, named by the device: ``<results-dir>/gpu_check_<device>``
``.{json,md,log}`` (stages) and ``engines_gpu_check_<device>.{json,md}`` (the benchmark table);
``--copy-to DIR`` copies them there after every stage.

This driver imports only the standard library (nothing may be imported before the wheels stage); the
stages that run Python of their own live in ``bench/gpu_check_stages.py``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("gpu_check")
REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".whl"
SITE = WHEELS / "site"
#: distribution (as its wheel file names it) -> module: what the check needs beyond torch, triton,
#: transformers and peft. scipy and numpy are large compiled wheels: most GPU images have them.
NEEDED = {"opacus": "opacus", "prv_accountant": "prv_accountant", "opt_einsum": "opt_einsum", "scipy": "scipy",
          "numpy": "numpy", "pytest": "pytest", "pluggy": "pluggy", "iniconfig": "iniconfig", "packaging": "packaging"}
PYTEST = ["-m", "pytest", "-v", "-p", "no:cacheprovider", "-rfEs"]


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    limit_s: int
    needs_cuda: bool
    commands: tuple[tuple[str, ...], ...]  # python arguments, run one after another under the stage's limit


STAGES = (
    Stage("wheels", 15, False, ()),  # runs in the driver: nothing may import before it
    Stage("env", 40, False, (("bench/gpu_check_stages.py", "--stage", "env"),)),
    Stage("kernels-real", 55, True, ((*PYTEST, "tests/kernels", "-m", "gpu"),)),
    # The ahead-of-time compile matrix is CPU work that CI already runs: not worth GPU minutes.
    Stage("kernels", 75, True, ((*PYTEST, "tests/kernels", "-m", "not gpu",
                                 "--ignore=tests/kernels/test_kernel_aot.py"),)),
    Stage("engine", 55, True, ((*PYTEST, "tests/engine/test_engine_gpu.py"),
                               ("bench/gpu_check_stages.py", "--stage", "engine"))),
    Stage("bench-lora-7b", 100, True, (("bench/gpu_check_stages.py", "--stage", "bench-lora-7b"),)),
    Stage("bench-full-1b", 65, True, (("bench/gpu_check_stages.py", "--stage", "bench-full-1b"),)),
    Stage("max-batch", 65, True, (("bench/gpu_check_stages.py", "--stage", "max-batch"),)),
)
STAGE_NAMES = [s.name for s in STAGES]


# ----------------------------------------------------------------------------------------------- driver

def install_wheels(dry_run: bool) -> dict:
    """Install, without dependencies and without the network, each package of :data:`NEEDED` that does not
    import, from its wheel in ``.whl/`` into ``.whl/site`` (put on the path of every later stage)."""
    if SITE.exists():  # installed by an earlier run
        sys.path.insert(0, str(SITE))
    missing = [dist for dist, module in NEEDED.items() if importlib.util.find_spec(module) is None]
    if not missing:
        return {"status": "passed", "summary": "nothing to install: " + ", ".join(NEEDED) + " import"}
    wheels = {dist: sorted(WHEELS.glob(f"{dist}-*.whl"), key=lambda p: p.name.lower()) for dist in missing}
    absent = [d for d, found in wheels.items() if not found]
    chosen = [str(found[-1]) for found in wheels.values() if found]
    if dry_run:
        return {"status": "skipped", "reason": "--dry-run", "summary": f"would install {missing} from {chosen}; "
                f"no wheel for {absent}" if absent else f"would install {missing}"}
    if chosen:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--upgrade", "--target", str(SITE), *chosen]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            return {"status": "failed", "summary": f"pip install failed: {proc.stderr.strip()[-500:]}"}
        sys.path.insert(0, str(SITE))
        importlib.invalidate_caches()
    if absent:
        return {"status": "failed", "summary": f"missing with no wheel in {WHEELS}: {', '.join(absent)}; run `make "
                f"gpu-wheels` (GPU_WHEELS_EXTRA='NAME==VERSION ...' for scipy or numpy) where pip reaches PyPI, "
                f"and carry .whl/ here"}
    return {"status": "passed", "summary": f"installed into {SITE}: {', '.join(Path(c).name for c in chosen)}"}


def child_env() -> dict:
    # The checkout first: a wheel's stray top-level package (opacus ships `benchmarks`, `examples`) never
    # shadows the repository's own `tests` or `ghostdp`.
    parts = [str(REPO), *([str(SITE)] if SITE.exists() else [])]
    parts += [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x and x != "."]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(parts), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def pytest_counts(text: str) -> dict:
    counts: dict[str, int] = {}
    for outcome in re.findall(r"::\S+ (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", text):
        counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, flags=re.M)
    return {"counts": counts, "failed_tests": failed[:30]}


def run_commands(stage: Stage, limit: float, results: Path, logfile: Path) -> dict:
    """The stage's commands in a new process group each, killed as a group when the stage's time is spent."""
    record: dict = {"status": "passed", "summary": ""}
    deadline = time.monotonic() + limit
    for args in stage.commands:
        out = logfile.parent / f"{stage.name}.json"  # the stage's record, beside the log in a scratch folder
        out.unlink(missing_ok=True)
        cmd = [sys.executable, *args]
        if args[0].endswith("gpu_check_stages.py"):
            cmd += ["--stage-out", str(out), "--results-dir", str(results.parent), "--bench-stem", results.name]
        with open(logfile, "a") as fh:
            fh.write(f"\n===== {stage.name}: {' '.join(args)}\n")
            fh.flush()
            start = len(logfile.read_text())
            proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = None
        text = logfile.read_text()[start:]
        reported = out.exists()
        if args[1:2] == ("pytest",):
            part = pytest_counts(text)
            record.setdefault("pytest", []).append({"args": list(args[6:]), **part})
            record["summary"] += f"{' '.join(args[6:])}: {part['counts']}; "
        elif reported:
            part = json.loads(out.read_text())
            out.unlink()
            record.update({k: v for k, v in part.items() if k not in ("status", "summary")})
            record["summary"] += part.get("summary", "") + "; "
        if code is None:
            record.update(status="timed out", reason=f"over its limit of {limit:.0f} s (partial output in the log)")
            break
        if code != 0:
            record["status"] = "failed"
            if not (reported or args[1:2] == ("pytest",)):
                record["summary"] += f"exit code {code}, see the log; "
    record["summary"] = record["summary"].rstrip("; ")
    return record


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['device']}", "",
             f"- {report['date']}; commit {report['commit']}; total {report['seconds']:.0f} s of a "
             f"{report['budget_s']} s budget; {' '.join(report['argv']) or 'no options'}",
             f"- versions: {report.get('versions')}", "",
             "| stage | status | seconds | limit | summary |", "|---|---|---|---|---|"]
    for r in report["stages"]:
        text = (r.get("summary") or "") + (f" ({r['reason']})" if r.get("reason") else "")
        lines.append(f"| {r['stage']} | {r['status']} | {r['seconds']:.0f} | {r['limit_s']:.0f} | "
                     f"{text.replace('|', '/')} |")
    lines += ["", "Benchmark table: `engines_gpu_check_<device>.md` beside this file; log: `gpu_check_<device>.log`."]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="install nothing, run no GPU stage; say what would run")
    p.add_argument("--skip", default=os.environ.get("GHOSTDP_GPU_CHECK_SKIP", ""),
                   help="comma-separated stages to leave out (env GHOSTDP_GPU_CHECK_SKIP): " + ", ".join(STAGE_NAMES))
    p.add_argument("--only", default=os.environ.get("GHOSTDP_GPU_CHECK_ONLY", ""),
                   help="comma-separated stages to run, the others skipped (env GHOSTDP_GPU_CHECK_ONLY)")
    p.add_argument("--limit", action="append", default=[], metavar="STAGE=SECONDS", help="a stage's own time limit")
    p.add_argument("--budget-s", type=float, default=float(os.environ.get("GHOSTDP_GPU_CHECK_BUDGET_S", 480)),
                   help="overall time limit in seconds (default 480, env GHOSTDP_GPU_CHECK_BUDGET_S)")
    p.add_argument("--results-dir", default=None, help="where results go (default bench/results; a dry run "
                   "writes files only when this is given)")
    p.add_argument("--copy-to", default=None, help="also copy the result files here after every stage")
    ns = p.parse_args(argv)
    for group in ("skip", "only"):
        names = [n for n in getattr(ns, group).split(",") if n]
        unknown = set(names) - set(STAGE_NAMES)
        if unknown:
            p.error(f"--{group}: unknown stage(s) {sorted(unknown)}; stages: {', '.join(STAGE_NAMES)}")
        setattr(ns, group, names)
    try:
        ns.limit = {k: float(v) for k, v in (item.split("=", 1) for item in ns.limit)}
    except ValueError:
        p.error("--limit takes STAGE=SECONDS")
    if set(ns.limit) - set(STAGE_NAMES):
        p.error(f"--limit: unknown stage(s) {sorted(set(ns.limit) - set(STAGE_NAMES))}")
    return ns


def skip_reason(stage: Stage, ns, *, env_ok: bool, cuda: bool, limit: float) -> str | None:
    """Why ``stage`` does not run, or None."""
    if stage.name in ns.skip:
        return "--skip"
    if ns.only and stage.name not in ns.only:
        return "not in --only"
    if stage.needs_cuda and not env_ok:
        return "the env stage did not pass (see its row and the log)"
    if stage.needs_cuda and not cuda:
        return "CUDA is not available here (torch.cuda.is_available() is False)"
    if stage.needs_cuda and ns.dry_run:
        return "--dry-run: no GPU work"
    if limit < 1:
        return "the overall budget is spent"
    return None


def main(argv=None) -> int:
    ns = parse_args(argv if argv is not None else sys.argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gpu_check %(message)s", stream=sys.stderr)
    t0 = time.monotonic()
    write = not ns.dry_run or ns.results_dir is not None
    results_dir = Path(ns.results_dir or REPO / "bench" / "results")
    results_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="ghostdp-gpu-check-"))
    logfile = scratch / "log"
    logfile.write_text("")
    report = {"device": "unknown", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": os.environ.get("GHOSTDP_COMMIT") or _git_commit(), "argv": sys.argv[1:] if argv is None
              else list(argv), "budget_s": ns.budget_s, "dry_run": ns.dry_run, "stages": []}
    cuda, slug, env_ok = False, None, False
    for stage in STAGES:
        left = ns.budget_s - (time.monotonic() - t0)
        limit = min(ns.limit.get(stage.name, stage.limit_s), left)
        started = time.monotonic()
        reason = skip_reason(stage, ns, env_ok=env_ok, cuda=cuda, limit=limit)
        if reason:
            record = {"status": "skipped", "reason": reason}
        elif stage.name == "wheels":
            record = install_wheels(ns.dry_run)
        else:
            record = run_commands(stage, limit, results_dir / f"engines_gpu_check_{slug or 'pending'}", logfile)
        if stage.name == "env" and record["status"] == "passed":
            env_ok, cuda, report["device"] = True, record["cuda"], record["device"]
            report["versions"] = {**record["versions"], "python": record["python"]}
            slug = device_slug(record["device"])
        record.update(stage=stage.name, seconds=time.monotonic() - started, limit_s=limit)
        log.info("%s: %s%s %s", stage.name, record["status"], f" ({record['reason']})" if record.get("reason")
                 else "", record.get("summary", ""))
        report["stages"].append(record)
        report["seconds"] = time.monotonic() - t0
        if write and slug:  # named by the device, known once the env stage has run
            _write(report, results_dir, slug, logfile, ns.copy_to)
    if write and not slug:
        _write(report, results_dir, "unknown-device", logfile, ns.copy_to)
    sys.stdout.write(markdown(report))
    shutil.rmtree(scratch, ignore_errors=True)
    return 1 if any(r["status"] in ("failed", "timed out") for r in report["stages"]) else 0


def _write(report: dict, results_dir: Path, slug: str, logfile: Path, copy_to: str | None) -> None:
    stem = results_dir / f"gpu_check_{slug}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    shutil.copyfile(logfile, stem.with_suffix(".log"))
    if copy_to:
        Path(copy_to).mkdir(parents=True, exist_ok=True)
        for path in results_dir.glob(f"*gpu_check_{slug}.*"):
            shutil.copy(path, copy_to)


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    sys.exit(main())
