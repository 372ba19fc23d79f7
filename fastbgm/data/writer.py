"""Write :class:`~fastbgm.data.sources.SplitSource` splits to ``.beton`` + manifest.

Images are read in ffcv's writer processes; each process records per-sample pixel
sums (:func:`pixel_moments`) and failures into small memory-mapped arrays, so the
manifest's statistics are exact and an unreadable image is reported by name instead of
hanging the writer.
Outputs are written into a temporary folder and renamed into place at the end.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..fileio import atomic_write_json, sha256_file
from . import ffcv_io
from .cache import cache_path
from .manifest import Manifest, beton_path, manifest_path
from .sources import PRESETS, DatasetError, SplitSource

log = logging.getLogger(__name__)


class _WriterDataset:
    """Indexable view ffcv's writer processes read from (forked, so no pickling)."""

    def __init__(self, source: SplitSource, tmp: Path, fallback_shape: tuple[int, int, int]):
        self.source = source
        self.tmp = tmp
        self.fallback_shape = fallback_shape
        n = len(source)
        # per image: its pixel_moments, then its height and width
        np.lib.format.open_memmap(tmp / "stats.npy", mode="w+", dtype=np.int64, shape=(n, 9)).flush()
        np.lib.format.open_memmap(tmp / "failed.npy", mode="w+", dtype=np.int8, shape=(n,)).flush()
        self._stats: Any = None
        self._failed: Any = None

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, int]:
        if self._stats is None:  # opened lazily in each writer process
            self._stats = np.load(self.tmp / "stats.npy", mmap_mode="r+")
            self._failed = np.load(self.tmp / "failed.npy", mmap_mode="r+")
        try:
            img = self.source.image(i)
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ValueError(f"decoded to shape {img.shape} {img.dtype}, expected HxWx3 uint8")
        except Exception:
            self._failed[i] = 1
            img = np.zeros(self.fallback_shape, dtype=np.uint8)
        else:
            self._stats[i, 0:7] = pixel_moments(img)
            self._stats[i, 7:9] = img.shape[:2]
        return np.ascontiguousarray(img), int(self.source.labels[i]), int(i)


def _report_failures(source: SplitSource, failed: np.ndarray) -> None:
    bad = np.flatnonzero(failed)
    if not len(bad):
        return
    first = bad[0]
    try:
        source.image(int(first))
        reason = "failed in the writer process"
    except Exception as e:  # re-raise the real reason in this process
        reason = f"{type(e).__name__}: {e}"
    raise DatasetError(
        f"{len(bad)} image(s) of split {source.name!r} could not be read; the first is "
        f"{source.name_of(int(first))} ({reason}). Remove or replace the file(s) and run prepare again"
    )


def prepare(
    splits: dict[str, SplitSource],
    out_dir: str | Path,
    *,
    image_format: str = "raw",
    jpeg_quality: int = 90,
    normalization: dict[str, list[float]] | None = None,
    overwrite: bool = False,
    num_workers: int | None = None,
    show_progress: bool = True,
) -> dict[str, Manifest]:
    """Write each split to ``out_dir/<split>.beton`` with ``<split>.manifest.json``."""
    if image_format not in ("raw", "jpg"):
        raise DatasetError(f"image format {image_format!r} is unknown: use raw or jpg")
    out = Path(out_dir)
    targets = [p for s in splits for p in (beton_path(out, s), manifest_path(beton_path(out, s)))]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise DatasetError(
            f"output exists: {', '.join(existing)}. Pass --overwrite to replace it, or choose another --out"
        )
    if not 1 <= jpeg_quality <= 100:
        raise DatasetError(f"JPEG quality must be 1-100, got {jpeg_quality}")
    ffcv_io.import_ffcv()
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        # All splits or nothing: everything is built in one temporary folder and moved
        # into place only once every split is written, so a failure (an unreadable
        # image, a full disk) leaves the previous dataset, or no dataset, as it was.
        with tempfile.TemporaryDirectory(prefix=".prepare-", dir=out) as tmpd:
            built = _write_splits(splits, Path(tmpd), image_format, jpeg_quality, normalization, num_workers,
                                  show_progress)
            manifests = {}
            for name, (tmp_beton, m) in built.items():
                final = beton_path(out, name)
                cache_path(final).unlink(missing_ok=True)  # decoded from the old .beton
                os.replace(tmp_beton, final)
                os.replace(manifest_path(tmp_beton), manifest_path(final))
                manifests[name] = m
                log.info("wrote %s (%d samples, sha256 %s)", final, m.num_samples, m.sha256[:12])
    except OSError as e:
        if created and out.exists() and not any(out.iterdir()):
            out.rmdir()
        if isinstance(e, ffcv_io.WriteFailed):
            raise DatasetError(f"{e}; nothing in {out} was changed") from None
        raise DatasetError(f"could not write the dataset into {out}: {e.strerror or e}"
                           f"{'; free some space or choose another --out' if e.errno == 28 else ''}"
                           f"; nothing in {out} was changed") from None
    except BaseException:
        if created and out.exists() and not any(out.iterdir()):
            out.rmdir()
        raise
    return manifests


def _write_splits(splits: dict[str, SplitSource], tmp: Path, image_format: str, jpeg_quality: int,
                  normalization: dict[str, list[float]] | None, num_workers: int | None,
                  show_progress: bool) -> dict[str, tuple[Path, Manifest]]:
    """Write every split into ``tmp``: {split: (its .beton there, its manifest)}."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    order = sorted(splits, key=lambda s: (s != "train", s))  # train first: it sets the normalisation
    built: dict[str, tuple[Path, Manifest]] = {}
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        disable=not show_progress,
    ) as progress:
        for name in order:
            src = splits[name]
            task = progress.add_task(f"writing {name}", total=len(src))
            res = src.resolution or 32
            work = tmp / f"work-{name}"
            work.mkdir()
            ds = _WriterDataset(src, work, (res, res, 3))
            tmp_beton = beton_path(tmp, name)
            ffcv_io.write_beton(
                tmp_beton, ds, image_format, jpeg_quality, num_workers,
                on_advance=lambda n, t=task: progress.advance(t, n),
            )
            _report_failures(src, np.load(work / "failed.npy"))
            stats = np.load(work / "stats.npy")
            sizes = {tuple(int(v) for v in r) for r in stats[:, 7:9]}
            m = _manifest(name, src, src.labels, next(iter(sizes)) if len(sizes) == 1 else None,
                          stats[:, 0:7].sum(0, dtype=object), normalization, image_format,
                          sha256_file(tmp_beton), src.extra)
            normalization = m.normalization
            atomic_write_json(manifest_path(tmp_beton), m.to_json())
            shutil.rmtree(work)
            built[name] = (tmp_beton, m)
    return built


def pixel_moments(pixels: np.ndarray) -> np.ndarray:
    """``[n, sum of each channel, sum of each channel's squares]`` of uint8 ``[..., 3]``
    pixels (n: pixels a channel), in levels 0-255, as exact integers from each channel's
    histogram: one image's in a writer process, a whole split's for a cache-only dataset
    (a float64 copy of every value cost 27 s of the 40 of all CIFAR-10's; this, 0.8 s)."""
    flat = pixels.reshape(-1, pixels.shape[-1])
    c = flat.shape[1]
    counts = np.zeros(c * 256, dtype=np.int64)
    for start in range(0, len(flat), 1 << 22):  # one histogram of (channel, level), in blocks of rows:
        block = flat[start:start + (1 << 22)].astype(np.intp)  # (bincount of uint8 itself is slow)
        block += np.arange(c) * 256
        counts += np.bincount(block.ravel(), minlength=c * 256)
    counts = counts.reshape(c, 256)
    levels = np.arange(256, dtype=np.int64)
    return np.concatenate([[len(flat)], counts @ levels, counts @ (levels * levels)])


def _mean_std(moments: Sequence[int]) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std in [0, 1] from summed :func:`pixel_moments`,
    in Python's integers (a full ImageNet's sums of squares pass int64), so exact but
    for the last rounding."""
    n, *rest = (int(v) for v in moments)
    c = len(rest) // 2
    s, q = rest[:c], rest[c:]
    mean = [si / (255 * n) for si in s]
    std = [((n * qi - si * si) / (255 * 255 * n * n)) ** 0.5 for si, qi in zip(s, q)]
    return mean, std


def _manifest(name: str, src: SplitSource, labels: np.ndarray, resolution: Sequence[int] | None,
              moments: Sequence[int], normalization: dict[str, list[float]] | None, image_format: str,
              sha256: str, extra: dict[str, Any]) -> Manifest:
    """A split's manifest; ``normalization`` None: its own statistics (the training split's,
    which every other split of the dataset then uses)."""
    mean, std = _mean_std(moments)
    return Manifest(
        split=name,
        num_samples=len(labels),
        class_names=list(src.class_names),
        class_counts=[int(c) for c in np.bincount(labels, minlength=len(src.class_names))],
        resolution=[int(v) for v in resolution] if resolution else None,
        mean=mean,
        std=std,
        normalization=normalization or {"mean": mean, "std": std},
        image_format=image_format,
        source=src.description,
        sha256=sha256,
        extra=extra,
    )


def _read_block(src: SplitSource, indices: np.ndarray) -> list[np.ndarray]:
    out = []
    for i in indices:
        try:
            out.append(src.image(int(i)))
        except Exception as e:
            raise DatasetError(f"{src.name_of(int(i))} could not be read ({e}); remove or replace it") from None
    return out


def _read_images(src: SplitSource, keep: np.ndarray, workers: int) -> list[np.ndarray]:
    """``src``'s images ``keep``, in order, read and decoded by ``workers`` processes in
    blocks (threads do not help: for CIFAR-size images Python's own work per image, under
    the GIL, outweighs the decoding). Forked, where the platform allows, so that nothing
    is imported again and ``src`` is not pickled."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    blocks = [b for b in np.array_split(keep, max(1, min(len(keep) // 500, 8 * workers))) if len(b)]
    if workers <= 1 or len(blocks) <= 1 or "fork" not in mp.get_all_start_methods():
        return _read_block(src, keep)
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"))
    try:
        return [im for block in pool.map(_read_block, [src] * len(blocks), blocks) for im in block]
    finally:  # (an unreadable image: its error at once, not after every other block)
        pool.shutdown(cancel_futures=True)


def prepare_cache_only(
    splits: dict[str, SplitSource],
    out_dir: str | Path,
    *,
    normalization: dict[str, list[float]] | None = None,
    overwrite: bool = False,
    limit_per_class: int = 0,
    workers: int = 0,
) -> dict[str, Manifest]:
    """Write each split as manifest + resident cache only, without ffcv: for machines
    where ffcv cannot be built (a GPU box). The resident loader reads these as it
    reads a cache beside a ``.beton``; there is no ``.beton`` (and so no stream placement).
    ``limit_per_class`` keeps the first N images of each class (0: all). ``workers``:
    processes that read and decode the images (0: one a core, up to 8; 1: this process),
    in order, so the cache does not depend on them."""
    import json

    from ..fileio import atomic_path
    from .cache import CACHE_VERSION

    out = Path(out_dir)
    targets = [p for s in splits for p in (manifest_path(beton_path(out, s)), cache_path(beton_path(out, s)))]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise DatasetError(f"output exists: {', '.join(existing)}. Pass --overwrite to replace it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    manifests: dict[str, Manifest] = {}
    for name in sorted(splits, key=lambda s: (s != "train", s)):
        src = splits[name]
        keep = np.arange(len(src))
        if limit_per_class:
            keep = np.concatenate([np.flatnonzero(src.labels == c)[:limit_per_class]
                                   for c in range(len(src.class_names))])
            keep.sort()
        images = _read_images(src, keep, workers or min(8, os.cpu_count() or 1))
        sizes = {im.shape for im in images}
        if len(sizes) != 1:
            raise DatasetError(f"split {name!r} has images of sizes {sorted(sizes)[:3]}...: pass --resolution")
        arr = np.stack(images)
        labels = src.labels[keep].astype(np.int64)
        m = _manifest(name, src, labels, arr.shape[1:3], pixel_moments(arr), normalization, "raw", "",
                      {**src.extra, "cache_only": True, "kept_per_class": limit_per_class or None})
        normalization = m.normalization
        meta = {"version": CACHE_VERSION, "beton_sha256": "", "beton_stat": None, "cache_only": True}
        with atomic_path(cache_path(beton_path(out, name))) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, images=arr, labels=labels, indices=keep.astype(np.int64), meta=np.array(json.dumps(meta)))
        atomic_write_json(manifest_path(beton_path(out, name)), m.to_json())
        manifests[name] = m
    return manifests


def preset_normalization(preset: str | None) -> dict[str, list[float]] | None:
    if preset is None:
        return None
    if preset not in PRESETS:
        raise DatasetError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
    return {"mean": list(PRESETS[preset]["mean"]), "std": list(PRESETS[preset]["std"])}


def default_format(resolution: int | None, requested: str | None, large: Sequence[int] = (64,)) -> str:
    if requested:
        return requested
    return "jpg" if resolution and resolution > large[0] else "raw"
