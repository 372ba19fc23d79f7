"""torchrun for one DDP run on this machine, exiting as the rank that ended the run.

torchrun exits 1 whenever a rank fails, however it ended: a rank that the OOM killer
ended (the run is interrupted: it resumes from its last checkpoint), one that raised (the
run failed: the reason is in its folder) and one stopped on request all read the same, and
the local scheduler recorded a DDP run whose rank was killed as failed ("exited with code
1"). Here torch's own torchrun runs in this process, and the exit of every rank, which its
error holds, makes this process's status (:func:`exit_status`)::

    python -m fastbgm.launch.ddplocal [torchrun's options] -m fastbgm.train ...
"""

from __future__ import annotations

import signal
import sys

from ..train import PEER_LOST_EXIT, STOP_EXIT


def exit_status(codes: dict[int, int]) -> int:
    """The status of a DDP run from its failed ranks' exit codes (negative: killed by that
    signal), as the scheduler reads one process's status: a rank killed by a signal other
    than SIGTERM (which torchrun itself sends the ranks left) is ``128 + signal``, whatever
    its peers did after it; else the first rank's error; else a rank that lost its peer
    (:data:`PEER_LOST_EXIT`); else a stop on request (the SIGTERM that ended the ranks)."""
    ranked = [c for _, c in sorted(codes.items())]
    killed = [-c for c in ranked if c < 0 and -c != signal.SIGTERM]
    if killed:
        return 128 + killed[0]
    errors = [c for c in ranked if c > 0 and c not in (STOP_EXIT, PEER_LOST_EXIT)]
    if errors:
        return errors[0]
    if PEER_LOST_EXIT in ranked:
        return PEER_LOST_EXIT
    return STOP_EXIT if codes else 0


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        codes = {rank: failure.exitcode for rank, failure in e.failures.items()}
        status = exit_status(codes)
        print(f"ddplocal: the ranks' exits {dict(sorted(codes.items()))} (negative: a signal): "
              f"exit {status}", file=sys.stderr)
        return status
    except SignalException as e:  # torchrun itself was told to stop (the launcher going): its ranks were stopped
        print(f"ddplocal: stopped by {signal.Signals(e.sigval).name}; the ranks were stopped", file=sys.stderr)
        return STOP_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
