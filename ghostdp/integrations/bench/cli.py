"""ghostdp against non-private training and Opacus: peak memory, step time, largest batch; ``ghostdp bench``.

The comparison table on the command line (``ghostdp bench``, or ``python -m ghostdp.integrations.bench``)::

    ghostdp bench --model smollm2-135m --lora --seq-len 128 512 --batch-size 8 --device cuda
    ghostdp bench --model meta-llama/Llama-3.2-1B --engines non-private ghostdp-auto-triton opacus-ghost

``--fsdp2`` runs the FSDP2 comparison instead (:mod:`~ghostdp.integrations.bench.fsdp2`): ghostdp against
non-private training of a random-weight Llama sharded with ``fully_shard`` over ``--world-size`` CPU
processes (gloo), shaped by its own options::

    ghostdp bench --fsdp2 --steps 2 --out bench/results/fsdp2_cpu    # the committed CPU result
    ghostdp bench --fsdp2 --hidden-size 64 --seq-len 32 --rounds 1   # a quick look
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
from collections.abc import Sequence

from ghostdp.integrations.bench.engines import (
    NON_PRIVATE,
    default_engines,
    engine_names,
    parse_engine,
)
from ghostdp.integrations.bench.results import markdown, write_results
from ghostdp.integrations.bench.session import compare
from ghostdp.integrations.bench.workloads import DTYPES, PRESETS, Case

log = logging.getLogger(__name__)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


#: Options of the single-process comparison only, and their defaults (refused with ``--fsdp2``).
SINGLE_PROCESS_DEFAULTS = {"model": "smollm2-135m", "lora": False, "lora_rank": 16, "batch_size": 8, "device": None,
                           "dtype": None, "untie_embeddings": False, "max_batch_budget_gib": None, "in_process": False}


def _fsdp2():
    """ghostdp.integrations.bench.fsdp2, imported on use: ``python -m ghostdp.integrations.bench.fsdp2`` then
    runs that module once, not a second copy beside the one this package imported."""
    from ghostdp.integrations.bench import fsdp2

    return fsdp2


def fsdp2_only() -> tuple[str, ...]:
    """Options of the FSDP2 comparison only (its case's fields but seq_len, which both share); None unless given."""
    return tuple(f.name for f in dataclasses.fields(_fsdp2().FSDP2Case) if f.name != "seq_len")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``ghostdp bench`` options."""
    fsdp2 = _fsdp2()
    d = SINGLE_PROCESS_DEFAULTS
    parser.add_argument("--model", default=d["model"],
                        help="preset (" + ", ".join(PRESETS) + "), 'smollm2-135m' (embedded), a Hugging Face "
                             "hub name, a local folder or a .gguf file (default: smollm2-135m)")
    parser.add_argument("--lora", action="store_true",
                        help="train LoRA adapters on all linear layers (base frozen) instead of every parameter")
    parser.add_argument("--lora-rank", type=int, default=d["lora_rank"], help="LoRA rank r (default 16)")
    parser.add_argument("--seq-len", type=int, nargs="+", default=None,
                        help="sequence length(s) T; one case per value (default 128; with --fsdp2 one value, "
                             "default 256)")
    parser.add_argument("--batch-size", type=int, default=d["batch_size"], help="examples per step (default 8)")
    parser.add_argument("--engines", nargs="+", default=None, metavar="ENGINE",
                        help="engines to compare (default: all that fit the device; with --fsdp2: "
                             + " ".join(fsdp2.DEFAULT_ENGINES) + "): " + ", ".join(engine_names()))
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=DTYPES,
                        help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--untie-embeddings", action="store_true",
                        help="give the LM head its own copy of tied embeddings, for every engine (Opacus' "
                             "ghost clipping refuses tied parameters)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds: each runs every engine in turn, order rotated per round "
                             "(default: 3 on CPU, 1 on CUDA)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per engine per round (default: 1 on CPU, 5 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps after each workload is built (default: 1 on CPU, 2 on CUDA)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads in each measured process (default: torch's choice; with "
                             "--fsdp2, 1 per rank); on a CPU shared with other jobs, 1 gives the steadiest CPU-time "
                             "figures")
    parser.add_argument("--max-batch-budget-gib", type=float, default=None,
                        help="also search the largest batch size whose peak memory fits this budget (GiB)")
    parser.add_argument("--out", default=None,
                        help="write <OUT>.json and <OUT>.md (e.g. bench/results/mymodel)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every engine in this process (quick look; memory figures not isolated)")
    group = parser.add_argument_group(
        "FSDP2 comparison (--fsdp2)",
        "ghostdp against non-private FSDP2 (fully_shard on every decoder block and the root) of a random-weight "
        "fp32 Llama, each (round, engine) in a fresh group of --world-size CPU processes over gloo; per-rank peak "
        "memory and step time (ghostdp.integrations.bench.fsdp2). Shared with the options above: --seq-len (one "
        "value), --engines, --rounds, --steps, --warmup, --threads, --out; the others above are refused.")
    group.add_argument("--fsdp2", action="store_true", help="run the FSDP2 comparison instead")
    fsdp2.add_case_arguments(group, exclude=("seq_len",))


def run(args: argparse.Namespace) -> int:
    """``ghostdp bench``: print the comparison table. 0 on success, 2 on bad options, 1 if an engine
    failed with an error (an engine refusing the model, or running out of memory, is a result, not a failure).
    With ``--fsdp2``: the FSDP2 comparison (:func:`run_fsdp2`)."""
    if args.fsdp2:
        return run_fsdp2(args)
    misplaced = [_flag(d) for d in fsdp2_only() if getattr(args, d) is not None]
    if misplaced:
        verb = "shapes" if len(misplaced) == 1 else "shape"
        sys.stderr.write(f"ghostdp bench: {', '.join(misplaced)} {verb} the FSDP2 comparison; add --fsdp2 to run it\n")
        return 2
    device = args.device or _default_device()
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    try:
        engines = args.engines or default_engines(device)
        for e in engines:
            parse_engine(e)
        cases = [Case(args.model, args.lora, t, args.batch_size, device=device, dtype=dtype,
                      untie_embeddings=args.untie_embeddings, lora_rank=args.lora_rank)
                 for t in (args.seq_len or [128])]
        cuda = device.startswith("cuda")
        rounds = args.rounds if args.rounds is not None else (1 if cuda else 3)
        steps = args.steps if args.steps is not None else (5 if cuda else 1)
        warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
        if rounds < 1 or steps < 1 or warmup < 0:
            raise ValueError("--rounds and --steps must be >= 1 and --warmup >= 0")
        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"--device {device}: CUDA is not available here; use --device cpu")
    except ValueError as exc:
        sys.stderr.write(f"ghostdp bench: {exc}\n")
        return 2
    budget = None if args.max_batch_budget_gib is None else int(args.max_batch_budget_gib * 2**30)
    if NON_PRIVATE not in engines:
        log.warning("no 'non-private' engine: the ratio columns stay empty")
    result = compare(cases, engines, rounds=rounds, steps=steps, warmup=warmup,
                     isolate=not args.in_process, max_batch_budget=budget, threads=args.threads)
    if args.out:
        write_results(result, args.out)
    sys.stdout.write(markdown(result))
    return 1 if any(r["status"].startswith("error") for r in result["rows"]) else 0


def fsdp2_command(args: argparse.Namespace) -> str:
    """The ``ghostdp bench --fsdp2 ...`` line recorded with the result: the options given, in a fixed order."""
    parts = ["ghostdp", "bench", "--fsdp2"]
    for dest in ("seq_len", *fsdp2_only(), "engines", "rounds", "steps", "warmup", "threads", "out"):
        value = getattr(args, dest)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        parts += [_flag(dest), *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return " ".join(shlex.quote(p) for p in parts)


def run_fsdp2(args: argparse.Namespace) -> int:
    """``ghostdp bench --fsdp2``: :func:`ghostdp.integrations.bench.fsdp2.run` on the case the options shape
    (defaults: :class:`~ghostdp.integrations.bench.fsdp2.FSDP2Case`, 3 rounds, 1 warm-up and 1 timed step
    per group, 1 thread per rank). 0 on success, 2 on bad options, 1 if a row failed."""
    fsdp2 = _fsdp2()
    misplaced = [_flag(d) for d, default in SINGLE_PROCESS_DEFAULTS.items() if getattr(args, d) != default]
    try:
        if misplaced:
            verb = "applies" if len(misplaced) == 1 else "apply"
            raise ValueError(f"{', '.join(misplaced)} {verb} to the single-process comparison, not to --fsdp2 (its "
                             "model is shaped by --hidden-size, --num-hidden-layers, ..., --batch-per-rank, "
                             "--world-size; see ghostdp bench --help)")
        if args.seq_len is not None and len(args.seq_len) != 1:
            raise ValueError(f"--fsdp2 runs one case: give one --seq-len, not {len(args.seq_len)}")
        case = fsdp2.case_from(args, seq_len=args.seq_len[0] if args.seq_len else None)
        engines = args.engines or list(fsdp2.DEFAULT_ENGINES)
        rounds = 3 if args.rounds is None else args.rounds
        steps = 1 if args.steps is None else args.steps
        warmup = 1 if args.warmup is None else args.warmup
        threads = 1 if args.threads is None else args.threads
        fsdp2.check_options(engines, rounds=rounds, steps=steps, warmup=warmup, threads=threads)
    except ValueError as exc:
        sys.stderr.write(f"ghostdp bench --fsdp2: {exc}\n")
        return 2
    return fsdp2.run(case, engines, rounds=rounds, steps=steps, warmup=warmup, threads=threads, out=args.out,
                     command=fsdp2_command(args))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ghostdp bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    return run(parser.parse_args(argv))
