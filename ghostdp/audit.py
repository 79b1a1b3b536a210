"""Empirical privacy audit in one training run (Steinke, Nasr, Jagielski, NeurIPS 2023): public names.

    >>> from ghostdp.audit import epsilon_lower_bound
    >>> epsilon_lower_bound(num_guesses=100, num_correct=50, confidence=0.95, delta=0.0, num_canaries=200)
    0.0

The bound math (``epsilon_lower_bound``, ``p_value``) does not import torch; the training-run audit
(``audit_model``, canaries, scoring, the synthetic-data audit, reports) is imported on first use. The
implementation lives in ``ghostdp.integrations.audit``.
"""
from __future__ import annotations

import importlib

from ghostdp.integrations.audit.bounds import binomial_upper_tail, epsilon_lower_bound, p_value
from ghostdp.integrations.audit.guesses import GuessResult, best_guesses, count_correct

_LAZY = {
    "AuditConfig": "ghostdp.integrations.audit.run",
    "AuditResult": "ghostdp.integrations.audit.run",
    "audit_model": "ghostdp.integrations.audit.run",
    "Canaries": "ghostdp.integrations.audit.canaries",
    "make_canaries": "ghostdp.integrations.audit.canaries",
    "audit_synthetic_text": "ghostdp.integrations.audit.synthetic",
    "write_report": "ghostdp.integrations.audit.report",
}

__all__ = sorted(["GuessResult", "best_guesses", "binomial_upper_tail", "count_correct", "epsilon_lower_bound", "p_value", *_LAZY])


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'ghostdp.audit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
