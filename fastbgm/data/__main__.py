"""``python -m fastbgm.data prepare SOURCE --src DIR --out DIR [options]``"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.logging import RichHandler


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastbgm.data", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="write .beton splits + manifests from a dataset on disk")
    prep.add_argument("source", choices=["cifar10", "cifar100", "imagefolder", "restricted-imagenet", "synthetic", "digits"])
    prep.add_argument("--src", type=Path, help="input folder (not used by synthetic and digits)")
    prep.add_argument("--out", type=Path, required=True, help="output folder for <split>.beton + manifests")
    prep.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    prep.add_argument("--download", action="store_true", help="cifar: download with torchvision into --src")
    prep.add_argument("--resolution", type=int, help="resize shorter side + centre crop to this (px)")
    prep.add_argument("--format", choices=["raw", "jpg"], help="image storage (default: raw up to 64 px, else jpg)")
    prep.add_argument("--jpeg-quality", type=int, default=90, help="1-100, for --format jpg (default 90)")
    prep.add_argument("--classes", help="imagefolder: comma-separated class order (default: sorted folder names)")
    prep.add_argument("--preset", choices=["cifar10", "cinic10"], help="imagefolder: class order + normalisation")
    prep.add_argument("--train-size", type=int, default=5000, help="synthetic: training samples")
    prep.add_argument("--test-size", type=int, default=1000, help="synthetic: test samples")
    prep.add_argument("--num-classes", type=int, default=10, help="synthetic: classes")
    prep.add_argument("--noise", type=float, default=0.35, help="synthetic: per-pixel noise std (0-1 scale)")
    prep.add_argument("--seed", type=int, default=0, help="synthetic: generator seed")
    prep.add_argument("--workers", type=int, help="writer processes (default: all cores)")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    prep.add_argument("--cache-only", action="store_true",
                      help="write manifest + resident cache without ffcv (no .beton): for machines without ffcv")
    prep.add_argument("--limit-per-class", type=int, default=0, help="with --cache-only: keep N images per class")
    return p


def _download_cifar(src: Path, variant: str) -> None:
    try:
        import torchvision.datasets as tvd
    except Exception as e:
        raise SystemExit(f"--download needs torchvision ({e}); download the python batches by hand into --src") from e
    (tvd.CIFAR10 if variant == "cifar10" else tvd.CIFAR100)(str(src), train=True, download=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(show_path=False)])
    from .sources import (DatasetError, cifar_splits, digits_splits, imagefolder_splits, restricted_imagenet_splits,
                          synthetic_splits)
    from .writer import default_format, prepare, prepare_cache_only, preset_normalization

    try:
        if args.source not in ("synthetic", "digits") and args.src is None:
            raise DatasetError(f"{args.source} needs --src DIR (the dataset on disk)")
        if args.resolution is not None and args.resolution < 1:
            raise DatasetError(f"--resolution must be a positive number of pixels, got {args.resolution} "
                               "(leave it out to keep the images' own size)")
        if not 1 <= args.jpeg_quality <= 100:
            raise DatasetError(f"--jpeg-quality must be 1-100, got {args.jpeg_quality}")
        norm = None
        if args.source in ("cifar10", "cifar100"):
            if args.download:
                _download_cifar(args.src, args.source)
            splits = cifar_splits(args.src, args.source)
            norm = preset_normalization("cifar10") if args.source == "cifar10" else None
            fmt = args.format or "raw"
        elif args.source == "imagefolder":
            classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
            splits = imagefolder_splits(args.src, classes, args.resolution, args.preset)
            norm = preset_normalization(args.preset)
            fmt = default_format(args.resolution, args.format)
        elif args.source == "restricted-imagenet":
            splits = restricted_imagenet_splits(args.src, args.resolution or 224)
            fmt = default_format(args.resolution or 224, args.format)
        elif args.source == "digits":
            splits = digits_splits(args.resolution or 16, seed=args.seed)
            fmt = args.format or "raw"
        else:
            splits = synthetic_splits(args.train_size, args.test_size, args.num_classes, args.resolution or 32,
                                      args.seed, args.noise)
            fmt = args.format or "raw"
        if args.cache_only:
            manifests = prepare_cache_only(splits, args.out, normalization=norm, overwrite=args.overwrite,
                                           limit_per_class=args.limit_per_class)
        else:
            manifests = prepare(splits, args.out, image_format=fmt, jpeg_quality=args.jpeg_quality,
                                normalization=norm, overwrite=args.overwrite, num_workers=args.workers,
                                show_progress=not args.quiet)
    except (DatasetError, ModuleNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, m in manifests.items():
        extra = ""
        if m.extra.get("dropped_images"):
            extra = f", dropped {m.extra['dropped_images']} images of {len(m.extra['dropped_wnids'])} out-of-range wnids"
        if m.extra.get("empty_classes"):
            extra += f", empty classes: {', '.join(m.extra['empty_classes'])}"
        print(f"{name}: {m.num_samples} samples, {m.num_classes} classes{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
