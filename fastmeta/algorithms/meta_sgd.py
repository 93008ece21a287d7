"""Meta-SGD: learned per-parameter inner learning rates.

References:
    Li, Zhou, Chen, Li. "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning."
    2017. https://arxiv.org/abs/1707.09835
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn

from .._learner import MetaLearner


class MetaSGD(MetaLearner):
    """MAML whose inner learning rate is a meta-learned tensor α, one rate per weight.

    Inner loop: ``φ ← φ − α ∘ ∇L_support(φ)`` (elementwise). Outer: θ and α are both
    meta-parameters, returned together by ``learner.parameters()``; the rates live in
    ``learner.inner_lrs`` (a ``ParameterDict``, keys are parameter names with ``.``
    replaced by ``-``) and start at ``inner_lr``.

    Args:
        model: the network to meta-train.
        inner_lr: initial value of every rate.
        **kwargs: as for :class:`fastmeta.MAML`. With another inner optimiser than SGD,
            the learned rates scale that optimiser's step.

    Example:
        >>> learner = fastmeta.MetaSGD(model, inner_lr=0.01)
        >>> optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)  # θ and α

    References:
        Li et al. 2017, https://arxiv.org/abs/1707.09835
    """

    def __init__(self, model: nn.Module, *, inner_lr: float, **kwargs: Any) -> None:
        super().__init__(model, inner_lr=inner_lr, **kwargs)
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

    def _learned_lrs(self) -> dict[str, Tensor] | None:
        return {name: self.inner_lrs[key] for name, key in self._lr_keys.items()}
