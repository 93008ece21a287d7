"""The general engine: higher's functional copies and differentiable optimisers.

It runs the meta-batch task by task. Every task gets a functional copy of the
model (``higher.monkeypatch`` with ``copy_initial_weights=False``, so that the
meta-gradient reaches the model itself) and a differentiable optimiser. Its
buffers (BatchNorm running statistics) are cloned for each task, so the wrapped
model's buffers never change.

higher's own ``DifferentiableAdam`` follows an outdated formula and higher has no
AdamW; fastmeta registers corrected versions (built on the same update rules as
the vectorised engine) the first time this engine is used.
"""

from __future__ import annotations

from typing import Any

import higher
import higher.optim
import torch
from torch import Tensor, nn

from .._inner_optim import adam_update
from .._task import Task
from ._base import (
    Engine,
    InnerLoop,
    InnerLoopOutput,
    MetaGrad,
    detach_all,
    inner_loss,
    stack_dicts,
    support_batch,
)
from ._exact import exact_layers


class DifferentiableAdam(higher.optim.DifferentiableOptimizer):
    """Differentiable ``torch.optim.Adam`` that follows it step for step (unlike higher's)."""

    decoupled_weight_decay = False

    def _update(self, grouped_grads: list[list[Tensor | None]], **kwargs: Any) -> None:
        for group_idx, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
            for p_idx, (param, grad) in enumerate(zip(group["params"], grads)):
                if grad is None:
                    continue
                new_param, new_state = adam_update(
                    param,
                    grad,
                    self.state[group_idx][p_idx],
                    lr=group["lr"],
                    betas=group["betas"],
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    amsgrad=group["amsgrad"],
                    decoupled_weight_decay=self.decoupled_weight_decay,
                )
                self.state[group_idx][p_idx] = new_state
                group["params"][p_idx] = new_param


class DifferentiableAdamW(DifferentiableAdam):
    """Differentiable ``torch.optim.AdamW`` (higher has none)."""

    decoupled_weight_decay = True


_registered = False


def register_corrected_optimizers() -> None:
    """Register fastmeta's Adam and AdamW with higher (idempotent)."""
    global _registered
    if not _registered:
        higher.register_optim(torch.optim.Adam, DifferentiableAdam)
        higher.register_optim(torch.optim.AdamW, DifferentiableAdamW)
        _registered = True


class HigherEngine(Engine):
    """Runs inner loops with ``higher.innerloop_ctx``, one task at a time."""

    name = "higher"

    def __init__(self) -> None:
        register_corrected_optimizers()

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
        named = dict(module.named_parameters())
        adapted = [named[name] for name in loop.adapted]
        track = meta_grad is not MetaGrad.NONE
        if loop.lrs is None:
            optimizer = loop.optimizer.build([{"params": adapted}], lr=loop.inner_lr)
            override = None
        else:  # one group per parameter, each with its learned rate
            optimizer = loop.optimizer.build(
                [{"params": [param]} for param in adapted], lr=loop.inner_lr
            )
            override = {"lr": [loop.lrs[name] for name in loop.adapted]}
        grad_callback = detach_all if meta_grad is MetaGrad.FIRST_ORDER else None

        second_order = meta_grad is MetaGrad.SECOND_ORDER
        with exact_layers(module, vectorised=False, second_order=second_order):
            results = [
                self._one_task(module, task, loop, index, optimizer, override, track,
                               grad_callback, backward=backward, keep_params=keep_params,
                               query=query)
                for index in range(task.num_tasks)
            ]
        support_losses, query_losses, kept_params, kept_buffers = zip(*results)
        return InnerLoopOutput(
            query_losses=torch.stack(query_losses) if query else torch.zeros(0),
            support_losses=torch.stack(support_losses),
            params=stack_dicts(list(kept_params)) if keep_params else None,
            buffers=stack_dicts(list(kept_buffers)) if keep_params else None,
        )

    @staticmethod
    def _one_task(
        module: nn.Module,
        task: Task,
        loop: InnerLoop,
        index: int,
        optimizer: torch.optim.Optimizer,
        override: dict[str, list[Tensor]] | None,
        track: bool,
        grad_callback: Any,
        *,
        backward: bool,
        keep_params: bool,
        query: bool,
    ) -> tuple[Tensor, Tensor | None, dict[str, Tensor], dict[str, Tensor]]:
        """Support losses, query loss, adapted parameters and buffers of task ``index``."""
        with higher.innerloop_ctx(
            module,
            optimizer,
            copy_initial_weights=False,
            override=override,
            track_higher_grads=track,
        ) as (fmodel, diffopt):
            losses = []
            for step in range(loop.steps):
                x, y = support_batch(task, loop, index, step)
                loss = inner_loss(loop, fmodel, fmodel, x, y)
                losses.append(loss.detach())
                diffopt.step(loss, grad_callback=grad_callback)
            query_loss = None
            if query:
                with torch.set_grad_enabled(track):
                    query_loss = loop.loss_fn(fmodel(task.query_x[index]), task.query_y[index])
                if backward:
                    (query_loss / task.num_tasks).backward()
                    query_loss = query_loss.detach()
            params: dict[str, Tensor] = {}
            buffers: dict[str, Tensor] = {}
            if keep_params:
                names = [name for name, _ in module.named_parameters()]
                params = {n: p.detach() for n, p in zip(names, fmodel.fast_params)}
                buffers = {n: b.detach() for n, b in fmodel.named_buffers()}
        return torch.stack(losses) if losses else torch.zeros(0), query_loss, params, buffers
