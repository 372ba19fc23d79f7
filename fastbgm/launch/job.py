"""The unit of work a scheduler runs: one training run, checkpointable.

submitit pickles a :class:`RunJob` by reference to this installed module. On
preemption or time-out submitit calls :meth:`checkpoint`, which requeues the same
job; the trainer then resumes from the run folder's ``last.pt``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from ..trainer.config import RunConfig

log = logging.getLogger(__name__)


class RunFailed(RuntimeError):
    """The run ended with status failed (so the Slurm job fails and afterok dependents are cancelled)."""


def scontrol_requeue(job_id: str) -> None:
    """``scontrol requeue JOB``, made robust: a preemption sends SIGTERM and then the
    requeue signal, and under load the SIGTERM can reach the job's processes after
    scontrol has started, killing it before the request is sent (the job then ends
    instead of being requeued). Called from signal handlers, in the main thread."""
    rc = 0
    # SIG_IGN (unlike a Python handler) is inherited by scontrol across fork + exec
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        for _ in range(3):
            rc = subprocess.call(["scontrol", "requeue", str(job_id)], timeout=60)
            if rc >= 0:
                break  # ran to completion (rc < 0: killed by a signal; try again)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if rc != 0:
        raise subprocess.CalledProcessError(rc, ["scontrol", "requeue", str(job_id)])


def _requeue_ignoring_sigterm(self: Any, countdown: int) -> None:
    """submitit's requeue (its SlurmJobEnvironment._requeue), through :func:`scontrol_requeue`."""
    scontrol_requeue(self.job_id)
    log.info("requeued job %s (%d remaining timeouts)", self.job_id, countdown)


class RunJob:
    def __init__(self, config: RunConfig, run_dir: str | os.PathLike, threads: int = 0):
        self.config = config
        self.run_dir = str(run_dir)
        self.threads = threads

    def __call__(self) -> dict[str, Any]:
        import submitit
        import torch

        env = submitit.JobEnvironment()
        if hasattr(type(env), "_requeue") and type(env).__name__ == "SlurmJobEnvironment":
            type(env)._requeue = _requeue_ignoring_sigterm
        if env.num_tasks > 1:
            # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from submitit (no hand-parsed SLURM_*)
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        if self.threads:
            # task/none binds nothing: every task would otherwise use every core
            os.environ["OMP_NUM_THREADS"] = str(self.threads)
            torch.set_num_threads(self.threads)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        from ..trainer import Trainer

        result = Trainer(self.config, Path(self.run_dir)).run()
        if result.get("status") != "done":
            raise RunFailed(f"{self.run_dir}: {result.get('reason', result.get('status'))}")
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        from ..trainer import request_stop

        # submitit requeues right after this returns; the requeue kills this job, and a
        # failure raised meanwhile must not be recorded as the run failing
        request_stop()
        log.info("requeueing %s; it resumes from its last.pt", self.run_dir)
        return submitit.helpers.DelayedSubmission(RunJob(self.config, self.run_dir, self.threads))
