"""Audit report: the lower bounds next to the claimed epsilon, and a plot of canary scores, in vs out.

``write_report(results, out_dir)`` writes ``audit.json`` (summary, no coin flips), ``audit_report.md`` and
``audit_scores.png`` (one histogram panel per audit: scores of canaries that were in the training set
against those that were out; separated histograms are what a privacy leak looks like).
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["markdown", "plot_scores", "write_report"]


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.3f}"


def markdown(results: Sequence, *, title: str = "Privacy audit (one run, Steinke, Nasr, Jagielski 2023)") -> str:
    """A Markdown table: one row per audit, lower bound next to the claimed and the accountant's epsilon."""
    header = ("| audit | score | canaries | guesses (correct/made) | epsilon lower bound | claimed epsilon | "
              "accountant epsilon | delta | confidence | verdict |")
    lines = [f"# {title}", "", header, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        verdict = "**LOWER BOUND EXCEEDS THE CLAIM**" if r.exceeds_claim else "consistent with the claim"
        lines.append(
            f"| {r.what} | {r.score_kind} | {r.num_canaries} | {r.best.num_correct}/{r.best.num_guesses} | "
            f"{_fmt(r.epsilon_lower_bound)} | {_fmt(r.claimed_epsilon)} | {_fmt(r.accountant_epsilon)} | {r.delta:g} | "
            f"{r.confidence:g} | {verdict} |"
        )
    r0 = results[0]
    lines += [
        "", f"Run: noise multiplier {r0.noise_multiplier:.4g}, Poisson rate q = {r0.sample_rate:.4g}, {r0.steps} steps.",
        "Each canary was in the training set with probability 1/2; the auditor guessed in for the highest scores and",
        "out for the lowest, abstaining on the rest, and the best of the tried guess counts is reported with a",
        "Bonferroni correction, so the bound holds at the stated confidence. A lower bound is evidence, not the true",
        "epsilon: a bound far below the claim does not show the claim is tight.",
        "", "Time: " + ", ".join(f"{r.what} {k} {v:.1f} s" for r in results for k, v in r.seconds.items()),
    ]
    return "\n".join(lines) + "\n"


def plot_scores(results: Sequence, path: str | Path) -> Path:
    """PNG with one panel per audit: histograms of the scores of canaries in vs out of the training set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for ax, r in zip(axes[0], results):
        s, inc = np.asarray(r.scores, dtype=float), np.asarray(r.included, dtype=bool)
        bins = np.histogram_bin_edges(s, bins=30) if np.ptp(s) > 0 else 10
        ax.hist(s[inc], bins=bins, alpha=0.6, label=f"in ({inc.sum()})", color="tab:red")
        ax.hist(s[~inc], bins=bins, alpha=0.6, label=f"out ({(~inc).sum()})", color="tab:blue")
        ax.set_title(f"{r.what}: eps >= {_fmt(r.epsilon_lower_bound)} (claimed {_fmt(r.claimed_epsilon)})", fontsize=9)
        ax.set_xlabel(r.score_kind)
        ax.set_ylabel("canaries")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: Sequence, out_dir: str | Path) -> dict[str, Path]:
    """Write audit.json, audit_report.md and audit_scores.png into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "audit.json", "markdown": out / "audit_report.md", "plot": out / "audit_scores.png"}
    paths["json"].write_text(json.dumps([r.to_dict() for r in results], indent=2, default=float))
    plot_scores(results, paths["plot"])
    paths["markdown"].write_text(markdown(results) + f"\n![scores in vs out]({paths['plot'].name})\n")
    return paths
