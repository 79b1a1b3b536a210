"""DPTrainer on a model sharded with FSDP2 (fully_shard), 2 CPU ranks over gloo, one torchrun launch.

The worker (tests/hf/fsdp2_trainer_worker.py) trains; this test compares with one unsharded process on the same
global Poisson batches (noise 0), with the accountant (epsilon), and a resumed run with the uninterrupted one. A
second launch has the environment of ``accelerate launch`` with an FSDP2 configuration (no fsdp arguments) and is
compared with the first launch's user-sharded and Trainer-argument runs.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import ghostdp.accounting as acc
from tests.helpers import tiny_llama
from tests.hf.fsdp2_trainer_worker import (
    ACCELERATE_FSDP2_FLAGS,
    STEPS,
    N,
    accelerate_launch_env,
    fsdp2_run,
)
from tests.hf.trainer_helpers import REPO, TRANSFORMERS_4, lora

# On transformers 4.x DPTrainer refuses a sharded model (its Trainer wraps the model in DDP).
pytestmark = pytest.mark.skipif(TRANSFORMERS_4, reason="DPTrainer under FSDP2 needs transformers 5.x")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out, *worker_args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(REPO / "tests" / "hf" / "fsdp2_trainer_worker.py"), str(out),
           *worker_args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    _torchrun(out)
    res = torch.load(out / "result.pt", weights_only=True)
    assert res["world"] == 2
    return out, res


@pytest.fixture(scope="module")
def accelerate_launched(sharded, tmp_path_factory):
    """The worker launched with the variables accelerate launch sets for an FSDP2 configuration."""
    out = tmp_path_factory.mktemp("fsdp2_accelerate")
    env = accelerate_launch_env(*ACCELERATE_FSDP2_FLAGS)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    proc = _torchrun(out, "--accelerate", str(sharded[0]), env=env)
    res = torch.load(out / "result_env.pt", weights_only=True)
    assert res["world"] == 2
    return res, proc.stderr


def test_fsdp2_equals_one_unsharded_process(sharded, tmp_path):
    _, res = sharded
    _, params, _, _ = fsdp2_run(tmp_path / "single", sharded=False, noise=0.0)
    start = dict(tiny_llama(True).named_parameters())
    for name, p in params.items():
        assert not torch.equal(p, start[name].detach()), f"{name} did not move"  # every parameter trained
        torch.testing.assert_close(res["exact"][name], p, rtol=1e-10, atol=1e-12,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_fsdp2_lora_equals_one_unsharded_process(sharded, tmp_path):
    _, res = sharded
    _, params, _, _ = fsdp2_run(tmp_path / "single", sharded=False, noise=0.0, use_lora=True)
    assert set(res["lora"]) == set(params) and all("lora_" in n for n in params)
    start = dict(lora(tiny_llama(True)).named_parameters())
    for name, p in params.items():
        assert not torch.equal(p, start[name].detach()), f"{name} did not move"
        torch.testing.assert_close(res["lora"][name], p, rtol=1e-10, atol=1e-12,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_fsdp2_logs_the_accountants_epsilon(sharded):
    _, res = sharded
    ref = [acc.epsilon(noise_multiplier=0.6, sample_rate=6 / N, steps=t, delta=1 / (2 * N))
           for t in range(1, STEPS + 1)]
    assert res["full_logged"] == pytest.approx(ref, rel=1e-12)
    assert res["full_eps"] == ref[-1]


def test_fsdp2_checkpoint_resumes_exactly(sharded):
    out, res = sharded
    assert res["shard_files"] == ["ghostdp_fsdp2_rank0.pt", "ghostdp_fsdp2_rank1.pt", "ghostdp_privacy.json",
                                  "ghostdp_state.pt"]
    for name, p in res["full"].items():  # noisy AdamW run: exact only if noise stream, moments and steps resume
        torch.testing.assert_close(res["resumed"][name], p, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
    assert res["resumed_eps"] == res["full_eps"]
    assert res["resumed_logged"] == res["full_logged"]
    assert "holds FSDP2 shards of 4 ranks, this run has 2" in res["other_world"], res["other_world"]
    # save_model gathers the full model on rank 0 into a plain transformers checkpoint
    saved = load_file(str(out / "final" / "model.safetensors"))
    tied = {"lm_head.weight": "model.embed_tokens.weight"}
    assert set(saved) - set(tied) == set(res["full"])
    for name, t in saved.items():
        torch.testing.assert_close(t, res["full"][tied.get(name, name)], rtol=0, atol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_fsdp2_trainer_arguments_equal_the_user_sharded_model(sharded):
    """DPTrainingArguments(fsdp=..., fsdp_config={version 2}) with an unsharded model: DPTrainer calls fully_shard on
    the blocks and the root itself; training equals the run on the model the user sharded (noise 0: full and LoRA;
    noisy AdamW resumed from the user-sharded run's checkpoint: the uninterrupted run, epsilons included)."""
    _, res = sharded
    for ours, theirs in (("args_exact", "exact"), ("args_lora", "lora"), ("args_resumed", "full")):
        assert set(res[ours]) == set(res[theirs]), ours
        for name, p in res[theirs].items():
            torch.testing.assert_close(res[ours][name], p, rtol=0, atol=0,
                                       msg=lambda m, ours=ours, name=name: f"{ours} {name}: {m}")
    assert res["args_resumed_eps"] == res["full_eps"]
    assert res["args_resumed_logged"] == res["full_logged"]


def test_fsdp2_trainer_arguments_refused_in_one_process(tmp_path):
    from ghostdp.integrations.hf.trainer import DPTrainer
    from tests.hf.fsdp2_trainer_worker import FSDP_ARGS
    from tests.hf.trainer_helpers import collator, make_args, make_data

    args = make_args(tmp_path, **FSDP_ARGS["default"])
    with pytest.raises(ValueError, match="single process"):
        DPTrainer(model=tiny_llama(True), args=args, train_dataset=make_data(8), data_collator=collator())


def test_fsdp2_accelerate_launch_equals_the_other_routes(sharded, accelerate_launched):
    """accelerate launch with an FSDP2 configuration and no fsdp arguments: DPTrainer shards the unsharded model
    itself, keeps accelerate's FSDP plugin out, and trains exactly as on the model the user sharded and with the
    Trainer's FSDP2 arguments (noise 0, full and LoRA; noisy AdamW resumed from the user-sharded run's checkpoint,
    epsilons included); the fsdp arguments may be given as well when they agree."""
    _, res = sharded
    env, log = accelerate_launched
    pairs = (("env_exact", "exact"), ("env_exact", "args_exact"), ("env_lora", "lora"), ("env_lora", "args_lora"),
             ("env_both", "exact"), ("env_resumed", "full"), ("env_resumed", "args_resumed"))
    for ours, theirs in pairs:
        assert set(env[ours]) == set(res[theirs]), ours
        for name, p in res[theirs].items():
            torch.testing.assert_close(env[ours][name], p, rtol=0, atol=0,
                                       msg=lambda m, o=ours, t=theirs, name=name: f"{o}/{t} {name}: {m}")
    assert env["env_resumed_eps"] == res["full_eps"]
    assert env["env_resumed_logged"] == res["full_logged"]
    assert env["env_sharded"] == [True] * 4
    # accelerate built no FSDP plugin in any run: the variable was turned off for the process, and said so
    for state in env["env_state"]:
        assert state["ACCELERATE_USE_FSDP"] == "false" and state["fsdp_plugin"] is None, state
        assert not state["is_fsdp_enabled"] and "FSDP" not in state["distributed_type"], state
    assert log.count("set ACCELERATE_USE_FSDP=false for this process") == 2  # once per rank, at the first run
    assert "from the accelerate launch configuration" in log
    assert "from the fsdp arguments and accelerate launch configuration" in log
