"""Opacus as a benchmark engine, through its own entry point ``PrivacyEngine.make_private``.

- ``opacus-hooks``: ``grad_sample_mode="hooks"``, per-example gradients instantiated by its
  ``GradSampleModule``; layers without a grad sampler (Hugging Face RMSNorm) go through its functorch
  fallback.
- ``opacus-ghost``: ``grad_sample_mode="ghost"`` with the fast-gradient-clipping loss wrapper it returns (two
  backward passes). Opacus refuses tied parameters there (``NotImplementedError``): the row says
  "unsupported" and why. ``Case(untie_embeddings=True)`` gives every engine of that case the same untied
  model (an LM head of its own), which keeps the comparison fair.

Opacus is imported only when one of its engines is set up: the rest of the harness runs without it.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from ghostdp.integrations.bench.engines import MAX_GRAD_NORM, NOISE_MULTIPLIER

if TYPE_CHECKING:
    from ghostdp.integrations.bench.workloads import Case


class PerExampleLMCriterion:
    """The per-example LM loss with the ``reduction`` switch Opacus' loss wrapper flips to ``"none"``."""

    def __init__(self, reduction: str = "mean"):
        self.reduction = reduction

    def __call__(self, logits, labels):
        from ghostdp.engine.loss import per_example_lm_loss

        losses = per_example_lm_loss(logits, labels)  # (B,)
        if self.reduction == "none":
            return losses
        return losses.mean() if self.reduction == "mean" else losses.sum()



def attach_opacus(model, optimizer, ids, mode: str, case: Case, seed: int):
    """Opacus' own entry point, ``PrivacyEngine.make_private``, on the model already on its device
    (hooks must see the final parameters: Opacus #820). The data loader only sets the expected batch
    size (one batch of ``batch_size``); the step feeds the same fixed batch as the other engines."""
    import opacus
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(ids.cpu()), batch_size=case.batch_size)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        out = opacus.PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=NOISE_MULTIPLIER,
            max_grad_norm=MAX_GRAD_NORM, loss_reduction="mean", poisson_sampling=False,
            grad_sample_mode=mode, criterion=PerExampleLMCriterion(),
            noise_generator=torch.Generator(device=case.device).manual_seed(seed))
    if mode == "ghost":
        module, dp_optimizer, criterion, _ = out
        labels = ids
        return module, dp_optimizer, (lambda logits: criterion(logits, labels))
    module, dp_optimizer, _ = out
    return module, dp_optimizer, None
