"""What a run folder holds, and how checkpoints are saved and restored.

run_dir/config.json     the resolved RunConfig
run_dir/env.json        provenance: code version, device, torch, dataset checksums
run_dir/metrics.jsonl   one line per epoch
run_dir/init.pt         the weights the run started from (for distance-from-init)
run_dir/last.pt         model, optimizer, scheduler, epoch, RNG, loader: written at the end of an
                        epoch every speed.checkpoint_every_s, and at the stop
run_dir/final.pt        the final model
run_dir/result.json     status (running / done / failed + reason) and final numbers
run_dir/planned-config.json   the config a launcher planned for it (what it starts from)
run_dir/train.log       what the trainer process printed (launchers)
run_dir/heartbeat       touched while the run trains (its mtime: a scheduler's sign of progress)
run_dir/.lock           held by the run's trainer for its whole life
run_dir/slurm-job.json  its Slurm job, when the launcher gave it one of its own (--jobs per-run)
run_dir/hangs.json      the times its trainer hung, by that job (the job's own watch: launch/job.py)
Every file is written to a temp file and renamed (see fastbgm.fileio).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from ..fileio import atomic_torch_save, atomic_write_text, read_jsonl

if TYPE_CHECKING:
    import torch

CONFIG = "config.json"
ENV = "env.json"
METRICS = "metrics.jsonl"
INIT = "init.pt"
LAST = "last.pt"
FINAL = "final.pt"
RESULT = "result.json"
PLANNED = "planned-config.json"
TRAIN_LOG = "train.log"  # what a launcher's trainer process prints
HEARTBEAT = "heartbeat"

log = logging.getLogger("fastbgm.trainer")


def rank_failure_path(run_dir: str | Path, rank: int) -> Path:
    """Where a rank other than 0 says why it failed (rank 0 writes result.json): under
    DDP the first rank to fail is the one that knows why; the others only see a peer go."""
    return Path(run_dir) / f"failed-rank{rank}.json"


def rank_failures(run_dir: str | Path) -> list[dict[str, Any]]:
    """The failure records of this attempt's ranks, the first to fail first."""
    found = []
    for p in Path(run_dir).glob("failed-rank*.json"):
        try:
            found.append((p.stat().st_mtime, json.loads(p.read_text())))
        except (OSError, ValueError):
            continue  # being replaced, or not one of ours
    return [rec for _, rec in sorted(found, key=lambda x: x[0])]


def rank_failure_reason(record: dict[str, Any]) -> str:
    """How a run's result names the rank that failed first, from its record."""
    return f"rank {record['rank']} failed: {record['reason']}"


def remove_stale_temp(run_dir: str | Path) -> list[str]:
    """Delete the temporary files of writes that a killed process left half done (only
    its trainer writes in a run folder, and the caller holds the folder's lock)."""
    gone = []
    for p in Path(run_dir).glob(".*.tmp"):
        p.unlink(missing_ok=True)
        gone.append(p.name)
    return gone


def beat(run_dirs: Iterable[str | Path]) -> None:
    """Say that these runs' process still makes progress: their heartbeat's mtime is now.
    Never an error (a full disk may refuse to create the file; the run must go on)."""
    for d in run_dirs:
        p = Path(d) / HEARTBEAT
        try:
            os.utime(p)
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                p.touch()
        except OSError:
            pass


def last_beat(run_dir: str | Path) -> float:
    """When the run's process last said it made progress (0: never)."""
    try:
        return (Path(run_dir) / HEARTBEAT).stat().st_mtime
    except OSError:
        return 0.0


def checkpointed_epochs(run_dir: str | Path) -> int:
    """The epochs a resume of this run keeps, read from metrics.jsonl rather than by
    loading last.pt: the epoch of the last row written with its checkpoint (the rows
    after it are trained again). A kill between a checkpoint and its row makes this
    one checkpoint short."""
    saved = [r.get("epoch", 0) for r in read_jsonl(Path(run_dir) / METRICS)
             if r.get("checkpointed") or "checkpoint_seconds" in r]  # (the latter: rows of older runs)
    return int(saved[-1]) if saved else 0


def epochs_to_full_train(rows: list[dict[str, Any]]) -> int | None:
    """The first epoch whose running (train-mode) training accuracy reached 100%: when
    SGD first fits the whole training set (the paper's "epochs to 100% train")."""
    return next((r["epoch"] for r in rows if r.get("train_acc", 0) >= 1.0), None)


def has_training(run_dir: str | Path) -> bool:
    """Whether a folder holds anything trained (a checkpoint, or a final model): only
    then does the config it was made with bind whoever starts it again."""
    d = Path(run_dir)
    return (d / LAST).exists() or (d / FINAL).exists()


def rng_state() -> dict[str, Any]:
    import torch  # (in the functions that need it: a launcher reads run folders with this module)

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except TypeError:  # pragma: no cover - torch without weights_only
        return torch.load(path, map_location=map_location)


def resolve_init(path: str | Path) -> Path:
    """``init_from`` may name a checkpoint file or a finished run folder (its final.pt)."""
    p = Path(path)
    if p.is_dir():
        p = p / FINAL
    if not p.exists():
        raise FileNotFoundError(
            f"init_from: {p} does not exist; point it at a checkpoint or at a finished run folder (with {FINAL})"
        )
    return p


def model_state(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Weights *and* BatchNorm running statistics (the full module state)."""
    return ckpt["model"]


def save_last(run_dir: str | Path, module: Any, optimizer: Any, scheduler: Any, scaler: Any, epoch: int,
              stopped: bool, row: dict[str, Any]) -> None:
    """last.pt after ``epoch`` epochs: everything a resume needs to go on as if never
    stopped (every per-sample draw is a function of the seed and the epoch, so the
    loader's state is its epoch), with the epoch's metrics row (``row``): a kill between
    the checkpoint and the row's line in metrics.jsonl is mended on resume."""
    atomic_torch_save({
        "model": module.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None, "epoch": epoch, "stopped": stopped,
        "rng": rng_state(), "loader": {"epoch": epoch}, "metrics_row": dict(row),
    }, Path(run_dir) / LAST)


def resume(run_dir: str | Path, module: Any, optimizer: Any, scheduler: Any, scaler: Any, train: Any,
           is_main: bool) -> tuple[int, bool]:
    """Restore a run's objects from its last.pt: (epochs already done, whether the run had
    decided to stop); (0, False) when it has none. ``is_main``: this process keeps the
    folder's metrics.jsonl to the checkpoint's epochs (the rows after it are trained
    again) and moves an unreadable last.pt aside."""
    d = Path(run_dir)
    p = d / LAST
    if not p.exists():
        if is_main and (d / METRICS).exists():
            (d / METRICS).unlink()  # rows of a run that never checkpointed
        return 0, False
    try:
        ckpt = load(p)
    except Exception as e:  # written atomically, so only damage from outside gets here
        if is_main:
            aside = p.with_name(f"{p.name}.unreadable-{int(time.time())}")
            p.rename(aside)
            (d / METRICS).unlink(missing_ok=True)
            log.warning("%s is unreadable (%s: %s); kept as %s, and the run starts over (every draw is a "
                        "function of the seed and epoch: it reaches the same result)", p, type(e).__name__, e,
                        aside.name)
        return 0, False
    module.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    train.load_state_dict(ckpt["loader"])
    set_rng_state(ckpt["rng"])
    epoch = int(ckpt["epoch"])
    if is_main:  # drop metric rows written after the checkpoint we resume from
        rows = [r for r in read_jsonl(d / METRICS) if r.get("epoch", 0) <= epoch]
        if ckpt.get("metrics_row") and (not rows or rows[-1].get("epoch") != epoch):
            rows.append(ckpt["metrics_row"])  # killed after the checkpoint, before its row
        atomic_write_text(d / METRICS, "".join(json.dumps(r) + "\n" for r in rows))
    stopped = bool(ckpt.get("stopped", False))
    log.info("resuming %s after epoch %d%s", d, epoch, " (its stop rule had fired)" if stopped else "")
    return epoch, stopped
