"""Hyperparameter-ranking fidelity: can the downstream model be tuned on the DP synthetic data?

Kurakin et al. (arXiv 2306.01684) claim that DP synthetic data ranks the hyperparameters of a downstream
model the way the real data would. This module checks it on the user's own data: every configuration of a
grid is trained twice, once on the synthetic set and once on the real private training set, and both
models are scored on the REAL held-out set. Reported:

- Spearman's rho and Kendall's tau between the two accuracy vectors (``scipy.stats.spearmanr`` /
  ``kendalltau``, tau-b, which handles ties), with their p-values;
- the regret: ``acc_real(real-best config) - acc_real(synthetic-best config)``, the held-out accuracy lost
  by picking the configuration that looks best on synthetic data (0 when both pick the same one; ties are
  broken by grid order, first wins, the same rule on both sides);
- a plot of the two accuracies per configuration (``hparam.png``).

Grids: the linear probe on frozen MiniLM embeddings (``C`` x ``class_weight``, the default; seconds on CPU)
or the fine-tuned MiniLM classifier (``lr`` x ``epochs`` x ``weight_decay``; minutes per configuration on
CPU). Written as ``"C=0.01,0.1,1,10;class_weight=none,balanced"`` (``ghostdp evaluate --hparam-grid``).

The real-data side reads the private training set: like the rest of the evaluation, the result is for the
data owner (it is what the synthetic data is meant to replace), not a release.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ghostdp.integrations.synthetic.text_data import LabelledTexts

__all__ = [
    "HParamGrid",
    "hparam_fidelity",
    "hparam_run",
    "parse_grid",
    "rank_fidelity",
    "score_grid",
    "write_hparam",
]

logger = logging.getLogger(__name__)

_PROBE_KEYS = ("C", "class_weight")
_FINETUNE_KEYS = ("lr", "epochs", "weight_decay")
DEFAULT_GRID = "C=0.001,0.01,0.1,1,10,100;class_weight=none,balanced"


@dataclass(frozen=True)
class HParamGrid:
    """A grid of downstream-classifier settings; every combination is one configuration.

    Args:
        classifier: ``"linear_probe"`` (logistic regression on frozen MiniLM embeddings) or ``"minilm"``
            (MiniLM fine-tuned with a linear head).
        C: inverse L2 strength of the probe's logistic regression (linear_probe).
        class_weight: ``None`` or ``"balanced"`` (linear_probe).
        lr: AdamW learning rate of the encoder (minilm).
        epochs: passes over the training set (minilm).
        weight_decay: AdamW weight decay (minilm).
    """

    classifier: Literal["linear_probe", "minilm"] = "linear_probe"
    C: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
    class_weight: tuple[str | None, ...] = (None, "balanced")
    lr: tuple[float, ...] = (1e-5, 5e-5, 2e-4)
    epochs: tuple[int, ...] = (1, 3)
    weight_decay: tuple[float, ...] = (0.01,)

    def __post_init__(self) -> None:
        if self.classifier not in ("linear_probe", "minilm"):
            raise ValueError(f"HParamGrid.classifier={self.classifier!r}: use 'linear_probe' or 'minilm'.")
        if any(c <= 0 for c in self.C):
            raise ValueError(f"HParamGrid.C={self.C}: every C must be > 0 (inverse regularisation strength).")
        if any(w not in (None, "balanced") for w in self.class_weight):
            raise ValueError(f"HParamGrid.class_weight={self.class_weight}: use none or balanced.")
        if any(x <= 0 for x in self.lr) or any(e < 1 for e in self.epochs) or any(w < 0 for w in self.weight_decay):
            raise ValueError(f"HParamGrid: lr {self.lr} must be > 0, epochs {self.epochs} >= 1, weight_decay "
                             f"{self.weight_decay} >= 0.")
        keys = _PROBE_KEYS if self.classifier == "linear_probe" else _FINETUNE_KEYS
        if any(len(getattr(self, k)) == 0 for k in keys):
            raise ValueError(f"HParamGrid: every axis of the {self.classifier} grid ({', '.join(keys)}) needs a value.")

    def configs(self) -> list[dict[str, Any]]:
        """Every configuration, in grid order (the last axis varies fastest)."""
        keys = _PROBE_KEYS if self.classifier == "linear_probe" else _FINETUNE_KEYS
        return [dict(zip(keys, values)) for values in itertools.product(*(getattr(self, k) for k in keys))]


def parse_grid(text: str) -> HParamGrid:
    """``"C=0.01,0.1,1;class_weight=none,balanced"`` (linear probe) or ``"lr=1e-5,5e-5;epochs=1,3"`` (minilm).

    Axes are separated by ``;``, values by ``,``. An axis left out keeps the grid's default.
    """
    axes: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, sep, values = part.partition("=")
        key = key.strip()
        if not sep or not values.strip():
            raise ValueError(f"--hparam-grid part {part!r}: write NAME=V1,V2,... (e.g. {DEFAULT_GRID!r}).")
        if key not in _PROBE_KEYS + _FINETUNE_KEYS:
            raise ValueError(f"--hparam-grid axis {key!r} is unknown: linear probe axes {', '.join(_PROBE_KEYS)}; "
                             f"fine-tuned MiniLM axes {', '.join(_FINETUNE_KEYS)}.")
        if key in axes:
            raise ValueError(f"--hparam-grid names {key!r} twice.")
        axes[key] = values
    if not axes:
        raise ValueError(f"--hparam-grid is empty: e.g. {DEFAULT_GRID!r}.")
    probe, finetune = set(axes) & set(_PROBE_KEYS), set(axes) & set(_FINETUNE_KEYS)
    if probe and finetune:
        raise ValueError(f"--hparam-grid mixes linear-probe axes {sorted(probe)} with fine-tuning axes "
                         f"{sorted(finetune)}: one grid tunes one classifier.")
    kind = "minilm" if finetune else "linear_probe"

    def values(key: str, cast: Callable[[str], Any]) -> tuple:
        out = []
        for v in axes[key].split(","):
            v = v.strip()
            try:
                out.append(cast(v))
            except ValueError as exc:
                raise ValueError(f"--hparam-grid {key}={axes[key]!r}: {v!r} is not valid ({exc}).") from None
        return tuple(out)

    def weight(v: str) -> str | None:
        if v.lower() in ("none", "null", ""):
            return None
        if v.lower() == "balanced":
            return "balanced"
        raise ValueError("use none or balanced")

    casts = {"C": float, "class_weight": weight, "lr": float, "epochs": int, "weight_decay": float}
    return HParamGrid(classifier=kind, **{k: values(k, casts[k]) for k in axes})


def _label(config: dict[str, Any]) -> str:
    return ", ".join(f"{k}={'none' if v is None else f'{v:g}' if isinstance(v, float) else v}"
                     for k, v in config.items())


def _first_argmax(x: Sequence[float]) -> int:
    return int(np.argmax(np.asarray(x, dtype=np.float64)))  # numpy returns the first of tied maxima


def rank_fidelity(synthetic_acc: Sequence[float], real_acc: Sequence[float]) -> dict[str, Any]:
    """Rank agreement of two accuracy vectors over the same configurations (both scored on real held-out data).

    ``{"spearman", "spearman_p", "kendall", "kendall_p", "best_real", "best_synthetic", "regret",
    "n_configs"}``. A correlation is None when it is undefined (fewer than 2 configurations, or one side
    constant: every configuration scores the same); the regret is always defined.
    """
    from scipy import stats

    s, r = np.asarray(synthetic_acc, dtype=np.float64), np.asarray(real_acc, dtype=np.float64)
    if s.shape != r.shape or s.ndim != 1 or len(s) == 0:
        raise ValueError(f"rank_fidelity: need two equally long non-empty lists, got {s.shape} and {r.shape}.")
    best_real, best_syn = _first_argmax(r), _first_argmax(s)
    out: dict[str, Any] = {"n_configs": len(s), "best_real": best_real, "best_synthetic": best_syn,
                           "regret": float(r[best_real] - r[best_syn])}
    defined = len(s) >= 2 and np.ptp(s) > 0 and np.ptp(r) > 0
    if defined:
        rho = stats.spearmanr(s, r)
        tau = stats.kendalltau(s, r)
        out.update(spearman=float(rho.statistic), spearman_p=float(rho.pvalue),
                   kendall=float(tau.statistic), kendall_p=float(tau.pvalue))
    else:
        out.update(spearman=None, spearman_p=None, kendall=None, kendall_p=None,
                   note="rank correlation undefined: fewer than 2 configurations or one side scores them all alike")
    return out


def score_grid(configs: Sequence[dict[str, Any]], train_and_score: Callable[[str, dict[str, Any]], float],
               ) -> dict[str, Any]:
    """Score every configuration on both sides; ``train_and_score(side, config)`` with side in
    ``("synthetic", "real")`` trains on that side's training set and returns REAL held-out accuracy."""
    rows = []
    for i, cfg in enumerate(configs):
        syn = float(train_and_score("synthetic", cfg))
        real = float(train_and_score("real", cfg))
        rows.append({"config": dict(cfg), "label": _label(cfg), "accuracy_synthetic": syn, "accuracy_real": real})
        logger.info("hparam %d/%d %s: trained on synthetic %.4f | on real %.4f", i + 1, len(configs), _label(cfg),
                    syn, real)
    fid = rank_fidelity([r["accuracy_synthetic"] for r in rows], [r["accuracy_real"] for r in rows])
    return {"rows": rows, **fid}


def hparam_fidelity(grid: HParamGrid, *, synthetic: LabelledTexts, private: LabelledTexts, heldout: LabelledTexts,
                    embedder: Any = None, seed: int = 0, device: str = "cpu", show_progress: bool = True,
                    ) -> dict[str, Any]:
    """Train ``grid``'s classifier on ``synthetic`` and on ``private`` per configuration, score on ``heldout``."""
    from ghostdp.integrations.synthetic.classifiers import classification_metrics

    names = heldout.label_names
    sets = {"synthetic": synthetic, "real": private}
    for side, data in sets.items():
        if len(set(data.labels)) < 2:
            raise ValueError(f"hparam grid: the {side} training set {data.source} has labels {sorted(set(data.labels))}"
                             " only; a classifier needs at least two classes.")
    if grid.classifier == "linear_probe":
        from sklearn.linear_model import LogisticRegression

        if embedder is None:
            from ghostdp.integrations.synthetic.embeddings import (
                EmbedderConfig,
                MiniLMEmbedder,
            )

            embedder = MiniLMEmbedder(EmbedderConfig(device=device, show_progress=show_progress))
        feats = {k: np.asarray(embedder.embed(v.texts), dtype=np.float64) for k, v in sets.items()}
        test = np.asarray(embedder.embed(heldout.texts), dtype=np.float64)

        def train_and_score(side: str, cfg: dict[str, Any]) -> float:
            clf = LogisticRegression(C=cfg["C"], class_weight=cfg["class_weight"], max_iter=2000, random_state=seed)
            clf.fit(feats[side], np.asarray(sets[side].labels, dtype=object))
            return classification_metrics(heldout.labels, [str(y) for y in clf.predict(test)], names)["accuracy"]
    else:
        from ghostdp.integrations.synthetic.classifiers import (
            FineTuneConfig,
            MiniLMClassifier,
        )

        def train_and_score(side: str, cfg: dict[str, Any]) -> float:
            clf = MiniLMClassifier(FineTuneConfig(lr=cfg["lr"], epochs=cfg["epochs"], weight_decay=cfg["weight_decay"],
                                                  seed=seed, device=device, show_progress=show_progress))
            data = sets[side]
            clf.fit(LabelledTexts(data.texts, data.labels, names, source=data.source))
            return classification_metrics(heldout.labels, clf.predict(heldout.texts), names)["accuracy"]

    result = score_grid(grid.configs(), train_and_score)
    result.update(classifier=grid.classifier, n_synthetic=len(synthetic), n_real=len(private), n_heldout=len(heldout),
                  heldout=heldout.source, seed=seed)
    return result


def _fmt(v: Any, digits: int = 4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def hparam_markdown(result: dict[str, Any]) -> str:
    rows, bs, br = result["rows"], result["best_synthetic"], result["best_real"]
    lines = [
        "# Hyperparameter-ranking fidelity",
        "",
        (f"Classifier: {result.get('classifier', '?')}; each configuration trained on the synthetic set "
         f"(n={result.get('n_synthetic', '?')}) and on the real private training set "
         f"(n={result.get('n_real', '?')}), both scored on the real held-out set (n={result.get('n_heldout', '?')})."),
        "",
        f"- Spearman rho: {_fmt(result['spearman'])} (p={_fmt(result['spearman_p'], 3)})",
        f"- Kendall tau-b: {_fmt(result['kendall'])} (p={_fmt(result['kendall_p'], 3)})",
        f"- Regret (real accuracy of the real-best minus of the synthetic-best configuration): {_fmt(result['regret'])}",
        f"- Real-best: {rows[br]['label']}; synthetic-best: {rows[bs]['label']}",
    ]
    if result.get("note"):
        lines.append(f"- Note: {result['note']}")
    lines += ["", "| # | configuration | acc. trained on synthetic | acc. trained on real |", "|---|---|---|---|"]
    for i, r in enumerate(rows):
        mark = (" (real-best)" if i == br else "") + (" (synthetic-best)" if i == bs else "")
        lines.append(f"| {i} | {r['label']}{mark} | {_fmt(r['accuracy_synthetic'])} | {_fmt(r['accuracy_real'])} |")
    lines += ["", "The real side reads the private data: this is an evaluation for the data owner, not a release.", ""]
    return "\n".join(lines)


def plot_hparam(result: dict[str, Any], path: Path) -> Path:
    """Two accuracies per configuration (trained on synthetic vs on real, both scored on real held-out)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = result["rows"]
    x = np.arange(len(rows))
    fig = Figure(figsize=(max(6.0, 0.6 * len(rows) + 2), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(x, [r["accuracy_real"] for r in rows], "o-", label="trained on real")
    ax.plot(x, [r["accuracy_synthetic"] for r in rows], "s--", label="trained on synthetic")
    ax.set_xticks(x)
    ax.set_xticklabels([r["label"] for r in rows], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("accuracy on real held-out data")
    ax.set_title(f"Spearman {_fmt(result['spearman'], 2)}, Kendall {_fmt(result['kendall'], 2)}, "
                 f"regret {_fmt(result['regret'], 3)}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_hparam(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``hparam.json``, ``hparam.md`` and ``hparam.png`` in ``out_dir``."""
    from ghostdp.integrations.synthetic.run_folder import write_text_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "hparam.json", "md": out / "hparam.md", "png": out / "hparam.png"}
    write_text_atomic(paths["json"], json.dumps(result, indent=2) + "\n")
    write_text_atomic(paths["md"], hparam_markdown(result))
    plot_hparam(result, paths["png"])
    return paths


def hparam_run(config: Any, run_dir: str | Path, grid: HParamGrid, *, show_progress: bool = True,
               ) -> tuple[dict[str, Any], dict[str, Path]]:
    """The grid on a run folder's synthetic set vs its real private data; writes ``<run-dir>/hparam/``."""
    from ghostdp.integrations.synthetic.config import ConfigError
    from ghostdp.integrations.synthetic.evaluate import synthetic_texts_from_rows
    from ghostdp.integrations.synthetic.run_folder import (
        RunPaths,
        check_fingerprint,
        load_eval_data,
        load_private_data,
    )
    from ghostdp.integrations.synthetic.synthesize import GENERATOR_META, read_synthetic

    paths = RunPaths(Path(run_dir))
    meta_file = paths.model / GENERATOR_META
    if not meta_file.is_file():
        raise ConfigError(f"{paths.model} holds no trained generator: run `ghostdp pipeline` with this --run-dir first.")
    info = json.loads(meta_file.read_text(encoding="utf-8"))
    names = tuple(info["label_names"])
    rows = read_synthetic(paths.synthetic / "synthetic.jsonl")
    if not rows:
        raise ConfigError(f"{paths.synthetic} holds no samples: run `ghostdp synthesize` with this --run-dir first.")
    synthetic = synthetic_texts_from_rows(rows, names, str(paths.synthetic / "synthetic.jsonl"))
    heldout = load_eval_data(config.data, names)
    private = load_private_data(config.data)
    check_fingerprint(private, paths, info["data"]["fingerprint"], f"the [data] settings of {paths.config}")
    private = LabelledTexts(private.texts, private.labels, names, source=private.source)
    from ghostdp.integrations.synthetic.evaluate import eval_device

    device = eval_device(config)
    result = hparam_fidelity(grid, synthetic=synthetic, private=private, heldout=heldout,
                             seed=config.evaluate.eval_seed, device=device, show_progress=show_progress)
    result["epsilon"] = info.get("privacy", {}).get("epsilon_total")
    return result, write_hparam(result, paths.root / "hparam")

