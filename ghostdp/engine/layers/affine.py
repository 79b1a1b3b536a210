"""The elementwise affine step shared by normalisation layers: ``y = x̂ ⊙ w + b``.

The normalisation ``x̂`` runs through autograd as usual; ``_AffineFn`` returns the gradient w.r.t. ``x̂``
and records the per-example gradients ``sum_t g_it ⊙ x̂_it`` (weight) and ``sum_t g_it`` (bias). They are
only as large as the weight, so they are instantiated (``Dense``).
"""
from __future__ import annotations

import torch

from ghostdp.engine.grads import Dense


class _AffineFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xhat, anchor, params, record):
        weight, bias = params  # a tuple, so that autograd does not see the parameters as inputs
        ctx.save_for_backward(xhat)
        ctx.weight, ctx.bias, ctx.record = weight, bias, record
        y = xhat * weight.detach()
        return y if bias is None else y + bias.detach()

    @staticmethod
    def backward(ctx, g):
        (xhat,) = ctx.saved_tensors
        weight, bias = ctx.weight, ctx.bias
        grad_xhat = None
        if ctx.needs_input_grad[0]:
            grad_xhat = (g * weight.detach().to(g.dtype)).to(xhat.dtype)
        B = g.shape[0]
        if weight.requires_grad:
            per_ex = (g * xhat).reshape(B, -1, *weight.shape).sum(1)  # (B, *w)
            ctx.record(weight, Dense(per_ex))
        if bias is not None and bias.requires_grad:
            ctx.record(bias, Dense(g.reshape(B, -1, *bias.shape).sum(1)))
        return grad_xhat, None, None, None


def affine(xhat: torch.Tensor, weight, bias, record) -> torch.Tensor:
    return _AffineFn.apply(xhat, record.anchor, (weight, bias), record)
