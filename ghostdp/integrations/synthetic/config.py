"""The configuration of one DP synthetic-text run: data, training, synthesis, evaluation.

One frozen dataclass per stage, each field with its help text (``field(metadata={"help": ...})``), so the
same definitions drive the TOML files, the command-line flags (``ghostdp.cli`` builds one flag per field,
``--lora-rank`` for ``lora_rank``) and the checks. Values are resolved in this order, later wins:

    dataclass defaults  <  preset (``--preset cpu-demo``)  <  TOML file (``--config run.toml``)  <  flags

A TOML file has one table per stage and an optional top-level ``run_dir`` and ``preset``::

    preset = "cpu-demo"
    run_dir = "runs/my-run"

    [data]
    train_data = "sst2:train"      # or a .csv / .tsv / .jsonl / .parquet path
    train_rows = 3000

    [train]
    target_epsilon = 3.0

    [synthesize]
    num_samples = 300

    [evaluate]
    classifier = "linear_probe"

TOML has no null: write ``"none"`` for a field whose value may be None (e.g. ``target_delta = "none"``).
Unknown sections or keys are errors, never ignored: a typo in a privacy parameter must not silently fall
back to a default. Every error raised here is a :class:`ConfigError` (a ``ValueError``) naming the
field and the fix; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 needs the tomli backport
    import tomli as tomllib

__all__ = [
    "ConfigError",
    "DataConfig",
    "EvaluateConfig",
    "RunConfig",
    "SECTIONS",
    "SynthesizeConfig",
    "TrainConfig",
    "build_run_config",
    "load_toml",
    "merge_overrides",
    "parse_value",
    "run_config_to_toml",
]


class ConfigError(ValueError):
    """A configuration value or file is wrong; the message names the field and the fix."""


#: Keys renamed so the TOML config and DPTrainingArguments spell each concept one way: (table, old) -> new.
RENAMED_KEYS = {("train", "delta"): "target_delta", ("train", "epochs"): "num_train_epochs"}


def _help(text: str) -> dict[str, str]:
    return {"help": text}


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _positive_int(owner: str, name: str, value: Any, *, allow_none: bool = False, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    _check(
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
        f"{owner}.{name}={value!r}: need an int >= {minimum}" + (" (or none)" if allow_none else "") + ".",
    )


def _number(owner: str, name: str, value: Any, *, low: float, high: float = math.inf, low_open: bool = True,
            allow_none: bool = False, hint: str = "") -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    bound = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high < math.inf else "")
    _check(ok, f"{owner}.{name}={value!r}: need a finite number {bound}" + (" (or none)" if allow_none else "")
           + (f". {hint}" if hint else "."))


def _choice(owner: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"{owner}.{name}={value!r}: pick one of {', '.join(map(repr, choices))}.")


# ----------------------------------------------------------------------------------------------------
# The stages
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """The private training data and the real held-out data used only for evaluation.

    ``sst2:train`` / ``sst2:dev`` / ``sst2:test`` name the shared SST-2 files (``../shared/data/sst2``
    beside the checkout, or ``sst2_dir``); anything else is a file path (or a Hugging Face hub dataset name)
    read with :func:`ghostdp.integrations.synthetic.text_data.load_labelled_texts`.
    """

    train_data: str = field(default="sst2:train", metadata=_help(
        "The PRIVATE labelled texts the generator is trained on: 'sst2:train' or a .csv/.tsv/.jsonl/.parquet path."))
    eval_data: str | None = field(default=None, metadata=_help(
        "REAL held-out labelled texts for evaluation only (never trained on): 'sst2:dev', 'sst2:test' or a path. "
        "none: 'sst2:dev' when train_data is SST-2; with other training data it must be named (evaluating on "
        "another task's data would give meaningless figures)."))
    text_column: str = field(default="text", metadata=_help("Text column of file data (SST-2: fixed)."))
    label_column: str = field(default="label", metadata=_help("Label column of file data (SST-2: fixed)."))
    label_names: tuple[tuple[str, str], ...] | None = field(default=None, metadata=_help(
        "Raw label -> name mapping for file data, e.g. '0=negative,1=positive' (TOML: a table). "
        "Names go into the prompt prefix; without a mapping the raw values are the names."))
    train_rows: int | None = field(default=None, metadata=_help(
        "Use a seeded random subset of this many private rows (none: all). This subset IS the private dataset "
        "(N in the accounting)."))
    eval_rows: int | None = field(default=None, metadata=_help(
        "Seeded random subset of the held-out rows (none: all)."))
    data_seed: int = field(default=0, metadata=_help("Seed of the train_rows / eval_rows subsets."))
    sst2_dir: str | None = field(default=None, metadata=_help(
        "Folder holding SST-2's train.tsv/dev.tsv/test.tsv (none: ../shared/data/sst2 beside the checkout)."))

    def __post_init__(self) -> None:
        owner = "data"
        if self.eval_data is None and isinstance(self.train_data, str) and self.train_data.startswith("sst2:"):
            object.__setattr__(self, "eval_data", "sst2:dev")
        for name in ("train_data", "eval_data", "text_column", "label_column"):
            value = getattr(self, name)
            if name == "eval_data" and value is None:
                continue
            _check(isinstance(value, str) and value.strip() != "",
                   f"{owner}.{name}={value!r}: need a non-empty string.")
        _check(self.train_data != self.eval_data,
               f"data.eval_data={self.eval_data!r} is the training data: evaluation needs REAL held-out rows the "
               "generator never saw (e.g. 'sst2:dev' or 'sst2:test').")
        _positive_int(owner, "train_rows", self.train_rows, allow_none=True)
        _positive_int(owner, "eval_rows", self.eval_rows, allow_none=True)
        _positive_int(owner, "data_seed", self.data_seed, minimum=0)
        if self.label_names is not None:
            pairs = _as_pairs(self.label_names, "data.label_names")
            object.__setattr__(self, "label_names", pairs)


@dataclass(frozen=True)
class TrainConfig:
    """DP fine-tuning of the generator (``DPTrainer``) and the DP release of the label proportions."""

    model: str = field(default="smollm2-135m", metadata=_help(
        "Causal LM to fine-tune: 'smollm2-135m' (embedded SmolLM2-135M-Instruct), a Hugging Face name or a "
        "local path."))
    method: Literal["lora", "full", "prompt"] = field(default="lora", metadata=_help(
        "'lora' (PEFT LoRA adapters only; the base stays frozen), 'full' (every parameter) or 'prompt' (PEFT prompt "
        "tuning: prompt_tokens randomly initialised virtual tokens, everything else frozen)."))
    quantization: str | None = field(default=None, metadata=_help(
        "'4bit': QLoRA, the frozen base loaded in NF4 by bitsandbytes (>= 0.46, CPU or CUDA) under LoRA adapters; "
        "needs method='lora'. none: full-precision base."))
    prompt_tokens: int = field(default=20, metadata=_help(
        "Virtual tokens of method='prompt' (trainable parameters: prompt_tokens x hidden size)."))
    lora_rank: int = field(default=8, metadata=_help("LoRA rank r."))
    lora_alpha: float = field(default=16.0, metadata=_help("LoRA scaling alpha (the update is scaled by alpha / r)."))
    lora_dropout: float = field(default=0.0, metadata=_help("Dropout on the LoRA branch (per example, so DP-safe)."))
    lora_targets: tuple[str, ...] = field(default=("q_proj", "k_proj", "v_proj", "o_proj"), metadata=_help(
        "Module names that get LoRA adapters, comma-separated."))
    lora_layers: int | None = field(default=None, metadata=_help(
        "Adapt only the top N transformer blocks (none: all). Back-propagation stops at the lowest adapted block, "
        "so a step gets cheaper, and fewer trainable parameters means less total DP noise."))
    target_epsilon: float = field(default=3.0, metadata=_help(
        "epsilon of DP-SGD training; the noise is calibrated so the planned steps spend at most this. inf: NOT "
        "private, no noise and no clipping (a baseline for comparisons, never a release)."))
    target_delta: float | None = field(default=None, metadata=_help(
        "delta of (epsilon, delta)-DP (none: 1/(2N)); the name DPTrainingArguments uses."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Per-example clipping bound C."))
    logical_batch_size: int = field(default=64, metadata=_help(
        "Expected examples per step (Poisson rate q = logical_batch_size / N)."))
    physical_batch_size: int = field(default=16, metadata=_help("Examples per forward/backward (memory only)."))
    num_train_epochs: float = field(default=1.0, metadata=_help(
        "Passes over the data in expectation (steps = num_train_epochs / q); the name DPTrainingArguments uses."))
    max_steps: int | None = field(default=None, metadata=_help("Number of DP steps; overrides num_train_epochs when set."))
    learning_rate: float = field(default=2e-3, metadata=_help("AdamW learning rate."))
    lr_scheduler: str = field(default="constant", metadata=_help(
        "Hugging Face lr_scheduler_type ('constant', 'linear', 'cosine', ...)."))
    max_length: int = field(default=64, metadata=_help("Tokens per training row, prefix and EOS included."))
    template: str = field(default="[{dataset}][{label}]: ", metadata=_help(
        "Label prefix (str.format with {label} and optional {dataset}); generation starts from its exact ids."))
    dataset_name: str = field(default="sst2", metadata=_help("The {dataset} field of the template."))
    chat_template: bool = field(default=False, metadata=_help(
        "Put the filled template in the tokenizer's chat template as the user turn and train the text as the "
        "assistant's reply (ended by the end-of-turn token): an instruction-tuned model then follows the label "
        "from the start. Write the template as an instruction, e.g. 'Write one sentence from a {label} movie "
        "review.'"))
    system_prompt: str | None = field(default="", metadata=_help(
        "With chat_template: the system message ('' an empty one; none: the chat template's own default)."))
    label_epsilon: float | None = field(default=0.1, metadata=_help(
        "epsilon of the DP release of the label counts (discrete Laplace, added to the reported epsilon); "
        "none: no release (synthesis must then use uniform label proportions)."))
    accountant: Literal["prv", "rdp"] = field(default="prv", metadata=_help("Privacy accountant."))
    clipping: Literal["auto", "ghost", "per_sample"] = field(default="auto", metadata=_help(
        "How per-example norms are computed (same result, different cost)."))
    seed: int = field(default=0, metadata=_help("Seed of model/LoRA initialisation and dropout (not of the DP noise)."))
    dp_seed: int | None = field(default=None, metadata=_help(
        "Seed of the Poisson batches, the DP noise and the label-count noise. none (default): OS entropy. "
        "A known seed voids the guarantee: tests only."))
    bf16: bool = field(default=False, metadata=_help("bfloat16 autocast (GPU); norms and noise stay fp32."))
    use_cpu: bool = field(default=False, metadata=_help("Train on the CPU even when a GPU is visible."))
    checkpoint_steps: int = field(default=10, metadata=_help(
        "Write a training checkpoint (model or adapters, optimizer, Poisson sampler, noise RNG, privacy ledger) to "
        "<run-dir>/private/trainer every this many DP steps; an interrupted `train` resumes from the last one."))
    checkpoint_minutes: float = field(default=5.0, metadata=_help(
        "Also write a checkpoint when this many minutes have passed since the last one."))

    def __post_init__(self) -> None:
        owner = "train"
        _check(isinstance(self.model, str) and self.model.strip() != "",
               f"train.model={self.model!r}: need a name or path.")
        _choice(owner, "method", self.method, ("lora", "full", "prompt"))
        _positive_int(owner, "prompt_tokens", self.prompt_tokens)
        _check(self.quantization in (None, "4bit"), f"train.quantization={self.quantization!r}: pick '4bit' (QLoRA) "
               "or none (full precision).")
        _check(self.quantization is None or self.method == "lora", "train.quantization='4bit' needs method='lora': "
               "4-bit weights are frozen, so full fine-tuning would train nothing of the base. Use method='lora'.")
        _positive_int(owner, "lora_rank", self.lora_rank)
        _positive_int(owner, "lora_layers", self.lora_layers, allow_none=True)
        _number(owner, "lora_alpha", self.lora_alpha, low=0)
        _number(owner, "lora_dropout", self.lora_dropout, low=0, high=0.99, low_open=False)
        targets = _as_str_tuple(self.lora_targets, "train.lora_targets")
        _check(len(targets) > 0 or self.method != "lora", "train.lora_targets is empty: name the modules that get "
               "LoRA adapters (e.g. q_proj,v_proj), or use method='full'.")
        object.__setattr__(self, "lora_targets", targets)
        if isinstance(self.target_epsilon, str) and self.target_epsilon.strip().lower() == "inf":
            object.__setattr__(self, "target_epsilon", math.inf)  # as JSON records hold it
        if self.target_epsilon != math.inf:  # inf: the non-private baseline (no noise, no clipping)
            _number(owner, "target_epsilon", self.target_epsilon, low=0,
                    hint="DP synthesis trains under a finite budget (inf only for a non-private baseline).")
        _number(owner, "target_delta", self.target_delta, low=0, high=1, allow_none=True,
                hint="Leave it none for 1/(2N).")
        if self.target_delta is not None:
            _check(self.target_delta < 1, f"train.target_delta={self.target_delta}: need a probability well below 1/N.")
        _number(owner, "max_grad_norm", self.max_grad_norm, low=0)
        _positive_int(owner, "logical_batch_size", self.logical_batch_size)
        _positive_int(owner, "physical_batch_size", self.physical_batch_size)
        _check(self.physical_batch_size <= self.logical_batch_size,
               f"train.physical_batch_size={self.physical_batch_size} > logical_batch_size={self.logical_batch_size}: "
               "the physical batch is a slice of one logical (Poisson) batch; lower physical_batch_size.")
        _number(owner, "num_train_epochs", self.num_train_epochs, low=0)
        _positive_int(owner, "max_steps", self.max_steps, allow_none=True)
        _number(owner, "learning_rate", self.learning_rate, low=0)
        _positive_int(owner, "max_length", self.max_length, minimum=4)
        _check("{label}" in self.template, f"train.template={self.template!r} has no {{label}}: generation could not "
               "be conditioned on the label. Add {label}.")
        _number(owner, "label_epsilon", self.label_epsilon, low=0, allow_none=True,
                hint="Use none to skip the release (uniform label proportions).")
        _choice(owner, "accountant", self.accountant, ("prv", "rdp"))
        _choice(owner, "clipping", self.clipping, ("auto", "ghost", "per_sample"))
        _positive_int(owner, "seed", self.seed, minimum=0)
        _positive_int(owner, "dp_seed", self.dp_seed, allow_none=True, minimum=0)
        _positive_int(owner, "checkpoint_steps", self.checkpoint_steps)
        _number(owner, "checkpoint_minutes", self.checkpoint_minutes, low=0)
        for name in ("bf16", "use_cpu"):
            _check(isinstance(getattr(self, name), bool), f"train.{name}={getattr(self, name)!r}: need true or false.")


@dataclass(frozen=True)
class SynthesizeConfig:
    """How many samples, in which label proportions, with which sampling parameters."""

    num_samples: int = field(default=300, metadata=_help("Samples in total (or per label with per_label)."))
    per_label: bool = field(default=False, metadata=_help("num_samples is per label instead of in total."))
    label_proportions: Literal["uniform", "dp"] = field(default="dp", metadata=_help(
        "'dp': the DP-released label proportions from training (costs train.label_epsilon, already paid); "
        "'uniform': equal shares (free). Ignored with per_label."))
    temperature: float = field(default=1.0, metadata=_help("Sampling temperature."))
    top_p: float = field(default=1.0, metadata=_help("Nucleus sampling mass (1: off)."))
    top_k: int = field(default=0, metadata=_help("Top-k sampling (0: off)."))
    max_new_tokens: int | None = field(default=None, metadata=_help(
        "Most new tokens per sample (stops earlier at EOS); none: the training rows' budget, train.max_length minus "
        "the shortest label prefix, so a sample can be as long as a training row."))
    gen_batch_size: int = field(default=32, metadata=_help(
        "Samples generated per batch (all of one label); part of the seeding, keep it to resume."))
    sample_seed: int = field(default=0, metadata=_help(
        "Seed of the sampling; batch b of label l uses a seed derived from (sample_seed, l, b). Public: "
        "sampling is post-processing of the DP model."))
    dedup: bool = field(default=True, metadata=_help(
        "Drop exact duplicates (after whitespace/case normalisation) and keep generating."))
    filter_margin: float | None = field(default=None, metadata=_help(
        "Keep a sample only if the DP generator scores it as its own label by more than this margin: log p(x | "
        "prefix(label)) - max over other labels log p(x | prefix(other)) > filter_margin, generating more until "
        "the targets are met (none: no filter). Post-processing of the DP model: costs no privacy."))
    filter_top_fraction: float = field(default=1.0, metadata=_help(
        "With the label filter on, keep at most this fraction of each batch's candidates: those with the largest "
        "margins above filter_margin (1: every candidate above it). 0.5 generates about twice as many candidates "
        "and keeps the half the DP generator finds most typical of their label. Post-processing: costs no privacy."))
    max_batches_factor: float = field(default=4.0, metadata=_help(
        "Stop a label after this many times the batches it would need without duplicates (divided by "
        "filter_top_fraction, which keeps only that share of a batch), so a degenerate generator cannot loop "
        "forever; the shortfall is reported."))

    def __post_init__(self) -> None:
        owner = "synthesize"
        _positive_int(owner, "num_samples", self.num_samples)
        _check(isinstance(self.per_label, bool), f"synthesize.per_label={self.per_label!r}: need true or false.")
        _choice(owner, "label_proportions", self.label_proportions, ("uniform", "dp"))
        _number(owner, "temperature", self.temperature, low=0)
        _number(owner, "top_p", self.top_p, low=0, high=1)
        _positive_int(owner, "top_k", self.top_k, minimum=0)
        _positive_int(owner, "max_new_tokens", self.max_new_tokens, allow_none=True)
        _number(owner, "filter_margin", self.filter_margin, low=-math.inf, allow_none=True)
        _number(owner, "filter_top_fraction", self.filter_top_fraction, low=0, high=1)
        _check(self.filter_top_fraction == 1 or self.filter_margin is not None,
               f"synthesize.filter_top_fraction={self.filter_top_fraction!r} selects by the label filter's margin, but "
               "the filter is off (filter_margin none): set filter_margin (e.g. 0), or filter_top_fraction 1.")
        _positive_int(owner, "gen_batch_size", self.gen_batch_size)
        _positive_int(owner, "sample_seed", self.sample_seed, minimum=0)
        _check(isinstance(self.dedup, bool), f"synthesize.dedup={self.dedup!r}: need true or false.")
        _number(owner, "max_batches_factor", self.max_batches_factor, low=1, low_open=False)


@dataclass(frozen=True)
class EvaluateConfig:
    """Downstream classifiers, baselines, MAUVE, perplexity, memorisation."""

    classifier: Literal["linear_probe", "minilm"] = field(default="linear_probe", metadata=_help(
        "Downstream classifier: 'linear_probe' (logistic regression on frozen MiniLM embeddings, seconds) or "
        "'minilm' (fine-tuned MiniLM, minutes on a CPU)."))
    dp_classifier: Literal["linear_probe", "minilm"] = field(default="linear_probe", metadata=_help(
        "The DP-on-real baseline: 'linear_probe' (DP-SGD on a linear head over frozen MiniLM embeddings) or "
        "'minilm' (DP-SGD on every MiniLM parameter)."))
    dp_epsilon: float | None = field(default=None, metadata=_help(
        "epsilon of the DP-on-real baseline (none: the synthetic data's total epsilon, so both pay the same)."))
    dp_steps: int = field(default=300, metadata=_help("DP-SGD steps of the DP-on-real baseline."))
    dp_batch_size: int = field(default=256, metadata=_help("Expected Poisson batch of the DP-on-real baseline."))
    dp_learning_rate: float = field(default=0.05, metadata=_help("Adam learning rate of the DP-on-real baseline."))
    dp_max_grad_norm: float = field(default=1.0, metadata=_help("Clipping bound C of the DP-on-real baseline."))
    floor_samples: int | None = field(default=None, metadata=_help(
        "Samples from the un-finetuned model (the prior-knowledge floor); none: as many as the synthetic set, "
        "0: skip."))
    perplexity_rows: int | None = field(default=None, metadata=_help(
        "Held-out rows scored for perplexity (none: all; 0: skip)."))
    mauve_clusters: int | None = field(default=None, metadata=_help("k-means clusters of MAUVE (none: n / 10)."))
    memorization_top_k: int = field(default=10, metadata=_help("Worst cases kept by the memorisation check."))
    generator_classifier_rows: int | None = field(default=None, metadata=_help(
        "Held-out rows classified by the DP generator itself (argmax over labels of log p(text | prefix(label)); "
        "none: all, 0: skip)."))
    public_data: str | None = field(default=None, metadata=_help(
        "A PUBLIC labelled set (same labels; a .csv/.tsv/.jsonl/.parquet path or 'sst2:<split>') to mix with the "
        "synthetic set for the downstream classifier, reported as its own row (none: no such row). Never the "
        "private data."))
    eval_seed: int = field(default=0, metadata=_help(
        "Seed of the classifiers and of the MAUVE and perplexity subsets."))
    audit_canaries: int = field(default=0, metadata=_help(
        "Privacy audit (pipeline only): after the run, a SEPARATE DP training run with the same settings and this "
        "many canaries (each in with probability 1/2) in <run-dir>/audit/; its epsilon lower bound goes into the "
        "report. Costs about one more training run. 0: off; else >= 2 (hundreds for a meaningful bound)."))

    def __post_init__(self) -> None:
        owner = "evaluate"
        _choice(owner, "classifier", self.classifier, ("linear_probe", "minilm"))
        _choice(owner, "dp_classifier", self.dp_classifier, ("linear_probe", "minilm"))
        _number(owner, "dp_epsilon", self.dp_epsilon, low=0, allow_none=True)
        _positive_int(owner, "dp_steps", self.dp_steps)
        _positive_int(owner, "dp_batch_size", self.dp_batch_size)
        _number(owner, "dp_learning_rate", self.dp_learning_rate, low=0)
        _number(owner, "dp_max_grad_norm", self.dp_max_grad_norm, low=0)
        _positive_int(owner, "floor_samples", self.floor_samples, allow_none=True, minimum=0)
        _positive_int(owner, "perplexity_rows", self.perplexity_rows, allow_none=True, minimum=0)
        _positive_int(owner, "mauve_clusters", self.mauve_clusters, allow_none=True, minimum=2)
        _positive_int(owner, "memorization_top_k", self.memorization_top_k, minimum=0)
        _positive_int(owner, "generator_classifier_rows", self.generator_classifier_rows, allow_none=True, minimum=0)
        _check(self.public_data is None or (isinstance(self.public_data, str) and self.public_data.strip() != ""),
               f"evaluate.public_data={self.public_data!r}: need a path or 'sst2:<split>' (or none).")
        _positive_int(owner, "eval_seed", self.eval_seed, minimum=0)
        _positive_int(owner, "audit_canaries", self.audit_canaries, minimum=0)
        _check(self.audit_canaries != 1, "evaluate.audit_canaries=1: the audit needs at least 2 canaries (0 turns it "
               "off; hundreds give a meaningful bound).")


#: TOML table name -> dataclass.
SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "train": TrainConfig,
    "synthesize": SynthesizeConfig,
    "evaluate": EvaluateConfig,
}


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs; ``run_dir`` holds its outputs (see ``ghostdp.integrations.synthetic.pipeline``)."""

    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    synthesize: SynthesizeConfig = field(default_factory=SynthesizeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    run_dir: str | None = None
    preset: str | None = None

    def __post_init__(self) -> None:
        synth = self.synthesize
        if synth.label_proportions == "dp" and not synth.per_label and self.train.label_epsilon is None:
            raise ConfigError(
                "synthesize.label_proportions='dp' needs the label counts released under DP during training, but "
                "train.label_epsilon is none. Set train.label_epsilon (e.g. 0.1; it is added to the reported "
                "epsilon) or use synthesize.label_proportions='uniform'."
            )


# ----------------------------------------------------------------------------------------------------
# Values: parsing flags and TOML, building the dataclasses
# ----------------------------------------------------------------------------------------------------


def _as_pairs(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    """``{raw: name}`` / ``[(raw, name)]`` / ``"0=negative,1=positive"`` -> ((raw, name), ...)."""
    if isinstance(value, str):
        items = []
        for part in value.split(","):
            if "=" not in part:
                raise ConfigError(f"{where}={value!r}: write raw=name pairs separated by commas, e.g. "
                                  "'0=negative,1=positive'.")
            raw, name = part.split("=", 1)
            items.append((raw.strip(), name.strip()))
    elif isinstance(value, Mapping):
        items = [(str(k), str(v)) for k, v in value.items()]
    else:
        try:
            items = [(str(k), str(v)) for k, v in value]
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}={value!r}: need a raw -> name mapping.") from exc
    if not items or any(not k or not v for k, v in items):
        raise ConfigError(f"{where}={value!r}: every pair needs a raw value and a name.")
    return tuple(items)


def _as_str_tuple(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(s.strip() for s in value.split(",") if s.strip())
    if isinstance(value, (list, tuple)) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise ConfigError(f"{where}={value!r}: need a list of names (or one comma-separated string).")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def parse_value(cls: type, name: str, value: Any) -> Any:
    """Coerce ``value`` (a flag's string, or a TOML value) to the type of field ``cls.name``.

    ``"none"`` gives None for optional fields; ``"true"/"false"`` for bools; ints stay ints (a float where an
    int is expected is an error, not a silent truncation); tuples accept lists or comma-separated strings.
    """
    where = f"{_section_of(cls)}.{name}"
    tp, optional = _unwrap_optional(_field_types(cls)[name])
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{where} cannot be none.")
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            word = value.strip().lower() if isinstance(value, str) else None
            if word in ("true", "yes", "1", "on", "false", "no", "0", "off"):
                return word in ("true", "yes", "1", "on")
            raise ConfigError(f"{where}={value!r}: need true or false.")
        if tp is int:
            if isinstance(value, bool):
                raise ConfigError(f"{where}={value!r}: need an int.")
            if isinstance(value, int):
                return value
            if isinstance(value, str):
                return int(value.strip())
            raise ConfigError(f"{where}={value!r}: need an int.")
        if tp is float:
            if isinstance(value, bool):
                raise ConfigError(f"{where}={value!r}: need a number.")
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):
                return float(value.strip())
            raise ConfigError(f"{where}={value!r}: need a number.")
        if tp is str or origin is Literal:
            if not isinstance(value, str):
                raise ConfigError(f"{where}={value!r}: need a string.")
            return value
        if origin is tuple:
            inner = typing.get_args(tp)
            if inner and typing.get_origin(inner[0]) is tuple:  # label_names: pairs
                return _as_pairs(value, where)
            return _as_str_tuple(value, where)
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where}={value!r}: not a valid {getattr(tp, '__name__', tp)} ({exc}).") from exc
    raise ConfigError(f"{where}: unsupported field type {tp!r}.")  # pragma: no cover - a new field type


def _section_of(cls: type) -> str:
    for name, c in SECTIONS.items():
        if c is cls:
            return name
    return cls.__name__


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a config file into ``{"run_dir"?, "preset"?, section: {key: value}}`` (values not yet coerced)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--config {path} is a folder: name the .toml file (a run folder's is {path}/config.toml).")
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file.")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # -sig: a BOM (as some editors write) is dropped
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--config {path}: not UTF-8 ({exc}); TOML files are UTF-8: save it as UTF-8.") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path}: not valid TOML ({exc}).") from exc
    return _check_layout(raw, str(path))


def _check_layout(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("run_dir", "preset"):
            if not isinstance(value, str):
                raise ConfigError(f"{where}: {key} = {value!r} must be a string.")
            out[key] = value
        elif key in SECTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: [{key}] must be a table.")
            valid = [f.name for f in dataclasses.fields(SECTIONS[key])]
            unknown = sorted(set(value) - set(valid))
            renamed = [f"{k} is now {RENAMED_KEYS[key, k]}" for k in unknown if (key, k) in RENAMED_KEYS]
            if renamed:
                raise ConfigError(f"{where}: [{key}] {'; '.join(renamed)} (one spelling with DPTrainingArguments).")
            if unknown:
                raise ConfigError(
                    f"{where}: unknown key(s) {unknown} in [{key}]. Valid keys: {', '.join(valid)}."
                )
            out[key] = dict(value)
        else:
            raise ConfigError(
                f"{where}: unknown top-level key or section {key!r}. Use run_dir, preset and the tables "
                f"[{'], ['.join(SECTIONS)}]."
            )
    return out


def merge_overrides(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``{section: {key: value}}`` layers, later ones winning key by key."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key in SECTIONS:
                out.setdefault(key, {}).update(value)
            else:
                out[key] = value
    return out


def build_run_config(layers: Mapping[str, Any]) -> RunConfig:
    """A checked :class:`RunConfig` from merged override layers (see :func:`merge_overrides`)."""
    layers = _check_layout(layers, "configuration")
    sections = {}
    for name, cls in SECTIONS.items():
        values = {k: parse_value(cls, k, v) for k, v in layers.get(name, {}).items()}
        try:
            sections[name] = cls(**values)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"[{name}]: {exc}") from exc
    return RunConfig(**sections, run_dir=layers.get("run_dir"), preset=layers.get("preset"))


# ----------------------------------------------------------------------------------------------------
# Writing the resolved configuration back (so a run folder says exactly how it was made)
# ----------------------------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")  # TOML 1.0 spells them so
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
        return f'"{escaped}"'
    if isinstance(value, tuple) and value and all(isinstance(v, tuple) for v in value):
        return "{ " + ", ".join(f"{_toml_value(str(k))} = {_toml_value(v)}" for k, v in value) + " }"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def run_config_to_toml(config: RunConfig) -> str:
    """The configuration as TOML that :func:`load_toml` reads back to the same :class:`RunConfig`."""
    lines = ["# ghostdp run configuration (resolved: defaults, preset, file and flags)"]
    if config.preset is not None:
        lines.append(f"preset = {_toml_value(config.preset)}")
    if config.run_dir is not None:
        lines.append(f"run_dir = {_toml_value(config.run_dir)}")
    for name in SECTIONS:
        section = getattr(config, name)
        lines += ["", f"[{name}]"]
        for f in dataclasses.fields(section):
            lines.append(f"{f.name} = {_toml_value(getattr(section, f.name))}")
    return "\n".join(lines) + "\n"
