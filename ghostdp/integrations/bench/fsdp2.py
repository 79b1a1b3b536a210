"""ghostdp under FSDP2 (``fully_shard``) against non-private FSDP2: per-rank peak memory and step time.

    python -m ghostdp.integrations.bench.fsdp2 --out bench/results/fsdp2_cpu
    python -m ghostdp.integrations.bench.fsdp2 --rounds 1 --steps 1 --hidden-size 64 ...   # a quick look
    ghostdp bench --fsdp2 --seq-len 256 --hidden-size 512 ...   # the same through ``ghostdp bench``

The harness launches the process groups itself: for every (round, engine) one fresh group of
``world_size`` CPU processes over gloo (forked from this process, which imports the libraries once and
runs no torch op), so each figure is that group's own. Rounds run every engine in turn, the order rotated
each round, so load from other jobs lands on both; every ratio divides figures of this one run.

Each rank: a randomly initialised Llama (:class:`FSDP2Case`), every decoder block and then the root
passed to ``fully_shard`` (defaults: ``reshard_after_forward=True``), gradient checkpointing, plain SGD,
its own ``batch_per_rank`` sequences of random token ids, the per-example LM loss summed
(``loss_reduction="sum"``); ghostdp with C = 1, sigma = 1 and the global expected batch size. A step is
forward, loss, backward, ``optimizer.step()``, ``zero_grad``; the ranks meet at a barrier before each.

Memory per rank, as in :mod:`~ghostdp.integrations.bench.measure`: peak RSS (``VmHWM``, reset after the
model is built) during the steps minus the RSS after imports and a throwaway miniature step, with glibc's
mmap threshold fixed at 64 KiB (``mallopt``) so a freed tensor leaves RSS. The peak therefore includes the
shards, the optimizer and (ghostdp) the engine's book-keeping. ``probe=True`` also records, for ghostdp,
the RSS and the bytes the engine holds (its per-example pieces: saved layer inputs, output gradients,
embedding ids, dense per-example gradients; distinct storages counted once) when backward ends, and the
high-water mark after forward, after backward and after the optimizer step (which phase held the peak).
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import logging
import os
import shlex
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ghostdp.integrations.bench.engines import (
    MAX_GRAD_NORM,
    NOISE_MULTIPLIER,
    NON_PRIVATE,
    parse_engine,
)
from ghostdp.integrations.bench.results import environment, format_bytes, timing_cells

log = logging.getLogger(__name__)

#: Goals of issue 12 on CPU, ratios ghostdp / non-private FSDP2 of the same run.
GOALS = {"memory_ratio": 1.10, "time_ratio": 1.35}
DEFAULT_ENGINES = (NON_PRIVATE, "ghostdp-auto-torch")
LR = 1e-5


@dataclasses.dataclass(frozen=True)
class FSDP2Case:
    """The model and batch every engine runs on (fp32 Llama, random weights)."""

    hidden_size: int = 512
    intermediate_size: int = 1376
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    vocab_size: int = 8000
    tie_word_embeddings: bool = False
    seq_len: int = 256
    batch_per_rank: int = 4
    world_size: int = 2
    gradient_checkpointing: bool = True

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{f.name} must be a positive integer, got {value!r}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (the loss scores tokens 1..T-1), got {self.seq_len}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")

    @property
    def id(self) -> str:
        tied = "tied" if self.tie_word_embeddings else "untied"
        ckpt = "-ckpt" if self.gradient_checkpointing else ""
        return (f"llama-d{self.hidden_size}-ff{self.intermediate_size}-L{self.num_hidden_layers}-V{self.vocab_size}"
                f"-{tied}{ckpt}-T{self.seq_len}-B{self.batch_per_rank}x{self.world_size}-fsdp2-cpu")


# ------------------------------------------------------------------------------------------ one rank

def _set_mmap_threshold(nbytes: int = 65536) -> None:
    """glibc's M_MMAP_THRESHOLD (-3) fixed at ``nbytes``: freed tensors go back to the OS (see measure.py)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        log.warning("mallopt unavailable: CPU peaks may include freed heap memory")


def _build(case: FSDP2Case, engine: str, rank: int, seed: int):
    """This rank's sharded model, optimizer, engine (or None) and batch."""
    import torch
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = parse_engine(engine)
    if spec.family not in ("non-private", "ghostdp"):
        raise ValueError(f"the FSDP2 bench compares non-private and ghostdp engines, not {engine!r}")
    config = LlamaConfig(vocab_size=case.vocab_size, hidden_size=case.hidden_size,
                         intermediate_size=case.intermediate_size, num_hidden_layers=case.num_hidden_layers,
                         num_attention_heads=case.num_attention_heads, num_key_value_heads=case.num_attention_heads,
                         tie_word_embeddings=case.tie_word_embeddings, max_position_embeddings=max(case.seq_len, 128))
    torch.manual_seed(seed)  # the same weights on every rank and for every engine
    model = LlamaForCausalLM._from_config(config, dtype=torch.float32)
    if case.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    engine_obj = None
    if spec.family == "ghostdp":
        from ghostdp.engine.privacy_engine import PrivacyEngine

        engine_obj = PrivacyEngine(model, optimizer, max_grad_norm=MAX_GRAD_NORM,
                                   expected_batch_size=case.batch_per_rank * case.world_size,
                                   noise_multiplier=NOISE_MULTIPLIER, loss_reduction="sum", clipping=spec.clipping,
                                   impl=spec.impl, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(1000 + rank)
    ids = torch.randint(0, case.vocab_size, (case.batch_per_rank, case.seq_len), generator=gen)  # (B, T)
    return model, optimizer, engine_obj, ids


def held_bytes(engine) -> int:
    """Bytes of the per-example pieces the engine holds for the running backward, distinct storages once."""
    import torch

    seen: dict[int, int] = {}
    for uses in engine._ctx.uses.values():
        for u in uses:
            for value in vars(u).values():
                if isinstance(value, torch.Tensor):
                    storage = value.untyped_storage()
                    seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _probe(engine, marks: dict) -> None:
    """Wrap the engine's end-of-backward so the RSS and held bytes at that moment land in ``marks``."""
    from ghostdp.integrations.bench.measure import _proc_status_bytes

    finalize = engine._finalize

    def probed():
        marks["finalize_rss"] = max(marks.get("finalize_rss", 0), _proc_status_bytes("VmRSS") or 0)
        marks["held_bytes"] = max(marks.get("held_bytes", 0), held_bytes(engine))
        finalize()

    engine._finalize = probed


def _rank_main(rank: int, case: FSDP2Case, engine: str, steps: int, warmup: int, port: int, out_dir: str,
               threads: int | None, probe: bool, seed: int) -> None:
    """One rank of one measurement; writes ``out_dir/rank{rank}.json``."""
    _set_mmap_threshold()
    import torch
    import torch.distributed as dist

    from ghostdp.engine.loss import per_example_lm_loss
    from ghostdp.integrations.bench.measure import (
        _proc_status_bytes,
        _reset_peak_rss,
        _warm_up_libraries,
    )

    if threads:
        torch.set_num_threads(threads)
    _warm_up_libraries()
    base = _proc_status_bytes("VmRSS")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=case.world_size)
    record: dict[str, Any] = {"rank": rank, "engine": engine, "step_times": [], "cpu_times": []}
    try:
        model, optimizer, engine_obj, ids = _build(case, engine, rank, seed)
        marks: dict[str, int] = {}
        if probe and engine_obj is not None:
            _probe(engine_obj, marks)
        record["setup_bytes"] = _proc_status_bytes("VmRSS") - base
        reset = _reset_peak_rss()
        phases = {"forward": 0, "backward": 0, "step": 0}  # the high-water mark of each phase, over all steps

        def phase_end(name: str) -> None:
            phases[name] = max(phases[name], _proc_status_bytes("VmHWM"))
            _reset_peak_rss()  # the next phase's mark starts from the RSS now

        for i in range(warmup + steps):
            dist.barrier()
            _reset_peak_rss()
            t0, c0 = time.perf_counter(), time.process_time()
            logits = model(input_ids=ids).logits  # (B, T, V)
            losses = per_example_lm_loss(logits, ids)  # (B,)
            del logits
            phase_end("forward")
            losses.sum().backward()
            phase_end("backward")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            phase_end("step")
            if i >= warmup:
                record["step_times"].append(time.perf_counter() - t0)
                record["cpu_times"].append(time.process_time() - c0)
        record["peak_bytes"] = max(phases.values()) - base
        record["memory_kind"] = "peak RSS above baseline" + ("" if reset else " (process lifetime)")
        record["hwm_after"] = {k: v - base for k, v in phases.items()}
        if marks:
            record["finalize_rss_bytes"] = marks["finalize_rss"] - base
            record["held_bytes"] = marks["held_bytes"]
        record["status"] = "ok"
    except Exception as exc:  # a failure is a row of the table
        log.warning("rank %d, %s failed", rank, engine, exc_info=True)
        record["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _import_libraries() -> None:
    from torch.distributed.fsdp import fully_shard  # noqa: F401

    import ghostdp.engine.loss  # noqa: F401
    from ghostdp.integrations.bench.measure import (
        _import_libraries as import_bench_libraries,
    )

    import_bench_libraries()


def measure_group(case: FSDP2Case, engine: str, *, steps: int, warmup: int, threads: int | None = 1,
                  probe: bool = False, seed: int = 0) -> list[dict]:
    """One fresh process group of ``case.world_size`` ranks running ``engine``; one record per rank."""
    import torch.multiprocessing as mp

    _import_libraries()  # once, here: every rank's baseline RSS then includes them, whichever engine it runs
    with tempfile.TemporaryDirectory(prefix="ghostdp-bench-fsdp2-") as tmp:
        try:
            mp.start_processes(_rank_main, args=(case, engine, steps, warmup, _free_port(), tmp, threads, probe, seed),
                               nprocs=case.world_size, start_method="fork")
        except Exception as exc:  # noqa: BLE001 - a crashed rank leaves its record or none
            log.warning("FSDP2 group for %s failed: %s", engine, exc)
        records = []
        for rank in range(case.world_size):
            path = Path(tmp, f"rank{rank}.json")
            records.append(json.loads(path.read_text()) if path.exists() else
                           {"rank": rank, "engine": engine, "step_times": [], "cpu_times": [],
                            "status": "error: rank ended without a record"})
    return records


# ------------------------------------------------------------------------------------------ results

def step_times(groups: Sequence[list[dict]], key: str = "step_times") -> list[float]:
    """Per timed step, the slowest rank's time (a step ends when every rank's does), over all groups."""
    out = []
    for records in groups:
        per_rank = [r[key] for r in records]
        if per_rank and all(len(t) == len(per_rank[0]) for t in per_rank):
            out += [max(ts) for ts in zip(*per_rank)]
    return out


def summarize(engine: str, groups: Sequence[list[dict]]) -> dict:
    """One row: status, step times (slowest rank per step; min / median), per-rank median peak memory."""
    records = [r for g in groups for r in g]
    status = next((r["status"] for r in records if r["status"] != "ok"), "ok") if records else "not run"
    wall, cpu = step_times(groups), step_times(groups, "cpu_times")
    ranks = sorted({r["rank"] for r in records})

    def median_of(key: str, rank: int) -> int | None:
        values = [r[key] for r in records if r["rank"] == rank and r.get(key) is not None and r["status"] == "ok"]
        return int(statistics.median(values)) if values else None

    peaks = [median_of("peak_bytes", k) for k in ranks]
    row = {
        "engine": engine, "status": status, "groups": len(groups), "n_steps": len(wall),
        "step_min_s": min(wall, default=None), "step_median_s": statistics.median(wall) if wall else None,
        "cpu_min_s": min(cpu, default=None), "cpu_median_s": statistics.median(cpu) if cpu else None,
        "peak_bytes_per_rank": peaks,
        "peak_bytes": max(peaks) if peaks and None not in peaks else None,
        "setup_bytes": max((median_of("setup_bytes", k) or 0) for k in ranks) if ranks else None,
        "step_s": [round(t, 4) for t in wall], "cpu_s": [round(t, 4) for t in cpu],
    }
    for key in ("finalize_rss_bytes", "held_bytes"):
        values = [median_of(key, k) for k in ranks]
        row[key] = max(values) if values and None not in values else None
    hwm = [r["hwm_after"] for r in records if r.get("hwm_after")]
    row["hwm_after"] = {k: int(statistics.median(h[k] for h in hwm)) for k in hwm[0]} if hwm else None
    return row


def add_ratios(rows: list[dict]) -> list[dict]:
    """Each row's ratios to the non-private row (same run): memory of the busiest rank, times' min and median."""
    base = next((r for r in rows if r["engine"] == NON_PRIVATE), None)

    def ratio(a, b):
        return a / b if a is not None and b else None

    for r in rows:
        for key, out in (("peak_bytes", "memory_ratio"), ("step_min_s", "time_ratio_min"),
                         ("step_median_s", "time_ratio_median"), ("cpu_min_s", "cpu_ratio_min"),
                         ("cpu_median_s", "cpu_ratio_median")):
            r[out] = ratio(r.get(key), base.get(key)) if base else None
    return rows


def goals(rows: list[dict]) -> list[dict]:
    """Issue 12's CPU goals for every ghostdp row: memory <= 1.10x and wall time (min) <= 1.35x."""
    out = []
    for r in rows:
        if r["engine"] == NON_PRIVATE or r["status"] != "ok":
            continue
        for goal, measured, limit in (("memory", r["memory_ratio"], GOALS["memory_ratio"]),
                                      ("wall time (min)", r["time_ratio_min"], GOALS["time_ratio"])):
            out.append({"engine": r["engine"], "goal": f"{goal} / non-private <= {limit}", "measured": measured,
                        "met": None if measured is None else measured <= limit})
    return out


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(result: dict) -> str:
    """The run as Markdown: command, environment, settings, the table, the goals, the engine probe."""
    env, s = result["environment"], result["settings"]
    case = result["case"]
    lines = [
        "# ghostdp vs non-private under FSDP2 (fully_shard), CPU", "",
        f"Command: `{result['command']}`", "",
        (f"- {env['device']}; torch {env.get('torch')}, transformers {env.get('transformers')}; commit "
         f"{env.get('commit')}; {env.get('date')}; load average at start {env.get('load_average_start')}, at end "
         f"{env.get('load_average_end')}"),
        f"- case `{result['case_id']}`: " + ", ".join(f"{k}={v}" for k, v in case.items()),
        (f"- {s['rounds']} rounds (engines rotated each round, one fresh {case['world_size']}-process gloo group "
         f"per engine and round) x {s['steps']} timed steps after {s['warmup']} warm-up; {s['threads']} torch "
         f"thread(s) per rank; SGD lr {LR}; ghostdp C = {MAX_GRAD_NORM}, sigma = {NOISE_MULTIPLIER}, "
         "loss_reduction='sum', expected batch = world x per-rank batch"),
        "",
        ("Step: forward, per-example LM loss, backward, optimizer step, zero_grad, after a barrier; a step's time "
         "is its slowest rank's. Peak memory per rank: peak RSS of a fresh process during the steps minus its RSS "
         "after imports and a miniature step (glibc mmap threshold 64 KiB); includes shards and optimizer. "
         "`x np`: ratio to non-private of this run (busiest rank for memory; minima / medians for time)."),
        "",
        ("| engine | wall s min / median | x np | CPU s min / median | x np | n | peak memory per rank | "
         "memory x np | status |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        peaks = ", ".join(format_bytes(p) for p in r["peak_bytes_per_rank"]) or "-"
        lines.append(
            f"| {r['engine']} {timing_cells(r)}| {r['n_steps']} "
            f"| {peaks} | {_fmt(r['memory_ratio'], '.3f')} | {r['status']} |")
    checks = goals(result["rows"])
    if checks:
        lines += ["", "## Goals (issue 12, CPU)", "", "| engine | goal | measured | met |", "|---|---|---|---|"]
        for c in checks:
            met = "n/a" if c["met"] is None else ("yes" if c["met"] else "**no**")
            lines.append(f"| {c['engine']} | {c['goal']} | {_fmt(c['measured'], '.3f')} | {met} |")
    probed = [r for r in result["rows"] if r.get("hwm_after")]
    if probed:
        lines += ["", "## Where the peak is (busiest rank's medians)", "",
                  ("| engine | after setup | high-water in forward / backward / step | RSS when backward ends "
                   "| held by the engine then |"), "|---|---|---|---|---|"]
        for r in probed:
            h = r["hwm_after"]
            lines.append(f"| {r['engine']} | {format_bytes(r['setup_bytes'])} | {format_bytes(h['forward'])} / "
                         f"{format_bytes(h['backward'])} / {format_bytes(h['step'])} "
                         f"| {format_bytes(r.get('finalize_rss_bytes'))} | {format_bytes(r.get('held_bytes'))} |")
    return "\n".join(lines) + "\n"


def rotated(items: Sequence[str], shift: int) -> list[str]:
    shift %= len(items)
    return list(items[shift:]) + list(items[:shift])


def compare(case: FSDP2Case, engines: Sequence[str] = DEFAULT_ENGINES, *, rounds: int = 3, steps: int = 1,
            warmup: int = 1, threads: int | None = 1, probe: bool = True, command: str = "") -> dict:
    """Every engine once per round (order rotated per round), each in a fresh process group; the result."""
    for e in engines:
        parse_engine(e)
    env = environment("cpu")
    groups: dict[str, list[list[dict]]] = {e: [] for e in engines}
    for i in range(rounds):
        for engine in rotated(engines, i):
            log.info("round %d/%d: %s", i + 1, rounds, engine)
            groups[engine].append(measure_group(case, engine, steps=steps, warmup=warmup, threads=threads,
                                                probe=probe))
    if hasattr(os, "getloadavg"):
        env["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    rows = add_ratios([summarize(e, groups[e]) for e in engines])
    return {"command": command, "environment": env, "case": dataclasses.asdict(case), "case_id": case.id,
            "settings": {"rounds": rounds, "steps": steps, "warmup": warmup, "threads": threads},
            "rows": rows, "records": groups}


def write(result: dict, stem: str | Path) -> None:
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    log.info("wrote %s.{json,md}", stem)


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


#: What each :class:`FSDP2Case` field sets, for the options' help.
CASE_HELP = {
    "hidden_size": "model width d", "intermediate_size": "MLP width", "num_hidden_layers": "decoder blocks",
    "num_attention_heads": "attention heads (as many key/value heads)", "vocab_size": "vocabulary size V",
    "tie_word_embeddings": "the LM head shares the input embedding", "seq_len": "tokens per sequence T",
    "batch_per_rank": "sequences per rank per step", "world_size": "ranks (CPU processes over gloo)",
    "gradient_checkpointing": "non-reentrant activation checkpointing",
}


def add_case_arguments(parser, exclude: Sequence[str] = ()) -> None:
    """One option per :class:`FSDP2Case` field (``--hidden-size``, ``--tie-word-embeddings true``, ...) but
    those in ``exclude``; each defaults to None, which :func:`case_from` reads as the field's default."""
    defaults = FSDP2Case()
    for f in dataclasses.fields(FSDP2Case):
        if f.name in exclude:
            continue
        default = getattr(defaults, f.name)
        if f.type == "bool":
            parser.add_argument("--" + f.name.replace("_", "-"), type=_bool, default=None, metavar="true|false",
                                help=f"{CASE_HELP[f.name]} (default {str(default).lower()})")
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), type=int, default=None, metavar="N",
                                help=f"{CASE_HELP[f.name]} (default {default})")


def case_from(ns: argparse.Namespace, **overrides) -> FSDP2Case:
    """The :class:`FSDP2Case` of the options :func:`add_case_arguments` added: the given ones (not None) and
    ``overrides`` (not None) over the defaults. Raises ValueError as :class:`FSDP2Case` does."""
    given = {f.name: getattr(ns, f.name) for f in dataclasses.fields(FSDP2Case) if getattr(ns, f.name, None) is not None}
    given.update({k: v for k, v in overrides.items() if v is not None})
    return FSDP2Case(**given)


def check_options(engines: Sequence[str], *, rounds: int, steps: int, warmup: int, threads: int | None) -> None:
    """Raise ValueError on bad counts or an engine this harness does not compare (non-private and ghostdp's
    only), before any process starts."""
    if rounds < 1 or steps < 1 or warmup < 0:
        raise ValueError("--rounds and --steps must be >= 1 and --warmup >= 0")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    if not engines:
        raise ValueError("--engines: name at least one engine")
    for e in engines:
        if parse_engine(e).family not in ("non-private", "ghostdp"):
            raise ValueError(f"the FSDP2 bench compares non-private and ghostdp engines, not {e!r}")


def run(case: FSDP2Case, engines: Sequence[str] = DEFAULT_ENGINES, *, rounds: int = 3, steps: int = 1,
        warmup: int = 1, threads: int | None = 1, out: str | Path | None = None, command: str = "") -> int:
    """Run :func:`compare`, write ``<out>.json``/``<out>.md`` when ``out`` is given and print the Markdown.

    0 when every row is "ok", 1 otherwise; ValueError from :func:`check_options` before anything runs."""
    check_options(engines, rounds=rounds, steps=steps, warmup=warmup, threads=threads)
    result = compare(case, engines, rounds=rounds, steps=steps, warmup=warmup, threads=threads, command=command)
    if out:
        write(result, out)
    sys.stdout.write(markdown(result))
    return 1 if any(r["status"] != "ok" for r in result["rows"]) else 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ghostdp.integrations.bench.fsdp2", description=__doc__.split("\n\n")[0])
    add_case_arguments(p)
    p.add_argument("--engines", nargs="+", default=list(DEFAULT_ENGINES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=1, help="timed steps per group (default 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per group (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--out", default=None, help="write <OUT>.json and <OUT>.md (e.g. bench/results/fsdp2_cpu)")
    ns = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    command = "python -m ghostdp.integrations.bench.fsdp2 " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    try:
        case = case_from(ns)
        check_options(ns.engines, rounds=ns.rounds, steps=ns.steps, warmup=ns.warmup, threads=ns.threads)
    except ValueError as exc:
        p.error(str(exc))  # exits with status 2
    return run(case, ns.engines, rounds=ns.rounds, steps=ns.steps, warmup=ns.warmup, threads=ns.threads,
               out=ns.out, command=command.strip())


if __name__ == "__main__":
    sys.exit(main())
