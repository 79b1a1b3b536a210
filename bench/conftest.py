"""Collect bench/bench_*.py (pytest only collects test_*.py by default), so `pytest bench/` runs
them; files named on the command line are collected by pytest itself.

The FSDP2 comparison is not a pytest-benchmark suite: its figures come from process groups of several
ranks that it starts itself, not from timing a call in this process. ``make bench`` names its command
at the end of the run."""

from __future__ import annotations

import pytest

FSDP2_NOTE = ("FSDP2 (ghostdp vs non-private fully_shard, 2 CPU ranks over gloo, per-rank peak memory and step "
              "time) runs on its own: ghostdp bench --fsdp2 [--out bench/results/fsdp2_cpu]; see ghostdp bench "
              "--help and bench/results/fsdp2_cpu.md")


def pytest_collect_file(file_path, parent):
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(FSDP2_NOTE)
