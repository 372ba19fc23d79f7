"""Inside one Slurm allocation: an experiment's runs as job steps.

``--nodes N`` submits ONE job for the whole experiment (N nodes x G GPUs, through
submitit with ``use_srun=False``, so :class:`AllocationDriver` runs in the batch
script). The driver starts one ``srun --exact`` step per ready run: a random-init run
at once, an adversarial stage-2 run as soon as its stage 1 is done. Slurm places each
step on free GPUs; the driver only decides which runs are ready and keeps no more than
the allocation holds in flight.

The run folders are the only truth: a requeued allocation (preemption, ``scontrol
requeue``, the time limit) starts the driver again, which skips finished runs and
resumes the others from their last.pt. Before the time limit Slurm signals the steps
(submitit's ``--signal=USR2@90``); a trainer so warned exits with :data:`STOP_EXIT`,
and the driver then requeues the allocation itself.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

from ..train import NO_SPACE_ADVICE, NO_SPACE_EXIT
from .job import scontrol_requeue
from .schedule import Scheduler, StepRun, pack_log, train_command

log = logging.getLogger(__name__)

ALLOCATION_FILE = "slurm-allocation.json"  # in the experiment folder: the allocation's job id


class AllocationDriver:
    """Callable that submitit runs in the allocation's batch script (picklable: plain data)."""

    def __init__(self, runs: list[StepRun], slots: int, cpus_per_task: int, gpus: bool, runs_per_slot: int = 1,
                 mem_mb_per_rank: int = 0, poll_s: float = 0.5):
        self.runs = runs
        self.mem_mb_per_rank = mem_mb_per_rank  # on clusters that count memory: each step its share
        self.runs_per_slot = runs_per_slot
        self.slots = slots  # ranks the allocation holds at once (nodes x slots per node)
        self.cpus_per_task = cpus_per_task
        self.gpus = gpus
        self.poll_s = poll_s

    def __call__(self) -> dict[str, str]:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        job = os.environ.get("SLURM_JOB_ID", "?")
        log.info("allocation %s (restart %s): %d runs, %d slots", job, os.environ.get("SLURM_RESTART_COUNT", "0"),
                 len(self.runs), self.slots)
        # Slurm places each step; the scheduler only counts slots so that no more is in
        # flight than the allocation holds (steps beyond it would only wait in srun).
        sched: Scheduler[int] = Scheduler(self.runs, list(range(self.slots)), lambda p, _: self._start(p),
                                          runs_per_slot=self.runs_per_slot)

        def on_term(signum: int, frame: Any) -> None:  # Slurm ends or requeues the job
            raise _Ended(signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # meant for the steps; they say so by exiting
        try:
            while not sched.finished:
                sched.poll()
                time.sleep(self.poll_s)
        except _Ended as e:
            log.info("allocation ending (%s): stopping %d step(s); they resume from last.pt", e, len(sched.running))
            sched.stop_all()
            raise SystemExit(143) from None
        if sched.no_space:  # a requeue would meet the same full disk: end, and say so
            log.error("allocation %s: no space left to write the run folders (see their train.log); %s",
                      job, NO_SPACE_ADVICE)
            raise SystemExit(NO_SPACE_EXIT)
        if sched.stop_requested:  # the time limit is near: requeue; every unfinished run resumes later
            sched.stop_all()
            self._requeue(job)
        return sched.states

    def _start(self, pack: list[StepRun]) -> subprocess.Popen:
        r = pack[0]
        cmd = ["srun", "--exact", f"--nodes={r.nodes}", f"--ntasks={r.ranks}", f"--ntasks-per-node={r.ranks_per_node}",
               f"--cpus-per-task={self.cpus_per_task}", f"--job-name={r.key}", "--kill-on-bad-exit=1"]
        if self.gpus:
            # --gres per step gives each step its own GPUs (--gpus-per-task gives every
            # task of the step all the node's GPUs of the job, in Slurm 22.05)
            cmd.append(f"--gres=gpu:{r.ranks_per_node}")
        if self.mem_mb_per_rank:  # else a step may claim the whole node's memory and serialise the others
            cmd.append(f"--mem={self.mem_mb_per_rank * r.ranks_per_node}M")
        cmd += [sys.executable, *train_command(pack), f"--speed.threads={self.cpus_per_task}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(self.cpus_per_task)}
        log.info("starting %s (%d rank(s) on %d node(s))", ", ".join(x.key for x in pack), r.ranks, r.nodes)
        with pack_log(pack) as out:  # the step keeps its own copy of the file descriptor
            return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    @staticmethod
    def _requeue(job: str) -> None:
        try:
            scontrol_requeue(job)
        except subprocess.CalledProcessError as e:
            log.error("could not requeue allocation %s (%s); re-launch to resume its runs", job, e)
            return
        log.info("requeued allocation %s; every unfinished run resumes from last.pt", job)
        time.sleep(120)  # Slurm ends this instance of the job


class _Ended(BaseException):
    pass
