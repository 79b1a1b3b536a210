"""Noise, refusals, frozen models, empty batches, state, detach and the regressions other engines shipped."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ghostdp
from ghostdp import PrivacyEngine, UnsupportedModuleError
from tests.helpers import lm_batch, lm_losses, reference_dp_grads, tiny_llama


def wide_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(300, 400), nn.Tanh(), nn.Linear(400, 5, bias=False))


def engine_for(model, **kw):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=kw.pop("lr", 0.0))
    args = dict(max_grad_norm=1.0, expected_batch_size=8, noise_multiplier=0.0)
    args.update(kw)
    return PrivacyEngine(model, opt, **args), opt


# ----------------------------------------------------------------------------- noise
def test_noise_of_zero_gradient_has_std_sigma_C_over_expected_batch():
    model = wide_model()
    sigma, C, E = 1.7, 0.8, 32
    engine, opt = engine_for(model, noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=E,
                             generator=torch.Generator().manual_seed(0))
    opt.step()  # an empty Poisson batch: no backward, the step is pure noise
    z = torch.cat([p.grad.flatten() for p in model.parameters()])
    n, target = z.numel(), sigma * C / E
    assert n > 100_000
    assert abs(float(z.mean())) < 5 * target / n ** 0.5
    assert abs(float(z.std()) / target - 1) < 5 * (1 / (2 * n)) ** 0.5
    assert engine.steps == 1


def test_noise_is_added_once_per_step_with_the_given_generator():
    """(noisy step) - (noiseless step) over two physical batches == sigma*C/E * z exactly, z the kernels' noise
    entry point's stream for noise_seed(base_seed, k), base_seed drawn once from the generator (state v2)."""
    from ghostdp.kernels.noise import noise_seed, randn_twin

    model = tiny_llama(False)
    batches = [lm_batch([5, 3], seed=1), lm_batch([4, 6], seed=2)]
    grads = {}
    for sigma in (0.0, 0.9):
        m = copy.deepcopy(model)
        _, opt = engine_for(m, noise_multiplier=sigma, max_grad_norm=0.5, expected_batch_size=4,
                            generator=torch.Generator().manual_seed(123))
        for b in batches:
            lm_losses(m, b).mean().backward()
        opt.step()
        grads[sigma] = [p.grad.clone() for p in m.parameters()]
    base = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(123)))
    for k, (clean, noisy, p) in enumerate(zip(grads[0.0], grads[0.9], model.parameters())):
        z = randn_twin(tuple(p.shape), seed=noise_seed(base, k), device=p.device).double()
        torch.testing.assert_close(noisy - clean, 0.9 * 0.5 * z / 4, rtol=1e-9, atol=1e-12)


def test_same_seed_reproduces_and_steps_differ():
    runs = []
    for _ in range(2):
        model = wide_model()
        _, opt = engine_for(model, noise_multiplier=1.0, generator=torch.Generator().manual_seed(7))
        steps = []
        for _ in range(2):
            opt.step()
            steps.append(torch.cat([p.grad.flatten() for p in model.parameters()]).clone())
            opt.zero_grad()
        runs.append(steps)
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=0)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=0, atol=0)
    corr = torch.corrcoef(torch.stack(runs[0]))[0, 1]
    assert abs(float(corr)) < 0.02  # independent draws across steps


def test_norms_and_noise_stay_fp32_under_bf16():
    model = tiny_llama(True, dtype=torch.bfloat16)
    ref_model = copy.deepcopy(model).double()  # the same (bf16-rounded) weights, computed in float64
    batch = lm_batch([5, 7, 3, 6], seed=3)
    ref, ref_norms = reference_dp_grads(ref_model, [batch], lm_losses, 1.0, 4.0)
    engine, opt = engine_for(model, max_grad_norm=1.0, expected_batch_size=4)
    lm_losses(model, batch).mean().backward()
    assert engine.per_sample_norms.dtype == torch.float32
    torch.testing.assert_close(engine.per_sample_norms.double(), torch.tensor(ref_norms, dtype=torch.float64), rtol=5e-2, atol=1e-3)
    opt.step()
    got = dict(model.named_parameters())
    for name, g in ref.items():  # bf16 forward/backward: compare each tensor's relative error in norm
        assert got[name].grad.dtype == torch.bfloat16
        err = (got[name].grad.double() - g).norm() / g.norm().clamp(min=1e-12)
        assert err < 0.1, (name, float(err))


# ----------------------------------------------------------------------------- refusals
class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * self.gain


def test_opaque_trainable_parameter_is_refused_with_its_name_and_ways_out():
    model = nn.Sequential(nn.Linear(4, 4), Scale())
    with pytest.raises(UnsupportedModuleError) as err:
        engine_for(model)
    msg = str(err.value)
    assert "'1.gain'" in msg and "Scale" in msg and "freeze" in msg and "register_layer" in msg
    assert "torch.nn.modules.linear.Linear" in msg  # lists what is supported, from the registry


def test_frozen_opaque_parameter_costs_nothing_and_trains():
    model = nn.Sequential(nn.Linear(4, 4), Scale())
    model[1].gain.requires_grad_(False)
    engine, opt = engine_for(model, max_grad_norm=10.0, expected_batch_size=2)
    model(torch.randn(2, 4)).sum(1).mean().backward()
    opt.step()
    assert model[0].weight.grad.abs().sum() > 0 and model[1].gain.grad is None


def test_functional_use_of_a_clipped_parameter_is_refused_at_backward():
    lin = nn.Linear(4, 4)
    engine, _ = engine_for(lin)
    x = torch.randn(3, 4)
    with pytest.raises(UnsupportedModuleError, match="weight"):
        (lin(x) + x @ lin.weight).sum().backward()


@pytest.mark.parametrize("kw", [{"scale_grad_by_freq": True}, {"max_norm": 1.0}, {"sparse": True}])
def test_unclippable_embedding_options_are_refused(kw):
    with pytest.raises(UnsupportedModuleError, match="emb|weight"):
        engine_for(nn.ModuleDict({"emb": nn.Embedding(10, 3, **kw)}))


def test_optimizer_param_outside_model_is_refused():
    model = nn.Linear(3, 3)
    stray = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD(list(model.parameters()) + [stray], lr=0.1)
    with pytest.raises(UnsupportedModuleError, match="optimizer"):
        PrivacyEngine(model, opt, max_grad_norm=1.0, expected_batch_size=2, noise_multiplier=1.0)


def test_dora_is_refused_with_the_lora_option_to_change():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(False), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(UnsupportedModuleError, match="use_dora"):
        engine_for(model)


@pytest.mark.parametrize("bad", [
    {"max_grad_norm": 0.0}, {"max_grad_norm": float("inf")}, {"expected_batch_size": 0}, {"noise_multiplier": -1.0},
    {"loss_reduction": "token_mean"}, {"clipping": "flat"}, {"sample_rate": 1.5},
])
def test_bad_arguments_name_themselves(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        engine_for(nn.Linear(2, 2), **bad)


def test_ddp_wrapper_is_refused():
    class FakeDDP(nn.parallel.DistributedDataParallel):
        def __init__(self, module):  # no process group needed to test the type check
            nn.Module.__init__(self)
            self.module = module

    with pytest.raises(TypeError, match="DistributedDataParallel"):
        engine_for(FakeDDP(nn.Linear(2, 2)))


# ----------------------------------------------------------------------------- frozen, empty, state
def test_fully_frozen_model_steps_without_error():
    model = nn.Linear(3, 3).requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine(model, opt, max_grad_norm=1.0, expected_batch_size=2, noise_multiplier=1.0, sample_rate=0.1)
    with torch.no_grad():
        model(torch.randn(2, 3))
    opt.step()
    assert model.weight.grad is None and engine.steps == 1


def test_empty_batch_step_is_noise_only_and_counts_for_privacy():
    model = wide_model()
    engine, opt = engine_for(model, noise_multiplier=1.0, sample_rate=0.01)
    opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    expected = ghostdp.accounting.epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=1, delta=1e-5)
    assert engine.epsilon(1e-5) == pytest.approx(expected)


def test_epsilon_needs_sample_rate():
    engine, _ = engine_for(nn.Linear(2, 2), noise_multiplier=1.0)
    with pytest.raises(ValueError, match="sample_rate"):
        engine.epsilon(1e-5)


def test_state_dict_resumes_noise_stream_and_ledger():
    def run(n_steps, state=None):
        model = wide_model()
        engine, opt = engine_for(model, noise_multiplier=1.0, sample_rate=0.05, generator=torch.Generator().manual_seed(3))
        if state is not None:
            engine.load_state_dict(state)
        for _ in range(n_steps):
            opt.step()
            out = torch.cat([p.grad.flatten() for p in model.parameters()]).clone()
            opt.zero_grad()
        return engine, out

    full, last_full = run(3)
    first, _ = run(2)
    resumed, last_resumed = run(1, copy.deepcopy(first.state_dict()))
    torch.testing.assert_close(last_resumed, last_full, rtol=0, atol=0)
    assert resumed.steps == 3 and resumed.epsilon(1e-5) == pytest.approx(full.epsilon(1e-5))


def test_detach_restores_plain_training():
    model = nn.Linear(3, 2)
    engine, opt = engine_for(model, noise_multiplier=5.0)
    engine.detach()
    assert "forward" not in model.__dict__
    x = torch.randn(4, 3)
    model(x).sum().backward()
    expected = model.weight.grad.clone()
    opt.step()  # no noise, no division
    torch.testing.assert_close(model.weight.grad, expected)


def test_batch_mismatch_in_one_backward_is_an_error():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    model = nn.ModuleList([a, b])
    engine_for(model)
    with pytest.raises(ghostdp.engine.errors.BatchMismatchError):
        (a(torch.randn(3, 2)).sum() + b(torch.randn(4, 2)).sum()).backward()


# ----------------------------------------------------------------------------- regressions from other engines
def test_lora_trains_after_model_is_moved_after_attach():
    """Opacus #820: LoRA weights never moved when the model was moved after the hooks were attached."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(False, dtype=torch.float32), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    engine, opt = engine_for(model, lr=0.5, max_grad_norm=1.0, expected_batch_size=2, noise_multiplier=0.0)
    model.to(torch.float64)  # moved (in dtype, the CPU stand-in for .cuda()) after attach
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for seed in range(3):
        lm_losses(model, lm_batch([6, 4], seed=seed)).mean().backward()
        opt.step()
        opt.zero_grad()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert moved and all("lora_" in n for n in moved)
    assert any("lora_A" in n for n in moved) and any("lora_B" in n for n in moved)


def test_per_example_loss_ignores_masked_tokens_and_other_examples():
    """Opacus #792: ignore_index tokens counted in the per-sequence mean."""
    from ghostdp.engine.loss import per_example_lm_loss

    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 6))
    labels[0, 4:] = -100
    labels[2, :] = -100
    out = per_example_lm_loss(logits, labels)
    manual = torch.nn.functional.cross_entropy(logits[0, :3], labels[0, 1:4])
    torch.testing.assert_close(out[0], manual)
    assert out[2] == 0  # no target tokens: no loss, no gradient
    other = labels.clone()
    other[1, 2:] = -100  # another example's mask and length change nothing for example 0
    torch.testing.assert_close(per_example_lm_loss(logits, other)[0], out[0])
