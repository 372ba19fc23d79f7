"""Which runs start when: the one scheduling loop behind the local executor and the
Slurm allocation driver.

A run is ready when every run it depends on is done; it starts as soon as its ranks
fit in the free slots (a slot is a GPU, or a CPU task); a finished run frees its slots;
a failed or cancelled run cancels its dependents, with the reason. The run folders are
the only truth about a run: a scheduler started again (a re-launch, a requeued
allocation) rebuilds everything from them. How a run is started (a local process, a
Slurm job step) is the caller's ``start`` function.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generic, Sequence, TypeVar

from ..experiment import run_status
from ..fileio import atomic_write_json

log = logging.getLogger(__name__)

STOP_EXIT = 75  # a trainer stopped on request, resumable (EX_TEMPFAIL); see fastbgm.train
PLANNED = "planned-config.json"  # the run's config as the launcher planned it, beside its folder's files
S = TypeVar("S")


@dataclass
class StepRun:
    """What scheduling needs of one run: where it lives, what it waits for, its size."""

    key: str
    run_dir: str
    depends_on: list[str] = field(default_factory=list)
    ranks: int = 1  # processes (one per GPU, or CPU tasks)
    ranks_per_node: int = 1

    @property
    def nodes(self) -> int:
        return -(-self.ranks // self.ranks_per_node)


def mark_cancelled(run_dir: str | Path, key: str, reason: str) -> None:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(run_dir) / "result.json", {"name": key, "status": "cancelled", "reason": reason})


class Scheduler(Generic[S]):
    """Start ready runs on free slots; call :meth:`poll` until :attr:`finished`."""

    def __init__(self, runs: Sequence[StepRun], slots: Sequence[S],
                 start: Callable[[StepRun, list[S]], subprocess.Popen]):
        self.runs = list(runs)
        self.free: list[S] = list(slots)
        self.start = start
        self.states = {r.key: run_status(Path(r.run_dir))[0] for r in self.runs}
        self.todo = [r for r in self.runs if self.states[r.key] not in ("done", "failed", "cancelled")]
        self.running: dict[str, tuple[subprocess.Popen, StepRun, list[S]]] = {}
        self.stop_requested = False  # a trainer exited with STOP_EXIT: start nothing more
        too_big = [r.key for r in self.todo if r.ranks > len(self.free)]
        if too_big:
            raise ValueError(f"{len(too_big)} run(s) need more ranks than there are slots ({len(self.free)}): "
                             f"{', '.join(too_big[:3])}")

    @property
    def finished(self) -> bool:
        return not self.running and (not self.todo or self.stop_requested)

    def poll(self) -> None:
        """Settle the runs that ended, cancel what can no longer run, start what is ready."""
        for key, (proc, r, slots) in list(self.running.items()):
            if proc.poll() is None:
                continue
            del self.running[key]
            self.free.extend(slots)
            if proc.returncode == STOP_EXIT:
                self.stop_requested = True
                self.states[key] = "running"  # resumable from last.pt
                log.info("%s: stopped on request; it resumes later", key)
                continue
            self.states[key] = self._settle(r, proc.returncode)
            log.info("%s: %s (exit %s)", key, self.states[key], proc.returncode)
        self._cancel_blocked()
        if self.stop_requested:
            return
        for r in [r for r in self.todo if self._ready(r)]:
            if r.ranks > len(self.free):
                continue  # a smaller ready run may still fit
            slots, self.free = self.free[:r.ranks], self.free[r.ranks:]
            self.todo.remove(r)
            self.running[r.key] = (self.start(r, slots), r, slots)
            self.states[r.key] = "running"
        if not self.running and self.todo and not any(self._ready(r) for r in self.todo):
            for r in self.todo:  # waiting on something that will never finish
                mark_cancelled(r.run_dir, r.key, "a dependency did not finish")
                self.states[r.key] = "cancelled"
            self.todo = []

    def stop_all(self, grace_s: float = 20.0) -> None:
        """SIGTERM every running run (each keeps its last.pt), SIGKILL what outlives ``grace_s``."""
        import time

        procs = [p for p, _, _ in self.running.values() if p.poll() is None]
        for p in procs:
            p.terminate()
        deadline = time.time() + grace_s
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    # ------------------------------------------------------------------ pieces
    def _ready(self, r: StepRun) -> bool:
        return all(self.states.get(d) == "done" for d in r.depends_on)

    def _settle(self, r: StepRun, returncode: int) -> str:
        status = run_status(Path(r.run_dir))[0]
        if status in ("done", "failed"):
            return status
        # died before it could say why (killed, out of memory, a crash in start-up)
        atomic_write_json(Path(r.run_dir) / "result.json", {
            "name": r.key, "status": "failed",
            "reason": f"exited with code {returncode}; see {Path(r.run_dir) / 'train.log'}"})
        return "failed"

    def _cancel_blocked(self) -> None:
        keep = []
        for r in self.todo:
            bad = next((d for d in r.depends_on if self.states.get(d) in ("failed", "cancelled")), None)
            if bad is None:
                keep.append(r)
                continue
            mark_cancelled(r.run_dir, r.key, f"its stage-1 run {bad} {self.states[bad]}")
            self.states[r.key] = "cancelled"
            log.info("%s: cancelled (its stage-1 run %s %s)", r.key, bad, self.states[bad])
        self.todo = keep
