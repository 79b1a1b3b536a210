"""Run reports: every file written, metrics.json round-trips, n/a for missing entries, input errors."""

from __future__ import annotations

import json

import pytest

from ghostdp.integrations.synthetic.report import ACCURACY_ENTRIES, length_stats, write_run_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def full_inputs():
    return dict(
        title="SST-2, eps = 3",
        metrics={"privacy": {"epsilon": 3.0, "delta": 1e-5, "noise_multiplier": 0.71}, "seed": 0, "model": "SmolLM2"},
        training_log=[{"step": i, "loss": 3.0 / (1 + i / 10), "epsilon": 3.0 * i / 79} for i in range(80)],
        accuracies={
            "synthetic": {"accuracy": 0.85, "macro_f1": 0.84, "n_eval": 872, "n_train": 2000},
            "real_ceiling": {"accuracy": 0.91, "macro_f1": 0.905, "n_eval": 872, "n_train": 67349},
            "dp_on_real": None,
        },
        real_texts=["a fine film", "one long string of cliches .", "moving"],
        synthetic_texts=["a fine movie", "dull"],
        mauve=0.83,
        mauve_curve=([0.0, 0.5, 1.0], [1.0, 0.7, 0.0]),
        max_log_rows=10,
    )


def test_writes_every_file_and_json_round_trips(tmp_path):
    run = write_run_report(tmp_path / "run1", **full_inputs())
    names = {p.name for p in (tmp_path / "run1").iterdir()}
    assert names == {"report.md", "metrics.json", "accuracy.png", "mauve.png", "lengths.png", "training.png"}
    for png in run.plots.values():
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000
    loaded = json.loads(run.metrics_json.read_text())
    assert loaded == run.figures
    assert loaded["mauve"] == 0.83
    assert loaded["accuracy"]["dp_on_real"] is None and loaded["accuracy"]["prior_floor"] is None
    assert loaded["accuracy"]["synthetic"]["accuracy"] == 0.85
    assert loaded["lengths"]["real"] == {"n": 3, "mean": 10 / 3, "median": 3.0, "p90": pytest.approx(5.4), "max": 6}
    assert loaded["training"]["steps_logged"] == 80 and loaded["training"]["final_epsilon"] == 3.0
    assert len(loaded["training"]["log"]) == 80  # all rows in JSON, even though the Markdown shows 10
    assert loaded["plots"] == {"accuracy": "accuracy.png", "mauve": "mauve.png", "lengths": "lengths.png",
                               "training": "training.png"}


def test_markdown_tables_hold_the_figures(tmp_path):
    md = write_run_report(tmp_path, **full_inputs()).report_md.read_text()
    assert md.startswith("# SST-2, eps = 3")
    assert "| trained on DP synthetic | 0.85 | 0.84 | n/a | n/a | 2000 | 872 |" in md  # no per-class recall given
    assert f"| {ACCURACY_ENTRIES['dp_on_real']} | n/a | n/a | n/a | n/a |" in md
    assert f"| {ACCURACY_ENTRIES['prior_floor']} | n/a |" in md
    recall = write_run_report(tmp_path / "r", accuracies={"synthetic": {
        "accuracy": 0.7, "recall": {"negative": 0.9, "positive": 0.5}, "recall_gap": 0.4}}).report_md.read_text()
    assert "| trained on DP synthetic | 0.7 | n/a | negative 0.9, positive 0.5 | 0.4 |" in recall
    assert "| MAUVE | 0.83 |" in md
    assert "| privacy.epsilon | 3 |" in md and "| privacy.delta | 1e-05 |" in md and "| model | SmolLM2 |" in md
    assert "10 of 80 rows" in md
    for png in ("accuracy.png", "mauve.png", "lengths.png", "training.png"):
        assert f"]({png})" in md


def test_partial_inputs_and_non_finite_values(tmp_path):
    run = write_run_report(tmp_path, metrics={"loss": float("nan"), "eps": 1.5})
    assert run.plots == {}
    assert {p.name for p in tmp_path.iterdir()} == {"report.md", "metrics.json"}
    loaded = json.loads(run.metrics_json.read_text())  # NaN is not JSON: written as null
    assert loaded["metrics"] == {"loss": None, "eps": 1.5}
    assert "| loss | n/a |" in run.report_md.read_text()
    only_synth = write_run_report(tmp_path / "b", synthetic_texts=["a b c"])
    assert set(only_synth.figures["lengths"]) == {"synthetic"} and "lengths" in only_synth.plots


def test_input_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown accuracy entries \['synthetc'\]"):
        write_run_report(tmp_path, accuracies={"synthetc": {"accuracy": 0.5}})
    with pytest.raises(ValueError, match="has no 'accuracy'"):
        write_run_report(tmp_path, accuracies={"synthetic": {"acc": 0.5}})
    with pytest.raises(ValueError, match=r"training_log\[1\] lacks \['epsilon'\]"):
        write_run_report(tmp_path, training_log=[{"loss": 1.0, "epsilon": 0.1}, {"loss": 0.9}])
    with pytest.raises(TypeError, match="has no JSON form"):
        write_run_report(tmp_path, metrics={"obj": object()})


def test_length_stats_empty():
    assert length_stats([]) == {"n": 0, "mean": None, "median": None, "p90": None, "max": None}
