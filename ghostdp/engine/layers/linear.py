"""nn.Linear: weight per-example gradient ``G_i = g_i^T a_i`` kept factored, bias ``sum_t g_it``.

Inputs of any rank ``(B, ..., d)`` are viewed as ``(B, T, d)``; a 2-D input is ``T = 1``.
The forward runs through ``_LinearFn`` whose backward returns the input gradient only: the parameters
enter it detached (the engine's anchor tensor makes the output require grad), so autograd never forms
an unclipped weight gradient; the engine forms the clipped one from what is recorded here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ghostdp.engine.grads import Dense, Factored
from ghostdp.engine.layers.registry import LayerRule, register_layer


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, anchor, module, record):
        ctx.save_for_backward(x)
        ctx.module, ctx.record = module, record
        return F.linear(x, module.weight.detach(), None if module.bias is None else module.bias.detach())

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        weight, bias = ctx.module.weight, ctx.module.bias
        grad_x = g.matmul(weight.detach().to(g.dtype)) if ctx.needs_input_grad[0] else None
        B = g.shape[0]
        g3 = g.reshape(B, -1, g.shape[-1])  # (B, T, p)
        if weight.requires_grad:
            ctx.record(weight, Factored(x.reshape(B, -1, x.shape[-1]), g3))  # a (B, T, d), g (B, T, p)
        if bias is not None and bias.requires_grad:
            ctx.record(bias, Dense(g3.sum(1)))  # (B, p)
        return grad_x, None, None, None


@register_layer(nn.Linear)
class LinearRule(LayerRule):
    def forward(self, module: nn.Linear, record, x):
        if x.dim() < 2:
            raise ValueError(
                f"ghostdp needs a batch dimension first; {type(module).__name__} got an input of shape "
                f"{tuple(x.shape)}. Add a leading batch dimension (x.unsqueeze(0))."
            )
        return _LinearFn.apply(x, record.anchor, module, record)
