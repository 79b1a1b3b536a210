"""The registry of layer types the engine can clip, one file per type (Opacus calls these grad samplers;
here they are per-layer *rules*, so as not to be confused with the Poisson batch sampler).

A ``LayerRule`` knows, for one module type, which of its parameters it clips and how to run the
module's forward so that, in backward, the per-example gradient of each parameter is handed to the
engine (as a :mod:`ghostdp.engine.grads` representation) instead of being summed by autograd.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from ghostdp.engine.errors import UnsupportedModuleError

class Recorder:
    """Handed to a layer's forward. Its backward calls ``record(param, per_example_grad)`` per parameter.

    ``anchor`` is a scalar that requires grad: layers pass their parameters into their autograd Function
    detached and pass the anchor instead, so the output requires grad while autograd never reaches (or
    accumulates into) a parameter. A parameter that still receives an autograd gradient is therefore
    used outside a clipped layer, and the engine refuses it.
    """

    def __init__(self, record: Callable, anchor: torch.Tensor):
        self._record, self.anchor = record, anchor

    def __call__(self, param: nn.Parameter, grad) -> None:
        self._record(param, grad)


class LayerRule:
    """How one module type is clipped. Subclasses set ``param_names`` and implement ``forward``."""

    param_names: tuple[str, ...] = ("weight", "bias")
    # Whether an input with leading dimension 1, broadcast over a model batch of B, may be expanded to B rows
    # (exact when the output is only ever broadcast: embeddings). Other rules refuse such inputs.
    expands_broadcast_input: bool = False

    def validate(self, module: nn.Module, qualname: str) -> None:
        """Raise ``UnsupportedModuleError`` for configurations of this type that cannot be clipped."""

    def forward(self, module: nn.Module, record: Recorder, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError


_REGISTRY: dict[type, LayerRule] = {}
# Functions module -> rule | None, for families matched by behaviour rather than by class (HF RMSNorms).
_MATCHERS: list[Callable[[nn.Module], "LayerRule | None"]] = []


def register_layer(*module_types: type) -> Callable[[type[LayerRule]], type[LayerRule]]:
    """Class decorator: ``@register_layer(nn.Linear)`` makes that rule handle those exact types."""

    def wrap(cls: type[LayerRule]) -> type[LayerRule]:
        for t in module_types:
            if t in _REGISTRY:
                raise ValueError(f"{t.__qualname__} already has a rule ({type(_REGISTRY[t]).__name__})")
            _REGISTRY[t] = cls()
        return cls

    return wrap


def register_matcher(fn: Callable[[nn.Module], "LayerRule | None"]):
    """Register a function that claims modules by behaviour (it must be exact about what it accepts)."""
    _MATCHERS.append(fn)
    return fn


def supported_types() -> list[str]:
    names = sorted(f"{t.__module__}.{t.__qualname__}" for t in _REGISTRY)
    return names + ["Hugging Face *RMSNorm classes with the Llama forward", "PEFT LoRA Linear (A and B)"]


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule registered for ``type(module)``, or for a base class if the subclass keeps its forward.

    A subclass that overrides ``forward`` may use its parameters differently, so it is not matched.
    """
    cls = type(module)
    if cls in _REGISTRY:
        return _REGISTRY[cls]
    for base in cls.__mro__[1:]:
        if base in _REGISTRY and cls.forward is base.forward:
            return _REGISTRY[base]
    for match in _MATCHERS:
        rule = match(module)
        if rule is not None:
            return rule
    return None


def unsupported_error(param_name: str, module_name: str, module: nn.Module, reason: str | None = None) -> UnsupportedModuleError:
    why = reason or (
        f"ghostdp has no per-example gradient rule for {type(module).__qualname__}"
    )
    return UnsupportedModuleError(
        f"Trainable parameter '{param_name}' in module '{module_name or '<root>'}' "
        f"({type(module).__qualname__}) cannot be clipped per example: {why}. Training it would add an "
        "unclipped gradient and break the differential-privacy guarantee. Ways out: freeze it "
        "(param.requires_grad_(False)); replace the module with a supported one; or register a rule "
        "with ghostdp.engine.layers.register_layer. Supported types: " + ", ".join(supported_types())
    )


def iter_owned_trainable(module: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
    for name, p in module._parameters.items():
        if p is not None and p.requires_grad:
            yield name, p
