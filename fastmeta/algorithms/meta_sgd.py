"""Meta-SGD: learned per-parameter inner learning rates.

References:
    Li, Zhou, Chen, Li. "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning."
    2017. https://arxiv.org/abs/1707.09835
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._learner import LossFn, MetaLearner
from .._selection import Selection
from ..engines import Engine, InnerRates


class MetaSGD(MetaLearner):
    """MAML whose inner learning rate is a meta-learned tensor α, one rate per weight.

    Inner loop: ``φ ← φ − α ∘ ∇L_support(φ)`` (elementwise). Outer: θ and α are both
    meta-parameters, returned together by ``learner.parameters()``; the rates live in
    ``learner.inner_lrs`` (a ``ParameterDict``, keys are parameter names with ``.``
    replaced by ``-``) and start at ``inner_lr``.

    Args:
        model: the network to meta-train.
        inner_lr: initial value of every rate.
        inner_steps, first_order, loss_fn: as for :class:`fastmeta.MAML`.
        inner_optimizer, inner_optimizer_kwargs: as for :class:`fastmeta.MAML`; with
            another inner optimiser than SGD, the learned rates scale that optimiser's step.
        engine, compile, verify_engine, adapt: as for :class:`fastmeta.MAML`.
        memory_budget: as for :class:`fastmeta.MAML`.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``, as for :class:`fastmeta.MAML`.

    Example:
        >>> learner = fastmeta.MetaSGD(model, inner_lr=0.01)
        >>> optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)  # θ and α

    References:
        Li et al. 2017, https://arxiv.org/abs/1707.09835
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
        first_order: bool = False,
    ) -> None:
        super().__init__(
            model, first_order=first_order, inner_lr=inner_lr, inner_steps=inner_steps,
            loss_fn=loss_fn,
            inner_optimizer=inner_optimizer, inner_optimizer_kwargs=inner_optimizer_kwargs,
            engine=engine, compile=compile, verify_engine=verify_engine,
            memory_budget=memory_budget, adapt=adapt, precision=precision,
        )
        named = dict(model.named_parameters())
        self._lr_keys = {name: name.replace(".", "-") for name in super().adapted_names()}
        # An OrderedDict keeps the model's parameter order (a plain dict would be sorted).
        self.inner_lrs = nn.ParameterDict(
            OrderedDict(
                (key, nn.Parameter(torch.full_like(named[name].detach(), self.inner_lr)))
                for name, key in self._lr_keys.items()
            )
        )

    def adapted_names(self) -> tuple[str, ...]:
        """The parameters that have a learned rate (trainable at construction)."""
        return tuple(self._lr_keys)

    def inner_rates(self) -> InnerRates:
        """The learned rates, the same at every inner step."""
        return self._rates

    def _rates(self, step: int) -> dict[str, Tensor]:
        return {name: self.inner_lrs[key] for name, key in self._lr_keys.items()}
