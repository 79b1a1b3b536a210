"""Repeat a whole DP run with fresh noise and report the mean and spread of every accuracy (``--seeds N``).

With this little compute the DP noise moves the synthetic-data accuracy by several points from one run to
the next, so one run says little. ``run_seeds`` trains, samples and evaluates ``N`` times, each in its own
folder ``<run_dir>/seed-<i>`` with fresh DP noise (``train.dp_seed`` none: OS entropy each time; a set
``dp_seed`` becomes ``dp_seed + i``) and fresh public randomness (``train.seed``, ``synthesize.sample_seed`` and
``evaluate.eval_seed`` plus ``i``), and writes ``seeds.json`` and ``seeds.md`` with, for every row of the
accuracy table, the mean and sample standard deviation of its accuracy, macro-F1, largest recall gap and
per-class recalls, plus the label fidelity and epsilon.

The baselines are drawn again in every run too: the prior-knowledge floor is a sample of the base model
(its own spread is about as large as the synthetic row's on SST-2, bench/results/utility_cpu.md), the
"real, same count and length cap" row a sample of the private rows, and the classifiers and the DP linear
head have seeds. Baselines fixed across the runs would show a spread of 0 and decide "synthetic beats the
floor" on a single draw.

Privacy: each seed is a separate DP training on the same private data. Released together the N models
(and their synthetic sets) would be (N * epsilon, N * delta)-DP by basic composition; this is a
measurement of the method's variance, of which at most one run should be released.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ghostdp.integrations.synthetic.config import RunConfig

__all__ = ["aggregate_runs", "mean_std", "run_seeds", "seeds_markdown"]

logger = logging.getLogger(__name__)


def mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """``{"mean", "std", "n", "values"}`` over the values that are not None; std is the sample std (ddof=1),
    None with fewer than two values."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return {"mean": None, "std": None, "n": 0, "values": []}
    return {"mean": float(np.mean(xs)), "std": float(np.std(xs, ddof=1)) if len(xs) > 1 else None, "n": len(xs),
            "values": xs}


def aggregate_runs(metrics: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and std across runs of every accuracy row (from each run's ``metrics.json``).

    Returns ``{"runs": n, "accuracy": {row: {"accuracy": ms, "macro_f1": ms, "recall_gap": ms,
    "recall": {class: ms}}}, "gaps": {row: ms}, "label_fidelity": ms, "epsilon": ms, "not_private": k}`` with
    ``ms`` from :func:`mean_std` and ``k`` the number of runs trained with epsilon inf. A row that is n/a in some
    runs is averaged over the others (its ``n`` says how many).
    ``gaps[row]`` is the paired difference, synthetic accuracy minus ``row``'s accuracy within each run (the
    issue-11 goals are gaps: synthetic >= floor + 10 points, >= DP-on-real - 8 points); its std is that of
    the difference, smaller than the two rows' stds combined when the runs' draws move both rows together.
    """
    rows: list[str] = []
    for m in metrics:
        rows += [k for k in (m.get("accuracy") or {}) if k not in rows]
    out: dict[str, Any] = {"runs": len(metrics), "accuracy": {}}
    for row in rows:
        entries = [(m.get("accuracy") or {}).get(row) or {} for m in metrics]
        if not any(entries):
            out["accuracy"][row] = None
            continue
        agg = {key: mean_std([e.get(key) for e in entries]) for key in ("accuracy", "macro_f1", "recall_gap")}
        classes: list[str] = []
        for e in entries:
            classes += [c for c in (e.get("recall") or {}) if c not in classes]
        agg["recall"] = {c: mean_std([(e.get("recall") or {}).get(c) for e in entries]) for c in classes}
        out["accuracy"][row] = agg
    out["gaps"] = {row: mean_std([_gap(m, row) for m in metrics]) for row in rows if row != "synthetic"}
    other = [m.get("metrics") or {} for m in metrics]
    out["label_fidelity"] = mean_std([((o.get("label_fidelity") or {}).get("synthetic") or {}).get("label_fidelity")
                                      for o in other])
    out["epsilon"] = mean_std([(o.get("privacy") or {}).get("epsilon_total") for o in other])
    out["not_private"] = sum(bool((o.get("privacy") or {}).get("not_private")) for o in other)  # runs at epsilon inf
    return out


def _gap(run: Mapping[str, Any], row: str) -> float | None:
    """Synthetic accuracy minus ``row``'s accuracy in one run (None when either is n/a)."""
    acc = run.get("accuracy") or {}
    a, b = (acc.get("synthetic") or {}).get("accuracy"), (acc.get(row) or {}).get("accuracy")
    return None if a is None or b is None else float(a) - float(b)


def _pm(ms: Mapping[str, Any] | None) -> str:
    if not ms or ms.get("mean") is None:
        return "n/a"
    return f"{ms['mean']:.4f}" + (f" ± {ms['std']:.4f}" if ms.get("std") is not None else "")


def _points(ms: Mapping[str, Any]) -> str:
    return f"{100 * ms['mean']:+.1f}" + (f" ± {100 * ms['std']:.1f}" if ms.get("std") is not None else "")


def seeds_markdown(summary: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> str:
    """The summary as a Markdown table (mean ± sample std over the runs)."""
    if labels is None:
        from ghostdp.integrations.synthetic.report import accuracy_labels

        labels = accuracy_labels(private=not summary.get("not_private"))
    n = summary["runs"]
    if summary.get("not_private"):
        head = [f"# {n} runs, NOT PRIVATE (epsilon inf: no noise, no clipping): mean ± std", "",
                (f"{summary['not_private']} of the {n} runs trained without noise or clipping: a baseline for "
                 "comparisons, never a release.")]
    else:
        head = [f"# {n} DP runs with fresh noise: mean ± std", "",
                (f"Each run trained its own generator on the same private data (epsilon {_pm(summary['epsilon'])} "
                 f"each). Together they would be {n} times that by composition: this measures the variance of the "
                 "method; release at most one run.")]
    lines = [*head, "",
             "| row | accuracy | macro-F1 | largest recall gap | recall per class | runs |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row, agg in summary["accuracy"].items():
        if agg is None:
            lines.append(f"| {labels.get(row, row)} | n/a | n/a | n/a | n/a | 0 |")
            continue
        recall = ", ".join(f"{c} {_pm(ms)}" for c, ms in agg["recall"].items()) or "n/a"
        lines.append(f"| {labels.get(row, row)} | {_pm(agg['accuracy'])} | {_pm(agg['macro_f1'])} | "
                     f"{_pm(agg['recall_gap'])} | {recall} | {agg['accuracy']['n']} |")
    gaps = {row: ms for row, ms in (summary.get("gaps") or {}).items() if ms and ms.get("mean") is not None}
    if gaps:
        lines += ["", "Synthetic minus each row, within each run (accuracy points; > 0: the synthetic set is better):",
                  "", "| row | synthetic minus row (points) | runs |", "| --- | --- | --- |"]
        lines += [f"| {labels.get(row, row)} | {_points(ms)} | {ms['n']} |" for row, ms in gaps.items()]
    lines += ["", f"Label fidelity of the synthetic sets: {_pm(summary['label_fidelity'])}.", ""]
    return "\n".join(lines)


def run_seeds(config: RunConfig, run_dir: str | Path, n: int, *, show_progress: bool = True,
              run_one: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Run the pipeline ``n`` times into ``run_dir/seed-<i>`` and write ``seeds.json`` / ``seeds.md``.

    ``run_one(config, run_dir, show_progress=...)`` defaults to ``pipeline.run_pipeline``. A seed folder that
    already holds a trained generator is reused (its run continues; no privacy spent again).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"run_seeds: n={n!r}; need an int >= 1.")
    run_dir = Path(run_dir)
    if run_one is None:  # the runs share their embeddings, base perplexity and floor (shared_eval)
        import functools

        from ghostdp.integrations.synthetic.pipeline import run_pipeline
        from ghostdp.integrations.synthetic.shared_eval import SharedEvaluation

        run_one = functools.partial(run_pipeline, shared=SharedEvaluation(run_dir / "shared"))
    from ghostdp.integrations.synthetic.run_folder import lock_run_folder

    with lock_run_folder(run_dir, "pipeline --seeds"):  # seeds.json/md here; each seed folder has its own lock
        return _run_seeds_locked(config, run_dir, n, show_progress, run_one)


def _run_seeds_locked(config: RunConfig, run_dir: Path, n: int, show_progress: bool,
                      run_one: Callable[..., Any]) -> dict[str, Any]:
    metrics = []
    t, s, e = config.train, config.synthesize, config.evaluate
    for i in range(n):
        seed = t.dp_seed
        cfg = dataclasses.replace(
            config, train=dataclasses.replace(t, seed=t.seed + i, dp_seed=None if seed is None else seed + i),
            synthesize=dataclasses.replace(s, sample_seed=s.sample_seed + i),
            evaluate=dataclasses.replace(e, eval_seed=e.eval_seed + i))
        sub = run_dir / f"seed-{i}"
        logger.info("Seed run %d of %d in %s (DP noise: %s; init, sample and eval seeds + %d)", i + 1, n, sub,
                    "fresh OS entropy" if seed is None else f"dp_seed={seed + i}", i)
        run_one(cfg, sub, show_progress=show_progress)
        metrics.append(json.loads((sub / "metrics.json").read_text(encoding="utf-8")))
    summary = aggregate_runs(metrics)
    summary["run_dirs"] = [str(run_dir / f"seed-{i}") for i in range(n)]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "seeds.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    (run_dir / "seeds.md").write_text(seeds_markdown(summary), encoding="utf-8")
    logger.info("Seeds summary written to %s", run_dir / "seeds.md")
    return summary
