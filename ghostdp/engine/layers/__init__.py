"""Per-layer clipping rules. Importing this package registers every built-in rule."""
from ghostdp.engine.layers import affine, embedding, layernorm, linear, lora, rmsnorm  # noqa: F401  (registers)
from ghostdp.engine.layers.registry import (
    LayerRule,
    register_layer,
    register_matcher,
    rule_for,
    supported_types,
)

__all__ = ["LayerRule", "register_layer", "register_matcher", "rule_for", "supported_types"]
