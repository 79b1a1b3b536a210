"""The fine-tuning method x epsilon study: ``ghostdp study --methods lora,prompt,full --epsilons 1,3,8,inf``.

Kurakin et al. (arXiv 2306.01684) report that under DP, parameter-efficient tuning (LoRA; prompt tuning with
tens of thousands of parameters) beats full fine-tuning, and that LoRA at epsilon 1 is not far from
non-private. This command measures it on the user's data: one pipeline run (train, synthesize, evaluate)
per cell (method, epsilon, seed), each in its own run folder ``<run-dir>/<method>/eps-<e>/seed-<i>``, then
one table (``study.md`` + ``study.json``) and one plot (``study.png``): downstream accuracy (mean ± sample
std over the seeds), MAUVE, held-out perplexity and label fidelity per method and epsilon, beside the
DP-on-real classifier (per epsilon) and the prior-knowledge floor.

Resumable: a cell whose ``study_cell.json`` exists is not run again (its figures are read back); an
interrupted cell continues as the pipeline does (training resumes from its checkpoint, a trained generator
is reused, synthesis resumes).

Epsilon ``inf`` is the NON-PRIVATE baseline: no noise and no clipping (``train.target_epsilon=inf``). It is
written "inf (not private)" in every table, plot and JSON record, and its "DP on real" column is the
non-private classifier trained on real data (there is no DP at epsilon inf). It runs the same pipeline as
the private cells (same classifier, MAUVE, perplexity, label fidelity, floor); its report says NOT PRIVATE.

Privacy: every cell trains on the same private data. Released together the cells' models would be private
only by composition (the sum of their epsilons, and not at all with an inf cell). The study is a
measurement for the data owner; release at most one finite-epsilon cell.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ghostdp.integrations.synthetic.config import ConfigError, RunConfig

__all__ = ["StudyGrid", "eps_label", "parse_epsilons", "parse_methods", "run_study", "study_markdown"]

logger = logging.getLogger(__name__)

METHODS = ("lora", "prompt", "full")
CELL_FILE = "study_cell.json"
NOT_PRIVATE = "not private"
#: The figures a cell records (from the run's headline), each averaged over the seeds.
METRICS = ("accuracy_synthetic", "mauve", "perplexity", "label_fidelity", "accuracy_generator_classifier")


def eps_label(eps: float) -> str:
    """``"3"``; ``"inf (not private)"`` for the non-private baseline."""
    return f"inf ({NOT_PRIVATE})" if math.isinf(eps) else f"{eps:g}"


def _eps_dir(eps: float) -> str:
    return "eps-inf" if math.isinf(eps) else f"eps-{eps:g}"


@dataclass(frozen=True)
class StudyGrid:
    """The cells of a study: every method x epsilon, each ``seeds`` times (fresh DP noise per seed).

    Args:
        methods: fine-tuning methods of the generator (``train.method``): lora, prompt, full.
        epsilons: training budgets (``train.target_epsilon``); ``inf`` = not private (no noise, no clipping).
        seeds: runs per (method, epsilon); seed i shifts ``train.seed``, ``synthesize.sample_seed`` and a set
            ``train.dp_seed`` by i (with dp_seed none, the noise comes from OS entropy in every run).
        learning_rates: ``(method, lr)`` pairs replacing ``train.learning_rate`` for that method (the methods
            train very different numbers of parameters and rarely share a good learning rate).
    """

    methods: tuple[str, ...] = METHODS
    epsilons: tuple[float, ...] = (1.0, 3.0, 8.0, math.inf)
    seeds: int = 3
    learning_rates: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if not self.methods or bad:
            raise ConfigError(f"study methods {list(self.methods)}: pick from {', '.join(METHODS)}.")
        if not self.epsilons or any(not (e > 0) for e in self.epsilons):
            raise ConfigError(f"study epsilons {list(self.epsilons)}: each must be > 0 (inf: not private).")
        if len(set(self.methods)) != len(self.methods) or len(set(self.epsilons)) != len(self.epsilons):
            raise ConfigError(f"study methods {list(self.methods)} / epsilons {list(self.epsilons)} repeat a value.")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ConfigError(f"study seeds={self.seeds!r}: need an int >= 1.")
        for m, lr in self.learning_rates:
            if m not in METHODS or not (isinstance(lr, float) and math.isfinite(lr) and lr > 0):
                raise ConfigError(f"study learning rate {m}={lr!r}: need a method of {', '.join(METHODS)} and a "
                                  "finite lr > 0 (e.g. --method-lr lora=1e-2,prompt=5e-2,full=2e-4).")

    def cells(self) -> list[tuple[str, float, int]]:
        return [(m, e, s) for m in self.methods for e in self.epsilons for s in range(self.seeds)]


def parse_methods(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())


def parse_method_lr(text: str | None) -> tuple[tuple[str, float], ...]:
    """``"lora=1e-2,prompt=5e-2"`` -> ``(("lora", 0.01), ("prompt", 0.05))``."""
    out = []
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        m, sep, v = part.partition("=")
        try:
            out.append((m.strip(), float(v)))
        except ValueError:
            raise ConfigError(f"--method-lr {text!r}: write METHOD=LR pairs, e.g. lora=1e-2,prompt=5e-2.") from None
        if not sep:
            raise ConfigError(f"--method-lr {text!r}: write METHOD=LR pairs, e.g. lora=1e-2,prompt=5e-2.")
    return tuple(out)


def parse_epsilons(text: str) -> tuple[float, ...]:
    out = []
    for v in (v.strip() for v in text.split(",")):
        if not v:
            continue
        try:
            out.append(math.inf if v.lower() in ("inf", "infinity") else float(v))
        except ValueError:
            raise ConfigError(f"--epsilons {text!r}: {v!r} is not a number (write e.g. 1,3,8,inf).") from None
    return tuple(out)


def cell_dir(root: Path, method: str, eps: float, seed: int) -> Path:
    return Path(root) / method / _eps_dir(eps) / f"seed-{seed}"


def cell_config(base: RunConfig, method: str, eps: float, seed: int,
                learning_rates: tuple[tuple[str, float], ...] = ()) -> RunConfig:
    t, s = base.train, base.synthesize
    train = dataclasses.replace(t, method=method, target_epsilon=eps, seed=t.seed + seed,
                                dp_seed=None if t.dp_seed is None else t.dp_seed + seed,
                                learning_rate=dict(learning_rates).get(method, t.learning_rate))
    return dataclasses.replace(base, train=train,
                               synthesize=dataclasses.replace(s, sample_seed=s.sample_seed + seed))


# ----------------------------------------------------------------------------------------------------
# One cell
# ----------------------------------------------------------------------------------------------------


def run_cell(config: RunConfig, run_dir: Path, *, show_progress: bool = True,
             shared: Any | None = None) -> dict[str, Any]:
    """Run one cell's pipeline in ``run_dir``; returns its figures (``METRICS`` and the baselines).

    ``shared``: the study's ``shared_eval.SharedEvaluation`` (embeddings, base perplexity, floor samples).
    """
    from ghostdp.integrations.synthetic.pipeline import run_pipeline

    started = time.time()
    result, _, timings = run_pipeline(config, run_dir, show_progress=show_progress, shared=shared)
    h = result.headline
    out = {"accuracy_synthetic": h["accuracy_synthetic"], "mauve": h["mauve"], "perplexity": h["perplexity"],
           "label_fidelity": h["label_fidelity"], "accuracy_generator_classifier": h["accuracy_generator_classifier"],
           "accuracy_dp_on_real": h["accuracy_dp_on_real"],
           "accuracy_real_ceiling": h["accuracy_real_ceiling"], "accuracy_prior_floor": h["accuracy_prior_floor"],
           "epsilon_spent": h["epsilon"], "delta": h["delta"], "dp_seed": h.get("dp_seed"),
           "seconds": round(time.time() - started, 1), "timings": {k: round(v, 1) for k, v in timings.items()},
           "report": str(result.report_md)}
    if math.isinf(config.train.target_epsilon):  # no DP at epsilon inf: the real-data classifier stands there
        out.update(accuracy_dp_on_real=h["accuracy_real_ceiling"], delta=None, not_private=NOT_PRIVATE)
    return out


# ----------------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------------


def run_study(config: RunConfig, run_dir: str | Path, grid: StudyGrid, *, show_progress: bool = True,
              runner: Callable[..., dict[str, Any]] | None = None, summarize_only: bool = False) -> dict[str, Any]:
    """Run every cell not finished yet, then write ``study.json``, ``study.md`` and ``study.png`` in ``run_dir``.

    ``runner(config, cell_dir, show_progress=...)`` defaults to :func:`run_cell`. With ``summarize_only`` no
    cell is run: the table is written from the cells finished so far (a time-boxed or interrupted study), and
    the cells not run are listed in it (their rows read n/a with 0 seeds).
    """
    from ghostdp.integrations.synthetic.run_folder import (
        lock_run_folder,
        write_text_atomic,
    )

    root = Path(run_dir)
    if runner is None:  # the cells share their embeddings, base perplexity and floor samples (shared_eval)
        import functools

        from ghostdp.integrations.synthetic.shared_eval import SharedEvaluation

        runner = functools.partial(run_cell, shared=SharedEvaluation(root / "shared"))
    root.mkdir(parents=True, exist_ok=True)
    if any(math.isinf(e) for e in grid.epsilons):
        logger.warning("The study includes epsilon = inf: those cells are trained WITHOUT noise or clipping and are "
                       "NOT private (a baseline; labelled '%s' everywhere).", eps_label(math.inf))
    with lock_run_folder(root, "study"):  # study.*; each cell folder has its own lock
        cells, missing = [], []
        todo = grid.cells()
        for k, (method, eps, seed) in enumerate(todo):
            where = cell_dir(root, method, eps, seed)
            done = where / CELL_FILE
            if done.is_file():
                logger.info("Cell %d/%d %s eps=%s seed %d: finished earlier (%s), not run again", k + 1, len(todo),
                            method, eps_label(eps), seed, done)
                cells.append(json.loads(done.read_text(encoding="utf-8")))
                continue
            if summarize_only:
                logger.info("Cell %d/%d %s eps=%s seed %d: not run (--summarize-only)", k + 1, len(todo), method,
                            eps_label(eps), seed)
                missing.append({"method": method, "epsilon": eps_label(eps), "seed": seed})
                continue
            logger.info("Cell %d/%d: %s, epsilon %s, seed %d in %s", k + 1, len(todo), method, eps_label(eps), seed,
                        where)
            figures = runner(cell_config(config, method, eps, seed, grid.learning_rates), where,
                             show_progress=show_progress)
            record = {"method": method, "epsilon": eps_label(eps), "private": not math.isinf(eps), "seed": seed,
                      "run_dir": str(where), **figures}
            where.mkdir(parents=True, exist_ok=True)
            write_text_atomic(done, json.dumps(record, indent=2, allow_nan=False) + "\n")
            cells.append(record)
        summary = summarize(cells, grid)
        summary["not_run"] = missing
        summary["config"] = {"methods": list(grid.methods), "epsilons": [eps_label(e) for e in grid.epsilons],
                             "seeds": grid.seeds, "learning_rates": {m: dict(grid.learning_rates).get(
                                 m, config.train.learning_rate) for m in grid.methods}, "model": config.train.model, "train_data": config.data.train_data,
                             "train_rows": config.data.train_rows, "num_samples": config.synthesize.num_samples,
                             "classifier": config.evaluate.classifier}
        write_text_atomic(root / "study.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
        write_text_atomic(root / "study.md", study_markdown(summary))
        plot_study(summary, root / "study.png")
    logger.info("Study written to %s", root / "study.md")
    return summary


def summarize(cells: Sequence[dict[str, Any]], grid: StudyGrid) -> dict[str, Any]:
    """Mean ± std over seeds per (method, epsilon), the DP-on-real row per epsilon and the floor row."""
    from ghostdp.integrations.synthetic.seeds import mean_std

    def pick(method: str | None, eps: str | None, key: str) -> dict[str, Any]:
        return mean_std([c.get(key) for c in cells
                         if (method is None or c["method"] == method) and (eps is None or c["epsilon"] == eps)])

    rows = []
    for method in grid.methods:
        for e in grid.epsilons:
            label = eps_label(e)
            rows.append({"method": method, "epsilon": label, "private": not math.isinf(e),
                         **{key: pick(method, label, key) for key in METRICS}})
    dp_on_real = [{"epsilon": eps_label(e), "private": not math.isinf(e),
                   "kind": "DP-trained on real" if not math.isinf(e) else f"trained on real ({NOT_PRIVATE})",
                   "accuracy": pick(None, eps_label(e), "accuracy_dp_on_real")} for e in grid.epsilons]
    return {"cells": list(cells), "rows": rows, "dp_on_real": dp_on_real,
            "floor": {"accuracy": pick(None, None, "accuracy_prior_floor")},
            "real_ceiling": {"accuracy": pick(None, None, "accuracy_real_ceiling")}}


def _pm(ms: dict[str, Any] | None, digits: int = 4) -> str:
    if not ms or ms.get("mean") is None:
        return "n/a"
    return f"{ms['mean']:.{digits}f}" + (f" ± {ms['std']:.{digits}f}" if ms.get("std") is not None else "")


def study_markdown(summary: dict[str, Any]) -> str:
    cfg = summary.get("config", {})
    lines = [
        "# Fine-tuning method x epsilon study",
        "",
        (f"Generator {cfg.get('model', '?')} on {cfg.get('train_data', '?')} (rows: {cfg.get('train_rows') or 'all'}"
         f"); {cfg.get('num_samples', '?')} synthetic samples per cell; downstream classifier "
         f"{cfg.get('classifier', '?')}; {cfg.get('seeds', '?')} seed(s) per cell (mean ± sample std); learning rates "
         f"{cfg.get('learning_rates')}. Accuracies are on REAL held-out data."),
        "",
        f"epsilon 'inf ({NOT_PRIVATE})': trained without noise and without clipping, a baseline that is NOT private.",
        "Every cell trained on the same private data: release at most one finite-epsilon cell.",
        "",
        "| method | epsilon | downstream accuracy | MAUVE | perplexity | label fidelity | generator as classifier "
        "| seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        lines.append(f"| {r['method']} | {r['epsilon']} | {_pm(r['accuracy_synthetic'])} | {_pm(r['mauve'])} | "
                     f"{_pm(r['perplexity'], 2)} | {_pm(r['label_fidelity'])} | "
                     f"{_pm(r.get('accuracy_generator_classifier'))} | {r['accuracy_synthetic']['n']} |")
    for d in summary["dp_on_real"]:
        lines.append(f"| {d['kind']} (classifier, no synthetic data) | {d['epsilon']} | {_pm(d['accuracy'])} | | | "
                     f"| | {d['accuracy']['n']} |")
    fl, rc = summary["floor"]["accuracy"], summary["real_ceiling"]["accuracy"]
    lines.append(f"| prior floor (un-finetuned generator's samples) | - | {_pm(fl)} | | | | | {fl['n']} |")
    lines.append(f"| real data, {NOT_PRIVATE} (ceiling) | inf ({NOT_PRIVATE}) | {_pm(rc)} | | | | | {rc['n']} |")
    seconds = [c["seconds"] for c in summary["cells"] if c.get("seconds") is not None]
    if seconds:
        lines += ["", f"Cell wall time: {sum(seconds) / 60:.1f} min in all over {len(seconds)} cells "
                  f"({min(seconds) / 60:.1f}-{max(seconds) / 60:.1f} min each; per step in study.json)."]
    not_run = summary.get("not_run") or []
    if not_run:
        lines += ["", f"**Not run** ({len(not_run)} of the grid's cells; summarised with --summarize-only): "
                  + ", ".join(f"{c['method']} at epsilon {c['epsilon']} seed {c['seed']}" for c in not_run) + "."]
    lines += ["", "Per-cell run folders and figures: study.json (cells).", ""]
    return "\n".join(lines)


def plot_study(summary: dict[str, Any], path: Path) -> Path:
    """Downstream accuracy per epsilon (categorical axis), one line per method, error bars = std over seeds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    eps = [d["epsilon"] for d in summary["dp_on_real"]]
    x = list(range(len(eps)))
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)

    def series(values):
        return ([v["mean"] if v["mean"] is not None else float("nan") for v in values],
                [v["std"] or 0.0 for v in values])

    for method in dict.fromkeys(r["method"] for r in summary["rows"]):
        mean, std = series([r["accuracy_synthetic"] for r in summary["rows"] if r["method"] == method])
        ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=f"synthetic via {method}")
    mean, std = series([d["accuracy"] for d in summary["dp_on_real"]])
    ax.errorbar(x, mean, yerr=std, marker="s", linestyle="--", color="black", capsize=3,
                label="classifier DP-trained on real")
    floor = summary["floor"]["accuracy"]["mean"]
    if floor is not None:
        ax.axhline(floor, color="grey", linestyle=":", label="prior floor")
    ax.set_xticks(x)
    ax.set_xticklabels(eps)
    ax.set_xlabel("epsilon")
    ax.set_ylabel("accuracy on real held-out data")
    ax.set_title("DP synthetic data: downstream accuracy by fine-tuning method")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
