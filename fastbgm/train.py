"""``python -m fastbgm.train --config FILE [--run-dir DIR] [--section.key=value ...]``

Runs one training run. Works as one plain process, under ``torchrun`` (one process
per device) and inside a Slurm job (submitit exports the same variables).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastbgm.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="a run config (TOML); any key can be overridden")
    p.add_argument("--run-dir", type=Path, help="the run folder (default: runs/<name>)")
    p.add_argument("--quiet", action="store_true")
    args, rest = p.parse_known_args(argv)
    from rich.logging import RichHandler

    from .config import ConfigError, load
    from .data.sources import DatasetError
    from .fileio import FolderBusy
    from .trainer import RunConfig, StopRequested, Trainer

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(show_path=False, show_time=False)])
    try:
        cfg = load(RunConfig, args.config, rest)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir = args.run_dir or Path("runs") / cfg.name

    def stop(signum: int, frame: object) -> None:
        raise StopRequested(signal.Signals(signum).name)

    # Slurm's warning before the time limit (submitit's --signal=USR2@90 reaches job steps)
    signal.signal(signal.SIGUSR2, stop)
    try:
        result = Trainer(cfg, run_dir).run()
    except StopRequested as e:
        print(f"{run_dir}: stopped on request ({e}); it resumes from its last checkpoint", file=sys.stderr)
        return 75  # EX_TEMPFAIL: resumable (fastbgm.launch.schedule.STOP_EXIT)
    except (ConfigError, FileNotFoundError, FolderBusy, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; {run_dir} resumes from its last checkpoint when run again", file=sys.stderr)
        return 130
    print(f"{run_dir}: {result.get('status')}"
          + (f" ({result.get('reason')})" if result.get("status") == "failed" else ""))
    return 0 if result.get("status") == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
