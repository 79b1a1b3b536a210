"""ghostdp against non-private training and Opacus: peak memory, step time, largest batch; ``ghostdp bench``.

The comparison table on the command line (``ghostdp bench``, or ``python -m ghostdp.integrations.bench``)::

    ghostdp bench --model smollm2-135m --lora --seq-len 128 512 --batch-size 8 --device cuda
    ghostdp bench --model meta-llama/Llama-3.2-1B --engines non-private ghostdp-auto-triton opacus-ghost
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``ghostdp bench`` options."""
    parser.add_argument("--model", default="smollm2-135m",
                        help="preset (" + ", ".join(PRESETS) + "), 'smollm2-135m' (embedded), a Hugging Face "
                             "hub name, a local folder or a .gguf file (default: smollm2-135m)")
    parser.add_argument("--lora", action="store_true",
                        help="train LoRA adapters on all linear layers (base frozen) instead of every parameter")
    parser.add_argument("--lora-rank", type=int, default=16, help="LoRA rank r (default 16)")
    parser.add_argument("--seq-len", type=int, nargs="+", default=[128],
                        help="sequence length(s) T; one case per value (default 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step (default 8)")
    parser.add_argument("--engines", nargs="+", default=None, metavar="ENGINE",
                        help="engines to compare (default: all that fit the device): " + ", ".join(engine_names()))
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
                        help="torch CPU threads in each measured process (default: torch's choice); on a CPU "
                             "shared with other jobs, 1 gives the steadiest CPU-time figures")
    parser.add_argument("--max-batch-budget-gib", type=float, default=None,
                        help="also search the largest batch size whose peak memory fits this budget (GiB)")
    parser.add_argument("--out", default=None,
                        help="write <OUT>.json and <OUT>.md (e.g. bench/results/mymodel)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every engine in this process (quick look; memory figures not isolated)")


def run(args: argparse.Namespace) -> int:
    """``ghostdp bench``: print the comparison table. 0 on success, 2 on bad options, 1 if an engine
    failed with an error (an engine refusing the model, or running out of memory, is a result, not a failure)."""
    device = args.device or _default_device()
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    try:
        engines = args.engines or default_engines(device)
        for e in engines:
            parse_engine(e)
        cases = [Case(args.model, args.lora, t, args.batch_size, device=device, dtype=dtype,
                      untie_embeddings=args.untie_embeddings, lora_rank=args.lora_rank) for t in args.seq_len]
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ghostdp bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    return run(parser.parse_args(argv))
