"""Readers for the dataset formats users have on disk. Each gives, per split, the
labels up front and a picklable ``image(i)`` that returns uint8 HxWx3.

Every reader checks the layout first and raises :class:`DatasetError` naming the
problem and the fix.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .imagenet import RESTRICTED_CLASSES, restricted_class, wnid_to_index

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}

# Normalisation the paper's code uses for CIFAR-10 (its std is not the measured one;
# keep it for fidelity) and CINIC-10's published statistics.
PRESETS: dict[str, dict[str, Any]] = {
    "cifar10": {
        "classes": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
        "mean": [0.4914, 0.4822, 0.4465],
        "std": [0.2023, 0.1994, 0.2010],
    },
    "cinic10": {
        "classes": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
        "mean": [0.47889522, 0.47227842, 0.43047404],
        "std": [0.24205776, 0.23828046, 0.25874835],
    },
}


class DatasetError(ValueError):
    """Bad input to a dataset writer or loader; the message names the problem and the fix."""


@dataclass
class SplitSource:
    name: str
    labels: np.ndarray  # int64 [N]
    class_names: list[str]
    description: dict[str, Any]
    resolution: int | None = None  # resize (shorter side) + centre crop to this, if set
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def image(self, i: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def name_of(self, i: int) -> str:
        return f"{self.name}[{i}]"


def resize_center_crop(img: Any, size: int) -> Any:
    """PIL image -> shorter side ``size`` (bicubic/antialiased), then centre crop."""
    from PIL import Image

    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


# --------------------------------------------------------------------- CIFAR pickles
@dataclass
class ArraySplit(SplitSource):
    images: np.ndarray | None = None  # uint8 [N,H,W,3]

    def image(self, i: int) -> np.ndarray:
        assert self.images is not None
        return self.images[i]


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except Exception as e:
        raise DatasetError(f"cannot read CIFAR batch file {path}: {e}. Re-download or re-extract it") from e


def cifar_splits(src: Path, variant: str = "cifar10") -> dict[str, SplitSource]:
    """The python pickle batches torchvision downloads (cifar-10-batches-py, cifar-100-python)."""
    src = Path(src)
    if variant == "cifar10":
        if (src / "cifar-10-batches-py").is_dir():
            src = src / "cifar-10-batches-py"
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        meta_file, names_key, label_key = "batches.meta", "label_names", "labels"
    elif variant == "cifar100":
        if (src / "cifar-100-python").is_dir():
            src = src / "cifar-100-python"
        files = {"train": ["train"], "test": ["test"]}
        meta_file, names_key, label_key = "meta", "fine_label_names", "fine_labels"
    else:
        raise DatasetError(f"unknown CIFAR variant {variant!r}: use cifar10 or cifar100")
    if not src.is_dir():
        raise DatasetError(f"{src} is not a folder: point --src at the extracted CIFAR python batches (or pass --download)")
    missing = [n for names in files.values() for n in names if not (src / n).exists()]
    if not (src / meta_file).exists():
        missing.append(meta_file)
    if missing:
        raise DatasetError(
            f"{src} is not a CIFAR python-batches folder: missing {', '.join(missing)}. "
            f"Point --src at the folder holding them (e.g. cifar-10-batches-py), or pass --download"
        )
    class_names = list(_unpickle(src / meta_file)[names_key])
    out: dict[str, SplitSource] = {}
    for split, names in files.items():
        data, labels = [], []
        for n in names:
            d = _unpickle(src / n)
            if "data" not in d or label_key not in d:
                raise DatasetError(f"{src / n} has no 'data'/'{label_key}' entries: not a {variant} batch file")
            data.append(np.asarray(d["data"], dtype=np.uint8))
            labels.extend(d[label_key])
        arr = np.concatenate(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
        out[split] = ArraySplit(
            name=split,
            labels=np.asarray(labels, dtype=np.int64),
            class_names=class_names,
            description={"format": f"{variant}-python-pickle", "path": str(src.resolve())},
            images=arr,
        )
    return out


# --------------------------------------------------------------------- image folders
@dataclass
class FileSplit(SplitSource):
    files: list[str] = field(default_factory=list)

    def image(self, i: int) -> np.ndarray:
        from PIL import Image

        with Image.open(self.files[i]) as im:
            im = im.convert("RGB")
            if self.resolution:
                im = resize_center_crop(im, self.resolution)
            return np.asarray(im, dtype=np.uint8)

    def name_of(self, i: int) -> str:
        return self.files[i]


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def imagefolder_splits(
    src: Path, classes: Sequence[str] | None = None, resolution: int | None = None, preset: str | None = None
) -> dict[str, SplitSource]:
    """``SPLIT/CLASS/IMAGE`` trees (CINIC-10's layout). Class order: ``classes`` or sorted names."""
    src = Path(src)
    if not src.is_dir():
        raise DatasetError(f"{src} does not exist or is not a folder: point --src at the folder holding split/class/image")
    split_dirs = sorted(d for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not split_dirs:
        raise DatasetError(f"{src} is empty: expected split folders (train/, test/, ...) each holding class folders")
    if any(_image_files(d) for d in split_dirs) or _image_files(src):
        raise DatasetError(
            f"{src} holds images directly under a split or class level: the imagefolder layout is "
            "split/class/image (e.g. train/cat/0001.png); move class folders under a split folder"
        )
    explicit = classes is not None  # named by the user with --classes
    if preset is not None and classes is None:
        if preset not in PRESETS:
            raise DatasetError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
        classes = PRESETS[preset]["classes"]
    found = {d.name: sorted(c.name for c in d.iterdir() if c.is_dir()) for d in split_dirs}
    if classes is None:
        classes = sorted({c for cs in found.values() for c in cs})
    classes = list(classes)
    if not classes:
        raise DatasetError(f"{src} has split folders but no class folders inside them: expected split/class/image")
    index = {c: k for k, c in enumerate(classes)}
    named_but_absent = [c for c in classes if not any(c in cs for cs in found.values())]
    if explicit and named_but_absent:
        raise DatasetError(
            f"--classes names {', '.join(named_but_absent[:5])}, but no split of {src} has a folder for "
            f"{'it' if len(named_but_absent) == 1 else 'them'} (no folder {split_dirs[0] / named_but_absent[0]}): "
            "fix the name, add the folder, or leave it out"
        )
    if named_but_absent:
        log.warning("preset %s: no folder for class(es) %s; they will have no samples", preset,
                    ", ".join(named_but_absent))
    out: dict[str, SplitSource] = {}
    for d in split_dirs:
        unknown = [c for c in found[d.name] if c not in index]
        if unknown:
            raise DatasetError(
                f"{d} has class folders not in the class list: {', '.join(unknown[:5])}. "
                "Pass --classes with every class, or remove those folders"
            )
        files, labels = [], []
        for c in found[d.name]:
            imgs = _image_files(d / c)
            files.extend(str(p) for p in imgs)
            labels.extend([index[c]] * len(imgs))
        if not files:
            raise DatasetError(f"split folder {d} has no images (.png/.jpg) in its class folders")
        # an empty class folder is a mistake (a failed copy, a typo), not a class with no data
        empty = [c for c in found[d.name] if not _image_files(d / c)]
        if empty:
            raise DatasetError(
                f"class folder(s) {', '.join(empty[:5])} of split {d.name!r} hold no images (an empty folder "
                f"{d / empty[0]}): add their images, or remove the folder(s)"
            )
        out[d.name] = FileSplit(
            name=d.name,
            labels=np.asarray(labels, dtype=np.int64),
            class_names=classes,
            description={"format": "imagefolder", "path": str(src.resolve()), "preset": preset},
            resolution=resolution,
            files=files,
        )
    return out


def restricted_imagenet_splits(src: Path, resolution: int) -> dict[str, SplitSource]:
    """ImageNet ``train/<wnid>/`` and ``val/<wnid>/`` mapped to the 9 super-classes.

    A wnid's class index is its position in the canonical ILSVRC-2012 list, so a
    partial tree is labelled correctly; wnids outside every range are dropped and
    counted; empty super-classes are reported in the manifest.
    """
    src = Path(src)
    if not src.is_dir():
        raise DatasetError(f"{src} does not exist: point --src at the ImageNet root holding train/ and val/")
    splits = [s for s in ("train", "val") if (src / s).is_dir()]
    if not splits:
        raise DatasetError(f"{src} has neither train/ nor val/: expected ImageNet's train/<wnid>/ and val/<wnid>/ layout")
    w2i = wnid_to_index()
    out: dict[str, SplitSource] = {}
    for s in splits:
        wnid_dirs = sorted(d for d in (src / s).iterdir() if d.is_dir())
        if not wnid_dirs:
            if _image_files(src / s):
                raise DatasetError(
                    f"{src / s} holds images directly: ImageNet's val images must be sorted into "
                    "val/<wnid>/ folders first (e.g. with the devkit's ground-truth list)"
                )
            raise DatasetError(f"{src / s} is empty: expected <wnid>/ folders")
        unknown = [d.name for d in wnid_dirs if d.name not in w2i]
        if len(unknown) == len(wnid_dirs):
            raise DatasetError(
                f"no folder in {src / s} is an ImageNet wnid (e.g. n02085620): not an ImageNet layout"
            )
        files, labels = [], []
        dropped_classes, dropped_images = [], 0
        for d in wnid_dirs:
            imgs = _image_files(d)
            k = restricted_class(w2i[d.name]) if d.name in w2i else None
            if k is None:
                dropped_classes.append(d.name)
                dropped_images += len(imgs)
                continue
            files.extend(str(p) for p in imgs)
            labels.extend([k] * len(imgs))
        lab = np.asarray(labels, dtype=np.int64)
        counts = np.bincount(lab, minlength=len(RESTRICTED_CLASSES))
        empty = [c for c, n in zip(RESTRICTED_CLASSES, counts) if n == 0]
        if not files:
            raise DatasetError(f"{src / s} has no images in any Restricted ImageNet class range")
        for c in unknown:
            log.warning("%s/%s is not an ImageNet wnid; dropped", s, c)
        if empty:
            log.warning("%s: %d of 9 super-classes are empty: %s", s, len(empty), ", ".join(empty))
        out[s] = FileSplit(
            name=s,
            labels=lab,
            class_names=list(RESTRICTED_CLASSES),
            description={"format": "imagenet-tree", "path": str(src.resolve())},
            resolution=resolution,
            extra={
                "dropped_wnids": dropped_classes,
                "dropped_images": dropped_images,
                "unknown_folders": unknown,
                "empty_classes": empty,
            },
            files=files,
        )
    return out


# --------------------------------------------------------------------- digits (embedded)
def digits_splits(resolution: int = 16, test_fraction: float = 0.33, seed: int = 0) -> dict[str, SplitSource]:
    """scikit-learn's real 8x8 handwritten digits (1,797 images, shipped inside the
    package: no download), upsampled to ``resolution`` and replicated to 3 channels;
    a seeded, class-stratified train/test split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DatasetError("the digits source needs scikit-learn: pip install scikit-learn") from e
    from PIL import Image

    d = load_digits()
    x8 = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    imgs = x8 if resolution == 8 else np.stack(
        [np.asarray(Image.fromarray(im).resize((resolution, resolution), Image.BILINEAR)) for im in x8])
    imgs = np.repeat(imgs[..., None], 3, axis=3)
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        test[rng.permutation(idx)[: int(round(test_fraction * len(idx)))]] = True
    names = [str(c) for c in range(10)]
    desc = {"format": "sklearn-digits", "resolution": resolution, "seed": seed}
    return {
        split: ArraySplit(name=split, labels=y[mask], class_names=names, description=desc,
                          images=np.ascontiguousarray(imgs[mask]))
        for split, mask in (("train", ~test), ("test", test))
    }


# --------------------------------------------------------------------- synthetic
@dataclass
class SyntheticSplit(SplitSource):
    seed: int = 0
    size: int = 32
    noise: float = 0.35
    split_offset: int = 0

    def _prototypes(self) -> np.ndarray:
        # Low-frequency class patterns: learnable structure, not noise.
        rng = np.random.default_rng([self.seed, 7])
        grid = rng.uniform(0.0, 1.0, size=(len(self.class_names), 4, 4, 3))
        reps = -(-self.size // 4)
        up = np.kron(grid, np.ones((1, reps, reps, 1)))[:, : self.size, : self.size]
        return up

    def image(self, i: int) -> np.ndarray:
        if not hasattr(self, "_protos"):
            self._protos = self._prototypes()
        rng = np.random.default_rng([self.seed, self.split_offset, i])
        proto = self._protos[self.labels[i]]
        shift = rng.integers(-2, 3, size=2)
        x = np.roll(proto, tuple(shift), axis=(0, 1))
        x = 0.5 + (x - 0.5) * rng.uniform(0.6, 1.0) + rng.normal(0, self.noise, size=x.shape)
        return np.clip(x * 255.0, 0, 255).astype(np.uint8)


def synthetic_splits(
    num_train: int = 1000, num_test: int = 200, num_classes: int = 10, resolution: int = 32, seed: int = 0,
    noise: float = 0.35,
) -> dict[str, SplitSource]:
    if num_train < 1 or num_test < 0 or num_classes < 2 or resolution < 4:
        raise DatasetError("synthetic needs --train-size >= 1, --test-size >= 0, --num-classes >= 2, --resolution >= 4")
    names = [f"class{k}" for k in range(num_classes)]
    out: dict[str, SplitSource] = {}
    for offset, (split, n) in enumerate((("train", num_train), ("test", num_test))):
        if n == 0:
            continue
        labels = np.random.default_rng([seed, 99, offset]).integers(0, num_classes, size=n).astype(np.int64)
        out[split] = SyntheticSplit(
            name=split,
            labels=labels,
            class_names=names,
            description={"format": "synthetic", "seed": seed, "noise": noise},
            seed=seed,
            size=resolution,
            noise=noise,
            split_offset=offset,
        )
    return out
