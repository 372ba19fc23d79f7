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

This module opens one (:func:`make_loader`, :func:`loader_from_arrays`); the placements
are resident.py and stream.py, and what they share is batches.py.

Indices: the loader defines ``n`` training samples (the split, or a class-balanced
subset of it); copy ``r`` of sample ``i`` in the confusion set has index ``r*n + i``,
so ``indices % n`` is always the sample's position.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from . import ffcv_io
from .batches import Batch, DeviceLoader  # noqa: F401 - the loader's types, importable from here
from .cache import load_resident
from .labels import LabelSpec
from .manifest import Manifest
from .resident import ResidentLoader
from .sources import DatasetError
from .stream import StreamLoader

log = logging.getLogger(__name__)

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
