"""ResNet-12, the deeper few-shot backbone (Oreshkin et al. 2018; Lee et al. 2019)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class _Block(nn.Module):
    """Three 3×3 conv-BN-LeakyReLU layers with a 1×1 conv shortcut, then 2×2 max-pool."""

    def __init__(self, in_channels: int, out_channels: int, track_running_stats: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for index in range(3):
            layers.append(nn.Conv2d(channels, out_channels, 3, padding=1, bias=False))
            layers.append(nn.BatchNorm2d(out_channels, track_running_stats=track_running_stats))
            if index < 2:
                layers.append(nn.LeakyReLU(0.1))
            channels = out_channels
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels, track_running_stats=track_running_stats),
        )
        self.out = nn.Sequential(nn.LeakyReLU(0.1), nn.MaxPool2d(2, ceil_mode=True))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.body(x) + self.shortcut(x))


class ResNet12(nn.Module):
    """ResNet-12: four residual blocks, global average pooling, linear ``head``.

    Args:
        in_channels: image channels.
        num_classes: ways of the classification head.
        channels: output channels of the four blocks (MetaOptNet uses 64, 160, 320, 640).
        track_running_stats: as for :class:`Conv4`.

    Example:
        >>> model = ResNet12(in_channels=3, num_classes=5)
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 5,
        channels: Sequence[int] = (64, 160, 320, 640),
        track_running_stats: bool = False,
    ) -> None:
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"channels must list 4 block widths, got {list(channels)}")
        blocks = []
        previous = in_channels
        for width in channels:
            blocks.append(_Block(previous, int(width), track_running_stats))
            previous = int(width)
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(previous, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
