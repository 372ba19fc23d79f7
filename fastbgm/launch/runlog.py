"""A per-run Slurm job's lines in its run folder's train.log (:class:`~fastbgm.launch.job.RunJob`):
what a trainer process started by the local scheduler or an allocation's driver writes
there through its stdout and stderr, a per-run job's trainer writes through logging."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .trainproc import start_line

log = logging.getLogger("fastbgm.launch.job")


class _RunFolderLog(logging.FileHandler):
    """A per-run job's log lines in its run folder's train.log, timestamped: rank 0's
    every line, an error line ("error: ...") bare, as the trainer's command line prints
    it, which trainproc.last_error reads; another rank's errors only, each saying its
    rank (its whole log is its own task's submitit log), and never such a bare line."""

    def format(self, record: logging.LogRecord) -> str:
        said = record.getMessage()
        return said if record.levelno >= logging.ERROR and said.startswith("error: ") else super().format(record)

    def handleError(self, record: logging.LogRecord) -> None:
        # a full disk: the trainer says so itself (its job's log), where logging would
        # print a traceback of its own for every line it could not write
        pass


def log_to_run_folder(run_dir: str, key: str, env: Any) -> logging.FileHandler | None:
    """A per-run job logs to its run folder's train.log too, as a trainer process that a
    local or allocation scheduler starts does (its stdout and stderr go there, every
    rank's): the run folder holds what the trainer said, whatever ran it, and the
    launch's closing report lists an unfinished run with its trainer's last error
    (trainproc.last_error). Rank 0 logs everything; a DDP run's other ranks their errors
    (with :func:`log_rank_traceback`, what they raised): a failure only rank 1 meets is
    in train.log, not only in that task's submitit log."""
    from ..trainer import checkpoint as C

    try:
        handler = _RunFolderLog(Path(run_dir) / C.TRAIN_LOG, mode="a")
    except OSError as e:  # (an unwritable folder: the trainer says so itself)
        log.warning("%s: cannot write %s (%s)", run_dir, C.TRAIN_LOG, e)
        return None
    if env.global_rank != 0:
        handler.setLevel(logging.ERROR)
        # (not the job's own "error: ..." line for a mistake: rank 0 says it, and so would every rank)
        handler.addFilter(lambda record: not record.getMessage().startswith("error: "))
        handler.setFormatter(logging.Formatter(f"%(asctime)s rank {env.global_rank} %(name)s %(message)s"))
        logging.getLogger().addHandler(handler)
        return handler
    try:
        handler.stream.write(start_line(f"started {key} in Slurm job {env.job_id} (its whole log: "
                                        f"{env.paths.stderr})"))
        handler.stream.flush()
    except OSError as e:  # (a full disk)
        log.warning("%s: cannot write %s (%s)", run_dir, C.TRAIN_LOG, e)
        handler.close()
        return None
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def log_rank_traceback(handler: logging.FileHandler | None, env: Any, e: BaseException) -> None:
    """What a rank other than 0 raised, with its traceback, into the run's train.log
    (``handler``: that rank's, from :func:`log_to_run_folder`): rank 0 records the run's
    failure and its reason; the traceback is this rank's to give."""
    import traceback

    if handler is None or env.global_rank == 0:
        return
    try:
        handler.stream.write(f"rank {env.global_rank} (its whole log: {env.paths.stderr}) raised:\n"
                             + "".join(traceback.format_exception(type(e), e, e.__traceback__)))
        handler.stream.flush()
    except OSError:  # (a full disk: its own log has it)
        pass
