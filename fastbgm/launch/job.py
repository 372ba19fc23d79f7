"""The unit of work a scheduler runs: one training run, checkpointable.

submitit pickles a :class:`RunJob` by reference to this installed module. On
preemption or time-out submitit calls :meth:`checkpoint`, which requeues the same
job; the trainer then resumes from the run folder's ``last.pt``.

A per-run job watches its own run: no scheduler runs beside it (unlike an allocation's
driver or the local scheduler), and the launch that submitted it may be gone
(``--no-wait``). A process forked before the trainer starts (:func:`watch_own_run`)
requeues the job when the run's heartbeat stands still for the stall timeout, and
fails the run at the :data:`~fastbgm.launch.trainproc.MAX_STALLS`-th hang of that job.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

from ..experiment import run_status
from ..fileio import atomic_write_json
from ..train import NO_SPACE_ADVICE, NO_SPACE_EXIT, PEER_LOST_EXIT
from ..trainer.config import RunConfig
from .cluster import job_fields, step_kill
from .common import read_json
from .runlog import log_rank_traceback, log_to_run_folder
from .trainproc import (MAX_KILLS, MAX_STALLS, STALL_CHECK_S, StallWatch, hung_reason, log_error, mark_cancelled,
                        signal_name)

log = logging.getLogger(__name__)


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


JOB_FILE = "slurm-job.json"
ENDED = ("done", "failed", "cancelled")  # a run's states that no job of it changes
HANGS = "hangs.json"  # in the run folder: {job id: the times its trainer hung in that job}
KILLS = "kills.json"  # in the run folder: {job id: the times a signal killed its trainer in that job}


def job_counts(run_dir: str | os.PathLike, name: str = HANGS) -> dict[str, int]:
    """The times ``run_dir``'s trainer hung (``name`` :data:`HANGS`) or was killed
    (:data:`KILLS`), by the per-run job it happened in (a requeued job keeps its id; a new
    launch's job starts again from none)."""
    try:
        return {str(k): int(v) for k, v in json.loads((Path(run_dir) / name).read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def count_in_job(run_dir: str | os.PathLike, name: str, job: str) -> int:
    """One more of ``name``'s events for ``run_dir``'s trainer in ``job``: how many it has
    had in that job, this one included."""
    counts = job_counts(run_dir, name)
    counts[job] = counts.get(job, 0) + 1
    atomic_write_json(Path(run_dir) / name, counts)
    return counts[job]


def requeue_killed_teardown(exp_dir: Path) -> list[str]:
    """The lines a job's batch script runs after its command (submitit's teardown): when
    the command failed (srun's status for a per-run job's step: 128 + a signal, but 9 when
    one rank was SIGKILLed and its peer exited :data:`~fastbgm.train.PEER_LOST_EXIT`; the
    driver's own for an allocation), :func:`requeue_killed_job` decides, from sacct,
    whether the job requeues itself. The script then exits with that status, so that the
    job ends as it would have without them."""
    import shlex
    import sys

    call = ("import sys; from fastbgm.launch.job import requeue_killed_job as f; "
            "print(f(sys.argv[1], int(sys.argv[2])))")
    return ["fastbgm_step_rc=$?",
            'if [ "$fastbgm_step_rc" -ne 0 ]; then',
            f"  {shlex.quote(sys.executable)} -c {shlex.quote(call)} {shlex.quote(str(exp_dir))} "
            '"$fastbgm_step_rc" || true',
            "fi",
            'exit "$fastbgm_step_rc"']


def requeue_killed_job(exp_dir: str | Path, rc: int) -> str:
    """In a job's batch script, after its command ended with ``rc`` (> 128): a job that a
    signal cut short (the OOM killer, a segfault, a kill from outside) with runs
    unfinished requeues itself, up to :data:`MAX_KILLS` kills a job, and they resume from
    their last checkpoints in the same job, whether or not a launch follows it
    (``--no-wait``); the jobs that wait on it (``afterok``) go on waiting.

    - A per-run job: when a task of its step was killed. srun's status cannot say (a task
      that exits with an error ends its peers by signal, through ``--kill-on-bad-exit``):
      the step's exit code in sacct does ("0:9", not "1:0"; "76:0" when a DDP rank lost a
      peer that gave no reason: a rank killed). Each kill is a line in the run's
      train.log; its count is in the run's ``kills.json``.
    - An allocation: when its driver was killed (the batch script's own child: ``rc`` is
      128 + the signal; SIGTERM is the driver's own exit as Slurm ends the job). Its
      steps are ended by the requeue, and every unfinished run resumes; the count is in
      the experiment folder's ``kills.json``.

    Never when the job no longer runs (cancelled, requeued, out of time: Slurm ends it).
    Returns what it did, for the job's log."""
    import os
    import signal

    from ..fileio import lock_holder
    from .allocation import ALLOCATION_FILE

    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    numeric = os.environ.get("SLURM_JOB_ID", "")
    job = f"{array}_{task}" if array and task else numeric
    exp_dir = Path(exp_dir)
    allocation = read_json(exp_dir / ALLOCATION_FILE)
    per_run = allocation.get("job_id") != job
    if not per_run:
        keys = allocation.get("runs") or []
        unfinished = [k for k in keys if run_status(exp_dir / k)[0] not in ENDED]
        where, what, them = exp_dir, "its driver", "every unfinished run"
        logs = [exp_dir / k for k in unfinished if (exp_dir / k).is_dir()]
        if not unfinished:
            return f"allocation {job}: every run has ended; nothing to requeue"
    else:
        run_dir = next((p.parent for p in exp_dir.rglob(JOB_FILE) if read_json(p).get("job_id") == job), None)
        if run_dir is None:
            return f"job {job}: no run folder of {exp_dir} names it; nothing to requeue"
        if run_status(run_dir)[0] in ENDED or lock_holder(run_dir) is not None:
            return f"job {job}: its run is {run_status(run_dir)[0]}, or another process trains it; nothing to requeue"
        where, what, them, logs = run_dir, "its trainer", "it", [run_dir]
    lost = False
    try:  # (a cluster without accounting has no sacct: then nothing tells a kill from an error)
        if per_run:
            number, lost = step_kill(numeric)
        else:  # (the driver is the script's own child: its status is the signal's)
            number = rc - 128 if rc > 128 and rc - 128 != signal.SIGTERM else None
        state = job_fields(numeric).get("JobState", "")
    except (OSError, subprocess.SubprocessError) as e:
        return f"job {job}: cannot ask Slurm how its step ended ({e}); nothing to requeue"
    if state != "RUNNING" or (number is None and not lost):
        return f"job {job}: {state or 'gone'}, its exit {rc} names no kill; nothing to requeue"
    n = count_in_job(where, KILLS, job)
    if number is None:  # (a lost peer: the signal was its peer's)
        killed = "a rank of its trainer lost its peer, which gave no reason (killed by a signal, or its node lost)"
    else:
        killed = f"{what} was killed by signal {number}" + (f" ({signal_name(number)})" if signal_name(number) else "")
    if n >= MAX_KILLS:
        said = (f"{killed} in job {job}, {n} times in that job; {them} is left unfinished: the same command resumes "
                f"{them} from its last checkpoint (if an OOM killer ended it, give it more memory: --mem-gb)")
    else:
        said = (f"{killed} in job {job} ({n} of {MAX_KILLS} in that job); the job is requeued and resumes {them} from "
                "its last checkpoint")
    for d in logs:
        log_error(d, said)
    if n >= MAX_KILLS:
        return said
    try:
        scontrol_requeue(numeric)
    except (subprocess.SubprocessError, OSError) as e:
        for d in logs:
            log_error(d, f"job {job} could not requeue itself ({e}); the same command resumes the run")
        return f"could not requeue job {job}: {e}"
    return said



def _alive(pid: int) -> bool:
    """Whether ``pid`` is still a process that can run (not gone, not a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def watch_own_run(run_dir: str, key: str, job: str, trainer: int, stall_s: float,
                  check_s: float = STALL_CHECK_S) -> str:
    """Watch the heartbeat of the run that process ``trainer`` trains in Slurm job
    ``job`` until that process ends. A heartbeat that stands still for ``stall_s``
    seconds is a hang (a deadlock, a stopped process, a collective that never returns):
    the job is requeued (Slurm sends SIGCONT, SIGTERM, then SIGKILL; the run resumes from
    its last checkpoint), and at the :data:`MAX_STALLS`-th hang in this job the run is
    recorded failed, with the reason and the fix, and the job killed. Returns what it
    did: "ended" (the trainer ended first), "requeued" or "failed"."""
    watch = StallWatch(stall_s)
    watch.start(job, [run_dir])
    while _alive(trainer):
        time.sleep(check_s)
        quiet = watch.quiet(job, [run_dir])
        if not quiet or not _alive(trainer):
            continue
        n = count_in_job(run_dir, HANGS, job)
        said = f"{key}: no progress for {quiet:.0f} s (stall timeout {stall_s:g} s): "
        if n < MAX_STALLS:
            log.warning("%sits job %s is requeued, taken as hung (%d of %d); the run resumes from its last "
                        "checkpoint", said, job, n, MAX_STALLS)
            try:
                scontrol_requeue(job)
            except (subprocess.SubprocessError, OSError) as e:
                log.warning("%scould not requeue job %s (%s); watching on", said, job, e)
                watch.start(job, [run_dir])
                continue
            return "requeued"
        # Nothing of the run may write its folder once its result says failed: the trainer
        # is stopped before, and killed from here after. Slurm's own cancel sends SIGCONT
        # first, and a stopped trainer went on and finished in the seconds before its
        # SIGKILL (the local cluster, 2026-11-30); the cancel (for the other ranks, and the
        # job's end) is sent on its way first, since this watch dies with the step.
        os.kill(trainer, signal.SIGSTOP)
        mark_cancelled(run_dir, key, hung_reason(stall_s, n, run_dir), status="failed")
        log.error("%shung %d times in job %s: the run failed, and its job is killed", said, n, job)
        cancel = subprocess.Popen(["scancel", "--signal=KILL", "--full", job], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        os.kill(trainer, signal.SIGKILL)
        cancel.wait(timeout=60)
        return "failed"
    return "ended"


def _fork_watch(run_dir: str, key: str, job: str, stall_s: float) -> int:
    """Start :func:`watch_own_run` over this process in a forked child (forked before the
    trainer starts any thread or touches a GPU; the child runs nothing but the watch, and
    a child survives its parent stopped, as a thread would not). Returns its pid."""
    trainer = os.getpid()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # (numpy's BLAS threads: the child uses none)
        pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        # submitit's handlers are the trainer's: a timeout's signal must not requeue twice
        for sig in (signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_IGN)
        for sig in (signal.SIGTERM, signal.SIGCONT, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        watch_own_run(run_dir, key, job, trainer, stall_s)
    except BaseException:
        log.exception("the watch over %s ended with an error", run_dir)
        code = 1
    finally:
        os._exit(code)
    return 0  # (never reached)


class RunJob:
    def __init__(self, config: RunConfig, run_dir: str | os.PathLike, threads: int = 0, stall_s: float = 0.0):
        self.config = config
        self.run_dir = str(run_dir)
        self.threads = threads
        self.stall_s = stall_s  # resources.stall_timeout_s: the job requeues itself when its run hangs

    def __call__(self) -> dict[str, Any]:
        import submitit

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        env = submitit.JobEnvironment()
        stall_s = getattr(self, "stall_s", 0.0)  # (a job pickled before it had one)
        watcher = _fork_watch(self.run_dir, self.config.name, env.job_id, stall_s) \
            if stall_s > 0 and env.global_rank == 0 and type(env).__name__ == "SlurmJobEnvironment" else 0
        try:
            return self._train(env)
        finally:
            if watcher:
                os.kill(watcher, signal.SIGKILL)
                os.waitpid(watcher, 0)

    def _train(self, env: Any) -> dict[str, Any]:
        import submitit
        import torch

        if hasattr(type(env), "_requeue") and type(env).__name__ == "SlurmJobEnvironment":
            type(env)._requeue = _requeue_ignoring_sigterm
        if env.num_tasks > 1:
            # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from submitit (no hand-parsed SLURM_*)
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        if self.threads:
            # task/none binds nothing: every task would otherwise use every core
            os.environ["OMP_NUM_THREADS"] = str(self.threads)
            torch.set_num_threads(self.threads)
        from ..config import ConfigError
        from ..data.sources import DatasetError
        from ..fileio import FolderBusy, lock_holder, no_space
        from ..trainer import Trainer, stop_requested
        from ..trainer.stops import PeerLost

        train_log = log_to_run_folder(self.run_dir, self.config.name, env)
        try:
            result = Trainer(self.config, Path(self.run_dir)).run()
            if result.get("status") != "done":
                # the job fails (Slurm then cancels the jobs that wait on it: afterok); why
                # is in result.json, and said here without a traceback
                log.error("%s %s: %s", self.run_dir, result.get("status"), result.get("reason", ""))
                raise SystemExit(1)
        except Exception as e:
            if no_space(e) and not stop_requested():
                # not the run's failure: the job ends with NO_SPACE_EXIT (an allocation's
                # driver does the same), which the launch following it reports as such
                log.error("error: %s: no space left to write its run folder (%s); %s", self.run_dir, e,
                          NO_SPACE_ADVICE)
                raise SystemExit(NO_SPACE_EXIT) from e
            if isinstance(e, PeerLost) and not stop_requested():  # a peer rank was killed: the run is interrupted, not failed
                log.error("error: %s", e)
                raise SystemExit(PEER_LOST_EXIT) from e
            # what a scheduler records of a trainer process that exited with an error
            # (schedule.Scheduler._settle): the run failed, and why (an unreadable dataset,
            # say), so that its dependents are cancelled for that reason and the next launch
            # keeps it failed until --retry-failed. Not: a stop asked for (submitit's
            # checkpoint), another trainer holding the folder.
            recorded = (env.global_rank == 0 and not stop_requested() and not isinstance(e, FolderBusy)
                        and lock_holder(self.run_dir) is None)
            if recorded:
                mark_cancelled(self.run_dir, self.config.name, f"{type(e).__name__}: {e}", status="failed")
            # a mistake the message names, with its fix, ends the job with that line alone
            # (python -m fastbgm.train prints these without a traceback too); anything else
            # is a bug: its traceback follows
            mistake = isinstance(e, (ConfigError, DatasetError, FileNotFoundError, FolderBusy)) and not stop_requested()
            if recorded or mistake:
                log.error("error: %s: %s", type(e).__name__, e)
            if mistake:
                raise SystemExit(2) from e
            if not stop_requested():
                log_rank_traceback(train_log, env, e)
            raise
        finally:
            if train_log is not None:
                logging.getLogger().removeHandler(train_log)
                train_log.close()
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        from ..trainer import request_stop

        # submitit requeues right after this returns; the requeue kills this job, and a
        # failure raised meanwhile must not be recorded as the run failing
        request_stop()
        log.info("requeueing %s; it resumes from its last.pt", self.run_dir)
        return submitit.helpers.DelayedSubmission(RunJob(self.config, self.run_dir, self.threads,
                                                         getattr(self, "stall_s", 0.0)))
