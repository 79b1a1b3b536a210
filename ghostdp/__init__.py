"""ghostdp: differentially private fine-tuning of LLMs with ghost clipping, and DP synthetic text.

Public names are imported lazily so that ``import ghostdp`` stays cheap (and ``ghostdp.accounting`` never
pulls in torch).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "PrivacyEngine": ("ghostdp.engine.privacy_engine", "PrivacyEngine"),
    "UnsupportedModuleError": ("ghostdp.engine.errors", "UnsupportedModuleError"),
    "UnclippedGradientError": ("ghostdp.engine.errors", "UnclippedGradientError"),
    "BatchMismatchError": ("ghostdp.engine.errors", "BatchMismatchError"),
    "per_example_lm_loss": ("ghostdp.engine.loss", "per_example_lm_loss"),
    "DPTrainer": ("ghostdp.integrations.hf.trainer", "DPTrainer"),
    "DPTrainingArguments": ("ghostdp.integrations.hf.args", "DPTrainingArguments"),
    "accounting": ("ghostdp.accounting", None),
    "audit": ("ghostdp.audit", None),
    "data": ("ghostdp.data", None),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'ghostdp' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
