"""Inner objectives: the loss each inner step descends, given the fast weights and data.

An objective is a callable ``objective(ctx: InnerContext) -> scalar``. Engines call it at
every inner step of every task; algorithms choose it. The ones here:

- :class:`SupervisedLoss`: ``loss_fn(model(x), y)``, MAML's.
- :class:`LearnedLoss`: a meta-learned network over the model's outputs and hidden
  features, without targets (DAML's).
- :class:`Proximal`: another objective plus ``lam/2 · ‖φ − θ‖²`` (iMAML's).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .engines import InnerContext

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class SupervisedLoss:
    """``loss_fn(model(x), y)`` on the support set."""

    loss_fn: LossFn

    def __call__(self, ctx: InnerContext) -> Tensor:
        if ctx.y is None:
            raise ValueError(
                "the support set has no targets, and this learner's inner loss "
                "loss_fn(prediction, target) needs them; give the batch support targets, or "
                "use a learner with a learned inner loss (fastmeta.DAML)"
            )
        return self.loss_fn(ctx.forward(ctx.x), ctx.y)


@contextlib.contextmanager
def captured(module: nn.Module, names: tuple[str, ...]) -> Iterator[list[Tensor | None]]:
    """Outputs of the submodules ``names`` of ``module`` during the block, in that order.

    Forward hooks are put on the submodules of the very module object that runs (the
    user's model under ``torch.func.functional_call``, higher's functional copy under
    higher, whose submodules are copies too) and removed afterwards, so the model is
    left as it was. A submodule called twice keeps its last output.
    """
    slots: list[Tensor | None] = [None] * len(names)
    handles = []

    def keep(position: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: object, output: Tensor) -> None:
            slots[position] = output

        return hook

    try:
        for position, name in enumerate(names):
            handles.append(module.get_submodule(name).register_forward_hook(keep(position)))
        yield slots
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class LearnedLoss:
    """An inner loss computed from what the model produced, without support targets.

    Attributes:
        loss: ``loss(output, *features) -> scalar`` (e.g. a network whose parameters are
            meta-parameters). ``features`` are the outputs of the submodules named in
            ``features``, in that order, captured during the same forward pass.
        features: names of submodules as in ``model.named_modules()``.
    """

    loss: Callable[..., Tensor]
    features: tuple[str, ...] = ()

    def __call__(self, ctx: InnerContext) -> Tensor:
        with captured(ctx.module, self.features) as slots:
            output = ctx.forward(ctx.x)
        missing = [name for name, value in zip(self.features, slots) if value is None]
        if missing:
            raise ValueError(
                f"features {missing} produced no output during the model's forward (the "
                f"submodules were not called); name submodules that forward() calls"
            )
        loss = self.loss(output, *slots)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(
                f"adaptation_loss must return a scalar tensor (the inner loss), got "
                f"{shape}; reduce it, e.g. return net(...).abs().mean()"
            )
        return loss


@dataclass(frozen=True)
class Proximal:
    """``base(ctx) + lam/2 · Σ ‖φ − θ‖²``: stay near the initialisation (iMAML)."""

    base: Callable[[InnerContext], Tensor]
    lam: float

    def __call__(self, ctx: InnerContext) -> Tensor:
        distance = sum(((ctx.fast[n] - ctx.initial[n]) ** 2).sum() for n in ctx.fast)
        return self.base(ctx) + 0.5 * self.lam * torch.as_tensor(distance)
