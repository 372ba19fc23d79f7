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

from .labels import LABEL_MODES, LabelSpec, make_label_table
from .loader import DeviceLoader, ResidentLoader, StreamLoader, balanced_subset, loader_from_arrays, make_loader
from .manifest import Manifest, beton_path, manifest_path
from .sources import DatasetError

__all__ = [
    "make_loader",
    "loader_from_arrays",
    "LabelSpec",
    "LABEL_MODES",
    "make_label_table",
    "DeviceLoader",
    "ResidentLoader",
    "StreamLoader",
    "balanced_subset",
    "Manifest",
    "beton_path",
    "manifest_path",
    "DatasetError",
]
