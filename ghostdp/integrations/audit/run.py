"""One audited DP training run (Steinke, Nasr, Jagielski, NeurIPS 2023, Algorithm 1) on ghostdp's engine.

1. Draw m canaries and their coin flips (``canaries.make_canaries``); the training set is the private data
   plus the canaries whose coin came up "in".
2. Train exactly as a real run: ``PrivacyEngine`` (per-example clipping to C, Gaussian noise sigma·C once per
   step), ``PoissonBatchSampler`` at rate q, ``per_example_lm_loss``, and the engine's accountant. q is the
   public ``expected_batch_size / (n_data + m)``: it must not depend on the coin flips.
3. Score every canary (``scoring``: loss drop against the base model, or white-box), guess in / out / abstain
   and turn the correct guesses into an epsilon lower bound (``guesses``, ``bounds``; Theorem 3 there).

If the bound exceeds the claimed epsilon (by default the accountant's), the run was not as private as
claimed: a bug in the mechanism, its accounting, or a claim made for another run. ``AuditResult.exceeds_claim``.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from ghostdp.integrations.audit.canaries import Canaries, CanaryKind, make_canaries
from ghostdp.integrations.audit.guesses import GuessResult, best_guesses

log = logging.getLogger(__name__)

__all__ = ["AuditConfig", "AuditResult", "audit_model", "train_dp"]

#: How each score is labelled in results and plots.
SCORE_LABELS = {"loss": "loss drop vs base (nats)", "white_box": "white-box: -<grad L(theta_0), update>"}


@dataclass(frozen=True)
class AuditConfig:
    """One audit run. Give ``target_epsilon`` (noise calibrated by the accountant) or ``noise_multiplier``.

    Canaries: ``num_canaries`` (m) of ``canary_kind``, ``canary_length`` tokens (random_tokens) or a
    ``secret_digits``-digit secret (secret_text). Training, as a real run: clipping bound ``max_grad_norm`` (C),
    Poisson rate q = ``expected_batch_size`` / (n_data + m), ``steps`` noisy steps of ``optimizer`` at
    ``learning_rate``, ``physical_batch_size`` examples per backward pass, the engine's ``clipping`` rule.
    Audit: ``score`` ("loss" drop or "white_box"), the bound's ``confidence`` and ``delta``, and the epsilon it
    is held against (``claimed_epsilon``; default the accountant's epsilon at ``delta``). ``seed`` seeds
    canaries, coin flips, sampling and noise (None: from the OS); a known seed makes the run non-private.
    """

    num_canaries: int = 256
    canary_kind: CanaryKind = "random_tokens"
    canary_length: int = 16
    secret_digits: int = 6
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    expected_batch_size: float = 16.0
    steps: int = 100
    learning_rate: float = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    physical_batch_size: int = 32
    score: Literal["loss", "white_box"] = "loss"
    confidence: float = 0.95
    claimed_epsilon: float | None = None
    clipping: Literal["auto", "ghost", "per_sample"] = "auto"
    seed: int | None = None

    def __post_init__(self) -> None:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError(
                "give exactly one of target_epsilon (noise calibrated by the accountant, as a real run) and "
                f"noise_multiplier (a fixed sigma); got target_epsilon={self.target_epsilon!r}, "
                f"noise_multiplier={self.noise_multiplier!r}"
            )
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ValueError(f"target_epsilon must be > 0, got {self.target_epsilon!r}")
        if self.noise_multiplier is not None and not self.noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0 (0: no noise, no privacy), got {self.noise_multiplier!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta!r}")
        if self.num_canaries < 2:
            raise ValueError(f"num_canaries must be >= 2, got {self.num_canaries!r}")
        if self.steps < 1 or self.physical_batch_size < 1:
            raise ValueError(f"steps and physical_batch_size must be >= 1, got {self.steps!r}, {self.physical_batch_size!r}")
        if self.expected_batch_size <= 0:
            raise ValueError(f"expected_batch_size must be > 0, got {self.expected_batch_size!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.score not in ("loss", "white_box"):
            raise ValueError(f"score must be 'loss' or 'white_box', got {self.score!r}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), e.g. 0.95, got {self.confidence!r}")


@dataclass
class AuditResult:
    """The audit's numbers. ``scores`` and ``included`` (the coin flips) are the audit's secret data."""

    epsilon_lower_bound: float
    claimed_epsilon: float
    accountant_epsilon: float
    delta: float
    confidence: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    num_canaries: int
    best: GuessResult
    tried: list[GuessResult]
    scores: np.ndarray
    included: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)
    what: str = "model"
    score_kind: str = "loss"

    @property
    def exceeds_claim(self) -> bool:
        """True when the lower bound is above the claimed epsilon: the run is less private than claimed."""
        return self.epsilon_lower_bound > self.claimed_epsilon

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no per-canary scores or coin flips)."""
        return {
            "what": self.what, "score": self.score_kind,
            "epsilon_lower_bound": self.epsilon_lower_bound, "claimed_epsilon": self.claimed_epsilon,
            "accountant_epsilon": self.accountant_epsilon, "delta": self.delta, "confidence": self.confidence,
            "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate, "steps": self.steps,
            "num_canaries": self.num_canaries, "exceeds_claim": self.exceeds_claim,
            "best": asdict(self.best), "tried": [asdict(g) for g in self.tried], "seconds": dict(self.seconds),
        }


def _optimizer(model: torch.nn.Module, config: AuditConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: unfreeze what the real run trains (or add LoRA)")
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.learning_rate)
    return torch.optim.SGD(params, lr=config.learning_rate)


def train_dp(
    model: torch.nn.Module, train_seqs: Sequence[Sequence[int]], *, config: AuditConfig, sample_rate: float,
    normaliser: float, noise_multiplier: float, pad_token_id: int, seed: int,
):
    """DP-SGD as a real run: PoissonBatchSampler(q) batches, per-example LM loss, PrivacyEngine step. -> engine.

    Empty Poisson batches still take an optimizer step (the noise is added; the analysis assumes it).
    """
    from ghostdp.engine.loss import per_example_lm_loss
    from ghostdp.engine.privacy_engine import PrivacyEngine
    from ghostdp.engine.sampling import PoissonBatchSampler
    from ghostdp.integrations.audit.scoring import collate_sequences

    optimizer = _optimizer(model, config)
    engine = PrivacyEngine(
        model, optimizer, max_grad_norm=config.max_grad_norm, expected_batch_size=normaliser,
        noise_multiplier=noise_multiplier, loss_reduction="sum", clipping=config.clipping, sample_rate=sample_rate,
        generator=torch.Generator(device=next(model.parameters()).device).manual_seed(seed + 1),
    )
    sampler = PoissonBatchSampler(len(train_seqs), sample_rate, generator=torch.Generator().manual_seed(seed + 2), steps=config.steps)
    device = next(model.parameters()).device
    model.train()
    for step, indices in enumerate(sampler):
        optimizer.zero_grad(set_to_none=True)
        for start in range(0, len(indices), config.physical_batch_size):
            chunk = [train_seqs[i] for i in indices[start:start + config.physical_batch_size]]
            batch = {k: v.to(device) for k, v in collate_sequences(chunk, pad_token_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            per_example_lm_loss(logits, batch["labels"]).sum().backward()
        optimizer.step()
        if step % max(1, config.steps // 10) == 0:
            log.info("audit training step %d/%d, batch %d", step + 1, config.steps, len(indices))
    engine.detach()
    return engine


def audit_model(
    model: torch.nn.Module,
    config: AuditConfig,
    *,
    data: Sequence[Sequence[int]] = (),
    tokenizer: Any = None,
    vocab_size: int | None = None,
    pad_token_id: int | None = None,
    canaries: Canaries | None = None,
) -> tuple[AuditResult, Canaries]:
    """Insert canaries into ``data`` (token-id sequences), DP-train ``model`` in place, score, bound.

    Returns (result, canaries); the model is left trained (e.g. to audit synthetic text sampled from it).
    ``vocab_size`` defaults to ``model.config.vocab_size``; ``pad_token_id`` to the tokenizer's, else 0.
    """
    from ghostdp.accounting import calibrate_noise_multiplier
    from ghostdp.integrations.audit.scoring import sequence_losses, white_box_scores

    seed = config.seed if config.seed is not None else int.from_bytes(np.random.default_rng().bytes(4), "little")
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
        pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
    if canaries is None:
        V = vocab_size or (None if tokenizer is not None else getattr(getattr(model, "config", None), "vocab_size", None))
        canaries = make_canaries(
            config.num_canaries, kind=config.canary_kind, vocab_size=V, tokenizer=tokenizer, length=config.canary_length,
            secret_digits=config.secret_digits, seed=seed, exclude_ids=(pad_token_id,),
        )
    m = len(canaries)
    n_public = len(data) + m  # the sampling rate may not depend on the coin flips
    sample_rate = min(1.0, config.expected_batch_size / n_public)
    normaliser = sample_rate * (len(data) + m / 2)  # expected batch size, public
    if config.noise_multiplier is not None:
        sigma = float(config.noise_multiplier)
    else:
        sigma = calibrate_noise_multiplier(
            target_epsilon=config.target_epsilon, delta=config.delta, sample_rate=sample_rate, steps=config.steps,
        )
    log.info("audit: m=%d canaries (%d in), n_data=%d, q=%.4g, steps=%d, sigma=%.4g", m, int(canaries.included.sum()),
             len(data), sample_rate, config.steps, sigma)

    seqs, positions = list(canaries.token_ids), list(canaries.score_positions)
    t0 = time.perf_counter()
    before = sequence_losses(model, seqs, positions, pad_token_id=pad_token_id, batch_size=config.physical_batch_size)
    start_params = None
    if config.score == "white_box":
        start_params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    t1 = time.perf_counter()
    train_seqs = list(data) + canaries.in_training()
    engine = train_dp(model, train_seqs, config=config, sample_rate=sample_rate, normaliser=normaliser,
                      noise_multiplier=sigma, pad_token_id=pad_token_id, seed=seed)
    t2 = time.perf_counter()
    if config.score == "white_box":
        scores = white_box_scores(model, start_params, seqs, positions, pad_token_id=pad_token_id)
    else:
        after = sequence_losses(model, seqs, positions, pad_token_id=pad_token_id, batch_size=config.physical_batch_size)
        scores = before - after
    t3 = time.perf_counter()
    eps_acc = engine.epsilon(config.delta) if sigma > 0 else math.inf
    claimed = config.claimed_epsilon if config.claimed_epsilon is not None else eps_acc
    best, tried = best_guesses(scores, canaries.included, confidence=config.confidence, delta=config.delta, seed=seed)
    result = AuditResult(
        epsilon_lower_bound=best.epsilon_lower_bound, claimed_epsilon=float(claimed), accountant_epsilon=float(eps_acc),
        delta=config.delta, confidence=config.confidence, noise_multiplier=sigma, sample_rate=sample_rate,
        steps=config.steps, num_canaries=m, best=best, tried=tried, scores=np.asarray(scores), included=canaries.included,
        seconds={"train": t2 - t1, "score": (t1 - t0) + (t3 - t2)}, what="model", score_kind=SCORE_LABELS[config.score],
    )
    level = logging.ERROR if result.exceeds_claim else logging.INFO
    log.log(level, "audit (model): epsilon >= %.3f at %.0f%% confidence (%d/%d correct guesses); claimed %.3f%s",
            result.epsilon_lower_bound, 100 * config.confidence, best.num_correct, best.num_guesses, claimed,
            " -- EXCEEDS THE CLAIM" if result.exceeds_claim else "")
    return result, canaries
