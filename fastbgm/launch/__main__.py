"""``python -m fastbgm.launch --config configs/X.toml [options] [--section.key=value ...]``

Expands the experiment into runs and runs them: on Slurm through submitit (stage 2
waits on stage 1 with ``afterok``), or on this machine with ``--executor local``
(the default when no Slurm is found). Re-launching skips finished runs, resumes
unfinished ones, and retries failed ones only with ``--retry-failed``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastbgm.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="an experiment config (TOML)")
    p.add_argument("--executor", choices=["auto", "slurm", "local"], default="auto",
                   help="slurm, local, or auto (slurm when sbatch and sinfo answer)")
    p.add_argument("--nodes", type=int, help="nodes per run (one DDP job across them)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node (0: CPU tasks)")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--partition")
    p.add_argument("--time", help="time limit per job, e.g. 12:00:00")
    p.add_argument("--max-parallel", type=int, default=0, help="at most this many jobs queued at once (0: no limit)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and submit nothing")
    p.add_argument("--retry-failed", action="store_true", help="resubmit runs whose result says failed")
    p.add_argument("--no-wait", action="store_true", help="slurm: submit and return instead of following the jobs")
    p.add_argument("--timeout", type=float, default=None, help="slurm: stop following after this many seconds")
    p.add_argument("--no-report", action="store_true", help="do not build the report when the runs end")
    return p


def main(argv: list[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    from ..ui import console as make_console

    console = make_console()
    logging.basicConfig(level=logging.WARNING)
    from ..config import ConfigError, load
    from ..experiment import ExperimentConfig, experiment_dir, plan, write_plan
    from .common import LaunchError, closing_report, decide

    overrides = list(rest)
    for flag, key in (("nodes", "nodes"), ("gpus_per_node", "gpus"), ("cpus_per_task", "cpus_per_task"),
                      ("partition", "partition"), ("time", "time")):
        v = getattr(args, flag)
        if v is not None:
            overrides.append(f"--resources.{key}={v}")
    try:
        exp = load(ExperimentConfig, args.config, overrides)
    except ConfigError as e:
        console.print(f"[red]error:[/] {escape(str(e))}")
        return 2
    runs = plan(exp)
    if not args.dry_run:
        try:
            _prepare_missing_data(exp, console)
        except ConfigError as e:
            console.print(f"[red]error:[/] {escape(str(e))}")
            return 2
    from .slurm import slurm_available

    executor = args.executor
    if executor == "auto":
        executor = "slurm" if slurm_available() else "local"
    queued: dict[str, str] = {}
    try:
        if executor == "slurm":
            from .slurm import check_request, queued_jobs

            if not slurm_available():
                raise LaunchError("--executor slurm, but sbatch/sinfo do not answer here; "
                                  "start a cluster (bash launch/slurm-start.sh) or use --executor local")
            check_request(exp)
            queued = queued_jobs(runs)
        decisions = decide(runs, args.retry_failed, set(queued))
        _print_plan(console, exp, decisions, executor)
        if args.dry_run:
            return 0
        write_plan(exp, runs)
        retry_cmd = "python -m fastbgm.launch " + " ".join(sys.argv[1:] if argv is None else argv)
        if executor == "local":
            from .local import run_local

            run_local(decisions, runs, console, exp.resources.cpus_per_task)
        else:
            import submitit

            from .slurm import submit, wait

            jobs = submit(exp, decisions, args.max_parallel)
            folder = experiment_dir(exp) / ".submitit" / "%j"
            for key, job_id in queued.items():
                jobs[key] = submitit.SlurmJob(folder=str(folder), job_id=job_id)
            if not jobs:
                console.print("nothing to submit")
            if args.no_wait:
                console.print(f"submitted {len(jobs)} job(s); follow with the same command")
                return 0
            wait(runs, jobs, console, timeout_s=args.timeout)
    except (LaunchError, ConfigError) as e:
        console.print(f"[red]error:[/] {escape(str(e))}")
        return 2
    except KeyboardInterrupt as e:
        why = f" ({e.args[0]})" if e.args else ""
        console.print(f"stopped{why}; every unfinished run resumes from its last checkpoint when you run "
                      "the same command again")
        return 130
    ok = closing_report(runs, console, retry_cmd.replace(" --retry-failed", ""))
    if not args.no_report and not args.no_wait:
        from ..report.__main__ import main as report_main

        report_main([str(experiment_dir(exp))])
    return 0 if ok else 1


def _prepare_missing_data(exp, console: Console) -> None:
    """Write datasets that a config marks as embedded (``prepare = "digits"``) when missing."""
    from ..config import ConfigError
    from ..data.sources import digits_splits, synthetic_splits
    from ..data.writer import prepare

    for ds in exp.datasets:
        if not ds.prepare or Path(ds.train).exists():
            continue
        out = Path(ds.train).parent
        console.print(f"preparing {ds.name} ({ds.prepare}, {ds.prepare_options or 'defaults'}) into {out}")
        make = digits_splits if ds.prepare == "digits" else synthetic_splits
        try:
            splits = make(**ds.prepare_options)
        except TypeError as e:
            raise ConfigError(f"datasets.prepare_options of {ds.name!r}: {e}") from None
        prepare(splits, out, image_format="raw", overwrite=False)


def _print_plan(console: Console, exp, decisions, executor: str) -> None:
    from rich.table import Table

    res = exp.resources
    where = (f"{res.nodes} node(s) x {res.tasks} task(s), {res.gpus} GPU(s)/node, {res.cpus_per_task} CPU(s)/task, "
             f"{res.time}" if executor == "slurm" else "this machine, one run per device")
    t = Table(title=f"{exp.name}: {len(decisions)} runs on {executor} ({where})")
    for c in ("run", "stage", "depends on", "on disk", "action"):
        t.add_column(c)
    for d in decisions:
        action = d.action + (f" ({d.reason})" if d.reason and d.action in ("blocked", "keep-failed") else "")
        t.add_row(d.run.key, str(d.run.stage), ", ".join(d.run.depends_on) or "-", d.status, action)
    console.print(t)


if __name__ == "__main__":
    sys.exit(main())
