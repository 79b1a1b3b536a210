"""Data parallel: 2 CPU processes over gloo give the same parameters as 1 process on the same global batch.

Each rank clips its own examples; the clipped sums are all-reduced; rank 0 adds the noise once.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ghostdp import PrivacyEngine
from tests.helpers import lm_batch, lm_losses, tiny_llama

STEPS, SIGMA, C, E = 3, 0.7, 0.5, 4


def global_batches():
    return [lm_batch([5, 3, 7, 4], seed=10 + s) for s in range(STEPS)]


def shard(batch, rank, world):
    return {k: v[rank::world] for k, v in batch.items()}


def train(rank: int, world: int, out: dict | None = None):
    model = tiny_llama(True)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    PrivacyEngine(model, opt, max_grad_norm=C, expected_batch_size=E, noise_multiplier=SIGMA, clipping="auto",
                  generator=torch.Generator().manual_seed(99))
    for batch in global_batches():
        local = shard(batch, rank, world)
        lm_losses(model, local).mean().backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _worker(rank, world, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        params = train(rank, world)
        torch.save(params, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_ranks_equal_one_process(tmp_path):
    single = train(0, 1)
    path = str(tmp_path / "params")
    mp.spawn(_worker, args=(2, _free_port(), path), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(f"{path}.{rank}")
        for name, p in single.items():
            torch.testing.assert_close(got[name], p, rtol=1e-9, atol=1e-12, msg=lambda m: f"rank {rank} {name}: {m}")
