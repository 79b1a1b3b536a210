"""The Trainer hooks DPTrainer relies on, on whichever transformers line is installed (4.57+ or 5.x).

DPTrainer overrides a few private ``Trainer`` methods (5.x) or reaches the same points through public hooks
(4.x: a callback's ``on_train_begin``, the accelerator's ``clip_grad_norm_``). A transformers release that
renames or moves one of them would leave an override that is never called, and the Trainer's own behaviour
(clipping the summed gradient, logging its norm, a model without the engine) would come back silently. Each
test here fails if its hook stops being reached. ``make test-compat`` runs them, with tests/hf and
tests/engine, against the oldest supported transformers and peft (.ci/compat-constraints.txt).
"""
from __future__ import annotations

import inspect
import re
import tomllib

import pytest
import torch
from transformers import Trainer, TrainerCallback

from ghostdp.data import PoissonBatchSampler
from ghostdp.integrations.hf.trainer import DPTrainer
from tests.helpers import lm_losses, reference_dp_grads, tiny_llama
from tests.hf.trainer_helpers import REPO, TRANSFORMERS_4, collator, lora, make_args, make_data

N, L, B = 24, 4, 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Private Trainer methods DPTrainer overrides, by the transformers line that calls them.
OVERRIDDEN_BOTH = ["_get_num_items_in_batch", "_save_checkpoint", "set_initial_training_values",
                   "get_total_train_batch_size", "get_train_dataloader", "training_step", "floating_point_ops",
                   # FSDP2 sharded checkpoints (tests/hf/test_trainer_fsdp2.py); delegate to the Trainer otherwise
                   "save_model", "_load_from_checkpoint", "_save_optimizer_and_scheduler",
                   "_load_optimizer_and_scheduler"]
OVERRIDDEN_5 = ["_prepare_for_training", "_clip_grad_norm", "_get_grad_norm", "_track_num_input_tokens"]


def test_overridden_trainer_methods_exist_with_the_same_parameters():
    """An override of a method the installed Trainer no longer has (or calls with other arguments) is dead."""
    expected = OVERRIDDEN_BOTH + ([] if TRANSFORMERS_4 else OVERRIDDEN_5)
    for name in expected:
        assert name in DPTrainer.__dict__, f"DPTrainer no longer overrides {name}"
        assert hasattr(Trainer, name), f"transformers' Trainer has no {name}: DPTrainer's override is never called"
        theirs = list(inspect.signature(getattr(Trainer, name)).parameters)
        ours = inspect.signature(getattr(DPTrainer, name))
        ours.bind(*theirs)  # every argument the Trainer passes positionally is accepted
    if TRANSFORMERS_4:  # 4.x reaches these points through _StartDPCallback and _no_global_clipping instead
        for name in OVERRIDDEN_5:
            assert not hasattr(Trainer, name), f"transformers 4.x gained {name}: revisit DPTrainer's 4.x path"


def _first_batch_seed() -> int:
    """A dp_seed whose first Poisson batch has at least two physical batches' worth of examples."""
    for seed in range(100):
        first = next(iter(PoissonBatchSampler(N, L / N, generator=torch.Generator().manual_seed(seed))))
        if len(first) > B:
            return seed
    raise AssertionError("no such seed")


def test_the_clipped_sum_reaches_the_optimizer_unscaled_and_its_norm_is_not_logged(tmp_path):
    """Noise 0: the .grad the optimizer steps is the float64 one-example-at-a-time clipped sum.

    C is small, so that sum's norm exceeds C and the Trainer's own clipping (5.x: _clip_grad_norm; 4.x: the
    accelerator's clip_grad_norm_, inline) would have rescaled it. Its norm must not be logged either.
    """
    seed, C = _first_batch_seed(), 0.05
    model = lora(tiny_llama(True))
    start = lora(tiny_llama(True))
    data = make_data(N)

    class SeesGrads(TrainerCallback):
        grads: dict = {}

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if not self.grads:
                self.grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})

    seen = SeesGrads()
    args = make_args(tmp_path, max_steps=2, dp_seed=seed, noise_multiplier=0.0, max_grad_norm=C)
    trainer = DPTrainer(model=model, args=args, train_dataset=data, data_collator=collator(), callbacks=[seen])
    trainer.train()

    first = next(iter(PoissonBatchSampler(N, L / N, generator=torch.Generator().manual_seed(seed))))
    coll = collator()
    batches = [coll([data[i] for i in first[s:s + B]]) for s in range(0, len(first), B)]
    ref, _ = reference_dp_grads(start, batches, lm_losses, C, expected_batch_size=1)
    total = sum(float(g.pow(2).sum()) for g in ref.values()) ** 0.5
    assert total > 1.5 * C  # a global clip to C would change it
    assert seen.grads.keys() == ref.keys()
    for name, g in ref.items():
        torch.testing.assert_close(seen.grads[name], g, rtol=1e-6, atol=1e-9, msg=lambda m: f"{name}: {m}")
    assert not any("grad_norm" in log for log in trainer.state.log_history)
    assert any("epsilon" in log for log in trainer.state.log_history)


def test_the_engine_is_attached_before_any_callback_sees_training_begin(tmp_path):
    """5.x attaches in _prepare_for_training, 4.x in a callback inserted before the user's."""

    class Sees(TrainerCallback):
        trainer = None
        attached: list = []

        def on_train_begin(self, args, state, control, **kwargs):
            engine = self.trainer.privacy_engine
            self.attached.append(engine is not None and engine.steps == 0 and bool(engine._patched))

    sees = Sees()
    trainer = DPTrainer(model=lora(tiny_llama(True)), args=make_args(tmp_path, max_steps=1), train_dataset=make_data(N),
                        data_collator=collator(), callbacks=[sees])
    sees.trainer = trainer
    trainer.train()
    assert sees.attached == [True] and trainer.privacy_engine.steps == 1


def test_input_tokens_are_counted_over_every_physical_batch_or_refused(tmp_path):
    """5.x: DPTrainer._track_num_input_tokens sums each logical batch; 4.x counts inline, so it is refused."""
    if TRANSFORMERS_4:
        with pytest.raises(ValueError, match="include_num_input_tokens_seen.*transformers >= 5"):
            make_args(tmp_path, include_num_input_tokens_seen="non_padding")
        return
    seed, steps = _first_batch_seed(), 3
    data = make_data(N)
    args = make_args(tmp_path, max_steps=steps, dp_seed=seed, include_num_input_tokens_seen="non_padding")
    trainer = DPTrainer(model=lora(tiny_llama(True)), args=args, train_dataset=data, data_collator=collator())
    trainer.train()
    sampler = PoissonBatchSampler(N, L / N, generator=torch.Generator().manual_seed(seed))
    it, coll, expected = iter(sampler), collator(), 0
    for _ in range(steps):
        idx = next(it)
        for s in range(0, len(idx), B):
            expected += int(coll([data[i] for i in idx[s:s + B]])["attention_mask"].sum())
    assert expected > 0 and trainer.state.num_input_tokens_seen == expected


def test_pyproject_floors_are_the_versions_make_test_compat_installs():
    """The oldest transformers and peft pyproject admits are the ones the compat run tests."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (REPO / ".ci" / "compat-constraints.txt").read_text(), re.M))
    for pkg in ("transformers", "peft"):
        spec = next(d for d in deps if re.match(rf"{pkg}\b", d))
        floor = re.search(r">=\s*([0-9.]+)", spec).group(1)
        pinned = pins[pkg]
        assert tuple(map(int, pinned.split(".")))[:len(floor.split("."))] == tuple(map(int, floor.split("."))), \
            f"pyproject admits {spec} but make test-compat tests {pkg}=={pinned}"
