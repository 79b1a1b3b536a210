"""The FSDP2 bench harness (ghostdp.integrations.bench.fsdp2): ratios, goals and Markdown from records, and one
tiny real run (2 forked gloo ranks per engine, ~15 s)."""
from __future__ import annotations

import dataclasses
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


# ------------------------------------------------------------------------------------------ ghostdp bench --fsdp2

TINY = ["--hidden-size", "32", "--intermediate-size", "64", "--num-hidden-layers", "2", "--num-attention-heads", "2",
        "--vocab-size", "128", "--seq-len", "8", "--batch-per-rank", "2"]


@pytest.fixture
def fake_compare(monkeypatch):
    """F.compare replaced by a recorder that returns a made-up result (no process starts)."""
    calls = []

    def compare(case, engines, *, rounds, steps, warmup, threads, command="", **kw):
        calls.append({"case": case, "engines": list(engines), "rounds": rounds, "steps": steps, "warmup": warmup,
                      "threads": threads, "command": command})
        rows = F.add_ratios([F.summarize(e, [_records([100 + i, 100], [[1.0 + i], [1.0]])])
                             for i, e in enumerate(engines)])
        return {"command": command, "environment": {"device": "cpu (test)"}, "case": dataclasses.asdict(case),
                "case_id": case.id, "settings": {"rounds": rounds, "steps": steps, "warmup": warmup,
                                                 "threads": threads}, "rows": rows, "records": {}}

    monkeypatch.setattr(F, "compare", compare)
    return calls


def test_ghostdp_bench_fsdp2_runs_the_fsdp2_comparison_with_its_own_shape(fake_compare, tmp_path, capsys):
    from ghostdp.cli import main as ghostdp_main

    stem = tmp_path / "fsdp2"
    code = ghostdp_main(["bench", "--fsdp2", *TINY, "--world-size", "3", "--tie-word-embeddings", "true",
                         "--rounds", "2", "--out", str(stem)])
    assert code == 0
    (call,) = fake_compare
    assert call["case"] == F.FSDP2Case(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, vocab_size=128, seq_len=8, batch_per_rank=2,
                                       world_size=3, tie_word_embeddings=True)
    # the FSDP2 defaults, not the single-process comparison's: its engines, 1 step, 1 warm-up, 1 thread per rank
    assert call["engines"] == list(F.DEFAULT_ENGINES)
    assert (call["rounds"], call["steps"], call["warmup"], call["threads"]) == (2, 1, 1, 1)
    assert call["command"].startswith("ghostdp bench --fsdp2 --seq-len 8 --hidden-size 32")
    assert "--world-size 3" in call["command"] and "--tie-word-embeddings true" in call["command"]
    md = stem.with_suffix(".md").read_text()
    assert "under FSDP2" in md and md == capsys.readouterr().out
    assert json.loads(stem.with_suffix(".json").read_text())["case"]["world_size"] == 3


def test_bench_fsdp2_defaults_are_the_committed_case(fake_compare):
    from ghostdp.integrations import bench

    assert bench.main(["--fsdp2", "--engines", "non-private", "ghostdp-ghost-torch", "--threads", "2"]) == 0
    (call,) = fake_compare
    assert call["case"] == F.FSDP2Case()
    assert call["engines"] == ["non-private", "ghostdp-ghost-torch"] and call["threads"] == 2
    assert call["command"] == "ghostdp bench --fsdp2 --engines non-private ghostdp-ghost-torch --threads 2"


@pytest.mark.parametrize("argv, message", [
    (["--fsdp2", "--lora"], "--lora applies to the single-process comparison"),
    (["--fsdp2", "--model", "tiny-llama", "--batch-size", "2"], "--model, --batch-size apply to the single-process"),
    (["--fsdp2", "--device", "cuda"], "--device applies to the single-process"),
    (["--fsdp2", "--seq-len", "8", "16"], "give one --seq-len, not 2"),
    (["--fsdp2", "--engines", "opacus-ghost"], "non-private and ghostdp engines, not 'opacus-ghost'"),
    (["--fsdp2", "--engines", "nope"], "nope"),
    (["--fsdp2", "--hidden-size", "100"], "not a multiple of num_attention_heads"),
    (["--fsdp2", "--world-size", "0"], "world_size must be a positive integer"),
    (["--fsdp2", "--rounds", "0"], "--rounds and --steps must be >= 1"),
    (["--hidden-size", "64", "--world-size", "2"], "--hidden-size, --world-size shape the FSDP2 comparison"),
    (["--tie-word-embeddings", "true"], "--tie-word-embeddings shapes the FSDP2 comparison; add --fsdp2"),
])
def test_bench_fsdp2_refuses_options_that_do_not_apply(fake_compare, capsys, argv, message):
    from ghostdp.integrations import bench

    assert bench.main(argv) == 2
    assert message in capsys.readouterr().err
    assert fake_compare == []  # refused before any process group starts


def test_bench_fsdp2_boolean_options_are_strict(fake_compare):
    from ghostdp.integrations import bench

    with pytest.raises(SystemExit) as exc:
        bench.main(["--fsdp2", "--gradient-checkpointing", "maybe"])
    assert exc.value.code == 2
    assert bench.main(["--fsdp2", "--gradient-checkpointing", "false"]) == 0
    assert fake_compare[0]["case"].gradient_checkpointing is False
