"""Per-layer clipping rules. Importing this package registers every built-in sampler."""
from ghostdp.engine.layers import affine, embedding, layernorm, linear, lora, rmsnorm  # noqa: F401  (registers)
from ghostdp.engine.layers.registry import (
    LayerSampler,
    register_layer,
    register_matcher,
    sampler_for,
    supported_types,
)

__all__ = ["LayerSampler", "register_layer", "register_matcher", "sampler_for", "supported_types"]
