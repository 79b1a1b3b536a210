"""DPTrainer and ``accelerate launch`` with an FSDP configuration, one process, no torchrun: the translation of the
launch's environment variables into the FSDP2 settings DPTrainer applies, each refusal, the check against the
Trainer's own fsdp arguments, and how DPTrainer keeps accelerate's FSDP plugin out of the process. The variables
are computed by accelerate's own launch code (``accelerate_launch_env``). The 2-process runs are in
tests/hf/test_trainer_fsdp2.py.
"""
from __future__ import annotations

import os

import pytest

from ghostdp.integrations.hf import args as dp_args
from ghostdp.integrations.hf.args import accelerate_fsdp2_settings, fsdp2_settings, resolve_fsdp2
from tests.hf.fsdp2_trainer_worker import ACCELERATE_FSDP2_FLAGS, FSDP_ARGS, accelerate_launch_env
from tests.hf.trainer_helpers import TRANSFORMERS_4, make_args

FLAGS = dict(zip(ACCELERATE_FSDP2_FLAGS[::2], ACCELERATE_FSDP2_FLAGS[1::2], strict=True))
on_5 = pytest.mark.skipif(TRANSFORMERS_4, reason="DPTrainer honours FSDP2 on transformers 5.x only")


def launch_env(**changes: str | None) -> dict[str, str]:
    """The variables of accelerate launch --use_fsdp with ACCELERATE_FSDP2_FLAGS, flags changed or (None) left out."""
    flags = {**FLAGS, **{f"--fsdp_{k}": v for k, v in changes.items()}}
    return accelerate_launch_env(*(x for k, v in flags.items() if v is not None for x in (k, v)))


@pytest.fixture
def clean_launch_state(monkeypatch):
    """No accelerate FSDP variable in this process, none taken over; restored afterwards."""
    for k in [k for k in os.environ if k == "ACCELERATE_USE_FSDP" or k.startswith("FSDP_")]:
        monkeypatch.delenv(k)
    monkeypatch.setattr(dp_args, "_taken_over", None)


def test_no_accelerate_fsdp_means_no_settings():
    assert accelerate_fsdp2_settings({}) is None
    assert accelerate_fsdp2_settings({"ACCELERATE_USE_FSDP": "false", "FSDP_VERSION": "1"}) is None
    assert resolve_fsdp2(False, None, {}) == (None, ())


@on_5
def test_an_fsdp2_launch_translates_to_the_trainer_arguments_settings():
    env = launch_env()
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false" and env["FSDP_MIN_NUM_PARAMS"] == "100000000"
    settings = accelerate_fsdp2_settings(env)
    assert settings == {"reshard_after_forward": True, "layer_classes": ["LlamaDecoderLayer"]}
    assert settings == fsdp2_settings(**FSDP_ARGS["named"])  # the same settings as the Trainer's arguments
    assert accelerate_fsdp2_settings(launch_env(reshard_after_forward="false"))["reshard_after_forward"] is False
    # the model's _no_split_modules when no class is named (accelerate's default too); several names, spaced
    assert accelerate_fsdp2_settings(launch_env(transformer_layer_cls_to_wrap=None))["layer_classes"] is None
    two = accelerate_fsdp2_settings({**env, "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer, MLP"})
    assert two["layer_classes"] == ["LlamaDecoderLayer", "MLP"]
    # the index forms accelerate also reads; variables accelerate's FSDP2 plugin ignores
    indexed = {**env, "FSDP_STATE_DICT_TYPE": "1", "FSDP_SHARDING_STRATEGY": "1", "FSDP_BACKWARD_PREFETCH": "NO_PREFETCH",
               "FSDP_SYNC_MODULE_STATES": "false", "FSDP_MIN_NUM_PARAMS": "7"}
    assert accelerate_fsdp2_settings(indexed) == settings


@on_5
@pytest.mark.parametrize(("changes", "extra", "message"), [
    ({"version": "1"}, {}, "FSDP_VERSION='1'.*FSDP2 only"),
    ({}, {"FSDP_VERSION": None}, "FSDP_VERSION=unset.*FSDP2 only"),
    ({"offload_params": "true"}, {}, "FSDP_OFFLOAD_PARAMS.*CPU offload"),
    ({}, {"FSDP_SHARDING_STRATEGY": "HYBRID_SHARD"}, "FSDP_SHARDING_STRATEGY.*2-D device mesh"),
    ({}, {"FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}, "FSDP_SHARDING_STRATEGY.*reshard_after_forward: false"),
    ({}, {"FSDP_SHARDING_STRATEGY": "NO_SHARD"}, "FSDP_SHARDING_STRATEGY.*data parallel"),
    ({"reshard_after_forward": "SHARD_GRAD_OP"}, {}, "FSDP_RESHARD_AFTER_FORWARD.*true or false"),
    ({"auto_wrap_policy": "SIZE_BASED_WRAP", "transformer_layer_cls_to_wrap": None, "min_num_params": "1000"}, {},
     "FSDP_AUTO_WRAP_POLICY='SIZE_BASED_WRAP'.*size-based"),
    ({"auto_wrap_policy": "NO_WRAP", "transformer_layer_cls_to_wrap": None}, {}, "FSDP_AUTO_WRAP_POLICY='NO_WRAP'"),
    ({"auto_wrap_policy": None, "transformer_layer_cls_to_wrap": None}, {}, "FSDP_AUTO_WRAP_POLICY=unset"),
    ({}, {"FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer,"}, "config key fsdp_transformer_layer_cls_to_wrap"),
    ({"state_dict_type": "SHARDED_STATE_DICT"}, {}, "FSDP_STATE_DICT_TYPE='SHARDED_STATE_DICT'"),
    ({"state_dict_type": None}, {}, "FSDP_STATE_DICT_TYPE=unset.*SHARDED_STATE_DICT"),
    ({"backward_prefetch": "BACKWARD_PRE"}, {}, "FSDP_BACKWARD_PREFETCH.*FSDP1"),
    ({"forward_prefetch": "true"}, {}, "FSDP_FORWARD_PREFETCH.*FSDP1"),
    ({"use_orig_params": "false"}, {}, "FSDP_USE_ORIG_PARAMS.*original parameters"),
    ({"activation_checkpointing": "true"}, {}, "FSDP_ACTIVATION_CHECKPOINTING='true'.*gradient_checkpointing=True"),
    ({"activation_checkpointing": "true", "activation_checkpointing_offload": "true"}, {},
     "FSDP_ACTIVATION_CHECKPOINTING='true'"),
    ({}, {"FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD": "true"}, "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD"),
    ({"cpu_ram_efficient_loading": None}, {}, "FSDP_CPU_RAM_EFFICIENT_LOADING='true'.*rank 0 only"),  # launch default
    ({}, {"FSDP_IGNORED_MODULES": "model.norm"}, "FSDP_IGNORED_MODULES.*fully_shard unit"),
    ({}, {"FSDP_OFFLOAD_PARAMS": "maybe"}, "FSDP_OFFLOAD_PARAMS='maybe'.*true or false"),
    ({}, {"FSDP_MIXED_PRECISION": "bf16"}, r"\['FSDP_MIXED_PRECISION'\]: not variables"),
])
def test_what_dptrainer_cannot_honour_is_refused_by_name(changes, extra, message):
    env = {**launch_env(**changes), **extra}
    env = {k: v for k, v in env.items() if v is not None}
    with pytest.raises(ValueError, match=message) as err:
        accelerate_fsdp2_settings(env)
    assert "fsdp_version: 2" in str(err.value) and "torchrun" in str(err.value)  # the ways out


@on_5
def test_fsdp_arguments_and_the_launch_must_agree():
    env = launch_env()
    assert resolve_fsdp2(**FSDP_ARGS["named"], env=env) == (
        {"reshard_after_forward": True, "layer_classes": ["LlamaDecoderLayer"]},
        ("fsdp arguments", "accelerate launch configuration"))
    assert resolve_fsdp2(False, None, env)[1] == ("accelerate launch configuration",)
    with pytest.raises(ValueError, match="ask for different FSDP2 settings"):
        resolve_fsdp2(**FSDP_ARGS["default"], env=env)  # the model's _no_split_modules vs a named class
    with pytest.raises(ValueError, match="ask for different FSDP2 settings"):
        resolve_fsdp2(**FSDP_ARGS["named"], env=launch_env(reshard_after_forward="false"))


@on_5
def test_the_arguments_check_the_launch_environment(clean_launch_state, monkeypatch, tmp_path):
    for k, v in launch_env(state_dict_type="SHARDED_STATE_DICT").items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match="FSDP_STATE_DICT_TYPE"):
        make_args(tmp_path)
    monkeypatch.setenv("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT")
    with pytest.raises(ValueError, match="different FSDP2 settings"):
        make_args(tmp_path, **FSDP_ARGS["default"])
    make_args(tmp_path, **FSDP_ARGS["named"])


@pytest.mark.skipif(not TRANSFORMERS_4, reason="transformers 4.x only")
def test_an_fsdp_launch_is_refused_on_transformers_4():
    with pytest.raises(ValueError, match="transformers 5.x only"):
        accelerate_fsdp2_settings(launch_env())


@on_5
def test_dptrainer_keeps_accelerates_fsdp_plugin_out(clean_launch_state, monkeypatch, tmp_path, caplog):
    """ACCELERATE_USE_FSDP is turned off for the process (with an INFO line), the launch's variables stay readable for
    later arguments and trainers, and an accelerate state built earlier with FSDP is dropped."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    from ghostdp.integrations.hf.trainer import _keep_accelerate_fsdp_off

    env = launch_env()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    args = make_args(tmp_path)
    args.world_size  # noqa: B018 - builds accelerate's PartialState, as DPTrainer does
    Accelerator(cpu=True)  # one process: accelerate keeps no FSDP plugin, so one is put in its place by hand
    AcceleratorState._shared_state["fsdp_plugin"] = "a plugin"  # as a multi-device AcceleratorState with FSDP keeps
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # ... and writes into PartialState
    try:
        with caplog.at_level("INFO", logger="ghostdp.integrations.hf.trainer"):
            _keep_accelerate_fsdp_off(args)
        assert os.environ["ACCELERATE_USE_FSDP"] == "false"
        assert "set ACCELERATE_USE_FSDP=false for this process" in caplog.text
        assert "reset an accelerate state built earlier" in caplog.text
        assert "fsdp_plugin" not in AcceleratorState._shared_state
        assert PartialState._shared_state["distributed_type"] == DistributedType.NO
        assert args.world_size == 1  # the arguments' state is the rebuilt one
        # later arguments and trainers in the process still see the launch's configuration
        assert dp_args.accelerate_fsdp_env() == env
        assert resolve_fsdp2(False, None, dp_args.accelerate_fsdp_env())[1] == ("accelerate launch configuration",)
        caplog.clear()
        with caplog.at_level("INFO", logger="ghostdp.integrations.hf.trainer"):
            _keep_accelerate_fsdp_off(args)
        assert caplog.text == ""  # nothing left to turn off
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@on_5
def test_an_fsdp2_launch_with_one_process_is_refused(clean_launch_state, monkeypatch, tmp_path):
    from ghostdp.integrations.hf.trainer import DPTrainer
    from tests.helpers import tiny_llama
    from tests.hf.trainer_helpers import collator, make_data

    for k, v in launch_env().items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=r"FSDP \(accelerate launch configuration\) but a single process"):
        DPTrainer(model=tiny_llama(True), args=make_args(tmp_path), train_dataset=make_data(8), data_collator=collator())
