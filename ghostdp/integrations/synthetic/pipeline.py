"""DP synthetic text end to end: train a generator with DP-SGD, sample from it, evaluate the samples.

One run lives in one folder (``run_dir``)::

    config.toml          the resolved configuration (re-run with --config run_dir/config.toml)
    model/               RELEASABLE (DP): LoRA adapter or full model, tokenizer, ghostdp_model.json
    synthetic/           RELEASABLE (DP): synthetic.jsonl / .csv, synthetic_meta.json
    floor/               samples from the un-finetuned model (no private data involved)
    private/             NOT releasable: the Trainer's working folder, the key of the data fingerprint
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
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ghostdp.engine import planning
from ghostdp.integrations.synthetic.config import ConfigError, RunConfig, TrainConfig, run_config_to_toml
from ghostdp.integrations.synthetic.synthesize import (
    GENERATOR_META,
    LoadedGenerator,
    SynthesisResult,
    label_targets,
    load_generator,
    make_collator,
    release_label_counts,
    synthesize,
)
from ghostdp.integrations.synthetic.run_folder import (
    MODEL_DIR,
    RunPaths,
    data_fingerprint,
    load_eval_data,
    load_private_data,
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

_FORMAT = 1


# ----------------------------------------------------------------------------------------------------
# Train
# ----------------------------------------------------------------------------------------------------


def _train_identity(config: RunConfig) -> dict[str, Any]:
    """The settings that decide the trained generator (a run folder's model is reused only if they match)."""
    d = dataclasses.asdict(config.data)
    d.pop("eval_data"), d.pop("eval_rows")
    return json.loads(json.dumps({"data": d, "train": dataclasses.asdict(config.train)}))


def _build_model(cfg: TrainConfig):
    from ghostdp.integrations.hf.models import load_causal_lm

    model, tokenizer = load_causal_lm(cfg.model)
    if getattr(model, "is_quantized", False):
        raise ConfigError(
            f"train.model={cfg.model!r} is quantized: DP fine-tuning needs float weights (per-example gradients of "
            "quantized layers are not supported). Load an unquantized checkpoint."
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
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return model, tokenizer


def train(config: RunConfig, run_dir: str | Path, *, show_progress: bool = True) -> LoadedGenerator:
    """DP fine-tuning of the generator on the private data; writes ``run_dir/model`` and returns it loaded.

    Refuses a run folder that already holds a trained model: training again on the same data spends
    privacy again (the two runs compose), so it must be a deliberate new run folder.
    """
    from ghostdp.integrations.hf.args import DPTrainingArguments
    from ghostdp.integrations.hf.trainer import DPTrainer

    cfg = config.train
    paths = RunPaths(Path(run_dir))
    if (paths.model / GENERATOR_META).is_file():
        raise ConfigError(
            f"{paths.model} already holds a trained generator. Training again on the same data spends privacy "
            "again (the runs compose); use a new --run-dir, or delete that folder knowingly."
        )
    started = time.time()
    data = load_private_data(config.data)
    N = len(data)
    if N < cfg.logical_batch_size:
        raise ConfigError(
            f"The private data has {N} rows, fewer than train.logical_batch_size={cfg.logical_batch_size}; lower "
            "logical_batch_size (q = logical_batch_size / N must be <= 1, and small for privacy amplification)."
        )
    delta = cfg.delta if cfg.delta is not None else planning.default_delta(N)
    try:
        planning.check_delta(delta, N, where="train.delta")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None

    release = None
    if cfg.label_epsilon is not None:
        rng = np.random.default_rng(None if cfg.dp_seed is None else [cfg.dp_seed, 2])
        release = release_label_counts(data.label_counts(), cfg.label_epsilon, rng=rng)
        logger.info("Released the label counts with epsilon=%g (discrete Laplace): %s", cfg.label_epsilon,
                    release.noisy_counts)

    model, tokenizer = _build_model(cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info_model = {"base_model": cfg.model, "method": cfg.method, "trainable_parameters": trainable}
    collator = make_collator(tokenizer, {"template": cfg.template, "dataset_name": cfg.dataset_name,
                                         "max_length": cfg.max_length})
    args = DPTrainingArguments(
        output_dir=str(paths.private / "trainer"), target_epsilon=cfg.target_epsilon, target_delta=delta,
        logical_batch_size=cfg.logical_batch_size, per_device_train_batch_size=cfg.physical_batch_size,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps if cfg.max_steps is not None else -1,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler, weight_decay=0.0,
        max_grad_norm=cfg.max_grad_norm, accountant=cfg.accountant, clipping=cfg.clipping, dp_seed=cfg.dp_seed,
        seed=cfg.seed, bf16=cfg.bf16, use_cpu=cfg.use_cpu, logging_steps=1, save_strategy="no", report_to="none",
        remove_unused_columns=False, dataloader_pin_memory=False, disable_tqdm=not show_progress,
    )
    trainer = DPTrainer(model=model, args=args, train_dataset=data.examples(), data_collator=collator,
                        processing_class=tokenizer)
    logger.info("DP fine-tuning %s (%s, %d trainable parameters) on %d private rows", cfg.model, cfg.method,
                trainable, N)
    trainer.train()
    plan, engine = trainer.privacy_plan, trainer.privacy_engine
    eps_train = trainer.current_epsilon()
    eps_rdp = planning.epsilon_of_history(engine.accountant.history, plan.delta, "rdp")
    engine.detach()
    model = trainer.model
    model.eval()

    spent = planning.run_epsilon(eps_train, release.epsilon if release is not None else None, plan.delta)
    eps_labels = spent.epsilon_labels
    log = [{"step": int(r["step"]), "loss": float(r["loss"]), "epsilon": float(r["epsilon"]),
            "learning_rate": float(r.get("learning_rate", float("nan")))}
           for r in trainer.state.log_history if "loss" in r and "epsilon" in r]
    info = {
        "format": _FORMAT,
        "ghostdp_version": _version(),
        "run_id": uuid.uuid4().hex,
        **info_model,
        "template": cfg.template,
        "dataset_name": cfg.dataset_name,
        "max_length": cfg.max_length,
        "add_bos": False,
        "label_names": list(data.label_names),
        "data": {"source": data.source, "num_examples": N, "fingerprint": data_fingerprint(data, paths),
                 "fingerprint_kind": "HMAC-SHA256(run key in private/data_key, ghostdp data_hash)"},
        "privacy": {
            "epsilon_total": spent.epsilon_total,
            "delta": plan.delta,
            "epsilon_train": eps_train,
            "epsilon_train_rdp": eps_rdp,
            "epsilon_labels": eps_labels,
            "composition": spent.composition,
            "accountant": plan.accountant,
            "target_epsilon": plan.target_epsilon,
            "noise_multiplier": plan.noise_multiplier,
            "max_grad_norm": plan.max_grad_norm,
            "sample_rate": plan.sample_rate,
            "logical_batch_size": plan.logical_batch_size,
            "steps": engine.steps,
            "planned_steps": plan.planned_steps,
            "adjacency": "add/remove one example (Poisson subsampling)",
        },
        "label_release": release.to_dict() if release is not None else None,
        "training": {"log": log, "seconds": round(time.time() - started, 1), "learning_rate": cfg.learning_rate,
                     "identity": _train_identity(config)},
    }
    paths.model.mkdir(parents=True, exist_ok=True)
    trainer.save_model(str(paths.model))
    tokenizer.save_pretrained(str(paths.model))
    (paths.model / GENERATOR_META).write_text(json.dumps(info, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    logger.info("Generator written to %s: (epsilon=%.4g, delta=%.3g)-DP (%.4g DP-SGD over %d steps, sigma=%.4g; "
                "%.4g label counts)", paths.model, info["privacy"]["epsilon_total"], plan.delta, eps_train,
                engine.steps, plan.noise_multiplier, eps_labels)
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
    return load_generator(paths.model, use_cpu=config.train.use_cpu)


def synthesize_step(
    config: RunConfig, run_dir: str | Path, *, generator: LoadedGenerator | None = None, show_progress: bool = True,
    max_batches: int | None = None,
) -> SynthesisResult:
    """Sample ``run_dir/synthetic`` from ``run_dir/model`` (resuming what is there)."""
    paths = RunPaths(Path(run_dir))
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

    return synthesize(gen.model, gen.tokenizer, gen.collator, gen.label_names, scfg, paths.synthetic,
                      targets=targets, model_info=model_info, device=gen.device, max_batches=max_batches,
                      show_progress=show_progress, sample_filter=margin_filter_for(gen, scfg.filter_margin))


def evaluate_step(
    config: RunConfig, run_dir: str | Path, *, generator: LoadedGenerator | None = None, show_progress: bool = True,
):
    """Evaluate ``run_dir/synthetic`` against real held-out data; writes the run report."""
    from ghostdp.integrations.synthetic.evaluate import evaluate_run

    paths = RunPaths(Path(run_dir))
    gen = _generator(paths, config, generator)
    return evaluate_run(config, paths, gen, show_progress=show_progress)


def write_config(config: RunConfig, run_dir: str | Path) -> Path:
    path = Path(run_dir) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_config_to_toml(dataclasses.replace(config, run_dir=str(run_dir))), encoding="utf-8")
    return path


def run_pipeline(config: RunConfig, run_dir: str | Path, *, show_progress: bool = True):
    """Train (or reuse this folder's generator if it was trained with the same settings), synthesize, evaluate.

    Re-running the same command after an interruption continues: a finished generator is reused (never
    retrained: that would spend privacy again), synthesis resumes, evaluation runs again.
    """
    paths = RunPaths(Path(run_dir))
    paths.root.mkdir(parents=True, exist_ok=True)
    write_config(config, paths.root)
    timings: dict[str, float] = {}
    t = time.time()
    if (paths.model / GENERATOR_META).is_file():
        info = json.loads((paths.model / GENERATOR_META).read_text(encoding="utf-8"))
        if info.get("training", {}).get("identity") != _train_identity(config):
            raise ConfigError(
                f"{paths.model} holds a generator trained with other data/train settings than this configuration. "
                "Use a new --run-dir (training again spends privacy again), or restore the settings in "
                f"{paths.root / 'config.toml'}."
            )
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
    result = evaluate_step(config, paths.root, generator=gen, show_progress=show_progress)
    timings["evaluate_s"] = time.time() - t
    logger.info("Pipeline timings: %s", {k: round(v, 1) for k, v in timings.items()})
    return result, synthesis, timings
