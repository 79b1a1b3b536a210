"""Issue 9 item 3: one noise path. The engine draws every step's noise through ghostdp.kernels.add_noise_ (for
impl "torch" and "triton" alike), with the implementation resolved once per parameter at attach; the state
is versioned (2) and version-1 states still load."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ghostdp import PrivacyEngine, kernels


def small(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def run(model, sigma, seed=11, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = PrivacyEngine(model, opt, max_grad_norm=0.3, expected_batch_size=4, noise_multiplier=sigma,
                           generator=torch.Generator().manual_seed(seed), **kw)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model(x).pow(2).sum(1).mean().backward()
    opt.step()
    return engine, [p.grad.clone() for p in model.parameters()]


def test_all_step_noise_goes_through_the_kernels_entry_point(monkeypatch):
    """With add_noise_ replaced by scaling only, a noisy engine gives exactly the noiseless gradients: no
    other noise source exists in the engine (the torch branch draws nothing inline)."""
    calls = []

    def scale_only(grad, *, noise_std, seed, scale=1.0, impl="auto"):
        calls.append((tuple(grad.shape), noise_std, seed, impl))
        return grad.mul_(scale)

    _, clean = run(small(), sigma=0.0)
    monkeypatch.setattr(kernels, "add_noise_", scale_only)
    engine, noisy = run(small(), sigma=2.0, impl="torch")
    for a, b in zip(noisy, clean):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [c[0] for c in calls] == [tuple(p.shape) for p in engine.model.parameters()]
    assert all(c[1] == 2.0 * 0.3 and c[3] == "torch" for c in calls)
    assert len({c[2] for c in calls}) == len(calls)  # one independent stream per parameter


def test_noise_impl_is_resolved_once_at_attach():
    engine, _ = run(small(), sigma=1.0, impl="torch")
    assert set(engine._noise_impls.values()) == {"torch"}
    assert set(engine._noise_impls) == set(engine.model.parameters())


def test_state_is_versioned_and_version_1_states_load():
    engine, _ = run(small(), sigma=1.0)
    state = engine.state_dict()
    assert state["version"] == 2
    v1 = {k: v for k, v in state.items() if k != "version"}  # what version 1 wrote
    fresh, _ = run(small(), sigma=1.0, seed=99)
    fresh.load_state_dict(v1)
    assert fresh.steps == engine.steps
    assert torch.equal(fresh.generator.get_state(), engine.generator.get_state())
    with pytest.raises(ValueError, match="version 3 is newer"):
        fresh.load_state_dict({**state, "version": 3})


def test_noise_impl_cache_holds_only_the_parameters_and_keeps_no_gradient_alive():
    """Regression (FSDP2 leak, bench/results/fsdp2_cpu.md): the per-parameter noise ``impl`` cache is filled at
    attach with the model's trainable parameters and never grows. A tensor that is not one of them (a fresh
    gradient, a shard's local view) is resolved without being stored: a cache keyed by it kept every step's
    gradient alive."""
    import gc
    import weakref

    model = small()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine(model, opt, max_grad_norm=0.3, expected_batch_size=4, noise_multiplier=1.0,
                           generator=torch.Generator().manual_seed(3), impl="torch")
    n_trainable = sum(p.requires_grad for p in model.parameters())
    grads = []
    for step in range(4):
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        model(x).pow(2).sum(1).mean().backward()
        opt.step()
        grads += [weakref.ref(p.grad) for p in model.parameters()]
        # What the FSDP2 path once passed: a tensor that is not a parameter, new every step.
        assert engine._noise_impl(model[0].weight.grad.detach()) == "torch"
        assert engine._noise_impl(torch.zeros(3, dtype=torch.float64)) == "torch"
        opt.zero_grad(set_to_none=True)
        assert len(engine._noise_impls) == n_trainable
    assert set(engine._noise_impls) == set(model.parameters())
    gc.collect()
    assert [r for r in grads if r() is not None] == []  # no step's gradient outlives its zero_grad
    with pytest.raises(TypeError):  # read-only after attach
        engine._noise_impls[torch.zeros(1)] = "torch"
