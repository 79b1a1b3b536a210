"""``DPTrainingArguments``: Hugging Face ``TrainingArguments`` plus what DP-SGD needs, checked up front.

The DP fields are the privacy target (``target_epsilon``, ``target_delta``) or a fixed ``noise_multiplier``,
the Poisson ``logical_batch_size`` (the expected number of examples per optimizer step, q·N), the
accountant, the clipping mode, and ``dp_seed``. ``max_grad_norm`` keeps its name and becomes the DP
clipping bound C on each example's gradient; the Trainer's own clipping of the summed gradient is switched
off by ``DPTrainer`` (it would rescale the noise and the signal together, after privacy was already paid).

Everything that can be judged without the data is judged here, when the arguments are built: options
that would break the guarantee (fp16 loss scaling, non-Poisson samplers, batch-level label smoothing,
fused/compiled losses, gradient accumulation set by hand, FSDP1 and FSDP options DPTrainer cannot honour,
DeepSpeed) fail with an explanation. ``fsdp`` with an FSDP2 ``fsdp_config`` is honoured by DPTrainer itself
(:func:`fsdp2_settings`, docs/fsdp2.md), and so is ``accelerate launch`` with an FSDP2 configuration: its
environment variables are read here too (:func:`accelerate_fsdp2_settings`, :func:`resolve_fsdp2`).
Dataset-dependent checks (a dataset smaller than the logical batch, delta >= 1/N) run in ``DPTrainer``.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import transformers
from packaging.version import Version
from transformers import TrainingArguments

__all__ = ["DPTrainingArguments", "accelerate_fsdp2_settings", "fsdp2_settings", "resolve_fsdp2"]

_ACCOUNTANTS = ("prv", "rdp")
_CLIPPING = ("auto", "ghost", "per_sample")
_TRANSFORMERS_4 = Version(transformers.__version__).major < 5  # the oldest supported line (see pyproject)


def _value(option) -> str:
    """The string of a Hugging Face option that may be an enum member or a plain string."""
    return str(getattr(option, "value", option))


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class DPTrainingArguments(TrainingArguments):
    """``TrainingArguments`` for :class:`~ghostdp.integrations.DPTrainer` (DP-SGD with Poisson sampling).

    One optimizer step = one Poisson logical batch: every training example is included independently
    with probability ``q = logical_batch_size / len(train_dataset)``, so the batch size varies (it can be
    0). The logical batch is cut into physical batches of ``per_device_train_batch_size`` whose clipped
    per-example gradients are summed (that is the gradient accumulation; it never changes q). The number
    of steps is ``round(num_train_epochs / q)``, or ``max_steps`` when that is set.

    Seeds: ``seed`` (Hugging Face's, default 42) still seeds model init and dropout. The Poisson draws and
    the DP noise come from OS entropy unless ``dp_seed`` is set, because a public seed (42 is everyone's)
    lets anyone regenerate the noise and subtract it, and reveals which examples were in each batch.
    """

    target_epsilon: float | None = field(
        default=None,
        metadata={"help": "Privacy budget epsilon. The noise multiplier is calibrated so the planned steps spend "
                          "at most this; training stops before any step that would exceed it."},
    )
    target_delta: float | None = field(
        default=None,
        metadata={"help": "delta of (epsilon, delta)-DP. Default 1/(2N) for N training examples; must be < 1/N."},
    )
    noise_multiplier: float | None = field(
        default=None,
        metadata={"help": "sigma (noise std = sigma * max_grad_norm). If set, it is used as is (no calibration) "
                          "and the resulting epsilon is reported before training."},
    )
    logical_batch_size: int | None = field(
        default=None,
        metadata={"help": "Expected examples per optimizer step (Poisson: q = logical_batch_size / N). Required."},
    )
    accountant: str = field(
        default="prv",
        metadata={"help": "'prv' (tight numerical composition, reports the upper bound) or 'rdp' (looser).",
                  "choices": list(_ACCOUNTANTS)},
    )
    clipping: str = field(
        default="auto",
        metadata={"help": "How per-example norms are computed: 'auto' (cheapest per layer), 'ghost', 'per_sample'. "
                          "All give the same clipped gradient.", "choices": list(_CLIPPING)},
    )
    log_private_loss: bool = field(
        default=False,
        metadata={"help": "Log the training loss ('loss', 'train_loss'). It is computed on the private batches "
                          "without noise, so it is NOT covered by the DP guarantee (like the pre-noise gradient "
                          "norm, which is never logged). Off by default; turn it on only where the logs stay "
                          "as private as the data. 'epsilon' is always logged."},
    )
    group_physical_by_length: bool = field(
        default=True,
        metadata={"help": "Cut each Poisson (logical) batch into physical batches of similar lengths, longest "
                          "first, so less compute goes to padding. The logical batch, and so the sampling and the "
                          "accounting, are unchanged: it only reorders the examples whose clipped gradients are "
                          "summed. Off: the sampled order."},
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "As in TrainingArguments, but off by default: the Prefix-LM collators read the raw "
                          "'text' and 'label' columns, which the model's forward does not name."},
    )
    dp_seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the Poisson sampler (dp_seed) and of the DP noise (dp_seed + 1), for "
                          "reproducible tests. Default: OS entropy. A known seed voids the privacy guarantee."},
    )

    def __post_init__(self):
        # DP checks first, so a DP-specific problem is explained before Hugging Face's own validation runs.
        self._check_dp_fields()
        self._check_compatible()
        if _TRANSFORMERS_4 and self.gradient_checkpointing and self.gradient_checkpointing_kwargs is None:
            # transformers 5's default. 4.x defaults to reentrant checkpointing, whose backward never runs when
            # no input of a block requires grad, as with LoRA over frozen embeddings.
            self.gradient_checkpointing_kwargs = {"use_reentrant": False}
        super().__post_init__()

    # ------------------------------------------------------------------ the DP fields themselves
    def _check_dp_fields(self) -> None:
        L = self.logical_batch_size
        if L is None or isinstance(L, bool) or not isinstance(L, int) or L < 1:
            raise ValueError(
                f"DPTrainingArguments.logical_batch_size={L!r}: set the expected number of examples per optimizer "
                "step (a positive int, e.g. 1024). It fixes the Poisson rate q = logical_batch_size / N that the "
                "privacy accounting uses; per_device_train_batch_size only sets how it is cut up in memory."
            )
        if self.per_device_train_batch_size > L:
            raise ValueError(
                f"per_device_train_batch_size={self.per_device_train_batch_size} is larger than "
                f"logical_batch_size={L}. The per-device batch is a slice of one logical (Poisson) batch; set "
                f"per_device_train_batch_size <= {L}, or raise logical_batch_size (which changes q and epsilon)."
            )
        eps, sigma = self.target_epsilon, self.noise_multiplier
        if eps is None and sigma is None:
            raise ValueError(
                "DPTrainingArguments needs target_epsilon (the noise is then calibrated to it) or noise_multiplier "
                "(used as given; the epsilon it reaches is reported before training). Neither was set."
            )
        if eps is not None and not (_is_number(eps) and 0 < eps < math.inf):
            raise ValueError(f"target_epsilon={eps!r}: need a finite number > 0 (e.g. 3.0).")
        if sigma is not None and not (_is_number(sigma) and 0 <= sigma < math.inf):
            raise ValueError(f"noise_multiplier={sigma!r}: need a finite number >= 0 (0 means no noise, no privacy).")
        if sigma == 0 and eps is not None:
            raise ValueError(
                f"noise_multiplier=0 adds no noise, so no step fits target_epsilon={eps}. Drop noise_multiplier to "
                "calibrate it, or drop target_epsilon for a non-private baseline (epsilon = inf)."
            )
        delta = self.target_delta
        if delta is not None and not (_is_number(delta) and 0 < delta < 1):
            raise ValueError(
                f"target_delta={delta!r}: need a probability in (0, 1), well below 1/N (N = training examples); "
                "leave it None for 1/(2N)."
            )
        C = self.max_grad_norm
        if not (_is_number(C) and 0 < C < math.inf):
            raise ValueError(
                f"max_grad_norm={C!r} is the DP clipping bound C on each example's gradient norm, so it must be a "
                "finite number > 0 (in plain Trainer 0 disables clipping; DP-SGD cannot work without it)."
            )
        if self.accountant not in _ACCOUNTANTS:
            raise ValueError(f"accountant={self.accountant!r}: pick 'prv' (default, tight) or 'rdp'.")
        if self.clipping not in _CLIPPING:
            raise ValueError(f"clipping={self.clipping!r}: pick 'auto', 'ghost' or 'per_sample'.")
        if self.dp_seed is not None and (isinstance(self.dp_seed, bool) or not isinstance(self.dp_seed, int)):
            raise ValueError(f"dp_seed={self.dp_seed!r}: need an int, or None for OS entropy (the private default).")

    # ------------------------------------------------------------------ Trainer options that break DP
    def _check_compatible(self) -> None:
        if self.gradient_accumulation_steps != 1:
            raise ValueError(
                f"gradient_accumulation_steps={self.gradient_accumulation_steps}: DPTrainer cuts each Poisson logical "
                "batch into physical batches of per_device_train_batch_size itself, and their number varies from "
                "step to step. Leave gradient_accumulation_steps=1 and set logical_batch_size."
            )
        if self.fp16:
            raise ValueError(
                "fp16=True is not supported: fp16 needs loss scaling, and a scaled loss scales every per-example "
                "gradient before clipping (and fp16 norms overflow). Use bf16=True (no loss scaling) or fp32."
            )
        # transformers 5 has train_sampling_strategy; 4.x has the boolean group_by_length instead.
        sampling = getattr(self, "train_sampling_strategy", None)
        if sampling is None:
            sampling = "group_by_length" if getattr(self, "group_by_length", False) else "random"
        if sampling != "random":
            raise ValueError(
                f"train_sampling_strategy={sampling!r} (group_by_length=True in transformers 4): DP-SGD's accounting "
                "assumes Poisson sampling (each example independently with probability q). Sequential, "
                "length-grouped or rebalanced batches are a different mechanism whose epsilon would be "
                "under-stated. DPTrainer always samples Poisson batches; leave train_sampling_strategy='random' "
                "(its default; group_by_length=False in transformers 4). Within each Poisson batch the physical "
                "batches are already grouped by length (group_physical_by_length=True), which saves the padding "
                "without changing the sampling."
            )
        if _TRANSFORMERS_4 and self.include_num_input_tokens_seen not in ("no", False):
            raise ValueError(
                f"include_num_input_tokens_seen={self.include_num_input_tokens_seen!r} needs transformers >= 5 with "
                "DPTrainer: transformers 4 counts the tokens inline on the Trainer's batch, which under DPTrainer is "
                "a whole logical batch of physical batches. Leave it off, or upgrade transformers."
            )
        if self.label_smoothing_factor != 0:
            raise ValueError(
                f"label_smoothing_factor={self.label_smoothing_factor}: the Trainer's label smoother averages over "
                "the batch's tokens, so one example's loss weight depends on the others'. Use 0, or override "
                "DPTrainer.compute_per_example_loss with a per-example smoothed loss."
            )
        if self.neftune_noise_alpha is not None:
            raise ValueError(
                "neftune_noise_alpha is not supported: NEFTune scales its embedding noise by the padded batch "
                "length, so one example's gradient would depend on the other examples in its physical batch."
            )
        if self.use_liger_kernel:
            raise ValueError(
                "use_liger_kernel=True is not supported: Liger's fused linear-cross-entropy computes the loss (and "
                "the LM head's gradient) inside the model, averaged over the batch, without per-example losses."
            )
        if self.torch_compile:
            raise ValueError(
                "torch_compile=True is not supported yet: ghostdp replaces the forward of the layers it clips on "
                "the module instances, which a compiled graph would bypass."
            )
        if self.auto_find_batch_size:
            raise ValueError(
                "auto_find_batch_size=True is not supported: it restarts the training loop after an out-of-memory "
                "error, possibly mid-step. Set per_device_train_batch_size yourself (it does not change q)."
            )
        if _value(self.optim) in ("lomo", "adalomo"):
            raise ValueError(
                f"optim={self.optim!r}: LOMO fuses the update into the backward pass, before ghostdp could clip "
                "the per-example gradients and add noise. Use another optimizer (adamw_torch, sgd, ...)."
            )
        # raises for any FSDP option DPTrainer cannot honour, in the arguments or in accelerate launch's FSDP
        # configuration (read here, before TrainingArguments rewrites FSDP_CPU_RAM_EFFICIENT_LOADING)
        resolve_fsdp2(self.fsdp, self.fsdp_config, accelerate_fsdp_env())
        if self.deepspeed:
            raise ValueError(
                "DeepSpeed is not supported: its engine reduces (ZeRO: partitions) gradients in its own hooks "
                "and assumes a fixed gradient accumulation, while Poisson batches vary. To shard parameters, "
                "gradients and optimizer state (ZeRO-3's memory) use FSDP2: wrap the model with "
                "torch.distributed.fsdp.fully_shard and pass it to DPTrainer (docs/fsdp2.md); or data parallel (torchrun, no deepspeed)."
            )
        if self.parallelism_config is not None:
            raise ValueError(
                "parallelism_config (tensor/context/sequence parallelism) is not supported: a sharded layer sees "
                "only part of each example's gradient, so the per-example norm would be wrong."
            )
        if self.push_to_hub and _value(self.hub_strategy) in ("checkpoint", "all_checkpoints"):
            raise ValueError(
                f"hub_strategy={self.hub_strategy!r} uploads whole checkpoints, and DPTrainer checkpoints hold the "
                "Poisson sampler's RNG state (which reveals the batches). Push only the final model "
                "(hub_strategy='end' or 'every_save')."
            )


# ---------------------------------------------------------------------------------------------- FSDP2 arguments
_FSDP_WAYS_OUT = ("Use fsdp=True (or 'full_shard' / 'shard_grad_op') with fsdp_config={'version': 2} and at most "
                  "'reshard_after_forward' and 'transformer_layer_cls_to_wrap'; or shard the model with "
                  "torch.distributed.fsdp.fully_shard yourself and pass it without fsdp arguments (docs/fsdp2.md).")
_FSDP_OFF_VALUES = {"xla": False, "xla_fsdp_v2": False, "xla_fsdp_grad_ckpt": False, "cpu_offload": False,
                    "activation_checkpointing": False, "cpu_ram_efficient_loading": False}
_FSDP_WHY = {
    "cpu_offload": "CPU offload: the engine adds clipped sums and noise to the gradient shards on the compute device",
    "activation_checkpointing": "FSDP's activation checkpointing wrapper: set gradient_checkpointing=True instead "
                                "(Hugging Face's checkpointing, which ghostdp's layers are tested with)",
    "cpu_ram_efficient_loading": "CPU-RAM-efficient loading: load the model normally; DPTrainer shards it",
    "xla": "XLA FSDP", "xla_fsdp_v2": "XLA FSDP", "xla_fsdp_grad_ckpt": "XLA FSDP",
}


def _flag(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"fsdp_config[{name!r}]={value!r}: expected true or false.")


def fsdp2_settings(fsdp, fsdp_config) -> dict | None:
    """What DPTrainer does with the Trainer's ``fsdp`` / ``fsdp_config`` arguments, or None when FSDP is off.

    DPTrainer honours FSDP2 itself rather than through accelerate (whose gradient reduction ghostdp replaces,
    and which drops FSDP on CPU): it passes every module of the classes to wrap (``transformer_layer_cls_to_wrap``,
    default the model's ``_no_split_modules``) and then the root to ``fully_shard`` with ``reshard_after_forward``
    before the engine attaches. Returns ``{"reshard_after_forward": bool, "layer_classes": list[str] | None}``.
    Raises ValueError, naming the option, for FSDP1, CPU offload, hybrid sharding, size-based wrapping, FSDP's
    activation checkpointing, XLA, other state-dict types, unknown keys, and transformers 4.x. Accepts the
    arguments before and after ``TrainingArguments.__post_init__`` normalises them (``fsdp_`` key prefixes,
    a JSON path, legacy option strings).
    """
    if not fsdp:
        return None
    if _TRANSFORMERS_4:
        raise ValueError(
            f"fsdp={fsdp!r}: DPTrainer honours the Trainer's FSDP2 arguments on transformers 5.x only (this is "
            f"{transformers.__version__}, whose Trainer wraps the model in DDP). Upgrade transformers, or train the "
            "sharded model with ghostdp's PrivacyEngine directly (docs/fsdp2.md)."
        )
    if isinstance(fsdp_config, str):
        import json

        with open(fsdp_config, encoding="utf-8") as f:
            fsdp_config = json.load(f)
    config = {k.removeprefix("fsdp_"): v for k, v in dict(fsdp_config or {}).items()}
    version = int(config.pop("version", 2))
    if version != 2:
        raise ValueError(
            f"fsdp_config version {version}: DPTrainer supports FSDP2 only. FSDP1 (FullyShardedDataParallel) "
            "flattens the parameters of each wrapped unit and reduces their gradients in its own hooks, which "
            "would carry unclipped per-batch gradients. " + _FSDP_WAYS_OUT
        )
    reshard = config.pop("reshard_after_forward", None)
    items = fsdp.split() if isinstance(fsdp, str) else ([] if fsdp is True else [_value(x) for x in fsdp])
    for item in items:
        if item == "full_shard":
            reshard = True if reshard is None else reshard
        elif item == "shard_grad_op":
            reshard = False if reshard is None else reshard
        elif item == "offload":
            config["cpu_offload"] = True
        elif item != "auto_wrap":
            raise ValueError(f"fsdp={fsdp!r}: option {item!r} is not supported by DPTrainer (FSDP1-only or unknown; "
                             "HSDP needs a 2-D mesh, which ghostdp does not support). " + _FSDP_WAYS_OUT)
    layers = config.pop("transformer_layer_cls_to_wrap", None)
    if isinstance(layers, str):
        layers = [layers]
    if layers is not None and (not layers or not all(isinstance(c, str) and c for c in layers)):
        raise ValueError(f"fsdp_config['transformer_layer_cls_to_wrap']={layers!r}: give class names, e.g. "
                         "['LlamaDecoderLayer'].")
    policy = config.pop("auto_wrap_policy", "TRANSFORMER_BASED_WRAP")
    if policy != "TRANSFORMER_BASED_WRAP":
        raise ValueError(f"fsdp_config['auto_wrap_policy']={policy!r}: DPTrainer wraps transformer blocks only "
                         "(TRANSFORMER_BASED_WRAP); every trainable parameter must still be in a fully_shard unit "
                         "(the root takes the rest). " + _FSDP_WAYS_OUT)
    if config.pop("min_num_params", 0) not in (0, None):
        raise ValueError("fsdp_config['min_num_params'] belongs to size-based wrapping, which DPTrainer does not "
                         "do. " + _FSDP_WAYS_OUT)
    state_dict_type = str(config.pop("state_dict_type", "FULL_STATE_DICT")).upper()
    if state_dict_type != "FULL_STATE_DICT":
        raise ValueError(
            f"fsdp_config['state_dict_type']={state_dict_type!r}: DPTrainer writes its own checkpoints under FSDP2 "
            "(each rank's model and optimizer shards, resumed exactly) and save_model gathers a full state dict; "
            "leave state_dict_type unset (FULL_STATE_DICT)."
        )
    for key, off in _FSDP_OFF_VALUES.items():
        if key in config and _flag(config.pop(key), key) != off:
            raise ValueError(f"fsdp_config[{key!r}]: {_FSDP_WHY[key]} is not supported by DPTrainer. " + _FSDP_WAYS_OUT)
    if config:
        raise ValueError(f"fsdp_config keys {sorted(config)}: not FSDP2 options DPTrainer honours (FSDP1-only, or "
                         "unknown). " + _FSDP_WAYS_OUT)
    return {"reshard_after_forward": True if reshard is None else _flag(reshard, "reshard_after_forward"),
            "layer_classes": layers}


# ---------------------------------------------------------------------------------------------- accelerate launch
#: The variables ``accelerate launch`` sets for an FSDP configuration (accelerate/utils/launch.py), read by
#: ``FullyShardedDataParallelPlugin.__post_init__``. Any other ``FSDP_*`` variable is refused by name.
_ACCELERATE_FSDP_VARS = (
    "FSDP_VERSION", "FSDP_SHARDING_STRATEGY", "FSDP_RESHARD_AFTER_FORWARD", "FSDP_OFFLOAD_PARAMS",
    "FSDP_MIN_NUM_PARAMS", "FSDP_AUTO_WRAP_POLICY", "FSDP_TRANSFORMER_CLS_TO_WRAP", "FSDP_BACKWARD_PREFETCH",
    "FSDP_STATE_DICT_TYPE", "FSDP_FORWARD_PREFETCH", "FSDP_USE_ORIG_PARAMS", "FSDP_CPU_RAM_EFFICIENT_LOADING",
    "FSDP_SYNC_MODULE_STATES", "FSDP_ACTIVATION_CHECKPOINTING", "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD",
    "FSDP_IGNORED_MODULES",
)
_LAUNCH_WAYS_OUT = ("In the accelerate config (or its --fsdp_* flags) use fsdp_version: 2, fsdp_auto_wrap_policy: "
                    "TRANSFORMER_BASED_WRAP, fsdp_state_dict_type: FULL_STATE_DICT, fsdp_cpu_ram_efficient_loading: "
                    "false, and at most fsdp_reshard_after_forward and fsdp_transformer_layer_cls_to_wrap besides; or "
                    "launch without FSDP (torchrun, or accelerate without --use_fsdp) and pass DPTrainingArguments("
                    "fsdp=True, fsdp_config={'version': 2}) or a model you sharded with fully_shard (docs/fsdp2.md).")
_CONFIG_KEYS = {"FSDP_TRANSFORMER_CLS_TO_WRAP": "transformer_layer_cls_to_wrap"}  # where the names differ
_TRUE, _FALSE = ("y", "yes", "t", "true", "on", "1"), ("n", "no", "f", "false", "off", "0")  # accelerate's str_to_bool

# The accelerate FSDP variables DPTrainer took over (see take_over_accelerate_fsdp): it then sets
# ACCELERATE_USE_FSDP=false for the process, so later arguments and trainers read the launch's values from here.
_taken_over: dict[str, str] | None = None


def _env_flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = env.get(name)
    if value is None:
        return default
    if value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise _launch_refusal(name, value, "expected true or false.")


def _launch_refusal(name: str, value, why: str) -> ValueError:
    shown = "unset" if value is None else repr(value)
    key = "fsdp_" + _CONFIG_KEYS.get(name, name.removeprefix("FSDP_").lower())
    return ValueError(f"{name}={shown} (accelerate launch's FSDP configuration, config key {key}): {why} "
                      + _LAUNCH_WAYS_OUT)


def accelerate_fsdp_env() -> dict[str, str]:
    """This process's ``ACCELERATE_USE_FSDP`` and ``FSDP_*`` variables (what ``accelerate launch`` set): those
    DPTrainer recorded when it took them over (:func:`take_over_accelerate_fsdp`), else ``os.environ``'s."""
    if _taken_over is not None:
        return dict(_taken_over)
    return {k: v for k, v in os.environ.items() if k == "ACCELERATE_USE_FSDP" or k.startswith("FSDP_")}


def take_over_accelerate_fsdp() -> bool:
    """Record the accelerate FSDP variables and set ``ACCELERATE_USE_FSDP=false`` in ``os.environ``, so that no
    accelerate state built in this process creates its own FSDP plugin (DPTrainer shards the model itself).
    Returns whether the variable was changed now (False when it was off, or taken over already)."""
    global _taken_over
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False
    _taken_over = accelerate_fsdp_env() if _taken_over is None else _taken_over
    os.environ["ACCELERATE_USE_FSDP"] = "false"
    return True


def accelerate_fsdp2_settings(env: Mapping[str, str]) -> dict | None:
    """What DPTrainer does with an ``accelerate launch`` FSDP configuration, given its environment variables
    (``ACCELERATE_USE_FSDP``, ``FSDP_VERSION``, ... as accelerate/utils/launch.py writes them), or None when
    ``ACCELERATE_USE_FSDP`` is not true (accelerate's own test: the value lower-cased equals "true").

    Returns the settings :func:`fsdp2_settings` returns for the Trainer's arguments, with the same meaning:
    ``FSDP_TRANSFORMER_CLS_TO_WRAP`` (comma-separated; default the model's ``_no_split_modules``, as accelerate)
    and ``FSDP_RESHARD_AFTER_FORWARD`` (default true). Raises ValueError, naming the variable and its config key,
    for FSDP1 (``FSDP_VERSION`` unset or not 2: accelerate's default is 1), CPU offload, sharding strategies
    other than FULL_SHARD (SHARD_GRAD_OP: use reshard_after_forward false; NO_SHARD; HYBRID_SHARD needs a 2-D
    mesh), an auto-wrap policy other than TRANSFORMER_BASED_WRAP (size-based or none, also when unset: accelerate
    then wraps nothing), a state-dict type other than FULL_STATE_DICT (unset is accelerate's FSDP2 default,
    SHARDED_STATE_DICT), FSDP's activation checkpointing (and its offload), CPU-RAM-efficient loading (ranks other
    than 0 would hold uninitialised weights that only accelerate's FSDP preparation fills), ignored modules,
    FSDP1-only prefetching or ``use_orig_params=false``, any other ``FSDP_*`` variable, and transformers 4.x.
    ``FSDP_MIN_NUM_PARAMS`` (size-based wrapping only) and ``FSDP_SYNC_MODULE_STATES`` (obsolete in FSDP2) are
    ignored, as accelerate's FSDP2 plugin ignores them; ``accelerate launch`` writes both by default.
    """
    if env.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    if _TRANSFORMERS_4:
        raise ValueError(
            "ACCELERATE_USE_FSDP=true (accelerate launch with an FSDP configuration): DPTrainer honours FSDP2 on "
            f"transformers 5.x only (this is {transformers.__version__}, whose Trainer wraps the model in DDP). "
            "Upgrade transformers, or train the sharded model with ghostdp's PrivacyEngine directly (docs/fsdp2.md)."
        )
    unknown = sorted(k for k in env if k.startswith("FSDP_") and k not in _ACCELERATE_FSDP_VARS)
    if unknown:
        raise ValueError(f"{unknown}: not variables of accelerate's FSDP configuration that DPTrainer honours; unset "
                         "them. " + _LAUNCH_WAYS_OUT)
    version = env.get("FSDP_VERSION")
    if (version or "1").strip() != "2":
        raise _launch_refusal("FSDP_VERSION", version, "DPTrainer supports FSDP2 only (accelerate's default is 1). "
                              "FSDP1 flattens the parameters of each wrapped unit and reduces their gradients in its "
                              "own hooks, which would carry unclipped per-batch gradients.")
    strategy = env.get("FSDP_SHARDING_STRATEGY")
    if strategy is not None and strategy.strip().upper() not in ("FULL_SHARD", "1"):
        why = {"SHARD_GRAD_OP": "for FSDP2 set fsdp_reshard_after_forward: false instead.",
               "NO_SHARD": "it does not shard; train data parallel (launch without FSDP) instead."}
        raise _launch_refusal("FSDP_SHARDING_STRATEGY", strategy, why.get(
            strategy.strip().upper(), "hybrid sharding (HSDP) needs a 2-D device mesh, which ghostdp does not support; "
                                      "FSDP2 shards fully (FULL_SHARD)."))
    reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "true")
    if reshard.strip().lower() not in _TRUE + _FALSE:
        raise _launch_refusal("FSDP_RESHARD_AFTER_FORWARD", reshard, "FSDP2 takes true or false (FULL_SHARD / "
                              "SHARD_GRAD_OP / NO_RESHARD are FSDP1's).")
    if _env_flag(env, "FSDP_OFFLOAD_PARAMS", False):
        raise _launch_refusal("FSDP_OFFLOAD_PARAMS", env["FSDP_OFFLOAD_PARAMS"], _FSDP_WHY["cpu_offload"] + ".")
    policy = env.get("FSDP_AUTO_WRAP_POLICY")
    if (policy or "NO_WRAP").strip().upper() != "TRANSFORMER_BASED_WRAP":
        raise _launch_refusal("FSDP_AUTO_WRAP_POLICY", policy, "DPTrainer wraps transformer blocks only "
                              "(TRANSFORMER_BASED_WRAP); size-based wrapping is not supported, and without a policy "
                              "(NO_WRAP, accelerate's default) accelerate would wrap no block.")
    layers = env.get("FSDP_TRANSFORMER_CLS_TO_WRAP")
    if layers is not None:
        layers = [c.strip() for c in layers.split(",")]
        if not all(layers):
            raise _launch_refusal("FSDP_TRANSFORMER_CLS_TO_WRAP", env["FSDP_TRANSFORMER_CLS_TO_WRAP"],
                                  "give comma-separated class names, e.g. LlamaDecoderLayer.")
    prefetch = env.get("FSDP_BACKWARD_PREFETCH")
    if prefetch is not None and prefetch.strip().upper() not in ("NO_PREFETCH", "3"):
        raise _launch_refusal("FSDP_BACKWARD_PREFETCH", prefetch, "backward prefetching is an FSDP1 option.")
    state_dict_type = env.get("FSDP_STATE_DICT_TYPE")
    if (state_dict_type or "SHARDED_STATE_DICT").strip().upper() not in ("FULL_STATE_DICT", "1"):
        raise _launch_refusal("FSDP_STATE_DICT_TYPE", state_dict_type, "DPTrainer writes its own checkpoints under "
                              "FSDP2 (each rank's model and optimizer shards, resumed exactly) and save_model gathers "
                              "a full state dict; set FULL_STATE_DICT (unset is accelerate's FSDP2 default, "
                              "SHARDED_STATE_DICT).")
    if _env_flag(env, "FSDP_FORWARD_PREFETCH", False):
        raise _launch_refusal("FSDP_FORWARD_PREFETCH", env["FSDP_FORWARD_PREFETCH"],
                              "forward prefetching is an FSDP1 option.")
    if not _env_flag(env, "FSDP_USE_ORIG_PARAMS", True):
        raise _launch_refusal("FSDP_USE_ORIG_PARAMS", env["FSDP_USE_ORIG_PARAMS"],
                              "FSDP2 always uses the original parameters (false is an FSDP1 setting).")
    for name in ("FSDP_ACTIVATION_CHECKPOINTING", "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD"):
        if _env_flag(env, name, False):
            raise _launch_refusal(name, env[name], _FSDP_WHY["activation_checkpointing"] + ".")
    if _env_flag(env, "FSDP_CPU_RAM_EFFICIENT_LOADING", False):
        raise _launch_refusal(
            "FSDP_CPU_RAM_EFFICIENT_LOADING", env["FSDP_CPU_RAM_EFFICIENT_LOADING"],
            "with it, from_pretrained loads the weights on rank 0 only and the other ranks hold uninitialised "
            "tensors that only accelerate's own FSDP preparation fills (by broadcast); DPTrainer shards the model "
            "each rank loaded. Set it to false (accelerate launch writes true unless the config says false).")
    if env.get("FSDP_IGNORED_MODULES"):
        raise _launch_refusal("FSDP_IGNORED_MODULES", env["FSDP_IGNORED_MODULES"], "every trainable parameter must be "
                              "in a fully_shard unit (an ignored module's gradient would be neither clipped into the "
                              "shards nor reduced); freeze those modules instead.")
    return {"reshard_after_forward": _env_flag(env, "FSDP_RESHARD_AFTER_FORWARD", True), "layer_classes": layers}


def resolve_fsdp2(fsdp, fsdp_config, env: Mapping[str, str]) -> tuple[dict | None, tuple[str, ...]]:
    """The FSDP2 settings DPTrainer applies and where they come from: ``"fsdp arguments"`` (the Trainer's, read by
    :func:`fsdp2_settings`) and/or ``"accelerate launch configuration"`` (its FSDP variables ``env``, read by
    :func:`accelerate_fsdp2_settings`); ``(None, ())`` when neither asks for FSDP. Both may ask with the same
    settings; different ones are refused (ValueError)."""
    from_args = fsdp2_settings(fsdp, fsdp_config)
    from_env = accelerate_fsdp2_settings(env)
    if from_args is not None and from_env is not None:
        def same(s):
            return s["reshard_after_forward"], None if s["layer_classes"] is None else sorted(s["layer_classes"])

        if same(from_args) != same(from_env):
            raise ValueError(
                f"The fsdp arguments ({from_args}) and accelerate launch's FSDP configuration ({from_env}) ask for "
                "different FSDP2 settings. Give FSDP in one place: drop fsdp / fsdp_config from the arguments, or "
                "launch without --use_fsdp (torchrun, or accelerate without an FSDP config); or make "
                "reshard_after_forward and transformer_layer_cls_to_wrap agree."
            )
    sources = (("fsdp arguments",) if from_args is not None else ()) + (
        ("accelerate launch configuration",) if from_env is not None else ())
    return (from_args if from_args is not None else from_env), sources
