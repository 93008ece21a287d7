"""Conv-4: the four-block convolutional backbone of few-shot image classification."""

from __future__ import annotations

from torch import Tensor, nn


def _pooled(size: int, blocks: int) -> int:
    for _ in range(blocks):
        size = (size + 1) // 2  # max-pool 2x2 with ceil_mode=True
    return size


class Conv4(nn.Module):
    """Four blocks of 3×3 conv (``hidden`` channels), BatchNorm, ReLU, 2×2 max-pool; linear head.

    As in MAML's and Prototypical Networks' few-shot image experiments. Pooling uses
    ``ceil_mode=True`` so that small images (8×8 digits) keep a spatial extent.

    Args:
        in_channels: image channels (1 for Omniglot/digits, 3 for miniImageNet).
        num_classes: ways of the classification head.
        hidden: channels of every block.
        image_size: height = width of the inputs, to size the head.
        track_running_stats: BatchNorm keeps running statistics (buffers). The default
            ``False`` always normalises with the statistics of the current batch, the
            transductive setting of the MAML reference implementation; with ``True`` the
            model has buffers, which fastmeta never updates (see ``MetaLearner``).

    Example:
        >>> model = Conv4(in_channels=1, num_classes=5, image_size=28)
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 5,
        hidden: int = 64,
        image_size: int = 84,
        track_running_stats: bool = False,
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        channels = in_channels
        for _ in range(4):
            blocks += [
                nn.Conv2d(channels, hidden, kernel_size=3, padding=1),
                nn.BatchNorm2d(hidden, track_running_stats=track_running_stats),
                nn.ReLU(),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            channels = hidden
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.head = nn.Linear(hidden * _pooled(image_size, 4) ** 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
