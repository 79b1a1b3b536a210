"""Canary scores: how much more the trained model "knows" each canary than the base model did.

- ``loss`` (black-box): ``score_i = L_i(theta_0) - L_i(theta_T)``, the drop of canary i's mean loss over its
  scored tokens between the base and the trained model (Steinke et al. 2023, Sec. 6, black-box auditing with
  the loss as score; subtracting the base loss removes how "easy" the canary was before training).
- ``white_box``: ``score_i = -<grad L_i(theta_0), theta_T - theta_0>``, the alignment of the whole training
  update with canary i's gradient at the start (a first-order estimate of the same loss drop that needs the
  weights before and after; one backward per canary, so meant for small or LoRA models).

Guessing and bounding from the scores: ``ghostdp.integrations.audit.guesses``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["collate_sequences", "sequence_losses", "white_box_scores"]


def collate_sequences(
    seqs: Sequence[Sequence[int]], pad_token_id: int, score_positions: Sequence[Sequence[int]] | None = None,
) -> dict[str, torch.Tensor]:
    """Right-padded batch. Labels: the token at scored positions (default every t >= 1), else -100."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_token_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
        pos = range(1, len(s)) if score_positions is None else score_positions[i]
        for t in pos:
            labels[i, t] = ids[i, t]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def sequence_losses(
    model: torch.nn.Module, seqs: Sequence[Sequence[int]], score_positions: Sequence[Sequence[int]], *,
    pad_token_id: int, batch_size: int = 32,
) -> np.ndarray:
    """(m,) mean cross-entropy of each sequence over its scored positions (``per_example_lm_loss``)."""
    from ghostdp.engine.loss import per_example_lm_loss

    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(seqs), batch_size):
            batch = collate_sequences(seqs[start:start + batch_size], pad_token_id, score_positions[start:start + batch_size])
            batch = {k: v.to(_device(model)) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            out.append(per_example_lm_loss(logits, batch["labels"]).double().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy()


def white_box_scores(
    model: torch.nn.Module, start_params: dict[str, torch.Tensor], seqs: Sequence[Sequence[int]],
    score_positions: Sequence[Sequence[int]], *, pad_token_id: int,
) -> np.ndarray:
    """(m,) ``-<grad L_i(theta_0), theta_T - theta_0>`` over the trainable parameters named in ``start_params``.

    ``model`` holds theta_T; it is set to theta_0 for the gradients and restored afterwards. Detach any
    PrivacyEngine first (its clipped layers would otherwise record these backward passes).
    """
    from ghostdp.engine.loss import per_example_lm_loss

    named = dict(model.named_parameters())
    params = [named[n] for n in start_params]
    end = [p.detach().clone() for p in params]
    update = [e - s.to(e.device, e.dtype) for e, s in zip(end, start_params.values())]
    was_training = model.training
    model.eval()
    scores = []
    try:
        with torch.no_grad():
            for p, s in zip(params, start_params.values()):
                p.copy_(s)
        for i, seq in enumerate(seqs):
            batch = collate_sequences([seq], pad_token_id, [score_positions[i]])
            batch = {k: v.to(_device(model)) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = per_example_lm_loss(logits, batch["labels"])[0]
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            dot = sum(float((g.double() * u.double()).sum()) for g, u in zip(grads, update) if g is not None)
            scores.append(-dot)
    finally:
        with torch.no_grad():
            for p, e in zip(params, end):
                p.copy_(e)
        model.train(was_training)
    return np.asarray(scores, dtype=float)
