"""ANIL: Almost No Inner Loop.

References:
    Raghu, Raghu, Bengio, Vinyals. "Rapid Learning or Feature Reuse? Towards Understanding
    the Effectiveness of MAML." ICLR 2020. https://arxiv.org/abs/1909.09157
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .._learner import LossFn, MetaLearner


class ANIL(MetaLearner):
    """MAML that adapts only the head; the body is meta-learned but fixed per task.

    Inner loop: ``φ_head ← φ_head − inner_lr · ∇L_support``; the body keeps θ_body.
    Outer: both body and head initialisation get the meta-gradient.

    Args:
        model: the network to meta-train.
        head: required, no default: the name of the submodule adapted in the inner
            loop, as in ``model.named_modules()`` (e.g. ``"head"`` for
            ``fastmeta.models``, ``"classifier"``, ``"net.4"``).
        inner_lr, inner_steps, first_order, loss_fn: as for :class:`fastmeta.MAML`.
        inner_optimizer, inner_optimizer_kwargs, engine, compile, verify_engine: as for
            :class:`fastmeta.MAML`.

    Example:
        >>> learner = fastmeta.ANIL(fastmeta.models.Conv4(num_classes=5), head="head",
        ...                         inner_lr=0.1, loss_fn="cross_entropy")

    References:
        Raghu et al., ICLR 2020, https://arxiv.org/abs/1909.09157
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        head: str,
        inner_lr: float,
        inner_steps: int = 1,
        loss_fn: str | LossFn | None = None,
        inner_optimizer: str | type[torch.optim.Optimizer] = "sgd",
        inner_optimizer_kwargs: Mapping[str, Any] | None = None,
        engine: str = "auto",
        compile: bool = False,
        verify_engine: bool = True,
        first_order: bool = False,
    ) -> None:
        super().__init__(
            model, first_order=first_order, inner_lr=inner_lr, inner_steps=inner_steps,
            loss_fn=loss_fn,
            inner_optimizer=inner_optimizer, inner_optimizer_kwargs=inner_optimizer_kwargs,
            engine=engine, compile=compile, verify_engine=verify_engine,
        )
        modules = dict(model.named_modules())
        if not isinstance(head, str) or not head or head not in modules:
            children = [name for name, _ in model.named_children()]
            raise ValueError(
                f"head={head!r} is not a submodule of the model; pass the name of the "
                f"submodule to adapt, as in model.named_modules(), e.g. one of {children}"
            )
        self.head = head
        if not self.adapted_names():
            raise ValueError(
                f"head={head!r} has no trainable parameters (requires_grad=True) to adapt"
            )

    def adapted_names(self) -> tuple[str, ...]:
        """Trainable parameters of the head submodule."""
        prefix = self.head + "."
        return tuple(
            name
            for name, p in self.module.named_parameters()
            if p.requires_grad and name.startswith(prefix)
        )

    def extra_repr(self) -> str:
        return f"head={self.head!r}, " + super().extra_repr()
