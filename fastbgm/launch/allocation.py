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

A node that fails costs only the runs on it. The allocation is submitted ``--no-kill``:
Slurm removes the node from it and the job goes on. The driver sees the node go, starts
the runs that were on it again from their last.pt on the nodes left, and starts nothing
more on the lost slots; it waits for no node to come back. A run that needs more nodes
than are left waits for the end, when the driver requeues the allocation at its first
size. The node the driver itself runs on failing ends the job (Slurm fails it): the same
launch command then submits a new allocation, which resumes every unfinished run. A
driver killed by a signal (the OOM killer, say) leaves its batch script, which requeues
the job (job.requeue_killed_job, up to MAX_KILLS times a job): every unfinished run
resumes, followed or not.

A step whose runs make no progress for the stall timeout (``resources.stall_timeout_s``:
their heartbeats stand still) is taken as hung: the driver SIGKILLs its tasks (``scancel``
of the step, found by its name) and starts its runs again from their last.pt, in the
same job (:class:`~fastbgm.launch.schedule.Scheduler`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..slurmenv import slurm_hostnames
from ..train import NO_SPACE_ADVICE, NO_SPACE_EXIT
from ..trainer import checkpoint as C
from .common import read_json
from .job import scontrol_requeue
from .placement import StepRun
from .schedule import Scheduler
from .trainproc import pack_log, train_command

log = logging.getLogger(__name__)

NODE_CHECK_S = 10.0  # how often the driver asks Slurm which nodes the allocation still holds
ALLOCATION_FILE = "slurm-allocation.json"  # in the experiment folder: the allocation's job id


class AllocationDriver:
    """Callable that submitit runs in the allocation's batch script (picklable: plain data)."""

    def __init__(self, runs: list[StepRun], slots_per_node: int, cpus_per_task: int, gpus: bool,
                 runs_per_slot: int = 1, mem_mb_per_rank: int = 0, poll_s: float = 0.5, stall_s: float = 0.0):
        self.runs = runs
        self.stall_s = stall_s
        self.mem_mb_per_rank = mem_mb_per_rank  # on clusters that count memory: each step its share
        self.runs_per_slot = runs_per_slot
        self.slots_per_node = slots_per_node
        self.slots = 0  # ranks the allocation holds at once: its nodes x slots per node, when it starts
        self.cpus_per_task = cpus_per_task
        self.gpus = gpus
        self.poll_s = poll_s

    def __call__(self) -> dict[str, str]:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        job = os.environ.get("SLURM_JOB_ID", "?")
        self._job = job
        self._nodes = allocation_nodes(job) or slurm_hostnames(os.environ.get("SLURM_JOB_NODELIST", ""))
        self._first_nodes = list(self._nodes)
        # (a new allocation may be smaller than the first: resources.min_nodes)
        self.slots = self.slots_per_node * max(1, len(self._nodes) or int(os.environ.get("SLURM_JOB_NUM_NODES", 1)))
        log.info("allocation %s (restart %s): %d runs, %d node(s) (%s), %d slots", job,
                 os.environ.get("SLURM_RESTART_COUNT", "0"), len(self.runs), len(self._nodes),
                 ",".join(self._nodes), self.slots)
        # Slurm places each step; the scheduler only counts slots so that no more is in
        # flight than the allocation holds (steps beyond it would only wait in srun).
        self._losses: list[tuple[float, str]] = []  # (when seen, node) for each node the allocation lost
        self._started: dict[str, float] = {}  # a step's start, by its first run's key
        self._sched = sched = Scheduler(self.runs, list(range(self.slots)), lambda p, _: self._start(p),
                                        runs_per_slot=self.runs_per_slot, interrupted=self._interrupted,
                                        stall_s=self.stall_s, kill=self._kill_step)

        def on_term(signum: int, frame: Any) -> None:  # Slurm ends or requeues the job
            raise _Ended(signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # meant for the steps; they say so by exiting
        try:
            checked = time.time()
            while not sched.finished:
                if time.time() - checked >= NODE_CHECK_S:
                    self._check_nodes()
                    checked = time.time()
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
        elif sched.outgrown:
            log.warning("allocation %s lost node(s) %s: %d run(s) need more than the %d node(s) left; requeueing it "
                        "at its first size, to train them", job, ", ".join(n for _, n in self._losses),
                        len(sched.todo), len(self._nodes))
            self._requeue(job)
        return sched.states

    def _check_nodes(self) -> None:
        """Ask Slurm which nodes the allocation still holds; give up the slots of any it lost."""
        now = allocation_nodes(self._job)
        lost = [n for n in self._nodes if n not in now]
        if not now or not lost:  # (nothing said: the job is changing state; ask again later)
            return
        self._nodes = now
        self._losses += [(time.time(), n) for n in lost]
        self._sched.lose_slots(self.slots_per_node * len(lost), len(now))
        log.warning("allocation %s lost node(s) %s; %d node(s) left, %d slot(s): the runs that were on it start "
                    "again from their last checkpoint on the nodes left", self._job, ", ".join(lost), len(now),
                    self._sched.slots)

    def _interrupted(self, pack: list[StepRun]) -> bool:
        """Whether the step that trained ``pack`` ended because its node was lost: a node
        went while it ran, and it ran there (its trainer wrote its hosts), or it had not
        said where yet. srun may exit 0 on a node failure: the exit code cannot tell."""
        self._check_nodes()
        start = self._started.get(pack[0].key, 0.0)
        lost = {n for t, n in self._losses if t >= start}
        if not lost:
            return False
        env = read_json(Path(pack[0].run_dir) / C.ENV)
        hosts = {h.split(".")[0] for h in env.get("hosts") or []}
        if env.get("started", 0.0) < start or not hosts & set(self._first_nodes):
            return True  # it never said where it ran (or by names that are not Slurm's)
        return bool(hosts & lost)

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
        self._started[r.key] = time.time()
        with pack_log(pack) as out:  # the step keeps its own copy of the file descriptor
            return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def _kill_step(self, proc: subprocess.Popen, pack: list[StepRun]) -> None:
        """SIGKILL a hung step's tasks, wherever they run (its srun then ends). A step
        Slurm has not started yet (srun waits for it) goes with its srun."""
        r = subprocess.run(["squeue", "-h", "--steps", f"--jobs={self._job}", "--format=%i %j"],
                           capture_output=True, text=True, timeout=60)
        steps = [line.split()[0] for line in r.stdout.splitlines() if line.split()[1:] == [pack[0].key]]
        if steps:
            subprocess.run(["scancel", "--signal=KILL", *steps], capture_output=True, timeout=60)
        else:
            proc.kill()

    @staticmethod
    def _requeue(job: str) -> None:
        try:
            scontrol_requeue(job)
        except subprocess.CalledProcessError as e:
            log.error("could not requeue allocation %s (%s); re-launch to resume its runs", job, e)
            return
        log.info("requeued allocation %s; every unfinished run resumes from last.pt", job)
        try:
            time.sleep(120)  # Slurm ends this instance of the job
        except _Ended:
            raise SystemExit(143) from None


def allocation_nodes(job: str) -> list[str]:
    """The nodes a running job holds now (none while it is pending, gone, or unknown)."""
    try:
        q = subprocess.run(["squeue", "-h", "-j", job, "-t", "RUNNING", "-o", "%N"], capture_output=True, text=True,
                           timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    return slurm_hostnames(q.stdout.strip()) if q.returncode == 0 else []


class _Ended(BaseException):
    pass
