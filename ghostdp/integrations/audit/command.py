"""``ghostdp audit``: one audited DP training run, the model and its synthetic text, next to the claimed epsilon.

    ghostdp audit --num-canaries 256 --noise-multiplier 0 --claimed-epsilon 1   # a broken run: caught (exit 3)
    ghostdp audit --num-canaries 256 --target-epsilon 8                          # the real mechanism
    ghostdp audit --model tiny --num-canaries 64 --steps 100 --expected-batch-size 8 --learning-rate 1e-2 \
        --noise-multiplier 0 --claimed-epsilon 1                                 # seconds, no model files

The defaults (m = 256 random 8-token canaries, q = 32 / 256, 24 steps, Adam at 1e-3, full fine-tuning) are
the settings measured on SmolLM2-135M in bench/results/audit_cpu.md (noise 0: epsilon >= 2.35; calibrated to
epsilon 8: >= 0.00; about 10-20 minutes on a shared 2-core CPU).

Exit codes: 0 the lower bounds are at or below the claim; 3 a lower bound EXCEEDS the claimed epsilon (the
run is less private than claimed); 2 bad usage; 1 failure while running. The canaries' coin flips stay in
memory: the report holds bounds and score histograms only.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

log = logging.getLogger("ghostdp.audit")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_EXCEEDS = 0, 1, 2, 3

HELP = ("Empirical privacy audit in one training run (Steinke, Nasr, Jagielski 2023): canaries in/out by secret "
        "coin flips, DP training with the real engine, an epsilon lower bound for the model and its synthetic text.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="smollm2-135m", help="Hub name, local folder, .gguf file, 'smollm2-135m' "
                   "(embedded, default) or 'tiny' (a random 2-layer Llama, for a quick check).")
    g.add_argument("--data", metavar="FILE", help="Private training texts, one per line (default: canaries only).")
    g.add_argument("--max-length", type=int, default=64, help="Token cap per training text (default 64).")
    g = p.add_argument_group("canaries")
    g.add_argument("--num-canaries", type=int, default=256, help="m, canaries inserted with probability 1/2 each.")
    g.add_argument("--canary-kind", choices=["random_tokens", "secret_text"], default="random_tokens",
                   help="random token sequences, or sentences ending in a random n-digit secret.")
    g.add_argument("--canary-length", type=int, default=8, help="Tokens per random-token canary (default 8).")
    g.add_argument("--secret-digits", type=int, default=6, help="Digits of a secret_text canary's secret.")
    g = p.add_argument_group("DP training (as a real run)")
    noise = g.add_mutually_exclusive_group()
    noise.add_argument("--target-epsilon", type=float, help="Calibrate sigma to this epsilon (default 8).")
    noise.add_argument("--noise-multiplier", type=float, help="Fixed sigma (0: no noise, for a broken-run check).")
    g.add_argument("--claimed-epsilon", type=float, help="The epsilon to hold the audit against (default: the "
                   "accountant's epsilon for this run).")
    g.add_argument("--delta", type=float, default=1e-5, help="delta of the accountant and of the bound (default 1e-5).")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="Clipping bound C (default 1).")
    g.add_argument("--expected-batch-size", type=float, default=32.0, help="q * (n_data + m): sets the Poisson rate q "
                   "(default 32).")
    g.add_argument("--steps", type=int, default=24, help="Noisy steps (default 24).")
    g.add_argument("--learning-rate", type=float, default=1e-3, help="Default 1e-3.")
    g.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    g.add_argument("--physical-batch-size", type=int, default=32, help="Examples per backward pass (default 32).")
    g = p.add_argument_group("audit")
    g.add_argument("--score", choices=["loss", "white_box"], default="loss", help="Loss drop vs the base model, or "
                   "the alignment of the training update with each canary's gradient (one backward per canary).")
    g.add_argument("--confidence", type=float, default=0.95, help="Confidence of the lower bound (default 0.95).")
    g.add_argument("--synthetic-samples", type=int, default=64, help="Texts sampled from the trained model for the "
                   "synthetic-data audit (0: skip it).")
    g.add_argument("--max-new-tokens", type=int, default=24, help="Tokens per synthetic sample (default 24).")
    g.add_argument("--seed", type=int, help="Seed of canaries, coin flips, sampling and noise (default: random). "
                   "Keep it secret.")
    g.add_argument("--out", metavar="DIR", help="Report folder (default runs/audit-<time>).")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice).")


def _tiny_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, pad_token_id=0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.3f}"


def run(ns: argparse.Namespace) -> int:
    """Run ``ghostdp audit`` from parsed arguments; returns the exit code."""
    from ghostdp.integrations.audit.report import write_report
    from ghostdp.integrations.audit.run import AuditConfig, audit_model

    if ns.threads is not None:
        import torch

        torch.set_num_threads(ns.threads)
    target = ns.target_epsilon if ns.noise_multiplier is None else None
    if target is None and ns.noise_multiplier is None:
        target = 8.0
    try:
        config = AuditConfig(
            num_canaries=ns.num_canaries, canary_kind=ns.canary_kind, canary_length=ns.canary_length,
            secret_digits=ns.secret_digits, target_epsilon=target, noise_multiplier=ns.noise_multiplier,
            delta=ns.delta, max_grad_norm=ns.max_grad_norm, expected_batch_size=ns.expected_batch_size, steps=ns.steps,
            learning_rate=ns.learning_rate, optimizer=ns.optimizer, physical_batch_size=ns.physical_batch_size,
            score=ns.score, confidence=ns.confidence, claimed_epsilon=ns.claimed_epsilon, seed=ns.seed,
        )
    except ValueError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    if ns.model == "tiny" and (ns.canary_kind == "secret_text" or ns.data or ns.synthetic_samples):
        if ns.canary_kind == "secret_text" or ns.data:
            log.error("--model tiny has no tokenizer: use random_tokens canaries and no --data")
            return EXIT_USAGE
        log.info("--model tiny has no tokenizer: skipping the synthetic-data audit")
        ns.synthetic_samples = 0
    out = Path(ns.out or f"runs/audit-{time.strftime('%Y%m%d-%H%M%S')}")
    started = time.perf_counter()
    try:
        if ns.model == "tiny":
            model, tokenizer = _tiny_model(), None
        else:
            from ghostdp.integrations.hf.models import load_causal_lm

            model, tokenizer = load_causal_lm(ns.model)
        data = []
        if ns.data:
            lines = [t for t in Path(ns.data).read_text().splitlines() if t.strip()]
            data = [tokenizer.encode(t, add_special_tokens=True)[: ns.max_length] for t in lines]
        loaded = time.perf_counter()
        result, canaries = audit_model(model, config, data=data, tokenizer=tokenizer)
        results = [result]
        if ns.synthetic_samples > 0:
            from ghostdp.integrations.audit.synthetic import (
                audit_synthetic_text,
                generate_texts,
            )

            t0 = time.perf_counter()
            texts = generate_texts(model, tokenizer, num_samples=ns.synthetic_samples, max_new_tokens=ns.max_new_tokens,
                                   seed=0 if ns.seed is None else ns.seed)
            synthetic = audit_synthetic_text(
                canaries, texts, tokenizer=tokenizer, confidence=config.confidence, delta=config.delta,
                claimed_epsilon=result.claimed_epsilon, accountant_epsilon=result.accountant_epsilon,
                model_result=result,
            )
            synthetic.seconds["generate"] = time.perf_counter() - t0 - synthetic.seconds["score"]
            results.append(synthetic)
        result.seconds["load"] = loaded - started
        paths = write_report(results, out)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as exc:
        log.error("ghostdp audit failed: %s: %s", type(exc).__name__, exc)
        return EXIT_FAILURE
    for r in results:
        print(f"{r.what:9s} epsilon >= {_fmt(r.epsilon_lower_bound)} at {r.confidence:.0%} confidence "
              f"({r.best.num_correct}/{r.best.num_guesses} correct guesses, {r.num_canaries} canaries); claimed "
              f"{_fmt(r.claimed_epsilon)}, accountant {_fmt(r.accountant_epsilon)} at delta={r.delta:g}")
    print(f"time {time.perf_counter() - started:.0f}s; report {paths['markdown']}, plot {paths['plot']}")
    exceeded = [r for r in results if r.exceeds_claim]
    if exceeded:
        bar = "!" * 78
        print(f"\n{bar}\nPRIVACY AUDIT FAILED: the {', '.join(r.what for r in exceeded)} lower bound exceeds the claimed "
              f"epsilon {_fmt(exceeded[0].claimed_epsilon)}.\nThe run is less private than claimed: check the noise "
              f"multiplier, the clipping, the sampling rate given to the accountant, and the claim itself.\n{bar}")
        return EXIT_EXCEEDS
    return EXIT_OK
