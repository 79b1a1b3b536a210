"""Smoke tests of the benchmark harness (ghostdp.integrations.bench): structure, not speed.

A tiny Llama, one step per engine. What is checked: every engine gives a row (Opacus' refusal of tied
parameters under ghost clipping is a row saying so, not a crash), ratios divide figures of the same
run only, the JSON and Markdown carry what a reader needs, the fresh-process path measures memory,
the largest-batch search finds the boundary, and ``run(args)`` works as the ``ghostdp bench`` command.
No timing assertions.
"""
from __future__ import annotations

import argparse
import json

import pytest

from ghostdp.integrations import bench

TINY = {"model": "tiny-llama", "seq_len": 16, "batch_size": 2}


@pytest.fixture(scope="module")
def tiny_result():
    """One in-process comparison of every CPU engine on LoRA and on full fine-tuning.

    One torch thread: on a loaded two-core machine, two threads meeting at every op's barrier make a
    millisecond step take seconds.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cases = [bench.Case(lora=True, **TINY), bench.Case(lora=False, **TINY)]
        return bench.compare(cases, bench.default_engines("cpu"), rounds=1, steps=1, warmup=0, isolate=False,
                             memory_steps=1, run="smoke")
    finally:
        torch.set_num_threads(threads)


def test_every_engine_has_a_row(tiny_result):
    rows = tiny_result["rows"]
    engines = bench.default_engines("cpu")
    assert [r["engine"] for r in rows] == engines * 2
    by = {(r["mode"], r["engine"]): r for r in rows}
    for (mode, engine), r in by.items():
        if (mode, engine) == ("full", "opacus-ghost"):
            # Opacus raises on tied parameters (embedding = LM head) under ghost clipping.
            assert r["status"].startswith("unsupported:") and "tying" in r["status"]
            assert r["step_min_s"] is None and r["time_ratio_min"] is None
        else:
            assert r["status"] == "ok", (mode, engine, r["status"])
            assert r["n_steps"] == 1 and r["step_min_s"] > 0 and r["trainable"] > 0
    assert by[("lora", "non-private")]["trainable"] < by[("full", "non-private")]["trainable"]
    assert by[("lora", "ghostdp-auto-torch")]["trainable"] == by[("lora", "non-private")]["trainable"]


def test_ratios_come_from_the_same_run(tiny_result):
    rows = tiny_result["rows"]
    for r in rows:
        if r["status"] != "ok":
            continue
        base = next(b for b in rows if b["case"] == r["case"] and b["engine"] == "non-private")
        assert r["time_ratio_min"] == pytest.approx(r["step_min_s"] / base["step_min_s"])
        assert r["time_ratio_median"] == pytest.approx(r["step_median_s"] / base["step_median_s"])
        assert r["cpu_ratio_min"] == pytest.approx(r["cpu_min_s"] / base["cpu_min_s"])
        # In-process on CPU, RSS would mix engines: memory is not reported rather than misreported.
        assert r["peak_bytes"] is None and r["memory_ratio"] is None

    # A non-private row of another run is never used as the base.
    other = [dict(r, run="other") for r in rows if r["engine"] == "non-private"]
    mixed = bench.add_ratios([dict(r) for r in rows if r["engine"] != "non-private"] + other)
    assert all(r["time_ratio_min"] is None for r in mixed if r["run"] == "smoke")


def test_json_and_markdown(tiny_result, tmp_path):
    written = bench.write_results(tiny_result, tmp_path / "engines")
    data = json.loads((tmp_path / "engines.json").read_text())
    assert data == json.loads(json.dumps(written))
    env = data["runs"]["smoke"]
    for key in ("device", "commit", "date", "torch", "transformers", "peft", "opacus", "settings"):
        assert key in env
    assert env["device"].startswith("CPU")
    md = (tmp_path / "engines.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| tiny-llama") and line.count("|") == 14]
    assert len(table) == len(data["rows"])
    assert "unsupported: NotImplementedError" in md and "## Goals" in md


def test_merge_replaces_case_engine_rows_and_keeps_others(tiny_result):
    redo = {"runs": {"new": {"device": "x"}},
            "rows": [dict(r, run="new") for r in tiny_result["rows"]
                     if r["mode"] == "lora" and r["engine"] in ("non-private", "ghostdp-auto-torch")]}
    merged = bench.merge_results(tiny_result, redo)
    runs = {(r["mode"], r["engine"], r["run"]) for r in merged["rows"]}
    assert ("lora", "ghostdp-auto-torch", "new") in runs and ("lora", "ghostdp-auto-torch", "smoke") not in runs
    # The old LoRA non-private row stays beside the new one: the old opacus-hooks row's ratios divide by it.
    assert {("lora", "non-private", "smoke"), ("lora", "non-private", "new"), ("lora", "opacus-hooks", "smoke"),
            ("full", "non-private", "smoke")} <= runs
    assert len(merged["rows"]) == len(tiny_result["rows"]) + 1
    assert set(merged["runs"]) == {"smoke", "new"}
    assert "| r2 |" in bench.markdown(merged)


def test_goals_are_judged_on_the_auto_engine(tiny_result):
    checks = bench.goals(tiny_result["rows"])
    assert {c["engine"] for c in checks} == {"ghostdp-auto-torch"}
    full = [c for c in checks if "full" in c["case"]]
    assert any("opacus-hooks" in c["goal"] for c in full)
    # opacus-ghost refused the tied model: that comparison is n/a, not "met".
    assert [c["met"] for c in full if "opacus-ghost" in c["goal"]] == [None]


def test_fresh_process_measures_memory():
    rec = bench.measure_in_subprocess(bench.Case(lora=False, **TINY), "non-private", steps=1, warmup=0, threads=1)
    assert rec["status"] == "ok" and rec["isolated"]
    assert rec["peak_bytes"] > 0 and rec["memory_kind"].startswith("peak RSS")
    assert len(rec["step_times"]) == 1 and len(rec["cpu_times"]) == 1
    refused = bench.measure_in_subprocess(bench.Case(lora=False, **TINY), "ghostdp-auto-triton", steps=1, warmup=0)
    assert refused["status"].startswith("unsupported:") and "CUDA" in refused["status"]


def test_search_max_finds_the_boundary():
    calls = []

    def fits(b):
        calls.append(b)
        return b <= 37

    assert bench.search_max(fits) == 37
    assert len(calls) <= 2 * 6 + 2
    assert bench.search_max(lambda b: False) is None
    assert bench.search_max(lambda b: True, limit=100) == 100


def test_engine_names_and_case_errors():
    assert bench.parse_engine("ghostdp-per_sample-triton").clipping == "per_sample"
    with pytest.raises(ValueError, match="opacus-hooks"):
        bench.parse_engine("ghostdp-fast")
    with pytest.raises(ValueError, match="seq_len"):
        bench.Case("tiny-llama", True, 1, 2)
    with pytest.raises(ValueError, match="device"):
        bench.Case("tiny-llama", True, 16, 2, device="tpu")


def _parse(argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def test_run_prints_the_table_and_writes_files(tmp_path, capsys):
    out = tmp_path / "mine"
    code = bench.run(_parse(["--model", "tiny-llama", "--lora", "--seq-len", "16", "--batch-size", "2",
                             "--engines", "non-private", "ghostdp-auto-torch", "--steps", "1", "--warmup", "0",
                             "--rounds", "1", "--device", "cpu", "--in-process", "--threads", "1",
                             "--out", str(out)]))
    assert code == 0
    printed = capsys.readouterr().out
    assert "| tiny-llama-lora-T16-B2-cpu | ghostdp-auto-torch |" in printed
    assert out.with_suffix(".json").exists() and out.with_suffix(".md").exists()


def test_run_without_fsdp2_keeps_its_defaults(monkeypatch):
    """The FSDP2 options (tests/bench/test_fsdp2_bench.py) leave the single-process comparison's defaults as they
    were: one case at T = 128, batch 8."""
    from ghostdp.integrations.bench import cli

    seen = []
    monkeypatch.setattr(cli, "compare", lambda cases, engines, **kw: seen.append(cases) or {"rows": []})
    monkeypatch.setattr(cli, "markdown", lambda result: "")
    assert bench.run(_parse(["--model", "tiny-llama", "--engines", "non-private", "--device", "cpu"])) == 0
    ((case,),) = seen
    assert (case.seq_len, case.batch_size, case.model) == (128, 8, "tiny-llama")


def test_run_rejects_bad_options(capsys):
    assert bench.run(_parse(["--model", "tiny-llama", "--engines", "nope", "--device", "cpu"])) == 2
    assert "unknown engine" in capsys.readouterr().err


@pytest.mark.gpu
def test_cuda_engines_in_fresh_processes():
    """On a GPU: every default CUDA engine (Triton kernels included) on the tiny Llama in bf16, memory
    from fresh processes (max_memory_allocated), one timed step each."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    case = bench.Case(lora=False, device="cuda", dtype="bfloat16", **TINY)
    result = bench.compare([case], bench.default_engines("cuda"), rounds=1, steps=1, warmup=1, memory_steps=2,
                           run="gpu-smoke")
    for r in result["rows"]:
        if r["engine"] == "opacus-ghost":
            assert r["status"].startswith("unsupported:")
            continue
        assert r["status"] == "ok", (r["engine"], r["status"])
        assert r["peak_bytes"] > 0 and r["memory_kind"] == "cuda max_memory_allocated"
        assert r["cpu_min_s"] is None and r["step_min_s"] > 0
    assert result["runs"]["gpu-smoke"]["device"] == torch.cuda.get_device_name()


def test_predict_max_batch_follows_the_affine_peak():
    GiB = 2**30
    fixed, per_example = 20 * GiB, 3 * GiB  # weights + optimizer state; activations per example
    peaks = {b: fixed + b * per_example for b in (2, 8)}
    assert bench.predict_max_batch(peaks, 80 * GiB) == 20  # (80 - 20) / 3
    assert bench.predict_max_batch(peaks, 80 * GiB - 1) == 19
    # A least-squares line through noisy peaks at three sizes lands on the same answer.
    noisy = {2: peaks[2] + 10**6, 4: fixed + 4 * per_example - 10**6, 8: peaks[8] + 10**6}
    assert bench.predict_max_batch(noisy, 80 * GiB) == 19
    assert bench.predict_max_batch(peaks, 10 * GiB) is None  # the smallest batch measured does not fit
    assert bench.predict_max_batch({2: 5 * GiB, 8: 5 * GiB}, 80 * GiB) is None  # flat: no line to follow
    with pytest.raises(ValueError, match="two or more"):
        bench.predict_max_batch({8: peaks[8]}, 80 * GiB)


def test_goals_skip_a_mode_without_stated_goals(tiny_result):
    rows = [dict(r, mode="qlora", case=r["case"] + "-q") for r in tiny_result["rows"] if r["mode"] == "lora"]
    assert bench.goals(rows) == []
    assert "## Goals" not in bench.markdown({"runs": tiny_result["runs"], "rows": rows})
