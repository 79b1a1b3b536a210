"""Downstream evaluation of synthetic text: train a classifier on it, test on held-out REAL data.

The utility of DP synthetic data is measured as in Yue et al. (ACL 2023): a classifier trained on the
synthetic set is scored on real held-out data, and compared with the same classifier trained on the
real private set (the non-private ceiling) and with one trained with DP directly on the real set.

Two classifiers share one interface (:class:`TextClassifier`: ``fit(LabelledTexts)``, ``predict(texts)``)
and one metrics dict (:func:`classification_metrics`), so a DP-trained classifier can be plugged in
later by implementing the same two methods:

- :class:`LinearProbe`: logistic regression on frozen sentence embeddings (MiniLM). Seconds on CPU.
- :class:`MiniLMClassifier`: MiniLM encoder + mean pooling + a linear head, all fine-tuned with AdamW
  (cross-entropy), a few epochs. The network itself is :class:`MiniLMClassifierModule`, usable as is
  by a DP training loop (it returns logits; take per-example cross-entropy with ``reduction="none"``).

:func:`label_fidelity` answers a different question: does a classifier trained on real data agree with
the label each synthetic sample was generated for?
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ghostdp.integrations.synthetic.embeddings import load_minilm, mean_pool_normalize
from ghostdp.integrations.synthetic.text_data import LabelledTexts

logger = logging.getLogger(__name__)


@runtime_checkable
class TextClassifier(Protocol):
    """What :func:`train_and_evaluate` needs: ``fit`` on labelled texts, ``predict`` label names."""

    def fit(self, train: LabelledTexts) -> TextClassifier: ...

    def predict(self, texts: Sequence[str]) -> list[str]: ...


class Embedder(Protocol):
    """Anything that maps texts to a (n, d) array, e.g. :class:`~ghostdp.integrations.synthetic.embeddings.MiniLMEmbedder`."""

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def classification_metrics(
    y_true: Sequence[str], y_pred: Sequence[str], label_names: Sequence[str]
) -> dict[str, float | int]:
    """``{"accuracy", "macro_f1", "n_eval", "recall", "recall_gap"}``.

    accuracy = mean(y_pred == y_true); macro-F1 = unweighted mean over ``label_names`` of each class's
    F1 = 2PR / (P + R) (a class never predicted nor present scores 0), so a classifier that ignores a
    minority class is penalised even when accuracy looks fine. ``recall[c]`` = share of the rows of class
    c predicted as c (None for a class with no rows); ``recall_gap`` = the largest minus the smallest of
    them (DP tends to hurt the less represented classes more: the gap shows it).
    """
    from sklearn.metrics import f1_score

    if len(y_true) != len(y_pred):
        raise ValueError(f"classification_metrics: {len(y_true)} true labels but {len(y_pred)} predictions.")
    if len(y_true) == 0:
        raise ValueError("classification_metrics: no evaluation rows.")
    yt, yp = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
    recall = {str(c): (float(np.mean(yp[yt == c] == c)) if (yt == c).any() else None) for c in label_names}
    present = [r for r in recall.values() if r is not None]
    return {
        "accuracy": float(np.mean(yt == yp)),
        "macro_f1": float(f1_score(yt, yp, labels=list(label_names), average="macro", zero_division=0)),
        "n_eval": int(len(yt)),
        "recall": recall,
        "recall_gap": float(max(present) - min(present)) if present else None,
    }


def evaluate_classifier(classifier: TextClassifier, eval_data: LabelledTexts) -> dict[str, float | int]:
    """Metrics of an already trained classifier on ``eval_data`` (real held-out data)."""
    return classification_metrics(eval_data.labels, classifier.predict(eval_data.texts), eval_data.label_names)


def train_and_evaluate(
    classifier: TextClassifier, train: LabelledTexts, eval_data: LabelledTexts
) -> dict[str, float | int]:
    """Fit on ``train`` (synthetic or real), score on ``eval_data``; adds ``n_train`` to the metrics."""
    _check_trainable(train)
    classifier.fit(train)
    metrics = evaluate_classifier(classifier, eval_data)
    metrics["n_train"] = len(train)
    logger.info("%s: %s", type(classifier).__name__, metrics)
    return metrics


def label_fidelity(classifier: TextClassifier, synthetic: LabelledTexts) -> dict[str, float | int]:
    """Fraction of synthetic samples whose intended label a (real-data) classifier predicts.

    ``{"label_fidelity": overall, "label_fidelity/<name>": per intended label, "n_synthetic"}``. Low
    fidelity means the generator ignores its label prefix; it is bounded above by the classifier's own
    accuracy on real data.
    """
    if len(synthetic) == 0:
        raise ValueError("label_fidelity: no synthetic samples.")
    pred = np.asarray(classifier.predict(synthetic.texts), dtype=object)
    intended = np.asarray(synthetic.labels, dtype=object)
    out: dict[str, float | int] = {"label_fidelity": float(np.mean(pred == intended)), "n_synthetic": len(synthetic)}
    for name in synthetic.label_names:
        rows = intended == name
        if rows.any():
            out[f"label_fidelity/{name}"] = float(np.mean(pred[rows] == name))
    return out


def _check_trainable(train: LabelledTexts) -> None:
    present = {y for y in train.labels}
    if len(present) < 2:
        raise ValueError(
            f"Cannot train a classifier on {train.source}: it has {len(train)} rows and labels {sorted(present)} "
            f"of {list(train.label_names)}; at least two classes must be present. If this is synthetic data, "
            "generate samples for every label."
        )


# ----------------------------------------------------------------------------------------------------
# Linear probe
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearProbeConfig:
    """Options of :class:`LinearProbe`.

    Args:
        C: inverse L2 regularisation strength of the logistic regression.
        max_iter: solver iteration cap (lbfgs).
        seed: random_state of the solver.
    """

    C: float = 1.0
    max_iter: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.C <= 0:
            raise ValueError(f"LinearProbeConfig.C={self.C}: need > 0.")


class LinearProbe:
    """Multinomial logistic regression on frozen embeddings (sklearn ``LogisticRegression``).

    ``fit_embeddings`` / ``predict_embeddings`` take precomputed features, so embeddings computed once
    (for MAUVE, memorisation) can be reused.
    """

    def __init__(self, embedder: Embedder, config: LinearProbeConfig | None = None) -> None:
        self.embedder = embedder
        self.config = config if config is not None else LinearProbeConfig()
        self.label_names: tuple[str, ...] = ()
        self._model = None

    def fit_embeddings(self, features: np.ndarray, labels: Sequence[str], label_names: Sequence[str]) -> LinearProbe:
        from sklearn.linear_model import LogisticRegression

        if len(features) != len(labels):
            raise ValueError(f"LinearProbe: {len(features)} feature rows but {len(labels)} labels.")
        self.label_names = tuple(label_names)
        self._model = LogisticRegression(
            C=self.config.C, max_iter=self.config.max_iter, random_state=self.config.seed
        ).fit(np.asarray(features, dtype=np.float64), np.asarray(labels, dtype=object))
        return self

    def predict_embeddings(self, features: np.ndarray) -> list[str]:
        if self._model is None:
            raise RuntimeError("LinearProbe.predict called before fit.")
        return [str(y) for y in self._model.predict(np.asarray(features, dtype=np.float64))]

    def fit(self, train: LabelledTexts) -> LinearProbe:
        _check_trainable(train)
        return self.fit_embeddings(self.embedder.embed(train.texts), train.labels, train.label_names)

    def predict(self, texts: Sequence[str]) -> list[str]:
        return self.predict_embeddings(self.embedder.embed(texts))


# ----------------------------------------------------------------------------------------------------
# Fine-tuned MiniLM
# ----------------------------------------------------------------------------------------------------


class MiniLMClassifierModule(nn.Module):
    """Encoder -> masked mean pooling -> L2 normalise -> dropout -> linear head: logits (B, num_labels).

    The pooled feature is the all-MiniLM-L6-v2 sentence embedding, so the head starts from the same
    features as the linear probe.
    """

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, d)
        pooled = mean_pool_normalize(hidden, attention_mask)  # (B, d)
        # Unit-norm features are small (|x| = 1); the head scale is learned from there.
        return self.head(self.dropout(pooled))  # (B, num_labels)


@dataclass(frozen=True)
class FineTuneConfig:
    """Options of :class:`MiniLMClassifier` (CPU-sized defaults).

    Args:
        epochs: passes over the training set.
        batch_size: examples per step.
        lr: AdamW learning rate of the encoder.
        head_lr: AdamW learning rate of the freshly initialised head (larger: it starts from scratch and
            its inputs are unit-norm).
        weight_decay: AdamW decoupled weight decay (not applied to biases and LayerNorm weights).
        warmup_frac: fraction of steps with a linear warm-up, then linear decay to 0.
        max_length: token limit per text.
        dropout: dropout before the head.
        seed: seeds the head initialisation and the shuffling.
        device: torch device string.
        model_dir: a local all-MiniLM-L6-v2 folder; None uses the packaged one.
        show_progress: tqdm bars.
    """

    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-5
    head_lr: float = 1e-2
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    max_length: int = 64
    dropout: float = 0.1
    seed: int = 0
    device: str = "cpu"
    model_dir: str | Path | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"FineTuneConfig.{name}={getattr(self, name)}: need >= 1.")
        if self.lr <= 0 or self.head_lr <= 0:
            raise ValueError(f"FineTuneConfig: lr={self.lr} and head_lr={self.head_lr} must be > 0.")
        if not 0 <= self.warmup_frac < 1:
            raise ValueError(f"FineTuneConfig.warmup_frac={self.warmup_frac}: need a fraction in [0, 1).")


class MiniLMClassifier:
    """Fine-tunes all-MiniLM-L6-v2 with a linear head (non-private). ``history`` holds one dict per step:
    ``{"epoch", "step", "loss"}``."""

    def __init__(self, config: FineTuneConfig | None = None) -> None:
        self.config = config if config is not None else FineTuneConfig()
        self.label_names: tuple[str, ...] = ()
        self.history: list[dict[str, float | int]] = []
        self.tokenizer = None
        self.module: MiniLMClassifierModule | None = None

    def _encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.config.max_length, return_tensors="pt"
        )
        return {k: enc[k].to(self.config.device) for k in ("input_ids", "attention_mask")}

    def fit(self, train: LabelledTexts) -> MiniLMClassifier:
        _check_trainable(train)
        cfg = self.config
        torch.manual_seed(cfg.seed)
        self.tokenizer, encoder = load_minilm(cfg.model_dir, cfg.device)
        self.label_names = train.label_names
        self.module = MiniLMClassifierModule(encoder, len(self.label_names), cfg.dropout).to(cfg.device)
        targets = torch.tensor([self.label_names.index(y) for y in train.labels], dtype=torch.long)

        no_decay = [p for n, p in self.module.encoder.named_parameters() if p.ndim < 2]
        decay = [p for n, p in self.module.encoder.named_parameters() if p.ndim >= 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "lr": cfg.lr, "weight_decay": 0.0},
                {"params": self.module.head.parameters(), "lr": cfg.head_lr, "weight_decay": 0.0},
            ]
        )
        steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
        total = steps_per_epoch * cfg.epochs
        warmup = int(cfg.warmup_frac * total)

        def schedule(step: int) -> float:  # linear warm-up, then linear decay to 0
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        gen = torch.Generator().manual_seed(cfg.seed)
        self.history = []
        self.module.train()
        step = 0
        bar = tqdm(total=total, desc="fine-tune MiniLM", unit="step", disable=not cfg.show_progress)
        for epoch in range(cfg.epochs):
            perm = torch.randperm(len(train), generator=gen)
            for start in range(0, len(train), cfg.batch_size):
                idx = perm[start:start + cfg.batch_size]
                batch = self._encode([train.texts[i] for i in idx.tolist()])
                logits = self.module(**batch)  # (B, num_labels)
                loss = nn.functional.cross_entropy(logits.float(), targets[idx].to(cfg.device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_value = loss.detach().item()
                self.history.append({"epoch": epoch, "step": step, "loss": loss_value})
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}")
        bar.close()
        self.module.eval()
        return self

    @torch.inference_mode()
    def predict(self, texts: Sequence[str]) -> list[str]:
        if self.module is None:
            raise RuntimeError("MiniLMClassifier.predict called before fit.")
        texts = list(texts)
        preds: list[str] = []
        bs = max(self.config.batch_size, 64)
        for start in range(0, len(texts), bs):
            logits = self.module(**self._encode(texts[start:start + bs]))
            preds.extend(self.label_names[i] for i in logits.argmax(dim=1).tolist())
        return preds
