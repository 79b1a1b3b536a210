"""Gaussian noise for DP-SGD: ``grad <- scale * (grad + noise_std * z)``, z ~ N(0, I).

The noise contract is *distributional and reproducible per seed*, not bit-exact across
implementations:

- Triton (:func:`add_noise_` with impl "triton"): z is generated inside the kernel from Philox,
  keyed by ``(seed, flat element index)`` (see ``_noise_triton.philox_normal``); no noise tensor
  is allocated. The same seed, shape and device reproduce z exactly; distinct seeds give
  independent streams.
- Twin (impl "torch"): ``torch.randn`` in fp32 from a ``torch.Generator`` seeded with ``seed``.
  Also reproducible per seed, but a different stream from the kernel's.

Both are N(0, 1) per coordinate, independent across coordinates, and computed in fp32 (fp64 for a
float64 ``grad``), so the DP guarantee depends only on ``noise_std`` and the seed being secret.

Seeds: the noise is only as private as its seed is secret. Pass ``seed=None`` to draw a fresh
seed from the OS (``secrets``); pass an int to reproduce a run (e.g. from a secret base seed
through :func:`noise_seed`, which gives every (step, parameter) its own stream). Philox is a
counter-based generator, not a cryptographic one, like every GPU generator in common use; its
outputs at floating-point resolution are the same caveat as ``torch.randn``'s (Mironov, CCS 2012).
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets

import torch

from ghostdp.kernels.dispatch import TWIN_DTYPES, resolve_impl, run_kernel

logger = logging.getLogger(__name__)

SEED_BITS = 63  # seeds are ints in [0, 2**63): a Triton int64 argument and a torch seed


def noise_seed(base_seed: int, *keys: int | str) -> int:
    """A 63-bit seed for one noise stream, derived from a secret ``base_seed`` and ``keys``.

    ``noise_seed(base, step, param_index)`` gives every step and parameter its own Philox key, so
    their noise is independent, and a run with the same ``base`` reproduces. The derivation is
    BLAKE2b over the canonical text of the arguments, so nearby keys give unrelated seeds.
    """
    if not isinstance(base_seed, int) or isinstance(base_seed, bool):
        raise TypeError(f"noise_seed: base_seed must be an int, got {type(base_seed).__name__}.")
    for key in keys:
        if not isinstance(key, (int, str)) or isinstance(key, bool):
            raise TypeError(f"noise_seed: keys must be ints or strings, got {key!r} of type "
                            f"{type(key).__name__}.")
    text = "\x1f".join([str(base_seed)] + [f"{type(k).__name__}:{k}" for k in keys])
    digest = hashlib.blake2b(text.encode(), digest_size=8, person=b"ghostdp-noise").digest()
    return int.from_bytes(digest, "little") >> (64 - SEED_BITS)


def fresh_seed() -> int:
    """A secret seed from the operating system's CSPRNG."""
    return secrets.randbits(SEED_BITS)


def check_noise_args(noise_std: float, scale: float, seed: int | None, op: str) -> int | None:
    """Validate the noise arguments; return the seed to use (fresh when ``seed`` is None)."""
    if not isinstance(noise_std, (int, float)) or not math.isfinite(noise_std) or noise_std < 0:
        raise ValueError(f"{op}: noise_std must be a finite number >= 0, got {noise_std!r}. It is "
                         "the standard deviation sigma * C of the Gaussian mechanism.")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be a finite number, got {scale!r} (e.g. 1 / (q N), "
                         "the inverse expected batch size).")
    if seed is None:
        if noise_std == 0:
            return None
        logger.debug("%s: drew a fresh secret noise seed (not logged)", op)
        return fresh_seed()
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**SEED_BITS:
        raise ValueError(f"{op}: seed must be an int in [0, 2**{SEED_BITS}), got {seed!r}. Derive "
                         "one with ghostdp.kernels.noise_seed(base_seed, step, param_index), or "
                         "pass seed=None for a fresh secret seed.")
    return seed


def randn_twin(shape: tuple[int, ...], *, seed: int, device: torch.device) -> torch.Tensor:
    """The twin's noise: fp32 N(0, 1) from a ``torch.Generator`` seeded with ``seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32, device=device)


#: Elements of noise the twin draws at a time (a multiple of 16, see :func:`_noise_chunks`): 256 KiB of
#: fp32, so z stays in cache between being drawn and being added, and no gradient-sized z is allocated.
NOISE_CHUNK = 1 << 16


def _noise_chunks(n: int) -> list[tuple[int, int]]:
    """[start, stop) ranges that draw, chunk after chunk from one generator, the same normals as one
    ``torch.randn(n)`` call.

    PyTorch's CPU ``normal_`` on a contiguous fp32 tensor of n >= 16 elements draws n uniforms in order,
    transforms them 16 at a time (Box-Muller), and redraws the last 16 when 16 does not divide n. Chunks
    of a multiple of 16, with a last chunk of at least 16, therefore reproduce the stream exactly
    (tests/kernels/test_kernel_noise.py checks it against :func:`randn_twin`).
    """
    bounds, start = [], 0
    while start < n:
        stop = start + NOISE_CHUNK
        if n - stop < 16:
            stop = n
        bounds.append((start, stop))
        start = stop
    return bounds


def add_noise_torch_(grad: torch.Tensor, *, noise_std: float, seed: int | None,
                     scale: float = 1.0) -> torch.Tensor:
    """Twin of :func:`add_noise_`: ``grad <- scale * (grad + noise_std * z)`` via torch.randn.

    In place for fp32/fp64 gradients (no gradient-sized copy); fp16/bf16 ones are computed in fp32 and
    rounded once. On CPU, z is drawn in chunks (:func:`_noise_chunks`) that reproduce
    :func:`randn_twin`'s stream exactly; elsewhere in one call.
    """
    compute = torch.float64 if grad.dtype == torch.float64 else torch.float32
    y = grad if grad.dtype == compute else grad.to(compute)
    if noise_std > 0 and grad.device.type == "cpu" and grad.numel() > NOISE_CHUNK:
        flat = y if y.is_contiguous() else y.contiguous()
        flat_view = flat.view(-1)
        gen = torch.Generator(device=grad.device)
        gen.manual_seed(seed)
        buf = torch.empty(NOISE_CHUNK + 16, dtype=torch.float32, device=grad.device)
        for start, stop in _noise_chunks(flat_view.numel()):
            z = torch.randn(stop - start, generator=gen, out=buf[: stop - start]).to(compute)
            block = flat_view[start:stop]
            block.add_(z.mul_(noise_std))  # the same two roundings as below, element for element
            if scale != 1.0:
                block.mul_(scale)
        if flat is not grad:
            grad.copy_(flat)
        return grad
    if noise_std > 0:
        z = randn_twin(tuple(grad.shape), seed=seed, device=grad.device).to(compute)
        y.add_(z.mul_(noise_std))  # not add_(alpha=): that may fuse into one FMA and round differently
    if scale != 1.0:
        y.mul_(scale)
    if y is not grad:
        grad.copy_(y)
    return grad


def add_noise_(grad: torch.Tensor, *, noise_std: float, seed: int | None, scale: float = 1.0,
               impl: str = "auto") -> torch.Tensor:
    """In place: ``grad <- scale * (grad + noise_std * z)``, z ~ N(0, I) of grad's shape.

    For parameters whose clipped sum is formed outside :func:`linear_clipped_sum` (embeddings,
    norms, biases). The sum and the noise are computed in fp32 (fp64 for float64 ``grad``) and
    rounded once into grad's dtype; a bf16 ``grad`` therefore stores a rounded noisy value, so keep
    DP gradients in fp32 where that rounding matters.

    Args:
        grad: the clipped, summed gradient (any shape; non-contiguous is handled).
        noise_std: sigma * C, the standard deviation of each noise coordinate (0: no noise and no
            random numbers drawn, only the scaling).
        seed: Philox key (Triton) or torch.Generator seed (twin), an int in [0, 2**63); None draws
            a fresh secret seed. See the module docstring for the reproducibility contract.
        scale: applied after the noise, e.g. 1 / (expected batch size).
        impl: "auto" | "triton" | "torch" (see :mod:`ghostdp.kernels.dispatch`).

    Returns:
        ``grad``, modified in place.
    """
    op = "add_noise_"
    if not isinstance(grad, torch.Tensor):
        raise TypeError(f"{op}: grad must be a torch.Tensor, got {type(grad).__name__}.")
    if grad.dtype not in TWIN_DTYPES:
        raise TypeError(f"{op}: grad has dtype {grad.dtype}; noise is added to float16, bfloat16, "
                        "float32 or float64 gradients.")
    seed = check_noise_args(noise_std, scale, seed, op)
    # The elementwise kernel reads float64 too (it computes in fp64 then).
    which = resolve_impl(impl, grad, op=op, kernel_dtypes=TWIN_DTYPES)
    if which == "torch":
        return add_noise_torch_(grad, noise_std=noise_std, seed=seed, scale=scale)

    def kernel() -> torch.Tensor:
        from ghostdp.kernels._noise_triton import add_noise_triton_

        work = grad if grad.is_contiguous() else grad.contiguous()
        add_noise_triton_(work, noise_std=noise_std, seed=seed if seed is not None else 0,
                          scale=scale)
        if work is not grad:
            grad.copy_(work)
        return grad

    return run_kernel(op, impl, kernel,
                      lambda: add_noise_torch_(grad, noise_std=noise_std, seed=seed, scale=scale))

