"""The small CNN and the scikit-learn digits data that ``gradwatch demo`` and ``examples/`` train.

Everything is local: the 1797 8x8 images ship inside scikit-learn, nothing is downloaded.
Imports torch and scikit-learn, so only the commands that train import this module.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


def make_model() -> nn.Sequential:
    """A small CNN for 1x8x8 inputs (~10k parameters, 10 gradient tensors with readable names:
    ``conv1.weight`` ... ``fc.bias``)."""
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 16, 3, padding=1)), ("bn1", nn.BatchNorm2d(16)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(16, 32, 3, padding=1)), ("bn2", nn.BatchNorm2d(32)), ("relu2", nn.ReLU()),
        ("pool", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()), ("fc", nn.Linear(32 * 4 * 4, 10)),
    ]))


def load(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The digits scaled to [0, 1], split 80/20 with a fixed permutation: x_train, y_train, x_test, y_test."""
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError:
        raise SystemExit("the digits data ships with scikit-learn: pip install \"gradwatch[demo]\" "
                         "(or pip install scikit-learn)") from None
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_train = int(0.8 * len(y))
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` in eval mode (train mode restored)."""
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc
