"""`make demo`: a short DP LoRA fine-tune of the embedded SmolLM2-135M on a slice of SST-2, on the CPU.

Poisson-sampled logical batches split into physical batches, per-example clipping with ghostdp's engine,
Gaussian noise calibrated to a target epsilon, label-prefixed Prefix-LM loss (the prompt is not scored).
Prints the loss and the epsilon spent as it goes. Run ``python -m ghostdp.demo --help`` for the knobs.
"""
from __future__ import annotations

import argparse
import logging
import time

import torch

log = logging.getLogger("ghostdp.demo")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-rows", type=int, default=2000, help="rows of SST-2 train used as the private data")
    p.add_argument("--logical-batch", type=int, default=64, help="expected Poisson batch size q*N")
    p.add_argument("--physical-batch", type=int, default=16, help="examples per forward/backward")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--target-epsilon", type=float, default=3.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-length", type=int, default=40)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args = parse_args(argv)
    torch.manual_seed(args.seed)

    from peft import LoraConfig, get_peft_model

    import ghostdp
    from ghostdp.data import PoissonBatchSampler
    from ghostdp.engine.loss import per_example_lm_loss
    from ghostdp.integrations.collators import CollatorConfig, PrefixLMCollator
    from ghostdp.integrations.models import load_causal_lm
    from ghostdp.integrations.text_data import load_sst2

    data = load_sst2("train", sample=args.train_rows, seed=args.seed)
    N = len(data.texts)
    q = args.logical_batch / N
    delta = 1.0 / (2 * N)
    sigma = ghostdp.accounting.calibrate_noise_multiplier(
        target_epsilon=args.target_epsilon, delta=delta, sample_rate=q, steps=args.steps
    )
    log.info("private data: %d SST-2 rows; q=%.4f, %d steps, delta=%.2e -> noise multiplier %.3f", N, q, args.steps, delta, sigma)

    model, tokenizer = load_causal_lm()
    lora = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(model, lora)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("SmolLM2-135M with LoRA r=%d: %d trainable parameters", args.lora_rank, trainable)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    engine = ghostdp.PrivacyEngine(
        model, optimizer, max_grad_norm=args.max_grad_norm, expected_batch_size=args.logical_batch,
        noise_multiplier=sigma, loss_reduction="sum", sample_rate=q,
        generator=torch.Generator().manual_seed(args.seed),
    )
    collate = PrefixLMCollator(tokenizer, CollatorConfig(max_length=args.max_length))
    sampler = PoissonBatchSampler(N, q, generator=torch.Generator().manual_seed(args.seed + 1), steps=args.steps)

    start = time.time()
    for step, indices in enumerate(sampler, 1):
        total, count = 0.0, 0
        for s in range(0, len(indices), args.physical_batch):
            rows = [{"text": data.texts[i], "label": data.labels[i]} for i in indices[s:s + args.physical_batch]]
            batch = collate(rows)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            losses = per_example_lm_loss(out.logits, batch["labels"])  # (b,) each over its own tokens
            losses.sum().backward()  # loss_reduction="sum": the engine divides by the expected batch size
            total, count = total + float(losses.detach().sum()), count + len(rows)
        optimizer.step()  # noise once, divide by q*N, AdamW step (an empty batch still steps)
        optimizer.zero_grad()
        log.info("step %3d/%d  batch %3d  loss %.3f  epsilon %.3f  (%.0fs)", step, args.steps, len(indices),
                 total / max(count, 1), engine.epsilon(delta), time.time() - start)
    log.info("done: (epsilon=%.3f, delta=%.2e)-DP by the PRV accountant's upper bound (RDP: %.3f)",
             engine.epsilon(delta), delta, engine.epsilon(delta, accountant="rdp"))


if __name__ == "__main__":
    main()
