"""``DPTrainer``: the Hugging Face ``Trainer`` with DP-SGD (Poisson sampling, per-example clipping, noise).

    from ghostdp.integrations import DPTrainer, DPTrainingArguments
    args = DPTrainingArguments(output_dir="out", target_epsilon=3.0, logical_batch_size=1024,
                               per_device_train_batch_size=32, num_train_epochs=3, learning_rate=5e-4)
    trainer = DPTrainer(model=model, args=args, train_dataset=ds, data_collator=collator)
    trainer.train()            # logs "epsilon" at every logging step; checkpoints carry the privacy ledger
    trainer.save_model()       # a plain transformers / PEFT checkpoint

What changes relative to ``Trainer``, and why (all in this file):

* **Sampling.** ``get_train_dataloader`` yields one *logical* batch per optimizer step: a Poisson sample
  (every example independently with probability q = logical_batch_size / N; the size varies and can be
  0), cut into physical batches of ``per_device_train_batch_size`` (longest examples first, so each physical
  batch pads to similar lengths; ``group_physical_by_length=False`` keeps the sampled order). The Trainer runs with
  ``gradient_accumulation_steps=1`` and sees one "micro-batch" (a :class:`LogicalBatch`) per step, so its
  fixed-accumulation assumptions never meet the varying number of physical batches. One Trainer epoch is
  ``round(1/q)`` steps; the run is ``round(num_train_epochs / q)`` steps (or ``max_steps``).
* **Loss and backward.** ``training_step`` runs every physical batch forward, takes the per-example loss
  ``L_i`` (:meth:`DPTrainer.compute_per_example_loss`; for causal LMs the mean over example i's own target
  tokens) and calls ``sum_i L_i .backward()`` with the engine in ``loss_reduction="sum"``, so each
  ``g_i = grad L_i`` exactly. Nothing of the Trainer's loss rescaling is used: ``num_items_in_batch`` is
  never computed (``_get_num_items_in_batch`` returns None), so no batch token count,
  ``average_tokens_across_devices`` or gradient-accumulation division reaches the loss; ``accelerator.backward``
  is not called (it would divide by accelerate's accumulation steps and apply an fp16 scaler). The logged
  loss is ``sum_i L_i / logical_batch_size`` over the whole logical batch (all ranks).
* **Clipping and noise.** A :class:`ghostdp.PrivacyEngine` is attached to the model and the Trainer's
  optimizer once they are prepared. ``max_grad_norm`` is the per-example bound C; the Trainer's own
  clipping of the summed gradient is disabled (``_clip_grad_norm``), and ``grad_norm`` is not logged
  (``_get_grad_norm``): before ``optimizer.step()`` the gradient is the *un-noised* clipped sum, and its
  norm would be released without privacy. (For the same reason, a callback that reads ``p.grad`` in
  ``on_pre_optimizer_step`` sees un-noised sums: do not log them.)
* **Accounting.** Before training, the noise multiplier is calibrated from (target_epsilon, delta, q,
  steps), or a given ``noise_multiplier`` is used and its epsilon reported. ``epsilon`` is added to every
  ``log()`` (so every reporter in ``report_to`` gets it). Training never exceeds ``target_epsilon``: if the
  planned steps would, it stops after the last step that fits and logs why.
* **Checkpoints.** Each checkpoint gets ``ghostdp_state.pt`` (accountant ledger, step count, the Poisson
  sampler's RNG state, the plan) and ``ghostdp_privacy.json`` (epsilon so far, human-readable).
  ``train(resume_from_checkpoint=...)`` continues the same ledger and the same batch sequence. The noise
  RNG state is stored only when ``dp_seed`` is set (then it is reproducible anyway); otherwise a resumed run
  draws fresh noise from the OS. Treat checkpoints as private as the data (they reveal past batches);
  release the model written by ``save_model``.
* **Data parallel.** Under ``torchrun`` every rank draws the same logical batch (same sampler seed; rank
  0's OS entropy is broadcast when ``dp_seed`` is unset) and keeps a contiguous 1/world share. Each rank
  clips its own examples; the engine all-reduces the clipped sums at ``optimizer.step()`` and rank 0 adds
  the noise once; accounting uses the global q. The model is *not* wrapped in
  ``DistributedDataParallel``: its gradient hooks would never fire (autograd does not form the
  parameter gradients under ghostdp). Parameters are broadcast from rank 0 once, as DDP would.

* **FSDP2.** A model whose blocks and root the user wrapped with ``fully_shard`` under torchrun, or an
  unsharded model with ``DPTrainingArguments(fsdp=True, fsdp_config={"version": 2, ...})`` or under
  ``accelerate launch`` with an FSDP2 configuration (DPTrainer then calls ``fully_shard`` on each block and the
  root itself, before the engine attaches, so the same settings work on CPU/gloo, where accelerate would drop
  FSDP, and on GPU; for the launch it sets ``ACCELERATE_USE_FSDP=false`` in the process so accelerate builds no
  FSDP plugin of its own), trains sharded: no broadcast (the shards are consistent already), each
  rank takes its share of the Poisson batch as above and runs as many physical batches as the busiest rank
  (a short rank runs zero-weighted padding batches: FSDP's forward and backward are collectives), the engine
  reduce-scatters the clipped sums to the shards and noises each shard once (docs/fsdp2.md). Checkpoints
  hold each rank's own model and optimizer shards (``ghostdp_fsdp2_rank{r}.pt``; resume needs the same
  world size), never gathered, and without torch.distributed.checkpoint's ``get_optimizer_state_dict``
  (its hidden zero-lr ``optimizer.step()`` on a stateless optimizer would count as a DP step). The model
  saved by ``save_model`` is gathered in full on rank 0 (a plain transformers / PEFT checkpoint).

FSDP1, FSDP options DPTrainer cannot honour (in the arguments or the accelerate launch configuration) and DeepSpeed:
see docs/design.md ("More than one process") and docs/fsdp2.md for what is supported and why.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import transformers
from packaging.version import Version
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Sampler
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR,
    SaveStrategy,
    get_last_checkpoint,
    seed_worker,
)

from ghostdp.engine import planning
from ghostdp.engine.fsdp import is_fsdp2
from ghostdp.engine.loss import TASK_LOSSES, per_example_lm_loss, per_example_sequence_loss
from ghostdp.engine.privacy_engine import PrivacyEngine
from ghostdp.engine.sampling import PoissonBatchSampler
from ghostdp.integrations.hf.args import (
    DPTrainingArguments,
    accelerate_fsdp_env,
    resolve_fsdp2,
    take_over_accelerate_fsdp,
)

__all__ = ["DPTrainer", "LogicalBatch", "PrivacyBudgetExhaustedError", "PrivacyPlan"]

logger = logging.getLogger(__name__)

STATE_FILE = "ghostdp_state.pt"
FSDP2_SHARDS_FILE = "ghostdp_fsdp2_rank{rank}.pt"  # per rank: its model and optimizer shards (local tensors)
PRIVACY_FILE = "ghostdp_privacy.json"
_STATE_VERSION = 1

# transformers 4.57 (the oldest release supported, see pyproject) runs the training loop in one method: it has
# no _prepare_for_training / _clip_grad_norm / _get_grad_norm / _track_num_input_tokens to override, so DPTrainer
# reaches the same points through public hooks there (a callback's on_train_begin, the accelerator's
# clip_grad_norm_). tests/hf/test_compat.py guards each of these points on the version it runs on.
_TRANSFORMERS_4 = Version(transformers.__version__).major < 5

# Methods whose override in a subclass would bypass DP (their replacement decides sampling, the loss or the
# gradient), with what to do instead.
_PROTECTED = {
    "training_step": "DPTrainer.training_step does the per-example loss, backward and accounting",
    "get_train_dataloader": "DPTrainer.get_train_dataloader draws the Poisson batches the accountant assumes",
    "_get_train_sampler": "DPTrainer always samples Poisson batches; a custom sampler changes the mechanism",
    "compute_loss": "DPTrainer trains on per-example losses; override compute_per_example_loss instead "
                    "(it must return one loss per example, each depending on that example alone)",
    "_get_num_items_in_batch": "a batch token count would make each example's loss depend on the others",
    "_clip_grad_norm": "max_grad_norm is the per-example DP bound C, not a bound on the summed gradient",
    "_get_grad_norm": "the pre-noise gradient norm is not private",
}

# Training-loss keys of Trainer.log: un-noised statistics of the private batches (see DPTrainer.log).
_PRIVATE_LOG_KEYS = frozenset({"loss", "train_loss"})


class PrivacyBudgetExhaustedError(RuntimeError):
    """No DP step fits in what is left of ``target_epsilon``."""


@dataclass(frozen=True)
class PrivacyPlan:
    """What one ``train()`` will do, fixed before its first step (``DPTrainer.privacy_plan``)."""

    num_examples: int  # N
    logical_batch_size: int  # expected examples per step, q * N (the public normaliser)
    sample_rate: float  # q
    planned_steps: int  # round(num_train_epochs / q) or max_steps
    noise_multiplier: float  # sigma
    max_grad_norm: float  # C
    delta: float
    target_epsilon: float | None
    planned_epsilon: float  # epsilon after planned_steps (history included when resuming)
    budget_steps: int  # training stops after this many steps in total (<= planned_steps)
    accountant: str


@dataclass
class LogicalBatch:
    """This rank's share of one Poisson logical batch, already cut into collated physical batches."""

    physical: list[Any]
    num_examples: int

    def pin_memory(self) -> LogicalBatch:  # called by DataLoader(pin_memory=True)
        def pin(x):
            if isinstance(x, torch.Tensor):
                return x.pin_memory()
            if isinstance(x, Mapping):
                return type(x)({k: pin(v) for k, v in x.items()})
            return x

        return LogicalBatch([pin(b) for b in self.physical], self.num_examples)


class _LogicalBatchCollate:
    """collate_fn: dataset items of one logical batch -> LogicalBatch of collated physical batches.

    A top-level class (not a closure) so DataLoader workers can pickle it.
    """

    def __init__(self, collate_fn: Callable, physical_batch_size: int, by_length: bool = False):
        self.collate_fn, self.physical_batch_size, self.by_length = collate_fn, physical_batch_size, by_length

    def __call__(self, items: list) -> LogicalBatch:
        b = self.physical_batch_size
        if self.by_length and len(items) > b:
            items = [items[i] for i in self._longest_first(items)]
        return LogicalBatch([self.collate_fn(items[i:i + b]) for i in range(0, len(items), b)], len(items))

    def _longest_first(self, items: list) -> list[int]:
        """Indices of ``items`` by decreasing unpadded length (the collated ``attention_mask``; stable), or in
        their order when the collated batch has no (n, T) mask to read lengths from. The collator runs on the
        whole logical batch once for this (any collator works, left- or right-padded), then per physical batch."""
        whole = self.collate_fn(items)
        mask = whole.get("attention_mask") if isinstance(whole, Mapping) else None
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != len(items):
            return list(range(len(items)))
        lengths = mask.sum(dim=1).tolist()
        return sorted(range(len(items)), key=lambda i: -lengths[i])


class _RankShareSampler(Sampler[list[int]]):
    """This rank's contiguous share of each Poisson batch, with the bookkeeping an exact resume needs.

    * Every rank iterates an identically seeded ``PoissonBatchSampler``, so all draw the same global batch.
    * ``state_dict()`` is the sampler state right after the last batch the Trainer *trained on* (a
      DataLoader with workers draws ahead; those draws are not in the checkpoint, so a resumed run redraws
      them exactly).
    * On resume mid-pass, the Trainer skips the batches of the current epoch already trained (accelerate's
      ``skip_first_batches``). The Poisson sampler was restored past them, so we yield that many empty
      placeholders first, without drawing, for the skip to discard.
    """

    def __init__(self, poisson: PoissonBatchSampler, rank: int, world: int):
        super().__init__()
        self.poisson, self.rank, self.world = poisson, rank, world
        self._placeholders = 0
        self._drawn: deque[dict] = deque()
        self._trained = poisson.state_dict()

    def __len__(self) -> int:
        return len(self.poisson)

    def __iter__(self) -> Iterator[list[int]]:
        skip, self._placeholders = self._placeholders, 0
        for _ in range(skip):
            yield []
        for batch in self.poisson:
            self._drawn.append(self.poisson.state_dict())
            n = len(batch)
            yield batch[self.rank * n // self.world:(self.rank + 1) * n // self.world]

    def mark_trained(self) -> None:
        """The oldest drawn batch has been trained on (batches are consumed in order)."""
        if self._drawn:
            self._trained = self._drawn.popleft()

    def state_dict(self) -> dict:
        return self._trained

    def load_state_dict(self, state: dict, placeholders: int) -> None:
        self.poisson.load_state_dict(state)
        self._trained, self._placeholders = state, placeholders
        self._drawn.clear()


class _StartDPCallback(TrainerCallback):
    """transformers 4.x only: attaches the engine at ``on_train_begin`` (5.x does it in ``_prepare_for_training``).

    In 4.x's loop, ``on_train_begin`` is the first point after the model and optimizer are prepared and a
    checkpoint's optimizer and trainer state are loaded, and before the first batch is drawn. Accelerate has
    wrapped the model in DistributedDataParallel by then when there are several processes; the engine is
    attached to the bare model and ``training_step`` runs the bare model, so DDP's hooks are never used.
    """

    def __init__(self, trainer: DPTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        trainer._start_dp(trainer.model)
        if trainer._saved_dp_state is not None:
            trainer._load_dp_state(trainer._saved_dp_state)
        return control


def _no_global_clipping(parameters, max_norm, *args, **kwargs):
    """Stands in for ``Accelerator.clip_grad_norm_`` under transformers 4.x, whose loop clips the summed gradient.

    ``max_grad_norm`` is the per-example bound C, applied by the engine; clipping the sum again would rescale
    signal and noise by a data-dependent factor. Returns None, so no (un-noised) gradient norm is logged.
    """
    return


class _PrivacyBudgetCallback(TrainerCallback):
    """Stops training after the last step that fits in ``target_epsilon`` (and logs that it did)."""

    def __init__(self, trainer: DPTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        engine, plan = self.trainer.privacy_engine, self.trainer.privacy_plan
        if engine is None or plan is None or plan.budget_steps >= plan.planned_steps:
            return control  # no budget cut: the run ends at max_steps as usual
        if engine.steps < plan.budget_steps:
            return control
        control.should_training_stop = True
        control.should_log = True
        if args.save_strategy == SaveStrategy.STEPS:
            control.should_save = True
        logger.warning(
            "Privacy budget reached: stopping after step %d of the %d planned. epsilon = %.4g <= target_epsilon = %g "
            "at delta = %.3g; one more step would exceed it.",
            engine.steps, plan.planned_steps, self.trainer.current_epsilon(), plan.target_epsilon, plan.delta,
        )
        return control


def _unwrap(model: nn.Module) -> nn.Module:
    """The task model under PEFT / DDP wrappers (``PeftModel.get_base_model()``, ``.module``)."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def model_task(model: nn.Module) -> str | None:
    """The task a Hugging Face model declares, as a key of ``ghostdp.engine.loss.TASK_LOSSES``, or None.

    Read from the class of the (PEFT-unwrapped) model, or else ``config.architectures``: a class listed in
    transformers' ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` is "causal_lm", ``..._TOKEN_CLASSIFICATION_...``
    "token_classification", ``..._SEQUENCE_CLASSIFICATION_...`` "sequence_classification",
    ``..._SEQ_TO_SEQ_CAUSAL_LM_...`` "seq2seq_lm"; a class not listed (a custom subclass) by the same suffix
    of its name ("ForCausalLM", "ForTokenClassification", "ForSequenceClassification", and
    "ForConditionalGeneration" with ``config.is_encoder_decoder``). A class in several lists is ambiguous: None.
    """
    from transformers.models.auto import modeling_auto as auto

    mappings = {
        "causal_lm": auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        "token_classification": auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
        "sequence_classification": auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        "seq2seq_lm": auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    }
    names = {task: {n for v in m.values() for n in ((v,) if isinstance(v, str) else v)} for task, m in mappings.items()}
    base = _unwrap(model)
    config = getattr(base, "config", None)
    candidates = [cls.__name__ for cls in type(base).__mro__ if issubclass(cls, nn.Module) and cls is not nn.Module]
    candidates += list(getattr(config, "architectures", None) or [])
    for name in candidates:
        tasks = [task for task, listed in names.items() if name in listed]
        if len(tasks) == 1:
            return tasks[0]
        if len(tasks) > 1:
            return None
    name = type(base).__name__
    for suffix, task in (("ForCausalLM", "causal_lm"), ("ForTokenClassification", "token_classification"),
                         ("ForSequenceClassification", "sequence_classification")):
        if name.endswith(suffix):
            return task
    if name.endswith("ForConditionalGeneration") and getattr(config, "is_encoder_decoder", False):
        return "seq2seq_lm"
    return None


def _resolve_task_loss(model: nn.Module, per_example_loss, overridden: bool) -> tuple[str | None, Callable | None]:
    """(task, per-example loss function) for DPTrainer; raise if the task is unknown and no loss was given."""
    if callable(per_example_loss):
        return None, per_example_loss
    if per_example_loss is not None:
        if per_example_loss not in TASK_LOSSES:
            raise ValueError(
                f"per_example_loss={per_example_loss!r} is not a task DPTrainer knows ({sorted(TASK_LOSSES)}); pass "
                "one of them or a callable (logits, labels) -> (batch,) losses."
            )
        return per_example_loss, TASK_LOSSES[per_example_loss]
    task = model_task(model)
    if task is not None:
        return task, TASK_LOSSES[task]
    if overridden:
        return None, None
    raise ValueError(
        f"DPTrainer cannot tell the training objective of {type(_unwrap(model)).__name__}: it is not a causal LM, "
        "token-classification, sequence-classification or seq2seq model class that transformers lists. Guessing "
        "it from tensor shapes could silently train the wrong objective (e.g. a shifted next-token loss on token "
        "labels). Pass per_example_loss= (a task name: " + ", ".join(sorted(TASK_LOSSES)) + "; or a callable "
        "(logits, labels) -> (batch,) losses, each depending on its own example only, e.g. from "
        "ghostdp.engine.loss), or override DPTrainer.compute_per_example_loss."
    )


#: Where each FSDP2 source names the block classes to wrap (for the messages of _shard_for_fsdp_arguments).
_LAYER_OPTION = {"fsdp arguments": "fsdp_config['transformer_layer_cls_to_wrap']",
                 "accelerate launch configuration": "fsdp_transformer_layer_cls_to_wrap in the accelerate config"}


def _shard_for_fsdp_arguments(model: nn.Module | None, args: DPTrainingArguments, settings: dict,
                              sources: tuple[str, ...] = ("fsdp arguments",)) -> nn.Module:
    """``fully_shard`` every block (``settings["layer_classes"]``, default the model's ``_no_split_modules``),
    then the root, as the Trainer's FSDP2 arguments or accelerate launch's FSDP2 configuration ask
    (:func:`~ghostdp.integrations.hf.args.resolve_fsdp2`; ``sources`` names which, for the messages).

    Done by DPTrainer rather than accelerate, so the same settings shard on CPU (gloo) and GPU alike, and before
    the engine attaches; the result is the model a user would have sharded by hand (docs/fsdp2.md).
    """
    from torch.distributed.fsdp import fully_shard

    source = " and ".join(sources)
    layer_option = " / ".join(_LAYER_OPTION[s] for s in sources)
    if model is None:
        raise ValueError(f"{source}: pass model=... (DPTrainer shards it before training).")
    if is_fsdp2(model):
        raise ValueError(
            f"The model is already sharded with fully_shard and FSDP is asked for as well ({source}); it would be "
            "wrapped twice. Pass either the unsharded model (DPTrainer shards it) or the sharded model without fsdp "
            "arguments and without an accelerate FSDP configuration (launch with torchrun, or accelerate without "
            "--use_fsdp)."
        )
    args.world_size  # noqa: B018 - sets the process group up under torchrun (accelerate's PartialState)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        raise ValueError(
            f"FSDP ({source}) but a single process: FSDP shards the model across processes. Launch with torchrun "
            "or accelerate launch (one process per device; on CPU the gloo backend), or drop FSDP to train on one "
            "process."
        )
    classes = settings["layer_classes"] or list(getattr(model, "_no_split_modules", None) or [])
    if not classes:
        raise ValueError(
            f"{source}: {type(model).__name__} names no transformer block class (_no_split_modules); set "
            f"{layer_option} to the class name of its blocks."
        )
    named = [(name, m) for name, m in model.named_modules() if type(m).__name__ in classes and m is not model]
    if not named:
        raise ValueError(f"{source}: no module of class {classes} in {type(model).__name__}; set {layer_option} "
                         "to the class name of its blocks.")
    reshard = settings["reshard_after_forward"]
    for _, module in sorted(named, key=lambda item: -item[0].count(".")):  # inner units first; stable otherwise
        fully_shard(module, reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=reshard)
    logger.info("DPTrainer: fully_shard on %d %s modules and the root (reshard_after_forward=%s), from the %s",
                len(named), "/".join(sorted({type(m).__name__ for _, m in named})), reshard, source)
    return model


def _keep_accelerate_fsdp_off(args: DPTrainingArguments) -> None:
    """Under ``accelerate launch`` with an FSDP2 configuration, which DPTrainer honours by sharding the model
    itself: set ``ACCELERATE_USE_FSDP=false`` for the process, so the Trainer's accelerator builds no FSDP plugin
    (its FSDP preparation would wrap the model again and reduce the gradients ghostdp replaces), and drop an
    accelerate state built earlier in the process with FSDP: ``AcceleratorState`` is a process-wide singleton that
    keeps its plugin, and it writes ``distributed_type=FSDP`` into ``PartialState``'s. The state is reset as
    ``TrainingArguments`` resets it itself, unless ``accelerator_config.use_configured_state`` asks to keep a
    pre-built one (then the check after the Trainer is built refuses its FSDP plugin)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if take_over_accelerate_fsdp():
        logger.info("DPTrainer: set ACCELERATE_USE_FSDP=false for this process: accelerate launch's FSDP2 "
                    "configuration is applied by DPTrainer (fully_shard on the blocks and the root), so accelerate "
                    "must not build its own FSDP plugin")
    stale = (AcceleratorState._shared_state.get("fsdp_plugin") is not None
             or DistributedType.FSDP in (AcceleratorState._shared_state.get("distributed_type"),
                                         PartialState._shared_state.get("distributed_type")))
    if stale and not getattr(args.accelerator_config, "use_configured_state", False):
        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState(cpu=bool(args.use_cpu), backend=args.ddp_backend)  # as TrainingArguments builds it; an existing
        # process group is kept, and the arguments' distributed_state shares this state
        logger.info("DPTrainer: reset an accelerate state built earlier in this process with FSDP (the Trainer "
                    "builds it again without FSDP)")


class DPTrainer(Trainer):
    """``transformers.Trainer`` that trains with DP-SGD; see the module docstring for what changes and why.

    Takes the same arguments as ``Trainer`` except ``model_init`` and ``compute_loss_func`` (refused: one
    re-initialises models for hyper-parameter search, whose trials' privacy costs compose; the other returns
    a batch loss ghostdp cannot split into per-example terms). ``args`` must be :class:`DPTrainingArguments`.
    The collator must return ``labels``; use ``PrefixLMCollator`` or ``DataCollatorForLanguageModeling``.

    ``per_example_loss``: the objective, if the model class does not declare one DPTrainer knows (see
    :func:`model_task`): a task name ("causal_lm", "token_classification", "sequence_classification",
    "seq2seq_lm") or a callable ``(logits, labels) -> (batch,)`` whose i-th loss depends on example i alone.
    Without it, a model whose task is unknown is refused (ValueError) rather than trained on a guessed loss.

    After ``train()``: ``privacy_plan`` (the :class:`PrivacyPlan`), ``privacy_engine`` (steps, ledger,
    per-example norms of the last physical batch) and ``current_epsilon()``.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: DPTrainingArguments | None = None,
        data_collator: Callable | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        model_init: Callable | None = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
        optimizer_cls_and_kwargs: tuple | None = None,
        preprocess_logits_for_metrics: Callable | None = None,
        per_example_loss: Callable | str | None = None,
    ):
        if not isinstance(args, DPTrainingArguments):
            raise TypeError(
                f"DPTrainer needs args=DPTrainingArguments(...) (got {type(args).__name__}): it carries the privacy "
                "target, the logical (Poisson) batch size and the clipping bound."
            )
        if model_init is not None:
            raise ValueError(
                "DPTrainer does not take model_init: it exists for hyper-parameter search, and every trial trained "
                "on the private data spends privacy (the trials compose). Pass model=..."
            )
        if compute_loss_func is not None:
            raise ValueError(
                "DPTrainer does not take compute_loss_func: it returns one loss for the batch (and is handed a batch "
                "token count), so examples cannot be clipped separately. Override "
                "DPTrainer.compute_per_example_loss(model, inputs) -> (batch,) tensor instead."
            )
        for name, why in _PROTECTED.items():
            if getattr(type(self), name, None) is not getattr(DPTrainer, name, None):
                raise TypeError(f"{type(self).__name__} overrides {name}, which would bypass DP-SGD: {why}.")

        self.privacy_engine: PrivacyEngine | None = None
        self.privacy_plan: PrivacyPlan | None = None
        self._dp_batches: _RankShareSampler | None = None
        self._saved_dp_state: dict | None = None
        self._epsilon_cache: tuple[int, float] | None = None
        self._dp_data: tuple[Any, Callable] | None = None
        self._sampling_seed: int | None = None

        # FSDP2 from the Trainer's arguments or accelerate launch's configuration: DPTrainer shards the model here
        # and keeps accelerate's FSDP plugin out (it would wrap the model a second time)
        fsdp2, sources = resolve_fsdp2(args.fsdp, args.fsdp_config, accelerate_fsdp_env())
        if "accelerate launch configuration" in sources:
            _keep_accelerate_fsdp_off(args)
        if fsdp2 is not None:
            model = _shard_for_fsdp_arguments(model, args, fsdp2, sources)
            args.fsdp_plugin_args = None
        super().__init__(
            model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, compute_metrics=compute_metrics,
            callbacks=callbacks, optimizers=optimizers, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                f"{'DeepSpeed' if self.is_deepspeed_enabled else 'An FSDP plugin'} is enabled in accelerate's state "
                "(the accelerate config, or an AcceleratorState configured before the Trainer with "
                "use_configured_state=True). DPTrainer does not take it: accelerate's gradient reduction is what "
                "ghostdp replaces. To shard, use an FSDP2 accelerate launch configuration or "
                "DPTrainingArguments(fsdp=True, fsdp_config={'version': 2}) (DPTrainer shards the model itself), or "
                "wrap the model's blocks and root with torch.distributed.fsdp.fully_shard yourself (docs/fsdp2.md); "
                "or use data parallel."
            )
        self._fsdp2 = is_fsdp2(self.model)
        if self.args.n_gpu > 1:
            raise ValueError(
                f"{self.args.n_gpu} GPUs are visible to one process, so the Trainer would use nn.DataParallel, whose "
                "replicas do not carry ghostdp's clipping. Launch one process per GPU with torchrun instead."
            )
        if self.accelerator.mixed_precision not in ("no", "bf16"):
            raise ValueError(
                f"mixed_precision={self.accelerator.mixed_precision!r} (from the accelerate config) is not supported; "
                "use bf16 or full precision."
            )
        self._task, self._per_example_loss = _resolve_task_loss(
            self.model, per_example_loss,
            overridden=type(self).compute_per_example_loss is not DPTrainer.compute_per_example_loss,
        )
        self._tail_supported: bool | None = None  # set by _scored_tail on the first batch
        self._check_model_supported()
        if self.train_dataset is not None:
            self._check_train_dataset()
        self.add_callback(_PrivacyBudgetCallback(self))
        if _TRANSFORMERS_4:
            self.callback_handler.callbacks.insert(0, _StartDPCallback(self))  # before any user callback
            # 4.x clips the summed gradient inline with the accelerator (5.x calls _clip_grad_norm, overridden
            # below): that would rescale the clipped sum and its noise by a data-dependent factor.
            self.accelerator.clip_grad_norm_ = _no_global_clipping

    # ================================================================== checks before training
    def _check_model_supported(self) -> None:
        """Attach a throw-away engine so an unsupported trainable layer fails now, not at the first step."""
        if self._fsdp2:
            if _TRANSFORMERS_4:
                raise ValueError(
                    f"The model is sharded with FSDP2 (fully_shard); DPTrainer supports sharded models on "
                    f"transformers 5.x only (this is {transformers.__version__}, whose Trainer wraps the model in "
                    "DDP). Upgrade transformers, or train the sharded model with ghostdp's PrivacyEngine directly "
                    "(docs/fsdp2.md)."
                )
            if self.args.load_best_model_at_end:
                raise ValueError(
                    "load_best_model_at_end=True with an FSDP2 (fully_shard) model: DPTrainer's sharded checkpoints "
                    "are resumed with train(resume_from_checkpoint=...), not reloaded as a best model. Set "
                    "load_best_model_at_end=False and resume from the checkpoint you want."
                )
            if not (dist.is_available() and dist.is_initialized()) or self.args.world_size < 2:
                raise ValueError(
                    "The model is sharded with FSDP2 (fully_shard) but the Trainer runs a single process "
                    f"(world_size={self.args.world_size}). Launch with torchrun (one process per device), or pass "
                    "the unsharded model."
                )
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("The model has no trainable parameters (requires_grad=True); nothing to train.")
        probe = PrivacyEngine(
            self.model, torch.optim.SGD(trainable, lr=0.0), max_grad_norm=self.args.max_grad_norm,
            expected_batch_size=self.args.logical_batch_size, noise_multiplier=0.0, clipping=self.args.clipping,
            distributed=True if self._fsdp2 else None,
        )
        probe.detach()

    def _check_train_dataset(self) -> int:
        ds, L = self.train_dataset, self.args.logical_batch_size
        if ds is None:
            raise ValueError("DPTrainer: training requires a train_dataset.")
        if isinstance(ds, IterableDataset) or not hasattr(ds, "__len__"):
            raise ValueError(
                "train_dataset must be a map-style dataset with a length: Poisson sampling picks every index "
                "independently with probability q = logical_batch_size / N, which needs N and random access."
            )
        N = len(ds)
        if N < L:
            raise ValueError(
                f"The training set has {N} examples, fewer than logical_batch_size={L}: the Poisson rate q = L / N "
                "would exceed 1. Lower logical_batch_size (at most N; much smaller for privacy amplification)."
            )
        delta = self.args.target_delta
        if delta is not None and delta >= 1.0 / N:
            raise ValueError(
                f"target_delta={delta:g} >= 1/N = {1.0 / N:g}: with delta that large, a mechanism that publishes one "
                "random example verbatim satisfies (epsilon, delta)-DP. Use delta well below 1/N (None gives 1/(2N))."
            )
        return N

    # ================================================================== the privacy plan
    def _make_plan(self, saved: dict | None) -> PrivacyPlan:
        args = self.args
        N = self._check_train_dataset()
        L = args.logical_batch_size
        q = L / N
        steps = planning.planned_steps(sample_rate=q, epochs=args.num_train_epochs, max_steps=args.max_steps)
        delta = args.target_delta if args.target_delta is not None else planning.default_delta(N)
        history: list = []
        sigma = None
        if saved is not None:
            old = saved["plan"]
            now = {"num_examples": N, "logical_batch_size": L, "delta": delta, "max_grad_norm": args.max_grad_norm}
            changed = {k: (old[k], v) for k, v in now.items() if old[k] != v}
            if changed:
                raise ValueError(
                    "The checkpoint was trained with different privacy settings: "
                    + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
                    + ". Resuming must continue the same mechanism (same data, q, delta and C); restore them."
                )
            sigma = float(old["noise_multiplier"])
            if args.noise_multiplier is not None and args.noise_multiplier != sigma:
                logger.warning("Resuming: keeping the checkpoint's noise_multiplier=%g (args say %g).",
                               sigma, args.noise_multiplier)
            history = [tuple(h) for h in saved["engine"]["accountant"]["history"]]
        elif args.noise_multiplier is not None:
            sigma = float(args.noise_multiplier)
        planned = planning.plan_dp_sgd(num_examples=N, expected_batch_size=L, steps=steps, delta=delta,
                                       target_epsilon=args.target_epsilon, noise_multiplier=sigma, history=history,
                                       accountant=args.accountant)
        sigma, planned_eps, budget, done = (planned.noise_multiplier, planned.planned_epsilon, planned.budget_steps,
                                            planned.steps_done)
        if args.target_epsilon is not None and budget <= done and steps > done:
            raise PrivacyBudgetExhaustedError(
                f"No step fits in target_epsilon={args.target_epsilon}: {done} steps already spent it "
                f"(delta={delta:g}). "
                "Training on would exceed the budget. Stop here, or raise target_epsilon knowingly."
            )
        plan = PrivacyPlan(
            num_examples=N, logical_batch_size=L, sample_rate=q, planned_steps=steps, noise_multiplier=sigma,
            max_grad_norm=float(args.max_grad_norm), delta=delta, target_epsilon=args.target_epsilon,
            planned_epsilon=planned_eps, budget_steps=budget, accountant=args.accountant,
        )
        logger.info(
            "DP-SGD plan: N=%d, logical batch %d (q=%.4g), %d steps, noise_multiplier=%.4g, C=%g -> epsilon=%.4g at "
            "delta=%.3g (%s)%s", N, L, q, steps, sigma, plan.max_grad_norm, planned_eps, delta, args.accountant,
            f", resuming after {done} steps" if done else "",
        )
        if budget < steps:
            logger.warning(
                "noise_multiplier=%g over %d steps would reach epsilon=%.4g > target_epsilon=%g: training will stop "
                "after step %d, the last within the budget.", sigma, steps, planned_eps, args.target_epsilon, budget,
            )
        if sigma == 0:
            logger.warning("noise_multiplier=0: no noise is added; this run is NOT differentially private.")
        if args.dp_seed is not None:
            logger.warning("dp_seed is set: the Poisson batches and the noise are reproducible from it. Use it for "
                           "tests only; anyone who knows the seed can remove the noise.")
        return plan

    def current_epsilon(self) -> float:
        """epsilon spent so far at the plan's delta (0 before the first step)."""
        if self.privacy_engine is None or self.privacy_plan is None:
            return 0.0
        steps = self.privacy_engine.steps
        if self._epsilon_cache is None or self._epsilon_cache[0] != steps:
            eps = self.privacy_engine.epsilon(self.privacy_plan.delta, accountant=self.privacy_plan.accountant)
            self._epsilon_cache = (steps, eps)
        return self._epsilon_cache[1]

    # ================================================================== entry point
    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
              ignore_keys_for_eval: list[str] | None = None):
        """Plan the privacy spend (calibrating the noise), then run the Trainer's loop with DP-SGD steps."""
        if trial is not None:
            raise ValueError("DPTrainer does not support hyper-parameter search trials: their privacy costs compose.")
        if resume_from_checkpoint is False:
            resume_from_checkpoint = None
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No checkpoint found in output_dir={self.args.output_dir!r} to resume from.")
        if self.privacy_engine is not None and self.privacy_engine.steps > 0 and resume_from_checkpoint is None:
            raise RuntimeError(
                f"This DPTrainer already took {self.privacy_engine.steps} DP steps "
                f"(epsilon={self.current_epsilon():.4g}). "
                "A second train() on the same data would compose with the first. Resume from a checkpoint to "
                "continue the same ledger, or build a new DPTrainer for an independent run (its cost adds up)."
            )
        self._saved_dp_state = self._read_dp_state(resume_from_checkpoint) if resume_from_checkpoint else None
        self.privacy_plan = self._make_plan(self._saved_dp_state)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, ignore_keys_for_eval=ignore_keys_for_eval)

    # ================================================================== data: one Poisson logical batch per step
    def _shared_sampling_seed(self) -> int:
        """dp_seed, or OS entropy drawn on rank 0 and broadcast (every rank must draw the same batches)."""
        if self._sampling_seed is None:
            if self.args.dp_seed is not None:
                self._sampling_seed = int(self.args.dp_seed)
            else:
                seed = torch.tensor([int.from_bytes(os.urandom(8), "little") >> 1], dtype=torch.int64)
                if self.args.world_size > 1:
                    seed = seed.to(self.args.device)
                    dist.broadcast(seed, src=0)
                self._sampling_seed = int(seed.item())
        return self._sampling_seed

    def get_train_dataloader(self) -> DataLoader:
        """A DataLoader yielding one :class:`LogicalBatch` (this rank's share of a Poisson batch) per step.

        Not passed through ``accelerator.prepare``: accelerate would shard the batches across ranks itself
        and move them to the device; sharding is done here (all ranks draw the same global batch) and
        ``training_step`` moves each physical batch.
        """
        plan = self.privacy_plan or self._make_plan(None)
        self.privacy_plan = plan
        dataset, collate = self.train_dataset, self.data_collator
        try:
            import datasets

            is_hf_dataset = isinstance(dataset, datasets.Dataset)
        except ImportError:
            is_hf_dataset = False
        if is_hf_dataset:
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collate = self._get_collator_with_removed_columns(collate, description="training")
        self._dp_data = (dataset, collate)
        generator = torch.Generator()
        generator.manual_seed(self._shared_sampling_seed())
        poisson = PoissonBatchSampler(plan.num_examples, plan.sample_rate, generator=generator)
        self._dp_batches = _RankShareSampler(poisson, self.args.process_index, self.args.world_size)
        params = {
            "batch_sampler": self._dp_batches,
            "collate_fn": _LogicalBatchCollate(collate, self.args.per_device_train_batch_size,
                                               by_length=getattr(self.args, "group_physical_by_length", True)),
            "num_workers": self.args.dataloader_num_workers,
            "pin_memory": self.args.dataloader_pin_memory,
            "persistent_workers": self.args.dataloader_persistent_workers,
            "worker_init_fn": partial(seed_worker, num_workers=self.args.dataloader_num_workers,
                                      rank=self.args.process_index),
        }
        if self.args.dataloader_num_workers > 0:
            params["prefetch_factor"] = self.args.dataloader_prefetch_factor
            params["multiprocessing_context"] = getattr(self.args, "dataloader_multiprocessing_context", None)  # 5.x
        return DataLoader(dataset, **params)

    def set_initial_training_values(self, args, dataloader, total_train_batch_size=None):
        """Steps = round(num_train_epochs / q) (or max_steps); a Trainer epoch = one sampler pass, round(1/q) steps.

        transformers 4.x passes ``total_train_batch_size`` and reads the fifth value as ``epoch_based``.
        """
        plan = self.privacy_plan
        per_epoch = len(dataloader)
        max_steps = plan.planned_steps
        epochs = math.ceil(max_steps / per_epoch)
        fifth = plan.logical_batch_size if total_train_batch_size is None else args.max_steps <= 0
        return epochs, per_epoch, plan.num_examples, max_steps * plan.logical_batch_size, fifth, per_epoch, max_steps

    def get_total_train_batch_size(self, args) -> int:
        """The expected logical batch, q * N, across all ranks (what the accounting uses)."""
        return self.args.logical_batch_size

    # ================================================================== model, optimizer, engine
    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        """Trainer's preparation without the DDP wrapper, then the PrivacyEngine, then the checkpoint's state.

        ``accelerator.prepare_model(evaluation_mode=True)`` places the model and installs bf16 autocast but
        does not wrap it in DistributedDataParallel (whose hooks never fire under ghostdp).
        """
        if self._created_lr_scheduler:
            self.lr_scheduler = None
            self._created_lr_scheduler = False
        self.create_optimizer()
        model = self.accelerator.prepare_model(self.model, evaluation_mode=True)
        self.optimizer = self.accelerator.prepare_optimizer(self.optimizer)
        self.create_scheduler(num_training_steps=max_steps)
        self.model_wrapped = model
        self._start_dp(model)
        if resume_from_checkpoint is not None:
            self._load_optimizer_and_scheduler(resume_from_checkpoint)
            self._load_scaler(resume_from_checkpoint)
            self._load_dp_state(self._saved_dp_state)
        for attr in ("model", "optimizer", "lr_scheduler"):
            setattr(self.callback_handler, attr, getattr(self, attr))
        self.callback_handler.train_dataloader = train_dataloader
        return model, train_dataloader

    def _start_dp(self, model: nn.Module) -> None:
        """Once the model and optimizer are prepared: same start on every rank, the engine, the loss check."""
        if self.args.world_size > 1 and not self._fsdp2:  # FSDP2's shards are one consistent model already
            self._broadcast_parameters()
        self._attach_engine()
        self._check_loss_is_per_example(model)

    def _broadcast_parameters(self) -> None:
        """Start every rank from rank 0's parameters and buffers (what DDP's constructor does)."""
        with torch.no_grad():
            for t in list(self.model.parameters()) + list(self.model.buffers()):
                dist.broadcast(t.data, src=0)

    def _attach_engine(self) -> None:
        plan = self.privacy_plan
        if self.privacy_engine is not None:
            self.privacy_engine.detach()
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's AcceleratedOptimizer wraps it
        device = next(p.device for p in self.model.parameters() if p.requires_grad)
        noise_gen = None
        if self.args.dp_seed is not None:
            noise_gen = torch.Generator(device=device)
            noise_gen.manual_seed(int(self.args.dp_seed) + 1)
        self.privacy_engine = PrivacyEngine(
            self.model, inner, max_grad_norm=plan.max_grad_norm, expected_batch_size=plan.logical_batch_size,
            noise_multiplier=plan.noise_multiplier, loss_reduction="sum", clipping=self.args.clipping,
            sample_rate=plan.sample_rate, generator=noise_gen, distributed=self.args.world_size > 1 or self._fsdp2,
        )
        self._epsilon_cache = None

    # ================================================================== one step
    def compute_per_example_loss(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """(B,) losses, ``L_i`` depending on example i alone, for the model's declared task.

        The task comes from the model class (see :func:`model_task`), never from tensor shapes: causal LM
        (shifted, mean over example i's own target tokens), token classification and seq2seq (aligned, -100
        ignored), sequence classification (one label per example; regression, single- or multi-label as
        ``config.problem_type`` / ``num_labels`` say). A ``per_example_loss=`` given to DPTrainer replaces
        the task's. Override this method for anything else (same contract). The model is called without
        labels so that its own batch-averaged loss is never formed.
        """
        if "labels" not in inputs:
            raise ValueError(
                f"The training batch has no 'labels' (keys: {sorted(inputs)}). DPTrainer needs per-example targets: "
                "use PrefixLMCollator, DataCollatorForLanguageModeling(mlm=False), or a collator that sets labels."
            )
        labels = inputs["labels"]
        kwargs = {k: v for k, v in inputs.items() if k != "labels"}
        if self._task == "seq2seq_lm" and "decoder_input_ids" not in kwargs and "decoder_inputs_embeds" not in kwargs:
            kwargs["decoder_input_ids"] = _unwrap(model).prepare_decoder_input_ids_from_labels(labels=labels)
        keep = self._scored_tail(model, labels)
        if keep is not None:  # logits only where the loss reads them: the same loss, less LM-head work
            kwargs["logits_to_keep"] = keep
        outputs = model(**kwargs)
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
        if keep is not None and logits.dim() == 3 and logits.shape[1] == keep:
            labels = labels[:, labels.shape[1] - keep:]
        elif keep is not None:  # a forward that names logits_to_keep but returned every position: read them all
            self._tail_supported = False
        if self._per_example_loss is per_example_sequence_loss:
            problem_type = getattr(getattr(_unwrap(model), "config", None), "problem_type", None)
            return per_example_sequence_loss(logits, labels, problem_type)
        return self._per_example_loss(logits, labels)

    def _scored_tail(self, model: nn.Module, labels: torch.Tensor) -> int | None:
        """How many trailing positions' logits the causal-LM loss reads, when fewer than all and the model can
        compute only those (``logits_to_keep``), else None.

        The shifted loss pairs the logits at t - 1 with the label at t, so with f the first column that
        holds a scored label (not -100) in any row, it reads positions f - 1 .. T - 1: K = T - f + 1. A
        Prefix-LM batch never scores its prompt, so the LM head (a vocabulary-sized matmul, with the
        log-softmax after it) skips the prompt positions; the per-example losses and gradients are the same
        (a hidden state whose logits are not read gets no gradient from them either). Only for the default
        causal-LM loss of a model whose forward takes ``logits_to_keep`` (transformers' causal LMs since
        4.50), and not for a PEFT prompt-learning model (its logits include the virtual positions).
        """
        if self._task != "causal_lm" or self._per_example_loss is not per_example_lm_loss or labels.dim() != 2:
            return None
        if self._tail_supported is None:
            import inspect

            peft_config = getattr(model, "active_peft_config", None)
            base = _unwrap(model)
            self._tail_supported = (not getattr(peft_config, "is_prompt_learning", False)
                                    and "logits_to_keep" in inspect.signature(base.forward).parameters)
        if not self._tail_supported:
            return None
        scored = (labels[:, 1:] != -100).any(dim=0)  # column t + 1 scored in some row
        first = int(torch.where(scored.any(), scored.int().argmax(), -1))  # one host sync; -1: nothing scored
        if first < 0:
            return None
        keep = labels.shape[1] - first  # T - f + 1 with f = first + 1
        return keep if keep < labels.shape[1] else None

    @torch.no_grad()
    def _check_loss_is_per_example(self, model: nn.Module) -> None:
        """Before the first step: example i's loss must not change when computed without the other examples.

        Catches a per-example loss normalised by the batch (e.g. by its token count), which makes one
        example reweight the others and voids the clipping bound. Runs on the first (up to 4) training
        examples in eval mode (no dropout) under no_grad; only a broken loss function can fail it.
        """
        dataset, collate = self._dp_data
        b = min(4, len(dataset))
        if b < 2:
            return
        inputs = self._prepare_inputs(collate([dataset[i] for i in range(b)]))
        was_training = model.training
        model.eval()
        try:
            with self.compute_loss_context_manager():
                full = self.compute_per_example_loss(model, inputs).float()
                if full.shape != (b,):
                    raise ValueError(
                        f"compute_per_example_loss returned shape {tuple(full.shape)} for a batch of {b}; it must "
                        "return one loss per example, shape (batch,)."
                    )
                for i in range(b):
                    alone = {k: v[i:i + 1] if isinstance(v, torch.Tensor) and v.shape[:1] == (b,) else v
                             for k, v in inputs.items()}
                    one = self.compute_per_example_loss(model, alone).float()[0]
                    rtol = 5e-2 if self.args.bf16 else 1e-3
                    if not torch.isclose(one, full[i], rtol=rtol, atol=1e-6):
                        raise ValueError(
                            f"compute_per_example_loss is not per-example: example {i}'s loss is {float(full[i]):.6g} "
                            f"in a batch of {b} and {float(one):.6g} alone. Each L_i must depend on example i only "
                            "(e.g. a mean over its own tokens, not over the batch's token count); otherwise one "
                            "example changes the others' gradients and clipping no longer bounds its influence."
                        )
        finally:
            model.train(was_training)

    def training_step(self, model: nn.Module, inputs: LogicalBatch, num_items_in_batch=None) -> torch.Tensor:
        """Forward + backward of every physical batch of this rank's share; returns the logical batch loss.

        ``sum_i L_i .backward()`` per physical batch with the engine in ``loss_reduction="sum"``: each
        example's clipped gradient is summed into ``p.grad``; ``optimizer.step()`` (in the Trainer's loop)
        then adds the noise once and divides by the expected batch size. Returns
        ``sum_i L_i / logical_batch_size`` over the whole logical batch (all ranks), for logging.
        """
        if not isinstance(inputs, LogicalBatch):
            raise TypeError(
                f"DPTrainer.training_step expects a LogicalBatch from its own dataloader, got {type(inputs).__name__}"
            )
        engine, plan = self.privacy_engine, self.privacy_plan
        if engine.steps >= plan.budget_steps:
            raise PrivacyBudgetExhaustedError(
                f"A DP step was about to run after the budget of {plan.budget_steps} steps (target_epsilon="
                f"{plan.target_epsilon}). A callback must have cleared control.should_training_stop; refusing."
            )
        self._dp_batches.mark_trained()
        if isinstance(model, nn.parallel.DistributedDataParallel):  # transformers 4.x: see _StartDPCallback
            model = model.module
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        total = torch.zeros((), dtype=torch.float64, device=self.args.device)
        batches = [(b, 1.0) for b in inputs.physical]
        if self._fsdp2:
            # FSDP2's forward and backward are collectives: every rank runs as many physical batches as the
            # busiest one. The extra ones are one example with loss weight 0: per-example gradient 0, so they add
            # nothing to any norm or sum (docs/fsdp2.md).
            most = torch.tensor([len(batches)], dtype=torch.int64, device=self.args.device)
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            if int(most) > len(batches):
                dataset, collate = self._dp_data
                batches += [(collate([dataset[0]]), 0.0)] * (int(most) - len(batches))
        for batch, weight in batches:
            batch = self._prepare_inputs(batch)
            with self.compute_loss_context_manager():
                losses = self.compute_per_example_loss(model, batch)
            if weight != 1.0:
                losses = losses * weight
            n = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))
            if losses.shape != (n,):
                raise ValueError(
                    f"compute_per_example_loss returned shape {tuple(losses.shape)} for a batch of {n}; it must "
                    "return one loss per example, shape (batch,)."
                )
            losses.sum().backward()
            total += losses.detach().sum().to(total.dtype)
        if self.args.world_size > 1:
            dist.all_reduce(total)
        return (total / plan.logical_batch_size).float()

    # Neutralised Trainer pieces (see the module docstring).
    def _get_num_items_in_batch(self, batch_samples, device):
        return None

    def _clip_grad_norm(self, model):
        return None

    def _get_grad_norm(self, model, grad_norm=None):
        return None

    def floating_point_ops(self, inputs) -> int:
        if isinstance(inputs, LogicalBatch):
            return sum(super(DPTrainer, self).floating_point_ops(b) for b in inputs.physical)
        return super().floating_point_ops(inputs)

    def _track_num_input_tokens(self, inputs):
        """As the Trainer's, summed over the physical batches, with one gather per step on every rank."""
        if not isinstance(inputs, LogicalBatch):
            return super()._track_num_input_tokens(inputs)
        mode = self.args.include_num_input_tokens_seen
        if mode == "no":
            return
        name = getattr(self.model, "main_input_name", "input_ids")
        tokens = 0
        for b in inputs.physical:
            if name not in b:
                continue
            if mode == "non_padding" and "attention_mask" in b:
                tokens += int(b["attention_mask"].sum())
            else:
                tokens += b[name].numel()
        count = torch.tensor(tokens, device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += int(self.accelerator.gather(count).sum().item())

    # ================================================================== logging and checkpoints
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log(), with ``epsilon`` (spent so far, at the plan's delta) added while training.

        The training loss (``loss``, ``train_loss``) is computed on private batches without noise, so it is
        dropped unless ``args.log_private_loss`` (then it reaches every reporter and checkpoint, which must
        stay as private as the data)."""
        if not getattr(self.args, "log_private_loss", False):
            logs = {k: v for k, v in logs.items() if k not in _PRIVATE_LOG_KEYS}
        if self.privacy_engine is not None:
            logs = {**logs, "epsilon": self.current_epsilon()}
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        folder = os.path.join(self._get_output_dir(trial=trial), name)
        if self._fsdp2:
            self._save_fsdp2_shards(folder)
        if self.args.should_save and self.privacy_engine is not None:
            self._save_dp_state(folder)

    # ------------------------------------------------------------------ FSDP2: sharded checkpoints
    # Each rank writes and reads its own shards as plain local tensors (no gathering, no
    # torch.distributed.checkpoint: its get/set_optimizer_state_dict run a hidden zero-lr optimizer.step() on an
    # optimizer without state, which the engine would count and noise as a DP step). Resume needs the same
    # world size and sharding, which is checked.
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under FSDP2: gather the full model on rank 0 (a collective: every rank calls this) and save it there
        as a plain transformers / PEFT checkpoint."""
        if not self._fsdp2:
            return super().save_model(output_dir, _internal_call)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.args.should_save:
            self._save(output_dir if output_dir is not None else self.args.output_dir, state_dict=full)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _fsdp2_shard_path(self, folder: str) -> str:
        return os.path.join(folder, FSDP2_SHARDS_FILE.format(rank=self.args.process_index))

    def _save_fsdp2_shards(self, folder: str) -> None:
        from torch.distributed.tensor import DTensor

        def local(t):
            return (t.to_local() if isinstance(t, DTensor) else t).detach().cpu().clone()

        os.makedirs(folder, exist_ok=True)
        model = {n: local(t) for n, t in list(self.model.named_parameters()) + list(self.model.named_buffers())}
        opt = self.optimizer.state_dict()
        opt["state"] = {k: {s: local(v) if isinstance(v, torch.Tensor) else v for s, v in st.items()}
                        for k, st in opt["state"].items()}
        torch.save({"world_size": self.args.world_size, "model": model, "optimizer": opt},
                   self._fsdp2_shard_path(folder))

    def _read_fsdp2_shards(self, checkpoint: str) -> dict:
        path = self._fsdp2_shard_path(checkpoint)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} is missing: the checkpoint was not written by DPTrainer under FSDP2 with this rank "
                f"({self.args.process_index} of {self.args.world_size}). Resume a sharded run with the same world size."
            )
        shards = torch.load(path, map_location="cpu", weights_only=True)
        if shards["world_size"] != self.args.world_size:
            raise ValueError(
                f"{checkpoint} holds FSDP2 shards of {shards['world_size']} ranks, this run has "
                f"{self.args.world_size}. Resume with the same number of processes (and the same fully_shard calls)."
            )
        return shards

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if not self._fsdp2:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from torch.distributed.tensor import DTensor

        saved = self._read_fsdp2_shards(resume_from_checkpoint)["model"]
        mine = dict(list(self.model.named_parameters()) + list(self.model.named_buffers()))
        if set(saved) != set(mine):
            raise ValueError(f"{resume_from_checkpoint}: the FSDP2 shards are of a different model (other names).")
        with torch.no_grad():
            for name, t in mine.items():
                dst = t.to_local() if isinstance(t, DTensor) else t
                if dst.shape != saved[name].shape:
                    raise ValueError(
                        f"{resume_from_checkpoint}: shard {name} has shape {tuple(saved[name].shape)}, this rank's "
                        f"{tuple(dst.shape)}. Shard the model as in the run that wrote the checkpoint."
                    )
                dst.copy_(saved[name])

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self._fsdp2:
            return super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:  # the optimizer's shards go with the model's, in _save_checkpoint
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if not self._fsdp2 or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        from torch.distributed.tensor import DTensor

        self.optimizer.load_state_dict(self._read_fsdp2_shards(checkpoint)["optimizer"])
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        for p, st in inner.state.items():  # the saved local tensors become this rank's DTensor shards again
            if not isinstance(p, DTensor):
                continue
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and not isinstance(v, DTensor) and v.dim() > 0:
                    st[k] = DTensor.from_local(v.to(p.to_local().device), p.device_mesh, p.placements,
                                               run_check=False, shape=p.shape, stride=p.stride())
        self.lr_scheduler.load_state_dict(
            torch.load(os.path.join(checkpoint, "scheduler.pt"), map_location="cpu", weights_only=True))

    def _save_dp_state(self, folder: str) -> None:
        engine, plan = self.privacy_engine, self.privacy_plan
        engine_state = engine.state_dict()
        if self.args.dp_seed is None:  # OS-entropy noise: keep its state out of the files (see module docstring)
            engine_state["generator_state"] = engine_state["generator_device"] = None
        state = {"version": _STATE_VERSION, "engine": engine_state, "sampler": self._dp_batches.state_dict(),
                 "plan": asdict(plan)}
        torch.save(state, os.path.join(folder, STATE_FILE))
        summary = {
            "epsilon": self.current_epsilon(), "delta": plan.delta, "steps": engine.steps,
            "accountant": plan.accountant, "noise_multiplier": plan.noise_multiplier,
            "sample_rate": plan.sample_rate, "max_grad_norm": plan.max_grad_norm,
            "logical_batch_size": plan.logical_batch_size, "num_examples": plan.num_examples,
            "target_epsilon": plan.target_epsilon, "history": engine.accountant.history,
        }
        with open(os.path.join(folder, PRIVACY_FILE), "w") as f:
            json.dump(summary, f, indent=2)

    @staticmethod
    def _read_dp_state(checkpoint: str) -> dict:
        path = os.path.join(checkpoint, STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{checkpoint} has no {STATE_FILE}: it was not written by DPTrainer (or was written with "
                "save_only_model). Resuming without the privacy ledger would restart epsilon at 0."
            )
        state = torch.load(path, weights_only=True)
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"{path}: unknown ghostdp state version {state.get('version')!r}")
        return state

    def _load_dp_state(self, state: dict) -> None:
        """Continue the ledger, the step count and the Poisson sequence (and the noise stream with dp_seed)."""
        engine = self.privacy_engine
        engine.load_state_dict(state["engine"])
        if engine.steps != self.state.global_step:
            raise ValueError(
                f"The checkpoint's privacy ledger has {engine.steps} steps but its trainer state "
                f"{self.state.global_step}; the checkpoint is inconsistent."
            )
        per_epoch = len(self._dp_batches)
        skip = 0 if self.args.ignore_data_skip else self.state.global_step % per_epoch
        self._dp_batches.load_state_dict(state["sampler"], placeholders=skip)
        self._epsilon_cache = None
        logger.info("Resumed the privacy ledger: %d steps, epsilon=%.4g", engine.steps, self.current_epsilon())
