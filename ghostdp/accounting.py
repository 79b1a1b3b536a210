"""Public privacy accounting API: epsilon, noise calibration, and the step ledger.

    >>> import ghostdp.accounting as acc
    >>> sigma = acc.calibrate_noise_multiplier(target_epsilon=3.0, delta=1e-5, sample_rate=256 / 60000, steps=14062)
    >>> acc.epsilon(noise_multiplier=sigma, sample_rate=256 / 60000, steps=14062, delta=1e-5) <= 3.0
    True

The implementation (and the references) live in ``ghostdp.engine.accounting``; it does not import torch.
"""
from ghostdp.engine.accounting import (
    DEFAULT_RDP_ORDERS,
    AccountantName,
    PrivacyAccountant,
    calibrate_noise_multiplier,
    compute_rdp,
    epsilon,
    rdp_to_epsilon,
    single_step_epsilon,
)

__all__ = [
    "AccountantName",
    "DEFAULT_RDP_ORDERS",
    "PrivacyAccountant",
    "calibrate_noise_multiplier",
    "compute_rdp",
    "epsilon",
    "rdp_to_epsilon",
    "single_step_epsilon",
]
