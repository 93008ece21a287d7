"""The general engine: higher's functional copies, task by task.

Every task gets a functional copy of the model (``higher.monkeypatch`` with
``copy_initial_weights=False``, so that the meta-gradient reaches the model itself),
whose buffers (BatchNorm running statistics) are its own: the wrapped model's buffers
never change. The inner steps apply fastmeta's update rule (the same one the vectorised
engine runs) to the copy's fast weights. For the inner optimisers fastmeta has no rule
for (``"adagrad"``, ``"rmsprop"``, ...), higher's differentiable optimiser takes the steps.
"""

from __future__ import annotations

from typing import Any

import higher
import higher.optim
import torch
from torch import Tensor, nn

from .._structure import structure
from .._task import TaskBatch
from .._tree import Tree, arguments
from ._base import (
    Adaptation,
    Engine,
    InnerContext,
    InnerLoop,
    MetaGrad,
    MetaLosses,
    OuterObjective,
    Params,
    run_task_steps,
    stack_dicts,
)
from ._exact import exact_layers


class _Steps:
    """The inner steps of one task on a functional copy: fastmeta's rule or higher's."""

    def __init__(self, module: nn.Module, fmodel: Any, loop: InnerLoop, order: MetaGrad
                 ) -> None:
        named: dict[str, Tensor] = dict(structure(module).named_parameters())
        self.names = list(named)
        self.loop, self.order, self.fmodel = loop, order, fmodel
        initial: Params = {n: named[n] for n in loop.adapted}
        if order is MetaGrad.NONE:
            initial = {n: p.detach().requires_grad_(True) for n, p in initial.items()}
        self.initial = initial
        self.fast: Params = dict(initial)
        self.base = {n: (p if order is not MetaGrad.NONE else p.detach()) for n, p in
                     named.items()}
        self.diffopt = None
        if loop.optimizer.functional:
            self.rule = loop.optimizer.rule()
            self.state = self.rule.init(self.fast)
        else:  # higher's optimiser: one group per parameter, each with its rate
            rates = loop.rates(0)
            optimizer = loop.optimizer.build([{"params": [named[n]]} for n in loop.adapted],
                                             lr=1.0)
            self.diffopt = higher.optim.get_diff_optim(
                optimizer, [named[n] for n in loop.adapted], fmodel=None,
                track_higher_grads=order is not MetaGrad.NONE,
                override={"lr": [rates[n] for n in loop.adapted]})

    def params(self, step: int) -> Params:
        extra = self.loop.step_params(step) if self.loop.step_params is not None else {}
        return {**self.base, **extra, **self.fast}

    def forward(self, step: int, fast: Params, x: Tree) -> Any:
        extra = self.loop.step_params(step) if self.loop.step_params is not None else {}
        state = {**self.base, **extra, **fast}
        # update_params, not forward(params=...): higher's first call with params= leaves
        # submodules that the parent reads directly (MultiheadAttention's out_proj) on
        # their old weights.
        self.fmodel.update_params([state[n] for n in self.names])
        args, kwargs = arguments(x)
        return self.fmodel(*args, **kwargs)

    def step(self, step: int, x: Tree, y: Tree | None) -> Tensor:
        """One inner step; returns the detached objective before it."""
        fast = self.fast
        context = InnerContext(self.fmodel, lambda inputs: self.forward(step, fast, inputs),
                               fast, self.initial, x, y, step)
        loss = self.loop.objective(context)
        adapted = [fast[n] for n in self.loop.adapted]
        second = self.order is MetaGrad.SECOND_ORDER
        if self.diffopt is not None:
            callback = None if second else (lambda gs: [g.detach() for g in gs])
            new = self.diffopt.step(loss, params=adapted, grad_callback=callback)
            self.fast = dict(zip(self.loop.adapted, new))
            return loss.detach()
        grads = torch.autograd.grad(loss, adapted, create_graph=second, allow_unused=True)
        grads_by_name = {n: torch.zeros_like(p) if g is None else (g if second else g.detach())
                         for n, p, g in zip(self.loop.adapted, adapted, grads)}
        self.fast, self.state = self.rule.update(fast, grads_by_name, self.state,
                                                 self.loop.rates(step))
        if self.order is MetaGrad.NONE:
            self.fast = {n: p.detach().requires_grad_(True) for n, p in self.fast.items()}
        return loss.detach()


def _run_task(module: nn.Module, task: TaskBatch, loop: InnerLoop, position: int, order: MetaGrad,
              outer: OuterObjective | None
              ) -> tuple[Tensor | None, Tensor | None, Tensor, Params, Params]:
    """Task ``position``: (meta-objective, query loss, support losses, params, buffers)."""
    fmodel = higher.monkeypatch(module, copy_initial_weights=False,
                                track_higher_grads=order is not MetaGrad.NONE)
    steps = _Steps(module, fmodel, loop, order)
    objective, query_loss, support_losses, params = run_task_steps(steps, task, loop, position,
                                                                   order, outer)
    buffers = {n: b.detach() for n, b in fmodel.named_buffers()}
    return objective, query_loss, support_losses, params, buffers


class HigherEngine(Engine):
    """Runs inner loops on higher's functional copies, one task at a time."""

    name = "higher"

    def adapt(self, module: nn.Module, task: TaskBatch, loop: InnerLoop, *,
              order: MetaGrad = MetaGrad.NONE) -> Adaptation:
        with exact_layers(module, vectorised=False,
                          second_order=order is MetaGrad.SECOND_ORDER):
            runs = [_run_task(module, task, loop, t, order, None) for t in range(task.num_tasks)]
        return Adaptation(stack_dicts([r[3] for r in runs]), stack_dicts([r[4] for r in runs]),
                          torch.stack([r[2] for r in runs]))

    def meta_loss(self, module: nn.Module, task: TaskBatch, loop: InnerLoop,
                  outer: OuterObjective, *, order: MetaGrad) -> MetaLosses:
        with exact_layers(module, vectorised=False,
                          second_order=order is MetaGrad.SECOND_ORDER):
            runs = [_run_task(module, task, loop, t, order, outer)
                    for t in range(task.num_tasks)]
        objectives = torch.stack([r[0] for r in runs])  # type: ignore[misc]
        queries = torch.stack([r[1] for r in runs])  # type: ignore[misc]
        return MetaLosses(queries.detach(), torch.stack([r[2] for r in runs]), objectives)

    def meta_gradient(self, module: nn.Module, task: TaskBatch, loop: InnerLoop,
                      outer: OuterObjective, *, order: MetaGrad) -> MetaLosses:
        """TaskBatch by task, each task's graph freed after its backward (memory of one task)."""
        queries, supports = [], []
        with exact_layers(module, vectorised=False,
                          second_order=order is MetaGrad.SECOND_ORDER):
            for t in range(task.num_tasks):
                objective, query, support, _, _ = _run_task(module, task, loop, t, order, outer)
                assert objective is not None and query is not None
                (objective / task.num_tasks).backward()
                queries.append(query.detach())
                supports.append(support)
        return MetaLosses(torch.stack(queries), torch.stack(supports))
