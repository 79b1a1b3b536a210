"""PoissonBatchSampler: the sampling the accountant assumes (independent inclusion with probability q),
empty batches, reproducibility and resume, and errors that say what to pass instead."""
from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ghostdp.data import PoissonBatchSampler, collate_with_empty


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_each_index_is_included_with_probability_q():
    n, q, steps = 50, 0.2, 2000
    sampler = PoissonBatchSampler(n, q, generator=seeded(0), steps=steps)
    counts = torch.zeros(n)
    for batch in sampler:
        assert batch == sorted(set(batch)) and all(0 <= i < n for i in batch)
        counts[batch] += 1
    # Each count ~ Binomial(2000, 0.2): mean 400, sd 17.9. Five sd on every index.
    sd = math.sqrt(steps * q * (1 - q))
    assert torch.all((counts - steps * q).abs() < 5 * sd), counts
    # Independence across indices: pairwise co-inclusion ~ q^2, checked on one pair.
    both = sum(1 for batch in PoissonBatchSampler(n, q, generator=seeded(1), steps=steps) if 3 in batch and 4 in batch)
    assert abs(both - steps * q * q) < 5 * math.sqrt(steps * q * q * (1 - q * q))


def test_batch_sizes_are_binomial():
    n, q, steps = 200, 0.05, 4000
    sampler = PoissonBatchSampler(n, q, generator=seeded(2), steps=steps)
    sizes = torch.tensor([len(b) for b in sampler], dtype=torch.float64)
    mean, var = n * q, n * q * (1 - q)  # 10, 9.5
    assert abs(sizes.mean().item() - mean) < 5 * math.sqrt(var / steps)
    # sd of the sample variance ~ var * sqrt(2 / steps) (near-normal counts); five of them.
    assert abs(sizes.var().item() - var) < 5 * var * math.sqrt(2 / steps)
    assert PoissonBatchSampler(n, q).expected_batch_size == pytest.approx(mean)


def test_empty_batches_are_yielded_and_collate_to_none():
    n, q, steps = 10, 0.01, 300  # P(empty) = 0.99^10 = 0.904
    data = TensorDataset(torch.arange(n, dtype=torch.float32).unsqueeze(1) * 10, torch.arange(n))
    sampler = PoissonBatchSampler(n, q, generator=seeded(3), steps=steps)
    batches = list(DataLoader(data, batch_sampler=sampler, collate_fn=collate_with_empty()))
    assert len(batches) == steps == len(sampler)  # no step is dropped
    empty = sum(b is None for b in batches)
    assert abs(empty - steps * 0.99**10) < 5 * math.sqrt(steps * 0.904 * 0.096)
    nonempty = [b for b in batches if b is not None]
    assert nonempty, "with this seed some batches are non-empty"
    for x, idx in nonempty:  # the wrapped default_collate still runs on real batches
        assert torch.equal(x.squeeze(1), idx.float() * 10)


def test_collate_with_empty_wraps_a_custom_collate_and_pickles():
    wrapped = collate_with_empty(lambda batch: ("custom", len(batch)))
    assert wrapped([]) is None
    assert wrapped([1, 2]) == ("custom", 2)
    restored = pickle.loads(pickle.dumps(collate_with_empty()))  # DataLoader workers may pickle it
    assert restored([]) is None
    assert torch.equal(restored([torch.tensor(1), torch.tensor(2)]), torch.tensor([1, 2]))


def test_len_and_q_one():
    assert len(PoissonBatchSampler(100, 0.1)) == 10
    assert len(PoissonBatchSampler(100, 0.3)) == 3
    assert len(PoissonBatchSampler(100, 1.0)) == 1
    assert len(PoissonBatchSampler(100, 0.1, steps=7)) == 7
    assert len(list(PoissonBatchSampler(100, 0.1, steps=7))) == 7
    assert list(PoissonBatchSampler(5, 1.0, steps=2)) == [[0, 1, 2, 3, 4]] * 2


def test_generator_reproducibility():
    a = list(PoissonBatchSampler(1000, 0.01, generator=seeded(7), steps=20))
    b = list(PoissonBatchSampler(1000, 0.01, generator=seeded(7), steps=20))
    c = list(PoissonBatchSampler(1000, 0.01, generator=seeded(8), steps=20))
    assert a == b and a != c
    # Without a generator, torch's global seed decides, and numpy's global state plays no part.
    torch.manual_seed(11)
    d = list(PoissonBatchSampler(1000, 0.01, steps=20))
    torch.manual_seed(11)
    import numpy as np

    np.random.seed(123)
    e = list(PoissonBatchSampler(1000, 0.01, steps=20))
    assert d == e


def test_resume_continues_the_same_sequence():
    n, q = 300, 0.05  # 20 batches per pass
    reference = PoissonBatchSampler(n, q, generator=seeded(5))
    expected = list(reference) + list(reference)  # two passes

    run = PoissonBatchSampler(n, q, generator=seeded(5))
    it = iter(run)
    seen = [next(it) for _ in range(7)]
    state = json.loads(json.dumps(run.state_dict()))  # a checkpoint: plain JSON

    resumed = PoissonBatchSampler(n, q, generator=seeded(999))  # different seed: the state must win
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(resumed) - 7  # finishes the interrupted pass ...
    assert seen + rest == expected[:20]
    assert list(resumed) == expected[20:]  # ... and the next pass is the same as well

    # A checkpoint taken at the end of a pass starts the next pass.
    done = PoissonBatchSampler(n, q, generator=seeded(5))
    list(done)
    again = PoissonBatchSampler(n, q, generator=seeded(0))
    again.load_state_dict(done.state_dict())
    assert list(again) == expected[20:]


def test_resume_rejects_a_different_mechanism():
    state = PoissonBatchSampler(100, 0.1, generator=seeded(0)).state_dict()
    with pytest.raises(ValueError, match="num_samples"):
        PoissonBatchSampler(101, 0.1).load_state_dict(state)
    with pytest.raises(ValueError, match="sample_rate"):
        PoissonBatchSampler(100, 0.2).load_state_dict(state)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((0, 0.1), {}, "num_samples"),
        ((-5, 0.1), {}, "num_samples"),
        ((10.0, 0.1), {}, "num_samples"),
        ((True, 0.1), {}, "num_samples"),
        ((100, 0.0), {}, "sample_rate"),
        ((100, -0.1), {}, "sample_rate"),
        ((100, float("nan")), {}, "sample_rate"),
        ((100, 1.5), {}, "sample_rate"),
        ((100, 0.1), {"steps": 0}, "steps"),
        ((100, 0.1), {"steps": 2.0}, "steps"),
    ],
)
def test_bad_inputs_raise(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        PoissonBatchSampler(*args, **kwargs)


def test_batch_size_passed_as_rate_gets_a_hint():
    with pytest.raises(ValueError, match=r"256 / num_samples = 0\.00426667"):
        PoissonBatchSampler(60000, 256)


def test_generator_must_be_a_torch_generator():
    import numpy as np

    with pytest.raises(TypeError, match="torch.Generator"):
        PoissonBatchSampler(100, 0.1, generator=np.random.default_rng(0))


def test_public_contract_through_the_package():
    import ghostdp

    sampler = ghostdp.data.PoissonBatchSampler(100, 0.1, torch.Generator().manual_seed(0))  # positional generator
    assert isinstance(sampler, PoissonBatchSampler) and len(list(sampler)) == 10
