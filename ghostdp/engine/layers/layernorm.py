"""nn.LayerNorm: ``y = x̂ ⊙ w + b`` with ``x̂ = (x - mean) / sqrt(var + eps)`` over normalized_shape."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ghostdp.engine.layers.affine import affine
from ghostdp.engine.layers.registry import LayerRule, register_layer


@register_layer(nn.LayerNorm)
class LayerNormRule(LayerRule):
    def forward(self, module: nn.LayerNorm, record, x):
        xhat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
        return affine(xhat, module.weight, module.bias, record)
