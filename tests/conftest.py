"""Small models and task batches shared by the tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastmeta

# The test models are tiny: a second intra-op thread only adds contention on a busy
# 2-core machine (measured here: a tiny meta-step took 5x longer with 2 threads under load).
torch.set_num_threads(1)


def make_task(
    tasks: int = 3,
    shots: int = 4,
    query: int = 5,
    x_shape: tuple[int, ...] = (1,),
    y_shape: tuple[int, ...] = (1,),
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> fastmeta.TaskBatch:
    """Random regression tasks with leading task dimension."""
    g = torch.Generator().manual_seed(seed)

    def rand(n: int, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(tasks, n, *shape, generator=g, dtype=dtype)

    return fastmeta.TaskBatch(rand(shots, x_shape), rand(shots, y_shape), rand(query, x_shape),
                         rand(query, y_shape))


def tiny_mlp(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Sequential:
    """1-8-8-1 tanh MLP: smooth, so finite differences are accurate."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                         nn.Linear(8, 1)).to(dtype)


@pytest.fixture
def task64() -> fastmeta.TaskBatch:
    return make_task(dtype=torch.float64)
