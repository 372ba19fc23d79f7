"""Shared fixtures. Tests run on the CPU with small real files; data from ../shared
is optional and its tests skip with a reason when it is absent."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import torch

torch.set_num_threads(int(os.environ.get("FASTBGM_TEST_THREADS", "2")))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FASTBGM_SHARED_DATA", REPO.parent / "shared" / "data"))


@contextlib.contextmanager
def small_disk(path: Path, size_kb: int) -> Iterator[Path]:
    """A tmpfs of ``size_kb`` at ``path`` for the block: a disk that fills up (the test
    skips where none can be mounted: it needs root)."""
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield path
    finally:  # lazily: a file still open (torch's writer, after its error) would keep it mounted
        subprocess.run(["umount", "--lazy", str(path)], capture_output=True)


def resize_disk(path: Path, size_kb: int) -> None:
    """Space freed (or taken) on a :func:`small_disk`."""
    subprocess.run(["mount", "-o", f"remount,size={size_kb}k", str(path)], check=True, capture_output=True)


def shared_file(name: str) -> Path:
    p = SHARED_DATA / name
    if not p.exists():
        pytest.skip(f"{p} is absent (the ../shared data is optional; set FASTBGM_SHARED_DATA to use it)")
    return p


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real .beton dataset (synthetic images, learnable classes)."""
    from fastbgm.data.sources import synthetic_splits
    from fastbgm.data.writer import prepare

    out = tmp_path_factory.mktemp("synthetic")
    prepare(synthetic_splits(600, 200, 10, 32, seed=0), out, show_progress=False, num_workers=2)
    return out


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 16 px dataset for training tests."""
    from fastbgm.data.sources import synthetic_splits
    from fastbgm.data.writer import prepare

    out = tmp_path_factory.mktemp("tiny")
    prepare(synthetic_splits(256, 128, 10, 16, seed=1), out, show_progress=False, num_workers=2)
    from fastbgm.data.cache import load_resident

    load_resident(out / "train.beton")
    load_resident(out / "test.beton")
    return out


def run_config(data_dir: Path, **overrides: object):
    """A RunConfig on the tiny set; overrides as dotted keys."""
    from fastbgm.config import load
    from fastbgm.trainer import RunConfig

    base = {"data": {"train": str(data_dir / "train.beton"), "test": str(data_dir / "test.beton")},
            "model": {"name": "small_cnn", "width": 16, "depth": 3},
            "optim": {"lr": 0.05, "batch_size": 64, "milestones": []},
            "stop": {"max_epochs": 4, "train_eval_every": 2, "test_eval_every": 2},
            "speed": {"threads": 2, "checkpoint_every_s": 0}}  # (kills land mid-run)
    return load(RunConfig, None, [f"--{k}={v}" for k, v in overrides.items()], base=base)
