"""Model factories for tests/test_user_model.py, imported by name as a user's own module would be."""

from __future__ import annotations

import torch
from torch import nn

NOT_CALLABLE = 3


class TinyNet(nn.Module):
    """conv + BatchNorm + ReLU, global average pool, linear: (B, C, H, W) -> (B, classes)."""

    def __init__(self, classes: int = 5, in_channels: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


class Fails(TinyNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("expects 3 channels")


def tiny() -> nn.Module:
    return TinyNet()


def tiny24() -> nn.Module:
    return TinyNet(24)


def rgb() -> nn.Module:
    return TinyNet(5, in_channels=3)


def sized() -> nn.Module:
    model = TinyNet()
    model.input_size = 48
    return model


def broken() -> nn.Module:
    raise RuntimeError("no GPU here")


def not_a_module() -> dict:
    return {"conv": 1}


def no_conv() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3))


def feature_maps() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU())


def fails_forward() -> nn.Module:
    return Fails()


class Holder:
    @staticmethod
    def make() -> nn.Module:
        return TinyNet(3)
