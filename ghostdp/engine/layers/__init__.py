"""Per-layer clipping rules. Importing this package registers every built-in rule."""
from ghostdp.engine.layers import (  # noqa: F401  (registers)
    affine,
    embedding,
    layernorm,
    linear,
    lora,
    prompt,
    rmsnorm,
)
from ghostdp.engine.layers.registry import (
    LayerRule,
    register_layer,
    register_matcher,
    rule_for,
    supported_types,
)

__all__ = ["LayerRule", "register_layer", "register_matcher", "rule_for", "supported_types"]
