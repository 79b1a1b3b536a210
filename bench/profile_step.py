"""Where one optimizer step spends its time, ghostdp against non-private training, on the setup every bench
figure uses (:func:`ghostdp.integrations.bench.setup`: same weights, batch, AdamW and per-example loss).

    .venv/bin/python bench/profile_step.py                          # SmolLM2-135M, full, B=8, T=128, CPU
    .venv/bin/python bench/profile_step.py --lora --out bench/results/profile_smollm2_lora_cpu.md

Per engine, after one warm-up step: ``torch.profiler`` over ``--steps`` steps (operators by self CPU time),
then ``cProfile`` over one more step of the private engine (ghostdp's own Python functions by cumulative
time). The operator times are wall time inside each operator (torch.profiler's "self CPU"). The report
lists each engine's top operators, the operators whose time grows most from non-private to ghostdp, and
ghostdp's functions. One torch thread by default: on a CPU shared with other
jobs the steadiest figures, but still noisy (10-30% between steps); read the shares, not the seconds.
"""
from __future__ import annotations

import argparse
import cProfile
import logging
import pstats
import sys
import time
from pathlib import Path

import torch

from ghostdp.integrations import bench

log = logging.getLogger("profile_step")


def op_times(step, steps: int) -> dict[str, float]:
    """Self time per operator and step over ``steps`` calls of ``step``: what torch.profiler calls self CPU
    time is wall time inside the operator, so on a loaded machine it exceeds the process's CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return {e.key: e.self_cpu_time_total / 1e6 / steps for e in prof.key_averages()}


def ghostdp_functions(step, top: int) -> list[tuple[str, float, float, int]]:
    """(function, cumulative s, own s, calls) of ghostdp's Python functions over one step, by cumulative time."""
    prof = cProfile.Profile()
    prof.enable()
    step()
    prof.disable()
    stats = pstats.Stats(prof)
    rows = []
    for (filename, line, name), (_, calls, own, cum, _) in stats.stats.items():
        if "/ghostdp/" in filename and "/integrations/" not in filename:
            short = filename.split("/ghostdp/", 1)[1]
            rows.append((f"{short}:{line} {name}", cum, own, calls))
    return sorted(rows, key=lambda r: -r[1])[:top]


def table(header: str, rows: list[tuple]) -> list[str]:
    cols = header.count("|") - 1
    return [header, "|" + "---|" * cols, *("| " + " | ".join(str(c) for c in r) + " |" for r in rows), ""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lora", action="store_true")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--engine", default="ghostdp-auto-torch", help="the private engine to profile")
    p.add_argument("--steps", type=int, default=2, help="profiled steps per engine (after one warm-up)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--out", default=None, help="Markdown report (default bench/results/profile_<case>.md)")
    ns = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(ns.threads)
    case = bench.Case(ns.model, ns.lora, ns.seq_len, ns.batch_size)
    engines = [bench.NON_PRIVATE, ns.engine]
    ops, wall, funcs = {}, {}, []
    with bench.Session(engines) as session:
        weights = session.weights_dir(case)
        for engine in engines:
            wl = bench.setup(case, engine, weights_dir=weights)
            wl.step()
            t0 = time.process_time()
            ops[engine] = op_times(wl.step, ns.steps)
            wall[engine] = (time.process_time() - t0) / ns.steps
            if engine != bench.NON_PRIVATE:
                funcs = ghostdp_functions(wl.step, ns.top)
            log.info("%s: %.2f CPU s per profiled step", engine, wall[engine])
            del wl
    env = bench.environment("cpu")
    private = ns.engine
    lines = [f"# Profile of one step: {case.id}, {private} vs non-private", "",
             f"- {env['device']}; torch {env['torch']}, transformers {env['transformers']}; commit {env['commit']}; "
             f"{env['date']}; load average {env.get('load_average_start')}; {ns.threads} torch thread(s); "
             f"{ns.steps} profiled steps per engine after one warm-up",
             f"- CPU s per step under the profiler: non-private {wall[bench.NON_PRIVATE]:.2f}, {private} "
             f"{wall[private]:.2f} ({wall[private] / wall[bench.NON_PRIVATE]:.2f}x). The profiler adds its own "
             "overhead, and a shared CPU moves step times by 10-30%: read shares and differences, not seconds.", ""]
    for engine in engines:
        total = sum(ops[engine].values())
        top = sorted(ops[engine].items(), key=lambda kv: -kv[1])[:ns.top]
        lines += [f"## Top operators, {engine} (self time per step: wall seconds inside the operator, as "
                  "torch.profiler counts them)", ""]
        lines += table("| operator | self s | share |", [(k, f"{v:.3f}", f"{v / total:.1%}") for k, v in top])
    diff = {k: ops[private].get(k, 0.0) - ops[bench.NON_PRIVATE].get(k, 0.0)
            for k in set(ops[private]) | set(ops[bench.NON_PRIVATE])}
    extra = sum(diff.values())
    grown = sorted(diff.items(), key=lambda kv: -kv[1])[:ns.top]
    lines += [f"## Where the extra time goes: {private} minus non-private, per operator (total {extra:+.3f} s)", ""]
    lines += table("| operator | non-private s | private s | difference s |",
                   [(k, f"{ops[bench.NON_PRIVATE].get(k, 0.0):.3f}", f"{ops[private].get(k, 0.0):.3f}", f"{v:+.3f}")
                    for k, v in grown])
    lines += [f"## ghostdp's own functions over one {private} step (cProfile, by cumulative time)", ""]
    lines += table("| function | cumulative s | own s | calls |",
                   [(name, f"{cum:.3f}", f"{own:.3f}", calls) for name, cum, own, calls in funcs])
    out = Path(ns.out or Path(__file__).resolve().parent / "results" / f"profile_{case.id}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
