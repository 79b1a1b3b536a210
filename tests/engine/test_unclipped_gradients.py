"""Issue 10, kind 1: every gradient an optimizer applies came from the engine's clipped sum plus noise.

Each test is one way a ``.grad`` can reach an optimizer: the engine must raise before the step (naming the
parameter), and the parameters must be unchanged; or, for the harmless ways, train exactly as usual.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ghostdp import PrivacyEngine
from ghostdp.engine.errors import UnclippedGradientError


def two_layers(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def loss_of(model, xy):
    x, y = xy
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def attach(model, params=None, sigma=1.0, C=0.25, seed=0, **kw):
    opt = torch.optim.SGD(list(model.parameters()) if params is None else params, lr=1.0)
    engine = PrivacyEngine(model, opt, max_grad_norm=C, expected_batch_size=4, noise_multiplier=sigma,
                           generator=torch.Generator().manual_seed(seed), **kw)
    return engine, opt


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_unchanged(model, before):
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)


def test_layer_unfrozen_after_attach_is_refused_before_the_step():
    """The issue's case: first layer frozen at attach, unfrozen after; its raw batch gradient must not apply."""
    model = two_layers()
    model[0].requires_grad_(False)
    engine, opt = attach(model)  # the optimizer holds model.parameters(), frozen ones included
    model[0].requires_grad_(True)
    before = snapshot(model)
    with pytest.raises(UnclippedGradientError, match=r"'0\.(weight|bias)'.*requires_grad was turned on"):
        loss_of(model, batch()).mean().backward()  # refused at the end of this backward already
    with pytest.raises(UnclippedGradientError, match=r"'0\.(weight|bias)'.*requires_grad was turned on"):
        opt.step()  # and, should the user step anyway, before the step
    assert_unchanged(model, before)
    assert engine.steps == 0


def test_unfrozen_layer_outside_the_engines_optimizer_cannot_be_stepped_by_another():
    """New-user report: the engine's optimizer holds only the parameters trainable at attach; a layer
    unfrozen afterwards gets autograd's raw gradient, and a second optimizer over it would apply it."""
    model = two_layers()
    model[0].requires_grad_(False)
    engine, opt = attach(model, params=[p for p in model.parameters() if p.requires_grad])
    model[0].requires_grad_(True)
    before = snapshot(model)
    with pytest.raises(UnclippedGradientError, match=r"'0\.(weight|bias)'.*frozen when the engine attached"):
        loss_of(model, batch()).sum().backward()
    assert model[0].weight.grad is not None  # autograd wrote it before the end-of-backward check
    with pytest.raises(UnclippedGradientError, match=r"'0\.(weight|bias)'.*SGD\.step\(\)"):
        torch.optim.SGD(model[0].parameters(), lr=1.0).step()
    assert_unchanged(model, before)
    model[0].weight.grad = torch.ones_like(model[0].weight)  # by hand on a frozen parameter: also refused
    model[0].bias.grad = None
    model[0].requires_grad_(False)
    with pytest.raises(UnclippedGradientError, match=r"'0\.weight'.*frozen, yet has a \.grad"):
        torch.optim.SGD(model[0].parameters(), lr=1.0).step()
    assert_unchanged(model, before)


def test_bias_unfrozen_after_attach_in_a_clipped_layer_is_refused_in_backward():
    """A layer the engine patched (weight trainable) whose bias was frozen at attach, then unfrozen."""
    model = two_layers()
    model[2].bias.requires_grad_(False)
    attach(model)
    model[2].bias.requires_grad_(True)
    with pytest.raises(UnclippedGradientError, match=r"'2\.bias'.*frozen when the PrivacyEngine attached"):
        loss_of(model, batch()).mean().backward()


def test_parameter_added_with_add_param_group_after_attach_is_refused():
    model = two_layers()
    engine, opt = attach(model)
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt.add_param_group({"params": [extra]})
    (loss_of(model, batch()) * extra.sum()).mean().backward()  # extra gets autograd's raw gradient
    before = snapshot(model)
    with pytest.raises(UnclippedGradientError, match="not a parameter of the model.*add_param_group"):
        opt.step()
    assert_unchanged(model, before)
    torch.testing.assert_close(extra.detach(), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("how", ["assigned", "scaled_in_place", "clip_grad_norm_", "added_in_place"])
def test_gradient_changed_by_hand_or_another_library_is_refused(how):
    model = two_layers()
    engine, opt = attach(model)
    loss_of(model, batch()).mean().backward()
    w = model[2].weight
    if how == "assigned":
        w.grad = torch.ones_like(w)
    elif how == "scaled_in_place":
        w.grad.mul_(10.0)
    elif how == "clip_grad_norm_":
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3)
    else:
        w.grad += 1.0
    before = snapshot(model)
    with pytest.raises(UnclippedGradientError, match=r"'\d\.(weight|bias)'.*did not produce"):
        opt.step()
    assert_unchanged(model, before)


def test_gradient_written_by_another_librarys_step_pre_hook_is_refused():
    """A hook registered before the engine's runs first; whatever it writes is checked."""
    model = two_layers()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)

    def hook(optimizer, args, kwargs):
        model[0].weight.grad.mul_(3.0)

    opt.register_step_pre_hook(hook)
    PrivacyEngine(model, opt, max_grad_norm=0.25, expected_batch_size=4, noise_multiplier=1.0)
    loss_of(model, batch()).mean().backward()
    with pytest.raises(UnclippedGradientError, match=r"'0\.weight'.*changed in place"):
        opt.step()


def test_gradient_written_by_a_module_backward_hook_is_refused():
    model = two_layers()
    engine, opt = attach(model)

    def hook(module, grad_input, grad_output):  # another library forming its own weight gradient
        module.weight.grad = torch.full_like(module.weight, 7.0)

    model[0].register_full_backward_hook(hook)
    before = snapshot(model)
    with pytest.raises(UnclippedGradientError, match=r"'0\.weight'.*did not produce"):
        loss_of(model, batch()).mean().backward()  # the hook ran before the engine's end-of-backward
        opt.step()
    assert_unchanged(model, before)


def test_gradient_left_from_before_attach_is_refused():
    model = two_layers()
    loss_of(model, batch()).mean().backward()  # plain autograd: raw gradients in every .grad
    engine, opt = attach(model)
    with pytest.raises(UnclippedGradientError, match="before the engine ever wrote it"):
        loss_of(model, batch(seed=2)).mean().backward()  # refused before adding into the raw gradient
    # The same without a backward after attaching (an empty Poisson batch): refused at the step.
    model = two_layers()
    loss_of(model, batch()).mean().backward()
    engine, opt = attach(model)
    before = snapshot(model)
    with pytest.raises(UnclippedGradientError, match="before the engine ever wrote it"):
        opt.step()
    assert_unchanged(model, before)


def test_frozen_parameter_with_a_hand_written_gradient_is_refused():
    model = two_layers()
    model[0].requires_grad_(False)
    engine, opt = attach(model)
    model[0].weight.grad = torch.ones_like(model[0].weight)  # SGD steps every parameter with a .grad
    with pytest.raises(UnclippedGradientError, match=r"'0\.weight'.*frozen, yet has a \.grad"):
        opt.step()


def test_clipped_parameter_stepped_by_a_second_optimizer_is_refused():
    model = two_layers()
    engine, opt = attach(model)
    other = torch.optim.Adam(model[2].parameters(), lr=1.0)
    loss_of(model, batch()).mean().backward()
    before = snapshot(model)
    with pytest.raises(UnclippedGradientError, match=r"'2\.weight'.*Adam.*un-noised"):
        other.step()
    assert_unchanged(model, before)
    opt.step()  # the engine's own optimizer still works
    assert engine.steps == 1
    engine.detach()
    other.step()  # after detach the engine no longer polices other optimizers


def test_step_with_a_closure_is_refused():
    model = two_layers()
    engine, opt = attach(model)

    def closure():
        loss = loss_of(model, batch()).mean()
        loss.backward()
        return loss

    with pytest.raises(UnclippedGradientError, match="closure"):
        opt.step(closure)


def run_steps(model, *, zero_in_place=False, freeze_after_backward=False):
    engine, opt = attach(model, sigma=0.7, seed=3)
    for seed in (1, 2):
        opt.zero_grad(set_to_none=not zero_in_place)
        loss_of(model, batch(seed=seed)).mean().backward()
        if freeze_after_backward:
            model[2].bias.requires_grad_(False)
        opt.step()
        if freeze_after_backward:
            model[2].bias.requires_grad_(True)
    return snapshot(model)


def test_harmless_ways_train_exactly_as_usual():
    """zero_grad(set_to_none=False) (zeros carry no data) and freezing between backward and step (the
    engine's clipped sum still gets its noise) give bit-identical parameters to the plain loop."""
    plain = run_steps(two_layers())
    for kw in ({"zero_in_place": True}, {"freeze_after_backward": True}):
        for a, b in zip(run_steps(two_layers(), **kw), plain):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_clipped_noised_update_of_the_issue_case_is_small():
    """Without the unfreeze, the issue's model gets a clipped, noised update (norm well under the raw 1.69)."""
    model = two_layers()
    start = copy.deepcopy(model)
    engine, opt = attach(model, sigma=0.0)
    loss_of(model, batch()).mean().backward()
    opt.step()
    delta = torch.cat([(p - q).flatten() for p, q in zip(model.parameters(), start.parameters())])
    # sigma = 0: the update is the clipped sum over 4 examples / 4, so its norm is at most C = 0.25.
    assert float(delta.detach().norm()) <= 0.25 + 1e-12


def test_the_global_step_hook_does_not_keep_a_dropped_engine_alive():
    import gc
    import weakref

    from torch.optim.optimizer import _global_optimizer_pre_hooks

    gc.collect()  # engines of earlier tests go, and their hooks with them
    n = len(_global_optimizer_pre_hooks)
    model = two_layers()
    engine, opt = attach(model)
    assert len(_global_optimizer_pre_hooks) == n + 1
    ref = weakref.ref(engine)
    del engine, opt, model
    gc.collect()
    assert ref() is None
    assert len(_global_optimizer_pre_hooks) == n
