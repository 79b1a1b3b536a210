"""Per-example causal-LM loss: each example's mean over its own target tokens.

``L_i = (1 / n_i) sum_t CE(logits_i,t-1, labels_i,t) [labels_i,t != -100]`` with ``n_i`` the number of
example i's scored tokens (0 if it has none). ``L_i`` depends on example i alone, which per-example
clipping assumes; a loss averaged over the batch's tokens would let one example reweight the others
(and the padding of others change it). Opacus #792 counted ignore_index tokens in the mean.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def per_example_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-example causal-LM loss, shape (B,), float32 (float64 for float64 logits).

    ``loss_i = (1 / |S_i|) sum_{t in S_i} CE(logits[i, t - 1], labels[i, t])`` with
    ``S_i = {t >= 1 : labels[i, t] != -100}``, and ``loss_i = 0`` when ``S_i`` is empty. Call the model
    without ``labels`` (Hugging Face models average over the batch's tokens) and pass its logits here.
    bf16/fp16 logits are upcast: a log-softmax over a large vocabulary loses precision in half precision.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, T, V) and labels (B, T), got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    shift_logits = logits[:, :-1].float() if logits.dtype in (torch.float16, torch.bfloat16) else logits[:, :-1]
    shift_labels = labels[:, 1:]
    ce = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
        ignore_index=ignore_index, reduction="none",
    ).view(shift_labels.shape)
    counts = (shift_labels != ignore_index).sum(1)
    return ce.sum(1) / counts.clamp(min=1).to(ce.dtype)
