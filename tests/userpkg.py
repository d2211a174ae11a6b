"""A user's own package, written into a folder by the tests: a small CNN factory and a numpy
data loader, as a researcher would have them (``<name>/nets.py``, ``<name>/data.py``)."""

from __future__ import annotations

import textwrap
from pathlib import Path

NETS = '''
import torch
from torch import nn


class Net(nn.Module):
    """conv1 -> conv2 -> mean over space -> head."""

    def __init__(self, channels, num_classes, width):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean(dim=(2, 3)))


def build_net(num_classes, input_shape, width=8):
    return Net(input_shape[0], num_classes, width)
'''

DATA = '''
import numpy as np


def load(n=240, size=8, classes=3, seed=0):
    """Learnable random images: a fixed pattern per class plus noise; train split only."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    means = rng.normal(size=(classes, 1, size, size)).astype(np.float32)
    x = (means[y] + 0.5 * rng.normal(size=(n, 1, size, size))).astype(np.float32)
    return {"train": (x, y.astype(np.int64))}
'''


def write_package(root: Path, name: str) -> Path:
    """``root/<name>/`` with ``nets.py`` (``build_net``) and ``data.py`` (``load``)."""
    package = root / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(textwrap.dedent(NETS))
    (package / "data.py").write_text(textwrap.dedent(DATA))
    return package


def job_dict(job: str, package: str, **top) -> dict:
    """A CS sweep and an IMP chain on the package's CNN and data, small enough for 2 CPUs."""
    data = {
        "name": job,
        "model": {"factory": f"{package}.nets:build_net", "kwargs": {"width": 8}},
        "data": {"factory": f"{package}.data:load", "kwargs": {"n": 240}},
        "train": {"epochs_per_round": 3, "lr_milestones": [2], "rewind_epoch": 1,
                  "batch_size": 32, "lr": 0.05, "device": "cpu", "checkpoint_every": 2},
        "methods": {"cs": {"rounds": 2, "sweep": {"mask_init": [0.0, -0.05]}},
                    "imp": {"rounds": 2}},
        "resources": {"cpus": 0.5},
    }
    data.update(top)
    return data

