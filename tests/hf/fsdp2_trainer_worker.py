"""torchrun worker for tests/hf/test_trainer_fsdp2.py: DPTrainer on a model sharded with FSDP2 (2 CPU ranks, gloo).

    python -m torch.distributed.run --nproc_per_node 2 tests/hf/fsdp2_trainer_worker.py OUT_DIR

Every run shards a fresh tiny tied float64 Llama (each block, then the root) and trains it with DPTrainer on the
data of ``fsdp2_run`` (logical batch 6 of 24, physical batches of 2, so the ranks' shares and numbers of physical
batches differ and some are empty). Rank 0 writes OUT_DIR/result.pt with the gathered trainable parameters of:
- ``exact``: noise 0, SGD, 4 steps (the test compares it with one unsharded process); ``lora``: the same
  with LoRA adapters (PEFT model, its base's blocks sharded);
- ``full``: noise 0.6, AdamW, 4 steps, checkpoints at steps 2 and 4 (sharded model + optimizer state);
- ``resumed``: a fresh model, differently initialised, resumed from ``full``'s checkpoint-2;
with their epsilons and logged epsilons, ``full``'s final model as written by save_model, and the error
of resuming from a checkpoint whose shards claim another world size. ``args_exact``, ``args_lora`` and
``args_resumed`` repeat ``exact``, ``lora`` and ``resumed`` with an unsharded model and the Trainer's FSDP2
arguments (:data:`FSDP_ARGS`), which DPTrainer honours by sharding the model itself.

    python -m torch.distributed.run --nproc_per_node 2 tests/hf/fsdp2_trainer_worker.py OUT_DIR --accelerate FIRST_OUT

is the second launch, whose environment holds the variables ``accelerate launch`` sets for an FSDP2 configuration
(:func:`accelerate_launch_env` of :data:`ACCELERATE_FSDP2_FLAGS`): ``env_exact``, ``env_lora`` and ``env_resumed``
repeat ``exact``, ``lora`` and ``resumed`` (from FIRST_OUT's checkpoint) with unsharded models and no fsdp
arguments; ``env_both`` repeats ``exact`` with the agreeing fsdp arguments as well; ``env_state`` records what
accelerate's state and the environment look like after each run (OUT_DIR/result_env.pt).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.helpers import tiny_llama
from tests.hf.trainer_helpers import collator, lora, make_args, make_data

N, STEPS = 24, 4


def shard(model):
    from torch.distributed.fsdp import fully_shard

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    for block in inner.model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def gathered(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters() if p.requires_grad}


#: The Trainer's FSDP2 arguments DPTrainer honours itself (it shards the unsharded model it is given): the legacy
#: string form with the blocks named, and the plain form with the model's _no_split_modules.
FSDP_ARGS = {
    "named": {"fsdp": "full_shard",
              "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}},
    "default": {"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": True}},
}


#: An accelerate FSDP2 configuration DPTrainer honours (accelerate launch's flags; a config file's fsdp_* keys).
ACCELERATE_FSDP2_FLAGS = (
    "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
    "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer", "--fsdp_reshard_after_forward", "true",
    "--fsdp_state_dict_type", "FULL_STATE_DICT", "--fsdp_cpu_ram_efficient_loading", "false",
)


def accelerate_launch_env(*flags: str) -> dict[str, str]:
    """``ACCELERATE_USE_FSDP`` and the ``FSDP_*`` variables that ``accelerate launch --use_fsdp *flags`` gives the
    processes it starts, computed by accelerate's own launch code (with its defaults for every flag not given)."""
    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
    )
    from accelerate.utils.launch import prepare_multi_gpu_env

    parsed = launch_command_parser().parse_args(["--use_fsdp", "--num_processes", "2", "--num_machines", "1",
                                                 "--mixed_precision", "no", "--dynamo_backend", "no", *flags,
                                                 "train.py"])
    env = prepare_multi_gpu_env(_validate_launch_command(parsed)[0])
    return {k: v for k, v in env.items() if k == "ACCELERATE_USE_FSDP" or k.startswith("FSDP_")}


def fsdp2_run(output_dir, *, sharded: bool, noise: float, optim: str = "sgd", seed: int = 0,
              resume: str | None = None, save_steps: int | None = None, use_lora: bool = False,
              fsdp_args: str | None = None):
    """``sharded``: the model is passed through :func:`shard` first; ``fsdp_args``: a key of :data:`FSDP_ARGS`,
    the model is passed unsharded with those arguments."""
    from ghostdp.integrations.hf.trainer import DPTrainer

    model = tiny_llama(True, seed=seed)
    if use_lora:
        model = lora(model)
    if sharded:
        model = shard(model)
    save = {"save_strategy": "steps", "save_steps": save_steps} if save_steps else {}
    if fsdp_args:
        save.update(FSDP_ARGS[fsdp_args])
    args = make_args(output_dir, logical_batch_size=6, per_device_train_batch_size=2, max_steps=STEPS,
                     noise_multiplier=noise, dp_seed=3, optim=optim, learning_rate=0.05, **save)
    trainer = DPTrainer(model=model, args=args, train_dataset=make_data(N, seed=5), data_collator=collator())
    trainer.train(resume_from_checkpoint=resume)
    logged = [h["epsilon"] for h in trainer.state.log_history if "epsilon" in h and "loss" in h]
    return trainer, gathered(model), trainer.current_epsilon(), logged


def accelerate_state() -> dict:
    """The environment variable and accelerate's process-wide state after a DPTrainer was built."""
    from accelerate.state import AcceleratorState, PartialState

    return {"ACCELERATE_USE_FSDP": os.environ.get("ACCELERATE_USE_FSDP"),
            "fsdp_plugin": AcceleratorState._shared_state.get("fsdp_plugin"),
            "distributed_type": str(PartialState._shared_state.get("distributed_type"))}


def accelerate_launch_runs(out: Path, first: Path) -> None:
    """The second launch: the environment of accelerate launch with an FSDP2 configuration (set by the test)."""
    from ghostdp.engine.fsdp import is_fsdp2

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("ghostdp.integrations.hf.trainer").setLevel(logging.INFO)  # DPTrainer's INFO lines, checked
    res = {"world": dist.get_world_size(), "env_state": [], "env_sharded": []}
    for key, kw in (("env_exact", {"noise": 0.0}), ("env_lora", {"noise": 0.0, "use_lora": True}),
                    ("env_both", {"noise": 0.0, "fsdp_args": "named"}),
                    ("env_resumed", {"noise": 0.6, "optim": "adamw_torch", "seed": 1,
                                     "resume": str(first / "full" / "checkpoint-2")})):
        trainer, res[key], eps, logged = fsdp2_run(out / key, sharded=False, **kw)
        res["env_state"].append({**accelerate_state(), "is_fsdp_enabled": trainer.is_fsdp_enabled})
        res["env_sharded"].append(is_fsdp2(trainer.model))
        if key == "env_resumed":
            res["env_resumed_eps"], res["env_resumed_logged"] = eps, logged
    if dist.get_rank() == 0:
        torch.save(res, out / "result_env.pt")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    if sys.argv[2:3] == ["--accelerate"]:
        accelerate_launch_runs(out, Path(sys.argv[3]))
        dist.barrier()
        dist.destroy_process_group()
        sys.exit(0)
    res = {"world": dist.get_world_size()}
    _, res["exact"], _, _ = fsdp2_run(out / "exact", sharded=True, noise=0.0)
    _, res["lora"], _, _ = fsdp2_run(out / "lora", sharded=True, noise=0.0, use_lora=True)
    full, res["full"], res["full_eps"], res["full_logged"] = fsdp2_run(
        out / "full", sharded=True, noise=0.6, optim="adamw_torch", save_steps=2)
    full.save_model(str(out / "final"))  # gathered on rank 0
    _, res["resumed"], res["resumed_eps"], res["resumed_logged"] = fsdp2_run(
        out / "resumed", sharded=True, noise=0.6, optim="adamw_torch", seed=1,
        resume=str(out / "full" / "checkpoint-2"))
    # the Trainer's FSDP2 arguments (DPTrainer shards the unsharded model itself): the same runs as above
    _, res["args_exact"], _, _ = fsdp2_run(out / "args_exact", sharded=False, noise=0.0, fsdp_args="named")
    _, res["args_lora"], _, _ = fsdp2_run(out / "args_lora", sharded=False, noise=0.0, use_lora=True,
                                         fsdp_args="default")
    _, res["args_resumed"], res["args_resumed_eps"], res["args_resumed_logged"] = fsdp2_run(
        out / "args_resumed", sharded=False, noise=0.6, optim="adamw_torch", seed=1, fsdp_args="default",
        resume=str(out / "full" / "checkpoint-2"))
    # a checkpoint of another world size is refused on every rank (its shards would not fit this sharding)
    other = out / "other_world"
    if dist.get_rank() == 0:
        import shutil

        shutil.copytree(out / "full" / "checkpoint-2", other)
        for r in range(dist.get_world_size()):
            shards = torch.load(other / f"ghostdp_fsdp2_rank{r}.pt", weights_only=True)
            torch.save({**shards, "world_size": 4}, other / f"ghostdp_fsdp2_rank{r}.pt")
    dist.barrier()
    try:
        fsdp2_run(out / "refused", sharded=True, noise=0.6, optim="adamw_torch", resume=str(other))
        res["other_world"] = "no error"
    except ValueError as e:
        res["other_world"] = str(e)
    res["shard_files"] = sorted(f for f in os.listdir(out / "full" / "checkpoint-2") if f.startswith("ghostdp_"))
    if dist.get_rank() == 0:
        torch.save(res, out / "result.pt")
    dist.barrier()
    dist.destroy_process_group()
