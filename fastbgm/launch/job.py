"""The unit of work a scheduler runs: one training run, checkpointable.

submitit pickles a :class:`RunJob` by reference to this installed module. On
preemption or time-out submitit calls :meth:`checkpoint`, which requeues the same
job; the trainer then resumes from the run folder's ``last.pt``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..trainer.config import RunConfig

log = logging.getLogger(__name__)


class RunFailed(RuntimeError):
    """The run ended with status failed (so the Slurm job fails and afterok dependents are cancelled)."""


class RunJob:
    def __init__(self, config: RunConfig, run_dir: str | os.PathLike, threads: int = 0):
        self.config = config
        self.run_dir = str(run_dir)
        self.threads = threads

    def __call__(self) -> dict[str, Any]:
        import submitit
        import torch

        env = submitit.JobEnvironment()
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

        log.info("requeueing %s; it resumes from its last.pt", self.run_dir)
        return submitit.helpers.DelayedSubmission(RunJob(self.config, self.run_dir, self.threads))
