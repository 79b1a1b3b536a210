"""torchrun worker for tests/engine/test_fsdp2.py: FSDP2 (fully_shard) over gloo on CPU, 2 ranks.

One launch checks several cases in one process group and writes, per rank, a torch file the test reads:
- ``equal/<case>``: after two DP steps (two physical batches each, noise 0, gradient checkpointing on,
  reentrant for "untied", reshard_after_forward=True), the max abs difference between every full parameter (gathered from its
  shards) and one process training on the whole global batch; and which trainable parameters moved.
  Cases: tied, untied, LoRA (float64); "mixed": float32 shards with MixedPrecisionPolicy(param_dtype=
  float64), against one float64 process (equal up to float32 rounding of the stepped shards); "uneven":
  ranks with 2, 1 and 0 examples (the empty share runs one padding example with loss weight 0).
- ``reference/<case>``: the first step's update against the one-example-at-a-time float64 reference
  (float64 cases).
- ``noise``: with zero gradients, this rank's shard updates (= -noise / E with lr 1) per parameter, for
  three runs: seed 7, seed 7 again, seed 8.
- ``resume``: noisy training with momentum, interrupted by a DCP checkpoint and restored into a fresh,
  differently seeded model/optimizer/engine, against the same run uninterrupted.
- ``no_leak``: three noisy steps; the engine's noise-impl cache size per step, and how many of the steps'
  gradients (DTensors and their local shards) are still alive after zero_grad.
- ``refusals``: the messages raised for FSDP1, CPU offload, distributed=False, a DPTrainer given fsdp= with an
  already sharded model, and a parameter used outside its clipped layer.
Run: python -m torch.distributed.run --nproc_per_node 2 tests/engine/fsdp2_worker.py OUT_PREFIX
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from ghostdp import PrivacyEngine
from tests.helpers import lm_batch, lm_losses, reference_dp_grads, tiny_llama

C, E, LR = 0.5, 8, 1.0
SIGMA = 2.0


def physical_batches(step: int, case: str = ""):
    """Two physical batches; rank r trains on examples r, r + world, ... of each. "uneven": 3 examples then
    1, so the ranks' shares differ and rank 1 has none in the second batch."""
    if case == "uneven":
        return [lm_batch([5, 3, 7], seed=100 * step), lm_batch([6], seed=100 * step + 1)]
    return [lm_batch([5, 3, 7, 4], seed=100 * step), lm_batch([6, 2, 4, 7], seed=100 * step + 1)]


def local_share(batch, rank, world):
    """This rank's examples and 1.0; an empty share becomes one padding example weighted 0.0, because every
    rank must run FSDP's forward and backward (collectives) and a model cannot run a batch of 0."""
    share = {k: v[rank::world] for k, v in batch.items()}
    if len(share["input_ids"]) == 0:
        return {k: v[:1] for k, v in batch.items()}, 0.0
    return share, 1.0


def build(case: str):
    tie = case != "untied"
    model = tiny_llama(tie, dtype=torch.float32 if case == "mixed" else torch.float64)
    if case == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 lora_dropout=0.0, init_lora_weights=False))
    model.train()
    return model


def checkpointed(model, case: str):
    """A copy with gradient checkpointing on: reentrant for "untied", non-reentrant otherwise."""
    model = copy.deepcopy(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": case == "untied"})
    return model


def llama_of(model):
    return model.base_model.model if hasattr(model, "peft_config") else model


def shard_model(model, case: str = "", **kw):
    if case == "mixed":  # fp32 shards, layers run on float64 gathered weights
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.float64, reduce_dtype=torch.float64)
    for block in llama_of(model).model.layers:
        fully_shard(block, reshard_after_forward=True, **kw)
    fully_shard(model, reshard_after_forward=True, **kw)
    return model


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def train(model, steps, rank, world, *, sigma=0.0, seed=0, zero_loss=False, distributed=None, case=""):
    opt = torch.optim.SGD(trainable(model), lr=LR)
    engine = PrivacyEngine(model, opt, max_grad_norm=C, expected_batch_size=E, noise_multiplier=sigma,
                           loss_reduction="sum", generator=torch.Generator().manual_seed(seed),
                           distributed=distributed)
    for step in range(steps):
        for batch in physical_batches(step, case):
            share, weight = local_share(batch, rank, world)
            (lm_losses(model, share).sum() * (0.0 if zero_loss else weight)).backward()
        opt.step()
        opt.zero_grad(set_to_none=case != "uneven")  # "uneven": zeroed in place, as Trainer-style loops do
    engine.detach()
    return model


def full_params(model) -> dict[str, torch.Tensor]:
    """name -> full tensor (a collective over the shards, in the same order on every rank)."""
    out = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name.replace("_fsdp_wrapped_module.", "")] = full.detach().clone()
    return out


def check_equal(case, rank, world, results):
    base = build(case)
    start = {n: p.detach().clone() for n, p in base.named_parameters()}
    single = train(checkpointed(base, case).double(), 2, 0, 1, distributed=False, case=case)
    want = dict(single.named_parameters())
    sharded = train(shard_model(checkpointed(base, case), case), 2, rank, world, case=case)
    got = full_params(sharded)
    diff = max(float((got[n].double() - want[n].detach()).abs().max()) for n in want)
    moved = {n: bool((got[n] - start[n]).abs().max() > 1e-8) for n, p in base.named_parameters() if p.requires_grad}
    results[f"equal/{case}"] = {"max_abs_diff": diff, "moved": moved,
                                "scale": max(float(w.abs().max()) for w in want.values())}

    if case == "mixed":
        return
    # The first step's update (lr 1) against the one-example-at-a-time reference, noise 0.
    model = shard_model(checkpointed(base, case), case)
    train(model, 1, rank, world, case=case)
    ref, _ = reference_dp_grads(base, physical_batches(0, case), lm_losses, C, E)
    after = full_params(model)
    results[f"reference/{case}"] = max(float((start[n] - after[n] - LR * g).abs().max()) for n, g in ref.items())


def check_noise(rank, world, results):
    runs = {}
    for label, seed in [("seed7", 7), ("seed7_again", 7), ("seed8", 8)]:
        model = shard_model(tiny_llama(False))
        before = {n: p.to_local().detach().clone() for n, p in model.named_parameters()}
        train(model, 1, rank, world, sigma=SIGMA, seed=seed, zero_loss=True)
        runs[label] = {n: (p.to_local().detach() - before[n]).clone() for n, p in model.named_parameters()}
    results["noise"] = runs


def check_resume(rank, world, results, folder: str):
    """Noisy training with momentum: 2 steps straight vs 1 step, a DCP checkpoint (sharded model and optimizer
    state) plus the engine's state, a fresh model/optimizer/engine seeded differently, restore, 1 step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def fresh(seed):
        model = shard_model(tiny_llama(True))
        opt = torch.optim.SGD(trainable(model), lr=0.5, momentum=0.9)
        engine = PrivacyEngine(model, opt, max_grad_norm=C, expected_batch_size=E, noise_multiplier=SIGMA,
                               loss_reduction="sum", sample_rate=0.25, generator=torch.Generator().manual_seed(seed))
        return model, opt, engine

    def steps(model, opt, start, stop):
        for step in range(start, stop):
            for batch in physical_batches(step):
                share, weight = local_share(batch, rank, world)
                (lm_losses(model, share).sum() * weight).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    model, opt, engine = fresh(3)
    steps(model, opt, 0, 2)
    want, want_eps = full_params(model), engine.epsilon(1e-5)

    model, opt, engine = fresh(3)
    steps(model, opt, 0, 1)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=folder)
    torch.save(engine.state_dict(), f"{folder}/engine.{rank}")  # per rank: each holds its own generator

    model, opt, engine = fresh(99)
    msd, osd = get_state_dict(model, opt)  # on a fresh optimizer this runs one zero-lr step (see docs/fsdp2.md)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    engine.load_state_dict(torch.load(f"{folder}/engine.{rank}", weights_only=False))  # after: undoes that step
    steps(model, opt, 1, 2)
    got = full_params(model)
    results["resume"] = {"max_abs_diff": max(float((got[n] - want[n]).abs().max()) for n in want),
                         "steps": engine.steps, "epsilon": (engine.epsilon(1e-5), want_eps)}


def check_no_leak(rank, world, results):
    """Noisy steps on a sharded model: the engine's noise-impl cache stays one entry per trainable parameter,
    and no step's gradient (the DTensor or its local shard) outlives its zero_grad (the leak the FSDP2 bench
    found: the cache once kept every step's local gradient shard as a key)."""
    import gc
    import weakref

    model = shard_model(tiny_llama(True))
    opt = torch.optim.SGD(trainable(model), lr=0.1)
    engine = PrivacyEngine(model, opt, max_grad_norm=C, expected_batch_size=E, noise_multiplier=SIGMA,
                           loss_reduction="sum", generator=torch.Generator().manual_seed(5))
    sizes, grads = [], []
    for step in range(3):
        for batch in physical_batches(step):
            share, weight = local_share(batch, rank, world)
            (lm_losses(model, share).sum() * weight).backward()
        opt.step()
        for p in trainable(model):
            grads += [weakref.ref(p.grad), weakref.ref(p.grad._local_tensor)]
        opt.zero_grad(set_to_none=True)
        sizes.append(len(engine._noise_impls))
    engine.detach()
    gc.collect()
    results["no_leak"] = {"cache_sizes": sizes, "trainable": len(trainable(model)),
                          "cache_is_params": set(engine._noise_impls) == set(trainable(model)),
                          "grads_alive": sum(r() is not None for r in grads), "grads": len(grads)}


def expect_error(fn) -> str:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the message is what the test checks
        return f"{type(e).__name__}: {e}"
    return "no error"


def check_refusals(rank, world, results, folder: str):
    out = {}

    def fsdp1():
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(tiny_llama(True), device_id=torch.device("cpu"))
        PrivacyEngine(model, torch.optim.SGD(model.parameters(), lr=LR), max_grad_norm=C, expected_batch_size=E,
                      noise_multiplier=0.0)

    def offload():
        model = shard_model(tiny_llama(True), offload_policy=CPUOffloadPolicy(pin_memory=False))
        PrivacyEngine(model, torch.optim.SGD(trainable(model), lr=LR), max_grad_norm=C, expected_batch_size=E,
                      noise_multiplier=0.0)

    def not_distributed():
        model = shard_model(tiny_llama(True))
        PrivacyEngine(model, torch.optim.SGD(trainable(model), lr=LR), max_grad_norm=C, expected_batch_size=E,
                      noise_multiplier=0.0, distributed=False)

    def used_outside():
        # A block's weight used outside its layer: autograd reaches FSDP's unsharded parameter.
        model = shard_model(tiny_llama(True))
        PrivacyEngine(model, torch.optim.SGD(trainable(model), lr=LR), max_grad_norm=C, expected_batch_size=E,
                      noise_multiplier=0.0, loss_reduction="sum")
        # Inside the block's forward (weights gathered): the unsharded up_proj weight enters the output directly.
        mlp = model.model.layers[0].mlp
        mlp.register_forward_hook(lambda m, args, out: out + 1e-3 * m.up_proj.weight.sum())
        lm_losses(model, local_share(physical_batches(0)[0], rank, world)[0]).sum().backward()

    def dp_trainer():
        from ghostdp.integrations.hf.trainer import DPTrainer
        from tests.hf.trainer_helpers import collator, make_args, make_data

        # a sharded model is accepted, and so are FSDP2 arguments with an unsharded one (tests/hf/test_trainer_fsdp2.py);
        # both at once would wrap the model twice
        DPTrainer(model=shard_model(tiny_llama(True)), args=make_args(f"{folder}/trainer", fsdp="full_shard"),
                  train_dataset=make_data(8), data_collator=collator())

    out["fsdp1"] = expect_error(fsdp1)
    out["dp_trainer"] = expect_error(dp_trainer)
    out["offload"] = expect_error(offload)
    out["not_distributed"] = expect_error(not_distributed)
    out["used_outside"] = expect_error(used_outside)
    results["refusals"] = out


def main():
    prefix = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    try:
        for case in ["tied", "untied", "lora", "mixed", "uneven"]:
            check_equal(case, rank, world, results)
        check_noise(rank, world, results)
        check_resume(rank, world, results, f"{prefix}.checkpoint")
        check_no_leak(rank, world, results)
        check_refusals(rank, world, results, f"{prefix}.refusals")
    finally:
        torch.save(results, f"{prefix}.{rank}")
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
