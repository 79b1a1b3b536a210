"""``ghostdp``: DP synthetic text from the command line.

    ghostdp pipeline --preset cpu-demo                  # train + synthesize + evaluate, one run folder
    ghostdp train --config run.toml --run-dir runs/a    # DP fine-tuning only -> runs/a/model
    ghostdp synthesize --run-dir runs/a --num-samples 1000
    ghostdp evaluate --run-dir runs/a
    ghostdp bench --lora --seq-len 128                  # engine speed/memory vs non-private and Opacus
    ghostdp audit --num-canaries 256 --target-epsilon 8 # one-run privacy audit (exit 3 if the claim fails)
    ghostdp <command> --help                            # every option, with its meaning and default

Configuration, later wins: the dataclass defaults (``ghostdp.integrations.synthetic.config``), the run folder's
own ``config.toml`` when it has one (so ``synthesize``/``evaluate`` continue a run as it was set up),
``--preset``, ``--config FILE.toml``, then the flags. A stage that succeeds writes the configuration it ran to
``<run-dir>/config.toml`` (a failed or refused command writes nothing there, so it never becomes the base of
the next one; a setting taken from it that makes the run not private, dp_seed, is said in a warning).

Exit codes: 0 success; 2 bad usage, configuration or input (the command refused to start and changed
nothing in the run folder: the message names each setting or file and what to change); 1 failure while
running; 130 interrupted (the message says what re-running the same command will do: training resumes
from its last checkpoint, a trained generator is reused, synthesis resumes where it stopped).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import logging.handlers
import os
import sys
import time
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ghostdp.integrations.synthetic.config import (
    SECTIONS,
    ConfigError,
    RunConfig,
    build_run_config,
    load_toml,
    merge_overrides,
)

logger = logging.getLogger("ghostdp.cli")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_AUDIT_EXCEEDS = 3  # as `ghostdp audit`: the audit's lower bound exceeds the accountant's epsilon

#: Which configuration sections each command reads (and so offers as flags).
COMMAND_SECTIONS: dict[str, tuple[str, ...]] = {
    "train": ("data", "train"),
    "synthesize": ("synthesize", "train"),
    "evaluate": ("data", "evaluate", "train"),
    "pipeline": ("data", "train", "synthesize", "evaluate"),
    "study": ("data", "train", "synthesize", "evaluate"),
}

COMMAND_HELP = {
    "train": "DP fine-tuning of the generator on the private data (writes <run-dir>/model).",
    "synthesize": "Sample DP synthetic text from <run-dir>/model (resumable; writes <run-dir>/synthetic).",
    "evaluate": "Score <run-dir>/synthetic on real held-out data against the baselines (writes the report).",
    "pipeline": "train, synthesize and evaluate in one run folder.",
    "study": ("The pipeline over fine-tuning methods x epsilons x seeds, one run folder per cell (resumable), with one "
              "table (study.md/json) and one plot (study.png). Epsilon inf = not private (no noise, no clipping)."),
}

BENCH_HELP = ("Speed and memory of ghostdp against non-private training and Opacus "
              "(ghostdp.integrations.bench).")

#: Flags of the train section that synthesize/evaluate also need (device, seeds); the rest stay hidden there.
_SHARED_TRAIN_FLAGS = ("use_cpu", "dp_seed")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_section_flags(parser: argparse.ArgumentParser, section: str, only: Sequence[str] | None = None) -> None:
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    title = cls.__doc__.strip().splitlines()[0] if cls.__doc__ else None
    group = parser.add_argument_group(f"[{section}] options", title)
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if isinstance(default, tuple):
            default = ",".join(default) if all(isinstance(x, str) for x in default) else default
        kwargs: dict[str, Any] = {"dest": f"{section}.{f.name}", "default": argparse.SUPPRESS,
                                  "help": f"{help_text} (default: {'none' if default is None else default})"}
        if hints[f.name] is bool:
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
        else:
            group.add_argument(_flag(f.name), metavar=f.name.upper(), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from ghostdp.integrations.synthetic.presets import PRESETS

    parser = argparse.ArgumentParser(prog="ghostdp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ghostdp {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{train,synthesize,evaluate,pipeline,bench,audit,study}")
    for command, sections in COMMAND_SECTIONS.items():
        p = sub.add_parser(command, help=COMMAND_HELP[command], description=COMMAND_HELP[command],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        common = p.add_argument_group("run options")
        common.add_argument("--config", metavar="FILE.toml", help="TOML file with [data] [train] [synthesize] "
                            "[evaluate] tables (see ghostdp.integrations.synthetic.config).")
        common.add_argument("--preset", choices=sorted(PRESETS), help="Start from a named preset "
                            "(cpu-demo: a short CPU run; sst2-full: the full-size GPU run).")
        common.add_argument("--run-dir", metavar="DIR", help="The run folder. train/pipeline default to "
                            "runs/<preset>-<time>; synthesize/evaluate need an existing one.")
        common.add_argument("--no-progress", action="store_true", help="No progress bars.")
        common.add_argument("--threads", metavar="N|auto", help="CPU threads for torch (default: torch's choice, "
                            "one per core). 'auto': the cores that other processes leave idle now (measured over "
                            "1 s), at least 1. On a CPU shared with other jobs fewer threads can be several times "
                            "faster: threads that spin-wait for each other stall when they do not all get a core.")
        common.add_argument("-v", "--verbose", action="count", default=0, help="More logging (-vv: debug).")
        common.add_argument("-q", "--quiet", action="store_true", help="Warnings and errors only.")
        if command == "study":
            common.add_argument("--methods", default="lora,prompt,full", metavar="M1,M2",
                                help="Generator fine-tuning methods (lora, prompt, full). Default: lora,prompt,full.")
            common.add_argument("--epsilons", default="1,3,8,inf", metavar="E1,E2",
                                help="Training epsilons; inf = NOT private (no noise, no clipping). Default: 1,3,8,inf.")
            common.add_argument("--seeds", type=int, default=3, metavar="N",
                                help="Runs per (method, epsilon), fresh DP noise each. Default: 3.")
            common.add_argument("--method-lr", metavar="M=LR,...", help="Learning rate per method, e.g. "
                                "lora=1e-2,prompt=5e-2,full=2e-4 (default: --learning-rate for every method).")
            common.add_argument("--summarize-only", action="store_true",
                                help="Run no cell: write study.md/json/png from the cells finished so far and list "
                                "the ones not run (a time-boxed or interrupted study).")
        if command == "pipeline":
            common.add_argument("--seeds", type=int, default=1, metavar="N",
                                help="Repeat the whole run N times with fresh DP noise (<run-dir>/seed-<i>) and "
                                "report the mean and std of every accuracy (<run-dir>/seeds.md). Each repeat "
                                "trains on the private data again: release at most one of them.")
        if command == "evaluate":
            common.add_argument("--hparam-grid", metavar="GRID", nargs="?", const="default",
                                help="Instead of the report: hyperparameter-ranking fidelity. Train the downstream "
                                "classifier over GRID once on the synthetic and once on the real training data, "
                                "score both on real held-out data, write Spearman, Kendall, regret and a plot to "
                                "<run-dir>/hparam/. GRID: 'C=0.01,0.1,1;class_weight=none,balanced' (linear probe, "
                                "the default grid when GRID is left out) or 'lr=1e-5,5e-5;epochs=1,3' (fine-tuned "
                                "MiniLM).")
        if command == "synthesize":
            common.add_argument("--max-batches", type=int, metavar="N",
                                help="Stop after N generation batches (resume later by running the command again).")
        for section in sections:
            only = _SHARED_TRAIN_FLAGS if section == "train" and command in ("synthesize", "evaluate") else None
            _add_section_flags(p, section, only)
    from ghostdp.integrations import bench

    p = sub.add_parser("bench", help=BENCH_HELP, description=BENCH_HELP)
    bench.add_arguments(p)
    from ghostdp.integrations.audit import command as audit_command

    p = sub.add_parser("audit", help=audit_command.HELP, description=audit_command.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    audit_command.add_arguments(p)
    return parser


# ----------------------------------------------------------------------------------------------------
# Configuration resolution
# ----------------------------------------------------------------------------------------------------


def _flag_layer(ns: argparse.Namespace) -> dict[str, Any]:
    layer: dict[str, Any] = {}
    for dest, value in vars(ns).items():
        if "." in dest:
            section, key = dest.split(".", 1)
            layer.setdefault(section, {})[key] = value
    return layer


def resolve_config(ns: argparse.Namespace) -> tuple[RunConfig, Path]:
    """Merge the layers (see the module docstring) into a checked RunConfig and the run folder."""
    from ghostdp.integrations.synthetic.presets import preset_layer

    layers: list[dict[str, Any]] = []
    file_layer = load_toml(ns.config) if ns.config else {}
    run_dir = ns.run_dir or file_layer.get("run_dir")
    folder_layer: dict[str, Any] = {}
    if run_dir is not None and (Path(run_dir) / "config.toml").is_file():
        folder_layer = load_toml(Path(run_dir) / "config.toml")  # written only by stages that succeeded
        layers.append(folder_layer)
    preset = ns.preset or file_layer.get("preset")
    if preset is not None:
        layers.append(preset_layer(preset))
    layers += [file_layer, _flag_layer(ns)]
    merged = merge_overrides(*layers)
    seed_now = merge_overrides(*layers[1 if folder_layer else 0:]).get("train", {}).get("dp_seed")
    seed_folder = folder_layer.get("train", {}).get("dp_seed")
    if seed_now is None and seed_folder not in (None, "none"):
        logger.warning("train.dp_seed=%s comes from %s (this command does not set it): the run folder's generator "
                       "was trained with a known seed, so it is NOT private; the DP baseline reuses the seed too.",
                       seed_folder, Path(run_dir) / "config.toml")
    if run_dir is not None:
        merged["run_dir"] = run_dir
    if ns.command in ("synthesize", "evaluate"):
        if run_dir is None:
            raise ConfigError(f"ghostdp {ns.command} needs --run-dir: the folder a `ghostdp train` (or pipeline) "
                              "wrote.")
        if not Path(run_dir).is_dir():
            raise ConfigError(f"--run-dir {run_dir}: no such folder. Run `ghostdp train --run-dir {run_dir}` first.")
    elif run_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = str(Path("runs") / f"{merged.get('preset') or 'run'}-{stamp}")
        merged["run_dir"] = run_dir
    config = build_run_config(merged)
    _check_data_paths(config, ns.command)
    return config, Path(run_dir)


def _check_data_paths(config: RunConfig, command: str) -> None:
    """Missing data files are a configuration error (exit 2), found before any model is loaded."""
    if command == "synthesize":
        return
    from ghostdp.integrations.synthetic.text_data import default_sst2_dir

    model = config.train.model
    if command in ("train", "pipeline", "study") and model.startswith(("/", ".", "~")) and not Path(model).expanduser().is_dir():
        raise ConfigError(f"train.model={model!r}: no such folder. Name a local model folder, a Hugging Face model "
                          "name, or 'smollm2-135m'.")
    data = config.data
    for role in ("train_data", "eval_data"):
        if role == "eval_data" and command == "train":
            continue
        spec = getattr(data, role)
        if spec is None:
            from ghostdp.integrations.synthetic.run_folder import load_eval_data

            load_eval_data(data)  # raises the ConfigError that says to name the held-out data
        if spec.startswith("sst2:"):
            folder = Path(data.sst2_dir) if data.sst2_dir else default_sst2_dir()
            path = folder / f"{spec.split(':', 1)[1]}.tsv"
            if not path.is_file():
                raise ConfigError(f"data.{role}={spec!r}: {path} not found; set data.sst2_dir to the folder with the "
                                  "SST-2 TSV files.")
        elif not Path(spec).exists() and (Path(spec).suffix or "/" in spec):
            raise ConfigError(f"data.{role}={spec!r}: no such file. Check the path (relative paths start from "
                              f"{Path.cwd()}).")
        elif Path(spec).is_dir():
            raise ConfigError(f"data.{role}={spec!r} is a folder, not a file: name the .csv, .tsv, .jsonl or .parquet "
                              "file in it.")


# ----------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------


def _setup_logging(ns: argparse.Namespace) -> None:
    level = logging.WARNING if ns.quiet else logging.DEBUG if ns.verbose >= 2 else logging.INFO
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_ghostdp", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler._ghostdp = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("transformers", "httpx", "urllib3", "datasets", "huggingface_hub", "peft", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR if ns.verbose < 2 else logging.INFO)
    if ns.verbose < 2:
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="transformers")


class _RunLog(logging.handlers.MemoryHandler):
    """``<run-dir>/ghostdp.log``. Records are held back until a stage has passed its checks (it logs a record
    with ``extra={"ghostdp_commit": True}``), then written as they come; a refused command leaves the run
    folder exactly as it was, log included. A failure writes what was held back."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(capacity=100_000, flushLevel=logging.CRITICAL + 1)
        self.run_dir = run_dir
        self.committed = False

    def shouldFlush(self, record: logging.LogRecord) -> bool:
        self.committed = self.committed or bool(getattr(record, "ghostdp_commit", False))
        return self.committed or super().shouldFlush(record)

    def flush(self) -> None:
        if self.buffer and self.target is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            target = logging.FileHandler(self.run_dir / "ghostdp.log", encoding="utf-8")
            target.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            self.setTarget(target)
        super().flush()

    def close(self) -> None:
        super().close()  # flushes
        if self.target is not None:
            self.target.close()


def _log_to_file(run_dir: Path) -> logging.Handler:
    handler = _RunLog(run_dir)
    handler._ghostdp = True  # type: ignore[attr-defined]
    logging.getLogger().addHandler(handler)
    return handler


def _cpu_times(cores: set[int]) -> dict[int, list[int]] | None:
    """Per CPU of ``cores``: its first 8 ``/proc/stat`` counters (user nice system idle iowait irq softirq
    steal, in clock ticks); None where /proc/stat cannot be read."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            rows = [line.split() for line in f if line.startswith("cpu") and line[3:4].isdigit()]
        return {int(r[0][3:]): [int(v) for v in r[1:9]] for r in rows if int(r[0][3:]) in cores}
    except (OSError, ValueError):
        return None


def _busy_cores(cores: set[int], seconds: float = 1.0) -> float:
    """How many of the CPUs ``cores`` (this process's affinity set) other processes keep busy now: their
    non-idle share of time over ``seconds`` (:func:`_cpu_times`; this process sleeps meanwhile), summed over
    those CPUs. Where there is no /proc/stat, the 1-minute load average.

    Not the load average on Linux: it lags by about a minute, so right after a job ends (e.g. ``make demo``'s own
    pip set-up) it still counts that job, and 'auto' gave 1 thread on an idle 2-core machine.
    """
    first = _cpu_times(cores)
    if not first or any(len(v) < 5 for v in first.values()):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    time.sleep(seconds)
    second = _cpu_times(cores) or first
    busy = 0.0
    for cpu, before in first.items():
        delta = [b - a for a, b in zip(before, second.get(cpu, before))]
        total, idle = sum(delta), delta[3] + delta[4]
        busy += 0.0 if total <= 0 else (total - idle) / total
    return busy


def _threads(value: str) -> int | None:
    """``--threads``: an int >= 1, or 'auto' = the cores other processes leave idle now (rounded), at least 1."""
    if value == "auto":
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
        return max(1, min(len(cpus), round(len(cpus) - _busy_cores(cpus))))
    try:
        n = int(value)
    except ValueError:
        return None
    return n if n >= 1 else None


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _run(ns: argparse.Namespace, config: RunConfig, run_dir: Path) -> int | None:
    from ghostdp.integrations.synthetic import pipeline

    show = not ns.no_progress
    if ns.command == "train":
        gen = pipeline.train(config, run_dir, show_progress=show)
        p = gen.info["privacy"]
        epsilon_inf = p["epsilon_total"] is None
        print(f"Generator: {run_dir / pipeline.MODEL_DIR}\n{_not_private(p.get('dp_seed'), epsilon_inf)}"
              + ("" if epsilon_inf else
                 f"(epsilon={p['epsilon_total']:.4g}, delta={p['delta']:.3g})-DP ({p['epsilon_train']:.4g} DP-SGD over "
                 f"{p['steps']} steps, noise multiplier {p['noise_multiplier']:.4g}; "
                 f"{p['epsilon_labels']:.4g} label proportions)"))
    elif ns.command == "synthesize":
        result = pipeline.synthesize_step(config, run_dir, show_progress=show, max_batches=ns.max_batches)
        state = "complete" if result.complete else "INCOMPLETE (run the same command again to continue)"
        privacy = json.loads(result.meta.read_text(encoding="utf-8")).get("privacy") or {}
        banner = _not_private(privacy.get("dp_seed"), bool(privacy.get("not_private")))
        print(f"{banner}Synthetic data: {result.jsonl} "
              f"({sum(result.counts.values())} samples {result.counts}; {state})")
    elif ns.command == "evaluate" and ns.hparam_grid is not None:
        from ghostdp.integrations.synthetic import hparam

        try:
            grid = hparam.parse_grid(hparam.DEFAULT_GRID if ns.hparam_grid == "default" else ns.hparam_grid)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        res, files = hparam.hparam_run(config, run_dir, grid, show_progress=show)
        print(hparam.hparam_markdown(res) + f"\nWritten: {files['md']}, {files['json']}, {files['png']}")
    elif ns.command == "evaluate":
        result = pipeline.evaluate_step(config, run_dir, show_progress=show)
        _print_headline(result.headline, result.report_md)
    elif ns.command == "study":
        from ghostdp.integrations.synthetic import study

        grid = study.StudyGrid(study.parse_methods(ns.methods), study.parse_epsilons(ns.epsilons), ns.seeds,
                               study.parse_method_lr(ns.method_lr))
        study.run_study(config, run_dir, grid, show_progress=show, summarize_only=ns.summarize_only)
        print((run_dir / "study.md").read_text(encoding="utf-8") + f"\nStudy: {run_dir / 'study.md'}, "
              f"{run_dir / 'study.json'}, {run_dir / 'study.png'}")
    elif ns.seeds > 1:
        from ghostdp.integrations.synthetic.seeds import run_seeds, seeds_markdown

        summary = run_seeds(config, run_dir, ns.seeds, show_progress=show)
        print(seeds_markdown(summary) + f"\nSummary: {run_dir / 'seeds.md'}")
    else:
        result, _, timings = pipeline.run_pipeline(config, run_dir, show_progress=show)
        _print_headline(result.headline, result.report_md, timings)
        if config.evaluate.audit_canaries:
            return _print_audit(run_dir)
    return None


def _print_audit(run_dir: Path) -> int | None:
    """The pipeline's audit line; loud, and exit 3 (as ``ghostdp audit``), when the bound exceeds the claim."""
    from ghostdp.integrations.synthetic.audit_section import AUDIT_DIR

    f = json.loads((run_dir / AUDIT_DIR / "audit_run.json").read_text(encoding="utf-8"))
    print(f"audit ({f['num_canaries']} canaries, separate run, {f['seconds']:.0f}s): epsilon >= "
          f"{_fmt(float(f['epsilon_lower_bound']))} at {float(f['confidence']):.0%} confidence "
          f"({f['num_correct']}/{f['num_guesses']} correct guesses); accountant epsilon "
          f"{_fmt(float(f['accountant_epsilon']))}")
    if not f["exceeds_claim"]:
        return None
    bar = "!" * 78
    print(f"\n{bar}\nPRIVACY AUDIT FAILED: the lower bound exceeds the accountant's epsilon. The mechanism is less "
          "private than claimed: check the noise multiplier, the clipping, the sampling rate given to the "
          f"accountant and the claim itself; do not release {run_dir}.\n{bar}")
    logger.error("privacy audit failed: lower bound %s > accountant epsilon %s (see %s)", f["epsilon_lower_bound"],
                 f["accountant_epsilon"], run_dir / "report.md")
    return EXIT_AUDIT_EXCEEDS


def _not_private(dp_seed: Any, epsilon_inf: bool = False) -> str:
    """The NOT PRIVATE line for a run trained with epsilon inf or with a known dp_seed; else ""."""
    if epsilon_inf:
        return ("NOT PRIVATE: trained with epsilon inf (no noise, no clipping); a baseline for comparisons, never "
                "a release\n")
    if dp_seed is None:
        return ""
    return (f"NOT PRIVATE: trained with the known dp_seed={dp_seed} (the noise can be reproduced and removed; the "
            "figures below hold only for a secret seed)\n")


def _print_headline(h: dict[str, Any], report: Path, timings: dict[str, float] | None = None) -> None:
    incomplete = ("" if h.get("synthetic_complete", True) else
                  f" (INCOMPLETE: {h['n_synthetic']} of {h.get('n_target')}; re-run synthesize to finish)")
    guarantee = ("synthetic data (NOT private)" if h["epsilon"] is None else
                 f"(epsilon={_fmt(h['epsilon'])}, delta={_fmt(h['delta'])})-DP synthetic data")
    banner = _not_private(h.get("dp_seed"), h["epsilon"] is None)
    first = f"{banner}{guarantee}, {h['n_synthetic']} samples{incomplete}"
    lines = [
        first,
        f"accuracy on real held-out data: synthetic {_fmt(h['accuracy_synthetic'])} | DP on real "
        f"{_fmt(h['accuracy_dp_on_real'])} | real, non-private ceiling {_fmt(h['accuracy_real_ceiling'])} | "
        f"prior floor {_fmt(h['accuracy_prior_floor'])}",
        (f"real, same count and length cap {_fmt(h.get('accuracy_real_matched'))} | DP generator as classifier "
         f"{_fmt(h.get('accuracy_generator_classifier'))} | label fidelity {_fmt(h.get('label_fidelity'))}"),
        f"MAUVE {_fmt(h['mauve'])}, held-out perplexity {_fmt(h['perplexity'])}",
    ]
    if timings:
        lines.append("time: " + ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in timings.items())
                     + f" (total {sum(timings.values()):.0f}s)")
    lines.append(f"Report: {report}")
    print("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ghostdp`` script; returns the exit code."""
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code or 0)
    if ns.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if ns.command == "bench":  # its own options and exit codes (ghostdp.integrations.bench.run)
        from ghostdp.integrations import bench

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return bench.run(ns)
    if ns.command == "audit":  # its own options and exit codes (ghostdp.integrations.audit.command.run)
        from ghostdp.integrations.audit import command as audit_command

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return audit_command.run(ns)
    _setup_logging(ns)
    if getattr(ns, "seeds", 1) < 1:
        logger.error("--seeds %d: need an int >= 1.", ns.seeds)
        return EXIT_USAGE
    try:
        config, run_dir = resolve_config(ns)
    except ConfigError as exc:
        logger.error("%s", exc)
        return EXIT_USAGE
    if ns.threads is not None:
        threads = _threads(ns.threads)
        if threads is None:
            logger.error("--threads %r: need an int >= 1 or 'auto'.", ns.threads)
            return EXIT_USAGE
        import torch

        torch.set_num_threads(threads)
        logger.info("torch uses %d CPU thread(s)", threads)
    if ns.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    file_handler = _log_to_file(run_dir)
    started = time.time()
    try:
        rc = _run(ns, config, run_dir)
    except ConfigError as exc:
        logger.error("%s", exc)
        file_handler.buffer.clear()  # a refusal leaves the run folder as it was: no log entry either
        return EXIT_USAGE
    except KeyboardInterrupt:
        from ghostdp.integrations.synthetic.pipeline import interruption_message

        logger.error("Interrupted. %s", f"Re-run the same command with --run-dir {run_dir}: finished cells are not run "
                     "again; the interrupted cell continues as its pipeline does." if ns.command == "study"
                     else interruption_message(ns.command, run_dir))
        return EXIT_INTERRUPTED
    except Exception as exc:  # a failure while running: say what, keep the traceback in the log file
        logger.error("ghostdp %s failed: %s: %s (traceback in %s)", ns.command, type(exc).__name__, exc,
                     run_dir / "ghostdp.log")
        if ns.command in ("train", "pipeline", "synthesize"):
            from ghostdp.integrations.synthetic.pipeline import interruption_message

            logger.error("Once the cause is fixed: %s", interruption_message(ns.command, run_dir))
        logger.debug("traceback", exc_info=True)
        file_handler.handle(logging.LogRecord("ghostdp.cli", logging.ERROR, __file__, 0, "traceback", None,
                                              sys.exc_info()))
        return EXIT_FAILURE
    finally:
        logging.getLogger().removeHandler(file_handler)
        file_handler.close()
    logger.info("ghostdp %s finished in %.0fs", ns.command, time.time() - started)
    return rc if rc else EXIT_OK


def _version() -> str:
    import ghostdp

    return ghostdp.__version__


if __name__ == "__main__":
    sys.exit(main())
