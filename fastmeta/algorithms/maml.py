"""MAML and first-order MAML.

References:
    Finn, Abbeel, Levine. "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
    Networks." ICML 2017. https://arxiv.org/abs/1703.03400
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .._learner import LossFn, MetaLearner
from .._selection import Selection
from ..engines import Engine


class MAML(MetaLearner):
    """Model-Agnostic Meta-Learning: learn an initialisation θ that adapts in a few steps.

    Inner loop per task: ``φ ← φ − inner_lr · ∇L_support(φ)`` from ``φ = θ``, ``inner_steps``
    times (or the chosen inner optimiser's rule). Outer: ``θ ← opt(∇_θ mean_tasks L_query(φ))``,
    differentiating through every inner step (``first_order=False``) or treating the inner
    gradients as constants (``first_order=True``).

    Args:
        model: the network to meta-train (not copied; never modified outside ``meta_step``).
        inner_lr: inner learning rate α.
        inner_steps: inner steps per task.
        first_order: drop second derivatives (first-order MAML).
        loss_fn: ``loss_fn(prediction, target)``; default mean squared error.
        inner_optimizer: ``"sgd"`` (default), ``"adam"``, ``"adamw"``, ... or a torch.optim class.
        inner_optimizer_kwargs: its settings (``momentum``, ``betas``, ``weight_decay``, ...).
        engine: ``"auto"`` (default: ``"vmap"`` where a check finds it exact for the model,
            ``"higher"`` otherwise, with a warning naming the reason), ``"vmap"`` or
            ``"higher"``.
        compile: ``torch.compile`` the vectorised meta-step (``"vmap"`` engine only;
            falls back to uncompiled with one warning if compiling fails).
        verify_engine: let ``engine="auto"`` check the vectorised engine once.
        memory_budget: the memory a meta-step may add to what is in use: ``"auto"``
            (default: 80% of what the device can still give), bytes, or a size such as
            ``"6GiB"``. ``engine="auto"`` never runs a candidate predicted over it (see
            :attr:`engine_decision`); the other engines ignore it.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: autocast through both loops,
            float32 weights (:attr:`fastmeta.MetaLearner.precision`).
        adapt: the parameters the inner loop adapts (default: every trainable one): names,
            glob patterns (``"*.bias"``), submodules, parameters or a predicate
            ``(name, parameter) -> bool``, or a list of these; the rest is meta-learned.

    Example:
        >>> learner = fastmeta.MAML(model, inner_lr=0.01, inner_steps=1)
        >>> optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
        >>> result = learner.meta_step(batch, optimizer)
        >>> adapted = learner.adapt(support_x, support_y, steps=10)

    References:
        Finn et al., ICML 2017, https://arxiv.org/abs/1703.03400
    """


class FOMAML(MAML):
    """First-order MAML: ``MAML(first_order=True)``.

    The meta-gradient is the query-loss gradient at the adapted weights,
    ``∇_φ L_query(φ)``, applied to θ. About a third cheaper than second order.

    References:
        Finn et al., ICML 2017, §5.2; Nichol et al. 2018, https://arxiv.org/abs/1803.02999
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
        compile: bool = False,
        verify_engine: bool = True,
        memory_budget: int | str = "auto",
        precision: str | torch.dtype = "fp32",
        adapt: Selection | None = None,
        first_order: bool = True,
    ) -> None:
        if not first_order:
            raise ValueError(
                "FOMAML is first-order by definition; got first_order=False. "
                "Use fastmeta.MAML for second-order meta-gradients"
            )
        super().__init__(
            model, first_order=True, inner_lr=inner_lr, inner_steps=inner_steps,
            loss_fn=loss_fn,
            inner_optimizer=inner_optimizer, inner_optimizer_kwargs=inner_optimizer_kwargs,
            engine=engine, compile=compile, verify_engine=verify_engine,
            memory_budget=memory_budget, adapt=adapt, precision=precision,
        )
