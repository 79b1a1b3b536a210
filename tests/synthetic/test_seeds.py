"""``--seeds N``: N DP runs with fresh noise, mean and std of every accuracy (issue 11)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ghostdp.cli import main
from ghostdp.integrations.synthetic.config import build_run_config
from ghostdp.integrations.synthetic.seeds import (
    aggregate_runs,
    mean_std,
    run_seeds,
    seeds_markdown,
)


def _metrics(syn: float, dp: float, floor: float | None, recall_neg: float, fid: float) -> dict:
    row = {"accuracy": syn, "macro_f1": syn - 0.01, "recall": {"negative": recall_neg, "positive": 1 - recall_neg},
           "recall_gap": abs(2 * recall_neg - 1)}
    return {"accuracy": {"synthetic": row, "dp_on_real": {"accuracy": dp}, "prior_floor": None if floor is None else
                         {"accuracy": floor}, "public_only": None},
            "metrics": {"privacy": {"epsilon_total": 3.1}, "label_fidelity": {"synthetic": {"label_fidelity": fid}}}}


def test_mean_and_std_by_hand():
    ms = mean_std([0.6, 0.7, 0.8])
    assert ms["mean"] == pytest.approx(0.7) and ms["std"] == pytest.approx(0.1) and ms["n"] == 3  # sample std
    assert mean_std([0.5, None])["std"] is None and mean_std([0.5, None])["n"] == 1
    assert mean_std([None, float("nan")]) == {"mean": None, "std": None, "n": 0, "values": []}


def test_aggregate_runs_covers_every_row_and_class():
    runs = [_metrics(0.6, 0.7, 0.55, 0.9, 0.8), _metrics(0.7, 0.8, None, 0.7, 0.9), _metrics(0.8, 0.75, 0.65, 0.5, 1.0)]
    s = aggregate_runs(runs)
    assert s["runs"] == 3 and set(s["accuracy"]) == {"synthetic", "dp_on_real", "prior_floor", "public_only"}
    syn = s["accuracy"]["synthetic"]
    assert syn["accuracy"]["mean"] == pytest.approx(0.7) and syn["accuracy"]["std"] == pytest.approx(0.1)
    assert syn["recall"]["negative"]["mean"] == pytest.approx(0.7) and syn["recall"]["negative"]["std"] == \
        pytest.approx(0.2)
    assert syn["recall_gap"]["values"] == pytest.approx([0.8, 0.4, 0.0])
    floor = s["accuracy"]["prior_floor"]["accuracy"]
    assert floor["n"] == 2 and floor["mean"] == pytest.approx(0.6)  # n/a in one run: averaged over the others
    assert s["accuracy"]["public_only"] is None
    assert s["label_fidelity"]["mean"] == pytest.approx(0.9) and s["epsilon"]["mean"] == pytest.approx(3.1)
    # Paired gaps, by hand: synthetic - floor per run is 0.05, n/a, 0.15; synthetic - DP-on-real -0.1, -0.1, 0.05.
    assert s["gaps"]["prior_floor"]["values"] == pytest.approx([0.05, 0.15])
    assert s["gaps"]["dp_on_real"]["mean"] == pytest.approx(-0.05)
    assert s["gaps"]["dp_on_real"]["std"] == pytest.approx(float(np.std([-0.1, -0.1, 0.05], ddof=1)))
    assert s["gaps"]["public_only"]["n"] == 0 and "synthetic" not in s["gaps"]
    md = seeds_markdown(s)
    assert "| trained on DP synthetic | 0.7000 ± 0.1000 |" in md and "release at most one run" in md
    assert "| DP-trained on real | -5.0 ± 8.7 | 3 |" in md
    assert "| prior knowledge only (floor) | +10.0 ± 7.1 | 2 |" in md
    assert "trained on the public set only | n/a" not in md.split("Synthetic minus each row")[1]


def test_run_seeds_gives_each_run_its_own_folder_and_noise_seed(tmp_path):
    seen, public = [], []

    def fake_run(config, run_dir, show_progress):
        seen.append((config.train.dp_seed, Path(run_dir)))
        public.append((config.train.seed, config.synthesize.sample_seed, config.evaluate.eval_seed))
        Path(run_dir).mkdir(parents=True)
        i = len(seen) - 1
        (Path(run_dir) / "metrics.json").write_text(json.dumps(_metrics(0.6 + 0.1 * i, 0.7, 0.5, 0.6, 0.8)))

    config = build_run_config({"train": {"dp_seed": 10, "seed": 4}, "synthesize": {"sample_seed": 7},
                               "evaluate": {"eval_seed": 2}})
    s = run_seeds(config, tmp_path, 3, run_one=fake_run, show_progress=False)
    assert [d for d, _ in seen] == [10, 11, 12] and [p.name for _, p in seen] == ["seed-0", "seed-1", "seed-2"]
    # Fresh public randomness too: LoRA init, sampling (the floor's samples follow the sample seed), the
    # baselines' draws and the classifiers' seeds.
    assert public == [(4, 7, 2), (5, 8, 3), (6, 9, 4)]
    assert s["accuracy"]["synthetic"]["accuracy"]["mean"] == pytest.approx(0.7)
    assert json.loads((tmp_path / "seeds.json").read_text())["runs"] == 3 and (tmp_path / "seeds.md").is_file()
    seen.clear()
    run_seeds(build_run_config({}), tmp_path / "fresh", 2, run_one=fake_run, show_progress=False)
    assert [d for d, _ in seen] == [None, None]  # no dp_seed: fresh OS-entropy noise in every run


def test_seeds_flag_is_offered_and_checked(capsys, tmp_path):
    assert main(["pipeline", "--help"]) == 0
    assert "--seeds" in capsys.readouterr().out
    assert main(["pipeline", "--seeds", "0", "--run-dir", str(tmp_path / "r")]) == 2
    assert "--seeds 0: need an int >= 1" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before anything ran
