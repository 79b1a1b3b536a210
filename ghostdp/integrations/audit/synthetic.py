"""Audit of released synthetic text: does text sampled from the DP model contain or favour the canaries?

Same game as the model audit (Steinke et al. 2023), with a black-box score computed from the synthetic
corpus only (what is released), so the bound is for the synthetic data as published. By post-processing it
can never exceed the model's epsilon; a bound above the claim means the mechanism is broken.

Scores (higher = "looks trained on"):
- secret_text canaries: ``count_i + prefix_i / (n + 1)``, where count_i is how many synthetic texts contain
  canary i's n-digit secret and prefix_i the longest prefix of the secret found in the corpus (a tie-breaker
  in [0, 1): a favoured secret is partly reproduced before it is reproduced whole).
- random_tokens canaries: the fraction of the canary's token k-grams (default k = 3) that occur in the
  tokenised synthetic corpus.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ghostdp.integrations.audit.canaries import Canaries
from ghostdp.integrations.audit.guesses import best_guesses

log = logging.getLogger(__name__)

__all__ = ["audit_synthetic_text", "generate_texts", "synthetic_scores"]


def synthetic_scores(canaries: Canaries, texts: Sequence[str], *, tokenizer: Any = None, ngram: int = 3) -> np.ndarray:
    """(m,) scores of the canaries against the synthetic corpus ``texts`` (see the module docstring)."""
    if canaries.kind == "secret_text":
        corpus = "\n".join(texts)
        scores = []
        for secret in canaries.secrets:
            count = sum(secret in t for t in texts)
            prefix = next((k for k in range(len(secret), 0, -1) if secret[:k] in corpus), 0)
            scores.append(count + prefix / (len(secret) + 1))
        return np.asarray(scores, dtype=float)
    if tokenizer is None:
        raise ValueError("random_tokens canaries are matched on token ids: pass tokenizer= (the model's)")
    grams: set[tuple[int, ...]] = set()
    for t in texts:
        ids = tokenizer.encode(t, add_special_tokens=False)
        grams.update(tuple(ids[i:i + ngram]) for i in range(len(ids) - ngram + 1))
    scores = []
    for ids in canaries.token_ids:
        own = [tuple(ids[i:i + ngram]) for i in range(len(ids) - ngram + 1)]
        scores.append(sum(g in grams for g in own) / max(1, len(own)))
    return np.asarray(scores, dtype=float)


def generate_texts(
    model: Any, tokenizer: Any, *, num_samples: int, max_new_tokens: int = 32, temperature: float = 1.0,
    batch_size: int = 16, seed: int = 0, prompt: str | None = None,
) -> list[str]:
    """``num_samples`` texts sampled from ``model`` with the app's sampler (``synthesize.generate_batch``).

    Each batch continues ``prompt`` (default: just the BOS token, else EOS), seeded by (seed, batch).
    """
    import torch

    from ghostdp.integrations.synthetic.config import SynthesizeConfig
    from ghostdp.integrations.synthetic.synthesize import batch_seed, generate_batch

    config = SynthesizeConfig(num_samples=num_samples, temperature=temperature, max_new_tokens=max_new_tokens,
                              gen_batch_size=batch_size)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prefix = ([start] if start is not None else []) + (tokenizer.encode(prompt, add_special_tokens=False) if prompt else [])
    if not prefix:
        raise ValueError("the tokenizer has neither BOS nor EOS: pass prompt= to start the samples from")
    device = next(model.parameters()).device
    texts: list[str] = []
    model.eval()
    for b in range((num_samples + batch_size - 1) // batch_size):
        n = min(batch_size, num_samples - len(texts))
        batch = generate_batch(model, prefix, n=n, config=config, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id, tokenizer=tokenizer, seed=batch_seed(seed, 0, b),
                               device=device if isinstance(device, torch.device) else torch.device(device))
        texts.extend(t for t, _ in batch)
    return texts


def audit_synthetic_text(
    canaries: Canaries, texts: Sequence[str], *, tokenizer: Any = None, confidence: float = 0.95, delta: float = 0.0,
    claimed_epsilon: float = float("inf"), accountant_epsilon: float = float("inf"), seed: int = 0, ngram: int = 3,
    model_result: Any = None,
):
    """Bound epsilon from the synthetic corpus alone. -> ``AuditResult`` with ``what="synthetic"``.

    ``model_result`` (the model audit's ``AuditResult``) supplies the run's sigma, q and steps for the report.
    """
    from ghostdp.integrations.audit.run import AuditResult

    t0 = time.perf_counter()
    scores = synthetic_scores(canaries, texts, tokenizer=tokenizer, ngram=ngram)
    best, tried = best_guesses(scores, canaries.included, confidence=confidence, delta=delta, seed=seed)
    mr = model_result
    result = AuditResult(
        epsilon_lower_bound=best.epsilon_lower_bound, claimed_epsilon=float(claimed_epsilon),
        accountant_epsilon=float(accountant_epsilon), delta=delta, confidence=confidence,
        noise_multiplier=mr.noise_multiplier if mr else float("nan"), sample_rate=mr.sample_rate if mr else float("nan"),
        steps=mr.steps if mr else 0, num_canaries=len(canaries), best=best, tried=tried, scores=scores,
        included=canaries.included, seconds={"score": time.perf_counter() - t0}, what="synthetic",
        score_kind="secret occurrences" if canaries.kind == "secret_text" else f"{ngram}-gram overlap",
    )
    level = logging.ERROR if result.exceeds_claim else logging.INFO
    log.log(level, "audit (synthetic, %d texts): epsilon >= %.3f (%d/%d correct guesses); claimed %.3f", len(texts),
            result.epsilon_lower_bound, best.num_correct, best.num_guesses, claimed_epsilon)
    return result
