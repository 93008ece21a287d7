"""What ``adapt`` and ``adapt_many`` return: models adapted to one task, or to every task."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._tree import Tree, apply, call, call_with, describe, index, leaves, normalise, stack, tree_map


@dataclass(eq=False)  # tensors inside: identity, not elementwise equality
class AdaptedModel:
    """A model adapted to one task: call it like the original model.

    The wrapped model is not touched; the adapted weights live here.

    Attributes:
        params: adapted parameters, keyed like ``model.named_parameters()`` (detached).
        buffers: buffers after adaptation (e.g. BatchNorm statistics of this copy).
        support_losses: ``[steps]`` support loss before each inner step.
    """

    module: nn.Module
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    support_losses: Tensor

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model's forward with the adapted weights.

        Arguments are passed to the model as they are (several positional and keyword
        inputs too); floating-point tensors among them are cast to the weights' dtype and
        device, as :meth:`MetaLearner.adapt` casts the support set.
        """
        # Buffers are cloned per call so that BatchNorm in train mode cannot write into them.
        state = {**self.params, **{k: v.clone() for k, v in self.buffers.items()}}
        reference = next(iter(self.params.values()), None)
        if reference is not None:
            args, kwargs = tree_map(lambda a: _like(a, reference), (args, kwargs))
        return call_with(self.module, state, args, kwargs)

    def named_parameters(self) -> Iterator[tuple[str, Tensor]]:
        """``(name, tensor)`` pairs of the adapted parameters."""
        return iter(self.params.items())

    def as_module(self) -> nn.Module:
        """A deep copy of the wrapped model holding the adapted weights."""
        module = copy.deepcopy(self.module)
        module.load_state_dict({**self.params, **self.buffers}, strict=False)
        return module


@dataclass(eq=False)  # tensors inside: identity, not elementwise equality
class AdaptedTasks:
    """Models adapted to every task of a batch, by :meth:`MetaLearner.adapt_many`.

    Attributes:
        params: adapted parameters, each ``[tasks, ...]``.
        buffers: buffers after adaptation, each ``[tasks, ...]``.
        support_losses: ``[tasks, steps]`` support loss before each inner step.
    """

    module: nn.Module
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    support_losses: Tensor

    def __len__(self) -> int:
        return int(self.support_losses.shape[0])

    def __getitem__(self, index: int) -> AdaptedModel:
        """The model adapted to task ``index``."""
        return AdaptedModel(
            self.module,
            {name: value[index] for name, value in self.params.items()},
            {name: value[index] for name, value in self.buffers.items()},
            self.support_losses[index],
        )

    def __call__(self, x: Tree) -> Any:
        """Outputs of every adapted model on its own inputs.

        Args:
            x: ``[tasks, n, ...]``, or a tuple (positional inputs) or mapping (keyword
                inputs) of such tensors, as the support set was given.

        Returns:
            The model's outputs with a leading task dimension, in the model's own structure
            (a tensor, or a tuple, dict or ``ModelOutput`` of ``[tasks, ...]`` tensors).
        """
        x = normalise(x)
        bad = [leaf for leaf in leaves(x) if not (
            isinstance(leaf, Tensor) and leaf.dim() > 0 and leaf.shape[0] == len(self))]
        if bad or not leaves(x):
            raise ValueError(
                f"x must have one slice per adapted task along dim 0: expected {len(self)}, "
                f"got shape {describe(x)}"
            )
        reference = next(iter(self.params.values()), None)
        if reference is not None:
            x = tree_map(lambda v: _like(v, reference), x)
        if not self.buffers:  # one vectorised call; buffers (BatchNorm) go task by task
            return torch.func.vmap(lambda p, xt: call(self.module, p, xt),
                                   randomness="different")(self.params, x)
        return stack([apply(self[t], index(x, t)) for t in range(len(self))])


def _like(value: Any, reference: Tensor) -> Any:
    """A floating tensor moved to ``reference``'s device and dtype; anything else as is."""
    if isinstance(value, Tensor):
        dtype = reference.dtype if value.is_floating_point() else value.dtype
        return value.to(device=reference.device, dtype=dtype)
    return value
