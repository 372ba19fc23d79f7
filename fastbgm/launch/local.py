"""Run an experiment's DAG on this machine, with no Slurm: the same scheduling as a Slurm
allocation (:mod:`fastbgm.launch.schedule`) over this machine's GPUs, or CPU slots."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Iterator

from ..experiment import Resources, RunSpec
from .common import LaunchError, runs_view, step_run
from .placement import StepRun
from .schedule import Scheduler
from .trainproc import pack_log, train_command


def local_gpus() -> int:
    """This machine's visible GPUs. torch is imported here, not where the launcher is:
    a launch on Slurm, its dry run, an allocation's driver and a job's teardown import none."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_slots(res: Resources) -> list[str | None]:
    """This machine's slots: its visible GPUs (by index), or on a CPU-only machine
    ``cores // cpus_per_task`` CPU slots (small CPU runs scale poorly across threads)."""
    n = local_gpus()
    if n:
        return [str(i) for i in range(n)]
    return [None] * max(1, (os.cpu_count() or 1) // max(1, res.cpus_per_task))


def run_local(runs: list[RunSpec], res: Resources, console: Any, poll_s: float = 0.5) -> bool:
    """Run every unfinished run of ``runs`` on this machine, in dependency order. False
    when a trainer found no space to write its run folder: then nothing more was started,
    and the runs so stopped resume on the next launch."""
    slots = local_slots(res)
    steps = [step_run(r, res) for r in runs]
    try:
        sched: Scheduler[str | None] = Scheduler(steps, slots, lambda p, s: _start(p, s, res.cpus_per_task),
                                                 runs_per_slot=res.runs_per_gpu, stall_s=res.stall_timeout_s)
    except ValueError as e:
        raise LaunchError(f"{e} on this machine; lower resources.ranks_per_run or run on Slurm") from None
    with runs_view(runs, sched.states, "fastbgm local", console, refresh_per_second=2) as view, \
            _stop_children_on_exit(sched):
        while not sched.finished:
            sched.poll()
            view.show(sched.states)
            time.sleep(poll_s)
        view.show(sched.states)
    return not sched.no_space


class Stopped(KeyboardInterrupt):
    """The launcher was asked to stop (SIGINT, SIGTERM, SIGHUP)."""


@contextlib.contextmanager
def _stop_children_on_exit(sched: Scheduler) -> Iterator[None]:
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
        sched.stop_all(grace_s=15)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the kernel sends the child SIGTERM when the launcher dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _start(pack: list[StepRun], devices: list[str | None], threads: int) -> subprocess.Popen:
    """One process for ``pack`` (one run, or several packed onto one device)."""
    env = dict(os.environ)
    if devices[0] is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(d for d in devices if d is not None)
    else:
        env["OMP_NUM_THREADS"] = str(threads)  # runs side by side must not oversubscribe the cores
    cmd = [sys.executable, *train_command(pack)]
    if pack[0].ranks > 1:  # one DDP run over its slots: torchrun on this machine (exiting as the rank that
        # ended the run exited: ddplocal.py)
        cmd = [sys.executable, "-m", "fastbgm.launch.ddplocal", "--standalone", f"--nproc-per-node={pack[0].ranks}",
               *cmd[1:]]
    if devices[0] is None:
        cmd.append(f"--speed.threads={threads}")
    with pack_log(pack) as log:  # the child keeps its own copy of the file descriptor
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
