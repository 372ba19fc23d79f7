"""Run an experiment's DAG on this machine, in dependency order, with no Slurm: one run
per visible GPU, or on a CPU-only machine ``cores // cpus_per_task`` runs side by side,
each pinned to ``cpus_per_task`` threads (small CPU runs scale poorly across threads)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Iterator

import torch

from ..config import to_dict
from ..experiment import RunSpec, run_status
from ..fileio import atomic_write_json
from .common import Decision, mark_cancelled, table, will_run

PLANNED = "planned-config.json"


def _slots(cpus_per_task: int) -> list[str | None]:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n:
        return [str(i) for i in range(n)]
    return [None] * max(1, (os.cpu_count() or 1) // max(1, cpus_per_task))


def run_local(decisions: list[Decision], all_runs: list[RunSpec], console: Any, cpus_per_task: int = 0,
              poll_s: float = 0.5) -> None:
    todo = [d.run for d in decisions if will_run(d)]
    states = {d.run.key: d.status for d in decisions}
    for d in decisions:
        if d.action == "blocked":
            mark_cancelled(d.run, d.reason)
            states[d.run.key] = "cancelled"
    cpus = cpus_per_task or (os.cpu_count() or 1)
    free = _slots(cpus)
    running: dict[str, tuple[subprocess.Popen, str | None, RunSpec]] = {}
    from rich.live import Live

    with Live(table(all_runs, states, "fastbgm local"), console=console, refresh_per_second=2) as view, \
            _stop_children_on_exit(running):
        while todo or running:
            for key, (proc, dev, r) in list(running.items()):
                if proc.poll() is not None:
                    del running[key]
                    free.append(dev)
                    states[key] = run_status(r.run_dir)[0]
                    if states[key] not in ("done", "failed"):  # died before it could say why
                        atomic_write_json(r.run_dir / "result.json", {
                            "name": key, "status": "failed",
                            "reason": f"exited with code {proc.returncode}; see {r.run_dir / 'train.log'}"})
                        states[key] = "failed"
                    if states[key] != "done":
                        for child in [x for x in todo if key in x.depends_on]:
                            todo.remove(child)
                            mark_cancelled(child, f"its stage-1 run {key} failed")
                            states[child.key] = "cancelled"
            ready = [r for r in todo if all(states.get(dep) == "done" for dep in r.depends_on)]
            while ready and free:
                r = ready.pop(0)
                todo.remove(r)
                dev = free.pop(0)
                running[r.key] = (_start(r, dev, cpus), dev, r)
                states[r.key] = "running"
            if not running and todo and not ready:  # waiting on something that will never finish
                for r in todo:
                    mark_cancelled(r, "a dependency did not finish")
                    states[r.key] = "cancelled"
                todo = []
            view.update(table(all_runs, states, "fastbgm local"))
            time.sleep(poll_s)
        view.update(table(all_runs, states, "fastbgm local"))


class Stopped(KeyboardInterrupt):
    """The launcher was asked to stop (SIGINT, SIGTERM, SIGHUP)."""


@contextlib.contextmanager
def _stop_children_on_exit(running: dict) -> Iterator[None]:
    """Whatever ends the launcher (a signal, an error), its trainers end with it: an
    orphaned trainer would otherwise go on and meet the next launch's trainer in the
    same run folder. Each run keeps its last.pt and resumes on the next launch."""
    def on_signal(signum: int, frame: Any) -> None:
        raise Stopped(signal.Signals(signum).name)

    handled = (signal.SIGTERM, signal.SIGHUP)
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, on_signal) for s in handled} if main else {}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        procs = [p for p, _, _ in running.values() if p.poll() is None]
        for p in procs:
            p.terminate()
        deadline = time.time() + 15
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the kernel sends the child SIGTERM when the launcher dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _start(r: RunSpec, device: str | None, threads: int) -> subprocess.Popen:
    r.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(r.run_dir / PLANNED, to_dict(r.config))
    env = dict(os.environ)
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    else:
        env["OMP_NUM_THREADS"] = str(threads)  # runs side by side must not oversubscribe the cores
    log = open(r.run_dir / "train.log", "a")
    cmd = [sys.executable, "-m", "fastbgm.train", "--config", str(r.run_dir / PLANNED), "--run-dir", str(r.run_dir)]
    if device is None and not r.config.speed.threads:
        cmd.append(f"--speed.threads={threads}")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
