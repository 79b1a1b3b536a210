"""Thin integrations over the engine: Hugging Face Trainer, data, collators, synthesis, evaluation.

Names are imported lazily: ``DPTrainer`` pulls in ``transformers.Trainer``.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "DPTrainer": "ghostdp.integrations.trainer",
    "DPTrainingArguments": "ghostdp.integrations.dp_args",
    "PrivacyPlan": "ghostdp.integrations.trainer",
    "PrivacyBudgetExhaustedError": "ghostdp.integrations.trainer",
    "PrefixLMCollator": "ghostdp.integrations.collators",
    "PromptTemplate": "ghostdp.integrations.prompts",
    "load_causal_lm": "ghostdp.integrations.models",
    "load_labelled_texts": "ghostdp.integrations.text_data",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'ghostdp.integrations' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
