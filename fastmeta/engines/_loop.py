"""The per-task engine: ``functional_call`` and autograd, one task at a time.

Per task: the user's unmodified module under ``torch.func.functional_call`` with the task's
fast weights and its own copy of the buffers, ``torch.autograd.grad`` for each inner step
(``create_graph=True`` for second order), fastmeta's update rules (the ones every engine
runs), then that task's own ``backward()``. No ``vmap`` and no batching rule: it runs every
model (recurrent layers too), its memory is that of one task, and on a CPU it is often the
fastest way to run convolutions (measured in ``benchmarks/scale.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import checkpoint

from .._structure import structure
from .._task import TaskBatch
from .._tree import Tree, call
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


def _checkpointed(step: Callable[[Params, Any], tuple[Params, Any, Tensor]], fast: Params,
                  state: Any) -> tuple[Params, Any, Tensor]:
    """``step(fast, state)`` whose activations are recomputed in the backward pass."""
    flat, spec = tree_flatten((fast, state))
    out_spec: list[Any] = []  # the step's outputs may be shaped otherwise (state filled in)

    def run(*leaves: Any) -> list[Any]:
        out_fast, out_state, loss = step(*tree_unflatten(list(leaves), spec))
        out, structure = tree_flatten((out_fast, out_state))
        out_spec[:] = [structure]
        return [*out, loss]

    result = checkpoint(run, *flat, use_reentrant=False)
    new_fast, new_state = tree_unflatten(result[:-1], out_spec[0])
    return new_fast, new_state, result[-1]


class _LoopSteps:
    """One task's inner loop on ``functional_call`` with this task's own buffers."""

    def __init__(self, module: nn.Module, loop: InnerLoop, order: MetaGrad,
                 checkpoint_steps: bool) -> None:
        named: dict[str, Tensor] = dict(structure(module).named_parameters())
        if order is MetaGrad.NONE:
            named = {n: p.detach() for n, p in named.items()}
        self.module, self.loop, self.order = module, loop, order
        self.checkpoint_steps = checkpoint_steps and order is MetaGrad.SECOND_ORDER
        # this task's copy
        self.buffers = {n: b.clone() for n, b in structure(module).named_buffers().items()}
        self.fixed = {n: p for n, p in named.items() if n not in loop.adapted}
        self.rule = loop.optimizer.rule()
        initial = {n: named[n] for n in loop.adapted}
        if order is MetaGrad.NONE:
            initial = {n: p.requires_grad_(True) for n, p in initial.items()}
        self.initial: Params = initial
        self.fast: Params = dict(initial)
        self.state = self.rule.init(initial)

    def params(self, step: int) -> Params:
        extra = self.loop.step_params(step) if self.loop.step_params is not None else {}
        return {**self.fixed, **extra, **self.fast}

    def forward(self, step: int, fast: Params, x: Tree) -> Any:
        extra = self.loop.step_params(step) if self.loop.step_params is not None else {}
        return call(self.module, ({**self.fixed, **extra, **fast}, self.buffers), x)

    def _update(self, step: int, x: Tree, y: Tree | None, fast: Params, state: Any
                ) -> tuple[Params, Any, Tensor]:
        context = InnerContext(self.module, partial(self.forward, step, fast), fast,
                               self.initial, x, y, step)
        loss = self.loop.objective(context)
        second = self.order is MetaGrad.SECOND_ORDER
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=second,
                                    allow_unused=True)
        grads_by_name = {n: torch.zeros_like(p) if g is None else (g if second else g.detach())
                         for (n, p), g in zip(fast.items(), grads)}
        fast, state = self.rule.update(fast, grads_by_name, state, self.loop.rates(step))
        return fast, state, loss

    def step(self, step: int, x: Tree, y: Tree | None) -> Tensor:
        update = partial(self._update, step, x, y)
        if self.checkpoint_steps:
            self.fast, self.state, loss = _checkpointed(update, self.fast, self.state)
        else:
            self.fast, self.state, loss = update(self.fast, self.state)
        if self.order is MetaGrad.NONE:
            self.fast = {n: p.detach().requires_grad_(True) for n, p in self.fast.items()}
        return loss.detach()


def _run_task(module: nn.Module, task: TaskBatch, loop: InnerLoop, t: int, order: MetaGrad,
              outer: OuterObjective | None, checkpoint_steps: bool = False
              ) -> tuple[Any, Any, Tensor, Params, Params]:
    """Task ``t``: (meta-objective, query loss, support losses, params, buffers)."""
    steps = _LoopSteps(module, loop, order, checkpoint_steps)
    objective, query, support, params = run_task_steps(steps, task, loop, t, order, outer)
    return objective, query, support, params, {n: b.detach() for n, b in steps.buffers.items()}


class LoopEngine(Engine):
    """Runs the inner loop of each task in turn with ``functional_call`` and autograd.

    Args:
        checkpoint_steps: for second-order meta-gradients, keep only each inner step's fast
            weights and optimiser state and recompute its activations during the backward
            pass (``torch.utils.checkpoint``): memory grows with the steps by one copy of
            the weights per step instead of every activation, at the cost of about one more
            forward and inner backward per step. BatchNorm copies then count each step
            twice in their running statistics (the outputs do not use them in train mode).

    Example:
        >>> learner = fastmeta.MAML(model, inner_lr=0.4, inner_steps=50,
        ...                         engine=fastmeta.engines.LoopEngine(checkpoint_steps=True))
    """

    name = "loop"

    def __init__(self, *, checkpoint_steps: bool = False) -> None:
        self.checkpoint_steps = checkpoint_steps

    @staticmethod
    def _context(module: nn.Module, order: MetaGrad) -> contextlib.AbstractContextManager[Any]:
        return exact_layers(module, vectorised=False,
                            second_order=order is MetaGrad.SECOND_ORDER)

    def adapt(self, module: nn.Module, task: TaskBatch, loop: InnerLoop, *,
              order: MetaGrad = MetaGrad.NONE) -> Adaptation:
        with self._context(module, order), torch.enable_grad():
            runs = [_run_task(module, task, loop, t, order, None) for t in range(task.num_tasks)]
        return Adaptation(stack_dicts([r[3] for r in runs]), stack_dicts([r[4] for r in runs]),
                          torch.stack([r[2] for r in runs]))

    def meta_loss(self, module: nn.Module, task: TaskBatch, loop: InnerLoop,
                  outer: OuterObjective, *, order: MetaGrad) -> MetaLosses:
        with self._context(module, order):
            runs = [_run_task(module, task, loop, t, order, outer, self.checkpoint_steps)
                    for t in range(task.num_tasks)]
        return MetaLosses(torch.stack([r[1] for r in runs]).detach(),
                          torch.stack([r[2] for r in runs]), torch.stack([r[0] for r in runs]))

    def meta_gradient(self, module: nn.Module, task: TaskBatch, loop: InnerLoop,
                      outer: OuterObjective, *, order: MetaGrad) -> MetaLosses:
        """Task by task, each task's graph freed after its backward (memory of one task)."""
        queries, supports = [], []
        with self._context(module, order):
            for t in range(task.num_tasks):
                objective, query, support, _, _ = _run_task(module, task, loop, t, order, outer,
                                                            self.checkpoint_steps)
                (objective / task.num_tasks).backward()
                queries.append(query.detach())
                supports.append(support)
        return MetaLosses(torch.stack(queries), torch.stack(supports))
