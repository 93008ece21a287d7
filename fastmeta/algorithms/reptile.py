"""Reptile.

References:
    Nichol, Achiam, Schulman. "On First-Order Meta-Learning Algorithms." 2018.
    https://arxiv.org/abs/1803.02999
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._learner import AdaptedTasks, LossFn, MetaLearner, check_steps
from .._selection import Selection
from .._task import TaskBatch
from .._tree import apply, first_leaf, index
from ..engines import Engine, MetaLosses


class Reptile(MetaLearner):
    """Reptile: move the initialisation towards the weights each task trains to.

    Inner loop per task: ``inner_steps`` optimiser steps on the support set, from θ to φ.
    Outer: ``meta_step`` writes the pseudo-gradient ``θ − mean_tasks φ`` into ``.grad`` and
    steps the user's optimiser, so ``torch.optim.SGD(lr=ε)`` gives classic Reptile
    ``θ ← θ + ε (mean φ − θ)``, and any other optimiser (Adam, ...) also works.
    The query set is only used to report the loss after adaptation.

    Args:
        model: the network to meta-train.
        inner_lr: inner learning rate.
        inner_steps: inner steps per task.
        inner_batch_size: support examples per inner step; ``None`` uses the whole support
            set at every step. With minibatches, each task's support set is reshuffled after
            every pass (as in the Reptile paper's sine experiment).
        loss_fn, inner_optimizer, inner_optimizer_kwargs, engine, compile, verify_engine, adapt: as
            for :class:`fastmeta.MAML`.
        memory_budget: as for :class:`fastmeta.MAML`.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``, as for :class:`fastmeta.MAML`.
        first_order: not accepted (Reptile never differentiates through the inner loop).

    Example:
        >>> learner = fastmeta.Reptile(model, inner_lr=0.02, inner_steps=5, inner_batch_size=10)
        >>> result = learner.meta_step(batch, torch.optim.SGD(learner.parameters(), lr=0.1))

    References:
        Nichol et al. 2018, https://arxiv.org/abs/1803.02999
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        inner_lr: float,
        inner_steps: int,
        inner_batch_size: int | None = None,
        loss_fn: str | LossFn | None = None,
        inner_optimizer: str | type[torch.optim.Optimizer] = "sgd",
        inner_optimizer_kwargs: Mapping[str, Any] | None = None,
        engine: str | Engine = "auto",
        compile: bool = False,
        verify_engine: bool = True,
        memory_budget: int | str = "auto",
        precision: str | torch.dtype = "fp32",
        adapt: Selection | None = None,
        first_order: bool | None = None,
    ) -> None:
        if first_order is not None:
            raise ValueError(
                "Reptile takes no first_order argument: it never differentiates through "
                "the inner loop"
            )
        super().__init__(
            model, inner_lr=inner_lr, inner_steps=inner_steps, loss_fn=loss_fn,
            inner_optimizer=inner_optimizer, inner_optimizer_kwargs=inner_optimizer_kwargs,
            engine=engine, compile=compile, verify_engine=verify_engine,
            memory_budget=memory_budget, adapt=adapt, precision=precision,
        )
        self.first_order = True
        self.inner_batch_size = None
        if inner_batch_size is not None:
            self.inner_batch_size = check_steps("inner_batch_size", inner_batch_size, 1)

    def support_schedule(self, task: TaskBatch, steps: int) -> Tensor | None:
        if self.inner_batch_size is None or steps == 0:
            return None
        task.check_per_example(f"inner_batch_size={self.inner_batch_size}")
        shots = task.support_shots
        if self.inner_batch_size > shots:
            raise ValueError(
                f"inner_batch_size={self.inner_batch_size} is larger than the {shots} support "
                f"examples per task; use inner_batch_size <= {shots} or None"
            )
        needed = steps * self.inner_batch_size
        passes = math.ceil(needed / shots)
        rows = [
            torch.cat([torch.randperm(shots) for _ in range(passes)])[:needed]
            for _ in range(task.num_tasks)
        ]
        indices = torch.stack(rows).view(task.num_tasks, steps, self.inner_batch_size)
        return indices.to(first_leaf(task.support_x).device)

    def meta_gradient(self, task: TaskBatch) -> MetaLosses:
        """Write the pseudo-gradient ``θ − mean_tasks φ`` into ``.grad`` of the adapted
        parameters; the query losses (after adaptation) are only reported."""
        loop = self.inner_loop(task, self.inner_steps)
        adaptation = self._engine.adapt(self.module, task, loop)
        named = dict(self.module.named_parameters())
        with torch.no_grad():
            for name in loop.adapted:
                param = named[name]
                param.grad = param.detach() - adaptation.params[name].mean(dim=0)
            adapted = AdaptedTasks(self.module, adaptation.params, adaptation.buffers,
                                   adaptation.support_losses)
            if self.engine == "vmap":  # one vectorised forward
                stacked = adapted(task.query_x)
                outputs = [index(stacked, t) for t in range(task.num_tasks)]
            else:  # a model vmap cannot run (an RNN): task by task
                outputs = [apply(adapted[t], index(task.query_x, t))
                           for t in range(task.num_tasks)]
            query = torch.stack([self.loss_fn(outputs[t], index(task.query_y, t))
                                 for t in range(task.num_tasks)])
        return MetaLosses(query, adaptation.support_losses)

    def meta_loss(self, batch: TaskBatch | Mapping[str, Any]) -> Tensor:
        """Not defined for Reptile.

        Raises:
            TypeError: always; Reptile's update ``θ − mean φ`` is not the gradient of a loss.
        """
        raise TypeError(
            "Reptile has no differentiable meta-loss: its update θ − mean(φ) is not the "
            "gradient of a function. Use meta_step(), or MAML/FOMAML for a meta-loss"
        )
