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

``loss_reduction="mean"`` means the loss handed to backward is ``(1/b) sum_i L_i`` over the b examples of
the physical batch: the engine multiplies by b to recover each ``g_i = grad L_i``. Each ``L_i`` must
depend on example i alone (e.g. the mean over its own target tokens), never on a batch token count.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from functools import partial
from numbers import Real
from typing import Literal

import torch
from torch import nn

from ghostdp import kernels
from ghostdp.engine.errors import BatchMismatchError, UnsupportedModuleError
from ghostdp.engine.grads import Dense, Factored, PerExampleGrad, compute_dtype, summed_norm2
from ghostdp.engine.layers import sampler_for
from ghostdp.engine.layers.lora import check_peft_model
from ghostdp.engine.layers.registry import Recorder, unsupported_error

log = logging.getLogger(__name__)

Clipping = Literal["auto", "ghost", "per_sample"]
CLIP_EPS = 1e-6


@dataclass
class _BackwardContext:
    """What one backward pass (one physical batch) records: the per-example gradients of each use."""

    uses: dict[nn.Parameter, list[PerExampleGrad]] = field(default_factory=dict)
    batch_size: int | None = None
    finalize_queued: bool = False


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
        return "instantiate"
    B, T = grad.U.shape[:2]
    p, d = grad.shape
    ghost = kernels.norm_cost(B, T, d, p, "ghost", impl).flops
    inst = kernels.norm_cost(B, T, d, p, "instantiated", impl).flops
    return "ghost" if ghost < inst else "instantiate"


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
            "sum" if it is their sum.
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
            when it is importable, else the twins).
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
        self._recorder = Recorder(self._record, torch.zeros((), requires_grad=True))
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
        check_peft_model(self.model)
        trainable: dict[nn.Parameter, str] = {}
        to_patch: dict[int, tuple[nn.Module, object]] = {}
        for mname, module in self.model.named_modules(remove_duplicate=False):
            owned = [(n, p) for n, p in module._parameters.items() if p is not None and p.requires_grad]
            if not owned:
                continue
            sampler = sampler_for(module)
            qual = lambda n: f"{mname}.{n}" if mname else n  # noqa: E731
            if sampler is None:
                raise unsupported_error(qual(owned[0][0]), mname, module)
            for n, p in owned:
                if n not in sampler.param_names:
                    raise unsupported_error(qual(n), mname, module, f"the {type(sampler).__name__} rule does not cover '{n}'")
                trainable.setdefault(p, qual(n))
            sampler.validate(module, mname)
            to_patch[id(module)] = (module, sampler)

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
        for module, sampler in to_patch.values():
            if "forward" in module.__dict__:
                raise RuntimeError(
                    f"Module {type(module).__name__} already has a patched forward (another PrivacyEngine "
                    "attached?). Call detach() on the other engine first."
                )
            module.forward = partial(self._dp_forward, module, sampler)
            self._patched.append(module)
        for p, name in trainable.items():
            self._handles.append(p.register_post_accumulate_grad_hook(partial(self._untracked_gradient, name)))
        self._handles.append(self.optimizer.register_step_pre_hook(self._before_step))
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

    def _dp_forward(self, module: nn.Module, sampler, *args, **kwargs):
        if not torch.is_grad_enabled() or not any(p.requires_grad for p in module.parameters(recurse=False)):
            return type(module).forward(module, *args, **kwargs)
        return sampler.forward(module, self._recorder, *args, **kwargs)

    @staticmethod
    def _untracked_gradient(name: str, param: torch.Tensor) -> None:
        raise UnsupportedModuleError(
            f"Parameter '{name}' received a gradient from autograd, so it is used outside the forward of the "
            "layer ghostdp clips (e.g. functionally, `x @ module.weight`). That gradient would be unclipped and "
            "break the DP guarantee. Use the module itself, or freeze the parameter."
        )

    # ------------------------------------------------------------------ backward book-keeping
    def _record(self, param: nn.Parameter, grad: PerExampleGrad) -> None:
        """Called from layers' backward with one use's per-example gradient of ``param``."""
        ctx = self._ctx
        if ctx.batch_size is None:
            ctx.batch_size = grad.batch
        elif grad.batch != ctx.batch_size:
            raise BatchMismatchError(
                f"Layers saw batch sizes {ctx.batch_size} and {grad.batch} in one backward pass. ghostdp needs "
                "dim 0 to be the batch for every clipped layer, and one physical batch per backward."
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
        B = ctx.batch_size
        scale = float(B) if self.loss_reduction == "mean" else 1.0
        first = next(iter(ctx.uses.values()))[0]
        dtype = torch.float64 if any(compute_dtype(p) == torch.float64 for p in ctx.uses) else torch.float32
        device = first.device()
        norm2 = torch.zeros(B, dtype=dtype, device=device)
        shared = self.clipping == "per_sample"
        for uses in ctx.uses.values():
            impl = self._impl_for(uses[0])
            method = _norm_method(uses[0], self.clipping, impl)
            norm2 += summed_norm2(uses, method, shared, impl).to(device, dtype)
        norms = norm2.sqrt() * scale
        factors = (self.max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0) * scale  # c_i, times the "mean" undo
        for p, uses in ctx.uses.items():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            for u in uses:
                u.add_clipped_sum_(factors.to(u.device()), p.grad, self._impl_for(u))
        self.per_sample_norms = norms

    def _impl_for(self, grad: PerExampleGrad) -> str:
        """Kernels serve linear weights (``Factored``); the other forms are small and run in PyTorch."""
        if not isinstance(grad, Factored):
            return "torch"
        return kernels.resolve_impl(self.impl, grad.V, grad.U, op="PrivacyEngine")

    # ------------------------------------------------------------------ optimizer step
    def _noise_generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        return self.generator

    def _noise_impl(self, p: torch.Tensor) -> str:
        return kernels.resolve_impl(self.impl, p, op="PrivacyEngine noise")

    def _world_size(self) -> int:
        import torch.distributed as dist

        active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self.distributed and not active:
            raise RuntimeError("distributed=True but no torch.distributed process group with >1 rank is initialised")
        return dist.get_world_size() if active and self.distributed is not False else 1

    def _before_step(self, optimizer, args, kwargs) -> None:
        """grad = (clipped sum [all-reduced] + N(0, sigma^2 C^2 I), once) / expected_batch_size, in fp32+."""
        import torch.distributed as dist

        std = self.noise_multiplier * self.max_grad_norm
        world = self._world_size()
        noise_here = std > 0 and (world == 1 or dist.get_rank() == 0)
        in_optimizer = {p for group in optimizer.param_groups for p in group["params"] if p.requires_grad}
        params = [p for p in self._names if p in in_optimizer]  # model order: noise independent of groups
        base_seed = None
        for index, p in enumerate(params):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if self._noise_impl(p) == "triton":
                # In-kernel Philox noise, keyed by (a per-step seed drawn from the generator, parameter):
                # no parameter-sized noise tensor; computed in fp32, rounded once into p.grad.
                if base_seed is None:
                    gen = self._noise_generator(p.device)
                    base_seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device))
                if noise_here:
                    kernels.add_noise_(p.grad, noise_std=std, seed=kernels.noise_seed(base_seed, index), impl="triton")
                if world > 1:
                    dist.all_reduce(p.grad)
                p.grad.div_(self.expected_batch_size)
                continue
            dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            g = p.grad.to(dtype)  # no copy for fp32/fp64 gradients: updated in place below
            if noise_here:
                gen = self._noise_generator(p.device)
                z = torch.randn(p.shape, generator=gen, dtype=dtype, device=gen.device)
                g.add_(z.to(p.device), alpha=std)
            if world > 1:
                dist.all_reduce(g)
            g.div_(self.expected_batch_size)
            if g is not p.grad:
                p.grad = g.to(p.dtype)
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
        gen = self.generator
        return {
            "steps": self.steps,
            "accountant": self.accountant.state_dict(),
            "generator_state": None if gen is None else gen.get_state(),
            "generator_device": None if gen is None else str(gen.device),
        }

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.accountant.load_state_dict(state["accountant"])
        if state.get("generator_state") is not None:
            gen = torch.Generator(device=state["generator_device"])
            gen.set_state(state["generator_state"])
            self.generator = gen
