"""Each supported layer type, alone and together, against the one-example-at-a-time reference.

A small model built from every supported layer: nn.Embedding with padding_idx, nn.LayerNorm, nn.RMSNorm,
nn.Linear on 3-D and on 2-D inputs (with and without bias), and an embedding table reused as an output
layer through a second module (a tied parameter). Odd batch sizes with loss_reduction="mean".
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ghostdp import PrivacyEngine
from tests.helpers import reference_dp_grads

V, D, PAD = 23, 7, 0


class TiedHead(nn.Module):
    """Output projection that shares the embedding table through an nn.Linear (as HF ties LM heads)."""

    def __init__(self, emb: nn.Embedding):
        super().__init__()
        self.proj = nn.Linear(D, V, bias=False)
        self.proj.weight = emb.weight


class AllLayers(nn.Module):
    def __init__(self, tie: bool):
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=PAD)
        self.ln = nn.LayerNorm(D)
        self.up = nn.Linear(D, 11)
        self.rms = nn.RMSNorm(11, eps=1e-5)
        self.down = nn.Linear(11, D, bias=False)
        self.head = TiedHead(self.emb) if tie else None
        self.cls = nn.Linear(D, 3)  # applied to a pooled (B, D) input: 2-D

    def forward(self, ids):
        h = self.ln(self.emb(ids))  # (B, T, D)
        h = h + self.down(torch.tanh(self.rms(self.up(h))))
        mask = (ids != PAD).unsqueeze(-1).to(h.dtype)
        pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, D)
        logits = self.cls(pooled)
        lm = self.head.proj(h) if self.head is not None else None
        return logits, lm


def losses(model, batch):
    logits, lm = model(batch["ids"])
    out = F.cross_entropy(logits, batch["y"], reduction="none")
    if lm is not None:  # next-token loss on the tied head, mean over each example's own tokens
        tgt = batch["ids"][:, 1:].masked_fill(batch["ids"][:, 1:] == PAD, -100)
        ce = F.cross_entropy(lm[:, :-1].transpose(1, 2), tgt, reduction="none", ignore_index=-100)
        out = out + ce.sum(1) / (tgt != -100).sum(1).clamp(min=1)
    return out


def make_batch(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    ids[torch.arange(T)[None, :] >= lengths[:, None]] = PAD  # right padding
    ids[0, 1] = ids[0, 0]  # a repeated id within one example (exercises the embedding's own cross terms)
    return {"ids": ids, "y": torch.randint(0, 3, (B,), generator=g)}


def build(tie, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = AllLayers(tie).to(dtype)
    with torch.no_grad():
        for m in (model.ln, model.rms):
            m.weight.add_(0.3 * torch.randn_like(m.weight))
    return model


@pytest.mark.parametrize("clipping", ["auto", "ghost", "per_sample"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_every_layer_type_matches_reference(tie, clipping):
    model = build(tie)
    batches = [make_batch(5, 6, seed=1), make_batch(3, 9, seed=2)]
    norms = reference_dp_grads(model, batches[:1], losses, float("inf"), 1.0)[1]
    C = sorted(norms)[2]
    ref, ref_norms = reference_dp_grads(model, batches, losses, C, 7.0)

    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = PrivacyEngine(model, opt, max_grad_norm=C, expected_batch_size=7.0, noise_multiplier=0.0, clipping=clipping)
    for b in batches:
        losses(model, b).mean().backward()
    opt.step()
    torch.testing.assert_close(engine.per_sample_norms, torch.tensor(ref_norms, dtype=torch.float64), rtol=1e-10, atol=1e-13)
    got = dict(model.named_parameters())
    for name, g in ref.items():
        torch.testing.assert_close(got[name].grad, g, rtol=1e-10, atol=1e-13, msg=lambda m: f"{name}: {m}")
    if not tie:  # padding_idx lookups give the row no gradient (tied, the head's use still does)
        assert got["emb.weight"].grad[PAD].abs().max() == 0


def test_linear_on_4d_input_and_batch_of_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(1, 3, 2, 5, dtype=torch.float64)
    loss_fn = lambda m, b: m(b["x"]).pow(2).sum((1, 2, 3))  # noqa: E731
    ref, _ = reference_dp_grads(model, [{"x": x}], loss_fn, 0.1, 1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    PrivacyEngine(model, opt, max_grad_norm=0.1, expected_batch_size=1, noise_multiplier=0.0)
    loss_fn(model, {"x": x}).mean().backward()
    opt.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-10, atol=1e-13)
    # a single example clipped to C: its norm is C·||g||/(||g|| + 1e-6), at most C and within 1e-4 of it
    norm = float(torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())))
    assert 0.1 * (1 - 1e-4) < norm <= 0.1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_clipped_sum_writes_or_accumulates_without_a_zero_filled_gradient(dtype):
    """The engine's first use of a parameter writes its clipped sum into a fresh (uninitialised) .grad:
    accumulate=False must never read ``out`` (NaN there must not survive); accumulate=True adds to it."""
    from ghostdp.engine.grads import Dense, Factored, OneHot

    gen = torch.Generator().manual_seed(0)
    B, T, d, p, rows = 3, 5, 4, 6, 9
    a, g = torch.randn(B, T, d, generator=gen, dtype=torch.float64), torch.randn(B, T, p, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, rows, (B, T), generator=gen)
    c = torch.rand(B, generator=gen, dtype=torch.float64)
    uses = [Factored(a.to(dtype), g.to(dtype)), OneHot(ids, a.to(dtype), rows), Dense(g.sum(1).to(dtype))]
    for u in uses:
        dense = u.dense().double()  # (B, *shape): the per-example gradients themselves
        want = torch.einsum("b,b...->...", c, dense)
        tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
        out = torch.full(u.shape, float("nan"), dtype=dtype)
        u.add_clipped_sum_(c.to(torch.float32 if dtype != torch.float64 else dtype), out, accumulate=False)
        torch.testing.assert_close(out.double(), want, **tol, msg=lambda m: f"{type(u).__name__} write: {m}")
        u.add_clipped_sum_(c.to(torch.float32 if dtype != torch.float64 else dtype), out, accumulate=True)
        torch.testing.assert_close(out.double(), 2 * want, **tol, msg=lambda m: f"{type(u).__name__} add: {m}")
