"""The ``stream`` placement: ffcv's ``Loader`` decodes the JPEGs of a ``.beton`` in its
threads and moves uint8 batches to the device, in the order the epoch's draw gives
(not ffcv's own); the random-resized crop and the rest are done on the device."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from . import ffcv_io
from .batches import Batch, DeviceLoader
from .manifest import Manifest
from .sources import DatasetError
from .transforms import random_resized_crop


class StreamLoader(DeviceLoader):
    placement = "stream"

    def __init__(self, beton: Path, positions: np.ndarray, true_labels: np.ndarray, manifest: Manifest,
                 resolution: int, augment: bool, num_workers: int, **kw):
        super().__init__(manifest, true_labels, augment=augment, **kw)
        if self.order.world > 1 and kw["batch_size"] % self.order.world:
            raise DatasetError(
                f"stream placement needs the global batch size ({kw['batch_size']}) divisible by the world size "
                f"({self.order.world})"
            )
        ffcv_io.import_ffcv()
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
        from ffcv.loader import Loader
        from ffcv.transforms import ToDevice, ToTensor

        self.positions = positions  # beton sample index of each of the n samples
        self.image_shape = (3, resolution, resolution)
        self._epoch_order: dict[int, torch.Tensor] = {}
        size = (resolution, resolution)
        # ffcv decodes and resizes only (its random crop draws from its own unseeded RNG);
        # the random-resized crop is done on the device as a pure function of
        # (seed, epoch, sample), so a stream run is reproducible and resumes exactly.
        decoder = CenterCropRGBImageDecoder(size, ratio=1.0)
        to_dev = [ToDevice(self.device, non_blocking=True)] if self.device.type != "cpu" else []
        threads = torch.get_num_threads()  # ffcv's Loader resets torch's thread count
        with ffcv_io.custom_order(self._ffcv_order) as key:
            self.loader = Loader(
                str(beton), batch_size=kw["batch_size"] // self.order.world, num_workers=num_workers,
                order=key, drop_last=False, os_cache=True,
                pipelines={
                    "image": [decoder, ToTensor(), *to_dev],
                    "label": [IntDecoder(), ToTensor(), *to_dev],
                    "index": [IntDecoder(), ToTensor(), *to_dev],
                },
            )
        torch.set_num_threads(threads)

    def eval_view(self, batch_size: int | None = None) -> "DeviceLoader":
        raise NotImplementedError("a stream loader's decode pipeline is fixed: open an eval loader with make_loader")

    def _rank_order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._epoch_order:
            self._epoch_order = {epoch: torch.cat(self.order.rank_batches(epoch) or [torch.empty(0, dtype=torch.long)])}
        return self._epoch_order[epoch]

    def _ffcv_order(self, epoch: int) -> np.ndarray:
        return self.positions[(self._rank_order(epoch) % self.n).numpy()]

    def _iterate(self, epoch: int) -> Iterator[Batch]:
        order = self._rank_order(epoch)
        self.loader.next_epoch = epoch
        start = 0
        threads = torch.get_num_threads()
        batches = iter(self.loader)
        torch.set_num_threads(threads)
        for imgs, _, _ in batches:
            b = imgs.shape[0]
            v = order[start : start + b].to(self.device, non_blocking=True)
            start += b
            imgs = self.steps.add_noise(imgs.clone(), v)  # a copy: ffcv recycles its output buffers
            if self.steps.augment:
                imgs = random_resized_crop(imgs, self.steps.seed, epoch, v)
            yield self.steps(imgs, v, epoch, cropped=self.steps.augment, noised=True)
