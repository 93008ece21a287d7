"""DAML: domain-adaptive meta-learning with a learned, label-free inner loss.

References:
    Yu, Finn, Xie, Dasari, Zhang, Abbeel, Levine. "One-Shot Imitation from Observing
    Humans via Domain-Adaptive Meta-Learning." RSS 2018. https://arxiv.org/abs/1802.01557
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._learner import LossFn, MetaLearner
from .._objectives import LearnedLoss
from .._selection import Selection
from ..engines import Engine


class DAML(MetaLearner):
    """MAML whose inner loss is a meta-learned network: adapts on unlabelled inputs.

    Inner loop per task, on unlabelled support (source-domain) inputs ``x``:
    ``φ ← φ − inner_lr · ∇_φ L_ω(f_φ(x), h_1, ..., h_k)``, where ``h_i`` are the outputs
    of the submodules named in ``features`` and ``L_ω`` is ``adaptation_loss``.
    Outer: ``(θ, ω) ← opt(∇_(θ, ω) mean_tasks loss_fn(f_φ(query_x), query_y))`` on the
    labelled query (target-domain) pairs, differentiating through every inner step.

    Batches are as for :class:`fastmeta.MAML`, except that the support part may hold
    inputs only: ``{"train": [x], "test": [x, y]}`` (also ``"train": x`` or
    ``[x, None]``; support targets, if present, are ignored). ``adapt(x)`` takes
    inputs alone.

    Hidden features: give the names of submodules, as in ``model.named_modules()``
    (e.g. ``features=("body.3", "body.1")``). Their outputs are captured with forward
    hooks put, for the duration of each forward pass, on the module object that actually
    runs: the model itself on the vectorised engine, higher's functional copy on the
    higher engine (hooks on the original model do not fire there). The model's
    ``forward`` stays as it is. A submodule called twice contributes its last output.

    Args:
        model: the network to meta-train.
        adaptation_loss: ``adaptation_loss(output, *features) -> scalar``; an
            ``nn.Module`` (its parameters become meta-parameters, in
            ``learner.parameters()`` and ``learner.state_dict()``) or any callable.
            For the loss network of the “Meta Learning in PyTorch” blog post, which
            outputs a value ``h`` per input, return ``h.abs().mean()``.
        inner_lr: inner learning rate α.
        inner_steps: inner steps per task.
        features: names of submodules whose outputs ``adaptation_loss`` receives after
            the model's output, in this order.
        loss_fn: outer loss on the query pairs (default mean squared error; e.g. ``"l1"``).
        inner_optimizer, inner_optimizer_kwargs, engine, compile, verify_engine, adapt: as for
            :class:`fastmeta.MAML`. Both engines run DAML.
        memory_budget: as for :class:`fastmeta.MAML`.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``, as for :class:`fastmeta.MAML`.
        first_order: must stay ``False``.

    Raises:
        ValueError: ``first_order=True`` (the loss network would get no meta-gradient),
            or a name in ``features`` that is not a submodule of ``model``.
        TypeError: ``adaptation_loss`` is not callable.

    Example:
        >>> model = fastmeta.models.SineMLP(hidden=(32, 32))
        >>> learner = fastmeta.DAML(model, adaptation_loss=LossNet(), inner_lr=0.03,
        ...                         inner_steps=5, features=("body.3", "body.1"), loss_fn="l1")
        >>> optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)  # θ and ω
        >>> learner.meta_step({"train": [source_x], "test": [target_x, target_y]}, optimizer)
        >>> adapted = learner.adapt(new_source_x)   # no targets
        >>> prediction = adapted(target_grid)

    References:
        Yu et al., RSS 2018, https://arxiv.org/abs/1802.01557
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        adaptation_loss: nn.Module | Callable[..., Tensor],
        inner_lr: float,
        inner_steps: int = 1,
        features: Sequence[str] = (),
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
        if first_order:
            raise ValueError(
                "DAML cannot be first-order: got first_order=True, but the learned inner "
                "loss reaches the query loss only through the inner gradients, so with "
                "first-order meta-gradients adaptation_loss would never be trained. "
                "Drop first_order"
            )
        super().__init__(
            model, inner_lr=inner_lr, inner_steps=inner_steps, loss_fn=loss_fn,
            inner_optimizer=inner_optimizer, inner_optimizer_kwargs=inner_optimizer_kwargs,
            engine=engine, compile=compile, verify_engine=verify_engine,
            memory_budget=memory_budget, adapt=adapt, precision=precision,
        )
        if not callable(adaptation_loss):
            raise TypeError(
                f"adaptation_loss must be an nn.Module or a callable (output, *features) -> "
                f"scalar loss, got {type(adaptation_loss).__name__}"
            )
        if isinstance(features, str):
            raise TypeError(
                f"features must be a sequence of submodule names, got the string "
                f"{features!r}; write features=({features!r},)"
            )
        modules = dict(model.named_modules())
        self.features = tuple(features)
        for name in self.features:
            if not isinstance(name, str) or not name or name not in modules:
                available = [n for n in modules if n]
                raise ValueError(
                    f"features contains {name!r}, which is not a submodule of the model; "
                    f"name submodules as in model.named_modules(), e.g. one of {available[:10]}"
                )
        self.adaptation_loss = adaptation_loss

    def inner_objective(self) -> LearnedLoss:
        """The learned loss over the model's output and the named features."""
        return LearnedLoss(self.adaptation_loss, self.features)

    def extra_repr(self) -> str:
        return f"features={self.features!r}, " + super().extra_repr()
