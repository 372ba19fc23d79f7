"""Where and with what a run trained (its env.json): the code's version and commit,
torch, CUDA, Python, the device and hosts, the resolved speed switches, the seeds and
the checksums of its datasets: what a result is read against."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .. import __version__
from .. import distributed as D
from ..data import Manifest
from ..models import count_parameters
from .config import RunConfig
from .speed import Speed


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(cfg: RunConfig, env: D.DistEnv, speed: Speed, module: nn.Module, flops: float | None,
               hosts: list[str], pack: list[str]) -> dict[str, Any]:
    """A run's env.json: ``hosts``, where each rank ran; ``pack``, the run folders trained
    in its process with it."""
    def manifest(path: str) -> dict[str, Any] | None:
        try:
            m = Manifest.for_beton(path)
            return {"path": str(path), "sha256": m.sha256, "num_samples": m.num_samples, "source": m.source}
        except (FileNotFoundError, ValueError):
            return None

    dev_name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu"
    return {
        "started": time.time(), "hosts": hosts, "pid": os.getpid(), "pack": pack,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "slurm_job": os.environ.get("SLURM_JOB_ID"), "slurm_step": os.environ.get("SLURM_STEP_ID"),
        "fastbgm": __version__, "git_commit": git_commit(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": sys.version.split()[0], "device": dev_name, "world": env.world,
        "speed": dataclasses.asdict(speed), "bn_init": cfg.model.bn_init, "seed": cfg.seed,
        "label_seed": cfg.data.label_seed, "data_seed": cfg.data.seed,
        "parameters": count_parameters(module), "train_flops_per_image": flops,
        "train_data": manifest(cfg.data.train), "test_data": manifest(cfg.data.test) if cfg.data.test else None,
    }
