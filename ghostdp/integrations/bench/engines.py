"""Engine names of the benchmark: ``non-private``, ``ghostdp-<clipping>-<impl>``, ``opacus-<mode>``.

- ``non-private``: ``loss.backward(); optimizer.step()``.
- ``ghostdp-<clipping>-<impl>``: :class:`ghostdp.PrivacyEngine` with ``clipping`` auto / ghost / per_sample and
  ``impl`` torch (the PyTorch twins) or triton (fused kernels, CUDA only).
- ``opacus-hooks`` / ``opacus-ghost``: Opacus' ``PrivacyEngine.make_private`` with that ``grad_sample_mode``
  (see :mod:`ghostdp.integrations.bench.opacus_adapter`).

Every private engine runs with the same C = :data:`MAX_GRAD_NORM` and sigma = :data:`NOISE_MULTIPLIER`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

CLIPPINGS = ("auto", "ghost", "per_sample")
IMPLS = ("torch", "triton")
OPACUS_MODES = ("hooks", "ghost")
NON_PRIVATE = "non-private"
MAX_GRAD_NORM = 1.0
NOISE_MULTIPLIER = 1.0
LR = 1e-5


@dataclass(frozen=True)
class EngineSpec:
    """A parsed engine name: ``family`` plus ghostdp's ``clipping`` / ``impl`` or Opacus' ``opacus_mode``."""

    name: str
    family: Literal["non-private", "ghostdp", "opacus"]
    clipping: str | None = None
    impl: str | None = None
    opacus_mode: str | None = None


def engine_names() -> list[str]:
    """Every engine name :func:`parse_engine` accepts."""
    ghost = [f"ghostdp-{c}-{i}" for c in CLIPPINGS for i in IMPLS]
    return [NON_PRIVATE, *ghost, *(f"opacus-{m}" for m in OPACUS_MODES)]


def parse_engine(name: str) -> EngineSpec:
    if name == NON_PRIVATE:
        return EngineSpec(name, "non-private")
    parts = name.split("-")
    if len(parts) == 3 and parts[0] == "ghostdp" and parts[1] in CLIPPINGS and parts[2] in IMPLS:
        return EngineSpec(name, "ghostdp", clipping=parts[1], impl=parts[2])
    if len(parts) == 2 and parts[0] == "opacus" and parts[1] in OPACUS_MODES:
        return EngineSpec(name, "opacus", opacus_mode=parts[1])
    raise ValueError(f"unknown engine {name!r}; choose from: {', '.join(engine_names())}")


def default_engines(device: str) -> list[str]:
    """Non-private, ghostdp's three clipping modes (Triton kernels and twins on CUDA, twins on CPU), Opacus."""
    impls = ("triton", "torch") if device.startswith("cuda") else ("torch",)
    ghost = [f"ghostdp-{c}-{i}" for i in impls for c in CLIPPINGS]
    return [NON_PRIVATE, *ghost, "opacus-hooks", "opacus-ghost"]
