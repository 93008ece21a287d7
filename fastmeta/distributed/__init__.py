"""Data-parallel meta-training over the processes of a ``torch.distributed`` job.

Each process meta-trains on its share of every meta-batch; ``meta_step`` averages the
meta-gradients over processes (gloo on CPU, NCCL on GPU) before the outer optimiser
steps, so every process holds the same meta-parameters after every step. Launch with
``torchrun``; the same script also runs as one plain process.

Example:
    >>> import fastmeta, fastmeta.distributed as fmd
    >>> fmd.init_from_env()                                  # no-op outside torchrun
    >>> learner = fastmeta.MAML(model, inner_lr=0.01)
    >>> if fmd.is_distributed():
    ...     fmd.data_parallel(learner)
    >>> optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    >>> for batch in loader:                                 # the same batches everywhere
    ...     result = learner.meta_step(fmd.shard(batch), optimizer)  # global mean loss
    ...     if fmd.is_main_process():
    ...         print(result.loss)
"""

from __future__ import annotations

from ._process import (
    device,
    init_from_env,
    is_distributed,
    is_main_process,
    rank,
    world_size,
)
from ._shard import shard, shard_bounds
from ._sync import MetaGradientAverager, RankFailedError, data_parallel

__all__ = [
    "MetaGradientAverager",
    "RankFailedError",
    "data_parallel",
    "device",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "rank",
    "shard",
    "shard_bounds",
    "world_size",
]
