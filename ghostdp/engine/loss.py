"""Per-example losses, one function per task: each example's loss depends on that example alone.

Causal LM (:func:`per_example_lm_loss`, shifted), aligned token targets (:func:`per_example_token_loss`:
token classification, seq2seq decoder labels) and one label per example (:func:`per_example_sequence_loss`:
classification, multi-label, regression). ``TASK_LOSSES`` maps DPTrainer's task names to them.

Causal LM:

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


# ---------------------------------------------------------------------------------------------- other tasks
def _upcast(logits: torch.Tensor) -> torch.Tensor:
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _check_class_ids(labels: torch.Tensor, num_classes: int, ignore_index: int | None, task: str) -> None:
    """Raise if a (non-ignored) label is not a class id in [0, num_classes): the labels were made for
    another head (e.g. a causal-LM collator's token ids fed to a token-classification model)."""
    scored = labels if ignore_index is None else labels[labels != ignore_index]
    if scored.numel() and bool(((scored < 0) | (scored >= num_classes)).any()):
        raise ValueError(
            f"{task} classification labels must be class ids in [0, {num_classes}) (the model's {num_classes} "
            f"outputs), got values from {int(scored.min())} to {int(scored.max())}. The labels were probably made "
            f"for another task (a causal-LM collator writes token ids); use a collator that writes this task's "
            "labels, or pass DPTrainer a per_example_loss for your objective."
        )


def per_example_token_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-example loss of aligned token targets (token classification, seq2seq decoder labels), shape (B,).

    ``loss_i = (1 / |S_i|) sum_{t in S_i} CE(logits[i, t], labels[i, t])`` with ``S_i = {t : labels[i, t] !=
    ignore_index}`` (0 when empty): position t's logits score position t's label, no shift. logits (B, T, K),
    labels (B, T). Used for ``*ForTokenClassification`` and, with the decoder's logits and labels, for
    encoder-decoder ``*ForConditionalGeneration`` (whose decoder inputs are the labels shifted right, so
    logits at t already predict labels[t]).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, T, K) and labels (B, T), got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    _check_class_ids(labels, logits.shape[-1], ignore_index, "token")
    logits = _upcast(logits)
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index, reduction="none",
    ).view(labels.shape)
    counts = (labels != ignore_index).sum(1)
    return ce.sum(1) / counts.clamp(min=1).to(ce.dtype)


def per_example_sequence_loss(
    logits: torch.Tensor, labels: torch.Tensor, problem_type: str | None = None
) -> torch.Tensor:
    """Per-example loss of one label per example (sequence classification / regression), shape (B,).

    logits (B, K). ``problem_type`` as Hugging Face's ``config.problem_type``, or None to infer it as
    Hugging Face does from K and the labels' dtype:
    - "regression" (K == 1, or float labels declared so): ``mean_k (logits[i, k] - labels[i, k])^2``;
    - "single_label_classification" (integer labels (B,)): ``CE(logits[i], labels[i])``;
    - "multi_label_classification" (float labels (B, K)): ``mean_k BCEWithLogits(logits[i, k], labels[i, k])``.
    Each is the per-example term of the Hugging Face loss of that problem type (which averages over the batch).
    """
    if logits.dim() != 2:
        raise ValueError(f"expected logits (B, K) for one label per example, got {tuple(logits.shape)}")
    B, K = logits.shape
    if problem_type is None:
        if K == 1:
            problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    logits = _upcast(logits)
    if problem_type == "regression":
        target = labels.to(logits.dtype).reshape(B, -1)
        if target.shape[1] != K:
            raise ValueError(f"regression labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")
        return (logits - target).pow(2).mean(1)
    if problem_type == "single_label_classification":
        if labels.shape != (B,):
            raise ValueError(f"single-label classification needs labels (B,) = ({B},), got {tuple(labels.shape)}")
        _check_class_ids(labels, K, None, "sequence")
        return F.cross_entropy(logits, labels.long(), reduction="none")
    if problem_type == "multi_label_classification":
        if labels.shape != (B, K):
            raise ValueError(f"multi-label classification needs labels (B, K) = ({B}, {K}), got {tuple(labels.shape)}")
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none").mean(1)
    raise ValueError(
        f"problem_type={problem_type!r} is not one of 'regression', 'single_label_classification', "
        "'multi_label_classification'"
    )


#: Per-example loss of each task DPTrainer knows, (logits, labels) -> (B,). Sequence classification reads
#: the problem type from the model config (see DPTrainer).
TASK_LOSSES = {
    "causal_lm": per_example_lm_loss,
    "token_classification": per_example_token_loss,
    "seq2seq_lm": per_example_token_loss,
    "sequence_classification": per_example_sequence_loss,
}
