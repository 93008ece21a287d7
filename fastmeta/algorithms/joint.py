"""Joint training ("transfer"): the baseline every meta-learning comparison needs.

References:
    Finn, Abbeel, Levine. "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
    Networks." ICML 2017, §5.1 ("pretrained on all tasks"). https://arxiv.org/abs/1703.03400
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._learner import LossFn, MetaLearner
from .._selection import Selection
from .._task import TaskBatch
from .._tree import apply, first_leaf, index, tree_map, zip_map
from ..engines import Engine, MetaLosses


class JointTraining(MetaLearner):
    """Ordinary training on the pooled examples of every task, then fine-tuning.

    ``meta_step`` is one plain gradient step on the mean loss over all examples (support
    and query) of the tasks of the batch: no inner loop, ``θ ← opt(∇_θ mean_tasks
    L_task(θ))``. ``adapt`` fine-tunes like every learner (``inner_lr``, ``inner_steps``,
    ``inner_optimizer``). On tasks that contradict one another (sine waves of random
    phase) the pooled optimum predicts their average, which is why it adapts poorly: the
    failure the MAML paper reports for its "pretrained" baseline.

    The model runs in its own mode on the pooled examples, so BatchNorm in train mode
    updates its running statistics, as in any ordinary training.

    Args:
        model: the network to train.
        inner_lr: learning rate of fine-tuning in ``adapt``.
        inner_steps: default fine-tuning steps in ``adapt``.
        loss_fn, inner_optimizer, inner_optimizer_kwargs, engine, verify_engine, adapt: as for
            :class:`fastmeta.MAML` (the engine runs ``adapt``).
        memory_budget: as for :class:`fastmeta.MAML`.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``, as for :class:`fastmeta.MAML`.
        first_order: not accepted (there is no inner loop to differentiate through).

    Example:
        >>> baseline = fastmeta.JointTraining(model, inner_lr=0.01)
        >>> baseline.meta_step(batch, torch.optim.Adam(baseline.parameters(), lr=1e-3))
        >>> adapted = baseline.adapt(support_x, support_y, steps=10)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        inner_lr: float,
        inner_steps: int = 1,
        loss_fn: str | LossFn | None = None,
        inner_optimizer: str | type[torch.optim.Optimizer] = "sgd",
        inner_optimizer_kwargs: Mapping[str, Any] | None = None,
        engine: str | Engine = "auto",
        verify_engine: bool = True,
        memory_budget: int | str = "auto",
        precision: str | torch.dtype = "fp32",
        adapt: Selection | None = None,
        first_order: bool | None = None,
    ) -> None:
        if first_order is not None:
            raise ValueError(
                "JointTraining takes no first_order argument: it has no inner loop to "
                "differentiate through"
            )
        super().__init__(
            model, inner_lr=inner_lr, inner_steps=inner_steps, loss_fn=loss_fn,
            inner_optimizer=inner_optimizer, inner_optimizer_kwargs=inner_optimizer_kwargs,
            engine=engine, verify_engine=verify_engine,
            memory_budget=memory_budget, adapt=adapt, precision=precision,
        )

    def _pooled_losses(self, task: TaskBatch) -> Tensor:
        """``[tasks]`` loss of the model on all of each task's examples."""
        assert task.support_y is not None  # prepare refuses unlabelled support sets
        task.check_per_example("JointTraining (which pools every task's examples)")
        x = zip_map(lambda s, q: torch.cat([s, q], dim=1), task.support_x, task.query_x)
        y = zip_map(lambda s, q: torch.cat([s, q], dim=1), task.support_y, task.query_y)
        tasks, shots = first_leaf(x).shape[:2]
        flat = apply(self.module, tree_map(lambda v: v.flatten(0, 1), x))
        out = tree_map(lambda v: v.view(tasks, shots, *v.shape[1:]), flat)
        return torch.stack([self.loss_fn(index(out, t), index(y, t))
                            for t in range(task.num_tasks)])

    def meta_gradient(self, task: TaskBatch) -> MetaLosses:
        """The gradient of the pooled loss (no adaptation)."""
        losses = self._pooled_losses(task)
        losses.mean().backward()
        return MetaLosses(losses.detach(), losses.new_zeros(task.num_tasks, 0))

    def meta_loss(self, batch: TaskBatch | Mapping[str, Any]) -> Tensor:
        """Mean loss over all examples of every task (no adaptation), differentiable."""
        return self._pooled_losses(self.prepare(batch)).mean()
