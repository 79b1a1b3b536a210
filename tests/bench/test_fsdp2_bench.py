"""The FSDP2 bench harness (ghostdp.integrations.bench.fsdp2): ratios, goals and Markdown from records, and one
tiny real run (2 forked gloo ranks per engine, ~15 s)."""
from __future__ import annotations

import json

import pytest

from ghostdp.integrations.bench import fsdp2 as F


def _records(peaks, times, cpu=None):
    """One group: per rank its peak and its step times."""
    return [{"rank": r, "engine": "x", "status": "ok", "peak_bytes": p, "setup_bytes": 10, "step_times": t,
             "cpu_times": (cpu or t)} for r, (p, t) in enumerate(zip(peaks, times))]


def test_a_step_is_its_slowest_ranks_and_ratios_divide_the_same_run():
    np_groups = [_records([100, 110], [[1.0, 2.0], [1.5, 1.0]]), _records([100, 100], [[1.2], [1.1]])]
    dp_groups = [_records([130, 120], [[1.8, 2.4], [1.2, 2.6]])]
    rows = F.add_ratios([F.summarize(F.NON_PRIVATE, np_groups), F.summarize("ghostdp-auto-torch", dp_groups)])
    base, dp = rows
    assert F.step_times(np_groups) == [1.5, 2.0, 1.2]
    assert base["step_min_s"] == 1.2 and base["step_median_s"] == 1.5
    assert base["peak_bytes_per_rank"] == [100, 105] and base["peak_bytes"] == 105  # median per rank, busiest rank
    assert dp["peak_bytes"] == 130 and dp["memory_ratio"] == pytest.approx(130 / 105)
    assert dp["time_ratio_min"] == pytest.approx(1.8 / 1.2) and dp["time_ratio_median"] == pytest.approx(2.2 / 1.5)
    assert base["memory_ratio"] == 1.0
    goals = {g["goal"]: g["met"] for g in F.goals(rows)}
    assert goals == {"memory / non-private <= 1.1": False, "wall time (min) / non-private <= 1.35": False}


def test_a_failed_rank_makes_the_row_fail_without_ratios():
    bad = [{"rank": 0, "engine": "x", "status": "error: boom", "step_times": [], "cpu_times": []},
           {"rank": 1, "engine": "x", "status": "ok", "peak_bytes": 5, "step_times": [1.0], "cpu_times": [1.0]}]
    rows = F.add_ratios([F.summarize(F.NON_PRIVATE, [_records([1, 1], [[1.0], [1.0]])]),
                         F.summarize("ghostdp-auto-torch", [bad])])
    assert rows[1]["status"] == "error: boom" and rows[1]["peak_bytes"] is None and rows[1]["memory_ratio"] is None
    assert F.goals(rows) == []


def test_case_validation():
    with pytest.raises(ValueError, match="num_attention_heads"):
        F.FSDP2Case(hidden_size=100, num_attention_heads=8)
    with pytest.raises(ValueError, match="seq_len"):
        F.FSDP2Case(seq_len=1)
    with pytest.raises(ValueError, match="batch_per_rank"):
        F.FSDP2Case(batch_per_rank=0)


def test_tiny_two_process_run_writes_json_and_markdown(tmp_path):
    stem = tmp_path / "fsdp2_tiny"
    code = F.main(["--hidden-size", "32", "--intermediate-size", "64", "--num-hidden-layers", "2",
                   "--num-attention-heads", "2", "--vocab-size", "128", "--seq-len", "8", "--batch-per-rank", "2",
                   "--rounds", "1", "--steps", "1", "--warmup", "0", "--out", str(stem)])
    assert code == 0
    result = json.loads(stem.with_suffix(".json").read_text())
    rows = {r["engine"]: r for r in result["rows"]}
    assert set(rows) == set(F.DEFAULT_ENGINES)
    for r in rows.values():
        assert r["status"] == "ok" and r["n_steps"] == 1 and len(r["peak_bytes_per_rank"]) == 2
        assert r["peak_bytes"] > 0 and r["step_min_s"] > 0
    assert rows["ghostdp-auto-torch"]["held_bytes"] > 0  # the probe saw the engine's book-keeping
    md = stem.with_suffix(".md").read_text()
    assert "python -m ghostdp.integrations.bench.fsdp2" in md and "| ghostdp-auto-torch |" in md
    assert "## Goals" in md and "## Where the peak is" in md
