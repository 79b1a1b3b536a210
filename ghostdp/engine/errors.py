"""Errors raised by the engine. Each says what is wrong, why it matters for privacy, and the ways out."""


class UnsupportedModuleError(TypeError):
    """A trainable parameter lives in a layer the engine cannot clip per example.

    Training it anyway would add an unclipped, unbounded contribution to the gradient and void the
    DP guarantee, so the engine refuses at construction (or at the first backward, for a parameter
    used outside its module's forward).
    """


class BatchMismatchError(RuntimeError):
    """Hooked layers saw different batch sizes in one backward pass (per-example norms would misalign)."""


class UnclippedGradientError(RuntimeError):
    """An optimizer step would apply a gradient that did not come from the engine's clipped sum plus noise.

    Raised before the step (or during the backward that would form it), naming the parameter and how its
    ``.grad`` came to be: a parameter unfrozen after attach, one added to the optimizer afterwards, a
    ``.grad`` written or changed by hand or by another library's hook, one left over from before attach,
    or an engine-clipped parameter stepped by a second optimizer. Applying such a gradient would release
    an unclipped or un-noised function of the data and void the DP guarantee.
    """
