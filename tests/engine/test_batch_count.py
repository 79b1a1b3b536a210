"""Issue 10, kind 2: the examples of each backward are counted independently (the model input's batch
dimension), and a layer whose per-example leading dimension disagrees is handled exactly or refused."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ghostdp import PrivacyEngine
from ghostdp.engine.errors import BatchMismatchError
from tests.helpers import reference_dp_grads

C, E = 0.3, 4


def tiny_bert(seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=24, max_position_embeddings=32, type_vocab_size=2, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = BertForSequenceClassification(cfg).double()
    with torch.no_grad():  # non-trivial LayerNorm weights, so their per-example gradients are generic
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def bert_batch(n, T, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    mask[0, T - 2:] = 0  # one padded example
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (n,), generator=g)}


def bert_losses(model, batch, position_ids=False):
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if position_ids:
        B, T = batch["input_ids"].shape
        kw["position_ids"] = torch.arange(T).expand(B, T)
    return F.cross_entropy(model(**kw).logits, batch["labels"], reduction="none")


def engine_grads(model, batches, **loss_kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    PrivacyEngine(model, opt, max_grad_norm=C, expected_batch_size=E, noise_multiplier=0.0)
    for b in batches:
        bert_losses(model, b, **loss_kw).mean().backward()
    opt.step()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("clipping", ["auto", "ghost", "per_sample"])
def test_bert_with_broadcast_position_ids_matches_the_one_example_reference(clipping):
    """BertForSequenceClassification, fully fine-tuned, position ids (1, T) from its buffer, out of the box."""
    model = tiny_bert()
    batches = [bert_batch(4, 7, seed=1), bert_batch(3, 5, seed=2)]
    ref, norms = reference_dp_grads(model, batches, bert_losses, C, E)
    assert max(norms) > C  # clipping is active
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    PrivacyEngine(m, opt, max_grad_norm=C, expected_batch_size=E, noise_multiplier=0.0, clipping=clipping)
    for b in batches:
        bert_losses(m, b).mean().backward()
    opt.step()
    got = dict(m.named_parameters())
    assert got["bert.embeddings.position_embeddings.weight"].grad.abs().sum() > 0
    for name, g in ref.items():
        torch.testing.assert_close(got[name].grad, g, rtol=1e-8, atol=1e-10, msg=name)


def test_bert_explicit_per_example_position_ids_give_the_same_gradients():
    batches = [bert_batch(4, 7, seed=1)]
    broadcast = engine_grads(tiny_bert(), batches)
    explicit = engine_grads(tiny_bert(), batches, position_ids=True)
    for name, g in broadcast.items():
        torch.testing.assert_close(explicit[name], g, rtol=1e-12, atol=1e-14, msg=name)


class SharedInputModel(nn.Module):
    """A Linear applied to a learned-free constant input of leading dim 1, broadcast over the batch."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 5)
        self.prefix = nn.Linear(3, 5)
        self.register_buffer("const", torch.randn(1, 4, 3))

    def forward(self, x):  # x (B, 4, 5)
        return (self.inp(x) + self.prefix(self.const)).sum((1, 2))


class SequenceFirstModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 1)

    def forward(self, x):  # x (B, T, 5) -> a layer sees (T, B, 5)
        h = self.a(x.transpose(0, 1))
        return self.b(h).transpose(0, 1).sum((1, 2))


class FlattenedTokensModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 1)

    def forward(self, x):  # x (B, T, 5) -> the layer sees (B*T, 5): one row per token
        return self.a(x.reshape(-1, 5)).view(x.shape[0], -1).sum(1)


@pytest.mark.parametrize(
    "model_cls, layer, lead",
    [(SharedInputModel, "prefix", 1), (SequenceFirstModel, "a", 6), (FlattenedTokensModel, "a", 24)],
)
def test_layer_without_one_example_per_row_is_refused_naming_it(model_cls, layer, lead):
    torch.manual_seed(0)
    model = model_cls()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    PrivacyEngine(model, opt, max_grad_norm=1.0, expected_batch_size=4, noise_multiplier=1.0)
    x = torch.randn(4, 6 if model_cls is not SharedInputModel else 4, 5)
    with pytest.raises(BatchMismatchError, match=rf"Layer '{layer}'.*leading dimension {lead} is not the model's "
                                                 r"4 examples.*'?positional argument 0.*Fix"):
        model(x).sum().backward()


def test_two_forwards_in_one_backward_are_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    PrivacyEngine(model, opt, max_grad_norm=1.0, expected_batch_size=4, noise_multiplier=1.0)
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    with pytest.raises(BatchMismatchError, match="two different forward calls"):
        (model(a).sum() + model(b).sum()).backward()


def test_embedding_called_alone_with_a_batch_still_trains():
    """Layers called outside a model forward have no model count; their own batch is used (as before)."""
    torch.manual_seed(0)
    outer = nn.Sequential(nn.Embedding(10, 4))
    opt = torch.optim.SGD(outer.parameters(), lr=0.0)
    PrivacyEngine(outer, opt, max_grad_norm=1e9, expected_batch_size=1, noise_multiplier=0.0,
                  loss_reduction="sum")
    ids = torch.tensor([[1, 2, 2], [3, 1, 0]])
    outer[0](ids).sum().backward()
    opt.step()
    expected = torch.zeros(10, 4)
    for i in ids.flatten():
        expected[i] += 1
    torch.testing.assert_close(outer[0].weight.grad, expected)
