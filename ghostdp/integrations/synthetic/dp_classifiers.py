"""DP-on-real baselines: classifiers trained with DP-SGD directly on the real private data.

The bar DP synthetic data has to clear (Yue et al., ACL 2023): the same task, the same budget, but the
classifier itself is the release. Beside the non-private classifiers of
:mod:`ghostdp.integrations.synthetic.classifiers`, two DP ones share one DP-SGD fitting loop
(:func:`fit_dp_sgd`: Poisson batches from ``PoissonBatchSampler``, per-example clipping and noise by
``PrivacyEngine``, Adam) and one plan (:func:`ghostdp.engine.planning.plan_dp_sgd`, calibrated to
``target_epsilon`` for ``steps`` steps):

- :class:`DPLinearProbe`: a linear head on frozen MiniLM sentence embeddings (the embedder is public).
- :class:`DPMiniLMClassifier`: every MiniLM parameter (Linear, Embedding, LayerNorm: all supported).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ghostdp.engine import planning
from ghostdp.integrations.synthetic.classifiers import MiniLMClassifierModule
from ghostdp.integrations.synthetic.embeddings import mean_pool_normalize
from ghostdp.integrations.synthetic.text_data import LabelledTexts

__all__ = ["DPClassifierConfig", "DPLinearProbe", "DPMiniLMClassifier", "fit_dp_sgd"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DPClassifierConfig:
    """DP-SGD settings of the DP-on-real baseline.

    Args:
        target_epsilon, delta: the budget; the noise multiplier is calibrated to it for ``steps`` steps at
            Poisson rate ``batch_size / N``.
        steps: optimizer steps.
        batch_size: expected Poisson batch (capped at N).
        learning_rate: Adam learning rate.
        max_grad_norm: per-example clipping bound C.
        physical_batch_size: examples per forward/backward (MiniLM only; memory, not privacy).
        max_length: token limit per text (MiniLM only).
        seed: head initialisation and dropout. The Poisson batches and noise use ``dp_seed``.
        dp_seed: seed of the batches and the noise; None (default) draws them from OS entropy.
        model_dir: a local MiniLM folder for :class:`DPMiniLMClassifier` (None: the packaged one).
        device: torch device string.
        show_progress: tqdm bar over steps.
    """

    target_epsilon: float
    delta: float
    steps: int = 300
    batch_size: int = 256
    learning_rate: float = 0.05
    max_grad_norm: float = 1.0
    physical_batch_size: int = 64
    max_length: int = 64
    seed: int = 0
    dp_seed: int | None = None
    model_dir: str | Path | None = None
    device: str = "cpu"
    show_progress: bool = True

    def __post_init__(self) -> None:
        if not (math.isfinite(self.target_epsilon) and self.target_epsilon > 0):
            raise ValueError(f"DPClassifierConfig.target_epsilon={self.target_epsilon}: need a finite number > 0.")
        if not 0 < self.delta < 1:
            raise ValueError(f"DPClassifierConfig.delta={self.delta}: need a probability well below 1/N.")
        for name in ("steps", "batch_size", "physical_batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"DPClassifierConfig.{name}={getattr(self, name)}: need >= 1.")
        if self.learning_rate <= 0 or self.max_grad_norm <= 0:
            raise ValueError(f"DPClassifierConfig: learning_rate={self.learning_rate} and max_grad_norm="
                             f"{self.max_grad_norm} must be > 0.")


def _dp_setup(n: int, cfg: DPClassifierConfig):
    """(expected batch L, rate q, calibrated sigma, sampler generator, noise generator)."""
    planning.check_delta(cfg.delta, n, where="DP baseline: delta")
    L = min(cfg.batch_size, n)
    plan = planning.plan_dp_sgd(num_examples=n, expected_batch_size=L, steps=cfg.steps, delta=cfg.delta,
                                target_epsilon=cfg.target_epsilon)
    sample_gen = torch.Generator()
    noise_gen = torch.Generator(device=cfg.device)
    if cfg.dp_seed is None:
        sample_gen.seed()
        noise_gen.seed()
    else:
        sample_gen.manual_seed(int(cfg.dp_seed))
        noise_gen.manual_seed(int(cfg.dp_seed) + 1)
    return L, plan.sample_rate, plan.noise_multiplier, sample_gen, noise_gen


def fit_dp_sgd(module: nn.Module, optimizer: torch.optim.Optimizer, n: int, cfg: DPClassifierConfig, setup: tuple,
               batch_loss: Callable[[torch.Tensor], torch.Tensor], *, physical_batch_size: int, desc: str) -> float:
    """The one DP-SGD loop of the baselines; returns epsilon spent (the accountant's upper bound, <= target).

    Per step: a Poisson sample of the ``n`` indices (rate q), ``batch_loss(indices)`` (the SUM of the
    per-example losses of a slice of at most ``physical_batch_size``) backpropagated slice by slice, then
    ``optimizer.step()``: clipped sum + N(0, sigma^2 C^2) once, divided by the expected batch. An empty batch
    still steps (it is accounted). ``setup`` is :func:`_dp_setup`'s tuple.
    """
    from ghostdp.data import PoissonBatchSampler
    from ghostdp.engine.privacy_engine import PrivacyEngine

    L, q, sigma, sample_gen, noise_gen = setup
    engine = PrivacyEngine(module, optimizer, max_grad_norm=cfg.max_grad_norm, expected_batch_size=L,
                           noise_multiplier=sigma, loss_reduction="sum", sample_rate=q, generator=noise_gen)
    module.train()
    sampler = PoissonBatchSampler(n, q, generator=sample_gen, steps=cfg.steps)
    for idx in tqdm(sampler, desc=desc, unit="step", disable=not cfg.show_progress):
        for s in range(0, len(idx), physical_batch_size):
            batch_loss(idx[s:s + physical_batch_size]).backward()
        optimizer.step()  # noise once, / expected batch size
        optimizer.zero_grad()
    epsilon = engine.epsilon(cfg.delta)
    engine.detach()
    return epsilon


class DPLinearProbe:
    """Multinomial logistic regression on frozen embeddings, trained with DP-SGD.

    Only the head ``nn.Linear(d, K)`` is trained on the private data; the embedder is a public model, so
    embedding each example is a per-example public function and costs no privacy. Per step: a Poisson
    sample, per-example cross-entropy gradients clipped to C by ``PrivacyEngine`` (the head is an
    ``nn.Linear``, a supported layer), Gaussian noise of std sigma*C, Adam. ``epsilon`` after ``fit`` is the
    PRV accountant's upper bound (<= target).
    """

    def __init__(self, embedder: Any, config: DPClassifierConfig) -> None:
        self.embedder = embedder
        self.config = config
        self.label_names: tuple[str, ...] = ()
        self.head: nn.Linear | None = None
        self.epsilon: float | None = None
        self.noise_multiplier: float | None = None

    def fit_embeddings(self, features: np.ndarray, labels: Sequence[str], label_names: Sequence[str]) -> DPLinearProbe:
        cfg = self.config
        X = torch.as_tensor(np.asarray(features), dtype=torch.float32)  # (N, d)
        self.label_names = tuple(label_names)
        y = torch.tensor([self.label_names.index(v) for v in labels], dtype=torch.long)  # (N,)
        n = len(X)
        setup = _dp_setup(n, cfg)
        _, q, sigma = setup[:3]
        torch.manual_seed(cfg.seed)
        head = nn.Linear(X.shape[1], len(self.label_names))
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        opt = torch.optim.Adam(head.parameters(), lr=cfg.learning_rate)
        self.epsilon = fit_dp_sgd(
            head, opt, n, cfg, setup, lambda idx: F.cross_entropy(head(X[idx]), y[idx], reduction="none").sum(),
            physical_batch_size=max(n, 1), desc="DP linear head")
        self.noise_multiplier = sigma
        self.head = head.eval()
        logger.info("DP linear head: %d steps, q=%.4g, sigma=%.4g -> epsilon=%.4g at delta=%.3g", cfg.steps, q, sigma,
                    self.epsilon, cfg.delta)
        return self

    @torch.inference_mode()
    def predict_embeddings(self, features: np.ndarray) -> list[str]:
        if self.head is None:
            raise RuntimeError("DPLinearProbe.predict called before fit.")
        logits = self.head(torch.as_tensor(np.asarray(features), dtype=torch.float32))
        return [self.label_names[i] for i in logits.argmax(1).tolist()]

    def fit(self, train: LabelledTexts) -> DPLinearProbe:
        return self.fit_embeddings(self.embedder.embed(train.texts), train.labels, train.label_names)

    def predict(self, texts: Sequence[str]) -> list[str]:
        return self.predict_embeddings(self.embedder.embed(texts))


class _PerExampleMiniLMModule(MiniLMClassifierModule):
    """``MiniLMClassifierModule`` with position and token-type ids passed explicitly, shape (B, T).

    BERT builds its position ids as one (1, T) row broadcast over the batch, so its position-embedding
    layer sees a batch of 1 and its per-example gradients cannot be told apart (the engine refuses:
    batch sizes differ between layers). The same ids, expanded to (B, T), give every example its own
    rows; the forward is unchanged.
    """

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device).expand(B, T)  # (B, T)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                              token_type_ids=torch.zeros_like(input_ids)).last_hidden_state  # (B, T, d)
        return self.head(self.dropout(mean_pool_normalize(hidden, attention_mask)))  # (B, K)


class DPMiniLMClassifier:
    """MiniLM encoder + mean pooling + linear head (``MiniLMClassifierModule``), every parameter trained
    with DP-SGD (Poisson batches, per-example clipping over the whole network, noise, Adam).

    BERT's Linear, Embedding (word, position, token type) and LayerNorm layers are all supported by the
    engine, so nothing is frozen except the unused pooler. Minutes per hundred steps on a CPU; meant for
    a GPU.
    """

    def __init__(self, config: DPClassifierConfig, dropout: float = 0.1) -> None:
        self.config = config
        self.dropout = dropout
        self.label_names: tuple[str, ...] = ()
        self.module: MiniLMClassifierModule | None = None
        self.tokenizer = None
        self.epsilon: float | None = None
        self.noise_multiplier: float | None = None

    def _encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.config.max_length,
                             return_tensors="pt")
        return {k: enc[k].to(self.config.device) for k in ("input_ids", "attention_mask")}

    def fit(self, train: LabelledTexts) -> DPMiniLMClassifier:
        from ghostdp.integrations.synthetic.embeddings import load_minilm

        cfg = self.config
        n = len(train)
        setup = _dp_setup(n, cfg)
        torch.manual_seed(cfg.seed)
        self.tokenizer, encoder = load_minilm(cfg.model_dir, cfg.device)
        pooler = getattr(encoder, "pooler", None)
        if pooler is not None:  # not used by mean pooling: it would get no gradient
            pooler.requires_grad_(False)
        self.label_names = train.label_names
        module = _PerExampleMiniLMModule(encoder, len(self.label_names), self.dropout).to(cfg.device)
        targets = torch.tensor([self.label_names.index(v) for v in train.labels], dtype=torch.long)
        opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=cfg.learning_rate)

        def batch_loss(chunk: torch.Tensor) -> torch.Tensor:
            logits = module(**self._encode([train.texts[i] for i in chunk]))  # (b, K)
            return F.cross_entropy(logits.float(), targets[chunk].to(cfg.device), reduction="none").sum()

        self.epsilon = fit_dp_sgd(module, opt, n, cfg, setup, batch_loss,
                                  physical_batch_size=cfg.physical_batch_size, desc="DP MiniLM")
        self.noise_multiplier = setup[2]
        self.module = module.eval()
        return self

    @torch.inference_mode()
    def predict(self, texts: Sequence[str]) -> list[str]:
        if self.module is None:
            raise RuntimeError("DPMiniLMClassifier.predict called before fit.")
        texts = list(texts)
        out: list[str] = []
        for s in range(0, len(texts), 128):
            logits = self.module(**self._encode(texts[s:s + 128]))
            out.extend(self.label_names[i] for i in logits.argmax(1).tolist())
        return out
