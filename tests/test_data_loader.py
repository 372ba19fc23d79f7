"""The loader: label tables, stage-1 noise, augmentation, sharding, caches, placements."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastbgm.data import DatasetError, LabelSpec, make_label_table, make_loader
from fastbgm.data.cache import cache_path, load_resident
from fastbgm.data.hashing import hash_keys, mix32
from fastbgm.data.noise import apply_zero_noise, zero_count
from fastbgm.data.order import EpochOrder
from fastbgm.data.transforms import augment_keys, crop_flip


# ------------------------------------------------------------------ label tables
def test_label_modes_determinism_uniformity_fraction() -> None:
    y = torch.arange(20000) % 10
    true = make_label_table(y, 10, LabelSpec("true"))
    assert torch.equal(true, y)
    r1 = make_label_table(y, 10, LabelSpec("random", seed=3))
    assert torch.equal(r1, make_label_table(y, 10, LabelSpec("random", seed=3)))
    assert not torch.equal(r1, make_label_table(y, 10, LabelSpec("random", seed=4)))
    counts = torch.bincount(r1, minlength=10).float()
    assert (counts / counts.mean() - 1).abs().max() < 0.06  # uniform
    assert (r1 == y).float().mean().item() == pytest.approx(0.1, abs=0.01)  # independent of truth
    noisy = make_label_table(y, 10, LabelSpec("noisy", seed=1, fraction=0.3))
    assert (noisy != y).sum().item() == 6000  # exact fraction, changed labels really differ
    conf = make_label_table(y, 10, LabelSpec("confusion", seed=1, copies=4))
    assert conf.shape == (80000,)
    copies = conf.view(4, 20000)
    assert (copies[0] != copies[1]).float().mean() > 0.85  # each copy its own label


def test_label_spec_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="label mode 'bogus' is unknown"):
        LabelSpec("bogus")
    with pytest.raises(ValueError, match="copies"):
        LabelSpec("confusion", copies=0)
    with pytest.raises(ValueError, match="only to label mode 'confusion'"):
        LabelSpec("random", copies=3)


# ------------------------------------------------------------------ hashing and noise
def _py_mix32(x: int) -> int:
    m = 0xFFFFFFFF
    x &= m
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x68E31DA5) & m
    x ^= x >> 16
    return x


def test_hash_matches_pure_python_reference() -> None:
    # The tensor hash equals exact integer arithmetic, so no device can differ.
    xs = [0, 1, 2**31 - 1, 2**32 - 1, 123456789, 2**40 + 17]
    assert mix32(torch.tensor(xs)).tolist() == [_py_mix32(x) for x in xs]
    expect = _py_mix32(_py_mix32(_py_mix32(5) ^ 9) ^ 11)
    assert hash_keys(5, 9, 11).item() == expect


def test_confusion_noise_exact_count_distinct_and_stable() -> None:
    torch.manual_seed(0)
    imgs = torch.randint(1, 256, (64, 32, 32, 3), dtype=torch.uint8)  # no zeros before
    idx = torch.arange(64) * 7919
    a = apply_zero_noise(imgs.clone(), idx, seed=5, ratio=0.1)
    k = zero_count(0.1, 3072)
    assert k == 307
    assert ((a == 0).view(64, -1).sum(1) == k).all()  # exact count, hence no duplicate positions
    again = apply_zero_noise(imgs.clone(), idx, seed=5, ratio=0.1)
    assert torch.equal(a, again)  # same copy, same noise, any time it is seen
    masks = (a == 0).view(64, -1)
    overlap = (masks[0] & masks[1]).sum().item()
    assert overlap < 80  # copies differ (expected overlap ~31)
    assert not torch.equal(apply_zero_noise(imgs.clone(), idx, seed=6, ratio=0.1), a)
    assert torch.equal(apply_zero_noise(imgs.clone(), idx, seed=5, ratio=0.0), imgs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to compare devices")
def test_confusion_noise_same_on_gpu() -> None:  # pragma: no cover - GPU only
    imgs = torch.randint(1, 256, (16, 32, 32, 3), dtype=torch.uint8)
    idx = torch.arange(16)
    cpu = apply_zero_noise(imgs.clone(), idx, 1, 0.1)
    gpu = apply_zero_noise(imgs.clone().cuda(), idx.cuda(), 1, 0.1).cpu()
    assert torch.equal(cpu, gpu)


# ------------------------------------------------------------------ augmentation
def test_crop_flip_per_sample_and_exact_geometry() -> None:
    img = torch.arange(32 * 32 * 3, dtype=torch.int64).remainder(251).to(torch.uint8).view(1, 32, 32, 3)
    batch = img.expand(256, -1, -1, -1).contiguous()
    out = crop_flip(batch, augment_keys(0, 0, torch.arange(256)))
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) > 90  # one draw per sample (162 possible), not per batch
    # Every output is some crop of the zero-padded image, possibly flipped.
    padded = torch.nn.functional.pad(img[0], (0, 0, 4, 4, 4, 4))
    for o in out[:20]:
        ok = any(torch.equal(o, c) or torch.equal(o, c.flip(1))
                 for y in range(9) for x in range(9) for c in [padded[y:y + 32, x:x + 32]])
        assert ok
    keys = augment_keys(0, 0, torch.arange(256))
    assert torch.equal(crop_flip(batch, keys), out)  # deterministic in (seed, epoch, index)
    assert not torch.equal(crop_flip(batch, augment_keys(0, 1, torch.arange(256))), out)


def test_eval_loader_is_untouched(synthetic_dir: Path) -> None:
    arr = load_resident(synthetic_dir / "test.beton")
    L = make_loader(synthetic_dir / "test.beton", batch_size=64, train=False, augment=False)
    m = L.manifest.normalization
    xs, ys, ids = zip(*L)
    x = torch.cat(xs)
    mean = torch.tensor(m["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(m["std"]).view(1, 3, 1, 1)
    expect = (torch.from_numpy(arr.images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    torch.testing.assert_close(x, expect, rtol=0, atol=1e-5)
    assert torch.equal(torch.cat(ids), torch.arange(200)) and torch.equal(torch.cat(ys), torch.from_numpy(arr.labels))


def test_train_loader_batches(synthetic_dir: Path) -> None:
    spec = LabelSpec("confusion", seed=2, copies=3, zero_ratio=0.1)
    L = make_loader(synthetic_dir / "train.beton", batch_size=128, labels=spec, augment=True, dtype=torch.bfloat16)
    assert L.num_samples == 1800 and len(L) == 15
    seen = []
    for x, y, i in L:
        assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
        assert y.dtype == torch.int64 and x.shape[1:] == (3, 32, 32)
        seen.append(i)
    allidx = torch.cat(seen)
    assert torch.equal(allidx.sort().values, torch.arange(1800))  # all N x R copies once
    assert L.epoch == 1
    L.set_epoch(0)
    again = torch.cat([i for _, _, i in L])
    assert torch.equal(again, allidx)  # the order depends only on (seed, epoch)
    assert not torch.equal(torch.cat([i for _, _, i in L]), allidx)  # epoch 1 differs


def test_confusion_noise_through_loader_is_epoch_stable(synthetic_dir: Path) -> None:
    spec = LabelSpec("confusion", seed=2, copies=2, zero_ratio=0.2)
    L = make_loader(synthetic_dir / "train.beton", batch_size=100, labels=spec, train=False)
    zero = -torch.tensor(L.manifest.normalization["mean"]) / torch.tensor(L.manifest.normalization["std"])
    e0 = torch.cat([x for x, _, _ in L])
    e1 = torch.cat([x for x, _, _ in L])
    assert torch.equal(e0, e1)
    n = 600
    assert not torch.equal(e0[:n], e0[n:])  # the two copies of each image differ
    is_zero = torch.isclose(e0, zero.view(1, 3, 1, 1).expand_as(e0), atol=1e-6)
    assert (is_zero.reshape(len(e0), -1).sum(1) >= zero_count(0.2, 3072)).all()


# ------------------------------------------------------------------ sharding
def test_epoch_order_shards_cover_disjointly() -> None:
    for n, b, w in [(1000, 128, 2), (1000, 100, 3), (130, 64, 4), (7, 4, 2)]:
        shards = [torch.cat(EpochOrder(n, b, seed=1, rank=r, world=w).rank_batches(5)) for r in range(w)]
        allidx = torch.cat(shards)
        assert len(set(allidx.tolist())) == len(allidx)  # disjoint
        dropped = n % b if 0 < n % b < w else 0
        assert len(allidx) == n - dropped
        steps = {len(EpochOrder(n, b, seed=1, rank=r, world=w).rank_batches(5)) for r in range(w)}
        assert len(steps) == 1  # every rank takes the same number of steps


_WORKER = r"""
import os, sys, torch, torch.distributed as dist
from fastbgm.data import make_loader, LabelSpec
dist.init_process_group("gloo")
L = make_loader(sys.argv[1], batch_size=64, labels=LabelSpec("confusion", seed=1, copies=2, zero_ratio=0.1),
                augment=True)
L.set_epoch(3)
idx = torch.cat([i for _, _, i in L])
sizes = torch.tensor([len(idx)])
allsz = [torch.zeros(1, dtype=torch.long) for _ in range(2)]
dist.all_gather(allsz, sizes)
gathered = [torch.zeros(int(s), dtype=torch.long) for s in allsz]
dist.all_gather(gathered, idx)
if dist.get_rank() == 0:
    allidx = torch.cat(gathered)
    assert len(set(allidx.tolist())) == len(allidx), "overlap"
    assert sorted(allidx.tolist()) == list(range(L.num_samples)), "not covering"
    print("SHARD_OK", len(gathered[0]), len(gathered[1]))
dist.destroy_process_group()
"""


def test_two_gloo_processes_shard_an_epoch(synthetic_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(script), str(synthetic_dir / "train.beton")],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SHARD_OK 600 600" in out.stdout


# ------------------------------------------------------------------ subset, caches, placements
def test_subset_is_class_balanced(synthetic_dir: Path) -> None:
    L = make_loader(synthetic_dir / "train.beton", batch_size=50, subset=100, train=False)
    ys = torch.cat([y for _, y, _ in L])
    assert len(ys) == 100 and torch.bincount(ys, minlength=10).tolist() == [10] * 10
    with pytest.raises(DatasetError, match="subset of 5000"):
        make_loader(synthetic_dir / "train.beton", batch_size=50, subset=5000)


def test_cache_is_rebuilt_when_beton_changes(tmp_path: Path) -> None:
    from fastbgm.data.sources import synthetic_splits
    from fastbgm.data.writer import prepare

    prepare(synthetic_splits(50, 10, 10, 8, seed=0), tmp_path, show_progress=False, num_workers=1)
    first = load_resident(tmp_path / "train.beton")
    assert cache_path(tmp_path / "train.beton").exists()
    prepare(synthetic_splits(50, 10, 10, 8, seed=1), tmp_path, show_progress=False, num_workers=1, overwrite=True)
    second = load_resident(tmp_path / "train.beton")
    assert second.beton_sha256 != first.beton_sha256
    assert not np.array_equal(second.images, first.images)


def test_resident_loader_works_without_ffcv(synthetic_dir: Path) -> None:
    load_resident(synthetic_dir / "train.beton")  # make sure the cache exists
    code = (
        "import sys; sys.modules['ffcv'] = None\n"  # any import of ffcv now fails
        "import fastbgm, fastbgm.data\n"
        "from fastbgm.data import make_loader\n"
        f"L = make_loader({str(synthetic_dir / 'train.beton')!r}, batch_size=100, labels='random')\n"
        "n = sum(len(y) for _, y, _ in L)\n"
        "assert 'ffcv.loader' not in sys.modules\n"
        "print('NOFFCV', n)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "NOFFCV 600" in out.stdout


def test_missing_beton_and_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="fastbgm.data prepare"):
        make_loader(tmp_path / "nope.beton", batch_size=8)
    with pytest.raises(DatasetError, match="placement 'fast' is unknown"):
        make_loader(tmp_path / "nope.beton", batch_size=8, placement="fast")


def test_stream_placement_matches_resident_in_eval(tmp_path: Path) -> None:
    from fastbgm.data.sources import synthetic_splits
    from fastbgm.data.writer import prepare

    prepare(synthetic_splits(120, 10, 10, 32, seed=0), tmp_path, image_format="jpg", show_progress=False,
            num_workers=1)
    res = make_loader(tmp_path / "train.beton", batch_size=32, train=False, placement="resident")
    st = make_loader(tmp_path / "train.beton", batch_size=32, train=False, placement="stream", num_workers=1)
    assert st.placement == "stream" and len(st) == len(res) == 4
    a = [b for b in res]
    b = [b for b in st]
    for (xa, ya, ia), (xb, yb, ib) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(ya, yb)
        torch.testing.assert_close(xa, xb, atol=1e-5, rtol=0)  # same decoded JPEG
    spec = LabelSpec("confusion", seed=1, copies=2, zero_ratio=0.1)
    tr = make_loader(tmp_path / "train.beton", batch_size=32, labels=spec, augment=True, placement="stream",
                     num_workers=1)
    idx = torch.cat([i for _, _, i in tr])
    assert sorted(idx.tolist()) == list(range(240))  # confusion copies through ffcv too


def test_precomputed_resident_paths_equal_per_batch_paths(synthetic_dir: Path) -> None:
    # Materialised noise and padded/mirrored crop windows must give the very same
    # batches as computing noise and crops per batch.
    spec = LabelSpec("confusion", seed=4, copies=2, zero_ratio=0.1)
    fast = make_loader(synthetic_dir / "train.beton", batch_size=100, labels=spec, augment=True, seed=9)
    slow = make_loader(synthetic_dir / "train.beton", batch_size=100, labels=spec, augment=True, seed=9,
                       precompute=False)
    assert fast.noise_materialized and fast._windows is not None
    assert not slow.noise_materialized and slow._windows is None
    for epoch in (0, 3):
        fast.set_epoch(epoch)
        slow.set_epoch(epoch)
        for (xa, ya, ia), (xb, yb, ib) in zip(fast, slow):
            assert torch.equal(ia, ib) and torch.equal(ya, yb) and torch.equal(xa, xb)


def test_loader_from_arrays_matches_file_loader(synthetic_dir: Path) -> None:
    from fastbgm.data import loader_from_arrays

    arr = load_resident(synthetic_dir / "train.beton")
    spec = LabelSpec("confusion", seed=1, copies=2, zero_ratio=0.1)
    a = make_loader(synthetic_dir / "train.beton", batch_size=128, labels=spec, augment=True)
    b = loader_from_arrays(arr.images, arr.labels, batch_size=128, label_spec=spec, augment=True,
                           num_classes=10, normalization=a.manifest.normalization)
    for (xa, ya, ia), (xb, yb, ib) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)
    with pytest.raises(DatasetError, match="uint8"):
        loader_from_arrays(arr.images.astype(np.float32), arr.labels, batch_size=8)


def test_hash_follows_the_device_of_its_tensor_parts() -> None:
    # Regression: ints first used to pin the hash to the CPU, moving GPU indices to the host.
    idx = torch.arange(4, device="meta")
    assert hash_keys(3, idx, 7).device.type == "meta"
    assert augment_keys(1, 2, idx).device.type == "meta"


@pytest.mark.parametrize("budget", [None, 0, "windows-only"])
def test_noise_reaches_every_batch_whatever_is_precomputed(budget: object) -> None:
    # A confusion set too big to materialise but whose crop windows fit used to yield
    # clean images with random labels: the windows path never added the noise.
    from fastbgm.data import loader_from_arrays

    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, size=(50, 8, 8, 3), dtype=np.uint8)  # no natural zeros
    labels = rng.integers(0, 10, size=50)
    spec = LabelSpec("confusion", seed=3, copies=40, zero_ratio=0.1)
    windows_bytes = 2 * 50 * 8 * 8 * 3 + images.nbytes  # pad 0: windows of the clean store
    mem = windows_bytes if budget == "windows-only" else budget
    kw = dict(batch_size=100, label_spec=spec, augment=True, pad=0, num_classes=10, seed=5,
              normalization={"mean": [0.0] * 3, "std": [1.0] * 3})
    ld = loader_from_arrays(images, labels, memory_budget=mem, **kw)
    ref = loader_from_arrays(images, labels, precompute=False, **kw)
    if budget == "windows-only":
        assert not ld.noise_materialized
    for (x, y, i), (xr, yr, ir) in zip(ld, ref):
        assert torch.equal(i, ir) and torch.equal(y, yr) and torch.equal(x, xr)
        zeros = (x == 0).float().mean().item()
        assert zeros == pytest.approx(0.1, abs=0.01), zeros  # every copy noised, exactly 10% of its values


def test_stream_augmentation_is_a_pure_function_of_seed_epoch_and_sample(tmp_path: Path) -> None:
    # ffcv's random-resized-crop drew from its own unseeded RNG: a stream run was neither
    # reproducible nor exactly resumable. The crop now runs on the device from hashes.
    from fastbgm.data.sources import synthetic_splits
    from fastbgm.data.transforms import random_resized_crop
    from fastbgm.data.writer import prepare

    prepare(synthetic_splits(96, 10, 10, 32, seed=0), tmp_path, image_format="jpg", show_progress=False,
            num_workers=1)
    kw = dict(batch_size=32, augment=True, placement="stream", num_workers=1, seed=7)
    a = make_loader(tmp_path / "train.beton", **kw)
    epochs_a = []
    for e in range(3):
        a.set_epoch(e)
        epochs_a.append([(x.clone(), y, i) for x, y, i in a])
    b = make_loader(tmp_path / "train.beton", **kw)  # a "resumed" loader: starts at epoch 2
    b.set_epoch(2)
    for (xa, ya, ia), (xb, yb, ib) in zip(epochs_a[2], b):
        assert torch.equal(ia, ib) and torch.equal(ya, yb) and torch.equal(xa, xb)
    assert not torch.equal(epochs_a[0][0][0], epochs_a[1][0][0])  # a new crop each epoch
    # geometry: scale and ratio pinned to 1 is the identity; a crop is a zoom of the image
    img = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    idx = torch.arange(4)
    assert torch.equal(random_resized_crop(img, 0, 0, idx, scale=(1.0, 1.0), ratio=(1.0, 1.0)), img)
    out = random_resized_crop(img, 0, 0, idx)
    assert out.shape == img.shape and out.dtype == torch.uint8
    assert torch.equal(out, random_resized_crop(img, 0, 0, idx)) and not torch.equal(out, img)
