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
from typing import TYPE_CHECKING

from ghostdp.integrations.audit.bounds import (
    binomial_upper_tail,
    epsilon_lower_bound,
    p_value,
)
from ghostdp.integrations.audit.guesses import GuessResult, best_guesses, count_correct

if TYPE_CHECKING:  # imported on first use (they need torch)
    from ghostdp.integrations.audit.canaries import Canaries, make_canaries
    from ghostdp.integrations.audit.report import write_report
    from ghostdp.integrations.audit.run import AuditConfig, AuditResult, audit_model
    from ghostdp.integrations.audit.synthetic import audit_synthetic_text

_LAZY = {
    "AuditConfig": "ghostdp.integrations.audit.run",
    "AuditResult": "ghostdp.integrations.audit.run",
    "audit_model": "ghostdp.integrations.audit.run",
    "Canaries": "ghostdp.integrations.audit.canaries",
    "make_canaries": "ghostdp.integrations.audit.canaries",
    "audit_synthetic_text": "ghostdp.integrations.audit.synthetic",
    "write_report": "ghostdp.integrations.audit.report",
}

__all__ = [
    "AuditConfig", "AuditResult", "Canaries", "GuessResult", "audit_model", "audit_synthetic_text", "best_guesses",
    "binomial_upper_tail", "count_correct", "epsilon_lower_bound", "make_canaries", "p_value", "write_report",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'ghostdp.audit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
