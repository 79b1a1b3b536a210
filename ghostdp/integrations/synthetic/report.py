"""One folder per run: ``report.md``, ``metrics.json`` and PNG plots, from plain dicts and lists.

Every figure appears in ``metrics.json`` (machine-readable) and in a Markdown table of ``report.md``
(human-readable); the plots show the same numbers. Any stage (training, generation, evaluation) can
call :func:`write_run_report` with what it has: a missing accuracy entry is shown as "n/a", a missing
section is left out.

Plots use matplotlib's object API (``matplotlib.figure.Figure``, rendered by the Agg canvas): no pyplot
state and no global backend switch, so it works headless and does not disturb a caller's backend.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: Accuracy bars, in display order: key -> label. All are scored on the same real held-out set.
ACCURACY_ENTRIES: dict[str, str] = {
    "synthetic": "trained on DP synthetic",
    "real_ceiling": "trained on real (non-private ceiling)",
    "real_matched": "trained on real, same count and length cap as synthetic (non-private)",
    "dp_on_real": "DP-trained on real",
    "generator_classifier": "DP generator as classifier (zero-shot)",
    "prior_floor": "prior knowledge only (floor)",
    "public_only": "trained on the public set only",
    "synthetic_plus_public": "trained on DP synthetic + public set",
}

NA = "n/a"


def accuracy_labels(private: bool = True) -> dict[str, str]:
    """:data:`ACCURACY_ENTRIES`, or for a generator trained with epsilon inf (``private`` False) the same rows with
    "DP" taken off the synthetic and generator rows and "NOT private" put on: nothing there is DP."""
    out = dict(ACCURACY_ENTRIES)
    if not private:
        out.update(synthetic="trained on synthetic (NOT private)",
                   generator_classifier="generator as classifier (zero-shot, NOT private)",
                   synthetic_plus_public="trained on synthetic + public set (NOT private)")
    return out


def _is_private(metrics: Mapping[str, Any] | None) -> bool:
    """False when the run's privacy record (``metrics["privacy"]``) says epsilon inf (``not_private``)."""
    return not ((metrics or {}).get("privacy") or {}).get("not_private")


@dataclass(frozen=True)
class RunReport:
    """What :func:`write_run_report` wrote: paths, and the exact dict saved as ``metrics.json``."""

    run_dir: Path
    report_md: Path
    metrics_json: Path
    plots: dict[str, Path]
    figures: dict[str, Any]


# ----------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------


def _jsonable(value: Any, where: str) -> Any:
    """Plain JSON types; numpy scalars/arrays converted; NaN and inf become None (shown as n/a)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(list(value))]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not math.isfinite(value):
            logger.warning("report: %s is %s; written as null (n/a)", where, value)
            return None
        return value
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    raise TypeError(
        f"report: {where} has type {type(value).__name__}, which has no JSON form; pass numbers, strings, "
        "lists or dicts."
    )


def length_stats(texts: Sequence[str]) -> dict[str, float | int]:
    """Word counts (whitespace-split): n, mean, median, 90th percentile, max."""
    lengths = np.asarray([len(t.split()) for t in texts], dtype=np.float64)
    if lengths.size == 0:
        return {"n": 0, "mean": None, "median": None, "p90": None, "max": None}
    return {
        "n": int(lengths.size),
        "mean": float(lengths.mean()),
        "median": float(np.median(lengths)),
        "p90": float(np.percentile(lengths, 90)),
        "max": int(lengths.max()),
    }


def _check_training_log(training_log: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for i, row in enumerate(training_log):
        missing = [k for k in ("loss", "epsilon") if k not in row]
        if missing:
            raise ValueError(
                f"write_run_report: training_log[{i}] lacks {missing} (has {sorted(row)}); every entry needs "
                "'loss' and 'epsilon' (the privacy spent so far)."
            )
        rows.append(dict(row))
    return rows


def _check_accuracies(accuracies: Mapping[str, Mapping[str, Any] | None]) -> None:
    unknown = sorted(set(accuracies) - set(ACCURACY_ENTRIES))
    if unknown:
        raise ValueError(f"write_run_report: unknown accuracy entries {unknown}; use keys from {list(ACCURACY_ENTRIES)}.")
    for key, value in accuracies.items():
        if value is not None and "accuracy" not in value:
            raise ValueError(
                f"write_run_report: accuracies[{key!r}] has no 'accuracy' (keys {sorted(value)}); pass the dict "
                "from classifiers.train_and_evaluate, or None for n/a."
            )


# ----------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------


def _new_figure(width: float = 6.0, height: float = 4.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def plot_training(training_log: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Training loss against the epsilon spent so far; against the logged row's index when a row has no
    epsilon (None: a NOT private run, trained with epsilon inf)."""
    private = all(r["epsilon"] is not None for r in training_log)
    x = [float(r["epsilon"]) for r in training_log] if private else list(range(1, len(training_log) + 1))
    loss = [float(r["loss"]) for r in training_log]
    fig, ax = _new_figure()
    ax.plot(x, loss, marker="." if len(x) < 50 else None, linewidth=1.2)
    ax.set_xlabel("epsilon spent" if private else "logged step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss vs privacy spent" if private else "Training loss (NOT private: no epsilon)")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_accuracies(accuracies: Mapping[str, Mapping[str, Any] | None], path: Path, *, private: bool = True) -> Path:
    """Accuracy bars in :data:`ACCURACY_ENTRIES` order; a missing entry gets no bar and an "n/a" label
    (``private`` False: the labels of :func:`accuracy_labels` for a NOT private run)."""
    labels = accuracy_labels(private)
    names = list(labels)
    fig, ax = _new_figure(max(7.0, 1.3 * len(names)), 4.5)
    for i, key in enumerate(names):
        entry = accuracies.get(key)
        acc = entry.get("accuracy") if entry is not None else None
        if acc is None or not math.isfinite(float(acc)):
            ax.text(i, 0.02, NA, ha="center", va="bottom", color="gray")
            continue
        ax.bar(i, float(acc), color=f"C{i}")
        ax.text(i, float(acc) + 0.01, f"{float(acc):.3f}", ha="center", va="bottom")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([labels[k].replace(" (", "\n(").replace(", ", ",\n") for k in names], fontsize=7)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("accuracy on real held-out data")
    ax.set_title("Downstream accuracy")
    return _save(fig, path)


def plot_lengths(real_texts: Sequence[str], synthetic_texts: Sequence[str], path: Path) -> Path:
    """Histograms of word counts, real vs synthetic, as densities on shared bins."""
    real = [len(t.split()) for t in real_texts]
    syn = [len(t.split()) for t in synthetic_texts]
    top = max(real + syn + [1])
    bins = np.arange(0, top + 2) - 0.5 if top <= 60 else np.linspace(0, top + 1, 40)
    fig, ax = _new_figure()
    sets = [(x, f"{name} (n={len(x)})") for x, name in ((real, "real"), (syn, "synthetic")) if x]
    if sets:  # side by side in each bin, so a short synthetic set next to long real texts is plain to see
        ax.hist([x for x, _ in sets], bins=bins, density=True, label=[lb for _, lb in sets])
    ax.set_xlabel("length (words)")
    ax.set_ylabel("density")
    ax.set_title("Text lengths")
    ax.legend()
    return _save(fig, path)


def plot_mauve(mauve: float, path: Path, curve: tuple[Sequence[float], Sequence[float]] | None = None) -> Path:
    """The MAUVE value as a bar on [0, 1], and the divergence curve when given."""
    fig, ax = _new_figure(6.0, 4.0 if curve is not None else 1.8)
    if curve is not None:
        x, y = curve
        ax.plot(x, y, marker=".")
        ax.fill_between(x, y, alpha=0.2)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("exp(-c KL(Q || R))")
        ax.set_ylabel("exp(-c KL(P || R))")
        ax.set_title(f"MAUVE = {mauve:.3f} (area under the divergence curve)")
    else:
        ax.barh([0], [mauve], color="C0")
        ax.set_xlim(0, 1)
        ax.set_yticks([])
        ax.text(min(mauve + 0.02, 0.9), 0, f"{mauve:.3f}", va="center")
        ax.set_xlabel("MAUVE (synthetic vs real; 1 = indistinguishable)")
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return NA
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out += _flatten(v, key + ".")
        elif isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v):
            for i, x in enumerate(v):
                out += _flatten(x, f"{key}[{i}].")
        else:
            out.append((key, v))
    return out


def _log_rows(log: Sequence[Mapping[str, Any]], max_rows: int) -> list[Mapping[str, Any]]:
    if len(log) <= max_rows:
        return list(log)
    idx = np.unique(np.linspace(0, len(log) - 1, max_rows).round().astype(int))
    return [log[i] for i in idx]


def _markdown(figures: Mapping[str, Any], plots: Mapping[str, Path], max_log_rows: int) -> str:
    lines = [f"# {figures['title']}", ""]
    if "accuracy" in figures:
        lines += ["## Downstream accuracy (real held-out data)", ""]
        rows = []
        for key, label in accuracy_labels(_is_private(figures.get("metrics"))).items():
            entry = figures["accuracy"].get(key) or {}
            recall = entry.get("recall") or {}
            per_class = ", ".join(f"{c} {_fmt(r)}" for c, r in recall.items()) if recall else None
            rows.append([label, entry.get("accuracy"), entry.get("macro_f1"), per_class, entry.get("recall_gap"),
                         entry.get("n_train"), entry.get("n_eval")])
        lines += _table(["classifier", "accuracy", "macro-F1", "recall per class", "largest recall gap", "n_train",
                         "n_eval"], rows) + [""]
        if "accuracy" in plots:
            lines += [f"![accuracy]({plots['accuracy'].name})", ""]
    if "mauve" in figures:
        lines += ["## MAUVE (synthetic vs real)", ""]
        lines += _table(["metric", "value"], [["MAUVE", figures["mauve"]]]) + [""]
        if "mauve" in plots:
            lines += [f"![mauve]({plots['mauve'].name})", ""]
    if "lengths" in figures:
        lines += ["## Text lengths (words)", ""]
        rows = [[name, s["n"], s["mean"], s["median"], s["p90"], s["max"]] for name, s in figures["lengths"].items()]
        lines += _table(["set", "n", "mean", "median", "p90", "max"], rows) + [""]
        if "lengths" in plots:
            lines += [f"![lengths]({plots['lengths'].name})", ""]
    if "training" in figures:
        tr = figures["training"]
        lines += ["## Training", ""]
        lines += _table(
            ["steps logged", "final loss", "final epsilon"], [[tr["steps_logged"], tr["final_loss"], tr["final_epsilon"]]]
        ) + [""]
        shown = _log_rows(tr["log"], max_log_rows)
        keys = list(dict.fromkeys(k for row in tr["log"] for k in row))
        note = "" if len(shown) == len(tr["log"]) else f" ({len(shown)} of {len(tr['log'])} rows, evenly spaced; all in metrics.json)"
        lines += [f"Training log{note}:", ""]
        lines += _table(keys, [[row.get(k) for k in keys] for row in shown]) + [""]
        if "training" in plots:
            lines += [f"![training]({plots['training'].name})", ""]
    if figures.get("metrics"):
        lines += ["## Other figures", ""]
        lines += _table(["name", "value"], _flatten(figures["metrics"])) + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_run_report(
    run_dir: str | Path,
    *,
    title: str = "ghostdp run",
    metrics: Mapping[str, Any] | None = None,
    training_log: Sequence[Mapping[str, Any]] | None = None,
    accuracies: Mapping[str, Mapping[str, Any] | None] | None = None,
    real_texts: Sequence[str] | None = None,
    synthetic_texts: Sequence[str] | None = None,
    mauve: float | None = None,
    mauve_curve: tuple[Sequence[float], Sequence[float]] | None = None,
    max_log_rows: int = 50,
    preamble: str = "",
    epilogue: str = "",
) -> RunReport:
    """Write ``report.md``, ``metrics.json`` and the plots into ``run_dir`` (created if needed).

    Args:
        run_dir: the run's folder.
        title: the report's heading.
        metrics: any other figures (privacy parameters, memorisation summary, config...), nested dicts
            allowed; shown flattened as ``a.b.c`` rows.
        training_log: one dict per logged step with at least ``loss`` and ``epsilon`` (others, e.g.
            ``step``, are kept) -> plot ``training.png``.
        accuracies: keys from :data:`ACCURACY_ENTRIES`, values the metrics dicts of
            ``classifiers.train_and_evaluate`` or None -> ``accuracy.png``; absent keys show as n/a.
        real_texts, synthetic_texts: for the length statistics and ``lengths.png``.
        mauve: the MAUVE value -> ``mauve.png`` (with the divergence curve when ``mauve_curve`` is given).
        max_log_rows: the most training-log rows in report.md (metrics.json has them all).
        preamble, epilogue: Markdown put under the title (e.g. the privacy note) and at the end; part of the
            one write of report.md, so no version of the file lacks them.

    Each file is written to a temporary name and renamed: an interrupted run leaves the previous report or
    the new one, never a torn one.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {"title": title}
    plots: dict[str, Path] = {}

    if accuracies is not None:
        _check_accuracies(accuracies)
        figures["accuracy"] = {key: (dict(accuracies[key]) if accuracies.get(key) is not None else None)
                               for key in ACCURACY_ENTRIES}
        plots["accuracy"] = plot_accuracies(figures["accuracy"], run_dir / "accuracy.png",
                                            private=_is_private(metrics))
    if mauve is not None:
        figures["mauve"] = float(mauve)
        if mauve_curve is not None:
            figures["mauve_curve"] = {"x": list(mauve_curve[0]), "y": list(mauve_curve[1])}
        plots["mauve"] = plot_mauve(float(mauve), run_dir / "mauve.png", mauve_curve)
    if real_texts is not None or synthetic_texts is not None:
        figures["lengths"] = {}
        if real_texts is not None:
            figures["lengths"]["real"] = length_stats(real_texts)
        if synthetic_texts is not None:
            figures["lengths"]["synthetic"] = length_stats(synthetic_texts)
        plots["lengths"] = plot_lengths(real_texts or [], synthetic_texts or [], run_dir / "lengths.png")
    if training_log is not None:
        log = _check_training_log(training_log)
        figures["training"] = {
            "steps_logged": len(log),
            "final_loss": log[-1]["loss"] if log else None,
            "final_epsilon": log[-1]["epsilon"] if log else None,
            "log": log,
        }
        if log:
            plots["training"] = plot_training(log, run_dir / "training.png")
    if metrics:
        figures["metrics"] = dict(metrics)
    figures["plots"] = {name: p.name for name, p in plots.items()}

    figures = _jsonable(figures, "figures")
    metrics_json = run_dir / "metrics.json"
    _write_atomic(metrics_json, json.dumps(figures, indent=2, allow_nan=False) + "\n")
    report_md = run_dir / "report.md"
    text = _markdown(figures, plots, max_log_rows)
    if preamble or epilogue:
        head, _, rest = text.partition("\n\n")
        text = (head + "\n\n" + (preamble + "\n" if preamble else "") + rest.rstrip("\n") + "\n"
                + ("\n" + epilogue.rstrip("\n") + "\n" if epilogue else ""))
    _write_atomic(report_md, text)
    logger.info("Run report written to %s (%d plots)", run_dir, len(plots))
    return RunReport(run_dir=run_dir, report_md=report_md, metrics_json=metrics_json, plots=plots, figures=figures)
