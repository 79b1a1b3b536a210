"""A run folder's layout and the data a run reads: private training rows, real held-out rows, and the
keyed fingerprint that ties a trained model to its data without revealing it; the folder's lock and
atomic writes.

Shared by the pipeline stages and the evaluation, so neither imports the other.

Lock: a stage that writes into a run folder holds an exclusive ``fcntl.flock`` on ``<run>/.ghostdp.lock``
for its whole duration (the kernel drops it when the process dies, so a crash never leaves the folder
locked). A second process gets a :class:`RunFolderBusyError` naming the holder (command, pid, start time).
Within one process the lock is re-entrant (``pipeline`` holds it across its stages).
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ghostdp.integrations.synthetic.config import ConfigError, DataConfig
from ghostdp.integrations.synthetic.text_data import (
    LabelledTexts,
    TextDataConfig,
    data_hash,
    load_labelled_texts,
    load_sst2,
)

__all__ = [
    "LOCK_FILE",
    "MODEL_DIR",
    "RunFolderBusyError",
    "RunPaths",
    "check_fingerprint",
    "check_heldout_disjoint",
    "data_fingerprint",
    "load_eval_data",
    "load_private_data",
    "lock_run_folder",
    "setting_differences",
    "write_text_atomic",
]

logger = logging.getLogger(__name__)

MODEL_DIR = "model"
LOCK_FILE = ".ghostdp.lock"


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

    @property
    def trainer(self) -> Path:
        """The Trainer's working folder: checkpoints (model, optimizer, sampler, privacy ledger)."""
        return self.private / "trainer"

    @property
    def training_record(self) -> Path:
        """Private diagnostics of training (per-step losses on private batches, N, time): NOT releasable."""
        return self.private / "training.json"

    @property
    def attempt(self) -> Path:
        """The settings of the training attempt the checkpoints belong to (checked before resuming)."""
        return self.private / "train_attempt.json"

    @property
    def config(self) -> Path:
        """The configuration of the stages that succeeded (written on success only)."""
        return self.root / "config.toml"


def _load(spec: str | None, rows: int | None, cfg: DataConfig, role: str) -> LabelledTexts:
    if spec is None:
        raise ConfigError(
            f"data.{role} is not set: the private data ({cfg.train_data}) is not the built-in SST-2, so the "
            "evaluation needs real held-out rows of the same task. Name them with --eval-data FILE (or [data] "
            "eval_data in the TOML file)."
        )
    if spec.startswith("sst2:"):
        split = spec.split(":", 1)[1]
        if split not in ("train", "dev", "test"):
            raise ConfigError(f"data.{role}={spec!r}: SST-2 splits are sst2:train, sst2:dev and sst2:test.")
        try:
            return load_sst2(split, data_dir=cfg.sst2_dir, sample=rows, seed=cfg.data_seed)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"data.{role}={spec!r}: {exc}") from exc
    path = Path(spec)
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir() if p.suffix.lower() in (".csv", ".tsv", ".jsonl", ".parquet"))
        raise ConfigError(
            f"data.{role}={spec!r} is a folder, not a file: name the data file itself"
            + (f" (this folder holds {found[:8]})." if found else " (.csv, .tsv, .jsonl or .parquet).")
        )
    try:
        return load_labelled_texts(TextDataConfig(
            source=spec, text_column=cfg.text_column, label_column=cfg.label_column,
            label_names=dict(cfg.label_names) if cfg.label_names is not None else None, sample=rows,
            seed=cfg.data_seed,
        ))
    except (OSError, ValueError) as exc:  # the message names the file and the row; add which setting it is
        raise ConfigError(f"data.{role}={spec!r}: {exc}") from exc


def load_private_data(cfg: DataConfig) -> LabelledTexts:
    """The private training set (``train_data``, subset to ``train_rows``)."""
    data = _load(cfg.train_data, cfg.train_rows, cfg, "train_data")
    if cfg.train_rows is not None and len(data) < cfg.train_rows:
        logger.warning("data.train_rows=%d but %s has %d rows: all of them are used (N=%d in the accounting).",
                       cfg.train_rows, data.source, len(data), len(data))
    return data


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


#: Refuse held-out data when at least this share of its texts is also in the training data.
HELDOUT_OVERLAP_LIMIT = 0.5


def check_heldout_disjoint(private: LabelledTexts, heldout: LabelledTexts) -> int:
    """Refuse held-out data that is (mostly) the training data; return how many held-out texts are also
    training texts (compared after stripping whitespace and case-folding).

    Comparing settings alone misses a copy of the training file under another name. A few shared texts are
    common in real data (short reviews repeat) and are only logged; at least ``HELDOUT_OVERLAP_LIMIT`` of the
    held-out texts in the training set means the evaluation would score the model on what it trained on.
    Raises ``ConfigError`` naming both sources.
    """
    def key(t: str) -> str:
        return " ".join(t.split()).casefold()

    train = {key(t) for t in private.texts}
    shared = sum(key(t) in train for t in heldout.texts)
    if heldout.texts and shared >= HELDOUT_OVERLAP_LIMIT * len(heldout.texts):
        raise ConfigError(
            f"data.eval_data {heldout.source}: {shared} of its {len(heldout.texts)} texts are also in the training "
            f"data {private.source}, so it is not held out (a copy of the training file?). Evaluation must use "
            "REAL rows the generator never trained on: name another file with --eval-data."
        )
    if shared:
        logger.warning("%d of the %d held-out texts in %s also occur in the training data %s; they stay in the "
                       "evaluation.", shared, len(heldout.texts), heldout.source, private.source)
    return shared


def _data_key(paths: RunPaths, *, create: bool = True) -> bytes:
    path = paths.private / "data_key"
    if not path.is_file():
        if not create:
            raise ConfigError(
                f"{path} is missing: it is the secret key of the data fingerprint in {paths.model}, so which data "
                "the generator was trained on cannot be checked (this is not a sign of other data). Restore the "
                "file from a copy of this run folder; without it, evaluate in a copy of the folder with a fresh "
                "training run."
            )
        paths.private.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return bytes.fromhex(path.read_text().strip())


def data_fingerprint(data: LabelledTexts, paths: RunPaths) -> str:
    """``HMAC-SHA256(key, data_hash(data))`` with this run's secret key (see the module docstring)."""
    return hmac.new(_data_key(paths), data_hash(data).encode("ascii"), hashlib.sha256).hexdigest()


def check_fingerprint(data: LabelledTexts, paths: RunPaths, expected: str, settings: str,
                      differences: list[str] | None = None) -> None:
    """ConfigError unless ``data`` is the data whose keyed fingerprint is ``expected`` (the key must exist).

    ``settings`` says where the run's data settings are; ``differences`` (from :func:`setting_differences`)
    are named in the message.
    """
    got = hmac.new(_data_key(paths, create=False), data_hash(data).encode("ascii"), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(got, expected):
        raise ConfigError(
            "The private data configured now is not the data the generator was trained on (fingerprint mismatch"
            + (f"; settings that differ: {'; '.join(differences)}" if differences else "; the settings are the same, "
               "so the file's content changed") + "): the baselines and the memorisation check would compare "
            f"against other texts. Use {settings}."
        )


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader (or a crash) sees the old
    file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class RunFolderBusyError(ConfigError):
    """Another process holds the run folder's lock."""


_HELD: dict[Path, int] = {}  # run folders this process has locked -> nesting depth


@contextlib.contextmanager
def lock_run_folder(root: str | Path, stage: str) -> Iterator[None]:
    """Hold ``<root>/.ghostdp.lock`` exclusively while ``stage`` writes the folder (see the module docstring)."""
    import fcntl

    root = Path(root).resolve()
    if root in _HELD:
        _HELD[root] += 1
        try:
            yield
        finally:
            _HELD[root] -= 1
        return
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
        except ValueError:
            holder = {}
        os.close(fd)
        who = (f"`ghostdp {holder.get('stage', '?')}` (pid {holder.get('pid', '?')}, since {holder.get('since', '?')})"
               if holder else "another process")
        raise RunFolderBusyError(
            f"{root} is in use by {who}: two processes writing one run folder would corrupt it. Wait for it to "
            f"finish (or stop it), or use another --run-dir."
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"stage": stage, "pid": os.getpid(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode("utf-8"), 0)
        _HELD[root] = 1
        try:
            yield
        finally:
            del _HELD[root]
            os.ftruncate(fd, 0)
            if created and [p.name for p in root.iterdir()] == [LOCK_FILE]:  # refused before writing anything:
                (root / LOCK_FILE).unlink()  # leave no trace of a folder this call made
                with contextlib.suppress(OSError):
                    root.rmdir()
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def setting_differences(recorded: dict[str, Any] | None, now: dict[str, Any]) -> list[str]:
    """``"train.target_epsilon: 3.0 (run folder) -> 5.0 (this command)"`` for each setting that differs."""
    old, new = _flatten(recorded or {}), _flatten(now)
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<unset>") != new.get(key, "<unset>"):
            out.append(f"{key}: {_show(old.get(key, '<not recorded>'))} (run folder) -> "
                       f"{_show(new.get(key, '<unset>'))} (this command)")
    return out


def _show(v: Any) -> str:
    return "none" if v is None else repr(v)
