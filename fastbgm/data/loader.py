"""The loader: batches of ``(images, labels, indices)`` already on the target device.

Two placements behind one API:

- ``resident``: the whole split lives on the device as one uint8 tensor (decoded once
  from the ``.beton``, cached beside it); a batch is a gather by a device-side index.
  No worker processes and no host copies on the hot path. Right for <= 64 px data.
- ``stream``: ffcv's ``Loader`` decodes JPEGs in its threads (random-resized-crop for
  training, full image for evaluation) and moves uint8 batches to the device.

Both then run the same on-device steps: stage-1 zero noise (confusion set),
per-sample augmentation, normalisation to the training dtype in channels-last, and
the label table lookup by sample index.

Indices: the loader defines ``n`` training samples (the split, or a class-balanced
subset of it); copy ``r`` of sample ``i`` in the confusion set has index ``r*n + i``,
so ``indices % n`` is always the sample's position.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from . import ffcv_io
from .cache import load_resident
from .labels import LabelSpec, make_label_table
from .manifest import Manifest
from .noise import apply_zero_noise
from .order import EpochOrder
from .sources import DatasetError
from .transforms import augment_keys, crop_flip, flip_only, normalize, random_resized_crop

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
PLACEMENTS = ("auto", "resident", "stream")


def balanced_subset(labels: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` samples taking classes in turn: class-balanced, deterministic."""
    if n > len(labels):
        raise DatasetError(f"subset of {n} asked from a split of {len(labels)} samples: lower the subset size")
    rank_in_class = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        rank_in_class[where] = np.arange(len(where))
    order = np.lexsort((np.arange(len(labels)), rank_in_class))
    return np.sort(order[:n])


@dataclass
class _DeviceSteps:
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
        self.steps = _DeviceSteps(
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


def _dist_rank_world(rank: int | None, world: int | None) -> tuple[int, int]:
    if rank is not None and world is not None:
        return rank, world
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _check_counts(beton: Path, manifest: Manifest, labels: np.ndarray) -> None:
    """The data must be the split its manifest describes (an edited or swapped manifest
    would silently change class balance, normalisation and the report's numbers)."""
    counts = np.bincount(labels, minlength=manifest.num_classes).tolist() if len(labels) else []
    if len(labels) != manifest.num_samples or (counts and counts != list(manifest.class_counts)):
        raise DatasetError(
            f"{beton} holds {len(labels)} samples ({counts[:10]}{'...' if len(counts) > 10 else ''} per class) but "
            f"its manifest says {manifest.num_samples} ({list(manifest.class_counts)[:10]}): the manifest belongs to "
            "another dataset or was edited; write the dataset again with prepare --overwrite")


def make_loader(
    path: str | os.PathLike,
    *,
    batch_size: int,
    device: str | torch.device = "cpu",
    labels: LabelSpec | str = "true",
    augment: bool = False,
    train: bool = True,
    placement: str = "auto",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    subset: int | None = None,
    rank: int | None = None,
    world: int | None = None,
    drop_last: bool = False,
    channels_last: bool = True,
    normalization: dict[str, list[float]] | None = None,
    num_workers: int | None = None,
    show_progress: bool = False,
    precompute: bool = True,
    pad: int = 4,
) -> DeviceLoader:
    """Open a ``.beton`` split as an iterable of on-device ``(images, labels, indices)``.

    Args:
        path: a ``<split>.beton`` written by ``python -m fastbgm.data prepare``.
        batch_size: the *global* batch; with ``world`` ranks each rank gets a share.
        device: where batches live (and, for ``resident``, the whole split).
        labels: a :class:`LabelSpec` or a mode name (``true``, ``random``, ...).
        augment: random crop (pad 4) + flip per sample (``resident``); random-resized
            crop + flip (``stream``); every draw a pure function of (seed, epoch, sample).
        train: shuffle each epoch (``True``) or keep file order (evaluation).
        placement: ``resident``, ``stream`` or ``auto`` (resident up to 64 px).
        dtype: image dtype (e.g. ``torch.bfloat16``); labels are always int64.
        seed: order and augmentation seed; the order depends only on (seed, epoch).
        subset: keep only a class-balanced subset of this many samples.
        rank, world: the shard to yield; default: from ``torch.distributed`` if initialised.
        normalization: ``{"mean": [...], "std": [...]}``; default: the manifest's.
        precompute: ``resident`` only: materialise noised copies and padded crops
            when they fit in memory (same batches, faster); ``False`` computes per batch.
        pad: ``resident`` augmentation: zero padding of the random crop (the paper: 4 at 32 px).
    """
    beton = Path(path)
    if isinstance(labels, str):
        labels = LabelSpec(mode=labels)
    if placement not in PLACEMENTS:
        raise DatasetError(f"placement {placement!r} is unknown: use one of {', '.join(PLACEMENTS)}")
    if batch_size < 1:
        raise DatasetError(f"batch_size must be >= 1, got {batch_size}")
    manifest = Manifest.for_beton(beton)
    dev = torch.device(device)
    r, w = _dist_rank_world(rank, world)
    res = manifest.resolution
    if placement == "auto":
        placement = "resident" if res is not None and max(res) <= 64 else "stream"
    common = dict(batch_size=batch_size, device=dev, labels=labels, train=train, dtype=dtype,
                  seed=seed, rank=r, world=w, drop_last=drop_last, channels_last=channels_last,
                  normalization=normalization)
    if placement == "resident":
        arrays = load_resident(beton, show_progress=show_progress)
        images, true_labels = arrays.images, arrays.labels
        _check_counts(beton, manifest, true_labels)
        if subset is not None:
            keep = balanced_subset(true_labels, subset)
            images, true_labels = images[keep], true_labels[keep]
        data = torch.from_numpy(np.ascontiguousarray(images)).to(dev)
        return ResidentLoader(data, true_labels, manifest, augment=augment, precompute=precompute, pad=pad, **common)
    if not beton.exists():
        raise DatasetError(f"dataset file {beton} does not exist: write it with `python -m fastbgm.data prepare ...`")
    try:
        stored = ffcv_io.beton_columns(beton)["label"]
    except ModuleNotFoundError:
        raise
    except Exception as e:  # truncated, random bytes, not a .beton
        raise DatasetError(f"{beton} cannot be read as a .beton ({type(e).__name__}: {e}); "
                           "write it again with `python -m fastbgm.data prepare ... --overwrite`") from None
    _check_counts(beton, manifest, stored)
    positions = np.arange(len(stored)) if subset is None else balanced_subset(stored, subset)
    resolution = max(res) if res else 224
    workers = num_workers or max(1, min(os.cpu_count() or 1, 12))
    return StreamLoader(beton, positions, stored[positions], manifest, resolution=resolution, augment=augment,
                        num_workers=workers, **common)


def loader_from_arrays(
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    *,
    batch_size: int,
    num_classes: int | None = None,
    normalization: dict[str, list[float]] | None = None,
    device: str | torch.device = "cpu",
    label_spec: LabelSpec | str = "true",
    augment: bool = False,
    train: bool = True,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    rank: int | None = None,
    world: int | None = None,
    drop_last: bool = False,
    channels_last: bool = True,
    precompute: bool = True,
    pad: int = 4,
    memory_budget: int | None = None,
) -> ResidentLoader:
    """A resident loader over in-memory uint8 ``[N, H, W, 3]`` images (no files, no ffcv).

    Same batches and options as :func:`make_loader`; the normalisation defaults to the
    images' own per-channel statistics. ``memory_budget``: bytes the precomputed forms
    may take (default: a share of the device's memory); the batches do not depend on it.
    """
    x = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    y = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] != 3 or len(x) != len(y):
        raise DatasetError(f"images must be uint8 [N, H, W, 3] with one label each; got {x.dtype} {x.shape}, "
                           f"{len(y)} labels")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"labels must be one integer class per image, got {y.dtype} {y.shape}")
    y = y.astype(np.int64)
    k = int(num_classes or (int(y.max()) + 1 if len(y) else 1))
    if len(y) and (y.min() < 0 or y.max() >= k):
        raise DatasetError(f"labels must lie in [0, {k}) (num_classes = {k}); found {int(y.min())}..{int(y.max())}")
    flat = x.reshape(-1, 3)
    mean = (flat.mean(0, dtype=np.float64) / 255.0).tolist()
    std = (flat.std(0, dtype=np.float64) / 255.0).tolist()
    manifest = Manifest(split="memory", num_samples=len(y), class_names=[str(c) for c in range(k)],
                        class_counts=np.bincount(y, minlength=k).tolist(), resolution=list(x.shape[1:3]),
                        mean=mean, std=std, normalization=normalization or {"mean": mean, "std": std},
                        image_format="array", source={"format": "in-memory arrays"})
    if isinstance(label_spec, str):
        label_spec = LabelSpec(mode=label_spec)
    r, w = _dist_rank_world(rank, world)
    dev = torch.device(device)
    data = (images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))).to(dev)
    return ResidentLoader(data, y, manifest, precompute=precompute, pad=pad, memory_budget=memory_budget,
                          augment=augment, batch_size=batch_size,
                          device=dev, labels=label_spec, train=train, dtype=dtype, seed=seed, rank=r, world=w,
                          drop_last=drop_last, channels_last=channels_last, normalization=None)


__all__ = ["make_loader", "loader_from_arrays", "DeviceLoader", "ResidentLoader", "StreamLoader", "balanced_subset"]
