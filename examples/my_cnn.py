"""A network and a data set of your own, as ticketsearch takes them (README: "Use your own
model").

``build_cnn`` is a model factory: ticketsearch calls it with the data's ``num_classes`` and
``input_shape`` (it asks for them by naming those parameters) plus ``model.kwargs``.
``load_digit_images`` is a data factory: called with ``data.kwargs``, it returns numpy arrays
per split; the validation split is left out, so ticketsearch splits it off ``train``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class SmallCNN(nn.Module):
    """conv1 -> conv2 -> global average pool -> fc (the classifier), BN and ReLU between."""

    def __init__(self, in_channels: int, num_classes: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def build_cnn(num_classes: int, input_shape: tuple[int, ...], width: int = 16) -> nn.Module:
    """A small CNN for ``(channels, height, width)`` images and ``num_classes`` classes."""
    return SmallCNN(input_shape[0], num_classes, width)


def load_digit_images(test_fraction: float = 0.2, seed: int = 0) -> dict:
    """scikit-learn's 8x8 digits as 1x8x8 float images: train and test splits (numpy)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0 - 0.5)[:, None]  # (N, 1, 8, 8)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(len(y) * (1 - test_fraction))
    train, test = order[:cut], order[cut:]
    return {"train": (x[train], y[train]), "test": (x[test], y[test])}
