"""DP synthetic text end to end: train a generator with DP-SGD, sample from it, evaluate the samples.

One run lives in one folder (``run_dir``)::

    config.toml          the settings of the stages that SUCCEEDED (written on success only, so a failed or
                         refused command never becomes the base of the next one)
    .ghostdp.lock        held (flock) by the stage writing the folder: a second process is refused
    model/               RELEASABLE (DP): LoRA adapter or full model, tokenizer, ghostdp_model.json; only
                         functions of the DP model and public inputs (tests/synthetic/test_run_folder.py
                         checks every file and key against an allow-list)
    synthetic/           RELEASABLE (DP): synthetic.jsonl / .csv, synthetic_meta.json
    floor/               samples from the un-finetuned model (no private data involved)
    private/             NOT releasable: training checkpoints while training (trainer/, with the settings
                         of the attempt in train_attempt.json), training.json (per-step losses on private
                         batches, N, time), the key of the data fingerprint
    audit/               only with evaluate.audit_canaries = m > 0: a SEPARATE DP run with m canaries, its bound
                         (audit_section); never in model/ or synthetic/; NOT releasable with the model as is
    report.md, metrics.json, *.png
                         evaluation; NOT releasable as is: it holds non-private baselines trained on the
                         private data and quotes private texts (memorisation worst cases)

Privacy flow. Only :func:`train` reads the private data to produce something released: DP-SGD
(``DPTrainer``, calibrated to ``target_epsilon`` at ``delta``) and, optionally, the DP label counts
(:func:`ghostdp.integrations.synthetic.synthesize.release_label_counts`, ``label_epsilon``). The released model's
total guarantee is ``(epsilon_train + label_epsilon, delta)``-DP by basic composition; synthesis is
post-processing. Evaluation reads the private data again for its baselines (the non-private ceiling,
the DP-on-real classifier, memorisation checks): those results are labelled as such and are not part of
the release.

The metadata names the private data by a *keyed* fingerprint, ``HMAC-SHA256(key, data_hash(data))``
with the key in ``private/``: a plain hash of the data would let anyone who knows all rows but one test
candidates for the last (not DP); the keyed one lets the data owner check which data a model came from.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ghostdp.engine import planning
from ghostdp.integrations.synthetic.config import (
    ConfigError,
    RunConfig,
    TrainConfig,
    build_run_config,
    run_config_to_toml,
)
from ghostdp.integrations.synthetic.run_folder import (
    MODEL_DIR,
    RunPaths,
    check_heldout_disjoint,
    data_fingerprint,
    load_eval_data,
    load_private_data,
    lock_run_folder,
    setting_differences,
    write_text_atomic,
)
from ghostdp.integrations.synthetic.synthesize import (
    GENERATOR_META,
    LabelRelease,
    LoadedGenerator,
    ResumeMismatchError,
    SynthesisResult,
    label_targets,
    load_generator,
    make_collator,
    release_label_counts,
    synthesize,
)

__all__ = [
    "MODEL_DIR",
    "RunPaths",
    "data_fingerprint",
    "evaluate_step",
    "load_eval_data",
    "load_private_data",
    "run_pipeline",
    "synthesize_step",
    "train",
]

logger = logging.getLogger(__name__)

#: ``extra=`` of the log record a stage writes once its checks passed (the CLI's run log starts writing there).
COMMIT = {"ghostdp_commit": True}
#: train.target_epsilon=inf: the clipping bound that never binds, and the marker written where epsilon would be.
NO_CLIP = 1e30
NOT_PRIVATE = "NOT PRIVATE: epsilon = inf, trained without noise and without clipping (a baseline, not a release)"

_FORMAT = 1


# ----------------------------------------------------------------------------------------------------
# Train
# ----------------------------------------------------------------------------------------------------


#: TrainConfig fields that do not decide the trained generator (how often to checkpoint).
_NOT_IDENTITY = ("checkpoint_steps", "checkpoint_minutes")


def _train_identity(config: RunConfig) -> dict[str, Any]:
    """The settings that decide the trained generator (a run folder's model is reused only if they match)."""
    d = dataclasses.asdict(config.data)
    d.pop("eval_data"), d.pop("eval_rows")
    t = dataclasses.asdict(config.train)
    for k in _NOT_IDENTITY:
        t.pop(k, None)
    if t["target_epsilon"] == math.inf:  # the non-private baseline; JSON has no inf (TrainConfig reads "inf")
        t["target_epsilon"] = "inf"
    return json.loads(json.dumps({"data": d, "train": t}))


def _use_cache_config(model: torch.nn.Module) -> Any | None:
    """The config holding ``use_cache`` of ``model`` (the base model's under PEFT), or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    return config if config is not None and hasattr(config, "use_cache") else None


def _build_model(cfg: TrainConfig):
    from ghostdp.integrations.hf.models import load_causal_lm

    model, tokenizer = load_causal_lm(cfg.model, quantization=cfg.quantization)
    if getattr(model, "is_quantized", False) and cfg.quantization is None:
        raise ConfigError(
            f"train.model={cfg.model!r} is quantized: ghostdp trains LoRA adapters over a frozen 4-bit base (set "
            "train.quantization='4bit' to load it as one) or float weights; it has no per-example gradient of "
            "quantized weights. Load an unquantized checkpoint, or use quantization='4bit' with method='lora'."
        )
    torch.manual_seed(cfg.seed)  # LoRA's A matrices are drawn here
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in cfg.lora_targets if t not in present]
        if missing:
            raise ConfigError(
                f"train.lora_targets names {missing}, which {cfg.model} does not have. Its module names include "
                f"{sorted(n for n in present if n.endswith('proj'))[:12]}."
            )
        layers = {}
        if cfg.lora_layers is not None:
            n = getattr(model.config, "num_hidden_layers", None)
            if n is None or cfg.lora_layers > n:
                raise ConfigError(f"train.lora_layers={cfg.lora_layers}: {cfg.model} has {n} blocks; pick at most "
                                  "that.")
            layers = {"layers_to_transform": list(range(n - cfg.lora_layers, n))}
        model = get_peft_model(model, LoraConfig(
            r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM", **layers,
        ))
    elif cfg.method == "prompt":
        from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

        model = get_peft_model(model, PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=cfg.prompt_tokens, prompt_tuning_init=PromptTuningInit.RANDOM))
        drop_virtual_logits(model, cfg.prompt_tokens)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return model, tokenizer


def drop_virtual_logits(model: torch.nn.Module, n_virtual: int) -> None:
    """A PEFT prompt-tuned model returns logits for its n virtual positions too, (B, n + T, V); its callers here
    (the per-example LM loss, perplexity, label scoring) pair logits with the T input positions. Keep those:
    the virtual positions carry no label (PEFT itself labels them -100), so the per-example loss is unchanged."""

    def hook(module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        logits = getattr(output, "logits", None)
        if ids is not None and logits is not None and logits.shape[1] == ids.shape[1] + n_virtual:
            output.logits = logits[:, n_virtual:]
        return output

    model.register_forward_hook(hook, with_kwargs=True)


def checkpoint_timer(minutes: float):
    """A Trainer callback that asks for a checkpoint when ``minutes`` have passed since the last one (the step
    count alone could leave hours between checkpoints on a slow machine)."""
    from transformers import TrainerCallback

    class CheckpointTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds, self.last = minutes * 60.0, time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            if time.monotonic() - self.last >= self.seconds:
                control.should_save = True
            return control

        def on_save(self, args, state, control, **kwargs):
            self.last = time.monotonic()
            return control

    return CheckpointTimer()


def last_checkpoint(paths: RunPaths) -> Path | None:
    """The newest training checkpoint of an interrupted ``train`` in this run folder, if any."""
    if not paths.trainer.is_dir():
        return None
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(paths.trainer))
    return Path(last) if last is not None else None


def _refuse_retraining(paths: RunPaths, config: RunConfig) -> None:
    """A folder that holds a trained generator is never trained again (that would spend privacy again)."""
    if not (paths.model / GENERATOR_META).is_file():
        return
    info = _read_json(paths.model / GENERATOR_META)
    diffs = setting_differences(info.get("training", {}).get("identity"), _train_identity(config))
    raise ConfigError(
        f"{paths.model} already holds a trained generator. Training again on the same data spends privacy again "
        "(the runs compose); use a new --run-dir, or delete that folder knowingly."
        + (f" Settings of this command that differ from it: {'; '.join(diffs)}." if diffs else "")
    )


def _resume_point(paths: RunPaths, config: RunConfig) -> Path | None:
    """The checkpoint to resume from, refused (naming each differing setting) if it was made with others."""
    last = last_checkpoint(paths)
    if last is None:
        return None
    if not paths.attempt.is_file():
        raise ConfigError(
            f"{last} has no record of its settings ({paths.attempt} is missing), so it cannot be resumed safely. "
            f"Delete {paths.trainer} to start training over (the interrupted run released nothing)."
        )
    diffs = setting_differences(_read_json(paths.attempt)["identity"], _train_identity(config))
    if diffs:
        raise ConfigError(
            f"{paths.trainer} holds the checkpoint of an interrupted training run made with other settings: "
            f"{'; '.join(diffs)}. Re-run with its settings to resume it, or delete {paths.trainer} to start over "
            "with these (the interrupted run released nothing)."
        )
    return last


def _finished_checkpoint(trainer, cfg: TrainConfig, checkpoint: Path, done: dict[str, Any]):
    """The trained weights and privacy figures of a checkpoint written at the last step (nothing left to train):
    the Trainer's model gets the checkpoint's weights; returns ``(privacy figures, the Trainer's log history)``."""
    trainer._load_from_checkpoint(str(checkpoint))  # the Trainer's own loader (PEFT adapters or a full model)
    priv = {k: done[k] for k in ("epsilon", "delta", "accountant", "target_epsilon", "noise_multiplier",
                                 "max_grad_norm", "sample_rate", "logical_batch_size", "steps", "history")}
    priv["planned_steps"] = cfg.max_steps if cfg.max_steps is not None else planning.planned_steps(
        sample_rate=done["sample_rate"], epochs=cfg.num_train_epochs, max_steps=None)
    state = _read_json(checkpoint / "trainer_state.json")
    return priv, state.get("log_history", [])


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} cannot be read ({exc}); it was written by ghostdp: restore it from a copy of "
                          "the run folder.") from exc


def _check_label_names(config: RunConfig) -> None:
    if config.data.label_names is None and not config.data.train_data.startswith("sst2:"):
        raise ConfigError(
            "data.label_names is not set: the label set would be read from the private data and published in "
            "model/ (not DP: a label only one row has would reveal that row). Name the labels, e.g. "
            "--label-names '0=negative,1=positive' (raw=name pairs; 'pos=pos' keeps a raw value as the name)."
        )


def train(config: RunConfig, run_dir: str | Path, *, show_progress: bool = True) -> LoadedGenerator:
    """DP fine-tuning of the generator on the private data; writes ``run_dir/model`` and returns it loaded.

    Refuses a run folder that already holds a trained generator: training again on the same data spends
    privacy again (the two runs compose), so it must be a deliberate new run folder. Writes a checkpoint
    every ``train.checkpoint_steps`` steps or ``train.checkpoint_minutes`` minutes to ``private/trainer``; an
    interrupted run called again with the same settings resumes from the last one (exactly: model,
    optimizer, Poisson sampler, noise RNG and privacy ledger). Every input is checked before the model
    loads; nothing is written before the checks pass.
    """
    paths = RunPaths(Path(run_dir))
    with lock_run_folder(paths.root, "train"):
        return _train_locked(config, paths, show_progress)


def _train_locked(config: RunConfig, paths: RunPaths, show_progress: bool) -> LoadedGenerator:
    from ghostdp.integrations.hf.args import DPTrainingArguments
    from ghostdp.integrations.hf.trainer import PRIVACY_FILE, DPTrainer

    cfg = config.train
    _refuse_retraining(paths, config)
    _check_label_names(config)
    started = time.time()
    data = load_private_data(config.data)
    N = len(data)
    if N < cfg.logical_batch_size:
        raise ConfigError(
            f"The private data has {N} rows, fewer than train.logical_batch_size={cfg.logical_batch_size}; lower "
            "logical_batch_size (q = logical_batch_size / N must be <= 1, and small for privacy amplification)."
        )
    delta = cfg.target_delta if cfg.target_delta is not None else planning.default_delta(N)
    try:
        planning.check_delta(delta, N, where="train.target_delta")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    resume = _resume_point(paths, config)

    release = None
    attempt = _read_json(paths.attempt) if paths.attempt.is_file() else {}
    same_run = bool(attempt) and not setting_differences(attempt.get("identity"), _train_identity(config))
    if cfg.label_epsilon is not None and same_run and attempt.get("label_release") is not None:
        # Drawn once per training run, not once per attempt: a second draw would be a second release.
        release = LabelRelease(**attempt["label_release"])
    elif cfg.label_epsilon is not None:
        rng = np.random.default_rng(None if cfg.dp_seed is None else [cfg.dp_seed, 2])
        release = release_label_counts(data.label_counts(), cfg.label_epsilon, rng=rng)
        logger.info("Released the label counts with epsilon=%g (discrete Laplace): %s", cfg.label_epsilon,
                    release.noisy_counts)

    model, tokenizer = _build_model(cfg)
    # The Trainer (transformers >= 5) sets config.use_cache to TrainingArguments.use_cache (False) for training;
    # the generator gets the loaded model's value back before it is saved or sampled from. Left False, sampling
    # and label scoring lose their prefix key/value cache (2.8x slower scoring in the pipeline) and a fully
    # fine-tuned model/config.json says so for every later load.
    cache_config = _use_cache_config(model)
    use_cache_loaded = None if cache_config is None else cache_config.use_cache
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info_model = {"base_model": cfg.model, "method": cfg.method, "quantization": cfg.quantization,
                  "trainable_parameters": trainable}
    collator = make_collator(tokenizer, {"template": cfg.template, "dataset_name": cfg.dataset_name,
                                         "chat_template": cfg.chat_template, "system_prompt": cfg.system_prompt,
                                         "max_length": cfg.max_length})
    nonprivate = math.isinf(cfg.target_epsilon)  # epsilon = inf: a NOT private baseline, no noise, no clipping
    if nonprivate:
        logger.warning("train.target_epsilon=inf: training WITHOUT noise and without clipping (C=%g never binds). "
                       "The generator and its samples are NOT private: a baseline for comparisons only.", NO_CLIP)
    args = DPTrainingArguments(
        output_dir=str(paths.trainer), target_epsilon=None if nonprivate else cfg.target_epsilon, target_delta=delta,
        **({"noise_multiplier": 0.0} if nonprivate else {}),
        logical_batch_size=cfg.logical_batch_size, per_device_train_batch_size=cfg.physical_batch_size,
        num_train_epochs=cfg.num_train_epochs, max_steps=cfg.max_steps if cfg.max_steps is not None else -1,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler, weight_decay=0.0,
        max_grad_norm=NO_CLIP if nonprivate else cfg.max_grad_norm, accountant=cfg.accountant, clipping=cfg.clipping,
        dp_seed=cfg.dp_seed, seed=cfg.seed, bf16=cfg.bf16, use_cpu=cfg.use_cpu, logging_steps=1, save_strategy="steps",
        save_steps=cfg.checkpoint_steps, save_total_limit=2, report_to="none",
        remove_unused_columns=False, dataloader_pin_memory=False, disable_tqdm=not show_progress,
        log_private_loss=True,  # kept in private/ (training.json, checkpoints), never in model/ or synthetic/
    )
    trainer = DPTrainer(model=model, args=args, train_dataset=data.examples(), data_collator=collator,
                        processing_class=tokenizer, callbacks=[checkpoint_timer(cfg.checkpoint_minutes)])
    finished = False
    if resume is not None:
        done = _read_json(resume / PRIVACY_FILE)
        budget = planning.plan_dp_sgd(
            num_examples=N, expected_batch_size=cfg.logical_batch_size, delta=delta, accountant=cfg.accountant,
            steps=planning.planned_steps(sample_rate=cfg.logical_batch_size / N, epochs=cfg.num_train_epochs,
                                         max_steps=cfg.max_steps),
            target_epsilon=cfg.target_epsilon, noise_multiplier=done["noise_multiplier"], history=done["history"],
        ).budget_steps
        finished = done["steps"] >= budget  # killed after the last step's checkpoint, before the model was written
        logger.warning("Resuming the interrupted DP training from %s: %d steps done (epsilon so far %.4g, already in "
                       "the ledger); %s", resume, done["steps"], done["epsilon"],
                       "that was the last step: writing the generator from it." if finished else
                       "the steps after it are trained again from the same state.")
    else:
        write_text_atomic(paths.attempt, json.dumps({"identity": _train_identity(config), "label_release":
                                                     release.to_dict() if release is not None else None}, indent=2)
                          + "\n")
    logger.info("DP fine-tuning %s (%s, %d trainable parameters) on %d private rows; a checkpoint every %d steps or "
                "%g minutes in %s", cfg.model, cfg.method, trainable, N, cfg.checkpoint_steps,
                cfg.checkpoint_minutes, paths.trainer, extra=COMMIT)
    if finished:
        priv, log_history = _finished_checkpoint(trainer, cfg, resume, done)
        model = trainer.model
    else:
        trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
        plan, engine = trainer.privacy_plan, trainer.privacy_engine
        priv = {"epsilon": trainer.current_epsilon(), "delta": plan.delta, "accountant": plan.accountant,
                "target_epsilon": plan.target_epsilon, "noise_multiplier": plan.noise_multiplier,
                "max_grad_norm": plan.max_grad_norm, "sample_rate": plan.sample_rate,
                "logical_batch_size": plan.logical_batch_size, "steps": engine.steps,
                "planned_steps": plan.planned_steps, "history": engine.accountant.history}
        log_history = trainer.state.log_history
        engine.detach()
        model = trainer.model
    model.eval()
    if cache_config is not None:
        cache_config.use_cache = use_cache_loaded
    eps_train = priv["epsilon"]
    eps_rdp = planning.epsilon_of_history(priv["history"], priv["delta"], "rdp")

    spent = planning.run_epsilon(eps_train, release.epsilon if release is not None else None, priv["delta"])
    eps_labels = spent.epsilon_labels
    log = [{"step": int(r["step"]), "loss": float(r["loss"]), "epsilon": float(r["epsilon"]),
            "learning_rate": float(r.get("learning_rate", float("nan")))}
           for r in log_history if "loss" in r and "epsilon" in r]
    # Only functions of the DP model and public inputs go into model/ (see tests/synthetic/test_run_folder.py);
    # losses on private batches, N and the time go to private/.
    info = {
        "format": _FORMAT,
        "ghostdp_version": _version(),
        "run_id": uuid.uuid4().hex,
        **info_model,
        "template": cfg.template,
        "dataset_name": cfg.dataset_name,
        "chat_template": cfg.chat_template,
        "system_prompt": cfg.system_prompt,
        "max_length": cfg.max_length,
        "add_bos": False,
        "label_names": list(data.label_names),
        "data": {"source": data.source, "fingerprint": data_fingerprint(data, paths),
                 "fingerprint_kind": "HMAC-SHA256(run key in private/data_key, ghostdp data_hash)"},
        "privacy": {
            "epsilon_total": spent.epsilon_total,
            "delta": priv["delta"],
            "epsilon_train": eps_train,
            "epsilon_train_rdp": eps_rdp,
            "epsilon_labels": eps_labels,
            "composition": spent.composition,
            "accountant": priv["accountant"],
            "target_epsilon": priv["target_epsilon"],
            "noise_multiplier": priv["noise_multiplier"],
            "max_grad_norm": priv["max_grad_norm"],
            "sample_rate": priv["sample_rate"],
            "logical_batch_size": priv["logical_batch_size"],
            "steps": priv["steps"],
            "planned_steps": priv["planned_steps"],
            "adjacency": "add/remove one example (Poisson subsampling)",
            "dp_seed": cfg.dp_seed,
        },
        "label_release": release.to_dict() if release is not None else None,
        "training": {"learning_rate": cfg.learning_rate, "identity": _train_identity(config)},
    }
    if nonprivate:  # epsilon inf is not JSON: the epsilons become null beside an explicit NOT PRIVATE marker
        log = [{**r, "epsilon": None} for r in log]
        info["privacy"].update(epsilon_total=None, epsilon_train=None, epsilon_train_rdp=None, target_epsilon=None,
                               not_private=NOT_PRIVATE)
    record = {"log": log, "seconds": round(time.time() - started, 1), "num_examples": N,
              "resumed_from": str(resume) if resume is not None else None,
              "note": "PRIVATE: losses on private batches without noise, the exact N and the time; not releasable"}
    write_text_atomic(paths.training_record, json.dumps(record, indent=2, allow_nan=False) + "\n")
    paths.model.mkdir(parents=True, exist_ok=True)
    trainer.save_model(str(paths.model))
    (paths.model / "training_args.bin").unlink(missing_ok=True)  # a pickle of the arguments, not needed to load
    tokenizer.save_pretrained(str(paths.model))
    write_text_atomic(paths.model / GENERATOR_META, json.dumps(info, indent=2, allow_nan=False) + "\n")  # last: the
    # folder holds a trained generator once this file is there
    shutil.rmtree(paths.trainer, ignore_errors=True)  # the checkpoints are spent: the generator is final
    paths.attempt.unlink(missing_ok=True)
    record_config(config, paths, info)
    logger.info("Generator written to %s: (epsilon=%.4g, delta=%.3g)-DP (%.4g DP-SGD over %d steps, sigma=%.4g; "
                "%.4g label counts)%s", paths.model, spent.epsilon_total, priv["delta"], eps_train,
                priv["steps"], priv["noise_multiplier"], eps_labels, f" {NOT_PRIVATE}" if nonprivate else "")
    device = next(model.parameters()).device
    return LoadedGenerator(model=model, tokenizer=tokenizer, collator=collator, info=info, device=device)


def _version() -> str:
    import ghostdp

    return ghostdp.__version__


# ----------------------------------------------------------------------------------------------------
# Synthesize and evaluate, from a run folder
# ----------------------------------------------------------------------------------------------------


def _generator(paths: RunPaths, config: RunConfig, generator: LoadedGenerator | None) -> LoadedGenerator:
    if generator is not None:
        return generator
    if not (paths.model / GENERATOR_META).is_file():
        raise ConfigError(f"{paths.model} holds no trained generator: run `ghostdp train` with this --run-dir first.")
    _read_json(paths.model / GENERATOR_META)  # a torn or edited file: say which, before loading a model
    return load_generator(paths.model, use_cpu=config.train.use_cpu)


def synthesize_step(
    config: RunConfig, run_dir: str | Path, *, generator: LoadedGenerator | None = None, show_progress: bool = True,
    max_batches: int | None = None,
) -> SynthesisResult:
    """Sample ``run_dir/synthetic`` from ``run_dir/model`` (resuming what is there).

    A set made with other sampling settings is refused before anything is written, naming each setting.
    """
    paths = RunPaths(Path(run_dir))
    with lock_run_folder(paths.root, "synthesize"):
        gen = _generator(paths, config, generator)
        scfg = config.synthesize
        proportions = None
        if scfg.label_proportions == "dp" and not scfg.per_label:
            release = gen.info.get("label_release")
            if release is None:
                raise ConfigError(
                    "synthesize.label_proportions='dp' but the generator was trained without a DP label release "
                    "(train.label_epsilon none). Use synthesize.label_proportions='uniform', or retrain with "
                    "train.label_epsilon set."
                )
            proportions = release["proportions"]
        targets = label_targets(gen.label_names, scfg.num_samples, per_label=scfg.per_label, proportions=proportions)
        model_info = {
            "model_id": gen.info["run_id"], "base_model": gen.info["base_model"], "method": gen.info["method"],
            "model_dir": str(paths.model), "privacy": gen.info["privacy"], "data": gen.info["data"],
        }
        from ghostdp.integrations.synthetic.label_scoring import margin_filter_for

        sample_filter = margin_filter_for(gen, scfg.filter_margin, top_fraction=scfg.filter_top_fraction)
        try:
            result = synthesize(gen.model, gen.tokenizer, gen.collator, gen.label_names, scfg, paths.synthetic,
                                targets=targets, model_info=model_info, device=gen.device, max_batches=max_batches,
                                show_progress=show_progress, sample_filter=sample_filter)
        except ResumeMismatchError as exc:
            raise ConfigError(str(exc)) from None
        record_config(config, paths, gen.info)
        return result


def evaluate_step(
    config: RunConfig, run_dir: str | Path, *, generator: LoadedGenerator | None = None, show_progress: bool = True,
    shared: Any | None = None,
):
    """Evaluate ``run_dir/synthetic`` against real held-out data; writes the run report.

    ``shared``: a ``shared_eval.SharedEvaluation`` that the runs of one study or ``--seeds`` repetition
    share (embeddings, base perplexity, floor samples)."""
    from ghostdp.integrations.synthetic.evaluate import evaluate_run

    paths = RunPaths(Path(run_dir))
    with lock_run_folder(paths.root, "evaluate"):
        gen = _generator(paths, config, generator)
        result = evaluate_run(config, paths, gen, show_progress=show_progress, shared=shared)
        record_config(config, paths, gen.info)
        return result


def record_config(config: RunConfig, paths: RunPaths, generator_info: dict[str, Any] | None = None) -> Path:
    """Write ``config.toml`` after a stage succeeded: the settings that were actually run.

    With ``generator_info``, the [data] and [train] settings that made the generator are taken from it (a later
    stage's flags such as --dp-seed, which seed its own baselines, must not rewrite the record of training).
    """
    identity = (generator_info or {}).get("training", {}).get("identity")
    if identity:
        data = {**identity["data"], "eval_data": config.data.eval_data, "eval_rows": config.data.eval_rows}
        train = {**identity["train"], **{k: getattr(config.train, k) for k in _NOT_IDENTITY}}
        try:
            config = build_run_config({"data": data, "train": train,
                                       "synthesize": dataclasses.asdict(config.synthesize),
                                       "evaluate": dataclasses.asdict(config.evaluate),
                                       **({"preset": config.preset} if config.preset else {})})
        except ConfigError as exc:  # an identity from an older ghostdp: keep this command's settings
            logger.debug("config.toml from this command's settings (%s)", exc)
    text = run_config_to_toml(dataclasses.replace(config, run_dir=str(paths.root)))
    write_text_atomic(paths.config, text)
    return paths.config


def write_config(config: RunConfig, run_dir: str | Path) -> Path:
    """``config.toml`` with ``config`` as it is (see :func:`record_config`, which the stages call on success)."""
    return record_config(config, RunPaths(Path(run_dir)))


def run_pipeline(config: RunConfig, run_dir: str | Path, *, show_progress: bool = True, shared: Any | None = None):
    """Train (or reuse this folder's generator if it was trained with the same settings), synthesize, evaluate.

    Every input (private and held-out data, the folder's settings) is checked before the first expensive
    step. Re-running the same command after an interruption continues: a finished generator is reused
    (never retrained: that would spend privacy again), interrupted training resumes from its last
    checkpoint, synthesis resumes, evaluation runs again. ``shared``: see :func:`evaluate_step`.
    """
    paths = RunPaths(Path(run_dir))
    with lock_run_folder(paths.root, "pipeline"):
        timings: dict[str, float] = {}
        t = time.time()
        trained = (paths.model / GENERATOR_META).is_file()
        if trained:
            info = _read_json(paths.model / GENERATOR_META)
            diffs = setting_differences(info.get("training", {}).get("identity"), _train_identity(config))
            if diffs:
                raise ConfigError(
                    f"{paths.model} holds a generator trained with other data/train settings than this command: "
                    f"{'; '.join(diffs)}. Use a new --run-dir (training again spends privacy again), or restore "
                    f"the settings (they are in {paths.config})."
                )
        else:
            _check_label_names(config)
            _resume_point(paths, config)
        private = load_private_data(config.data)  # both data sets, validated before anything expensive
        check_heldout_disjoint(private, load_eval_data(config.data, private.label_names))
        if trained:
            logger.info("Reusing the generator in %s (already trained with these settings; no privacy spent again)",
                        paths.model)
            gen = load_generator(paths.model, use_cpu=config.train.use_cpu)
        else:
            gen = train(config, paths.root, show_progress=show_progress)
        timings["train_s"] = time.time() - t
        t = time.time()
        synthesis = synthesize_step(config, paths.root, generator=gen, show_progress=show_progress)
        timings["synthesize_s"] = time.time() - t
        t = time.time()
        result = evaluate_step(config, paths.root, generator=gen, show_progress=show_progress, shared=shared)
        timings["evaluate_s"] = time.time() - t
        if config.evaluate.audit_canaries:  # a separate run in <run-dir>/audit/, after the release is written
            from ghostdp.integrations.synthetic.audit_section import add_to_report, run_audit_section

            t = time.time()
            add_to_report(paths.root, run_audit_section(config, paths.root, gen.info))
            timings["audit_s"] = time.time() - t
        logger.info("Pipeline timings: %s", {k: round(v, 1) for k, v in timings.items()})
        return result, synthesis, timings


def interruption_message(command: str, run_dir: str | Path) -> str:
    """What re-running ``command`` in ``run_dir`` will do after an interruption (printed by the CLI)."""
    paths = RunPaths(Path(run_dir))
    again = f"Re-run the same command with --run-dir {paths.root}: "
    if command in ("train", "pipeline") and not (paths.model / GENERATOR_META).is_file():
        last = last_checkpoint(paths)
        if last is None:
            what = ("training starts again from step 0 (no checkpoint had been written yet; nothing was released, "
                    "so no privacy is spent twice)")
        else:
            what = (f"training resumes from its last checkpoint, {last.name} (steps after it are trained again; "
                    "the privacy ledger continues from there)")
        return again + what + ("; then synthesis and evaluation run." if command == "pipeline" else ".")
    if command in ("synthesize", "pipeline"):
        return again + "the trained generator is reused and synthesis resumes where it stopped" + (
            "; evaluation runs again." if command == "pipeline" else ".")
    return again + "the evaluation runs again."
