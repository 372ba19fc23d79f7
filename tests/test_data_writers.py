"""Every writer round-trips real on-disk formats into .beton + manifest."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastbgm.data import Manifest
from fastbgm.data.__main__ import main as data_main
from fastbgm.data.cache import load_resident
from fastbgm.data.imagenet import RESTRICTED_CLASSES, synsets
from fastbgm.fileio import sha256_file

from .conftest import small_disk


def _write_cifar_batches(root: Path, per_batch: int = 20, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    all_x, all_y = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        with open(root / name, "wb") as f:
            pickle.dump({"data": x, "labels": y, "batch_label": name}, f)
        all_x.append(x)
        all_y.extend(y)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{k}" for k in range(10)]}, f)
    return np.concatenate(all_x), all_y


def test_cifar_pickles_round_trip_bit_exact(tmp_path: Path) -> None:
    x, y = _write_cifar_batches(tmp_path / "cifar-10-batches-py")
    out = tmp_path / "out"
    assert data_main(["prepare", "cifar10", "--src", str(tmp_path), "--out", str(out), "--quiet", "--workers", "2"]) == 0
    arr = load_resident(out / "train.beton")
    expect = x[:100].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(arr.images, expect)
    np.testing.assert_array_equal(arr.labels, y[:100])
    np.testing.assert_array_equal(arr.indices, np.arange(100))
    m = Manifest.for_beton(out / "train.beton")
    assert m.num_samples == 100 and m.class_names[0] == "c0" and sum(m.class_counts) == 100
    assert m.class_counts == np.bincount(y[:100], minlength=10).tolist()
    assert m.resolution == [32, 32] and m.image_format == "raw"
    np.testing.assert_allclose(m.mean, (expect / 255.0).reshape(-1, 3).mean(0), atol=1e-9)
    np.testing.assert_allclose(m.std, (expect / 255.0).reshape(-1, 3).std(0), atol=1e-9)
    assert m.normalization["std"] == [0.2023, 0.1994, 0.2010]  # the paper's constants
    assert m.sha256 == sha256_file(out / "train.beton")
    assert m.source["format"] == "cifar10-python-pickle" and m.writer_version >= 1
    test = Manifest.for_beton(out / "test.beton")
    assert test.num_samples == 20 and test.normalization == m.normalization


def _write_tree(root: Path, splits: dict[str, dict[str, int]], ext: str, size: int = 32, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split, classes in splits.items():
        for cls, n in classes.items():
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(img).save(d / f"{i:04d}{ext}")


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_imagefolder_round_trip(tmp_path: Path, ext: str) -> None:
    _write_tree(tmp_path / "src", {"train": {"cat": 6, "airplane": 4, "dog": 5}, "test": {"cat": 2, "dog": 3}}, ext)
    out = tmp_path / "out"
    assert data_main(["prepare", "imagefolder", "--src", str(tmp_path / "src"), "--out", str(out), "--quiet"]) == 0
    m = Manifest.for_beton(out / "train.beton")
    assert m.class_names == ["airplane", "cat", "dog"]  # sorted folder names
    assert m.class_counts == [4, 6, 5]
    t = Manifest.for_beton(out / "test.beton")
    assert t.class_counts == [0, 2, 3] and t.class_names == m.class_names
    arr = load_resident(out / "train.beton")
    assert arr.images.shape == (15, 32, 32, 3)
    if ext == ".png":  # lossless: pixels must match exactly, file order within a class
        first_cat = np.asarray(Image.open(tmp_path / "src/train/cat/0000.png"))
        np.testing.assert_array_equal(arr.images[4], first_cat)
    assert arr.labels.tolist() == [0] * 4 + [1] * 6 + [2] * 5


def test_imagefolder_class_list_and_cinic_preset(tmp_path: Path) -> None:
    _write_tree(tmp_path / "src", {"train": {"dog": 2, "cat": 2}}, ".png")
    out = tmp_path / "out"
    assert data_main(["prepare", "imagefolder", "--src", str(tmp_path / "src"), "--out", str(out),
                      "--classes", "dog,cat", "--quiet"]) == 0
    assert Manifest.for_beton(out / "train.beton").class_names == ["dog", "cat"]
    out2 = tmp_path / "out2"
    assert data_main(["prepare", "imagefolder", "--src", str(tmp_path / "src"), "--out", str(out2),
                      "--preset", "cinic10", "--quiet"]) == 0
    m = Manifest.for_beton(out2 / "train.beton")
    assert len(m.class_names) == 10 and m.normalization["mean"][0] == pytest.approx(0.4789, abs=1e-4)
    assert m.class_counts[3] == 2 and m.class_counts[5] == 2  # cat=3, dog=5 in CIFAR order


def _index_of(wnid: str) -> int:
    return [w for w, _ in synsets()].index(wnid)


def test_restricted_imagenet_ranges_and_drops(tmp_path: Path) -> None:
    wn = [w for w, _ in synsets()]
    # range edges: 151 and 268 (dog), 281 and 285 (cat), 30 and 32 (frog); 500 is outside every range
    picks = {151: 3, 268: 2, 281: 2, 285: 1, 30: 2, 32: 1, 500: 4}
    src = tmp_path / "imagenet"
    _write_tree(src, {"train": {wn[i]: n for i, n in picks.items()}, "val": {wn[151]: 1, wn[30]: 1}},
                ".JPEG", size=48)
    out = tmp_path / "out"
    assert data_main(["prepare", "restricted-imagenet", "--src", str(src), "--out", str(out),
                      "--resolution", "24", "--quiet"]) == 0
    m = Manifest.for_beton(out / "train.beton")
    assert m.class_names == RESTRICTED_CLASSES and len(m.class_names) == 9
    counts = dict(zip(m.class_names, m.class_counts))
    assert counts["dog"] == 5 and counts["cat"] == 3 and counts["frog"] == 3
    assert m.num_samples == 11
    assert m.extra["dropped_images"] == 4 and m.extra["dropped_wnids"] == [wn[500]]
    assert set(m.extra["empty_classes"]) == {"turtle", "bird", "primate", "fish", "crab", "insect"}
    assert m.image_format == "raw" and m.resolution == [24, 24]  # raw up to 64 px, as --help says
    arr = load_resident(out / "train.beton")
    assert arr.images.shape == (11, 24, 24, 3)
    v = Manifest.for_beton(out / "val.beton")
    assert v.num_samples == 2 and v.normalization == m.normalization
    assert data_main(["prepare", "restricted-imagenet", "--src", str(src), "--out", str(tmp_path / "big"),
                      "--resolution", "72", "--quiet"]) == 0
    assert Manifest.for_beton(tmp_path / "big/train.beton").image_format == "jpg"  # jpg above 64 px


def test_restricted_imagenet_labels_follow_canonical_order_not_folder_order(tmp_path: Path) -> None:
    wn = [w for w, _ in synsets()]
    # Only insect (319) and frog (30) present: sorted folder order would give them 0 and 1.
    src = tmp_path / "imagenet"
    _write_tree(src, {"train": {wn[319]: 2, wn[30]: 1}}, ".JPEG", size=16)
    out = tmp_path / "out"
    assert data_main(["prepare", "restricted-imagenet", "--src", str(src), "--out", str(out),
                      "--resolution", "16", "--quiet"]) == 0
    arr = load_resident(out / "train.beton")
    frog, insect = RESTRICTED_CLASSES.index("frog"), RESTRICTED_CLASSES.index("insect")
    assert sorted(arr.labels.tolist()) == sorted([insect, insect, frog])


def test_synthetic_is_learnable_structure_not_noise(tmp_path: Path) -> None:
    out = tmp_path / "syn"
    assert data_main(["prepare", "synthetic", "--out", str(out), "--train-size", "300", "--test-size", "50",
                      "--resolution", "16", "--quiet"]) == 0
    arr = load_resident(out / "train.beton")
    x = arr.images.reshape(len(arr.images), -1).astype(np.float32)
    # nearest class mean classifies far above chance (10%)
    means = np.stack([x[arr.labels == c].mean(0) for c in range(10)])
    pred = ((x[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == arr.labels).mean() > 0.5
    again = tmp_path / "syn2"
    data_main(["prepare", "synthetic", "--out", str(again), "--train-size", "300", "--test-size", "50",
               "--resolution", "16", "--quiet"])
    np.testing.assert_array_equal(load_resident(again / "train.beton").images, arr.images)  # seeded


# ------------------------------------------------------------------ bad input
def _run_err(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert data_main(argv) == 2
    return capsys.readouterr().err


def test_errors_name_problem_and_fix(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    err = _run_err(capsys, ["prepare", "imagefolder", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert "does not exist" in err and "split/class/image" in err
    (tmp_path / "empty").mkdir()
    err = _run_err(capsys, ["prepare", "imagefolder", "--src", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert "is empty" in err
    # class folders directly under src: not split/class/image
    _write_tree(tmp_path / "flat", {"cat": {"x": 0}}, ".png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "flat" / "cat" / "a.png")
    err = _run_err(capsys, ["prepare", "imagefolder", "--src", str(tmp_path / "flat"), "--out", str(tmp_path / "o")])
    assert "split/class/image" in err
    err = _run_err(capsys, ["prepare", "cifar10", "--src", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert "missing data_batch_1" in err and "--download" in err
    err = _run_err(capsys, ["prepare", "restricted-imagenet", "--src", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert "train/" in err


def test_unreadable_image_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _write_tree(tmp_path / "src", {"train": {"a": 3, "b": 3}}, ".png")
    bad = tmp_path / "src" / "train" / "b" / "0001.png"
    bad.write_bytes(b"not an image at all")
    out = tmp_path / "out"
    err = _run_err(capsys, ["prepare", "imagefolder", "--src", str(tmp_path / "src"), "--out", str(out), "--quiet"])
    assert str(bad) in err and "could not be read" in err
    assert not (out / "train.beton").exists() and not (out / "train.manifest.json").exists()


def test_existing_output_is_refused_unless_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "syn"
    argv = ["prepare", "synthetic", "--out", str(out), "--train-size", "20", "--test-size", "5", "--quiet"]
    assert data_main(argv) == 0
    before = (out / "train.beton").read_bytes()
    err = _run_err(capsys, argv + ["--seed", "3"])
    assert "output exists" in err and "--overwrite" in err
    assert (out / "train.beton").read_bytes() == before
    assert data_main(argv + ["--seed", "3", "--overwrite"]) == 0
    assert (out / "train.beton").read_bytes() != before
    json.loads((out / "train.manifest.json").read_text())


def test_failed_overwrite_leaves_the_old_dataset_whole(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # The new train split used to land beside the old test split when the test split failed.
    _write_tree(tmp_path / "good", {"train": {"a": 3, "b": 3}, "test": {"a": 2, "b": 2}}, ".jpg")
    out = tmp_path / "out"
    argv = ["prepare", "imagefolder", "--out", str(out), "--quiet", "--workers", "2"]
    assert data_main(argv + ["--src", str(tmp_path / "good")]) == 0
    load_resident(out / "train.beton")  # a cache beside it, too
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _write_tree(tmp_path / "bad", {"train": {"a": 4, "b": 4}, "test": {"a": 2, "b": 2}}, ".jpg")
    jpg = tmp_path / "bad" / "test" / "b" / "0001.jpg"
    jpg.write_bytes(jpg.read_bytes()[:40])  # truncated
    err = _run_err(capsys, argv + ["--src", str(tmp_path / "bad"), "--overwrite"])
    assert str(jpg) in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # every file as it was, no temp folder
    # a failed first prepare leaves nothing that refuses the corrected re-run
    err = _run_err(capsys, argv + ["--src", str(tmp_path / "bad"), "--out", str(tmp_path / "fresh")])
    assert not (tmp_path / "fresh").exists()
    jpg.unlink()
    assert data_main(argv + ["--src", str(tmp_path / "bad"), "--out", str(tmp_path / "fresh")]) == 0


def test_bad_resolution_and_quality_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _write_tree(tmp_path / "src", {"train": {"a": 2, "b": 2}}, ".png")
    for flag, value, word in (("--resolution", "-8", "--resolution"), ("--resolution", "0", "--resolution"),
                              ("--jpeg-quality", "500", "--jpeg-quality")):
        err = _run_err(capsys, ["prepare", "imagefolder", "--src", str(tmp_path / "src"), "--out",
                                str(tmp_path / "o"), "--quiet", flag, value])
        assert word in err, err
    assert not (tmp_path / "o").exists()


def test_a_dying_writer_process_ends_prepare_with_an_error(tmp_path: Path) -> None:
    # A writer worker that dies (here: a disk that fills up) used to hang prepare forever.
    import subprocess
    import sys

    with small_disk(tmp_path / "small", 600) as mnt:
        out = subprocess.run([sys.executable, "-m", "fastbgm.data", "prepare", "synthetic", "--out",
                              str(mnt / "d"), "--train-size", "2000", "--test-size", "10", "--resolution", "16",
                              "--quiet", "--workers", "2"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stderr[-2000:]
        assert "No space left" in out.stderr and "free some space" in out.stderr, out.stderr[-2000:]
        assert not (mnt / "d").exists() or not any((mnt / "d").iterdir())  # no hidden .prepare-* left


def test_resident_cache_of_another_split_is_refused(tmp_path: Path) -> None:
    from fastbgm.data import make_loader
    from fastbgm.data.cache import cache_path
    from fastbgm.data.sources import DatasetError

    out = tmp_path / "syn"
    assert data_main(["prepare", "synthetic", "--out", str(out), "--train-size", "30", "--test-size", "20",
                      "--resolution", "8", "--quiet"]) == 0
    load_resident(out / "test.beton")
    cache_path(out / "test.beton").rename(cache_path(out / "train.beton"))
    (out / "train.beton").unlink()
    with pytest.raises(DatasetError, match="does not belong to train.beton.*20 samples, the manifest says 30"):
        make_loader(out / "train.beton", batch_size=8)


def test_cache_only_decodes_in_processes_as_in_one_and_names_an_unreadable_image(tmp_path: Path) -> None:
    """``prepare --cache-only`` (what a GPU box without ffcv runs, all of CIFAR-10 in the
    GPU check) reads and decodes its images in processes: the same cache as in this
    process alone, and an unreadable image is named, with nothing written."""
    from fastbgm.data.sources import DatasetError, imagefolder_splits
    from fastbgm.data.writer import prepare_cache_only

    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    for c in ("a", "b", "c"):
        (src / "train" / c).mkdir(parents=True)
        for i in range(7):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(src / "train" / c / f"{i:04d}.jpg")
    caches = []
    for workers in (1, 4):
        prepare_cache_only(imagefolder_splits(src), tmp_path / f"w{workers}", workers=workers)
        with np.load(tmp_path / f"w{workers}" / "train.resident.npz") as z:
            caches.append({k: z[k] for k in ("images", "labels", "indices")})
    assert caches[0]["images"].shape == (21, 8, 8, 3)
    assert all(np.array_equal(caches[0][k], caches[1][k]) for k in caches[0])
    # the manifest's channel statistics (from histograms) are those of the images
    m = Manifest.for_beton(tmp_path / "w4" / "train.beton")
    x = caches[0]["images"].reshape(-1, 3) / 255.0
    assert np.allclose(m.mean, x.mean(0), rtol=0, atol=1e-12) and np.allclose(m.std, x.std(0), rtol=0, atol=1e-12)
    (src / "train" / "b" / "0003.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=r"b/0003.jpg could not be read"):
        prepare_cache_only(imagefolder_splits(src), tmp_path / "bad", workers=4)
    assert not list((tmp_path / "bad").glob("*.npz")) and not list((tmp_path / "bad").glob("*.json"))
