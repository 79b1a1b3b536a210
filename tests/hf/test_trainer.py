"""DPTrainer against references: a hand-written PrivacyEngine + PoissonBatchSampler loop, the accountant,
an uninterrupted run (resume), one process (2-rank gloo data parallel), and its own errors.

Models are the tiny Llama of tests/conftest.py (vocab 50, hidden 16, 2 layers) in float64, fed by the
Prefix-LM collator over a word-level tokenizer; the end-to-end test fine-tunes the embedded SmolLM2-135M
with LoRA on a slice of SST-2.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import subprocess
import sys

import pytest
import torch
from transformers import Trainer, TrainerCallback

import ghostdp.accounting as acc
from ghostdp import PrivacyEngine, UnsupportedModuleError
from ghostdp.data import PoissonBatchSampler
from ghostdp.engine.loss import per_example_lm_loss
from ghostdp.integrations.hf.trainer import (
    PRIVACY_FILE,
    STATE_FILE,
    DPTrainer,
    PrivacyBudgetExhaustedError,
)
from tests.helpers import SST2_DIR, require_embedded_smollm2, tiny_llama
from tests.hf.trainer_helpers import (
    CHECKPOINTING,
    DDP_N,
    DDP_STEPS,
    IS_CHECKPOINTING,
    LENGTH_GROUPED,
    REPO,
    TRANSFORMERS_4,
    collator,
    ddp_run,
    lora,
    make_args,
    make_data,
    trainable,
)

N, L, B = 24, 4, 3  # examples, logical (expected) batch, physical batch: q = 1/6, 6 steps per sampler pass


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread. On a shared 2-core machine, OpenMP's spinning barrier makes 2 threads 5-10x slower
    than 1 whenever another process holds a core (measured on SmolLM2's forward); results do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ParamsEachStep(TrainerCallback):
    """Trainable parameters after every optimizer step (on_step_end runs after step and zero_grad)."""

    def __init__(self, model):
        self.model, self.steps = model, []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(trainable(self.model))


def logged(trainer, key="epsilon") -> dict[int, float]:
    """{step: value} of ``key`` in the per-step training logs (not the final summary)."""
    return {h["step"]: h[key] for h in trainer.state.log_history if key in h and "loss" in h}


def poisson_batches(seed: int, steps: int, n: int = N, q: float = L / N) -> list[list[int]]:
    """The batches DPTrainer draws with dp_seed=seed: passes of round(1/q) draws from one generator."""
    sampler = PoissonBatchSampler(n, q, generator=torch.Generator().manual_seed(seed))
    return list(itertools.islice(itertools.chain.from_iterable(iter(sampler) for _ in range(steps)), steps))


def reference_run(model, data, seed, *, steps, sigma, C, lr, coll=None, n=N, q=L / N):
    """The DP-SGD loop written by hand: Poisson batches, physical batches of B, sum-of-losses backward, SGD.

    The optimizer's parameter groups follow Trainer's (weight-decayed ones first): the engine draws the
    noise group by group, so the same seed gives the same noise only in the same order.
    """
    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.SGD([{"params": [p for n, p in named if n in decay]},
                           {"params": [p for n, p in named if n not in decay]}], lr=lr)
    PrivacyEngine(model, opt, max_grad_norm=C, expected_batch_size=round(q * n), noise_multiplier=sigma,
                  loss_reduction="sum", sample_rate=q, generator=torch.Generator().manual_seed(seed + 1))
    coll, out = coll or collator(), []
    for idx in poisson_batches(seed, steps, n, q):
        for start in range(0, len(idx), B):
            batch = coll([data[i] for i in idx[start:start + B]])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            per_example_lm_loss(logits, batch["labels"]).sum().backward()
        opt.step()  # noise is added even when the logical batch was empty
        opt.zero_grad()
        out.append(trainable(model))
    return out


def seed_with_empty_and_split_batches(steps: int) -> int:
    """A dp_seed whose first batches include an empty one and one that needs two physical batches."""
    for seed in range(200):
        sizes = [len(b) for b in poisson_batches(seed, steps)]
        if 0 in sizes and max(sizes) > B:
            return seed
    raise AssertionError("no such seed")


@pytest.mark.parametrize("kind", ["full-tied", "lora"])
def test_matches_hand_written_engine_loop(tmp_path, kind):
    steps = 8  # crosses a sampler pass (6 steps)
    seed = seed_with_empty_and_split_batches(steps)
    build = (lambda: tiny_llama(True)) if kind == "full-tied" else (lambda: lora(tiny_llama(True)))
    data = make_data(N)
    expected = reference_run(build(), data, seed, steps=steps, sigma=0.8, C=0.5, lr=0.05)

    model = build()
    rec = ParamsEachStep(model)
    args = make_args(tmp_path, max_steps=steps, dp_seed=seed, noise_multiplier=0.8, max_grad_norm=0.5,
                     group_physical_by_length=False)  # the hand loop's physical batches, so float64-exact
    trainer = DPTrainer(model=model, args=args, train_dataset=data, data_collator=collator(), callbacks=[rec])
    trainer.train()

    assert trainer.state.global_step == steps and trainer.privacy_engine.steps == steps
    assert len(rec.steps) == steps
    for k, (got, ref) in enumerate(zip(rec.steps, expected)):
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-12,
                                       msg=lambda m, k=k, name=name: f"step {k + 1}, {name}: {m}")
    # the logged loss is sum_i L_i / L over each logical batch (0 for the empty one)
    losses = logged(trainer, "loss")
    empty = [k + 1 for k, b in enumerate(poisson_batches(seed, steps)) if not b]
    assert all(losses[s] == 0.0 for s in empty)

    if kind == "full-tied":  # save_model writes a checkpoint plain transformers loads
        from transformers import AutoModelForCausalLM

        trainer.save_model(str(tmp_path / "final"))
        loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"), dtype=torch.float64)
        for name, p in trainable(model).items():
            torch.testing.assert_close(dict(loaded.named_parameters())[name], p, rtol=0, atol=0)


def test_epsilon_logged_equals_accountant_and_budget_stop(tmp_path, caplog):
    sigma, delta = 0.7, 1e-3
    eps3 = acc.epsilon(noise_multiplier=sigma, sample_rate=L / N, steps=3, delta=delta)
    eps4 = acc.epsilon(noise_multiplier=sigma, sample_rate=L / N, steps=4, delta=delta)
    target = (eps3 + eps4) / 2  # 3 steps fit, the 4th would not; 8 are planned
    args = make_args(tmp_path, max_steps=8, noise_multiplier=sigma, target_epsilon=target, target_delta=delta,
                     dp_seed=None, save_strategy="steps", save_steps=100)
    trainer = DPTrainer(model=lora(tiny_llama(True)), args=args, train_dataset=make_data(N), data_collator=collator())
    with caplog.at_level(logging.WARNING, logger="ghostdp.integrations.hf.trainer"):
        trainer.train()

    assert trainer.privacy_plan.budget_steps == 3 and trainer.privacy_plan.planned_steps == 8
    assert trainer.state.global_step == 3 and trainer.privacy_engine.steps == 3
    eps = logged(trainer)
    assert sorted(eps) == [1, 2, 3]
    for k, e in eps.items():
        assert e == pytest.approx(acc.epsilon(noise_multiplier=sigma, sample_rate=L / N, steps=k, delta=delta),
                                  rel=1e-12)
    assert eps[3] <= target
    assert "would reach epsilon" in caplog.text and "Privacy budget reached: stopping after step 3" in caplog.text
    # the stop saved a checkpoint carrying the ledger; with OS-entropy noise its RNG state is left out
    ckpt = tmp_path / "checkpoint-3"
    summary = json.loads((ckpt / PRIVACY_FILE).read_text())
    assert summary["epsilon"] == pytest.approx(eps[3]) and summary["steps"] == 3 and summary["delta"] == delta
    state = torch.load(ckpt / STATE_FILE, weights_only=True)
    assert state["engine"]["generator_state"] is None
    assert state["engine"]["accountant"]["history"] == [[sigma, L / N, 3]]
    # the spent budget cannot be trained past, even by resuming
    with pytest.raises(PrivacyBudgetExhaustedError, match="No step fits"):
        DPTrainer(model=lora(tiny_llama(True)), args=args, train_dataset=make_data(N),
                  data_collator=collator()).train(resume_from_checkpoint=str(ckpt))


def test_noise_calibrated_from_target_epsilon(tmp_path):
    args = make_args(tmp_path, max_steps=-1, num_train_epochs=1, noise_multiplier=None, target_epsilon=2.0)
    trainer = DPTrainer(model=lora(tiny_llama(True)), args=args, train_dataset=make_data(N), data_collator=collator())
    trainer.train()
    plan = trainer.privacy_plan
    assert plan.planned_steps == round(1 / (L / N)) == trainer.state.global_step == 6
    assert plan.delta == 1 / (2 * N)
    assert plan.noise_multiplier == acc.calibrate_noise_multiplier(
        target_epsilon=2.0, delta=1 / (2 * N), sample_rate=L / N, steps=6)
    assert trainer.current_epsilon() <= 2.0
    assert trainer.privacy_engine.noise_multiplier == plan.noise_multiplier


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_continues_the_same_run(tmp_path, workers):
    """AdamW + linear decay; checkpoint at step 3 is mid-pass (4 steps per pass); resume to step 6.

    With a worker process the DataLoader draws batches ahead of training; the checkpoint must hold the
    sampler state after the last batch trained on, not after the last one drawn.
    """
    n, steps = 16, 6  # q = 1/4
    common = {"max_steps": steps, "optim": "adamw_torch", "learning_rate": 0.02, "lr_scheduler_type": "linear",
              "save_strategy": "steps", "save_steps": 3, "dataloader_num_workers": workers}
    data = make_data(n)
    model = lora(tiny_llama(True))
    rec = ParamsEachStep(model)
    full = DPTrainer(model=model, args=make_args(tmp_path / "a", **common), train_dataset=data,
                     data_collator=collator(), callbacks=[rec])
    full.train()

    model_b = lora(tiny_llama(True))
    rec_b = ParamsEachStep(model_b)
    resumed = DPTrainer(model=model_b, args=make_args(tmp_path / "b", **common), train_dataset=data,
                        data_collator=collator(), callbacks=[rec_b])
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))

    assert resumed.privacy_engine.steps == steps and len(rec_b.steps) == 3
    for got, ref in zip(rec_b.steps, rec.steps[3:]):
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=0, atol=0)
    assert logged(resumed) == logged(full)  # steps 1-3 come from the checkpoint's log history
    assert resumed.current_epsilon() == full.current_epsilon()
    with pytest.raises(RuntimeError, match="already took 6 DP steps"):
        resumed.train()  # a second run on the same data would compose


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_data_parallel_equals_one_process(tmp_path):
    out = tmp_path / "ddp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(REPO / "tests" / "hf" / "trainer_helpers.py"), str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp = torch.load(out, weights_only=True)
    assert ddp["world"] == 2

    params, eps, losses = ddp_run(tmp_path / "single")
    assert ddp["epsilon"] == eps == acc.epsilon(noise_multiplier=0.6, sample_rate=6 / DDP_N, steps=DDP_STEPS,
                                                delta=1 / (2 * DDP_N))
    assert ddp["losses"] == pytest.approx(losses, rel=1e-12)  # the logged loss covers both ranks' examples
    for name, p in params.items():
        torch.testing.assert_close(ddp["params"][name], p, rtol=1e-10, atol=1e-12,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_gradient_checkpointing_gives_the_same_steps(tmp_path):
    runs = []
    for ckpt in (False, True):
        model = lora(tiny_llama(True))
        args = make_args(tmp_path / str(ckpt), max_steps=3, **{CHECKPOINTING: ckpt})
        DPTrainer(model=model, args=args, train_dataset=make_data(N), data_collator=collator()).train()
        assert getattr(model, IS_CHECKPOINTING) == ckpt  # layers recompute their forward in backward
        runs.append(trainable(model))
    for name in runs[0]:
        torch.testing.assert_close(runs[1][name], runs[0][name], rtol=1e-10, atol=1e-12)


def test_bf16_lora_evaluation_callbacks_and_peft_save(tmp_path):
    """bf16 autocast steps track fp32 ones; eval, user callbacks and save_model work as in Trainer."""

    class SeesEpsilon(TrainerCallback):
        def __init__(self):
            self.logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

    updates = {}
    for bf16 in (False, True):
        model = lora(tiny_llama(True, dtype=torch.float32))
        start = trainable(model)
        seen = SeesEpsilon()
        args = make_args(tmp_path / str(bf16), max_steps=3, bf16=bf16, noise_multiplier=0.0, eval_strategy="steps",
                         eval_steps=2, per_device_eval_batch_size=4)
        trainer = DPTrainer(model=model, args=args, train_dataset=make_data(N), eval_dataset=make_data(8, seed=9),
                            data_collator=collator(), callbacks=[seen])
        trainer.train()
        updates[bf16] = {n: p - start[n] for n, p in trainable(model).items()}
        assert any("eval_loss" in log and "epsilon" in log for log in seen.logs)
        assert [log["epsilon"] for log in seen.logs if "loss" in log] == [float("inf")] * 3  # sigma = 0: no privacy
    num = sum(float((updates[True][n] - updates[False][n]).pow(2).sum()) for n in updates[False])
    den = sum(float(u.pow(2).sum()) for u in updates[False].values())
    assert den > 0 and 0 < (num / den) ** 0.5 < 0.1  # bf16 autocast really ran, and stayed close

    from peft import PeftModel

    trainer.save_model(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(tiny_llama(True, dtype=torch.float32), str(tmp_path / "adapter"))
    got = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    for name, p in trainable(model).items():
        torch.testing.assert_close(got[name], p, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- bad configurations
ARG_ERRORS = [
    ({"per_device_train_batch_size": 8}, "larger than logical_batch_size"),
    ({"logical_batch_size": None}, "logical_batch_size=None"),
    ({"noise_multiplier": None, "target_epsilon": None}, "needs target_epsilon"),
    ({"max_grad_norm": 0.0}, "clipping bound C"),
    ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps=2"),
    (LENGTH_GROUPED, "Poisson"),
    ({"label_smoothing_factor": 0.1}, "label smoother"),
    ({"fp16": True}, "loss scaling"),
    ({"neftune_noise_alpha": 5.0}, "NEFTune"),
    # FSDP2 arguments are honoured (tests/hf/test_trainer_fsdp2.py); what DPTrainer cannot honour is refused
    ({"fsdp": "full_shard", "fsdp_config": {"version": 1}}, "FSDP2 only" if not TRANSFORMERS_4 else "5.x only"),
    ({"fsdp": "full_shard offload"}, "CPU offload" if not TRANSFORMERS_4 else "5.x only"),
    ({"fsdp": "hybrid_shard"}, "HSDP needs a 2-D mesh" if not TRANSFORMERS_4 else "5.x only"),
    ({"fsdp": True, "fsdp_config": {"activation_checkpointing": True}},
     "gradient_checkpointing=True" if not TRANSFORMERS_4 else "5.x only"),
    ({"fsdp": True, "fsdp_config": {"fsdp_forward_prefetch": True}},
     "not FSDP2 options DPTrainer honours" if not TRANSFORMERS_4 else "5.x only"),
    ({"fsdp": True, "fsdp_config": {"state_dict_type": "SHARDED_STATE_DICT"}},
     "leave state_dict_type unset" if not TRANSFORMERS_4 else "5.x only"),
    ({"deepspeed": {"zero_optimization": {"stage": 2}}}, "DeepSpeed is not supported"),
    ({"optim": "lomo"}, "LOMO"),
    ({"push_to_hub": True, "hub_strategy": "checkpoint", "hub_model_id": "x/y"}, "sampler's RNG state"),
]


@pytest.mark.parametrize("overrides,match", ARG_ERRORS, ids=[m for _, m in ARG_ERRORS])
def test_arguments_that_break_dp_are_refused(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_args(tmp_path, **overrides)


def test_trainer_configurations_that_break_dp_are_refused(tmp_path):
    args = make_args(tmp_path)

    def make(model=None, data=None, cls=DPTrainer, a=args, **kw):
        return cls(model=model or tiny_llama(True), args=a, train_dataset=make_data(N) if data is None else data,
                   data_collator=collator(), **kw)

    model = tiny_llama(True)
    model.model.layers[0].mlp.act_fn = torch.nn.PReLU()  # a trainable layer ghostdp has no rule for
    with pytest.raises(UnsupportedModuleError, match="PReLU"):
        make(model)
    with pytest.raises(ValueError, match="fewer than logical_batch_size"):
        make(data=make_data(3))
    with pytest.raises(ValueError, match="target_delta=0.05 >= 1/N"):
        make(a=make_args(tmp_path, target_delta=0.05))
    with pytest.raises(ValueError, match="compute_loss_func"):
        make(compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.loss)
    with pytest.raises(TypeError, match="DPTrainingArguments"):
        DPTrainer(model=tiny_llama(True), args=None)

    class OwnLoss(DPTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return model(**inputs).loss

    class OwnSampler(DPTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset)

    with pytest.raises(TypeError, match="overrides compute_loss.*compute_per_example_loss"):
        make(cls=OwnLoss)
    with pytest.raises(TypeError, match="overrides _get_train_sampler"):
        make(cls=OwnSampler)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(make_data(N))

    with pytest.raises(ValueError, match="map-style dataset"):
        make(data=Stream(), a=make_args(tmp_path, max_steps=2))


def test_a_loss_that_mixes_examples_is_caught_before_the_first_step(tmp_path):
    class TokenMeanLoss(DPTrainer):
        def compute_per_example_loss(self, model, inputs):
            """Each token's loss over the batch's token count: sums to the HF loss, but mixes examples."""
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            labels = inputs["labels"]
            n_i = (labels[:, 1:] != -100).sum(1)
            return per_example_lm_loss(logits, labels) * n_i / n_i.sum()

    model = tiny_llama(True)
    before = trainable(model)
    trainer = TokenMeanLoss(model=model, args=make_args(tmp_path),
                            train_dataset=make_data(N), data_collator=collator())
    with pytest.raises(ValueError, match="not per-example"):
        trainer.train()
    assert trainer.privacy_engine.steps == 0
    for name, p in trainable(model).items():
        assert torch.equal(p, before[name])


def test_physical_batches_are_grouped_by_length_within_the_poisson_batch(tmp_path):
    """Each logical batch holds exactly the Poisson draw; with group_physical_by_length (default) its physical
    batches run longest first, so they pad less; off, they keep the sampled order."""
    data = make_data(N)
    seed = seed_with_empty_and_split_batches(6)
    draws = poisson_batches(seed, 6)
    ids = {tuple(collator()([row])["input_ids"][0].tolist()): i for i, row in enumerate(data)}
    assert len(ids) == N  # every row tokenizes differently, so rows can be recovered from the batches

    def rows_and_padding(by_length):
        args = make_args(tmp_path, dp_seed=seed, group_physical_by_length=by_length)
        trainer = DPTrainer(model=tiny_llama(True), args=args, train_dataset=data, data_collator=collator())
        out = []
        for logical, _ in zip(trainer.get_train_dataloader(), range(6)):
            rows, padded = [], 0
            for b in logical.physical:
                mask = b["attention_mask"]
                padded += mask.numel()
                rows += [ids[tuple(r[m.bool()].tolist())] for r, m in zip(b["input_ids"], mask)]
            out.append((rows, padded))
        return out

    grouped, sampled = rows_and_padding(True), rows_and_padding(False)
    for draw, (rows, padded), (rows_off, padded_off) in zip(draws, grouped, sampled, strict=True):
        assert rows_off == draw and sorted(rows) == sorted(draw)
        lengths = [int(collator()([data[i]])["attention_mask"].sum()) for i in rows]
        assert lengths == sorted(lengths, reverse=True)
        assert padded <= padded_off
    assert sum(p for _, p in grouped) < sum(p for _, p in sampled)


@pytest.mark.parametrize("kind", ["full-tied", "lora"])
def test_lm_head_reads_only_the_positions_the_loss_scores(tmp_path, kind):
    """A long unscored prompt: DPTrainer asks the model for the logits of the scored tail only (from the
    position before the batch's first scored label), the per-example losses equal those of the full logits,
    and the steps equal the hand-written loop's (which computes every position's logits)."""
    from ghostdp.integrations.hf.collators import CollatorConfig, PrefixLMCollator
    from ghostdp.integrations.hf.prompts import PromptTemplate

    def long_prompt():
        return PrefixLMCollator(tokenizer=collator().tokenizer, config=CollatorConfig(
            template=PromptTemplate("w0 w1 w2 w3 w4 w5 w6 {label} :"), max_length=20))

    build = (lambda: tiny_llama(True)) if kind == "full-tied" else (lambda: lora(tiny_llama(True)))
    data = make_data(8)
    model = build()
    trainer = DPTrainer(model=model, args=make_args(tmp_path, max_steps=2, noise_multiplier=0.0),
                        train_dataset=data, data_collator=long_prompt())
    batch = long_prompt()(data[:5])
    lengths = []
    head = trainer.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, a, out: lengths.append(a[0].shape[1]))
    with torch.no_grad():
        got = trainer.compute_per_example_loss(trainer.model, batch)
        full = per_example_lm_loss(trainer.model(input_ids=batch["input_ids"],
                                                 attention_mask=batch["attention_mask"]).logits, batch["labels"])
    handle.remove()
    T = batch["labels"].shape[1]
    first = int((batch["labels"] != -100).any(0).nonzero()[0])
    assert first >= 9 and lengths == [T - first + 1, T]  # the prompt's positions are skipped, not the scored ones
    torch.testing.assert_close(got, full, rtol=1e-12, atol=1e-12)
    assert trainer._scored_tail(trainer.model, torch.full_like(batch["labels"], -100)) is None  # nothing scored
    assert trainer._scored_tail(trainer.model, batch["labels"]) == T - first + 1

    expected = reference_run(build(), data, 3, steps=2, sigma=0.0, C=0.5, lr=0.05, coll=long_prompt(), n=8, q=0.5)
    # In the sampled order the physical batches are the hand loop's, and the steps agree to float64 rounding.
    # Grouped by length, the same examples sum in another order and other batch shapes: the ghost norms'
    # rounding (float64, inner products of per-position terms) moves by ~1e-10 relative, no more.
    for by_length, rtol, atol in ((False, 1e-10, 1e-12), (True, 1e-7, 1e-9)):
        model = build()
        rec = ParamsEachStep(model)
        trainer = DPTrainer(model=model, args=make_args(tmp_path, max_steps=2, dp_seed=3, noise_multiplier=0.0,
                                                        logical_batch_size=4, group_physical_by_length=by_length),
                            train_dataset=data, data_collator=long_prompt(), callbacks=[rec])
        trainer.train()
        for got_step, ref in zip(rec.steps, expected, strict=True):
            for name in ref:
                torch.testing.assert_close(got_step[name], ref[name], rtol=rtol, atol=atol)


def test_a_forward_that_ignores_logits_to_keep_is_read_whole(tmp_path):
    """A model whose forward names logits_to_keep but returns every position's logits still gets its exact
    per-example losses (the labels are not cut), and is not asked again."""
    from transformers import LlamaForCausalLM

    class AllLogits(LlamaForCausalLM):
        def forward(self, *args, logits_to_keep=0, **kwargs):
            return super().forward(*args, logits_to_keep=0, **kwargs)

    model = tiny_llama(True)
    model.__class__ = AllLogits
    data = make_data(6)
    trainer = DPTrainer(model=model, args=make_args(tmp_path), train_dataset=data, data_collator=collator())
    batch = collator()(data)
    with torch.no_grad():
        got = trainer.compute_per_example_loss(model, batch)
        full = per_example_lm_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                   batch["labels"])
    torch.testing.assert_close(got, full, rtol=1e-12, atol=1e-12)
    assert trainer._tail_supported is False


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_smollm2_lora_on_sst2_lowers_the_loss(tmp_path):
    """SmolLM2-135M (tied embeddings) + LoRA, 8 DP steps on 256 SST-2 sentences: the held-out loss drops.

    The noise is small (sigma = 0.05, so epsilon is large) because eight CPU-sized steps cannot show a signal
    under the noise of a real budget; what this checks is that the whole path trains a real model.
    """
    require_embedded_smollm2()
    pytest.importorskip("gguf")
    if not (SST2_DIR / "train.tsv").is_file():
        pytest.skip(f"no SST-2 data at {SST2_DIR}")
    from ghostdp.integrations.hf.collators import CollatorConfig, PrefixLMCollator
    from ghostdp.integrations.hf.models import load_causal_lm
    from ghostdp.integrations.synthetic.text_data import load_sst2

    model, tokenizer = load_causal_lm("smollm2-135m")  # GGUF, dequantized to float32, marker dropped
    assert model.config.tie_word_embeddings

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.0))
    rows = load_sst2("train", data_dir=SST2_DIR, limit=272).examples()
    train, held_out = rows[:256], rows[256:]
    args = make_args(tmp_path, logical_batch_size=8, per_device_train_batch_size=8, per_device_eval_batch_size=16,
                     max_steps=8, noise_multiplier=0.05, max_grad_norm=1.0, optim="adamw_torch",
                     learning_rate=5e-3, logging_steps=4, dp_seed=0)
    trainer = DPTrainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                        data_collator=PrefixLMCollator(tokenizer, CollatorConfig(max_length=16)))
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.5, (before, after)
    assert logged(trainer)[8] == pytest.approx(
        acc.epsilon(noise_multiplier=0.05, sample_rate=8 / 256, steps=8, delta=1 / 512), rel=1e-12)


def test_training_loss_is_not_logged_unless_asked_and_text_columns_are_kept(tmp_path):
    """The training loss is an un-noised statistic of the private batches, like the pre-noise gradient norm:
    by default no log, reporter or checkpoint sees it. With the default arguments the Prefix-LM collator
    gets its 'text' and 'label' columns (TrainingArguments would drop them as unused by the model)."""
    from ghostdp.integrations.hf.args import DPTrainingArguments

    args = DPTrainingArguments(
        output_dir=str(tmp_path), logical_batch_size=4, per_device_train_batch_size=3, noise_multiplier=0.8,
        max_grad_norm=0.5, max_steps=2, logging_steps=1, report_to=[], save_strategy="steps", save_steps=2,
        use_cpu=True, dp_seed=7, disable_tqdm=True, dataloader_pin_memory=False,
    )
    assert args.remove_unused_columns is False and args.log_private_loss is False
    trainer = DPTrainer(model=lora(tiny_llama(True)), args=args, train_dataset=make_data(N), data_collator=collator())
    trainer.train()
    history = trainer.state.log_history
    assert [h["step"] for h in history if "epsilon" in h and "train_runtime" not in h] == [1, 2]
    assert not any(k in h for h in history for k in ("loss", "train_loss", "grad_norm"))
    saved = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    assert not any(k in h for h in saved for k in ("loss", "train_loss", "grad_norm"))
    # asked for (where the logs stay private), the loss is logged at every step
    trainer = DPTrainer(model=lora(tiny_llama(True)), args=make_args(tmp_path / "b", max_steps=2),
                        train_dataset=make_data(N), data_collator=collator())
    trainer.train()
    assert sorted(logged(trainer, "loss")) == [1, 2]
