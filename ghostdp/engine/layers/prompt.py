"""PEFT prompt tuning (``PromptTuningConfig``): one row per example for the virtual-token table.

The trainable table is the ``nn.Embedding`` (n_virtual, d) inside PEFT's ``PromptEmbedding``, looked up at
the indices ``0..n-1``; the embedding rule clips it exactly. Every example uses each virtual token once, so
example i's gradient is its own rows: ``G_i = sum_k e_k ⊗ g_ik = g_i`` (n, d), with ``g_i`` the gradient of
example i's loss with respect to its n prompt positions (the one-hot form of ``engine/layers/embedding.py``).

What needs handling is how PEFT calls the table. Since huggingface/peft#2043 (PEFT >= 0.13),
``PeftModel.get_prompt`` runs the encoder on ``prompt_tokens[:1]``, indices of shape (1, n), and
``repeat``s the (1, n, d) output over the batch. The repeat's backward sums the examples' gradients before
any layer rule sees them, so the per-example gradients are gone; and expanding the (1, n) indices inside
the rule (as the engine does for broadcast position ids) would make the repeat produce B² rows. So while a
PrivacyEngine is attached, ``get_prompt`` of each PEFT model doing prompt tuning is replaced by one that
runs the encoder on the indices expanded to (B, n) and returns that output unrepeated: the same values as
PEFT's, with one row per example reaching the embedding rule (an instance attribute, removed at detach).

Other prompt-learning methods call their encoders with (B, n) indices already (prefix tuning, multitask
prompt tuning), or hold parameters that no rule covers (P-tuning's LSTM, multitask's task columns) and are
refused by the engine's generic check.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["attach_prompt_tuning"]


class _PromptHandle:
    """Removes the per-example ``get_prompt`` from one PEFT model (``PrivacyEngine.detach``)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def remove(self) -> None:
        self.model.__dict__.pop("get_prompt", None)


def _per_example_get_prompt(model: nn.Module):
    original = type(model).get_prompt

    def get_prompt(batch_size: int, task_ids: torch.Tensor | None = None, **kwargs):
        from peft.utils import PeftType

        config = model.active_peft_config
        encoder = model.prompt_encoder[model.active_adapter]
        weight = encoder.embedding.weight
        if config.peft_type != PeftType.PROMPT_TUNING or config.inference_mode or not weight.requires_grad:
            return original(model, batch_size, task_ids, **kwargs)
        ids = model.prompt_tokens[model.active_adapter].to(weight.device)  # (n,) = 0..n-1
        return encoder(ids.unsqueeze(0).expand(batch_size, -1))  # (B, n, d): row i is example i's own lookup

    return get_prompt


def attach_prompt_tuning(model: nn.Module) -> list[_PromptHandle]:
    """Make every PEFT prompt-tuning model inside ``model`` look its virtual tokens up per example.

    Returns one handle per patched model; ``handle.remove()`` restores PEFT's own ``get_prompt``.
    """
    try:
        from peft import PeftModel
        from peft.utils import PeftType
    except ImportError:
        return []
    handles = []
    for module in model.modules():
        if not isinstance(module, PeftModel):
            continue
        configs = getattr(module, "peft_config", {})
        if not any(c.peft_type == PeftType.PROMPT_TUNING for c in configs.values()):
            continue
        if "get_prompt" in module.__dict__:
            raise RuntimeError(
                f"{type(module).__name__}.get_prompt is already replaced on this model (another PrivacyEngine "
                "attached?). Call detach() on the other engine first."
            )
        module.get_prompt = _per_example_get_prompt(module)
        handles.append(_PromptHandle(module))
        log.debug("ghostdp: %s looks its virtual tokens up per example while the engine is attached",
                  type(module).__name__)
    return handles
