"""DP-SGD on a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

What changes against one device, and why the result is the same step:

* **Norms are local and exact.** FSDP2 all-gathers a block's weights before its forward and again
  before its backward, so each rank runs every layer in full on its own examples and its layers'
  backward hand the engine the per-example pieces of the *whole* (unsharded) weight. The per-example
  norm over all trainable parameters therefore needs no communication: example i lives on one rank.
  The layers' Functions keep only activations and output gradients (and the module, to read the
  weight FSDP re-gathers for backward); the weight FSDP frees after forward is never read.
* **Clipped sums reach the shard owners.** At the end of each backward (after FSDP's own end-of-backward
  callback has resharded everything), for one parameter at a time, smallest first (the same order on every
  rank; each parameter's per-example pieces are freed once it is reduced): the clipped sum
  ``sum_i c_i G_i`` over this rank's examples is formed in one zero-padded, layer-sized buffer
  (compute dtype), reduce-scattered (sum) over the shard group, and this rank's rows are added to the
  sharded parameter's ``.grad`` (a DTensor). Never more than one unsharded parameter's buffer at once.
* **Noise per shard.** At ``optimizer.step()`` each rank adds ``N(0, sigma^2 C^2)`` to the coordinates
  of its own shards only (each coordinate is owned by exactly one rank, so it is noised exactly
  once), then divides by the global expected batch size. Every (step, rank, parameter) draws from its
  own stream, ``noise_seed(base, "fsdp2", rank, index)``, where ``base`` comes from the engine's
  generator: runs reproduce from a seed, and ranks seeded alike still draw independent noise.
* **Checks.** A parameter used outside its clipped layer would get an autograd gradient on FSDP's
  unsharded parameter, which FSDP would reduce-scatter into the sharded ``.grad`` unclipped: hooks on
  the unsharded parameters (registered once FSDP creates them, after a forward) refuse that.

Supported: every trainable parameter managed by ``fully_shard`` on a 1-D mesh with the default
``Shard(0)`` placement; tied parameters; frozen and trainable parameters in one group (LoRA); gradient
checkpointing; ``reshard_after_forward``; a ``MixedPrecisionPolicy`` (layers run in its ``param_dtype``;
clipped sums are reduced in fp32, fp64 for fp64 shards, whatever its ``reduce_dtype``; shards and their
gradients keep their dtype).
Refused with the reason: the FSDP1 ``FullyShardedDataParallel`` wrapper, CPU offload, HSDP / 2-D meshes,
tensor-parallel DTensor parameters, custom shard placements, trainable parameters left outside
``fully_shard``.

Every rank must run the same number of backward passes per step (FSDP requires that too): each one
ends with one reduce-scatter per trainable parameter.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from ghostdp import kernels
from ghostdp.engine.errors import UnsupportedModuleError
from ghostdp.engine.grads import PerExampleGrad

log = logging.getLogger(__name__)

_WAYS_OUT = (
    "Use FSDP2 as `for block in model.model.layers: fully_shard(block)` then `fully_shard(model)` with its "
    "defaults (1-D mesh, no CPU offload), or train data-parallel without sharding "
    "(ghostdp all-reduces clipped sums itself; do not wrap the model)."
)


def _fsdp2():
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # torch without FSDP2
        return None
    return FSDPModule, DTensor, Shard


def refuse_fsdp1(model: nn.Module) -> None:
    """The FSDP1 wrapper flattens parameters into FlatParameters and reduces in its own hooks: refuse."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise TypeError(
            "The model is wrapped in FSDP1 (FullyShardedDataParallel). ghostdp cannot clip it: FSDP1 flattens "
            "the parameters of a wrapped unit into one FlatParameter and reduce-scatters gradients in hooks "
            "that would carry unclipped per-batch gradients. Shard with FSDP2 instead "
            "(torch.distributed.fsdp.fully_shard) and attach the PrivacyEngine after sharding. " + _WAYS_OUT
        )


def _fsdp_params(model: nn.Module) -> list:
    """All FSDPParam objects under ``model`` (torch's FSDP2 internals, tested with torch 2.13)."""
    FSDPModule = _fsdp2()[0]
    out, seen = [], set()
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        try:
            group = module._get_fsdp_state()._fsdp_param_group
        except AttributeError as e:  # pragma: no cover - another torch version's internals
            raise RuntimeError(
                f"ghostdp reads FSDP2's per-parameter state (FSDPState._fsdp_param_group), which this torch "
                f"({torch.__version__}) does not have; FSDP2 support is tested with torch 2.13."
            ) from e
        for fp in [] if group is None else group.fsdp_params:
            if id(fp) not in seen:
                seen.add(id(fp))
                out.append(fp)
    return out


def _sum_dtype(sharded: torch.Tensor) -> torch.dtype:
    """Clipped sums are formed and reduced in fp32, or fp64 for fp64 shards (whatever FSDP gathers in)."""
    return torch.float64 if sharded.dtype == torch.float64 else torch.float32


def is_fsdp2(model: nn.Module) -> bool:
    """True if any submodule was passed to ``fully_shard`` or any parameter is a DTensor."""
    api = _fsdp2()
    if api is None:
        return False
    FSDPModule, DTensor, _ = api
    return any(isinstance(m, FSDPModule) for m in model.modules()) or any(
        isinstance(p, DTensor) for p in model.parameters()
    )


class FSDP2Sharding:
    """The engine's FSDP2 side: parameter bookkeeping, the end-of-backward reduce-scatter, shard noise.

    Built by :func:`attach`; the engine keeps it in its handle list, so ``remove()`` runs on ``detach()``.
    """

    def __init__(self, model: nn.Module, names: dict[nn.Parameter, str], on_untracked: Callable):
        Shard = _fsdp2()[2]
        by_sharded = {fp.sharded_param: fp for fp in _fsdp_params(model)}
        outside = [name for p, name in names.items() if p not in by_sharded]
        if outside:
            raise UnsupportedModuleError(
                f"Under FSDP2 every trainable parameter must be managed by fully_shard, but {len(outside)} are "
                f"not (first: '{outside[0]}'). Call fully_shard on the root model too (it takes the parameters "
                "no inner fully_shard took), or freeze them."
            )
        self._params = []  # FSDPParam of each trainable parameter, in model order (the collective order)
        for p, name in names.items():
            fp = by_sharded[p]
            reason = None
            mesh = p.device_mesh
            if fp.offload_to_cpu:
                reason = ("CPU offload (offload_policy=CPUOffloadPolicy()) is not supported: the clipped sums "
                          "and the noise are added to the gradient on the compute device")
            elif mesh.ndim != 1:
                reason = f"a {mesh.ndim}-D device mesh (HSDP or tensor parallel) is not supported, only a 1-D mesh"
            elif getattr(fp, "is_dtensor", False):
                reason = "the parameter was a DTensor before fully_shard (tensor parallel), which is not supported"
            elif tuple(p.placements) != (Shard(0),):
                reason = f"placement {tuple(p.placements)} is not supported, only the default Shard(0)"
            if reason:
                raise UnsupportedModuleError(f"FSDP2 parameter '{name}': {reason}. {_WAYS_OUT}")
            self._params.append((fp, name))
        # Order of the end-of-backward reduce-scatters (the same on every rank: it depends on shapes only):
        # smallest unsharded parameter first, so the book-keeping of the blocks (popped as they are reduced)
        # is gone before the largest buffers (embedding, LM head) are formed.
        self._reduce_order = sorted(self._params, key=lambda item: item[0].sharded_param.numel())
        ignored = {str(fp.mp_policy.reduce_dtype) for fp, _ in self._params
                   if fp.mp_policy.reduce_dtype not in (None, _sum_dtype(fp.sharded_param))}
        if ignored:
            log.info("FSDP2 MixedPrecisionPolicy reduce_dtype %s is not used: ghostdp reduces clipped sums in fp32 "
                     "(fp64 for fp64 shards)", ", ".join(sorted(ignored)))
        self._on_untracked = on_untracked
        self._hooked: set[int] = set()
        self._by_unsharded: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}
        self._handles: list = []
        FSDPModule = _fsdp2()[0]
        for module in model.modules():
            if isinstance(module, FSDPModule):
                self._handles.append(module.register_forward_hook(self._hook_unsharded))
        log.info("ghostdp: FSDP2, %d trainable sharded parameters over %d ranks",
                 len(self._params), self._params[0][0].sharded_param.device_mesh.size() if self._params else 0)

    # ------------------------------------------------------------------ checks
    def _hook_unsharded(self, module, args, output) -> None:
        """After a forward FSDP has created its unsharded parameters: make them refuse autograd gradients."""
        for fp, name in self._params:
            unsharded = getattr(fp, "_unsharded_param", None)
            if unsharded is not None and id(unsharded) not in self._hooked:
                self._hooked.add(id(unsharded))
                self._handles.append(unsharded.register_post_accumulate_grad_hook(partial(self._on_untracked, name)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._hooked = [], set()

    # ------------------------------------------------------------------ backward
    def sharded(self, param: nn.Parameter) -> nn.Parameter:
        """The sharded parameter (the optimizer's) behind the unsharded one a layer's backward recorded."""
        hit = self._by_unsharded.get(id(param))
        if hit is None or hit[0] is not param:
            self._by_unsharded = {
                id(fp._unsharded_param): (fp._unsharded_param, fp.sharded_param)
                for fp, _ in self._params if hasattr(fp, "_unsharded_param")
            }
            hit = self._by_unsharded.get(id(param))
        if hit is None or hit[0] is not param:
            raise RuntimeError(
                f"ghostdp under FSDP2 got per-example gradients for a parameter of shape {tuple(param.shape)} "
                "that is not an unsharded FSDP2 parameter of a trainable parameter of this model (was "
                "fully_shard called after the PrivacyEngine was attached?). Attach the engine after fully_shard."
            )
        return hit[1]

    def add_clipped_sums(
        self,
        uses: dict[nn.Parameter, list[PerExampleGrad]],
        factors: torch.Tensor,
        impl_for: Callable[[PerExampleGrad], str],
        written: Callable[[nn.Parameter], None],
    ) -> None:
        """For each trainable parameter, smallest first: this rank's clipped sum, reduce-scattered (sum) into
        the shard owners' ``sharded_param.grad``; ``written(p)`` after each. ``uses`` is keyed by sharded
        parameters (see :meth:`sharded`); each parameter's entry is popped once reduced, so the per-example
        pieces (layer inputs, output gradients) are freed as the loop goes, and the peak is the book-keeping
        plus small buffers rather than the book-keeping plus the largest (embedding, LM head) buffers. Every
        parameter takes part, used in this backward or not, so that all ranks issue the same collectives in
        the same order."""
        for fp, _ in self._reduce_order:
            self._reduce_scatter_one(fp, uses.pop(fp.sharded_param, ()), factors, impl_for)
            written(fp.sharded_param)

    @staticmethod
    def _reduce_scatter_one(fp, uses: Iterable[PerExampleGrad], factors, impl_for) -> None:
        sharded = fp.sharded_param
        mesh = sharded.device_mesh
        world, rank = mesh.size(), mesh.get_local_rank()
        full = tuple(sharded.shape)  # the unsharded shape
        rows = -(-full[0] // world)  # torch.chunk's chunk size: rank r owns rows [r*rows, (r+1)*rows)
        local = sharded.to_local()
        dtype = _sum_dtype(sharded)
        buf = torch.zeros((rows * world, *full[1:]), dtype=dtype, device=local.device)  # zero-padded rows
        for u in uses:
            u.add_clipped_sum_(factors.to(u.device()), buf[: full[0]], impl_for(u))
        mine = buf.new_empty((rows, *full[1:]))
        dist.reduce_scatter_tensor(mine, buf, op=dist.ReduceOp.SUM, group=mesh.get_group())
        del buf
        mine = mine[: local.shape[0]]
        if rank * rows + local.shape[0] > full[0] or tuple(mine.shape) != tuple(local.shape):
            raise RuntimeError(  # pragma: no cover - FSDP2 changed its sharding layout
                f"FSDP2 shard of shape {tuple(local.shape)} on rank {rank} does not match torch.chunk rows "
                f"{rank * rows}..{(rank + 1) * rows} of {full}; this torch's FSDP2 layout is not supported."
            )
        if sharded.grad is None:
            sharded.grad = torch.zeros_like(sharded)
        g = sharded.grad.to_local()
        if g.dtype == mine.dtype:
            g.add_(mine)
        else:  # a bf16/fp16 gradient: sum in the compute dtype, round once
            g.copy_(mine + g.to(mine.dtype))

    # ------------------------------------------------------------------ optimizer step
    def noise_and_scale(self, params: list[nn.Parameter], std: float, expected_batch_size: float,
                        generator: Callable[[torch.device], torch.Generator],
                        impl: Callable[[torch.Tensor], str]) -> None:
        """grad_shard <- (grad_shard + N(0, std^2 I)) / expected_batch_size, on this rank's shards only.

        ``params`` are the sharded parameters the optimizer steps, in model order. One base seed per step
        is drawn from the engine's generator; the noise of parameter ``index`` on mesh rank ``r`` is keyed
        ``noise_seed(base, "fsdp2", r, index)``: independent across steps, ranks and parameters, even when
        every rank's generator was seeded alike, and reproducible from that seed.
        """
        if not params:
            return
        gen = generator(params[0].to_local().device)
        base_seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device))
        for index, p in enumerate(params):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            local = p.grad.to_local()
            seed = kernels.noise_seed(base_seed, "fsdp2", p.device_mesh.get_local_rank(), index)
            # impl of the parameter (resolved once at attach), not of the fresh local tensor: the engine caches
            # parameters only and resolves any other tensor again on every call.
            kernels.add_noise_(local, noise_std=std, seed=seed, scale=1.0 / expected_batch_size, impl=impl(p))


def attach(model: nn.Module, names: dict[nn.Parameter, str], on_untracked: Callable,
           distributed: bool | None) -> FSDP2Sharding | None:
    """The FSDP2 side of a PrivacyEngine for ``model``, or None when the model is not sharded.

    Refuses FSDP1, and ``distributed=False`` on a sharded model (the shards must be reduced).
    """
    refuse_fsdp1(model)
    if not is_fsdp2(model):
        return None
    if distributed is False:
        raise ValueError(
            "distributed=False, but the model is sharded with FSDP2: each rank holds only a shard of every "
            "parameter, so the clipped sums must be reduce-scattered across ranks. Leave distributed unset "
            "(or True), or do not shard the model."
        )
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("The model is sharded with FSDP2 but no torch.distributed process group is initialised.")
    return FSDP2Sharding(model, names, on_untracked)
