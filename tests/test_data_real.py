"""The writers on the real archives in ../shared/data (skipped when absent)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np

from fastbgm.data import Manifest
from fastbgm.data.__main__ import main as data_main

from .conftest import shared_file


def test_real_cifar10_jpeg_test_split(tmp_path: Path) -> None:
    archive = shared_file("cifar10-jpeg.tar.xz")
    src = tmp_path / "cifar10"
    with tarfile.open(archive) as tf:
        members = [m for m in tf.getmembers() if m.name.split("/")[0] in ("test", ".") and
                   (m.name.startswith("test") or m.name.startswith("./test"))]
        tf.extractall(src, members=members, filter="data")
    root = src if (src / "test").is_dir() else next(src.iterdir())
    out = tmp_path / "out"
    assert data_main(["prepare", "imagefolder", "--src", str(root), "--out", str(out), "--preset", "cifar10",
                      "--quiet"]) == 0
    m = Manifest.for_beton(out / "test.beton")
    assert m.num_samples == 10000 and m.class_counts == [1000] * 10
    assert m.class_names[0] == "airplane" and m.class_names[-1] == "truck"
    # the README's measured train mean is 125.27/122.93/113.86; the test split is close
    np.testing.assert_allclose(np.array(m.mean) * 255, [125.27, 122.93, 113.86], atol=2.5)


def test_real_mini_restricted_imagenet(tmp_path: Path) -> None:
    archive = shared_file("mini-restricted-imagenet.tar.xz")
    with tarfile.open(archive) as tf:
        tf.extractall(tmp_path / "src", filter="data")
    src = tmp_path / "src"
    while not (src / "train").is_dir():
        src = next(p for p in src.iterdir() if p.is_dir())
    out = tmp_path / "out"
    assert data_main(["prepare", "restricted-imagenet", "--src", str(src), "--out", str(out),
                      "--resolution", "32", "--quiet"]) == 0
    m = Manifest.for_beton(out / "train.beton")
    counts = dict(zip(m.class_names, m.class_counts))
    assert len(m.class_names) == 9
    assert counts == {"dog": 3000, "cat": 1500, "frog": 1000, "turtle": 0, "bird": 500, "primate": 1500,
                      "fish": 0, "crab": 0, "insect": 4000}
    assert sorted(m.extra["empty_classes"]) == ["crab", "fish", "turtle"]
    assert len(m.extra["dropped_wnids"]) == 8 and m.extra["dropped_images"] == 4000
    v = Manifest.for_beton(out / "val.beton")
    assert v.num_samples == 23 * 50
