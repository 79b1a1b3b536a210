"""``ghostdp study``: the method x epsilon grid, resume, and epsilon inf labelled not private everywhere."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from ghostdp.integrations.synthetic.config import ConfigError, build_run_config
from ghostdp.integrations.synthetic.study import (
    CELL_FILE,
    StudyGrid,
    cell_config,
    cell_dir,
    eps_label,
    parse_epsilons,
    parse_method_lr,
    run_study,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class FakeRunner:
    """Stands in for the pipeline: figures are a known function of (method, epsilon, seed); calls are counted."""

    def __init__(self, fail_on: tuple | None = None):
        self.calls: list[tuple] = []
        self.fail_on = fail_on

    def __call__(self, config, run_dir, *, show_progress=True, shared=None):
        t = config.train
        key = (t.method, t.target_epsilon, Path(run_dir).name)
        if key == self.fail_on:
            raise KeyboardInterrupt("interrupted mid-study")
        self.calls.append(key)
        base = {"lora": 0.8, "prompt": 0.7, "full": 0.6}[t.method]
        eps = 10.0 if math.isinf(t.target_epsilon) else t.target_epsilon
        acc = base + 0.01 * eps + 0.001 * t.seed
        return {"accuracy_synthetic": acc, "mauve": 0.5, "perplexity": 20.0 - eps, "label_fidelity": 0.9,
                "accuracy_dp_on_real": 0.7 + 0.01 * eps, "accuracy_real_ceiling": 0.9, "accuracy_prior_floor": 0.55}


def base_config(tmp_path):
    for name in ("t.tsv", "e.tsv"):
        (tmp_path / name).write_text("label\tsentence\n0\ta\n1\tb\n", encoding="utf-8")
    return build_run_config({"data": {"train_data": str(tmp_path / "t.tsv"), "eval_data": str(tmp_path / "e.tsv")},
                             "train": {"dp_seed": 5, "seed": 1}})


def test_grid_and_parsing():
    assert parse_epsilons("1, 3,8,inf") == (1.0, 3.0, 8.0, math.inf)
    with pytest.raises(ConfigError, match="not a number"):
        parse_epsilons("1,three")
    with pytest.raises(ConfigError, match="pick from"):
        StudyGrid(methods=("lora", "adapter"))
    with pytest.raises(ConfigError, match="> 0"):
        StudyGrid(epsilons=(0.0,))
    assert len(StudyGrid(methods=("lora", "full"), epsilons=(1.0, math.inf), seeds=2).cells()) == 8
    assert parse_method_lr("lora=1e-2, full=2e-4") == (("lora", 0.01), ("full", 0.0002))
    with pytest.raises(ConfigError, match="METHOD=LR"):
        parse_method_lr("lora")
    with pytest.raises(ConfigError, match="finite lr > 0"):
        StudyGrid(learning_rates=(("lora", -1.0),))


def test_cell_config_sets_method_epsilon_seeds_and_learning_rate(tmp_path):
    base = base_config(tmp_path)
    cfg = cell_config(base, "full", math.inf, 2, (("full", 2e-4), ("lora", 1e-2)))
    t = cfg.train
    assert (t.method, t.target_epsilon, t.seed, t.dp_seed, t.learning_rate) == ("full", math.inf, 3, 7, 2e-4)
    assert cfg.synthesize.sample_seed == base.synthesize.sample_seed + 2
    assert cell_config(base, "prompt", 3.0, 0, (("full", 2e-4),)).train.learning_rate == base.train.learning_rate


def test_resume_skips_finished_cells_and_seeds_shift(tmp_path):
    config = base_config(tmp_path)
    grid = StudyGrid(methods=("lora", "prompt"), epsilons=(1.0, math.inf), seeds=2)
    root = tmp_path / "study"
    first = FakeRunner(fail_on=("prompt", 1.0, "seed-1"))
    with pytest.raises(KeyboardInterrupt):
        run_study(config, root, grid, runner=first)
    assert len(first.calls) == 5  # lora x 2 eps x 2 seeds, then prompt eps 1 seed 0
    assert (cell_dir(root, "prompt", 1.0, 0) / CELL_FILE).is_file()
    assert not (cell_dir(root, "prompt", 1.0, 1) / CELL_FILE).exists()

    # A time-boxed study: the table from the finished cells, the others listed as not run and nothing trained.
    partial_runner = FakeRunner()
    partial = run_study(config, root, grid, runner=partial_runner, summarize_only=True)
    assert partial_runner.calls == []
    assert partial["not_run"] == [{"method": "prompt", "epsilon": "1", "seed": 1},
                                  {"method": "prompt", "epsilon": "inf (not private)", "seed": 0},
                                  {"method": "prompt", "epsilon": "inf (not private)", "seed": 1}]
    prompt_inf = next(r for r in partial["rows"] if r["method"] == "prompt" and r["epsilon"].startswith("inf"))
    assert prompt_inf["accuracy_synthetic"]["n"] == 0
    md = (root / "study.md").read_text()
    assert "**Not run** (3 of the grid's cells" in md and "prompt at epsilon inf (not private) seed 1" in md

    second = FakeRunner()
    summary = run_study(config, root, grid, runner=second)
    assert second.calls == [("prompt", 1.0, "seed-1"), ("prompt", math.inf, "seed-0"), ("prompt", math.inf, "seed-1")]
    third = FakeRunner()
    run_study(config, root, grid, runner=third)
    assert third.calls == []  # everything finished: nothing re-run
    assert summary["not_run"] == [] and "Not run" not in (root / "study.md").read_text()

    row = next(r for r in summary["rows"] if r["method"] == "lora" and r["epsilon"] == "1")
    assert row["accuracy_synthetic"]["mean"] == pytest.approx(0.8 + 0.01 + 0.0015)  # train.seed 1 + i: 1, 2
    assert row["accuracy_synthetic"]["n"] == 2 and row["accuracy_synthetic"]["std"] > 0
    cell = json.loads((cell_dir(root, "lora", 1.0, 1) / CELL_FILE).read_text())
    assert cell["seed"] == 1 and cell["private"] is True


def test_inf_is_labelled_not_private_everywhere(tmp_path, caplog):
    config = base_config(tmp_path)
    grid = StudyGrid(methods=("lora",), epsilons=(3.0, math.inf), seeds=1)
    root = tmp_path / "study"
    summary = run_study(config, root, grid, runner=FakeRunner())
    assert eps_label(math.inf) == "inf (not private)"
    assert "NOT private" in caplog.text
    inf_cell = json.loads((cell_dir(root, "lora", math.inf, 0) / CELL_FILE).read_text())
    assert inf_cell["epsilon"] == "inf (not private)" and inf_cell["private"] is False
    data = json.loads((root / "study.json").read_text())
    for entry in data["rows"] + data["dp_on_real"] + data["cells"]:
        infinite = entry["epsilon"].startswith("inf")
        assert infinite == (entry["epsilon"] == "inf (not private)") == (entry["private"] is False)
    assert data["config"]["epsilons"] == ["3", "inf (not private)"]
    md = (root / "study.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and "inf" in line]
    assert table and all("inf (not private)" in line for line in table)
    assert "trained on real (not private)" in md and "DP-trained on real" in md
    assert "| lora | inf (not private) |" in md
    assert (root / "study.png").read_bytes()[:4] == b"\x89PNG"
    assert summary["dp_on_real"][1]["kind"] == "trained on real (not private)"


# ----------------------------------------------------------------------------------------------------
# The real pipeline on a tiny Llama: prompt tuning and the non-private cell
# ----------------------------------------------------------------------------------------------------



@pytest.fixture
def tiny_config(tmp_path, make_word_tokenizer):
    from tests.helpers import save_tiny_generator, toy_review_rows, write_tsv

    rng = random.Random(0)
    for name, n in (("train.tsv", 48), ("dev.tsv", 24)):
        write_tsv(tmp_path / name, toy_review_rows(n, rng))
    save_tiny_generator(tmp_path / "tiny", make_word_tokenizer)
    return build_run_config({
        "data": {"train_data": str(tmp_path / "train.tsv"), "eval_data": str(tmp_path / "dev.tsv"),
                 "text_column": "sentence", "label_names": {"0": "negative", "1": "positive"}},
        "train": {"model": str(tmp_path / "tiny"), "lora_targets": ["q_proj", "v_proj"], "logical_batch_size": 16,
                  "physical_batch_size": 8, "max_steps": 2, "max_length": 16, "label_epsilon": 0.5, "dp_seed": 1,
                  "use_cpu": True, "prompt_tokens": 4},
        "synthesize": {"num_samples": 16, "gen_batch_size": 8, "max_new_tokens": 6},
        "evaluate": {"dp_steps": 5, "dp_batch_size": 16, "floor_samples": 8, "perplexity_rows": 8,
                     "memorization_top_k": 2},
    })


@pytest.mark.usefixtures("minilm_embedder")
def test_tiny_study_prompt_and_not_private_cells(tmp_path, tiny_config):
    root = tmp_path / "study"
    grid = StudyGrid(methods=("prompt",), epsilons=(3.0, math.inf), seeds=1)
    summary = run_study(tiny_config, root, grid, show_progress=False)
    private = cell_dir(root, "prompt", 3.0, 0)
    info = json.loads((private / "model" / "ghostdp_model.json").read_text())
    assert info["method"] == "prompt" and info["trainable_parameters"] == 4 * 16  # 4 virtual tokens x d=16
    assert 0 < info["privacy"]["epsilon_total"] <= 3.5 and (private / "report.md").is_file()
    nonpriv = cell_dir(root, "prompt", math.inf, 0)
    info = json.loads((nonpriv / "model" / "ghostdp_model.json").read_text())
    assert info["privacy"]["epsilon_total"] is None and "NOT PRIVATE" in info["privacy"]["not_private"]
    assert info["privacy"]["noise_multiplier"] == 0.0
    report = (nonpriv / "report.md").read_text()  # the same pipeline, and no report claiming a guarantee
    assert "**NOT PRIVATE.**" in report and ")-DP" not in report and "DP synthetic" not in report
    for row in summary["rows"]:
        assert row["accuracy_synthetic"]["n"] == 1 and row["perplexity"]["mean"] > 1
    # The cells share one floor (sampled once, under <study>/shared) and so one floor accuracy.
    floors = sorted((root / "shared").glob("floor-*"))
    assert len(floors) == 1 and not (private / "floor").exists() and not (nonpriv / "floor").exists()
    cells = summary["cells"]
    assert cells[0]["accuracy_prior_floor"] == cells[1]["accuracy_prior_floor"] is not None
    assert all(c["accuracy_generator_classifier"] is not None and c["timings"]["train_s"] >= 0 for c in cells)

    # The prompt-tuned generator reloads from its folder (adapter over the base; virtual-position logits dropped).
    from ghostdp.integrations.synthetic.synthesize import load_generator

    gen = load_generator(private / "model", use_cpu=True)
    assert gen.model(input_ids=torch.tensor([[3, 4, 5]])).logits.shape[:2] == (1, 3)
    # Hyperparameter-ranking fidelity on a study cell, through the CLI.
    from ghostdp.cli import main

    assert main(["evaluate", "--run-dir", str(private), "--hparam-grid", "C=0.1,10", "--no-progress"]) == 0
    result = json.loads((private / "hparam" / "hparam.json").read_text())
    assert len(result["rows"]) == 4 and "regret" in result and (private / "hparam" / "hparam.png").is_file()


def test_cli_study_runs_the_grid_and_refuses_bad_grids(tmp_path, capsys, monkeypatch):
    from ghostdp.cli import main
    from ghostdp.integrations.synthetic import study

    assert main(["study", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--methods" in out and "--epsilons" in out and "NOT private" in out
    config = base_config(tmp_path)
    args = ["--train-data", config.data.train_data, "--eval-data", config.data.eval_data, "--no-progress"]
    assert main(["study", "--methods", "lora,adapter", "--run-dir", str(tmp_path / "bad"), *args]) == 2
    assert "pick from lora, prompt, full" in capsys.readouterr().err
    assert main(["study", "--epsilons", "1,x", "--run-dir", str(tmp_path / "bad"), *args]) == 2
    fake = FakeRunner()
    monkeypatch.setattr(study, "run_cell", fake)
    root = tmp_path / "cli-study"
    assert main(["study", "--methods", "full", "--epsilons", "8,inf", "--seeds", "1", "--run-dir", str(root),
                 *args]) == 0
    assert fake.calls == [("full", 8.0, "seed-0"), ("full", math.inf, "seed-0")]
    assert "| full | inf (not private) |" in capsys.readouterr().out
    assert (root / "study.json").is_file() and (root / "full" / "eps-inf" / "seed-0" / CELL_FILE).is_file()
