"""The ``resident`` placement: the whole split on the device as one uint8 tensor
(decoded once from the ``.beton``, cached beside it); a batch is a gather by a
device-side index, with no worker processes and no host copies on the hot path."""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch

from .batches import Batch, DeviceLoader
from .manifest import Manifest
from .noise import apply_zero_noise
from .transforms import augment_keys, crop_flip


def _memory_budget(device: torch.device) -> int:
    """Bytes the resident store may use for its precomputed forms (noise, crops)."""
    if device.type == "cuda":
        return int(0.4 * torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(0.25 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 4 << 30


class ResidentLoader(DeviceLoader):
    """The split on the device; batches are gathers, with two precomputations when
    they fit the memory budget (results are identical either way, since noise and
    crops are pure functions of the sample index):

    - the confusion set's noised copies are materialised once (``n * R`` images), so
      the hash-and-select of the zero positions is not paid every epoch;
    - with augmentation, the store is kept zero-padded and mirrored, so a random
      crop plus flip is one strided gather instead of per-pixel indexing.
    """

    placement = "resident"

    def __init__(self, images: torch.Tensor, true_labels: np.ndarray, manifest: Manifest,
                 precompute: bool = True, pad: int = 4, memory_budget: int | None = None, **kw):
        super().__init__(manifest, true_labels, **kw)
        self.pad = pad
        spec = self.labels_spec
        budget = (memory_budget if memory_budget is not None else _memory_budget(self.device)) if precompute else 0
        per_image = images[0].numel() if len(images) else 0
        needs_noise = spec.mode == "confusion" and spec.zero_ratio > 0
        self.noise_materialized = False
        if needs_noise and self.num_samples * per_image <= budget:
            images = self._materialize_noise(images)
            self.noise_materialized = True
        self.images = images  # uint8 [n or n*R, H, W, 3] on the device
        self.image_shape = (images.shape[3], images.shape[1], images.shape[2])
        self._windows: torch.Tensor | None = None
        h, w = images.shape[1:3]
        padded_bytes = 2 * len(images) * (h + 2 * self.pad) * (w + 2 * self.pad) * 3
        # Crop windows are views of the stored images, so they carry noise only when the
        # store holds the noised copies; otherwise noise must be added per batch before
        # the crop (the per-batch path below).
        if (self.steps.augment and padded_bytes + images.numel() <= budget
                and (self.noise_materialized or not needs_noise)):
            self._windows = self._crop_windows(images)

    def _materialize_noise(self, images: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        out = torch.empty((self.num_samples, *images.shape[1:]), dtype=torch.uint8, device=self.device)
        for start in range(0, self.num_samples, chunk):
            v = torch.arange(start, min(start + chunk, self.num_samples), device=self.device)
            out[v] = apply_zero_noise(images.index_select(0, v % self.n), v, self.labels_spec.seed,
                                      self.labels_spec.zero_ratio)
        return out

    def eval_view(self, batch_size: int | None = None) -> "ResidentLoader":
        view = super().eval_view(batch_size)
        view._windows = None
        return view

    def _crop_windows(self, images: torch.Tensor) -> torch.Tensor:
        p = self.pad
        padded = torch.nn.functional.pad(images, (0, 0, p, p, p, p))
        store = torch.stack([padded, padded.flip(2)])  # [2, M, H+2p, W+2p, 3]
        s = store.stride()
        span = 2 * p + 1
        h, w = images.shape[1:3]
        # windows[f, i, y, x] is the H x W crop at offset (y, x) of (mirrored) image i
        return store.as_strided((2, len(images), span, span, h, w, 3), (s[0], s[1], s[2], s[3], s[2], s[3], s[4]))

    def _iterate(self, epoch: int) -> Iterator[Batch]:
        n, spec = self.n, self.labels_spec
        rows_are_copies = self.noise_materialized or spec.replicas == 1
        batches = self.order.rank_batches(epoch)
        if not batches:
            return
        sizes = [len(b) for b in batches]
        # Everything per-sample for the whole epoch in a few large kernels, so a batch
        # costs ~4 launches (launch overhead bounds CIFAR-size steps on GPUs).
        v_all = torch.cat(batches).to(self.device)
        rows_all = v_all if rows_are_copies else v_all % n
        labels_all = self.steps.label_table[v_all]
        if self._windows is not None:
            span = 2 * self.pad + 1
            keys = augment_keys(self.steps.seed, epoch, v_all)
            oy, ox, flip = keys % span, (keys // span) % span, (keys // (span * span)) & 1
            ox = torch.where(flip.bool(), 2 * self.pad - ox, ox)  # a mirrored crop's offset
            parts = zip(*(t.split(sizes) for t in (v_all, rows_all, labels_all, flip, oy, ox)))
            for v, rows, y, f, yy, xx in parts:
                yield self.steps.finish(self._windows[f, rows, yy, xx], v, y)
            return
        for v, rows, y in zip(v_all.split(sizes), rows_all.split(sizes), labels_all.split(sizes)):
            imgs = self.images.index_select(0, rows)
            if not self.noise_materialized:
                imgs = self.steps.add_noise(imgs, v)
            if self.steps.augment:
                imgs = crop_flip(imgs, augment_keys(self.steps.seed, epoch, v), self.pad)
            yield self.steps.finish(imgs, v, y)
