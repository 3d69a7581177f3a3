"""Tiny architectures with normalisation layers for the real-world-zoo tests (`module:callable` builders).

Inputs are flat feature vectors ``[n, side * side]`` (what ``.npz`` datasets give); the CNNs
reshape them to one-channel images.
"""

from __future__ import annotations

from torch import nn


class BNCNN(nn.Module):
    """``Conv2d -> BatchNorm2d -> ReLU -> global average pool -> Linear``."""

    def __init__(self, side: int = 4, channels: int = 8, num_classes: int = 3):
        super().__init__()
        self.side = side
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = x.view(-1, 1, self.side, self.side)
        return self.head(nn.functional.relu(self.bn(self.conv(x))).mean((2, 3)))


class BNMLP(nn.Sequential):
    """``Linear -> BatchNorm1d -> ReLU -> Linear``."""

    def __init__(self, in_features: int = 16, hidden: int = 8, num_classes: int = 3):
        super().__init__(nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


class LNMLP(nn.Sequential):
    """``Linear -> LayerNorm -> ReLU -> Linear``."""

    def __init__(self, in_features: int = 16, hidden: int = 8, num_classes: int = 3):
        super().__init__(nn.Linear(in_features, hidden), nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


class GNCNN(BNCNN):
    """`BNCNN` with ``GroupNorm(2, channels)`` in place of the BatchNorm."""

    def __init__(self, side: int = 4, channels: int = 8, num_classes: int = 3):
        super().__init__(side, channels, num_classes)
        self.bn = nn.GroupNorm(2, channels)
