"""VGG16 with BatchNorm, CIFAR variant: 3x3 convs (bias on) + BN + ReLU, one Linear."""

from __future__ import annotations

import torch.nn as nn

CFG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    def __init__(self, cfg: list, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=True), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)  # identity at 32x32 (1x1 after five pools)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def vgg16_bn(num_classes: int = 10) -> VGG:
    return VGG(CFG16, num_classes)
