"""PEFT LoRA ``Linear``: its ``lora_A`` and ``lora_B`` are plain ``nn.Linear`` modules, clipped by the
linear rule; the frozen ``base_layer`` costs nothing. With rank r the per-example gradients are
``(r, d)`` and ``(p, r)``, so the engine keeps them instantiated (``Dense``) whenever that is smaller than
the factors (r < T), which is the common case.

What this file adds is a check of LoRA variants the linear rule does not cover: DoRA's magnitude vector
and LoRA embeddings hold trainable parameters outside ``nn.Linear`` and would be refused by the generic
check anyway; here the error says which LoRA option to turn off.
"""
from __future__ import annotations

from torch import nn

from ghostdp.engine.errors import UnsupportedModuleError


def check_peft_model(model: nn.Module) -> None:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        dora = getattr(module, "use_dora", {})
        if any(dora.values()) and any(p.requires_grad for p in module.lora_magnitude_vector.parameters()):
            raise UnsupportedModuleError(
                f"LoRA layer '{name}' uses DoRA (use_dora=True): its magnitude vector is a trainable "
                "parameter ghostdp cannot clip per example, which would break the DP guarantee. Set "
                "use_dora=False in LoraConfig, or freeze lora_magnitude_vector."
            )
        if any(p.requires_grad for p in module.lora_embedding_A.parameters()):
            raise UnsupportedModuleError(
                f"LoRA layer '{name}' adapts an embedding (lora_embedding_A/B are raw parameters "
                "ghostdp cannot clip per example). Remove the embedding from target_modules, or train the "
                "embedding itself (modules_to_save) which ghostdp clips exactly."
            )
