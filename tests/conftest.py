"""Shared fixtures. Tests run on the CPU with small real files; data from ../shared
is optional and its tests skip with a reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("FASTBGM_TEST_THREADS", "2")))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FASTBGM_SHARED_DATA", REPO.parent / "shared" / "data"))


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
