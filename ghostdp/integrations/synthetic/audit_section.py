"""The optional audit section of the synthetic-text pipeline (``evaluate.audit_canaries`` = m > 0).

After the real run has trained, sampled and been evaluated, a SEPARATE DP training run audits the mechanism
(Steinke, Nasr, Jagielski 2023, one run; :func:`ghostdp.integrations.audit.run.audit_model`): the same base
model and fine-tuning method (LoRA/prompt/full, built by the pipeline's own ``_build_model``), the same private
rows tokenized by the generator's collator, the same engine (``PrivacyEngine``), Poisson sampler, accountant,
clipping bound, learning rate, number of steps, delta and target epsilon, plus m random-token canaries each
inserted with probability 1/2. The audit run's q is ``logical_batch_size / (N + m)`` (public: it may not
depend on the coin flips), so its accountant epsilon is at most the real run's.

Isolation: the audit trains a fresh model in memory and writes only into ``<run-dir>/audit/`` (audit.json,
audit_report.md, audit_scores.png, audit_run.json): never into ``model/`` or ``synthetic/``, and it runs after
them, so the released artefacts are exactly those of a run without the audit. Neither the canaries nor their
coin flips are written anywhere. A finished audit (``audit/audit_run.json`` for this generator and m) is reused.

Differences from the real training loop, stated in the report: the audit trains with the audit module's loop
(Adam, constant learning rate, every token of a row scored) rather than the HF Trainer's (its schedule, the
label prefix unscored); the privacy mechanism (clip, noise, sampling, accounting) is the same.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from ghostdp.integrations.audit.canaries import Canaries, make_canaries
from ghostdp.integrations.audit.report import write_report
from ghostdp.integrations.audit.run import AuditConfig, audit_model
from ghostdp.integrations.synthetic.run_folder import RunPaths, write_text_atomic

logger = logging.getLogger(__name__)

__all__ = ["AUDIT_DIR", "audit_canaries", "exceeds_claim", "run_audit_section", "section_markdown"]

AUDIT_DIR = "audit"
_DONE = "audit_run.json"
_FORMAT = 1


def _audit_config(config: Any, gen_info: dict[str, Any], m: int) -> AuditConfig:
    cfg, priv = config.train, gen_info["privacy"]
    nonprivate = priv.get("not_private") is not None or math.isinf(cfg.target_epsilon)
    return AuditConfig(
        num_canaries=m, canary_kind="random_tokens", canary_length=min(16, max(2, cfg.max_length)),
        target_epsilon=None if nonprivate else float(cfg.target_epsilon),
        noise_multiplier=0.0 if nonprivate else None,
        delta=float(priv["delta"]), max_grad_norm=float(priv["max_grad_norm"]),
        expected_batch_size=float(cfg.logical_batch_size), steps=max(1, int(priv["steps"])),
        learning_rate=float(cfg.learning_rate), optimizer="adam", physical_batch_size=cfg.physical_batch_size,
        seed=cfg.dp_seed,
    )


def audit_canaries(config: Any, gen_info: dict[str, Any], tokenizer: Any) -> Canaries | None:
    """The canaries an audit with a known ``train.dp_seed`` draws (None with a secret seed); for tests."""
    ac = _audit_config(config, gen_info, config.evaluate.audit_canaries)
    if ac.seed is None:
        return None
    return make_canaries(ac.num_canaries, kind=ac.canary_kind, tokenizer=tokenizer, length=ac.canary_length,
                         seed=ac.seed, exclude_ids=(_pad_id(tokenizer),))


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def run_audit_section(config: Any, run_dir: str | Path, gen_info: dict[str, Any]) -> dict[str, Any]:
    """Run (or reuse) the audit of this run folder's mechanism; returns the figures for report and metrics."""
    from ghostdp.integrations.synthetic.pipeline import _build_model
    from ghostdp.integrations.synthetic.run_folder import load_private_data
    from ghostdp.integrations.synthetic.synthesize import make_collator, pick_device

    paths = RunPaths(Path(run_dir))
    out = paths.root / AUDIT_DIR
    m = config.evaluate.audit_canaries
    done = out / _DONE
    if done.is_file():
        try:
            prev = json.loads(done.read_text(encoding="utf-8"))
        except ValueError:
            prev = {}
        if prev.get("model_run_id") == gen_info.get("run_id") and prev.get("num_canaries") == m:
            logger.info("Reusing the finished audit in %s (%d canaries, same generator)", out, m)
            return prev
        logger.info("%s is from another generator or canary count: auditing again", done)
    ac = _audit_config(config, gen_info, m)
    started = time.perf_counter()
    model, tokenizer = _build_model(config.train)
    model.to(pick_device(config.train.use_cpu))
    collator = make_collator(tokenizer, gen_info)
    data = [list(e.input_ids) for e in collator.encode(load_private_data(config.data).examples())]
    logger.info("Audit run (separate from the release, in %s): %d private rows + %d canaries, %d steps; this costs "
                "about one more training run", out, len(data), m, ac.steps)
    result, _ = audit_model(model, ac, data=data, tokenizer=tokenizer, pad_token_id=_pad_id(tokenizer))
    del model
    files = write_report([result], out)
    seconds = time.perf_counter() - started
    d = result.to_dict()
    figures = {
        "format": _FORMAT, "model_run_id": gen_info.get("run_id"), "num_canaries": m,
        "epsilon_lower_bound": d["epsilon_lower_bound"], "confidence": d["confidence"],
        "accountant_epsilon": d["accountant_epsilon"], "claimed_epsilon": d["claimed_epsilon"],
        "release_epsilon_train": gen_info["privacy"].get("epsilon_train"), "delta": d["delta"],
        "noise_multiplier": d["noise_multiplier"], "sample_rate": d["sample_rate"], "steps": d["steps"],
        "num_guesses": d["best"]["num_guesses"], "num_correct": d["best"]["num_correct"],
        "exceeds_claim": bool(d["exceeds_claim"]), "seconds": round(seconds, 1),
        "plot": f"{AUDIT_DIR}/{files['plot'].name}", "known_seed": ac.seed is not None,
    }
    write_text_atomic(done, json.dumps(figures, indent=2) + "\n")  # last: the audit is finished
    return figures


def exceeds_claim(figures: dict[str, Any] | None) -> bool:
    return bool(figures and figures.get("exceeds_claim"))


def _fmt(x: Any) -> str:
    if x is None:
        return "n/a"
    x = float(x)
    return "inf" if math.isinf(x) else f"{x:.3f}"


def section_markdown(f: dict[str, Any]) -> str:
    """The report.md section of an audit (the figures of :func:`run_audit_section`)."""
    verdict = ("**PRIVACY AUDIT FAILED: THE LOWER BOUND EXCEEDS THE ACCOUNTANT'S EPSILON. The mechanism is less "
               "private than claimed (check noise, clipping, sampling rate, the claim); do not release.**"
               if f["exceeds_claim"] else "Consistent with the claim (a lower bound is evidence, not the true "
               "epsilon).")
    return "\n".join([
        "## Privacy audit (separate run, one-run audit of Steinke, Nasr, Jagielski 2023)", "",
        "A separate DP training run with the same model, data, engine, sampler, accountant and budget, plus "
        f"{f['num_canaries']} random-token canaries each inserted with probability 1/2, in `{AUDIT_DIR}/`. "
        "Nothing of it is in `model/` or `synthetic/`.", "",
        "| canaries | guesses (correct/made) | epsilon lower bound | confidence | accountant epsilon (audit run) | "
        "release epsilon (DP-SGD) | delta | time |",
        "|---|---|---|---|---|---|---|---|",
        f"| {f['num_canaries']} | {f['num_correct']}/{f['num_guesses']} | {_fmt(f['epsilon_lower_bound'])} | "
        f"{float(f['confidence']):g} | {_fmt(f['accountant_epsilon'])} | {_fmt(f['release_epsilon_train'])} | "
        f"{float(f['delta']):.3g} | {float(f['seconds']):.1f} s |", "",
        verdict, "",
        "The audit cost one more DP training run plus scoring the canaries before and after (the time above). "
        "Its loop is the audit module's (Adam at a constant learning rate, every token scored), not the HF "
        "Trainer's; the privacy mechanism is the same. The audit run trained on the private data too: its "
        "figures are DP at the accountant's epsilon above, but publishing them beside the release composes the two "
        "runs. `ghostdp evaluate` rewrites report.md without this section; the pipeline command adds it back "
        "(the finished audit is reused).", "",
        f"![audit scores in vs out]({f['plot']})", "",
    ])


def add_to_report(run_dir: str | Path, figures: dict[str, Any]) -> None:
    """Append the audit section to ``report.md`` and put the figures under ``audit`` in ``metrics.json``."""
    paths = RunPaths(Path(run_dir))
    report = paths.report.read_text(encoding="utf-8")
    head = "## Privacy audit (separate run"
    if head in report:
        report = report[:report.index(head)].rstrip("\n") + "\n"
    write_text_atomic(paths.report, report.rstrip("\n") + "\n\n" + section_markdown(figures))
    metrics_path = paths.root / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    clean = {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in figures.items()}
    metrics["audit"] = clean
    write_text_atomic(metrics_path, json.dumps(metrics, indent=2, allow_nan=False) + "\n")
