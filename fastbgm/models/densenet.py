"""DenseNet-40 as the authors built it: DenseNet-BC (bottleneck + compression 0.5),
growth 12, 6 bottleneck layers per dense block, 24 initial channels, and the
authors' explicit init (conv N(0, sqrt(2/(k*k*out))), BN weight 1 / bias 0,
Linear bias 0)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        inter = 4 * growth
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, inter, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(inter)
        self.conv2 = nn.Conv2d(inter, growth, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([x, out], 1)


class _Transition(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNetBC(nn.Module):
    def __init__(self, depth: int = 40, growth: int = 12, reduction: float = 0.5, num_classes: int = 10):
        super().__init__()
        n = (depth - 4) // 6  # bottleneck layers per block
        c = 2 * growth
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        for b in range(3):
            layers = []
            for _ in range(n):
                layers.append(_Bottleneck(c, growth))
                c += growth
            blocks.append(nn.Sequential(*layers))
            if b < 2:
                out = int(math.floor(c * reduction))
                blocks.append(_Transition(c, out))
                c = out
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / k))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def forward(self, x):
        out = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def densenet40_bc(num_classes: int = 10) -> DenseNetBC:
    return DenseNetBC(40, 12, 0.5, num_classes)
