"""Models by name: ``build_model("resnet18", num_classes=10, bn_init="ones")``.

CIFAR variants (32x32): ``vgg16_bn``, ``resnet18``, ``resnet50``, ``densenet40_bc``;
ImageNet-size: ``imagenet_resnet18``, ``imagenet_resnet50``; small and fast:
``small_cnn`` (``width``, ``depth``, ``batchnorm`` options).

``bn_init``: ``ones`` (the framework default today: weight 1, bias 0) or ``uniform``
(weight ~ U(0,1), as PyTorch 0.3.1 initialised it when the authors ran). DenseNet-40
keeps the authors' explicit weight-1 init either way.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch.nn as nn

# name -> (module, builder), imported when a model is built: a config that names a model
# (as a launcher checks it) needs no torch
MODELS: dict[str, tuple[str, str]] = {
    "vgg16_bn": ("vgg", "vgg16_bn"),
    "resnet18": ("resnet", "resnet18"),
    "resnet50": ("resnet", "resnet50"),
    "densenet40_bc": ("densenet", "densenet40_bc"),
    "imagenet_resnet18": ("resnet", "imagenet_resnet18"),
    "imagenet_resnet50": ("resnet", "imagenet_resnet50"),
    "small_cnn": ("small", "small_cnn"),
}
BN_INITS = ("ones", "uniform")
_EXPLICIT_BN_INIT = {"densenet40_bc"}


def build_model(name: str, num_classes: int = 10, bn_init: str = "ones", **kwargs: Any) -> nn.Module:
    import torch.nn as nn

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    if bn_init not in BN_INITS:
        raise ValueError(f"unknown bn_init {bn_init!r}: choose one of {', '.join(BN_INITS)}")
    module, builder = MODELS[name]
    model = getattr(importlib.import_module(f".{module}", __name__), builder)(num_classes=num_classes, **kwargs)
    if bn_init == "uniform" and name not in _EXPLICIT_BN_INIT:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                nn.init.uniform_(m.weight, 0.0, 1.0)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["MODELS", "BN_INITS", "build_model", "count_parameters"]
