"""Averaging meta-gradients over the processes of a ``torch.distributed`` job."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from .._learner import MetaLearner
from ..engines import MetaLosses
from ._process import require_distributed


class RankFailedError(RuntimeError):
    """Another process of the job raised during its share of a meta-step.

    The failing process re-raises its own exception; every other process raises this
    one at the same meta-step, instead of waiting forever for its gradients. No process
    updated its meta-parameters at that meta-step.

    Attributes:
        meta_step: 1-based number of the meta-step that failed.
        ranks: the ranks (in the learner's process group) that raised.
    """

    def __init__(self, message: str, *, meta_step: int, ranks: tuple[int, ...]) -> None:
        super().__init__(message)
        self.meta_step = meta_step
        self.ranks = ranks


class MetaGradientAverager:
    """``meta_step``'s hook that averages the meta-gradient over a process group.

    Per meta-step, two collectives:

    1. ``all_reduce`` of an ``int64[world_size]`` status: each rank's task count, or -1
       if its own part raised. A rank that raised re-raises its exception after this
       collective; every other rank raises :class:`RankFailedError`. So no rank waits
       for a gradient that will never come.
    2. One ``all_reduce`` (sum) per parameter dtype of a flat buffer holding every
       meta-gradient scaled by ``n_rank / n_total``, one "has a gradient" flag per
       parameter, and each rank's query and support losses in its own slot. The sum is
       the mean over all tasks, weighted correctly when the meta-batch does not split
       evenly; a parameter no rank has a gradient for keeps ``.grad = None``.

    Bytes sent per meta-step: the meta-gradient (4 bytes per float32 meta-parameter)
    plus ``world_size * (1 + max share) * (1 + inner_steps)`` floats of losses and flags;
    a ring all-reduce moves about twice the buffer per process.

    Args:
        group: the process group (``None``: the whole job).
    """

    def __init__(self, group: ProcessGroup | None = None) -> None:
        self.group = group

    def __deepcopy__(self, memo: dict[int, Any]) -> MetaGradientAverager:
        return self  # a process group cannot be copied; a copied learner shares it

    def agree(self, learner: MetaLearner, verdict: int) -> int:
        """The worst of every rank's verdict (``engine="auto"``'s check), so that all
        ranks take the same engine."""
        flag = torch.tensor([verdict], dtype=torch.int64, device=learner.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag)

    def agree_times(self, learner: MetaLearner, times: list[float]) -> list[float]:
        """Every rank's timings summed (``engine="auto"``'s tuner), so all choose alike."""
        flat = torch.tensor(times, dtype=torch.float64, device=learner.device)
        dist.all_reduce(flat, group=self.group)
        return [float(t) for t in flat]

    def __call__(
        self, learner: MetaLearner, local: Callable[[], MetaLosses]
    ) -> MetaLosses:
        """Run ``local()`` here, combine with the other ranks, return the global losses."""
        group = self.group
        world, me = dist.get_world_size(group), dist.get_rank(group)
        device = learner.device
        meta_step = learner.meta_steps_taken + 1

        failure: Exception | None = None
        try:
            output = local()
            count = output.query_losses.shape[0]
        except Exception as error:  # re-raised below, once the peers know
            failure, count = error, -1
        status = torch.zeros(world, dtype=torch.int64, device=device)
        status[me] = count
        dist.all_reduce(status, group=group)
        if failure is not None:
            raise failure
        failed = tuple(int(r) for r in (status < 0).nonzero().flatten())
        if failed:
            learner.zero_grad(set_to_none=True)
            raise RankFailedError(
                f"meta-step {meta_step}: rank(s) {list(failed)} of {world} raised an exception "
                f"during their share of the meta-batch (see that process's traceback); rank "
                f"{me} stops too instead of waiting for their meta-gradients. No meta-parameter "
                f"was updated.",
                meta_step=meta_step,
                ranks=failed,
            )
        return _reduce(learner, output, status.tolist(), me, group)


def _reduce(
    learner: MetaLearner,
    output: MetaLosses,
    counts: list[int],
    me: int,
    group: ProcessGroup | None,
) -> MetaLosses:
    """Sum the weighted gradients and the losses of every rank (one collective per dtype)."""
    total, share, world = sum(counts), max(counts), len(counts)
    weight = counts[me] / total
    params: list[Tensor] = [p for p in learner.parameters() if p.requires_grad]
    query = output.query_losses.detach()
    support = output.support_losses.detach()
    steps = support.shape[1]

    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for param in params:
        by_dtype.setdefault(param.dtype, []).append(param)
    loss_dtype = query.dtype
    by_dtype.setdefault(loss_dtype, [])
    for dtype, group_params in by_dtype.items():
        pieces = [
            (p.grad * weight).flatten() if p.grad is not None else p.new_zeros(p.numel())
            for p in group_params
        ]
        has_grad = [float(p.grad is not None) for p in group_params]
        flags = torch.tensor(has_grad, dtype=dtype, device=query.device)
        losses = []
        if dtype == loss_dtype:
            slots = query.new_zeros(world, share, 1 + steps)
            slots[me, : counts[me], 0] = query
            slots[me, : counts[me], 1:] = support.to(dtype)
            losses = [slots.flatten()]
        buffer = torch.cat([*pieces, flags, *losses])
        dist.all_reduce(buffer, group=group)
        offset = 0
        for p in group_params:
            n = p.numel()
            p.grad = buffer[offset : offset + n].view_as(p)  # views of one fresh buffer
            offset += n
        for p, seen in zip(group_params, buffer[offset : offset + len(group_params)].tolist()):
            if seen == 0:
                p.grad = None
        offset += len(group_params)
        if losses:
            slots = buffer[offset:].view(world, share, 1 + steps)
            parts = [slots[r, : counts[r]] for r in range(world)]
            gathered = torch.cat(parts)
            query, support = gathered[:, 0], gathered[:, 1:].to(output.support_losses.dtype)
    return MetaLosses(query_losses=query, support_losses=support)


def data_parallel(
    learner: MetaLearner, *, group: ProcessGroup | None = None, broadcast: bool = True
) -> MetaLearner:
    """Make ``learner.meta_step`` average its meta-gradient over the processes of a job.

    Afterwards each process passes its share of the meta-batch to ``meta_step`` (see
    :func:`shard`); the meta-gradient written into ``.grad`` before ``optimizer.step()``
    is the mean over the tasks of all processes (weighted by their task counts), and the
    returned :class:`fastmeta.MetaStepResult` holds the losses of all tasks in rank
    order, so every process steps the same way and holds identical meta-parameters
    after every step, with any learner, engine and outer optimiser. Works for every
    meta-parameter: the model's, Meta-SGD's learned rates, Reptile's pseudo-gradient.

    Failure: a rank whose share raises (inner loop, data, ...) re-raises its error and
    every other rank raises :class:`RankFailedError` at the same meta-step; a diverged
    rank makes every rank raise :class:`fastmeta.DivergenceError`. A rank that dies
    without raising is noticed by torchrun's agent at once, otherwise after the process
    group's ``timeout``.

    Args:
        learner: the learner, built the same way on every process.
        group: the process group (default: the whole job).
        broadcast: copy rank 0's meta-parameters and buffers to every rank now, so that
            all start equal whatever their seeds (as ``DistributedDataParallel`` does).

    Returns:
        ``learner`` itself.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised.
        ValueError: the learners differ between ranks (names, shapes or dtypes).

    Example:
        >>> fastmeta.distributed.init_from_env()          # under torchrun
        >>> learner = fastmeta.distributed.data_parallel(fastmeta.MAML(model, inner_lr=0.01))
        >>> optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
        >>> for batch in loader:                          # the same batches on every rank
        ...     result = learner.meta_step(fastmeta.distributed.shard(batch), optimizer)
    """
    if not isinstance(learner, MetaLearner):
        raise TypeError(f"learner must be a fastmeta.MetaLearner, got {type(learner).__name__}")
    require_distributed("fastmeta.distributed.data_parallel")
    state = {name: value for name, value in learner.state_dict(keep_vars=True).items()
             if name != "_extra_state"}  # the example shape each rank records as it runs
    signature = [(name, tuple(t.shape), str(t.dtype)) for name, t in state.items()]
    signatures: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(signatures, signature, group=group)
    for other, theirs in enumerate(signatures):
        if theirs != signature:
            diff = sorted(set(map(str, theirs)) ^ set(map(str, signature)))[:3]
            raise ValueError(
                f"the learner on rank {other} differs from the one on rank "
                f"{dist.get_rank(group)} (meta-parameters or buffers {diff}); build the same "
                f"learner, model and options on every process"
            )
    if broadcast:
        source = 0 if group is None else dist.get_global_rank(group, 0)
        with torch.no_grad():
            for tensor in state.values():
                dist.broadcast(tensor.data, src=source, group=group)
    learner.meta_gradient_sync = MetaGradientAverager(group)
    return learner
