"""What every placement of the loader shares: the :class:`DeviceLoader` surface (an
epoch of batches, its state for a resume, an evaluation view) and the on-device steps
of a batch (stage-1 zero noise, per-sample augmentation, normalisation to the training
dtype, the label table lookup by sample index). The placements: resident.py, stream.py;
opening one: loader.py."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from .labels import LabelSpec, make_label_table
from .manifest import Manifest
from .noise import apply_zero_noise
from .order import EpochOrder
from .transforms import augment_keys, crop_flip, flip_only, normalize

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class DeviceSteps:
    """The on-device half shared by both placements."""

    label_table: torch.Tensor  # on device, [n * replicas]
    spec: LabelSpec
    augment: bool
    seed: int
    mean: Sequence[float]
    std: Sequence[float]
    dtype: torch.dtype
    channels_last: bool

    def add_noise(self, images_u8: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if self.spec.mode == "confusion" and self.spec.zero_ratio > 0:
            apply_zero_noise(images_u8, index, self.spec.seed, self.spec.zero_ratio)
        return images_u8

    def __call__(self, images_u8: torch.Tensor, index: torch.Tensor, epoch: int, cropped: bool,
                 noised: bool = False) -> Batch:
        if not noised:
            images_u8 = self.add_noise(images_u8, index)
        if self.augment:
            keys = augment_keys(self.seed, epoch, index)
            images_u8 = flip_only(images_u8, keys) if cropped else crop_flip(images_u8, keys)
        return self.finish(images_u8, index)

    def finish(self, images_u8: torch.Tensor, index: torch.Tensor, labels: torch.Tensor | None = None) -> Batch:
        x = normalize(images_u8, self.mean, self.std, self.dtype)
        if not self.channels_last:
            x = x.contiguous()
        return x, self.label_table[index] if labels is None else labels, index


class DeviceLoader:
    """Common surface of both placements: iterate for one epoch of batches."""

    placement = "base"

    def __init__(
        self,
        manifest: Manifest,
        true_labels: np.ndarray,
        *,
        batch_size: int,
        device: torch.device,
        labels: LabelSpec,
        augment: bool,
        train: bool,
        dtype: torch.dtype,
        seed: int,
        rank: int,
        world: int,
        drop_last: bool,
        channels_last: bool,
        normalization: dict[str, list[float]] | None,
    ):
        self.manifest = manifest
        self.device = device
        self.labels_spec = labels
        self.n = int(len(true_labels))
        self.num_classes = manifest.num_classes
        self.num_samples = self.n * labels.replicas
        self.batch_size = batch_size
        self.epoch = 0
        self.image_shape: tuple[int, int, int] = (3, 0, 0)  # (C, H, W) of a batch's images; set by each placement
        self.order = EpochOrder(self.num_samples, batch_size, seed, shuffle=train, drop_last=drop_last,
                                rank=rank, world=world)
        table = make_label_table(torch.from_numpy(true_labels), self.num_classes, labels)
        norm = normalization or manifest.normalization
        self.steps = DeviceSteps(
            label_table=table.to(device), spec=labels, augment=augment, seed=seed,
            mean=norm["mean"], std=norm["std"], dtype=dtype, channels_last=channels_last,
        )

    def __len__(self) -> int:
        return len(self.order)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])

    def eval_view(self, batch_size: int | None = None) -> "DeviceLoader":
        """The same samples and labels in file order, without augmentation, sharing
        this loader's device memory (e.g. stage 1's accuracy check on its own set), in
        batches of ``batch_size`` (default: this loader's)."""
        view = copy.copy(self)
        view.batch_size = batch_size or self.batch_size
        view.order = dataclasses.replace(self.order, shuffle=False, drop_last=False, batch_size=view.batch_size)
        view.steps = dataclasses.replace(self.steps, augment=False)
        view.epoch = 0
        return view

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch
        yield from self._iterate(epoch)
        self.epoch = epoch + 1

    def _iterate(self, epoch: int) -> Iterator[Batch]:  # pragma: no cover - abstract
        raise NotImplementedError
