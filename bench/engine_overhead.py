"""ghostdp vs the same loop without DP: peak memory and step time, as ratios from one run.

Each configuration runs in a fresh subprocess (so peak RSS on CPU, or max_memory_allocated on CUDA, is
its own), on the same model, batch and optimizer; the step time is the median over ``--steps`` steps
after ``--warmup``. Usage::

    python bench/engine_overhead.py --model smollm2-135m --batch-size 8 --seq-len 64 [--device cpu]

Prints a Markdown table and writes JSON to ``bench/results/engine_overhead-<device>.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = [
    # (name, lora, dp, clipping)
    ("non-private LoRA", True, False, None),
    ("ghostdp LoRA (auto)", True, True, "auto"),
    ("non-private full", False, False, None),
    ("ghostdp full (auto)", False, True, "auto"),
]


def build(model_name: str, lora: bool, device: str, dtype):
    import torch

    if model_name == "tiny-llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg)
    else:
        from ghostdp.integrations.models import load_causal_lm

        model, _ = load_causal_lm(model_name)
    model = model.to(device=device, dtype=dtype)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    model.train()
    return model


def run_one(args) -> dict:
    """Child process: one configuration, timings and peak memory."""
    import torch

    from ghostdp.engine.loss import per_example_lm_loss

    torch.manual_seed(0)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = build(args.model, args.lora, args.device, dtype)
    vocab = model.config.vocab_size
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    if args.dp:
        import ghostdp

        ghostdp.PrivacyEngine(model, opt, max_grad_norm=1.0, expected_batch_size=args.batch_size,
                              noise_multiplier=1.0, clipping=args.clipping, loss_reduction="mean",
                              generator=torch.Generator(device=args.device).manual_seed(0))
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), device=args.device)
    labels = ids.clone()
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = model(input_ids=ids).logits
        per_example_lm_loss(logits, labels).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"step_s": statistics.median(times), "peak_bytes": peak, "trainable": sum(p.numel() for p in params)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--only", default=None, help="comma-separated config names to run")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dp", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--clipping", default="auto", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(args)))
        return

    rows = []
    for name, lora, dp, clipping in CONFIGS:
        if args.only and name not in args.only.split(","):
            continue
        cmd = [sys.executable, __file__, "--child", "--model", args.model, "--batch-size", str(args.batch_size),
               "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--device", args.device, "--dtype", args.dtype]
        cmd += ["--lora"] * lora + ["--dp"] * dp + (["--clipping", clipping] if clipping else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append({"config": name, **json.loads(out.stdout.strip().splitlines()[-1])})
        print(f"{name}: {rows[-1]}", file=sys.stderr)

    by = {r["config"]: r for r in rows}
    for r in rows:
        base = by.get(("non-private LoRA" if "LoRA" in r["config"] else "non-private full"))
        r["time_ratio"] = r["step_s"] / base["step_s"] if base else None
        r["memory_ratio"] = r["peak_bytes"] / base["peak_bytes"] if base else None
    meta = {"model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len, "device": args.device,
            "dtype": args.dtype, "machine": platform.processor() or platform.machine(), "python": platform.python_version()}
    try:
        import torch

        meta["torch"] = torch.__version__
        if args.device.startswith("cuda"):
            meta["device_name"] = torch.cuda.get_device_name()
        meta["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except Exception:  # noqa: BLE001 - metadata is best effort
        pass
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"engine_overhead-{args.device.split(':')[0]}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\n{meta}\n")
    print("| config | trainable | step (s) | time / non-private | peak memory (MiB) | memory / non-private |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['trainable']:,} | {r['step_s']:.3f} | {r['time_ratio']:.2f} | "
              f"{r['peak_bytes'] / 2**20:.0f} | {r['memory_ratio']:.3f} |")


if __name__ == "__main__":
    main()
