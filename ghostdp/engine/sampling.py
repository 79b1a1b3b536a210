"""Poisson sampling for DP-SGD: the batch sampler the privacy accounting assumes.

DP-SGD's accounting (``ghostdp.engine.accounting``) analyses the Poisson-subsampled Gaussian mechanism:
on every step each of the N examples is included independently with probability q, so the batch size
is Binomial(N, q) -- it varies, and it can be 0. Shuffled fixed-size batches are a different mechanism
(sampling without replacement) and accounting them as Poisson under-states epsilon; so is a custom
sampler whose real rate differs from the q given to the accountant (Opacus #813). Use this sampler with
the same ``sample_rate`` the accountant sees, and normalise the noisy gradient sum by the public
expected batch size q * N, never by the realised size.
"""
from __future__ import annotations

import logging
import numbers
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import Sampler, default_collate

logger = logging.getLogger(__name__)

__all__ = ["PoissonBatchSampler", "collate_with_empty"]


class PoissonBatchSampler(Sampler[list[int]]):
    """Yields, per step, the indices of a Poisson sample: each of ``num_samples`` examples independently
    with probability ``sample_rate`` (q). Pass it to ``DataLoader(dataset, batch_sampler=...)``.

    Batches are lists of indices in increasing order, possibly EMPTY (probability (1 - q)^N per step;
    see ``collate_with_empty``). One pass yields ``len(self)`` batches: ``steps`` if given, else
    round(1 / q), the number of steps that touch each example once in expectation (an "epoch").

    Randomness comes only from ``torch.rand(num_samples, generator=generator)``, one draw per step. With
    ``generator=None`` a private generator is seeded from torch's global RNG (so ``torch.manual_seed``
    makes runs repeatable). For the DP guarantee the selection must be unknown to an adversary: do not
    publish the seed. ``state_dict()`` / ``load_state_dict()`` carry the generator state and the position
    inside the current pass, so a resumed run draws exactly the batches the original run would have.
    Caveat: a DataLoader with workers fetches batch indices ahead of training; batches drawn but not
    trained on before a checkpoint are skipped on resume. That does not harm privacy (every step is a
    fresh, independent Poisson sample and only steps taken are accounted), only bit-exact replay.
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        generator: torch.Generator | None = None,
        steps: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 1:
            raise ValueError(
                f"num_samples must be a positive int, the size of the dataset being sampled, got {num_samples!r}."
            )
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real) or not 0.0 < sample_rate <= 1.0:
            hint = ""
            if isinstance(sample_rate, numbers.Real) and not isinstance(sample_rate, bool) and sample_rate > 1:
                hint = (
                    f" It looks like a batch size; the Poisson rate for an expected batch of {sample_rate:g} is "
                    f"sample_rate = {sample_rate:g} / num_samples = {sample_rate / num_samples:.6g}."
                )
            raise ValueError(
                f"sample_rate must be in (0, 1], got {sample_rate!r}: it is the probability q that each example "
                f"is in a step's batch, and the accountant needs the same q.{hint}"
            )
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1):
            raise ValueError(
                f"steps must be None (round(1 / sample_rate) batches per pass) or a positive int, got {steps!r}."
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}; e.g. "
                f"torch.Generator().manual_seed(0). (numpy RNGs are not supported: their state would not be "
                f"in this sampler's state_dict.)"
            )
        self.num_samples = int(num_samples)
        self.sample_rate = float(sample_rate)
        self.steps = None if steps is None else int(steps)
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        self.generator = generator
        self._drawn = 0  # batches drawn in the current pass
        self._resume_from = 0  # set by load_state_dict: where the next pass starts

    @property
    def expected_batch_size(self) -> float:
        """q * N, the public normaliser of the noisy gradient sum (never the realised batch size)."""
        return self.sample_rate * self.num_samples

    def __len__(self) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, round(1.0 / self.sample_rate))

    def __iter__(self) -> Iterator[list[int]]:
        start, self._resume_from = self._resume_from, 0
        for b in range(start, len(self)):
            include = torch.rand(self.num_samples, generator=self.generator, device=self.generator.device)
            self._drawn = b + 1
            yield torch.nonzero(include < self.sample_rate).flatten().tolist()
        self._drawn = 0

    def state_dict(self) -> dict[str, Any]:
        """Generator state (as a list of byte values) and position in the current pass; plain Python types."""
        return {
            "generator_state": self.generator.get_state().tolist(),
            "position": self._drawn,
            "num_samples": self.num_samples,
            "sample_rate": self.sample_rate,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict``; the next ``iter()`` continues the interrupted pass where it stopped."""
        if state.get("num_samples") != self.num_samples or state.get("sample_rate") != self.sample_rate:
            raise ValueError(
                f"this PoissonBatchSampler has num_samples={self.num_samples}, sample_rate={self.sample_rate} but the "
                f"state was saved with num_samples={state.get('num_samples')}, sample_rate={state.get('sample_rate')}. "
                f"Resuming with another dataset size or rate would not continue the same mechanism; build the "
                f"sampler with the saved values."
            )
        position = int(state["position"])
        if not 0 <= position <= len(self):
            raise ValueError(f"saved position {position} is outside this sampler's pass of {len(self)} batches.")
        self.generator.set_state(torch.tensor(state["generator_state"], dtype=torch.uint8))
        self._resume_from = 0 if position == len(self) else position
        self._drawn = self._resume_from

    def __repr__(self) -> str:
        return (
            f"PoissonBatchSampler(num_samples={self.num_samples}, sample_rate={self.sample_rate}, "
            f"expected_batch_size={self.expected_batch_size:g}, batches={len(self)})"
        )


class _EmptyBatchCollate:
    """Picklable wrapper (DataLoader workers may pickle the collate_fn): [] -> None, else collate_fn(batch)."""

    def __init__(self, collate_fn: Callable[[list], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, batch: list) -> Any:
        if len(batch) == 0:
            return None
        return self.collate_fn(batch)

    def __repr__(self) -> str:
        return f"collate_with_empty({self.collate_fn!r})"


def collate_with_empty(collate_fn: Callable[[list], Any] | None = None) -> Callable[[list], Any]:
    """Wrap ``collate_fn`` (default: torch's ``default_collate``) so an empty Poisson batch yields ``None``.

    ``default_collate([])`` raises, yet an empty batch is a legitimate Poisson draw. A None batch means
    an empty Poisson batch: do not skip optimizer.step(), the noise is still added. The analysis assumes
    a noisy update on every step, empty or not; skipping empty steps changes the mechanism (and an
    update that is missing tells an observer the batch was empty).
    """
    return _EmptyBatchCollate(default_collate if collate_fn is None else collate_fn)
