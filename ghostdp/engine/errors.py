"""Errors raised by the engine. Each says what is wrong, why it matters for privacy, and the ways out."""


class UnsupportedModuleError(TypeError):
    """A trainable parameter lives in a layer the engine cannot clip per example.

    Training it anyway would add an unclipped, unbounded contribution to the gradient and void the
    DP guarantee, so the engine refuses at construction (or at the first backward, for a parameter
    used outside its module's forward).
    """


class BatchMismatchError(RuntimeError):
    """Hooked layers saw different batch sizes in one backward pass (per-example norms would misalign)."""
