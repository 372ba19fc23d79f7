"""How a run ends early: a scheduler asks it to stop (it resumes later from last.pt), or
it fails as a run (a non-finite loss, out of memory), which is recorded, not raised."""

from __future__ import annotations

import threading

import torch

# The trainer knows nothing of why it is stopped (preemption, requeue, a time limit): a
# scheduler only asks. Once asked, an exception in the loop is the process being
# stopped (say, the scheduler's own requeue command killed inside its signal handler),
# not the run failing: last.pt stands and the run resumes from it.
_STOP_REQUESTED = threading.Event()


def request_stop() -> None:
    """Ask this process's runs to stop; they resume from their last checkpoint."""
    _STOP_REQUESTED.set()


def forget_stop_request() -> None:
    """Start this process's next training with no stop asked (a request is for the runs
    being trained when it came)."""
    _STOP_REQUESTED.clear()


def stop_requested() -> bool:
    """Whether :func:`request_stop` was called in this process."""
    return _STOP_REQUESTED.is_set()


class StopRequested(BaseException):
    """A scheduler asked this run to stop (e.g. Slurm's warning before a time limit).
    Not an Exception: nothing records it as a failure; last.pt stands and the run
    resumes from it."""


class NonFiniteLoss(RuntimeError):
    def __init__(self, epoch: int, step: int):
        super().__init__(f"non-finite loss at epoch {epoch}, step {step}")
        self.epoch, self.step = epoch, step


def out_of_memory(e: BaseException) -> bool:
    """CUDA's out-of-memory error, or the CPU allocator's (a RuntimeError that says so)."""
    if isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


class PeerLost(RuntimeError):
    """A DDP rank's collective lost a peer that said nothing of why (no rank's failure
    report: it was killed by a signal, the OOM killer say, or its node went): the run is
    interrupted, not failed. Nothing records it; the process exits with
    :data:`fastbgm.train.PEER_LOST_EXIT` and its scheduler starts the run again from its
    last checkpoint, as it does a killed process."""


# What a collective says when a peer's process or connection is gone: gloo's TCP pairs
# (seen here), NCCL's ncclRemoteError ("remote process exited or there was a network
# error") and its sockets ("Connection closed by remote peer"), the TCP store. A rank's own
# mistake says none of these.
LOST_PEER_WORDS = ("connection reset by peer", "connection closed by peer", "closed by remote peer", "broken pipe",
                   "remote process exited", "connection refused")


def lost_peer(e: BaseException) -> bool:
    """Whether ``e`` (or what it was raised from) is a collective that lost its peer."""
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, RuntimeError) and any(w in str(x).lower() for w in LOST_PEER_WORDS):
            return True
        x = x.__cause__ or x.__context__
    return False


def run_failure(e: BaseException) -> bool:
    """A failure of the run itself (diverged, does not fit the device), not a bug:
    recorded in result.json and said in one line, never raised as a traceback."""
    return isinstance(e, NonFiniteLoss) or out_of_memory(e)
