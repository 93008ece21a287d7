"""What an engine is: the part of a learner that runs (and differentiates) the inner loop."""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._inner_optim import InnerOptimizer
from .._task import Task

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class LearnedLoss:
    """An inner loss computed from what the model produced, without support targets.

    Attributes:
        loss: ``loss(output, *features) -> scalar`` (e.g. a network whose parameters are
            meta-parameters). ``features`` are the outputs of the submodules named in
            ``features``, in that order, captured during the same forward pass.
        features: names of submodules as in ``model.named_modules()``.
    """

    loss: Callable[..., Tensor]
    features: tuple[str, ...] = ()


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
        learned_loss: replaces ``loss_fn(output, support_y)`` in the inner loop (DAML);
            the query loss stays ``loss_fn``.
    """

    adapted: tuple[str, ...]
    optimizer: InnerOptimizer
    inner_lr: float
    loss_fn: LossFn
    steps: int
    lrs: dict[str, Tensor] | None = None
    batch_indices: Tensor | None = None
    learned_loss: LearnedLoss | None = None


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


def support_batch(
    task: Task, loop: InnerLoop, index: int, step: int
) -> tuple[Tensor, Tensor | None]:
    """Support examples of task ``index`` used at inner step ``step`` (targets may be None)."""
    x = task.support_x[index]
    y = None if task.support_y is None else task.support_y[index]
    if loop.batch_indices is None:
        return x, y
    rows = loop.batch_indices[index, step]
    return x[rows], None if y is None else y[rows]


@contextlib.contextmanager
def captured(module: nn.Module, names: tuple[str, ...]) -> Iterator[list[Tensor | None]]:
    """Outputs of the submodules ``names`` of ``module`` during the block, in that order.

    Forward hooks are put on the submodules of the very module object that runs (the
    user's model under ``torch.func.functional_call``, higher's functional copy under
    higher, whose submodules are copies too) and removed afterwards, so the model is
    left as it was. A submodule called twice keeps its last output.
    """
    slots: list[Tensor | None] = [None] * len(names)
    handles = []

    def keep(position: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: object, output: Tensor) -> None:
            slots[position] = output

        return hook

    try:
        for position, name in enumerate(names):
            handles.append(module.get_submodule(name).register_forward_hook(keep(position)))
        yield slots
    finally:
        for handle in handles:
            handle.remove()


def inner_loss(
    loop: InnerLoop,
    module: nn.Module,
    run: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor | None,
) -> Tensor:
    """The inner-loop loss of one task: ``loss_fn(run(x), y)`` or the learned loss.

    Args:
        loop: the inner-loop definition.
        module: the module object that ``run`` calls (where features are captured).
        run: the model's forward with the current fast weights.
        x: support inputs; y: support targets (``None`` for unlabelled support sets).
    """
    learned = loop.learned_loss
    if learned is None:
        if y is None:
            raise ValueError(
                "the support set has no targets, and this learner's inner loss "
                "loss_fn(prediction, target) needs them; give the batch support targets, or "
                "use a learner with a learned inner loss (fastmeta.DAML)"
            )
        return loop.loss_fn(run(x), y)
    with captured(module, learned.features) as slots:
        output = run(x)
    missing = [name for name, value in zip(learned.features, slots) if value is None]
    if missing:
        raise ValueError(
            f"features {missing} produced no output during the model's forward (the "
            f"submodules were not called); name submodules that forward() calls"
        )
    loss = learned.loss(output, *slots)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"adaptation_loss must return a scalar tensor (the inner loss), got "
            f"{shape}; reduce it, e.g. return net(...).abs().mean()"
        )
    return loss


def detach_all(grads: list[Tensor | None]) -> list[Tensor | None]:
    """Gradient callback of first-order inner loops: gradients become constants."""
    return [None if g is None else g.detach() for g in grads]


def stack_dicts(dicts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack per-task dicts of tensors into one dict of ``[tasks, ...]`` tensors."""
    return {key: torch.stack([d[key] for d in dicts]) for key in dicts[0]}
