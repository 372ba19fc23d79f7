"""Loader throughput: fastbgm's resident and stream loaders against the pipeline
the authors' code uses (torchvision's CIFAR-10 dataset with PIL transforms in a
``DataLoader``), all measured in the same run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .common import device_info, print_table, synthetic_beton, time_images, write_json

log = logging.getLogger(__name__)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


class _PilCifar(torch.utils.data.Dataset):
    """torchvision.datasets.CIFAR10's __getitem__ (uint8 array -> PIL -> transforms),
    with RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize.
    Uses torchvision's transforms when it imports, else the same steps in PIL/torch."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels
        try:
            import torchvision.transforms as T

            self.tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                                 T.Normalize(CIFAR_MEAN, CIFAR_STD)])
            self.kind = "torchvision"
        except Exception:
            self.tf = None
            self.kind = "PIL (torchvision-equivalent)"
        self.mean = torch.tensor(CIFAR_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CIFAR_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def _transform(self, img: Any) -> torch.Tensor:
        from PIL import Image, ImageOps

        img = ImageOps.expand(img, border=4, fill=0)
        x, y = np.random.randint(0, 9, size=2)
        img = img.crop((x, y, x + 32, y + 32))
        if np.random.rand() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        t = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
        return (t - self.mean) / self.std

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        img = Image.fromarray(self.images[i])
        x = self.tf(img) if self.tf is not None else self._transform(img)
        return x, int(self.labels[i])


def run(device: torch.device, data_root: Path, seconds: float, batch_size: int, out: Path | None,
        workers: int) -> dict[str, Any]:
    from fastbgm.data import LabelSpec, make_loader
    from fastbgm.data.cache import load_resident
    from fastbgm.data.ffcv_io import ffcv_available

    rows: list[list[Any]] = []
    results: dict[str, Any] = {"info": device_info(device), "batch_size": batch_size}

    raw = synthetic_beton(data_root, "cifar-size-raw", 10000, 32, "raw") if ffcv_available() else None
    cache_only = data_root / "cifar-size-raw" / "train.beton"
    arrays = load_resident(raw or cache_only)

    # Baseline: PIL transforms in a DataLoader with worker processes.
    base_ds = _PilCifar(arrays.images, arrays.labels)
    dl = torch.utils.data.DataLoader(base_ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                     drop_last=True, pin_memory=device.type == "cuda")

    def base_epoch() -> int:
        n = 0
        for x, y in dl:
            x = x.to(device, non_blocking=True)
            n += len(x)
        return n

    # non-persistent workers exit when each epoch's iterator ends: none linger into the next timing
    base = time_images(base_epoch, device, seconds)
    rows.append([f"baseline: {base_ds.kind} DataLoader ({workers} workers)", base, 1.0])
    results["baseline"] = base

    spec = LabelSpec("confusion", seed=0, copies=4, zero_ratio=0.1)
    res = make_loader(raw or cache_only, batch_size=batch_size, device=device, labels=spec, augment=True,
                      placement="resident")

    def res_epoch() -> int:
        n = 0
        for x, y, i in res:
            n += len(y)
        return n

    r = time_images(res_epoch, device, seconds)
    rows.append(["resident: confusion R=4 ratio 0.1 + crop/flip", r, r / base])
    results["resident"] = r

    plain = make_loader(raw or cache_only, batch_size=batch_size, device=device, augment=True, placement="resident")
    rp = time_images(lambda: sum(len(y) for _, y, _ in plain), device, seconds)
    rows.append(["resident: true labels + crop/flip", rp, rp / base])
    results["resident_plain"] = rp

    if ffcv_available():
        jpg = synthetic_beton(data_root, "cifar-size-jpg", 10000, 32, "jpg")
        st = make_loader(jpg, batch_size=batch_size, device=device, augment=True, placement="stream",
                         num_workers=workers or 1)
        s = time_images(lambda: sum(len(y) for _, y, _ in st), device, seconds)
        rows.append(["stream: ffcv JPEG decode + RRC/flip", s, s / base])
        results["stream"] = s
    else:
        rows.append(["stream: skipped (ffcv is not installed)", float("nan"), float("nan")])
        results["stream"] = None
    results["ratio_resident"] = r / base
    print_table(f"loader images/s on {results['info']['name']} ({device}), batch {batch_size}",
                ["loader", "images/s", "x baseline"], rows)
    write_json(out, "loader", results)
    return results
