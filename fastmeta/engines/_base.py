"""What an engine is: the part of a learner that runs (and differentiates) the inner loop."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .._inner_optim import InnerOptimizer
from .._task import TaskBatch
from .._tree import Tree, index

LossFn = Callable[[Any, Any], Tensor]


Params = dict[str, Tensor]


class MetaGrad(enum.Enum):
    """How much of the inner loop the meta-gradient sees."""

    SECOND_ORDER = "second_order"  # differentiate through every inner step
    FIRST_ORDER = "first_order"  # inner gradients treated as constants
    NONE = "none"  # no meta-gradient at all (Reptile, iMAML, test-time adaptation)


@dataclass(frozen=True)
class InnerContext:
    """What an inner objective sees at one inner step of one task.

    Attributes:
        module: the module object that runs (the user's model under ``torch.func``,
            higher's functional copy under higher): where forward hooks capture features.
        forward: the model's forward with the current fast weights, on inputs like ``x``
            (a tensor, or a tuple/mapping of the model's positional/keyword arguments);
            it returns the model's output as it is (a tensor, tuple, dict, ...).
        fast: the current fast weights of the adapted parameters.
        initial: their values before the inner loop (θ), for proximal objectives.
        x: this step's support inputs; y: their targets (``None`` when unlabelled).
        step: the 0-based inner step.
    """

    module: nn.Module
    forward: Callable[[Tree], Any]
    fast: Params
    initial: Params
    x: Tree
    y: Tree | None
    step: int


# The inner objective: the scalar loss each inner step descends.
InnerObjective = Callable[[InnerContext], Tensor]
# The learning rate of every adapted parameter at an inner step.
InnerRates = Callable[[int], Mapping[str, "float | Tensor"]]


@dataclass(frozen=True)
class InnerLoop:
    """Everything an engine needs to run one inner loop, fixed by the learner.

    Attributes:
        adapted: names (as in ``named_parameters()``) of the parameters updated in the
            inner loop; the others are used as they are.
        objective: the loss each inner step descends, given the fast weights and data.
        optimizer: the inner optimiser; its :meth:`InnerOptimizer.rule` updates the weights
            (higher's differentiable optimiser for the ones fastmeta has no rule for).
        rates: ``rates(step)``: the learning rate of each adapted parameter at ``step``.
        steps: number of inner steps.
        batch_indices: ``[tasks, steps, batch]`` support indices for minibatch inner steps
            (Reptile's ``inner_batch_size``), or ``None`` for full-batch steps.
        step_params: ``step_params(step)``: parameters (not adapted) that replace the
            model's at that step, e.g. MAML++'s per-step BatchNorm weights; ``step`` counts
            the updates made so far (the query loss after the last step sees ``steps``).
    """

    adapted: tuple[str, ...]
    objective: InnerObjective
    optimizer: InnerOptimizer
    rates: InnerRates
    steps: int
    batch_indices: Tensor | None = None
    step_params: Callable[[int], Params] | None = None


@dataclass(frozen=True)
class OuterObjective:
    """The query loss a meta-gradient descends.

    Attributes:
        loss_fn: ``loss_fn(prediction, target) -> scalar`` on the query set.
        step_weights: weight of the query loss after each inner step (MAML++'s multi-step
            loss), or ``None`` for the loss after the last step alone.
    """

    loss_fn: LossFn
    step_weights: tuple[float, ...] | None = None

    def weights(self, steps: int) -> tuple[float, ...]:
        """``steps`` weights, one per inner step (the last one is MAML's query loss)."""
        if self.step_weights is None:
            return (0.0,) * max(steps - 1, 0) + (1.0,)
        if len(self.step_weights) != max(steps, 1):
            raise ValueError(
                f"step_weights has {len(self.step_weights)} weights for {steps} inner steps"
            )
        return self.step_weights


@dataclass
class Adaptation:
    """Fast weights of every task of a batch, from :meth:`Engine.adapt`.

    Attributes:
        params: every model parameter after adaptation, ``[tasks, ...]``; differentiable
            with respect to the meta-parameters unless the order was ``NONE``.
        buffers: buffers after adaptation, ``[tasks, ...]`` (detached).
        support_losses: ``[tasks, steps]`` detached inner objective before each step.
    """

    params: Params
    buffers: Params
    support_losses: Tensor


@dataclass
class MetaLosses:
    """The losses of a meta-gradient computation (detached unless said otherwise).

    Attributes:
        query_losses: ``[tasks]`` query loss after the last inner step.
        support_losses: ``[tasks, steps]`` inner objective before each inner step.
        objectives: ``[tasks]`` the per-task meta-objective (the query losses weighted by
            :class:`OuterObjective`), with its graph from :meth:`Engine.meta_loss`.
    """

    query_losses: Tensor
    support_losses: Tensor
    objectives: Tensor | None = None


class Engine:
    """How the inner loop is run and differentiated: three verbs.

    - :meth:`adapt`: the fast weights of every task.
    - :meth:`meta_loss`: the per-task meta-objective, with its graph.
    - :meth:`meta_gradient`: the same, differentiated: the mean meta-objective's gradient
      is added to ``.grad`` (an engine may go task by task to save memory).
    """

    name: str = "base"

    def adapt(self, module: nn.Module, task: TaskBatch, loop: InnerLoop, *,
              order: MetaGrad = MetaGrad.NONE) -> Adaptation:
        """Adapt ``module`` to every task of ``task``; ``module`` is never modified.

        Args:
            order: how the returned weights depend on the meta-parameters: ``NONE``
                (detached), ``FIRST_ORDER`` or ``SECOND_ORDER``.
        """
        raise NotImplementedError

    def meta_loss(self, module: nn.Module, task: TaskBatch, loop: InnerLoop,
                  outer: OuterObjective, *, order: MetaGrad) -> MetaLosses:
        """Adapt, then evaluate ``outer`` on the query sets; ``objectives`` keeps its graph."""
        raise NotImplementedError

    def meta_gradient(self, module: nn.Module, task: TaskBatch, loop: InnerLoop,
                      outer: OuterObjective, *, order: MetaGrad) -> MetaLosses:
        """Add the gradient of the mean meta-objective to ``.grad``; return detached losses."""
        losses = self.meta_loss(module, task, loop, outer, order=order)
        assert losses.objectives is not None
        losses.objectives.mean().backward()
        return MetaLosses(losses.query_losses, losses.support_losses)  # detached already


def support_batch(
    task: TaskBatch, loop: InnerLoop, position: int, step: int
) -> tuple[Tree, Tree | None]:
    """Support examples of task ``position`` used at inner step ``step`` (targets may be
    None); inputs and targets may be trees of tensors."""
    x = index(task.support_x, position)
    y = None if task.support_y is None else index(task.support_y, position)
    if loop.batch_indices is None:
        return x, y
    rows = loop.batch_indices[position, step]
    return index(x, rows), None if y is None else index(y, rows)


class TaskSteps(Protocol):
    """One task's inner loop, step by step, as a per-task engine runs it."""

    fast: Params

    def step(self, step: int, x: Tree, y: Tree | None) -> Tensor:
        """One inner update of :attr:`fast`; returns the detached objective before it."""

    def forward(self, step: int, fast: Params, x: Tree) -> Any:
        """The model's output on ``x`` with ``fast`` (and ``step``'s per-step parameters)."""

    def params(self, step: int) -> Params:
        """Every parameter the model uses after ``step`` updates."""


def run_task_steps(steps: TaskSteps, task: TaskBatch, loop: InnerLoop, position: int,
                   order: MetaGrad, outer: OuterObjective | None
                   ) -> tuple[Tensor | None, Tensor | None, Tensor, Params]:
    """Task ``position`` through ``steps``: (meta-objective, query loss, support losses,
    params). The meta-objective weights the query loss after each step (``outer``)."""
    query_x, query_y = index(task.query_x, position), index(task.query_y, position)
    weights = outer.weights(loop.steps) if outer is not None else ()
    losses, objective = [], None
    for step in range(loop.steps):
        x, y = support_batch(task, loop, position, step)
        losses.append(steps.step(step, x, y))
        if outer is not None and weights[step] != 0 and step < loop.steps - 1:
            term = weights[step] * outer.loss_fn(steps.forward(step + 1, steps.fast, query_x),
                                                 query_y)
            objective = term if objective is None else objective + term
    query = None
    if outer is not None:
        query = outer.loss_fn(steps.forward(loop.steps, steps.fast, query_x), query_y)
        last = query if weights[-1] == 1.0 else weights[-1] * query
        objective = last if objective is None else objective + last
    params = steps.params(loop.steps)
    if order is MetaGrad.NONE:
        params = {n: p.detach() for n, p in params.items()}
    return objective, query, torch.stack(losses) if losses else torch.zeros(0), params


def detach_all(grads: list[Tensor | None]) -> list[Tensor | None]:
    """Gradient callback of first-order inner loops: gradients become constants."""
    return [None if g is None else g.detach() for g in grads]


def stack_dicts(dicts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack per-task dicts of tensors into one dict of ``[tasks, ...]`` tensors."""
    return {key: torch.stack([d[key] for d in dicts]) for key in dicts[0]}
