"""A run folder's layout and the data a run reads: private training rows, real held-out rows, and the
keyed fingerprint that ties a trained model to its data without revealing it.

Shared by the pipeline stages and the evaluation, so neither imports the other.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from ghostdp.integrations.synthetic.config import ConfigError, DataConfig
from ghostdp.integrations.synthetic.text_data import LabelledTexts, TextDataConfig, data_hash, load_labelled_texts, load_sst2

__all__ = ["MODEL_DIR", "RunPaths", "data_fingerprint", "load_eval_data", "load_private_data"]

MODEL_DIR = "model"


@dataclass(frozen=True)
class RunPaths:
    """The folders of one run (see the module docstring)."""

    root: Path

    @property
    def model(self) -> Path:
        return self.root / MODEL_DIR

    @property
    def synthetic(self) -> Path:
        return self.root / "synthetic"

    @property
    def floor(self) -> Path:
        return self.root / "floor"

    @property
    def private(self) -> Path:
        return self.root / "private"

    @property
    def report(self) -> Path:
        return self.root / "report.md"


def _load(spec: str, rows: int | None, cfg: DataConfig, role: str) -> LabelledTexts:
    if spec.startswith("sst2:"):
        split = spec.split(":", 1)[1]
        if split not in ("train", "dev", "test"):
            raise ConfigError(f"data.{role}={spec!r}: SST-2 splits are sst2:train, sst2:dev and sst2:test.")
        return load_sst2(split, data_dir=cfg.sst2_dir, sample=rows, seed=cfg.data_seed)
    return load_labelled_texts(TextDataConfig(
        source=spec, text_column=cfg.text_column, label_column=cfg.label_column,
        label_names=dict(cfg.label_names) if cfg.label_names is not None else None, sample=rows, seed=cfg.data_seed,
    ))


def load_private_data(cfg: DataConfig) -> LabelledTexts:
    """The private training set (``train_data``, subset to ``train_rows``)."""
    return _load(cfg.train_data, cfg.train_rows, cfg, "train_data")


def load_eval_data(cfg: DataConfig, label_names: tuple[str, ...] | None = None) -> LabelledTexts:
    """The real held-out set; with ``label_names``, checked to use only the generator's labels."""
    data = _load(cfg.eval_data, cfg.eval_rows, cfg, "eval_data")
    if label_names is not None:
        extra = sorted(set(data.labels) - set(label_names))
        if extra:
            raise ConfigError(
                f"data.eval_data {data.source} has labels {extra} the generator was not trained on "
                f"({list(label_names)}); evaluate on data with the same label set."
            )
        data = LabelledTexts(data.texts, data.labels, tuple(label_names), source=data.source)
    return data


def _data_key(paths: RunPaths) -> bytes:
    path = paths.private / "data_key"
    if not path.is_file():
        paths.private.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return bytes.fromhex(path.read_text().strip())


def data_fingerprint(data: LabelledTexts, paths: RunPaths) -> str:
    """``HMAC-SHA256(key, data_hash(data))`` with this run's secret key (see the module docstring)."""
    return hmac.new(_data_key(paths), data_hash(data).encode("ascii"), hashlib.sha256).hexdigest()
