"""A run folder you can trust (issue 17): only DP outputs in what is released, the record tells the truth,
an interrupted run resumes, concurrent runs cannot corrupt it, refusals change nothing, inputs are
checked before the first expensive step. Tiny Llama + word tokenizer, 2-6 DP steps: seconds per test."""
from __future__ import annotations

import fnmatch
import json
import random
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from ghostdp.cli import main
from ghostdp.integrations.synthetic.run_folder import (
    LOCK_FILE,
    RunPaths,
    lock_run_folder,
)
from tests.helpers import (
    REPO,
    save_tiny_generator,
    toy_review_rows,
    write_tsv,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rows(n: int, seed: int) -> list[tuple[int, str]]:
    return toy_review_rows(n, random.Random(seed))


_tsv = write_tsv


TOML = """
[data]
train_data = "{root}/train.tsv"
eval_data = "{root}/dev.tsv"
text_column = "sentence"
label_names = {{ "0" = "negative", "1" = "positive" }}

[train]
model = "{root}/tiny"
lora_targets = ["q_proj", "v_proj"]
logical_batch_size = 16
physical_batch_size = 8
max_steps = {steps}
max_length = 16
label_epsilon = 0.5
{seed}use_cpu = true
checkpoint_steps = 2

[synthesize]
num_samples = 16
gen_batch_size = 8
max_new_tokens = 6

[evaluate]
dp_steps = 5
dp_batch_size = 16
floor_samples = 0
perplexity_rows = 4
"""


def _make_setup(root: Path, make_word_tokenizer):
    _tsv(root / "train.tsv", _rows(60, 0))
    _tsv(root / "dev.tsv", _rows(30, 1))
    save_tiny_generator(root / "tiny", make_word_tokenizer)

    def cfg(name: str = "run.toml", *, steps: int = 2, dp_seed: int | None = 1) -> str:
        seed = "" if dp_seed is None else f"dp_seed = {dp_seed}\n"
        path = root / name
        path.write_text(TOML.format(root=root, steps=steps, seed=seed), encoding="utf-8")
        return str(path)

    return root, cfg


@pytest.fixture
def setup(tmp_path, make_word_tokenizer):
    """A saved tiny Llama + word tokenizer, a 60-row private TSV, a 30-row held-out TSV, and a config writer
    ``cfg(name, steps=2, dp_seed=1)`` (dp_seed None: the line is left out)."""
    return _make_setup(tmp_path, make_word_tokenizer)


@pytest.fixture(scope="module")
def _trained_once(tmp_path_factory, make_word_tokenizer):
    """One tiny run folder trained (2 DP steps) and synthesized through the CLI, shared by the module (the
    accountant dominates a tiny training's time); tests work on copies (:func:`trained`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root, cfg = _make_setup(tmp_path_factory.mktemp("trained"), make_word_tokenizer)
        assert _train(cfg(), root / "run") == 0 and _synthesize(root / "run") == 0
    finally:
        torch.set_num_threads(threads)
    return root, cfg


@pytest.fixture
def trained(_trained_once, tmp_path):
    """(root, cfg, run): a fresh copy of the shared trained-and-synthesized run folder."""
    root, cfg = _trained_once
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    return root, cfg, run


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _train(cfg: str, run: Path, *extra: str) -> int:
    return main(["train", "--config", cfg, "--run-dir", str(run), "--no-progress", *extra])


def _synthesize(run: Path, *extra: str) -> int:
    return main(["synthesize", "--run-dir", str(run), "--no-progress", *extra])


# ----------------------------------------------------------------------------------------------------
# 1. Only DP outputs (or public inputs) in the releasable folders
# ----------------------------------------------------------------------------------------------------

#: Every file allowed under model/ and synthetic/, with why it may be released.
RELEASABLE_FILES = {
    "model/adapter_model.safetensors": "the DP-SGD-trained LoRA weights (the DP release itself)",
    "model/adapter_config.json": "PEFT's LoRA settings: public configuration",
    "model/README.md": "PEFT's model-card template: the base model's name, no data",
    "model/tokenizer.json": "the base model's public tokenizer",
    "model/tokenizer_config.json": "the base model's public tokenizer",
    "model/special_tokens_map.json": "the base model's public tokenizer",
    "model/chat_template.jinja": "the base model's public tokenizer",
    "model/ghostdp_model.json": "metadata, key by key below",
    "model/model.safetensors": "the DP-SGD-trained weights of a full fine-tuning (the DP release itself)",
    "model/config.json": "the base model's public architecture",
    "model/generation_config.json": "the base model's public generation defaults",
    "synthetic/synthetic.jsonl": "samples of the DP generator (post-processing), keys below",
    "synthetic/synthetic.csv": "the same samples: text,label",
    "synthetic/synthetic_meta.json": "metadata, key by key below",
}

#: Every key (flattened, '*' for a label name or a free map) allowed in the released JSON, with a reason.
_MODEL_KEYS = {
    "format": "file format version", "ghostdp_version": "software version", "run_id": "random id of this model",
    "quantization": "public setting (how the base model is loaded)",
    "base_model": "public input", "method": "public setting", "trainable_parameters": "function of the public model "
    "and settings", "template": "public setting", "dataset_name": "public setting", "max_length": "public setting",
    "add_bos": "public setting", "chat_template": "public setting", "system_prompt": "public setting",
    "label_names": "public: data.label_names is required for file data",
    "data.source": "the path the user named (public input; not the data)",
    "data.fingerprint": "keyed HMAC of the data; the key stays in private/", "data.fingerprint_kind": "text",
    "privacy.epsilon_total": "the guarantee", "privacy.delta": "the guarantee (1/(2N) by default: the "
    "accounting treats N as public, as q = L/N is a parameter of the mechanism)",
    "privacy.epsilon_train": "the guarantee", "privacy.epsilon_train_rdp": "second opinion on the guarantee",
    "privacy.epsilon_labels": "the guarantee", "privacy.composition": "text", "privacy.accountant": "setting",
    "privacy.target_epsilon": "setting", "privacy.noise_multiplier": "calibrated from public settings",
    "privacy.max_grad_norm": "setting", "privacy.sample_rate": "mechanism parameter q (N treated as public, as "
    "for delta)", "privacy.logical_batch_size": "setting", "privacy.steps": "the plan's steps (public)",
    "privacy.planned_steps": "setting", "privacy.adjacency": "text", "privacy.not_private": "marker of an "
    "epsilon=inf baseline (no noise: not a release, said as such)", "privacy.dp_seed": "setting (known = not "
    "private, said in the headline)",
    "label_release.epsilon": "setting", "label_release.noisy_counts.*": "the DP label release (discrete Laplace)",
    "label_release.proportions.*": "post-processing of the DP release", "label_release.mechanism": "text",
    "training.learning_rate": "setting", "training.identity.*": "the configuration (public settings)",
}
_META_KEYS = {
    "ghostdp_version": "software version", "fingerprint": "hash of public settings and the model id",
    "complete": "function of the DP generator's samples", "model.*": "ids and public settings of the generator",
    "privacy.*": "copied from ghostdp_model.json (checked above)", "data.*": "copied from ghostdp_model.json",
    "label_names": "public", "prefix_ids.*": "tokenized public template", "sampling.*": "public settings",
    "label_proportions": "setting", "targets.*": "from the DP label release", "counts.*": "of the DP samples",
    "shortfall.*": "of the DP samples", "stats.*": "counts over the DP samples",
    "seconds_this_call": "sampling time: a function of the DP model and public settings",
    "filter.*": "the label-margin filter: public settings and counts over the DP samples",
}
_ROW_KEYS = {"text", "label", "batch", "n_batch", "eos", "margin"}  # margin: the DP generator's own score


def _flat_keys(d, prefix=""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            yield from _flat_keys(v, key + ".")
        else:
            yield key


def _check_keys(obj: dict, allowed: dict[str, str], where: str) -> None:
    for key in _flat_keys(obj):
        assert any(fnmatch.fnmatchcase(key, pat) or pat == key + ".*" for pat in allowed), (
            f"{where}: {key} is not on the allow-list")


def test_every_released_file_and_key_is_on_the_allow_list(trained):
    _, _, run = trained
    released = [p for sub in ("model", "synthetic") for p in (run / sub).rglob("*") if p.is_file()]
    names = sorted(str(p.relative_to(run)) for p in released)
    assert "model/ghostdp_model.json" in names and "synthetic/synthetic.jsonl" in names
    for name in names:
        assert name in RELEASABLE_FILES, f"{name} is not on the allow-list of releasable files"
    info = json.loads((run / "model" / "ghostdp_model.json").read_text())
    _check_keys(info, _MODEL_KEYS, "ghostdp_model.json")
    meta = json.loads((run / "synthetic" / "synthetic_meta.json").read_text())
    _check_keys(meta, _META_KEYS, "synthetic_meta.json")
    for line in (run / "synthetic" / "synthetic.jsonl").read_text().splitlines():
        assert set(json.loads(line)) <= _ROW_KEYS
    assert (run / "synthetic" / "synthetic.csv").read_text().splitlines()[0] == "text,label"
    # The non-DP numbers the issue found went to private/: per-step losses, N, the training time.
    text = json.dumps(info) + json.dumps(meta)
    assert "loss" not in text and "num_examples" not in text and "seconds" not in json.dumps(info)
    record = json.loads((run / "private" / "training.json").read_text())
    assert record["num_examples"] == 60 and len(record["log"]) == 2 and "loss" in record["log"][0]
    assert not (run / "private" / "trainer").exists()  # the checkpoints are deleted once the model is final


def test_a_fully_fine_tuned_model_folder_is_on_the_allow_list_too(setup):
    root, cfg = setup
    run = root / "run"
    assert _train(cfg(), run, "--method", "full") == 0
    names = sorted(str(p.relative_to(run)) for p in (run / "model").rglob("*") if p.is_file())
    assert "model/model.safetensors" in names
    for name in names:
        assert name in RELEASABLE_FILES, f"{name} is not on the allow-list of releasable files"
    _check_keys(json.loads((run / "model" / "ghostdp_model.json").read_text()), _MODEL_KEYS, "ghostdp_model.json")


def test_label_names_read_from_private_data_are_refused(setup):
    """Without data.label_names the label set would come from the private rows (not DP) into model/."""
    root, cfg = setup
    path = Path(cfg())
    path.write_text(path.read_text().replace('label_names = { "0" = "negative", "1" = "positive" }\n', ""))
    assert _train(str(path), root / "run") == 2
    assert not (root / "run").exists() or _snapshot(root / "run") == {}


def test_evaluation_writes_nothing_into_the_released_folders(trained, monkeypatch):
    """Evaluation (which reads the private data) must not write into model/ or synthetic/."""
    _, _, run = trained
    before = {k: v for k, v in _snapshot(run).items() if k.startswith(("model/", "synthetic/"))}
    _hashing_embedder(monkeypatch)
    assert main(["evaluate", "--run-dir", str(run), "--no-progress"]) == 0
    after = {k: v for k, v in _snapshot(run).items() if k.startswith(("model/", "synthetic/"))}
    assert after == before


# ----------------------------------------------------------------------------------------------------
# 2. The record tells the truth: settings of a failed attempt never come back
# ----------------------------------------------------------------------------------------------------


def test_a_failed_attempts_dp_seed_is_not_reused(setup, capsys):
    root, cfg = setup
    run = root / "run"
    no_seed = cfg("noseed.toml", dp_seed=None)
    assert _train(no_seed, run, "--dp-seed", "0", "--lora-targets", "no_such_proj") == 2  # fails
    assert "no_such_proj" in capsys.readouterr().err
    assert not (run / "config.toml").exists()  # nothing recorded for a stage that did not succeed
    assert _train(no_seed, run) == 0  # the same command without --dp-seed
    out = capsys.readouterr().out
    info = json.loads((run / "model" / "ghostdp_model.json").read_text())
    assert info["privacy"]["dp_seed"] is None and "NOT PRIVATE" not in out
    assert 'dp_seed = "none"' in (run / "config.toml").read_text()


def test_a_dp_seed_taken_from_the_folder_is_said_and_never_rewrites_the_training_record(trained, capsys):
    """(The headline's NOT PRIVATE for a known seed: test_interrupted_training_resumes_exactly...)"""
    _, _, run = trained
    assert _synthesize(run) == 0
    captured = capsys.readouterr()
    assert "train.dp_seed=1 comes from" in captured.err
    assert captured.out.startswith("NOT PRIVATE: trained with the known dp_seed=1")  # the released set's line too
    assert _synthesize(run, "--dp-seed", "7") == 0
    assert "dp_seed = 1\n" in (run / "config.toml").read_text()


# ----------------------------------------------------------------------------------------------------
# 3. An interrupted stage resumes (and a stage run twice does no harm)
# ----------------------------------------------------------------------------------------------------


def _interrupt_at(monkeypatch, step: int) -> None:
    """Ctrl-C during DP step ``step`` (1-based) of the next training."""
    from ghostdp.integrations.hf.trainer import DPTrainer

    original = DPTrainer.training_step
    calls = {"n": 0}

    def training_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DPTrainer, "training_step", training_step)


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model" / "adapter_model.safetensors"))


def test_interrupted_training_resumes_exactly_from_its_last_checkpoint(setup, monkeypatch, capsys, caplog):
    root, cfg = setup
    four = cfg("four.toml", steps=4)
    assert _train(four, root / "straight") == 0  # the uninterrupted reference

    run = root / "run"
    with monkeypatch.context() as m:
        _interrupt_at(m, 4)  # steps 1-3 done, checkpoint-2 written (checkpoint_steps = 2)
        assert _train(four, run) == 130
    err = capsys.readouterr().err
    assert "training resumes from its last checkpoint, checkpoint-2" in err
    assert (run / "private" / "trainer" / "checkpoint-2").is_dir() and not (run / "model").exists()
    assert not (run / "config.toml").exists()

    # Resuming with other settings is refused, naming each one (a dropped --dp-seed included), and changes nothing.
    before = _snapshot(run)
    assert _train(cfg("four-noseed.toml", steps=4, dp_seed=None), run, "--target-epsilon", "5") == 2
    err = capsys.readouterr().err
    assert "train.dp_seed: 1 (run folder) -> none (this command)" in err
    assert "train.target_epsilon: 3.0 (run folder) -> 5.0 (this command)" in err
    assert _snapshot(run) == before

    drawn = json.loads((run / "private" / "train_attempt.json").read_text())["label_release"]
    caplog.clear()
    assert _train(four, run) == 0
    assert "Resuming the interrupted DP training from" in caplog.text and "2 steps done" in caplog.text
    # The label counts were released once for the run, not again for the resumed attempt.
    assert json.loads((run / "model" / "ghostdp_model.json").read_text())["label_release"] == drawn
    assert "NOT PRIVATE: trained with the known dp_seed=1" in capsys.readouterr().out
    a, b = _adapter(root / "straight"), _adapter(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # exactly the same model
    pa = json.loads((root / "straight" / "model" / "ghostdp_model.json").read_text())["privacy"]
    pb = json.loads((run / "model" / "ghostdp_model.json").read_text())["privacy"]
    assert pb["steps"] == 4 and pb["epsilon_train"] == pa["epsilon_train"]
    assert not (run / "private" / "trainer").exists()


def test_an_interrupted_not_private_training_resumes_and_stays_marked(setup, monkeypatch, capsys):
    """epsilon inf through the interruption path: the checkpoint's privacy summary holds epsilon inf, the resumed
    run finishes, and its generator is the uninterrupted one, marked NOT PRIVATE with null epsilons."""
    root, cfg = setup
    four = cfg("four.toml", steps=4)
    assert _train(four, root / "straight", "--target-epsilon", "inf") == 0
    run = root / "run"
    with monkeypatch.context() as m:
        _interrupt_at(m, 4)
        assert _train(four, run, "--target-epsilon", "inf") == 130
    capsys.readouterr()
    assert _train(four, run, "--target-epsilon", "inf") == 0
    assert "NOT PRIVATE: trained with epsilon inf" in capsys.readouterr().out
    info = json.loads((run / "model" / "ghostdp_model.json").read_text())
    assert info["privacy"]["epsilon_total"] is None and info["privacy"]["not_private"] and info["privacy"]["steps"] == 4
    a, b = _adapter(root / "straight"), _adapter(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "target_epsilon = inf" in (run / "config.toml").read_text()


def test_killed_between_the_model_files_and_their_metadata_resumes_at_the_final_checkpoint(setup, monkeypatch,
                                                                                        caplog):
    """model/ counts as trained once ghostdp_model.json is there (written last): before that, a rerun resumes from
    the checkpoint of the last step (no step is trained twice) and writes the generator."""
    from ghostdp.integrations.synthetic import pipeline

    root, cfg = setup
    run = root / "run"
    original = pipeline.write_text_atomic

    def dies_at_the_metadata(path, text):
        if path.name == "ghostdp_model.json":
            raise KeyboardInterrupt
        return original(path, text)

    with monkeypatch.context() as m:
        m.setattr(pipeline, "write_text_atomic", dies_at_the_metadata)
        assert _train(cfg(), run) == 130
    assert (run / "model" / "adapter_model.safetensors").is_file() and not (run / "model" / "ghostdp_model.json").exists()
    caplog.clear()
    assert _train(cfg(), run) == 0
    assert "2 steps done" in caplog.text
    assert json.loads((run / "model" / "ghostdp_model.json").read_text())["privacy"]["steps"] == 2


def test_a_failure_after_a_checkpoint_says_the_rerun_resumes(setup, monkeypatch, capsys):
    from ghostdp.integrations.hf.trainer import DPTrainer

    root, cfg = setup
    run = root / "run"
    original, calls = DPTrainer.training_step, {"n": 0}

    def fails_at_step_3(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device lost")
        return original(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(DPTrainer, "training_step", fails_at_step_3)
        assert _train(cfg("four.toml", steps=4), run) == 1
    err = capsys.readouterr().err
    assert "RuntimeError: device lost" in err
    assert "Once the cause is fixed: Re-run the same command" in err and "checkpoint-2" in err


def test_interrupted_before_a_checkpoint_says_it_starts_over(setup, monkeypatch, capsys):
    root, cfg = setup
    run = root / "run"
    noise = cfg("noseed.toml", dp_seed=None)  # OS-entropy noise: a second label release would differ
    with monkeypatch.context() as m:
        _interrupt_at(m, 2)
        assert _train(noise, run, "--label-epsilon", "0.01") == 130
    assert "training starts again from step 0" in capsys.readouterr().err
    assert not (run / "private" / "trainer").exists() or not any((run / "private" / "trainer").glob("checkpoint-*"))
    drawn = json.loads((run / "private" / "train_attempt.json").read_text())["label_release"]
    assert _train(noise, run, "--label-epsilon", "0.01") == 0
    # It started over with the label counts the first attempt released, not a second release.
    assert json.loads((run / "model" / "ghostdp_model.json").read_text())["label_release"] == drawn


def test_checkpoint_timer_asks_for_a_save_when_its_minutes_have_passed():
    from transformers import TrainerControl

    from ghostdp.integrations.synthetic.pipeline import checkpoint_timer

    timer = checkpoint_timer(1e-9)
    control = timer.on_step_end(None, None, TrainerControl())
    assert control.should_save
    slow = checkpoint_timer(60.0)
    assert not slow.on_step_end(None, None, TrainerControl()).should_save


def test_synthesize_twice_and_a_finished_train_again(trained, capsys):
    _, cfg, run = trained
    rows = (run / "synthetic" / "synthetic.jsonl").read_bytes()
    assert _synthesize(run) == 0  # complete: nothing added
    assert (run / "synthetic" / "synthetic.jsonl").read_bytes() == rows
    before = _snapshot(run)
    assert _train(cfg(), run) == 2 and "spends privacy again" in capsys.readouterr().err
    assert _snapshot(run) == before


# ----------------------------------------------------------------------------------------------------
# 4. One writer per run folder
# ----------------------------------------------------------------------------------------------------


_HOLDER = """
import sys
from ghostdp.integrations.synthetic.run_folder import lock_run_folder
with lock_run_folder(sys.argv[1], "synthesize"):
    print("locked", flush=True)
    sys.stdin.readline()
"""


@pytest.mark.parametrize("command", ["train", "synthesize", "evaluate", "pipeline"])
def test_a_second_process_on_a_run_folder_is_refused(setup, capsys, command):
    root, cfg = setup
    run = root / "run"
    (run / "model").mkdir(parents=True)
    before = _snapshot(run)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = [command, "--run-dir", str(run), "--no-progress"]
        assert main(args + (["--config", cfg()] if command in ("train", "pipeline", "evaluate") else [])) == 2
        err = capsys.readouterr().err
        assert f"is in use by `ghostdp synthesize` (pid {holder.pid}" in err and "another --run-dir" in err
        assert {k: v for k, v in _snapshot(run).items() if k != LOCK_FILE} == before
    finally:
        holder.communicate("\n", timeout=60)


def test_the_lock_is_released_on_failure_and_when_its_process_dies(tmp_path):
    with pytest.raises(RuntimeError), lock_run_folder(tmp_path, "train"):
        raise RuntimeError("boom")
    with lock_run_folder(tmp_path, "train"), lock_run_folder(tmp_path, "synthesize"):  # re-entrant in a process
        pass
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait(timeout=60)
    with lock_run_folder(tmp_path, "train"):  # the kernel dropped the dead process's lock
        pass


# ----------------------------------------------------------------------------------------------------
# 5. A refused command changes nothing and names each differing setting
# ----------------------------------------------------------------------------------------------------


def test_refusals_on_a_finished_folder_change_nothing_and_name_the_settings(trained, capsys):
    root, cfg, run = trained
    before = _snapshot(run)

    assert _train(cfg(), run, "--target-epsilon", "5") == 2
    assert "train.target_epsilon: 3.0 (run folder) -> 5.0 (this command)" in capsys.readouterr().err
    other = _tsv(root / "other.tsv", _rows(60, 5))
    assert main(["pipeline", "--config", cfg(), "--run-dir", str(run), "--train-data", str(other)]) == 2
    assert f"data.train_data: '{root / 'train.tsv'}' (run folder) -> '{other}' (this command)" in (
        capsys.readouterr().err)
    assert _synthesize(run, "--temperature", "0.5") == 2
    assert "synthesize.temperature: 1.0 (on disk) -> 0.5" in capsys.readouterr().err
    assert _snapshot(run) == before
    # ... so the original command still runs as before.
    assert _synthesize(run) == 0


def test_evaluate_with_other_private_data_or_without_the_data_key(trained, capsys):
    root, _, run = trained
    other = _tsv(root / "other.tsv", _rows(60, 5))
    before = _snapshot(run)
    assert main(["evaluate", "--run-dir", str(run), "--train-data", str(other)]) == 2
    err = capsys.readouterr().err
    assert "not the data the generator was trained on" in err
    assert f"data.train_data: '{root / 'train.tsv'}' (run folder) -> '{other}' (this command)" in err
    assert _snapshot(run) == before
    (root / "train.tsv").write_bytes((root / "train.tsv").read_bytes() + b"1\tgood film\n")  # same path, new rows
    try:
        assert main(["evaluate", "--run-dir", str(run)]) == 2
        assert "the settings are the same, so the file's content changed" in capsys.readouterr().err
    finally:
        (root / "train.tsv").write_bytes((root / "train.tsv").read_bytes()[:-len(b"1\tgood film\n")])
    (run / "private" / "data_key").unlink()
    before = _snapshot(run)
    assert main(["evaluate", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "data_key is missing" in err and "not a sign of other data" in err
    assert _snapshot(run) == before


# ----------------------------------------------------------------------------------------------------
# 6. Inputs checked first, errors that name the file, the cause and the fix
# ----------------------------------------------------------------------------------------------------


def _csv_config(root: Path, cfg, train_path: Path, *, eval_line: str | None) -> str:
    text = Path(cfg()).read_text().replace(f'train_data = "{root}/train.tsv"', f'train_data = "{train_path}"')
    text = text.replace('text_column = "sentence"', 'text_column = "text"')
    text = text.replace(f'eval_data = "{root}/dev.tsv"\n', "" if eval_line is None else eval_line + "\n")
    path = root / "csv.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def _csv_bytes(rows, encoding: str, bom: bytes = b"") -> bytes:
    return bom + ("text,label\n" + "".join(f'"{t}",{y}\n' for y, t in rows)).encode(encoding)


def test_eval_data_must_be_named_for_own_training_data(setup, capsys):
    root, cfg = setup
    train = root / "mine.csv"
    train.write_bytes(_csv_bytes(_rows(60, 0), "utf-8"))
    toml = _csv_config(root, cfg, train, eval_line=None)
    assert main(["pipeline", "--config", toml, "--run-dir", str(root / "run")]) == 2
    err = capsys.readouterr().err
    assert "data.eval_data is not set" in err and "--eval-data FILE" in err
    assert not (root / "run").exists()
    from ghostdp.cli import build_parser, resolve_config

    ns = build_parser().parse_args(["train", "--config", toml, "--run-dir", str(root / "run")])
    assert resolve_config(ns)[0].data.eval_data is None  # training alone does not need held-out data


def test_a_bad_eval_file_is_refused_before_training(setup, capsys):
    root, cfg = setup
    bad = root / "bad_dev.tsv"
    bad.write_text("label\tsentence\n7\tgood film\n", encoding="utf-8")
    assert main(["pipeline", "--config", cfg(), "--run-dir", str(root / "run"), "--eval-data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "unknown label '7'" in err
    assert not (root / "run" / "model").exists() and not (root / "run" / "private" / "trainer").exists()


@pytest.mark.parametrize("encoding,bom", [("utf-8", b"\xef\xbb\xbf"), ("utf-16-le", b"\xff\xfe"),
                                          ("latin-1", b""), ("cp1252", b"")])
def test_boms_and_common_encodings_are_read(setup, encoding, bom, caplog):
    from ghostdp.integrations.synthetic.text_data import (
        TextDataConfig,
        load_labelled_texts,
    )

    root, _ = setup
    rows = [(0, "café dull plot"), (1, "naïve but good film")] + ([(1, "“great” acting")] if encoding != "latin-1"
                                                                    else [])
    path = root / "enc.csv"
    path.write_bytes(_csv_bytes(rows, encoding, bom))
    data = load_labelled_texts(TextDataConfig(source=path, label_names={"0": "negative", "1": "positive"}))
    assert list(data.texts) == [t for _, t in rows]  # the BOM is not in the first column's name, accents intact
    if not bom:
        assert str(path) in caplog.text and "not UTF-8" in caplog.text


@pytest.mark.parametrize("content,message", [
    (b"", "is empty"),
    (b"text,label\n", "holds no rows"),
    (b"sentence,label\ngood film,1\n", "has no column 'text'"),
])
def test_empty_and_malformed_files_are_named_with_cause_and_fix(setup, capsys, content, message):
    root, cfg = setup
    path = root / "mine.csv"
    path.write_bytes(content)
    assert _train(_csv_config(root, cfg, path, eval_line=None), root / "run") == 2
    err = capsys.readouterr().err
    assert f"data.train_data='{path}'" in err and message in err and "fewer rows" not in err
    assert not (root / "run").exists()


def test_config_file_with_a_bom_or_another_encoding_and_a_missing_model_folder(setup, capsys):
    root, cfg = setup
    path = Path(cfg())
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    from ghostdp.cli import build_parser, resolve_config

    ns = build_parser().parse_args(["train", "--config", str(path), "--run-dir", str(root / "run")])
    assert resolve_config(ns)[0].train.max_steps == 2  # the BOM is dropped
    path.write_bytes(path.read_bytes().replace(b"sentence", "s\xe9ntence".encode("latin-1")))
    assert _train(str(path), root / "run") == 2
    assert f"--config {path}: not UTF-8" in capsys.readouterr().err
    assert _train(cfg(), root / "run", "--model", str(root / "no_such_model")) == 2
    assert "train.model=" in capsys.readouterr().err
    assert main(["train", "--config", str(root), "--run-dir", str(root / "run")]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert not (root / "run").exists()


def test_a_folder_or_a_missing_file_as_data(setup, capsys):
    root, cfg = setup
    (root / "folder").mkdir()
    (root / "folder" / "reviews.csv").write_text("text,label\n")
    assert _train(cfg(), root / "run", "--train-data", str(root / "folder")) == 2
    err = capsys.readouterr().err
    assert "is a folder, not a file" in err and "file_format" not in err
    assert _train(cfg(), root / "run", "--train-data", str(root / "nope.csv")) == 2
    assert "no such file" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# 7. Smaller: incomplete sets flagged, the CSV never silently behind
# ----------------------------------------------------------------------------------------------------


class _HashingEmbedder:
    def __init__(self, *args, **kwargs):
        pass

    def embed(self, texts):
        out = np.zeros((len(texts), 32), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.split():
                out[i, zlib.crc32(w.encode()) % 32] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def _hashing_embedder(monkeypatch):
    from ghostdp.integrations.synthetic import embeddings

    monkeypatch.setattr(embeddings, "MiniLMEmbedder", _HashingEmbedder)


def test_an_incomplete_set_is_flagged_in_the_headline_and_a_lagging_csv_is_repaired(trained, monkeypatch, capsys,
                                                                                    caplog):
    _, _, run = trained
    shutil.rmtree(run / "synthetic")
    assert _synthesize(run, "--max-batches", "1") == 0
    jsonl, csv_path = run / "synthetic" / "synthetic.jsonl", run / "synthetic" / "synthetic.csv"
    n = len(jsonl.read_text().splitlines())
    assert len(csv_path.read_text().splitlines()) == n + 1  # the CSV follows the JSONL batch by batch
    csv_path.write_text("text,label\n")  # as after a kill between the JSONL and the CSV write
    capsys.readouterr()
    _hashing_embedder(monkeypatch)
    assert main(["evaluate", "--run-dir", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"{n} samples (INCOMPLETE: {n} of 16; re-run synthesize to finish)" in out
    report = (run / "report.md").read_text()
    assert "INCOMPLETE synthetic set" in report and "NOT PRIVATE: trained with the known dp_seed=1" in report
    assert "NOT PRIVATE: trained with the known dp_seed=1" in out
    assert "held 0 rows, not the" in caplog.text and len(csv_path.read_text().splitlines()) == n + 1


def test_run_paths_name_the_private_files():
    paths = RunPaths(Path("r"))
    assert paths.training_record.parent == paths.private and paths.trainer.parent == paths.private


def test_a_copy_of_the_training_file_is_not_accepted_as_held_out(setup, capsys):
    """New-user report: held-out data was checked by its setting only, so a byte-identical copy of the
    training file under another name was evaluated as "held out". Refused before training, naming both."""
    root, cfg = setup
    train, copy_ = root / "mine.csv", root / "copy_of_mine.csv"
    train.write_bytes(_csv_bytes(_rows(60, 0), "utf-8"))
    copy_.write_bytes(_csv_bytes([(y, f"  {t.upper()} ") for y, t in _rows(60, 0)], "utf-8"))  # spacing/case
    toml = _csv_config(root, cfg, train, eval_line=f'eval_data = "{copy_}"')
    assert main(["pipeline", "--config", toml, "--run-dir", str(root / "run")]) == 2
    err = capsys.readouterr().err
    assert str(copy_) in err and "not held out" in err and str(train) in err
    assert not (root / "run" / "model").exists()


def test_check_heldout_disjoint_counts_and_limits():
    from ghostdp.integrations.synthetic.config import ConfigError
    from ghostdp.integrations.synthetic.run_folder import check_heldout_disjoint
    from ghostdp.integrations.synthetic.text_data import LabelledTexts

    names = ("negative", "positive")
    train = LabelledTexts(("a b", "c d", "e f", "g h"), ("negative", "positive") * 2, names, source="train")
    assert check_heldout_disjoint(train, LabelledTexts(("x", "y"), names, names, source="dev")) == 0
    three = LabelledTexts(("A  b", "y", "z"), ("negative",) * 3, names, source="dev")
    assert check_heldout_disjoint(train, three) == 1  # one of three shared: kept, logged
    with pytest.raises(ConfigError, match="2 of its 4 texts"):
        check_heldout_disjoint(train, LabelledTexts(("a b", "C D", "y", "z"), ("negative",) * 4, names, source="dev"))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_generator_keeps_the_loaded_use_cache_after_training(setup, method):
    """transformers >= 5's Trainer sets config.use_cache = TrainingArguments.use_cache (False) for training.
    The trained generator (in memory, as the pipeline samples from it, and as saved) gets the loaded model's
    value back: with it False, sampling and label scoring silently lost their prefix key/value cache (2.8x
    slower scoring in the pipeline than after a reload), and a fully fine-tuned model/config.json kept it."""
    from ghostdp.integrations.hf.models import load_causal_lm
    from ghostdp.integrations.synthetic.config import build_run_config, load_toml
    from ghostdp.integrations.synthetic.pipeline import train
    from ghostdp.integrations.synthetic.synthesize import caches_prefix, load_generator

    root, cfg = setup
    loaded = load_causal_lm(str(root / "tiny"))[0].config.use_cache
    assert loaded is True  # the tiny model's config, as LlamaConfig's default: the case that was broken
    layers = load_toml(cfg())
    layers["train"]["method"] = method
    gen = train(build_run_config(layers), root / "run", show_progress=False)
    base = gen.model.get_base_model() if method == "lora" else gen.model
    assert base.config.use_cache is loaded and caches_prefix(gen.model)
    again = load_generator(root / "run" / "model", use_cpu=True)
    assert caches_prefix(again.model)
    if method == "full":
        assert json.loads((root / "run" / "model" / "config.json").read_text())["use_cache"] is loaded
