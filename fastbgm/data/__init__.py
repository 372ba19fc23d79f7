"""fastbgm.data: FFCV datasets and a loader that yields ready batches on the device.

Use from any project::

    from fastbgm.data import make_loader, LabelSpec

    train = make_loader("data/cifar10/train.beton", batch_size=512, device="cuda",
                        labels=LabelSpec("confusion", seed=0, copies=10, zero_ratio=0.1),
                        dtype=torch.bfloat16)
    for epoch in range(10):
        train.set_epoch(epoch)
        for images, labels, indices in train:
            ...

Writers: ``python -m fastbgm.data prepare {cifar10,cifar100,imagefolder,restricted-imagenet,synthetic}``.
This package knows nothing of models, trainers or Slurm; ffcv is imported only where
a ``.beton`` is read or written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

# name -> the submodule that defines it, imported on first use (PEP 562): what only reads
# a label mode or a manifest (a launcher, a config check) does not import torch
_EXPORTS = {
    "make_loader": "loader", "loader_from_arrays": "loader", "DeviceLoader": "loader", "ResidentLoader": "loader",
    "StreamLoader": "loader", "balanced_subset": "loader",
    "LabelSpec": "labels", "LABEL_MODES": "labels", "make_label_table": "labels",
    "Manifest": "manifest", "beton_path": "manifest", "manifest_path": "manifest",
    "DatasetError": "sources",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # what the names are, for readers and type checkers
    from .labels import LABEL_MODES, LabelSpec, make_label_table  # noqa: F401
    from .loader import (DeviceLoader, ResidentLoader, StreamLoader, balanced_subset,  # noqa: F401
                         loader_from_arrays, make_loader)
    from .manifest import Manifest, beton_path, manifest_path  # noqa: F401
    from .sources import DatasetError  # noqa: F401


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
