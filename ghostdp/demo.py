"""`make demo`: DP synthetic text end to end on the CPU, ``ghostdp pipeline --preset cpu-demo``.

The embedded SmolLM2-135M-Instruct is fine-tuned with DP-SGD (LoRA, epsilon 3, plus 0.1 for the DP label
proportions) on a 2,000-row slice of SST-2 train, samples a few hundred synthetic reviews, and the
evaluation scores them on real SST-2 dev sentences against the baselines (real-data ceiling, DP-trained
classifier on real data, un-finetuned floor), with MAUVE, perplexity and the memorisation check. The
run folder and its report.md are printed at the end.

Any ``ghostdp pipeline`` option can be appended, e.g. ``python -m ghostdp.demo --threads 1 --run-dir runs/x``
(``python -m ghostdp pipeline --help`` lists them).
"""
from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from ghostdp.cli import main as cli_main

    extra = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--threads" or a.startswith("--threads=") for a in extra):
        extra = ["--threads", "auto", *extra]  # a shared CPU: do not oversubscribe the cores others are using
    return cli_main(["pipeline", "--preset", "cpu-demo", *extra])


if __name__ == "__main__":
    sys.exit(main())
