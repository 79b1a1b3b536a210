"""The GPU check (bench/gpu_check.sh, gpu_check.py, gpu_check_stages.py) where there is no GPU: the dry run
skips every GPU stage and says why, the env stage proves ghostdp imports and steps without prv-accountant,
opacus and gguf, a stage over its limit is killed with its process group, the wheels stage finds what to
install, and the benchmark stages work on a tiny CPU case."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO

GPU_STAGES = ["kernels-real", "kernels", "engine", "bench-lora-7b", "bench-full-1b", "max-batch"]


def _load(name: str):
    """bench/<name>.py as a module (bench/ is no package), loaded once."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def _driver():
    return _load("gpu_check")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """``bash bench/gpu_check.sh --dry-run`` as a user runs it (this interpreter as its python)."""
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # the script must find ghostdp from the checkout by itself
    # A loaded two-core CI machine imports torch and transformers far slower than a GPU host: a wide env limit.
    cmd = ["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", "--results-dir", str(out), "--limit", "env=400"]
    proc = subprocess.run(cmd,
                          cwd="/", env=env, capture_output=True, text=True, timeout=600, check=False)
    return proc, out


def test_dry_run_skips_every_gpu_stage_and_says_why(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    slug = "cpu" if not torch.cuda.is_available() else None
    files = sorted(p.name for p in out.iterdir())
    report_path = next(out.glob("gpu_check_*.json"))
    if slug:
        assert files == ["gpu_check_cpu.json", "gpu_check_cpu.log", "gpu_check_cpu.md"]
    report = json.loads(report_path.read_text())
    stages = {r["stage"]: r for r in report["stages"]}
    assert list(stages) == ["wheels", "env", *GPU_STAGES]
    for name in GPU_STAGES:
        assert stages[name]["status"] == "skipped", name
        want = "CUDA is not available" if slug else "--dry-run"
        assert want in stages[name]["reason"], (name, stages[name]["reason"])
    assert report["dry_run"] is True
    md = (out / report_path.name).with_suffix(".md").read_text()
    for name in GPU_STAGES:
        assert f"| {name} | skipped |" in md
    assert proc.stdout == md  # the summary table is what the command prints


def test_env_stage_runs_ghostdp_without_the_optional_packages(dry_run):
    proc, out = dry_run
    env = next(r for r in json.loads(next(out.glob("gpu_check_*.json")).read_text())["stages"] if r["stage"] == "env")
    assert env["status"] == "passed", proc.stderr[-3000:]
    assert "without prv_accountant, opacus, gguf" in env["summary"]
    assert Path(env["ghostdp"]).resolve().is_relative_to(REPO)  # the checkout's package, not an installed copy
    assert env["epsilon_rdp"] > 0 and env["cuda"] == torch.cuda.is_available()
    # With prv-accountant present again, PRV gives a tighter (smaller) epsilon than the RDP bound.
    if env["optional_importable"]["prv_accountant"]:
        assert env["epsilon_prv"] <= env["epsilon_rdp"]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie is dead, waiting for a parent to reap it


def test_a_stage_over_its_limit_is_killed_with_its_children(tmp_path):
    gc = _driver()
    pid_file = tmp_path / "grandchild.pid"
    grandchild = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    code = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {grandchild!r}]); "
            "time.sleep(120)")
    stage = gc.Stage("sleepy", 10, False, (("-c", code),))
    record = gc.run_commands(stage, 10.0, tmp_path / "engines_gpu_check_x", tmp_path / "log")
    assert record["status"] == "timed out" and "limit of 10 s" in record["reason"]
    assert pid_file.exists(), "the grandchild never started: the check says nothing"
    pid = int(pid_file.read_text())
    for _ in range(50):  # SIGKILL is delivered at once; the kernel may take a moment to tear it down
        if not _alive(pid):
            break
        time.sleep(0.1)
    assert not _alive(pid), "the grandchild outlived its stage"


def test_wheels_stage_finds_the_wheel_of_a_missing_package(tmp_path, monkeypatch):
    gc = _driver()
    (tmp_path / "ghostdp_absent_pkg-1.0-py3-none-any.whl").write_bytes(b"")
    monkeypatch.setattr(gc, "WHEELS", tmp_path)
    monkeypatch.setattr(gc, "SITE", tmp_path / "site")
    monkeypatch.setattr(gc, "NEEDED", {"ghostdp_absent_pkg": "ghostdp_absent_pkg", "other_absent": "other_absent",
                                       "pytest": "pytest"})
    record = gc.install_wheels(dry_run=True)
    assert record["status"] == "skipped" and record["reason"] == "--dry-run"
    assert "ghostdp_absent_pkg-1.0-py3-none-any.whl" in record["summary"]
    assert "no wheel for ['other_absent']" in record["summary"]
    assert "'pytest'" not in record["summary"]  # importable here: nothing to install
    monkeypatch.setattr(gc, "NEEDED", {"pytest": "pytest"})
    assert gc.install_wheels(dry_run=False)["status"] == "passed"


def test_options_name_the_stages():
    gc = _driver()
    ns = gc.parse_args(["--skip", "kernels,max-batch", "--limit", "engine=30"])
    assert ns.skip == ["kernels", "max-batch"] and ns.limit == {"engine": 30.0}
    with pytest.raises(SystemExit):
        gc.parse_args(["--skip", "kernel"])
    reason = gc.skip_reason(gc.STAGES[2], argparse.Namespace(skip=[], only=["env"], dry_run=False),
                            env_ok=True, cuda=True, limit=60)
    assert reason == "not in --only"
    assert gc.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_bench_and_max_batch_stages_on_a_cpu_case(tmp_path, monkeypatch):
    """The two benchmark stages with their GPU case swapped for a tiny CPU one: one compare per engine, all
    of one run, so the ratios divide by that run's non-private row; the largest batch lands in the table."""
    from ghostdp.integrations import bench

    gc = _load("gpu_check_stages")
    case = bench.Case("tiny-llama", False, 128, 8)
    monkeypatch.setattr(gc, "bench_cases", lambda: {"bench-tiny": case})
    monkeypatch.setattr(gc, "memory_budget", lambda: 8 * 2**30)
    monkeypatch.setenv("GHOSTDP_GPU_CHECK_ENGINES", "non-private,ghostdp-auto-torch")
    stem = tmp_path / "engines_gpu_check_cpu"
    record = gc.stage_bench("bench-tiny", stem)
    assert record["status"] == "passed", record
    rows = json.loads(stem.with_suffix(".json").read_text())["rows"]
    assert [r["engine"] for r in rows] == ["non-private", "ghostdp-auto-torch"]
    assert len({r["run"] for r in rows}) == 1
    base, dp = rows
    assert dp["memory_ratio"] == pytest.approx(dp["peak_bytes"] / base["peak_bytes"])
    assert dp["time_ratio_min"] == pytest.approx(dp["step_min_s"] / base["step_min_s"])

    found = gc.stage_max_batch(stem)["max_batch"]
    assert [f["engine"] for f in found] == ["non-private", "ghostdp-auto-torch"]
    rows = json.loads(stem.with_suffix(".json").read_text())["rows"]
    for f, row in zip(found, rows):
        assert row["max_batch"] == f["max_batch"] and row["max_batch_budget_bytes"] == 8 * 2**30
        if f["max_batch"] is not None:  # RSS on a shared CPU is noisy: a flat line gives no prediction
            assert f["max_batch"] >= 8 and "peaks at B=[2, 8]" in f["method"]
    assert "@ 8.0 GiB" in stem.with_suffix(".md").read_text()
