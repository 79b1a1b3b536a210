"""nn.Embedding: ``G_i = sum_t e_{x_it} ⊗ g_it`` (one-hot input), padding_idx lookups get no gradient.

Norms: "ghost" uses ``sum_{t,s} [x_it = x_is] (g_it·g_is)``; "instantiated" sums g per distinct id of
each example (exact, O(B·T·d), no (rows, d) buffer per example).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ghostdp.engine.grads import OneHot
from ghostdp.engine.layers.registry import LayerRule, register_layer, unsupported_error


class _EmbeddingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, anchor, params, padding_idx, record):
        (weight,) = params  # a tuple, so that autograd does not see the parameter as an input
        ctx.save_for_backward(ids)
        ctx.weight, ctx.padding_idx, ctx.record = weight, padding_idx, record
        return F.embedding(ids, weight.detach(), padding_idx)

    @staticmethod
    def backward(ctx, g):
        (ids,) = ctx.saved_tensors
        B = g.shape[0]
        ids2 = ids.reshape(B, -1)  # (B, T)
        g3 = g.reshape(B, -1, g.shape[-1])  # (B, T, d)
        if ctx.padding_idx is not None:
            g3 = g3.masked_fill((ids2 == ctx.padding_idx).unsqueeze(-1), 0)
        ctx.record(ctx.weight, OneHot(ids2, g3, ctx.weight.shape[0]))
        return None, None, None, None, None


@register_layer(nn.Embedding)
class EmbeddingRule(LayerRule):
    param_names = ("weight",)
    expands_broadcast_input = True  # ids (1, T) shared by the batch: G_i = sum_t e_{x_t} ⊗ g_it, exactly

    def validate(self, module: nn.Embedding, qualname: str) -> None:
        reason = None
        if module.max_norm is not None:
            reason = "max_norm renormalises rows in place during forward"
        elif module.scale_grad_by_freq:
            reason = "scale_grad_by_freq scales each gradient by batch-wide counts, mixing examples"
        elif module.sparse:
            reason = "sparse gradients are not supported"
        if reason:
            raise unsupported_error("weight", qualname, module, reason)

    def forward(self, module: nn.Embedding, record, ids):
        if ids.dim() < 1:
            raise ValueError("ghostdp needs a batch dimension first on embedding inputs")
        padding_idx = module.padding_idx
        if padding_idx is not None and padding_idx < 0:
            padding_idx += module.num_embeddings
        return _EmbeddingFn.apply(ids, record.anchor, (module.weight,), padding_idx, record)
