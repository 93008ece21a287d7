"""The learned inner loss of the DAML sine experiment (the DAML blog post's loss network)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class SeedLossNetwork(nn.Module):
    """The DAML blog post's adaptation-loss network: ``|MLP([output, h2, h1])|``, averaged.

    Weights are drawn U(±1/√fan_in) and biases are zero, as in the blog post's code.

    Args:
        in_features: size of ``[output, h2, h1]`` (1 + 32 + 32 in the experiment).
        hidden: widths of the hidden layers.
    """

    def __init__(self, in_features: int = 65, hidden: tuple[int, ...] = (32, 32)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for next_width in hidden:
            layers += [nn.Linear(width, next_width), nn.ReLU()]
            width = next_width
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        for module in self.net:
            if isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.in_features)
                nn.init.uniform_(module.weight, -bound, bound)
                nn.init.zeros_(module.bias)

    def forward(self, output: Tensor, *features: Tensor) -> Tensor:
        """Mean of ``|h|`` over the examples (the blog post's ``l1_loss(h, 0)``)."""
        return self.net(torch.cat([output, *features], dim=-1)).abs().mean()
