"""The per-task ``torch.func`` engine: one task at a time, each task's graph freed at once.

Per task: the same computation as the vectorised engine (``functional_call`` on the user's
unmodified module, ``torch.func.grad`` for each inner step, fastmeta's update rules), on
that task's examples alone, followed by its own ``backward()``. No batching rule is
involved, so it runs the models ``vmap`` cannot (recurrent layers), and its memory is that
of one task. On a CPU it is often faster than vectorising convolutions over tasks.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from .._task import TaskBatch
from ._base import (
    Adaptation,
    Engine,
    InnerLoop,
    MetaGrad,
    MetaLosses,
    OuterObjective,
    stack_dicts,
)
from ._exact import exact_layers
from ._vmap import one_task, split_parameters


def _task(task: TaskBatch, loop: InnerLoop, t: int) -> tuple[Any, ...]:
    indices = None if loop.batch_indices is None else loop.batch_indices[t]
    return (*(None if value is None else value[t] for value in task), indices)


class LoopEngine(Engine):
    """Runs the inner loop of each task in turn with ``torch.func`` (no ``vmap``)."""

    name = "loop"

    def _runs(self, module: nn.Module, task: TaskBatch, loop: InnerLoop, order: MetaGrad,
              outer: OuterObjective | None, *, backward: bool) -> list[tuple[Any, ...]]:
        trainable, frozen, buffers = split_parameters(module)
        runs = []
        # Under torch.func transforms the layers run in their exact forms, and BatchNorm
        # skips its running-statistics update, as on the vectorised engine.
        second_order = order is MetaGrad.SECOND_ORDER
        with exact_layers(module, vectorised=True, second_order=second_order), \
                torch.no_grad() if order is MetaGrad.NONE else contextlib.nullcontext():
            for t in range(task.num_tasks):
                objective, query, support, params = one_task(
                    module, loop, order, outer, trainable, frozen, buffers,
                    *_task(task, loop, t))
                if backward:
                    (objective / task.num_tasks).backward()
                    objective, query = objective.detach(), query.detach()
                    params = {}
                runs.append((objective, query, support, params))
        return runs

    def adapt(self, module: nn.Module, task: TaskBatch, loop: InnerLoop, *,
              order: MetaGrad = MetaGrad.NONE) -> Adaptation:
        runs = self._runs(module, task, loop, order, None, backward=False)
        params = stack_dicts([r[3] for r in runs])
        if order is MetaGrad.NONE:
            params = {n: p.detach() for n, p in params.items()}
        buffers = {n: b.detach().unsqueeze(0).expand(task.num_tasks, *b.shape)
                   for n, b in module.named_buffers()}
        return Adaptation(params, buffers, torch.stack([r[2] for r in runs]))

    def meta_loss(self, module: nn.Module, task: TaskBatch, loop: InnerLoop,
                  outer: OuterObjective, *, order: MetaGrad) -> MetaLosses:
        runs = self._runs(module, task, loop, order, outer, backward=False)
        return MetaLosses(torch.stack([r[1] for r in runs]).detach(),
                          torch.stack([r[2] for r in runs]), torch.stack([r[0] for r in runs]))

    def meta_gradient(self, module: nn.Module, task: TaskBatch, loop: InnerLoop,
                      outer: OuterObjective, *, order: MetaGrad) -> MetaLosses:
        """Task by task, each task's graph freed after its backward (memory of one task)."""
        runs = self._runs(module, task, loop, order, outer, backward=True)
        return MetaLosses(torch.stack([r[1] for r in runs]), torch.stack([r[2] for r in runs]))
