"""Models by name: ``build_model("resnet18", num_classes=10, bn_init="ones")``.

CIFAR variants (32x32): ``vgg16_bn``, ``resnet18``, ``resnet50``, ``densenet40_bc``;
ImageNet-size: ``imagenet_resnet18``, ``imagenet_resnet50``; small and fast:
``small_cnn`` (``width``, ``depth``, ``batchnorm`` options).

``bn_init``: ``ones`` (the framework default today: weight 1, bias 0) or ``uniform``
(weight ~ U(0,1), as PyTorch 0.3.1 initialised it when the authors ran). DenseNet-40
keeps the authors' explicit weight-1 init either way.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

from .densenet import densenet40_bc
from .resnet import imagenet_resnet18, imagenet_resnet50, resnet18, resnet50
from .small import small_cnn
from .vgg import vgg16_bn

MODELS: dict[str, Callable[..., nn.Module]] = {
    "vgg16_bn": vgg16_bn,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "densenet40_bc": densenet40_bc,
    "imagenet_resnet18": imagenet_resnet18,
    "imagenet_resnet50": imagenet_resnet50,
    "small_cnn": small_cnn,
}
BN_INITS = ("ones", "uniform")
_EXPLICIT_BN_INIT = {"densenet40_bc"}


def build_model(name: str, num_classes: int = 10, bn_init: str = "ones", **kwargs: Any) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    if bn_init not in BN_INITS:
        raise ValueError(f"unknown bn_init {bn_init!r}: choose one of {', '.join(BN_INITS)}")
    model = MODELS[name](num_classes=num_classes, **kwargs)
    if bn_init == "uniform" and name not in _EXPLICIT_BN_INIT:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                nn.init.uniform_(m.weight, 0.0, 1.0)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["MODELS", "BN_INITS", "build_model", "count_parameters"]
