"""The mini two-stage experiment that the launcher benchmarks run end to end (``faults``,
``schedule``): synthetic 12 px data, a small CNN, stage 1 on replicated random labels,
stage 2 from random and adversarial init, through ``python -m fastbgm.launch``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

NAME = "mini"

EXPERIMENT = """name = "{name}"
runs_dir = "{runs}"
models = ["small_cnn"]
seeds = {seeds}
modes = {modes}
inits = ["random", "adversarial"]
[[datasets]]
name = "tiny"
train = "{data}/train.beton"
test = "{data}/test.beton"
[model]
width = 8
depth = 2
[stage1]
copies = 2
lr = {stage1_lr}
momentum = 0.9
batch_size = 64
milestones = []
max_epochs = 6
target_train_acc = 1.0
check_every = 2
[stage2]
lr = 0.05
batch_size = 64
milestones = [4]
max_epochs = 6
eval_every = 2
[speed]
threads = 1
checkpoint_every_s = 0  # every epoch: the faults land mid-run
[resources]
gpus = 0
cpus_per_task = 1
time = "00:20:00"
"""


def dataset(root: Path) -> Path:
    """The experiment's data (written once, with its resident cache)."""
    from fastbgm.data.cache import load_resident
    from fastbgm.data.sources import synthetic_splits
    from fastbgm.data.writer import prepare

    if not (root / "train.beton").exists():
        prepare(synthetic_splits(192, 96, 10, 12, seed=3), root, show_progress=False, num_workers=1)
    load_resident(root / "train.beton")
    load_resident(root / "test.beton")
    return root


def experiment(work: Path, data: Path, stage1_lr: float = 0.05, seeds: int = 1,
               modes: tuple[str, ...] = ("vanilla",), name: str = NAME) -> Path:
    """The experiment's config in ``work``; its runs go to ``work/runs/<name>``."""
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / f"{name}.toml"
    cfg.write_text(EXPERIMENT.format(name=name, runs=work / "runs", data=data, stage1_lr=stage1_lr,
                                     seeds=list(range(seeds)), modes=json.dumps(list(modes))))
    return cfg


def launch_cmd(cfg: Path, executor: str, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "fastbgm.launch", "--config", str(cfg), "--executor", executor, "--no-report"]
    if executor == "slurm":  # two CPU-task nodes where the cluster has them: a node can fail and one be left
        from fastbgm.launch.cluster import cluster_capacity

        cmd += ["--nodes", str(min(2, cluster_capacity()["nodes"])), "--gpus-per-node", "0", "--timeout", "400"]
    return cmd + list(extra)


def start_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=open(log, "a"), stderr=subprocess.STDOUT, env=start_env())
