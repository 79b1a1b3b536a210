"""What the runs of one study (or one ``--seeds`` repetition) compute once instead of once per run.

Every cell of ``ghostdp study`` evaluates against the same private and held-out data with the same
un-finetuned base model; only the generator and its samples change. Recomputed per cell, these shared
parts were about half of a CPU cell (bench/results/study_cpu.md): the MiniLM embeddings of the 2,000
private and 300 held-out rows, the base model's held-out perplexity, and the prior-knowledge floor (samples
of the base model, filtered by the base model). :class:`SharedEvaluation` keeps them:

* **embeddings**: :class:`MemoEmbedder` embeds each distinct text once per process;
* **base perplexity**: one figure per (base model, rows, length limit) per process;
* **floor samples**: one folder per floor recipe under ``root`` (``floor-<key>``), on disk, so a resumed
  study reuses it too. The key holds everything the samples depend on (base model, label prefixes,
  sampling parameters and seed, filter margin, sample count), but not the per-label counts: the first run
  that needs a floor fixes them from its synthetic set's label shares, and later runs reuse that floor (the
  shares differ between runs only by the label-count noise, a row or two). The repeats of ``--seeds`` and
  the study's seeds each have their own sample seed, so each draws its own floor (the floor's spread is part
  of the comparison); the cells of one study seed share one. The floor is public (base model and prompts
  only), so sharing it between runs of the same private data changes nothing in privacy.

Nothing private is stored here beyond what each run's own evaluation already reads; the folder holds the
floor samples (base-model text) only.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MemoEmbedder", "SharedEvaluation"]

logger = logging.getLogger(__name__)


class MemoEmbedder:
    """Wraps an embedder (``embed(texts) -> (n, d) float32``); each distinct text is embedded once.

    Other attributes (``dim``, ``config``) are the wrapped embedder's.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._memo: dict[str, np.ndarray] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        new = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if new:
            for t, v in zip(new, self.inner.embed(new)):
                self._memo[t] = v
        if not texts:
            return self.inner.embed([])
        return np.stack([self._memo[t] for t in texts])


@dataclass
class SharedEvaluation:
    """The evaluation parts shared by the runs of one study; ``root`` holds the shared floor folders."""

    root: Path
    embedder: Any | None = None
    base_perplexity: dict[str, dict[str, Any]] = field(default_factory=dict)

    def get_embedder(self, make: Any) -> Any:
        """The shared :class:`MemoEmbedder`, built with ``make()`` on first use."""
        if self.embedder is None:
            self.embedder = MemoEmbedder(make())
        return self.embedder

    def floor_dir(self, recipe: dict[str, Any]) -> Path:
        """The folder of the floor made by ``recipe`` (a JSON-able dict of everything the samples depend on)."""
        return Path(self.root) / f"floor-{self.text_key(recipe)[:16]}"

    @staticmethod
    def floor_targets(folder: Path) -> dict[str, int] | None:
        """The per-label targets a shared floor folder was made with (None: not made yet)."""
        meta = folder / "synthetic_meta.json"
        try:
            return {k: int(v) for k, v in json.loads(meta.read_text(encoding="utf-8"))["targets"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    @staticmethod
    def text_key(*parts: Any) -> str:
        """A hex digest of JSON-able ``parts`` (dict keys in any order give the same key)."""
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()
