"""Small fast CNNs for CPU-scale experiments and tests.

``small_cnn``: ``depth`` 3x3 conv + (BN) + ReLU layers of width ``width`` (doubling
after each pool), a max-pool after every second layer, global average pool, Linear.
"""

from __future__ import annotations

import torch.nn as nn


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 32, depth: int = 5, batchnorm: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        c, w = 3, width
        for i in range(depth):
            layers.append(nn.Conv2d(c, w, 3, padding=1, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm2d(w))
            layers.append(nn.ReLU(inplace=True))
            c = w
            if i % 2 == 1 and i < depth - 1:
                layers.append(nn.MaxPool2d(2))
                w = min(w * 2, 8 * width)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def small_cnn(num_classes: int = 10, width: int = 32, depth: int = 5, batchnorm: bool = True) -> SmallCNN:
    return SmallCNN(num_classes, width, depth, batchnorm)
