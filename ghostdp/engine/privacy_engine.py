"""PrivacyEngine: DP-SGD on an existing model and optimizer, in one backward pass.

One step, as data flows (docs/design.md, section 2):
1. Every clipped layer's forward runs through an autograd Function whose backward returns the input
   gradient only and hands the engine each parameter's per-example gradient in factored or dense form
   (``ghostdp.engine.grads``). Autograd never forms an unclipped parameter gradient.
2. At the end of that backward (an autograd-engine callback), the engine sums per-example squared norms
   over all trainable parameters in fp32 (float64 for float64 models), with the cross terms of parameters
   used more than once (tied embeddings), forms ``c_i = min(1, C / (||g_i|| + 1e-6))`` and adds
   ``sum_i c_i G_i`` into ``param.grad`` (book-keeping: no second backward).
3. ``optimizer.step()`` (the same object) first replaces each gradient by
   ``(sum of clipped per-example gradients + N(0, sigma^2 C^2 I)) / expected_batch_size``, noise drawn once,
   in fp32 at least, then runs the inner step; the accountant counts one step.

Two boundaries are checked, because a privacy bug there is silent:

* Every gradient a step applies is the engine's (:class:`UnclippedGradientError` otherwise, before the step,
  naming the parameter): the engine remembers the ``.grad`` tensor and in-place version counter it last
  wrote per parameter, and ``optimizer.step()`` refuses a parameter it does not clip (unfrozen after attach,
  added with ``add_param_group``), a ``.grad`` replaced or changed in place (by hand, another library's hook,
  ``clip_grad_norm_``, a scaler) or left from before attach, and closures; a global optimizer pre-hook
  refuses a second optimizer stepping a clipped parameter. A ``.grad`` of zeros is accepted.
* The examples of each backward are counted independently: a forward pre-hook on the model reads the
  leading dimension of its main input (``input_ids``, ``inputs_embeds``, ... or the first tensor), and every
  clipped layer's input must have that many rows. An embedding looked up with ids of leading dimension 1
  (BERT's position ids (1, T)) is expanded to the batch, which is exact; any other disagreement (a shared
  input, sequence-first layouts, tokens flattened across examples), and one backward through two model
  forwards, raise :class:`BatchMismatchError` naming the layer, its input and the fix.

``loss_reduction="mean"`` means the loss handed to backward is ``(1/b) sum_i L_i`` over the b examples of
the physical batch: the engine multiplies by b to recover each ``g_i = grad L_i``. Each ``L_i`` must
depend on example i alone (e.g. the mean over its own target tokens), never on a batch token count.
"""
from __future__ import annotations

import logging
import math
import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from numbers import Real
from types import MappingProxyType
from typing import Literal

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ghostdp import kernels
from ghostdp.engine import fsdp
from ghostdp.engine.errors import BatchMismatchError, UnclippedGradientError, UnsupportedModuleError
from ghostdp.engine.grads import Dense, Factored, PerExampleGrad, compute_dtype, summed_norm2
from ghostdp.engine.layers import rule_for
from ghostdp.engine.layers.lora import check_peft_model
from ghostdp.engine.layers.prompt import attach_prompt_tuning
from ghostdp.engine.layers.registry import Recorder, unsupported_error
from ghostdp.kernels.dispatch import TWIN_DTYPES  # the noise kernel also reads float64

log = logging.getLogger(__name__)


def _qualified(module_name: str, param_name: str) -> str:
    """``module.param`` as ``named_parameters`` spells it (the bare name for the root's own parameters)."""
    return f"{module_name}.{param_name}" if module_name else param_name

Clipping = Literal["auto", "ghost", "per_sample"]
CLIP_EPS = 1e-6
# Version of state_dict(). 2: step noise drawn through ghostdp.kernels.add_noise_ for both impls, per
# parameter from noise_seed(base_seed, index) (1: the PyTorch path drew torch.randn from the generator).
STATE_VERSION = 2


@dataclass
class _BackwardContext:
    """What one backward pass (one physical batch) records: the per-example gradients of each use."""

    uses: dict[nn.Parameter, list[PerExampleGrad]] = field(default_factory=dict)
    batch_size: int | None = None
    forward: _ForwardInfo | None = None
    finalize_queued: bool = False


# Keyword arguments that carry the examples of a model's forward, most specific first.
_BATCH_INPUTS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features",
                 "decoder_input_ids", "x", "input")


@dataclass(eq=False)
class _ForwardInfo:
    """One grad-enabled forward of the whole model: the independent count of its examples.

    ``batch`` is the leading dimension of the model's main input (``input_ids``, ``inputs_embeds``, ... or
    its first tensor argument), recorded by a forward pre-hook on the model the engine was attached to.
    Every clipped layer's per-example leading dimension is checked against it.
    """

    batch: int
    source: str  # e.g. "input_ids of shape (4, 8)", for error messages


def _model_batch(args: tuple, kwargs: dict) -> tuple[int, str] | None:
    """(number of examples, where it came from) of a model call, or None if no tensor input has a dim."""
    def ok(v):
        return isinstance(v, torch.Tensor) and v.dim() >= 1

    for key in _BATCH_INPUTS:
        if ok(kwargs.get(key)):
            return kwargs[key].shape[0], f"'{key}' of shape {tuple(kwargs[key].shape)}"
    for i, v in enumerate(args):
        if ok(v):
            return v.shape[0], f"positional argument {i} of shape {tuple(v.shape)}"
    for key, v in kwargs.items():
        if ok(v):
            return v.shape[0], f"'{key}' of shape {tuple(v.shape)}"
    return None


def _first_tensor(args: tuple, kwargs: dict) -> tuple[int | str, torch.Tensor] | None:
    for i, v in enumerate(args):
        if isinstance(v, torch.Tensor):
            return i, v
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            return k, v
    return None


def _norm_method(grad: PerExampleGrad, clipping: Clipping, impl: str) -> str:
    """Per-use norm rule. ``auto`` takes the cheaper in FLOPs for the implementation that will run.

    Per example, the Gram route costs ~T²(p + d) and instantiation ~T·p·d, so ghost wins for short
    sequences and wide layers (T < pd/(p + d)); LoRA factors (p or d = r) almost always instantiate.
    Memory does not tip the balance: the fused kernel instantiates tile by tile in registers, and the
    PyTorch twins block over examples (instantiation) or rows (Gram) within a fixed budget.
    """
    if clipping == "ghost":
        return "ghost"
    if clipping == "per_sample" or not isinstance(grad, Factored):
        return "instantiated"
    B, T = grad.a.shape[:2]
    p, d = grad.shape
    ghost = kernels.norm_cost(B, T, d, p, "ghost", impl).flops
    inst = kernels.norm_cost(B, T, d, p, "instantiated", impl).flops
    return "ghost" if ghost < inst else "instantiated"


def _input_key(a: torch.Tensor) -> tuple:
    """Identifies a layer input by its memory: layers fed the same tensor (q/k/v projections) share it.
    Within one backward every saved input is alive (and autograd refuses one changed in place), so equal
    keys mean equal values."""
    return (a.untyped_storage().data_ptr(), a.storage_offset(), tuple(a.shape), a.stride(), a.dtype, a.device)


class PrivacyEngine:
    """Attach DP-SGD to ``model`` and ``optimizer`` (both keep being used as before).

    Args:
        model: any ``nn.Module`` whose trainable parameters all sit in supported layers (``nn.Linear``,
            ``nn.Embedding``, ``nn.LayerNorm``, RMSNorm, PEFT LoRA); others raise ``UnsupportedModuleError``.
        optimizer: the optimizer over (a subset of) the model's trainable parameters.
        max_grad_norm: C, the per-example clipping bound on the norm over all trainable parameters.
        expected_batch_size: the public constant q·N the summed gradient is divided by.
        noise_multiplier: sigma; the noise std is sigma·C. 0 gives no noise (and no privacy).
        loss_reduction: "mean" if the loss is the mean of per-example losses over the physical batch,
            "sum" if it is their sum. The engine sees only the gradients of that loss, not how it was
            formed: each per-example loss must depend on its own example alone. A Hugging Face model's
            ``model(..., labels=...).loss`` averages over the batch's *tokens*, which weights each example
            by the others' lengths; it cannot be detected here and must not be used. Use
            ``ghostdp.engine.loss.per_example_lm_loss`` (or DPTrainer, which derives the loss from the task).
        clipping: "ghost" (Gram-matrix norms), "per_sample" (instantiated per-example gradients) or
            "auto" (per layer, the cheaper of the two).
        sample_rate: Poisson sampling rate q, needed for ``epsilon``.
        generator: RNG for the noise; by default one seeded from the OS entropy pool.
        distributed: data-parallel over an initialised ``torch.distributed`` group (default: whenever one
            with more than one rank is initialised). Each rank clips its own examples; at ``step()`` rank 0
            adds the noise to its clipped sum and the sums are all-reduced, so the noise enters exactly
            once. ``expected_batch_size`` and ``sample_rate`` are then the global ones. Do not wrap the
            model in ``DistributedDataParallel``: its gradient hooks never fire, ghostdp reduces itself.
        impl: kernels for norms, clipped sums and noise: "triton" (fused kernels; CUDA, or the CPU
            interpreter under TRITON_INTERPRET=1), "torch" (the PyTorch twins) or "auto" (Triton on CUDA
            when it is importable, else the twins). Under "auto" a kernel that fails to compile or launch
            runs its twin instead, with one ``KernelFallbackWarning``; under "triton" it raises.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        max_grad_norm: float,
        expected_batch_size: int,
        noise_multiplier: float,
        loss_reduction: Literal["mean", "sum"] = "mean",
        clipping: Clipping = "auto",
        sample_rate: float | None = None,
        generator: torch.Generator | None = None,
        distributed: bool | None = None,
        impl: Literal["auto", "triton", "torch"] = "auto",
    ):
        if not (isinstance(max_grad_norm, Real) and math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a positive finite number (the clipping bound C), got {max_grad_norm!r}")
        if isinstance(expected_batch_size, bool) or not isinstance(expected_batch_size, Real) or not expected_batch_size > 0:
            raise ValueError(
                f"expected_batch_size must be positive (sample_rate * dataset size), got {expected_batch_size!r}"
            )
        if not (isinstance(noise_multiplier, Real) and noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
            raise ValueError(f"noise_multiplier must be >= 0 (0 disables noise), got {noise_multiplier!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if clipping not in ("auto", "ghost", "per_sample"):
            raise ValueError(f"clipping must be 'auto', 'ghost' or 'per_sample', got {clipping!r}")
        if sample_rate is not None and not (0 < sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if impl not in ("auto", "triton", "torch"):
            raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")

        self.model, self.optimizer = model, optimizer
        self.max_grad_norm = float(max_grad_norm)
        self.expected_batch_size = float(expected_batch_size)
        self.noise_multiplier = float(noise_multiplier)
        self.loss_reduction = loss_reduction
        self.clipping: Clipping = clipping
        self.sample_rate = sample_rate
        self.generator = generator
        self.distributed = distributed
        self.impl = impl
        self.per_sample_norms: torch.Tensor | None = None
        self.steps = 0
        from ghostdp.engine.accounting import PrivacyAccountant

        self.accountant = PrivacyAccountant()
        self._ctx = _BackwardContext()
        self._anchor = torch.zeros((), requires_grad=True)
        self._recorder = Recorder(partial(self._record, None), self._anchor)  # layers run outside a model call
        self._forward: _ForwardInfo | None = None  # the latest grad-enabled model forward
        self._forward_recorder = self._recorder
        self._model_depth = 0
        self._patched: list[nn.Module] = []
        self._handles: list = []
        self._attach()

    # ------------------------------------------------------------------ attach / detach
    def _attach(self) -> None:
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            raise TypeError(
                "Pass the bare model, not a DistributedDataParallel wrapper: DDP reduces gradients in hooks that "
                "never fire under ghostdp (autograd does not form unclipped parameter gradients). ghostdp "
                "all-reduces the clipped sums itself and adds the noise once (distributed=True)."
            )
        fsdp.refuse_fsdp1(self.model)
        check_peft_model(self.model)
        trainable: dict[nn.Parameter, str] = {}
        to_patch: dict[int, tuple[nn.Module, object]] = {}
        for mname, module in self.model.named_modules(remove_duplicate=False):
            owned = [(n, p) for n, p in module._parameters.items() if p is not None and p.requires_grad]
            if not owned:
                continue
            rule = rule_for(module)
            qual = partial(_qualified, mname)
            if rule is None:
                raise unsupported_error(qual(owned[0][0]), mname, module)
            for n, p in owned:
                if n not in rule.param_names:
                    raise unsupported_error(qual(n), mname, module, f"the {type(rule).__name__} rule does not cover '{n}'")
                trainable.setdefault(p, qual(n))
            rule.validate(module, mname)
            to_patch[id(module)] = (module, rule)

        extra = [
            p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad and p not in trainable
        ]
        if extra:
            raise UnsupportedModuleError(
                f"The optimizer holds {len(extra)} trainable parameter(s) (first shape {tuple(extra[0].shape)}) that "
                "are not parameters of the model's supported layers; their gradients would not be clipped. Pass "
                "the optimizer only model.parameters(), or freeze those parameters."
            )
        self._names = trainable
        # FSDP2 (fully_shard): layers record FSDP's unsharded parameters; reduce-scatter and shard noise there.
        self._fsdp = fsdp.attach(self.model, trainable, self._untracked_gradient, self.distributed)
        if self._fsdp is not None:
            self._handles.append(self._fsdp)
        # Every parameter of the model by name (frozen ones too), for errors about parameters the engine
        # does not clip; and, per clipped parameter, the .grad the engine last wrote (see _check_grad).
        self._all_names: dict[nn.Parameter, str] = {}
        for n, p in self.model.named_parameters(remove_duplicate=False):
            self._all_names.setdefault(p, n)
        self._written: dict[nn.Parameter, tuple[weakref.ref, int]] = {}
        # impl of each parameter's step noise, resolved once here (kernels.resolve_impl raises now if "triton"
        # cannot run on it); keyed by the model's own parameters and never added to later (see _noise_impl).
        # Norms and clipped sums resolve per use: they depend on the activations' dtype.
        self._noise_impls: Mapping[nn.Parameter, str] = MappingProxyType({
            p: kernels.resolve_impl(self.impl, p, op="PrivacyEngine noise", kernel_dtypes=TWIN_DTYPES) for p in trainable
        })
        for module, rule in to_patch.values():
            if "forward" in module.__dict__:
                raise RuntimeError(
                    f"Module {type(module).__name__} already has a patched forward (another PrivacyEngine "
                    "attached?). Call detach() on the other engine first."
                )
            module.forward = partial(self._dp_forward, module, rule)
            self._patched.append(module)
        for p, name in trainable.items():
            self._handles.append(p.register_post_accumulate_grad_hook(partial(self._untracked_gradient, name)))
        self._handles.append(self.optimizer.register_step_pre_hook(self._before_step))
        self._handles.append(self.model.register_forward_pre_hook(self._model_pre_forward, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._model_post_forward, always_call=True))
        self._handles.append(self._register_global_step_hook())
        self._handles.extend(attach_prompt_tuning(self.model))  # PEFT prompt tuning: one row per example
        log.info(
            "ghostdp attached: %d trainable tensors (%d elements) in %d layers, clipping=%s",
            len(trainable), sum(p.numel() for p in trainable), len(self._patched), self.clipping,
        )

    def detach(self) -> None:
        """Restore the model's forwards and the optimizer; the engine stops clipping."""
        for module in self._patched:
            module.__dict__.pop("forward", None)
        for h in self._handles:
            h.remove()
        self._patched, self._handles = [], []

    def _model_pre_forward(self, model, args, kwargs):
        """Count the examples of a grad-enabled model forward from its inputs (independently of the layers)."""
        self._model_depth += 1
        if self._model_depth == 1 and torch.is_grad_enabled():
            found = _model_batch(args, kwargs)
            self._forward = None if found is None else _ForwardInfo(*found)
            self._forward_recorder = Recorder(partial(self._record, self._forward), self._anchor)

    def _model_post_forward(self, model, args, output):
        self._model_depth = max(0, self._model_depth - 1)

    def _dp_forward(self, module: nn.Module, rule, *args, **kwargs):
        if not torch.is_grad_enabled() or not any(p.requires_grad for p in module.parameters(recurse=False)):
            return type(module).forward(module, *args, **kwargs)
        # Inside a model call, or recomputing one of its layers in backward (activation checkpointing): the
        # layer belongs to the latest model forward. A layer called on its own has no model count.
        in_model = self._model_depth > 0 or torch._C._current_graph_task_id() != -1
        info = self._forward if in_model else None
        record = self._forward_recorder if in_model else self._recorder
        if info is not None:
            args, kwargs = self._check_examples_leading(module, rule, info, args, kwargs)
        return rule.forward(module, record, *args, **kwargs)

    def _check_examples_leading(self, module, rule, info: _ForwardInfo, args, kwargs):
        """The layer's input must have the model's examples as its leading dimension, or be handled exactly.

        An input with leading dimension 1 while the model has B > 1 examples is shared by the batch and
        broadcast (BERT's position ids (1, T)): autograd would sum its gradient over the examples before the
        engine could clip it. Layers whose rule says so (embeddings) expand such an input to B rows, which is
        exact: the output is then the broadcast value itself, and example i's gradient is the one-hot sum with
        its own g_i. Any other leading dimension means the layer does not see one example per row (sequence
        first, tokens flattened across examples, a shared input): refused.
        """
        first = _first_tensor(args, kwargs)
        if first is None or first[1].dim() == 0 or first[1].shape[0] == info.batch:
            return args, kwargs
        key, x = first
        lead = x.shape[0]
        name = self._layer_name(module)
        if lead == 1 and rule.expands_broadcast_input:
            x = x.expand(info.batch, *x.shape[1:])
            log.debug("ghostdp: layer '%s' input of shape (1, ...) expanded to the model's %d examples", name, info.batch)
            if isinstance(key, int):
                return args[:key] + (x,) + args[key + 1:], kwargs
            return args, {**kwargs, key: x}
        what = (
            "is shared by the whole batch and broadcast (e.g. position ids of shape (1, T)), so autograd sums its "
            "gradient over the examples before the engine can clip it per example"
            if lead == 1 else
            "does not have one example per row (a sequence-first layout, tokens flattened across examples, or an "
            "input shared by the batch), so its per-example gradients would be clipped per some other unit"
        )
        raise BatchMismatchError(
            f"Layer '{name}' ({type(module).__name__}) got an input of shape {tuple(x.shape)} whose leading dimension "
            f"{lead} is not the model's {info.batch} examples (counted from the model input {info.source}). That "
            f"input {what}, which voids the DP guarantee. Fix: pass per-example inputs with the batch first (e.g. "
            "position_ids expanded to (B, T)), keep examples on dim 0 inside the model, or freeze this layer."
        )

    def _layer_name(self, module: nn.Module) -> str:
        for n, p in module.named_parameters(recurse=False):
            name = self._all_names.get(p)
            if name is not None:
                return name.rsplit(".", 1)[0] if "." in name else "<root>"
        return type(module).__name__

    @staticmethod
    def _untracked_gradient(name: str, param: torch.Tensor) -> None:
        raise UnsupportedModuleError(
            f"Parameter '{name}' received a gradient from autograd, so it is used outside the forward of the "
            "layer ghostdp clips (e.g. functionally, `x @ module.weight`). That gradient would be unclipped and "
            "break the DP guarantee. Use the module itself, or freeze the parameter."
        )

    # ------------------------------------------------------------------ which gradients the engine wrote
    def _param_name(self, p: torch.Tensor) -> str:
        return self._names.get(p) or self._all_names.get(p) or f"<tensor of shape {tuple(p.shape)} outside the model>"

    def _mark_written(self, p: nn.Parameter) -> None:
        """Remember ``p.grad`` as the engine left it: the same tensor object at the same version counter."""
        self._written[p] = (weakref.ref(p.grad), p.grad._version)

    def _engine_wrote(self, p: nn.Parameter) -> bool:
        token = self._written.get(p)
        return token is not None and token[0]() is p.grad and p.grad._version == token[1]

    def _check_grad(self, p: nn.Parameter, when: str) -> None:
        """Raise unless ``p.grad`` is None, is exactly what the engine last wrote, or is all zeros.

        The engine's layers pass parameters into autograd detached, so autograd itself never writes a
        clipped parameter's ``.grad``: any other ``.grad`` came from outside the engine. A tensor object
        or in-place version counter that differs from the engine's last write means it was replaced or
        changed (by hand, a hook of another library, an in-place clip or scaler) or predates attach. A
        gradient of zeros carries no data (``zero_grad(set_to_none=False)``) and is accepted. Not seen:
        writes through ``.grad.data``, which bypass the version counter.
        """
        if p.grad is None or self._engine_wrote(p):
            return
        if not bool(p.grad.any()):
            return
        origin = (
            "it was there before the engine ever wrote it (a gradient left from a backward before the "
            "PrivacyEngine attached, or one assigned by hand or by another library's hook)"
            if p not in self._written else
            "it was replaced or changed in place after the engine wrote it (by hand, by a hook of another "
            "library, by gradient clipping or a loss scaler's unscale_)"
        )
        raise UnclippedGradientError(
            f"Parameter '{self._param_name(p)}' has a .grad that the engine did not produce ({when}): {origin}. "
            "The optimizer would apply a gradient that was not clipped per example and noised, which voids the "
            "DP guarantee. Call optimizer.zero_grad(set_to_none=True) before the first backward, and leave "
            ".grad to the engine between backward and optimizer.step()."
        )

    def _refuse_unclipped_model_grad(self, p: torch.Tensor, when: str) -> None:
        """A parameter of the attached model that the engine does not clip holds a gradient."""
        why = ("it was frozen when the engine attached and its requires_grad was turned on afterwards, so "
               "autograd wrote its raw batch gradient" if p.requires_grad else
               "it is frozen, yet has a .grad (written by hand or by another library's hook)")
        raise UnclippedGradientError(
            f"Parameter '{self._param_name(p)}' of the model the PrivacyEngine is attached to has a gradient the "
            f"engine did not produce ({when}): {why}. Any optimizer stepping it would apply a gradient that is "
            "neither clipped per example nor noised, which voids the DP guarantee. Decide which parameters train "
            "before creating the PrivacyEngine (detach() it and attach a new one after changing requires_grad), "
            "or freeze the parameter again and set its .grad to None."
        )

    def _register_global_step_hook(self):
        """A pre-hook on every optimizer's step that holds the engine weakly (and goes when the engine does)."""
        method = weakref.WeakMethod(self._before_any_step)

        def hook(optimizer, args, kwargs):
            bound = method()
            if bound is not None:
                bound(optimizer, args, kwargs)

        handle = register_optimizer_step_pre_hook(hook)
        weakref.finalize(self, handle.remove)
        return handle

    def _before_any_step(self, optimizer, args, kwargs) -> None:
        """Global optimizer pre-hook: refuse a second optimizer stepping a parameter the engine clips."""
        if optimizer is self.optimizer or getattr(optimizer, "optimizer", None) is self.optimizer:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and p not in self._names and p in self._all_names:
                    self._refuse_unclipped_model_grad(p, f"{type(optimizer).__name__}.step()")
                if p.grad is not None and p in self._names:
                    raise UnclippedGradientError(
                        f"Parameter '{self._param_name(p)}' is clipped by a PrivacyEngine, but "
                        f"{type(optimizer).__name__} (not the optimizer the engine was attached to) is stepping "
                        "it. Only the engine's optimizer adds the noise, so this step would apply an un-noised "
                        "clipped sum (or apply a released gradient twice) and void the DP guarantee. Put every "
                        "parameter in the engine's optimizer (param groups can hold different learning rates), "
                        "or freeze the parameter before attaching the engine."
                    )

    def _check_step(self, optimizer, args, kwargs) -> None:
        """Before the engine's optimizer steps: every parameter it would change has an engine gradient."""
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0] is the optimizer
        if closure is not None:
            raise UnclippedGradientError(
                f"{type(optimizer).__name__}.step() got a closure: it would run backward inside the step, after "
                "the engine added the noise, and apply un-noised clipped gradients. Run the backward before "
                "optimizer.step() and call it without a closure (closure-based optimizers such as LBFGS, which "
                "re-evaluate the loss several times per step, are not supported)."
            )
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue  # torch optimizers leave a parameter without a gradient unchanged
                if p not in self._names:
                    if p in self._all_names:  # a model parameter the engine does not clip
                        self._refuse_unclipped_model_grad(p, f"{type(optimizer).__name__}.step()")
                    why = ("it is not a parameter of the model the engine was attached to (added to the "
                           "optimizer after attach, e.g. with add_param_group, or a tensor from elsewhere)")
                    raise UnclippedGradientError(
                        f"Parameter '{self._param_name(p)}' would be stepped by the engine's optimizer, but the "
                        f"engine does not clip it: {why}. That gradient is neither clipped per example nor noised, "
                        "which voids the DP guarantee. Decide which parameters train before creating the "
                        "PrivacyEngine (detach() and attach a new engine after changing requires_grad or the "
                        "param groups), or set this parameter's .grad to None."
                    )
                self._check_grad(p, "at optimizer.step()")

    # ------------------------------------------------------------------ backward book-keeping
    def _record(self, forward: _ForwardInfo | None, param: nn.Parameter, grad: PerExampleGrad) -> None:
        """Called from layers' backward with one use's per-example gradient of ``param`` (from ``forward``)."""
        if self._fsdp is not None:
            param = self._fsdp.sharded(param)  # FSDP2: key by the sharded parameter the optimizer steps
        if param not in self._names:
            raise UnclippedGradientError(
                f"Parameter '{self._param_name(param)}' was frozen when the PrivacyEngine attached and has "
                "requires_grad=True now, so the engine holds no clipping and noise plan for it and the optimizer "
                "may not even hold it. Set requires_grad before creating the PrivacyEngine (detach() it and attach "
                "a new one after unfreezing), or freeze the parameter again."
            )
        ctx = self._ctx
        if ctx.batch_size is None:
            ctx.batch_size, ctx.forward = grad.batch, forward
        elif forward is not None and ctx.forward is not None and forward is not ctx.forward:
            raise BatchMismatchError(
                "One backward pass reached the layers of two different forward calls of the model (e.g. the sum "
                "of two batches' losses). Their examples would be paired by position and clipped together as one "
                "example. Call backward once per forward (gradients accumulate across backward passes)."
            )
        if grad.batch != ctx.batch_size or (forward is not None and grad.batch != forward.batch):
            expected = ctx.batch_size if forward is None else forward.batch
            raise BatchMismatchError(
                f"Parameter '{self._param_name(param)}' got per-example gradients for {grad.batch} examples in a "
                f"backward pass over {expected}. ghostdp needs dim 0 to be the batch for every clipped layer, and "
                "one physical batch per backward; otherwise examples would be clipped per some other unit."
            )
        if self.clipping != "ghost" and grad.dense_elements <= grad.kept_elements:
            grad = Dense(grad.dense())  # smaller than its factors: keep per-example gradients (LoRA, r < T)
        ctx.uses.setdefault(param, []).append(grad)
        if not ctx.finalize_queued:
            ctx.finalize_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finalize)

    def _finalize(self) -> None:
        """End of one backward: per-example norms, clip factors, clipped sums into param.grad."""
        ctx, self._ctx = self._ctx, _BackwardContext()
        if not ctx.uses:
            return
        norms, factors = self._clip_factors(ctx)
        for p in ctx.uses:
            self._check_grad(p, "before the engine added this backward's clipped sum to it")
        for p in self._all_names:  # autograd wrote a parameter the engine does not clip (unfrozen after attach)
            if p.grad is not None and p.requires_grad and p not in self._names:
                self._refuse_unclipped_model_grad(p, "at the end of backward")
        if self._fsdp is not None:  # FSDP2: every parameter's clipped sum is reduce-scattered to its shards
            # add_clipped_sums pops each parameter's pieces once reduced, so the book-keeping shrinks while the
            # layer-sized buffers come and go (nothing else here holds the pieces: see _clip_factors).
            self._fsdp.add_clipped_sums(ctx.uses, factors, self._impl_for, self._mark_written)
            ctx.uses = {}
        for p, uses in ctx.uses.items():
            # A parameter without a gradient gets a fresh one that its first use writes (no zero-fill and
            # add); later uses, and later physical batches of the step, accumulate into it.
            accumulate = p.grad is not None
            if not accumulate:
                p.grad = torch.empty_like(p, memory_format=torch.contiguous_format)
            for u in uses:
                u.add_clipped_sum_(factors.to(u.device()), p.grad, self._impl_for(u), accumulate=accumulate)
                accumulate = True
            self._mark_written(p)
        self.per_sample_norms = norms

    def _clip_factors(self, ctx: _BackwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(norms, factors), each (B,): the per-example gradient norms over every clipped parameter and the
        clip factors c_i (times B under loss_reduction="mean"). A function of its own, so the references to
        per-example pieces it takes while grouping them are gone when it returns (FSDP2 frees the pieces
        parameter by parameter afterwards)."""
        B = ctx.batch_size
        scale = float(B) if self.loss_reduction == "mean" else 1.0
        first = next(iter(ctx.uses.values()))[0]
        dtype = torch.float64 if any(compute_dtype(p) == torch.float64 for p in ctx.uses) else torch.float32
        device = first.device()
        norm2 = torch.zeros(B, dtype=dtype, device=device)
        shared = self.clipping == "per_sample"
        same_input: dict[tuple, list[Factored]] = {}  # ghost norms of layers that read one input
        for uses in ctx.uses.values():
            resolved = self._resolved_impl(uses[0])
            method = _norm_method(uses[0], self.clipping, resolved)
            if len(uses) == 1 and method == "ghost" and resolved == "torch" and isinstance(uses[0], Factored):
                same_input.setdefault(_input_key(uses[0].a), []).append(uses[0])
                continue
            norm2 += summed_norm2(uses, method, shared, self._kernel_impl(resolved)).to(device, dtype)
        for group in same_input.values():  # q/k/v, gate/up: the twin forms the input's Gram once
            for n2 in kernels.linear_norm2_ghost_shared(group[0].a, [u.g for u in group], impl="torch"):
                norm2 += n2.to(device, dtype)
        norms = norm2.sqrt() * scale
        factors = (self.max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0) * scale  # c_i, times the "mean" undo
        return norms, factors

    def _resolved_impl(self, grad: PerExampleGrad) -> str:
        """"triton" or "torch" for this use. Kernels serve linear weights (``Factored``); the other forms
        are small and run in PyTorch."""
        if not isinstance(grad, Factored):
            return "torch"
        return kernels.resolve_impl(self.impl, grad.a, grad.g, op="PrivacyEngine")

    def _kernel_impl(self, resolved: str) -> str:
        """What the kernels are called with once ``resolved`` is known: "torch" for the twins, else the
        engine's own ``impl``. So ``impl="auto"`` reaches the kernels as "auto" and a kernel that fails to
        compile or launch falls back to its twin with one ``KernelFallbackWarning`` (``kernels.dispatch.
        run_kernel``), while ``impl="triton"`` raises. The kernels resolve "auto" from the same tensors, so
        they pick what the engine resolved."""
        return "torch" if resolved == "torch" else self.impl

    def _impl_for(self, grad: PerExampleGrad) -> str:
        """The ``impl`` this use's kernels are called with (see :meth:`_kernel_impl`)."""
        return self._kernel_impl(self._resolved_impl(grad))

    # ------------------------------------------------------------------ optimizer step
    def _noise_generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        return self.generator

    def _noise_impl(self, p: torch.Tensor) -> str:
        """The ``impl`` ``add_noise_`` gets for ``p``: resolved once at attach (``self._noise_impls``), passed
        down as :meth:`_kernel_impl` says (so "auto" keeps its fallback).

        The cache holds the model's trainable parameters only, filled at attach and never after: any other
        tensor (a gradient, a shard's local view) is resolved on each call and not stored. A cache keyed by
        such tensors would keep one of them alive per call, i.e. every step's gradient (under FSDP2, one
        sharded model per step)."""
        resolved = self._noise_impls.get(p)
        if resolved is None:
            resolved = kernels.resolve_impl(self.impl, p, op="PrivacyEngine noise", kernel_dtypes=TWIN_DTYPES)
        return self._kernel_impl(resolved)

    def _world_size(self) -> int:
        import torch.distributed as dist

        active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self.distributed and not active:
            raise RuntimeError("distributed=True but no torch.distributed process group with >1 rank is initialised")
        return dist.get_world_size() if active and self.distributed is not False else 1

    def _before_step(self, optimizer, args, kwargs) -> None:
        """grad = (clipped sum [all-reduced] + N(0, sigma^2 C^2 I), once) / expected_batch_size, in fp32+."""
        import torch.distributed as dist

        self._check_step(optimizer, args, kwargs)
        std = self.noise_multiplier * self.max_grad_norm
        world = self._world_size()
        noise_here = std > 0 and (world == 1 or dist.get_rank() == 0)
        # Every parameter this step changes gets noise: trainable ones (zeros + noise when a batch was empty)
        # and any with a gradient (one frozen after the engine wrote its clipped sum).
        in_optimizer = {
            p for group in optimizer.param_groups for p in group["params"] if p.requires_grad or p.grad is not None
        }
        params = [p for p in self._names if p in in_optimizer]  # model order: noise independent of groups
        if self._fsdp is not None:  # FSDP2: each rank noises and scales the shards it owns, nothing to reduce
            self._fsdp.noise_and_scale(params, std, self.expected_batch_size, self._noise_generator, self._noise_impl)
            for p in params:
                self._mark_written(p)
            params = []
        # One noise path (ghostdp.kernels.add_noise_), both implementations: the parameter with model index k
        # gets the stream noise_seed(base_seed, k), base_seed drawn once per step from the engine's generator
        # (Philox in the Triton kernel, a torch.Generator seeded with it in the twin). The sum and the noise
        # are computed in fp32 (fp64 for fp64 gradients) and rounded once into p.grad.
        base_seed = None
        if noise_here and params:
            gen = self._noise_generator(params[0].device)
            base_seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device))
        scale = 1.0 / self.expected_batch_size
        for index, p in enumerate(params):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            seed = kernels.noise_seed(base_seed, index) if noise_here else None
            kernels.add_noise_(p.grad, noise_std=std if noise_here else 0.0, seed=seed,
                               scale=scale if world == 1 else 1.0, impl=self._noise_impl(p))
            if world > 1:
                dist.all_reduce(p.grad)
                p.grad.mul_(scale)
            self._mark_written(p)
        self.steps += 1
        if self.sample_rate is not None:
            self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    # ------------------------------------------------------------------ accounting and state
    def epsilon(self, delta: float, accountant: Literal["prv", "rdp"] = "prv") -> float:
        """Privacy spent so far, as the upper bound on epsilon at ``delta`` (needs ``sample_rate``)."""
        if self.sample_rate is None:
            raise ValueError(
                "epsilon needs the Poisson sampling rate: pass sample_rate= to PrivacyEngine (the rate your "
                "PoissonBatchSampler uses, expected_batch_size / dataset size)."
            )
        if self.steps == 0:
            return 0.0
        return self.accountant.epsilon(delta, accountant=accountant)

    def state_dict(self) -> dict:
        """Steps, the accountant's ledger and the noise generator's state, tagged ``version`` = STATE_VERSION.

        Version 2 draws every parameter's step noise through ``ghostdp.kernels.add_noise_`` from
        ``noise_seed(base_seed, index)``; version 1 (no ``version`` key) drew the twin's noise straight from
        the generator. Both load; a version-1 checkpoint continues the same generator state, with the
        version-2 stream from there on.
        """
        gen = self.generator
        return {
            "version": STATE_VERSION,
            "steps": self.steps,
            "accountant": self.accountant.state_dict(),
            "generator_state": None if gen is None else gen.get_state(),
            "generator_device": None if gen is None else str(gen.device),
        }

    def load_state_dict(self, state: dict) -> None:
        version = state.get("version", 1)
        if version not in (1, STATE_VERSION):
            raise ValueError(
                f"PrivacyEngine state version {version!r} is newer than this ghostdp understands (<= {STATE_VERSION}); "
                "upgrade ghostdp to resume from it."
            )
        if version == 1:
            log.info("Loading a version-1 PrivacyEngine state: the noise continues from its generator state, drawn "
                     "through the version-2 path (kernels.add_noise_ per parameter), so not the v1 stream.")
        self.steps = int(state["steps"])
        self.accountant.load_state_dict(state["accountant"])
        if state.get("generator_state") is not None:
            gen = torch.Generator(device=state["generator_device"])
            gen.set_state(state["generator_state"])
            self.generator = gen
