"""The Hugging Face drop-in: ``DPTrainer`` / ``DPTrainingArguments``, Prefix-LM collators and prompt
templates, and the model loader (hub, local folder or GGUF file).

This subpackage depends on the engine only; the synthetic-text app and the bench harness may use it, never
the reverse. Names are imported lazily: ``DPTrainer`` pulls in ``transformers.Trainer``.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "DPTrainer": "ghostdp.integrations.hf.trainer",
    "PrivacyBudgetExhaustedError": "ghostdp.integrations.hf.trainer",
    "PrivacyPlan": "ghostdp.integrations.hf.trainer",
    "DPTrainingArguments": "ghostdp.integrations.hf.args",
    "CollatorConfig": "ghostdp.integrations.hf.collators",
    "PrefixLMCollator": "ghostdp.integrations.hf.collators",
    "PromptTemplate": "ghostdp.integrations.hf.prompts",
    "load_causal_lm": "ghostdp.integrations.hf.models",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'ghostdp.integrations.hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
