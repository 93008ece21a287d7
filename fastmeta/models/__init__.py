"""Standard meta-learning backbones: the sine MLP, Conv-4 and ResNet-12.

Each has its last layer as a submodule named ``head``, so ``fastmeta.ANIL(model,
head="head")`` works on all of them.
"""

from __future__ import annotations

from ._conv4 import Conv4
from ._mlp import SineMLP
from ._resnet12 import ResNet12

__all__ = ["Conv4", "ResNet12", "SineMLP"]
