"""Shared set-up for the DPTrainer tests, and the torchrun entry point of the data-parallel test.

    python -m torch.distributed.run --nproc_per_node 2 tests/hf/trainer_helpers.py OUT.pt

trains the tiny model of ``ddp_run`` on every rank and has rank 0 save the final trainable parameters and the
epsilon to OUT.pt; the test compares them with one process on the same global batches.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script by torchrun
    sys.path.insert(0, str(REPO))

from tests.helpers import tiny_llama, word_tokenizer_from  # noqa: E402

# Argument and attribute names that differ between the supported transformers lines (4.57+ and 5.x).
TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5
LENGTH_GROUPED = dict(group_by_length=True) if TRANSFORMERS_4 else dict(train_sampling_strategy="group_by_length")
CHECKPOINTING = "gradient_checkpointing" if TRANSFORMERS_4 else "activation_checkpointing"  # the argument
IS_CHECKPOINTING = "is_gradient_checkpointing" if TRANSFORMERS_4 else "is_activation_checkpointing"  # model attr

WORDS = [f"w{i}" for i in range(30)]
LABELS = ("pos", "neg")


def word_tokenizer():
    """36 tokens (3 specials, 2 labels, ':', 30 words): fits the tiny Llama's vocabulary of 50."""
    return word_tokenizer_from(WORDS + list(LABELS) + [":"], pad=True)


def make_data(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n labelled texts of 1 to 8 random words (so batches are right-padded to varying lengths)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(1, 9, (1,), generator=g))
        words = torch.randint(0, len(WORDS), (length,), generator=g).tolist()
        rows.append({"text": " ".join(WORDS[w] for w in words), "label": LABELS[i % 2]})
    return rows


def collator(tokenizer=None):
    from ghostdp.integrations.hf.collators import CollatorConfig, PrefixLMCollator
    from ghostdp.integrations.hf.prompts import PromptTemplate

    return PrefixLMCollator(tokenizer or word_tokenizer(),
                            CollatorConfig(template=PromptTemplate("{label} :"), max_length=12))


def lora(model, seed: int = 1):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
                     init_lora_weights=False)
    return get_peft_model(model, cfg)


def make_args(output_dir, **overrides):
    """Small, fast, deterministic DPTrainingArguments (SGD at a constant rate, so a hand loop can match)."""
    from ghostdp.integrations.hf import args as dp_args

    kw = dict(
        output_dir=str(output_dir), logical_batch_size=4, per_device_train_batch_size=3, noise_multiplier=0.8,
        max_grad_norm=0.5, max_steps=6, optim="sgd", learning_rate=0.05, lr_scheduler_type="constant",
        weight_decay=0.0, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, dp_seed=7,
        disable_tqdm=True, dataloader_pin_memory=False, log_private_loss=True,
    )
    kw.update(overrides)
    return dp_args.DPTrainingArguments(**kw)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


DDP_N, DDP_STEPS = 24, 4


def ddp_run(output_dir) -> tuple[dict[str, torch.Tensor], float, list[float]]:
    """Tiny tied Llama (float64), LoRA, 4 DP steps of a logical batch of 6 out of 24, 2 per physical batch."""
    from ghostdp.integrations.hf.trainer import DPTrainer

    model = lora(tiny_llama(True))
    args = make_args(output_dir, logical_batch_size=6, per_device_train_batch_size=2, max_steps=DDP_STEPS,
                     noise_multiplier=0.6, dp_seed=3)
    trainer = DPTrainer(model=model, args=args, train_dataset=make_data(DDP_N, seed=5), data_collator=collator())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return trainable(model), trainer.current_epsilon(), losses


if __name__ == "__main__":
    import torch.distributed as dist

    out = sys.argv[1]
    params, eps, losses = ddp_run(os.path.join(os.path.dirname(out), "ddp_out"))
    if dist.get_rank() == 0:
        torch.save({"params": params, "epsilon": eps, "losses": losses, "world": dist.get_world_size()}, out)
    # Tear the gloo group down before exit: left to interpreter shutdown, its threads can abort the process
    # ("terminate called without an active exception") after the work is done.
    dist.barrier()
    dist.destroy_process_group()
