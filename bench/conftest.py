"""Collect bench/bench_*.py (pytest only collects test_*.py by default), so `pytest bench/` runs
them; files named on the command line are collected by pytest itself."""

from __future__ import annotations

import pytest


def pytest_collect_file(file_path, parent):
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
