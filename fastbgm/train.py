"""``python -m fastbgm.train --config FILE [--run-dir DIR] [--section.key=value ...]``
``python -m fastbgm.train --pack RUN_DIR [RUN_DIR ...] [--section.key=value ...]``

Runs one training run, or (``--pack``) several runs side by side in one process on one
device, each from the planned config in its folder (``planned-config.json``, as the
launcher writes it); each packed run computes exactly what it computes alone (to float
tolerance in pack mode fused). Works as
one plain process, under ``torchrun`` (one process per device) and inside a Slurm job
or job step (submitit's variables, or the step's own).

Exit codes: 0 every run done; 1 a run failed; 2 a mistake (the message says which);
74 no space left to write a run folder (a full disk or quota): resumable once space is
freed; 75 stopped on request (Slurm's warning before a time limit): resumable; 76 a DDP
peer went without a reason (killed by a signal, or its node lost): resumable.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

STOP_EXIT = 75  # EX_TEMPFAIL: stopped on request, resumable
NO_SPACE_EXIT = 74  # EX_IOERR: a write found no space; every run resumes once space is freed
PEER_LOST_EXIT = 76  # EX_PROTOCOL: a DDP peer went with no reason given (killed); the run resumes
NO_SPACE_ADVICE = ("no run failed: free some space and run the same command again, and each unfinished run "
                   "resumes from its last checkpoint")


def main(argv: list[str] | None = None) -> int:
    from .trainer.config import PACK_MODES

    p = argparse.ArgumentParser(prog="python -m fastbgm.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="a run config (TOML or JSON); any key can be overridden")
    p.add_argument("--run-dir", type=Path, help="the run folder (default: runs/<name>)")
    p.add_argument("--pack", type=Path, nargs="+", metavar="RUN_DIR",
                   help="train these run folders together, each from its planned-config.json")
    p.add_argument("--inbox", type=Path, metavar="DIR",
                   help="a pack's inbox: runs a scheduler offers join the pack between epochs; with nothing "
                        "left, the pack asks for more and waits for an answer (fastbgm.trainer.inbox)")
    p.add_argument("--pack-mode", default="auto", choices=PACK_MODES,
                   help="how packed runs share the device (fastbgm.trainer.loop; default: streams on a GPU "
                        "when every run uses step graphs (the GPU default), serial with torch.compile's CUDA "
                        "graphs, threads without graphs, serial on a CPU; fused: runs of one architecture as "
                        "one vmapped network, equal to alone to float tolerance, CPU only for now)")
    p.add_argument("--quiet", action="store_true", help="log only warnings and errors (no line per epoch)")
    args, rest = p.parse_known_args(argv)
    from rich.logging import RichHandler

    from .config import ConfigError, load
    from .data.sources import DatasetError
    from .fileio import FolderBusy, no_space
    from .trainer import RunConfig, StopRequested, Trainer
    from .trainer import checkpoint as C
    from .trainer.loop import train_runs
    from .trainer.stops import PeerLost

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(show_path=False, show_time=False)])
    try:
        if args.pack:
            if args.config or args.run_dir:
                raise ConfigError("--pack takes run folders (each with its planned-config.json); "
                                  "leave out --config and --run-dir")
            trainers = [Trainer(load(RunConfig, d / C.PLANNED, rest), d) for d in args.pack]
        else:
            if args.config is not None and args.config.is_dir():
                raise ConfigError(f"--config {args.config} is a folder: give a run config file (TOML or JSON)")
            cfg = load(RunConfig, args.config, rest)
            trainers = [Trainer(cfg, args.run_dir or Path("runs") / cfg.name)]
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def stop(signum: int, frame: object) -> None:
        raise StopRequested(signal.Signals(signum).name)

    # Slurm's warning before the time limit (submitit's --signal=USR2@90 reaches job steps),
    # and SIGTERM (a launcher stopping, Slurm ending a step): stop between two Python steps,
    # so that no write is left half done
    signal.signal(signal.SIGUSR2, stop)
    signal.signal(signal.SIGTERM, stop)
    where = ", ".join(str(t.run_dir) for t in trainers)

    def more(last: bool) -> list[Trainer]:
        from .fileio import atomic_write_json
        from .trainer import inbox

        joined = []
        for d in inbox.last_call(args.inbox) if last else inbox.claim(args.inbox):
            try:
                joined.append(Trainer(load(RunConfig, d / C.PLANNED, rest), d))
            except (ConfigError, OSError) as e:  # that run only: the pack goes on
                atomic_write_json(d / C.RESULT, {"status": "failed", "reason": f"could not join a pack: {e}"})
        trainers.extend(joined)  # (train_runs keeps its own list: this one is for the summary below)
        return joined

    try:
        results = train_runs(trainers, pack_mode=args.pack_mode, more=more if args.inbox else None)
    except StopRequested as e:
        print(f"{where}: stopped on request ({e}); resumes from the last checkpoint", file=sys.stderr)
        return STOP_EXIT
    except PeerLost as e:
        print(f"error: {e}", file=sys.stderr)
        return PEER_LOST_EXIT
    except (ConfigError, FileNotFoundError, FolderBusy, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an unwritable or full run folder
        full = no_space(e)
        print(f"error: {where}: {e.strerror or e} ({e.filename or 'writing the run folder'}); "
              + (NO_SPACE_ADVICE if full else "choose a writable --run-dir"), file=sys.stderr)
        return NO_SPACE_EXIT if full else 2
    except KeyboardInterrupt:
        print(f"interrupted; {where} resume(s) from the last checkpoint when run again", file=sys.stderr)
        return 130
    finally:
        # nothing is left to stop: a SIGTERM now (a launcher going) would only raise
        # StopRequested inside an atexit hook and print its traceback over a finished run
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for t, result in zip(trainers, results):
        print(f"{t.run_dir}: {result.get('status')}"
              + (f" ({result.get('reason')})" if result.get("status") == "failed" else ""))
    return 0 if all(r.get("status") == "done" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
