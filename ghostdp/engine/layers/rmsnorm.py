"""RMSNorm weights: ``torch.nn.RMSNorm`` and the Hugging Face Llama-style RMSNorm classes.

Hugging Face's Llama/Mistral/Qwen RMSNorm compute ``w * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(x.dtype)``;
the per-example weight gradient is ``sum_t g_it ⊙ x̂_it`` with that exact ``x̂``. Other Hugging Face
``*RMSNorm`` classes are accepted only when their ``forward`` is, token for token, the Llama one
(``# Copied from`` copies are), so a variant such as Gemma's ``(1 + w)`` scaling is never mistaken for it.
"""
from __future__ import annotations

import inspect
import logging
import textwrap
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from ghostdp.engine.layers.affine import affine
from ghostdp.engine.layers.registry import LayerRule, register_layer, register_matcher

log = logging.getLogger(__name__)


@register_layer(nn.RMSNorm)
class TorchRMSNormRule(LayerRule):
    param_names = ("weight",)

    def forward(self, module: nn.RMSNorm, record, x):
        xhat = F.rms_norm(x, module.normalized_shape, None, module.eps)
        return affine(xhat, module.weight, None, record)


class LlamaRMSNormRule(LayerRule):
    param_names = ("weight",)

    def forward(self, module, record, x):
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        return affine(h.to(dtype), module.weight, None, record)


_LLAMA_STYLE = LlamaRMSNormRule()


def _hf_llama_rmsnorm():
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
    except ImportError:  # transformers missing: nothing to match
        return None
    return LlamaRMSNorm


@lru_cache(maxsize=None)
def _forward_source(cls: type) -> str | None:
    try:
        src = textwrap.dedent(inspect.getsource(cls.forward))
    except (OSError, TypeError):
        return None
    return "\n".join(line.split("#")[0].rstrip() for line in src.splitlines() if line.strip())


@register_matcher
def match_llama_style(module: nn.Module) -> LayerRule | None:
    llama = _hf_llama_rmsnorm()
    cls = type(module)
    if llama is None or not cls.__name__.endswith("RMSNorm") or not hasattr(module, "variance_epsilon"):
        return None
    if cls is llama or _forward_source(cls) == _forward_source(llama):
        return _LLAMA_STYLE
    return None
