"""Thin integrations over the engine, one subpackage per product:

- ``hf``: the Hugging Face ``Trainer`` drop-in (``DPTrainer``, ``DPTrainingArguments``, collators, prompts,
  model loading);
- ``synthetic``: the DP synthetic-text app (data, training through ``hf``, synthesis, evaluation, report);
- ``bench``: the benchmark harness (ghostdp vs non-private vs Opacus).

The engine never imports this package; ``synthetic`` and ``bench`` may use ``hf``, never the reverse.
Names are imported lazily: ``DPTrainer`` pulls in ``transformers.Trainer``.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "DPTrainer": "ghostdp.integrations.hf.trainer",
    "DPTrainingArguments": "ghostdp.integrations.hf.args",
    "PrivacyPlan": "ghostdp.integrations.hf.trainer",
    "PrivacyBudgetExhaustedError": "ghostdp.integrations.hf.trainer",
    "PrefixLMCollator": "ghostdp.integrations.hf.collators",
    "PromptTemplate": "ghostdp.integrations.hf.prompts",
    "load_causal_lm": "ghostdp.integrations.hf.models",
    "load_labelled_texts": "ghostdp.integrations.synthetic.text_data",
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
