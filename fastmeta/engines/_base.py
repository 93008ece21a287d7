"""What an engine is: the part of a learner that runs (and differentiates) the inner loop."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._inner_optim import InnerOptimizer
from .._task import Task

LossFn = Callable[[Tensor, Tensor], Tensor]


class MetaGrad(enum.Enum):
    """How much of the inner loop the meta-gradient sees."""

    SECOND_ORDER = "second_order"  # differentiate through every inner step
    FIRST_ORDER = "first_order"  # inner gradients treated as constants
    NONE = "none"  # no meta-gradient at all (Reptile, test-time adaptation)


@dataclass(frozen=True)
class InnerLoop:
    """Everything an engine needs to run one inner loop, fixed by the learner.

    Attributes:
        adapted: names (as in ``named_parameters()``) of the parameters updated in the
            inner loop; the others are used as they are.
        optimizer: the inner optimiser's rule and settings.
        inner_lr: the inner learning rate.
        loss_fn: inner and outer loss, ``loss_fn(prediction, target) -> scalar``.
        steps: number of inner steps.
        lrs: learned per-parameter rates (Meta-SGD), keyed like ``adapted``, or ``None``.
        batch_indices: ``[tasks, steps, batch]`` support indices for minibatch inner steps
            (Reptile's ``inner_batch_size``), or ``None`` for full-batch steps.
    """

    adapted: tuple[str, ...]
    optimizer: InnerOptimizer
    inner_lr: float
    loss_fn: LossFn
    steps: int
    lrs: dict[str, Tensor] | None = None
    batch_indices: Tensor | None = None


@dataclass
class InnerLoopOutput:
    """What an engine returns for a batch of tasks.

    Attributes:
        query_losses: ``[tasks]`` query loss after adaptation; carries the graph to the
            meta-parameters unless the engine already ran backward (or ``NONE``).
        support_losses: ``[tasks, steps]`` detached support loss before each inner step.
        params: adapted parameters stacked over tasks (``[tasks, ...]``, detached), if asked.
        buffers: buffers after adaptation stacked over tasks, if ``params`` was asked.
    """

    query_losses: Tensor
    support_losses: Tensor
    params: dict[str, Tensor] | None = None
    buffers: dict[str, Tensor] | None = None


class Engine:
    """Base class of engines. Subclasses implement :meth:`run`."""

    name: str = "base"

    def run(
        self,
        module: nn.Module,
        task: Task,
        loop: InnerLoop,
        meta_grad: MetaGrad,
        *,
        backward: bool = False,
        keep_params: bool = False,
        query: bool = True,
    ) -> InnerLoopOutput:
        """Adapt ``module`` to every task of ``task`` and evaluate the query loss.

        Args:
            module: the user's model; never modified.
            task: the tasks, each tensor ``[tasks, examples, ...]``.
            loop: the inner-loop definition.
            meta_grad: how the meta-gradient flows through the inner loop.
            backward: run ``backward`` on the mean query loss here (the engine may do it
                task by task to save memory); ``query_losses`` come back detached.
            keep_params: also return the adapted parameters and buffers.
            query: evaluate the query loss (``False`` for test-time ``adapt``).
        """
        raise NotImplementedError


def support_batch(task: Task, loop: InnerLoop, index: int, step: int) -> tuple[Tensor, Tensor]:
    """Support examples of task ``index`` used at inner step ``step``."""
    x, y = task.support_x[index], task.support_y[index]
    if loop.batch_indices is None:
        return x, y
    rows = loop.batch_indices[index, step]
    return x[rows], y[rows]


def detach_all(grads: list[Tensor | None]) -> list[Tensor | None]:
    """Gradient callback of first-order inner loops: gradients become constants."""
    return [None if g is None else g.detach() for g in grads]


def stack_dicts(dicts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack per-task dicts of tensors into one dict of ``[tasks, ...]`` tensors."""
    return {key: torch.stack([d[key] for d in dicts]) for key in dicts[0]}
