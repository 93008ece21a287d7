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
from .._selection import Selection
from ..engines import Engine


class ANIL(MetaLearner):
    """MAML that adapts only the head; the body is meta-learned but fixed per task.

    ``ANIL(model, head="head")`` equals ``MAML(model, adapt=model.head)``: the head is
    matched by identity, so a head whose weight is tied to another module (GPT-2's
    ``lm_head``, tied to the token embedding) is adapted whole.

    Inner loop: ``φ_head ← φ_head − inner_lr · ∇L_support``; the body keeps θ_body.
    Outer: both body and head initialisation get the meta-gradient.

    Args:
        model: the network to meta-train.
        head: the name of the submodule adapted in the inner loop, as in
            ``model.named_modules()`` (e.g. ``"head"`` for ``fastmeta.models``,
            ``"classifier"``, ``"net.4"``). Required unless ``adapt`` is given.
        inner_lr, inner_steps, first_order, loss_fn: as for :class:`fastmeta.MAML`.
        inner_optimizer, inner_optimizer_kwargs, engine, compile, verify_engine: as for
            :class:`fastmeta.MAML`.
        memory_budget: as for :class:`fastmeta.MAML`.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``, as for :class:`fastmeta.MAML`.
        adapt: instead of ``head``, any selection :class:`fastmeta.MAML` takes.

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
        head: str | None = None,
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
        first_order: bool = False,
    ) -> None:
        modules = dict(model.named_modules()) if isinstance(model, nn.Module) else {}
        if (head is None) == (adapt is None):
            raise ValueError(
                f"ANIL needs exactly one of head= (the name of the submodule to adapt) and "
                f"adapt= (any selection of parameters), got head={head!r} and adapt={adapt!r}"
            )
        if head is not None and isinstance(model, nn.Module):
            if not isinstance(head, str) or not head or head not in modules:
                children = [name for name, _ in model.named_children()]
                raise ValueError(
                    f"head={head!r} is not a submodule of the model; pass the name of the "
                    f"submodule to adapt, as in model.named_modules(), e.g. one of {children}"
                )
            if not any(p.requires_grad for p in modules[head].parameters()):
                raise ValueError(
                    f"head={head!r} has no trainable parameters (requires_grad=True) to adapt"
                )
        super().__init__(
            model, first_order=first_order, inner_lr=inner_lr, inner_steps=inner_steps,
            loss_fn=loss_fn,
            inner_optimizer=inner_optimizer, inner_optimizer_kwargs=inner_optimizer_kwargs,
            engine=engine, compile=compile, verify_engine=verify_engine,
            memory_budget=memory_budget, precision=precision,
            adapt=modules.get(head, head) if isinstance(head, str) else adapt,
        )
        self.head = head

    def extra_repr(self) -> str:
        return f"head={self.head!r}, " + super().extra_repr()
