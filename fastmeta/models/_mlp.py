"""The fully connected network of the sine-wave experiments."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}
_INITS = ("torch", "fan_in", "xavier")


class SineMLP(nn.Module):
    """MLP regressor: ``in → hidden... → out`` with a final linear ``head``.

    The MAML paper's sine network is the default (1 → 40 → 40 → 1, ReLU); the Reptile
    demo uses ``hidden=(64, 64), activation="tanh"``.

    Args:
        in_features: input size.
        out_features: output size.
        hidden: width of each hidden layer (its length is the depth).
        activation: ``"relu"`` or ``"tanh"``.
        init: ``"torch"`` (PyTorch's default), ``"fan_in"`` (weights U(±1/√fan_in), zero
            biases, as in the “Meta Learning in PyTorch” blog post) or ``"xavier"``
            (weights and biases U(±√(6/(fan_in+fan_out))), as in the “Meta-Learning with
            Julia & Flux” blog post, which found it avoids divergence on the sine problem).

    Example:
        >>> model = SineMLP(hidden=(64, 64), activation="tanh", init="xavier")
    """

    def __init__(
        self,
        in_features: int = 1,
        out_features: int = 1,
        hidden: Sequence[int] = (40, 40),
        activation: str = "relu",
        init: str = "torch",
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(_ACTIVATIONS)}, got {activation!r}")
        if init not in _INITS:
            raise ValueError(f"init must be one of {list(_INITS)}, got {init!r}")
        if not hidden or any(int(width) < 1 for width in hidden):
            raise ValueError(f"hidden must be a non-empty sequence of widths >= 1, got {hidden!r}")
        layers: list[nn.Module] = []
        width = in_features
        for next_width in hidden:
            layers += [nn.Linear(width, int(next_width)), _ACTIVATIONS[activation]()]
            width = int(next_width)
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)
        if init != "torch":
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    _init_linear(module, init)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def _init_linear(layer: nn.Linear, init: str) -> None:
    fan_out, fan_in = layer.weight.shape
    with torch.no_grad():
        if init == "fan_in":
            bound = 1 / math.sqrt(fan_in)
            layer.weight.uniform_(-bound, bound)
            layer.bias.zero_()
        else:
            bound = math.sqrt(6 / (fan_in + fan_out))
            layer.weight.uniform_(-bound, bound)
            layer.bias.uniform_(-bound, bound)
