"""``ghostdp audit`` end to end on the tiny model: a broken run exits 3 loudly, the real one 0; report files."""
from __future__ import annotations

import json

import pytest
import torch

from ghostdp.cli import main

TINY = ["audit", "--model", "tiny", "--num-canaries", "64", "--canary-length", "8", "--steps", "100",
        "--expected-batch-size", "8", "--learning-rate", "1e-2", "--seed", "0", "--threads", "1"]


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_broken_run_fails_loudly(tmp_path, capsys):
    code = main(TINY + ["--noise-multiplier", "0", "--claimed-epsilon", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 3
    assert "PRIVACY AUDIT FAILED" in out
    summary = json.loads((tmp_path / "audit.json").read_text())
    assert summary[0]["exceeds_claim"] and summary[0]["epsilon_lower_bound"] > 1.0
    assert "LOWER BOUND EXCEEDS THE CLAIM" in (tmp_path / "audit_report.md").read_text()
    assert (tmp_path / "audit_scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "included" not in summary[0]  # the coin flips are not published


def test_real_run_passes(tmp_path, capsys):
    code = main(TINY + ["--target-epsilon", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    summary = json.loads((tmp_path / "audit.json").read_text())
    assert summary[0]["epsilon_lower_bound"] <= summary[0]["accountant_epsilon"] <= 1.0
    assert "PRIVACY AUDIT FAILED" not in out


def test_usage_errors(capsys):
    assert main(["audit", "--model", "tiny", "--canary-kind", "secret_text"]) == 2
    assert main(["audit", "--model", "tiny", "--target-epsilon", "-1"]) == 2
    assert main(["audit", "--target-epsilon", "1", "--noise-multiplier", "0"]) == 2  # mutually exclusive


def test_help_lists_audit(capsys):
    assert main(["--help"]) == 0
    assert "audit" in capsys.readouterr().out
    assert main(["audit", "--help"]) == 0
    assert "--num-canaries" in capsys.readouterr().out
