"""``python -m fastbgm.launch [--config configs/X.toml] [options] [--section.key=value ...]``

Without ``--config``, the paper's CIFAR-10 grid (configs/cifar10-paper.toml): so
``python -m fastbgm.launch --nodes 4`` reproduces the paper on 4 nodes.

Expands the experiment into runs and runs them on an allocation: on Slurm, ONE job of
``--nodes`` x ``--gpus-per-node`` whose runs are packed onto its GPUs as job steps
(stage 2 from adversarial init starts the moment its stage 1 is done), or one job per
run with ``--jobs per-run``; without Slurm (``--executor local``, the default when no
Slurm answers) the same scheduling over this machine's GPUs or cores. How many GPUs one
run takes is the run's own (``resources.ranks_per_run``): the allocation never changes
what a run computes. Re-launching skips finished runs, resumes unfinished ones, follows
an allocation that is still queued or running, and retries failed runs only with
``--retry-failed``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape


# what `python -m fastbgm.launch --nodes 4` reproduces when no --config is given
PAPER_CONFIG = Path("configs") / "cifar10-paper.toml"


def paper_config() -> Path | None:
    """The paper's grid: configs/cifar10-paper.toml here, else in the checkout this
    package runs from (None when neither has it: an installed wheel carries no configs)."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (root / PAPER_CONFIG).is_file():
            return root / PAPER_CONFIG
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastbgm.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path,
                   help=f"an experiment config (TOML; default: the paper's CIFAR-10 grid, {PAPER_CONFIG})")
    p.add_argument("--executor", choices=["auto", "slurm", "local"], default="auto",
                   help="slurm, local, or auto (slurm when sbatch and sinfo answer)")
    p.add_argument("--nodes", type=int, help="nodes of the allocation the experiment may occupy at once")
    p.add_argument("--min-nodes", type=int,
                   help="slurm: start the allocation on as few as this many nodes when some of the partition's are "
                   "down or drained (default: wait for all of --nodes)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node of the allocation (0: CPU-only nodes)")
    p.add_argument("--ranks-per-run", type=int, help="GPUs (processes) one run spans; > 1 is one DDP run")
    p.add_argument("--runs-per-gpu", type=int,
                   help="one-rank runs packed onto one GPU (or CPU slot) in one process (default 1)")
    p.add_argument("--pack-mode", help="how runs packed on one GPU share it: auto (default: streams for runs "
                   "with step graphs, the GPU default), serial, streams, threads, fused (runs of one architecture "
                   "as one network; CPU only for now; fastbgm.trainer.loop)")
    p.add_argument("--stall-timeout", type=float,
                   help="seconds a trainer may make no progress before it is taken as hung, killed and its runs "
                   "started again from their last checkpoint (default 1800; 0: never)")
    p.add_argument("--jobs", choices=["allocation", "per-run"],
                   help="slurm: one allocation for the experiment (default) or one job per run")
    p.add_argument("--cpus-per-task", type=int,
                   help="CPU cores per rank (resources.cpus_per_task); locally without a GPU, each process's "
                        "threads, and the cores over this many processes run at once")
    p.add_argument("--partition", help="slurm: the partition to submit to (default: the cluster's default)")
    p.add_argument("--time", help="time limit per job, as sbatch reads it: 30 (minutes), 12:00:00, 2-12 (days-hours)")
    p.add_argument("--max-parallel", type=int, default=0,
                   help="--jobs per-run: at most this many jobs of each array run at once (0: no limit)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its cost estimate; submit nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run: the plan as one JSON object on stdout")
    p.add_argument("--retry-failed", action="store_true", help="run again the runs whose result says failed")
    p.add_argument("--no-data-check", action="store_true",
                   help="start the runs even when a dataset file they read is not here (on Slurm, data on the "
                        "nodes' own disks that this host does not see)")
    p.add_argument("--no-wait", action="store_true", help="slurm: submit and return instead of following the jobs")
    p.add_argument("--timeout", type=float, default=None, help="slurm: stop following after this many seconds")
    p.add_argument("--no-report", action="store_true", help="do not build the report when the runs end")
    return p


def main(argv: list[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    from ..ui import console as make_console

    console = make_console(stderr=args.json)
    # (warnings, a killed or hung trainer say, read as the progress lines do: "HH:MM:SS KEY: ...")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from ..config import ConfigError, load
    from ..experiment import ExperimentConfig, experiment_dir, plan, run_status, write_plan
    from ..data.sources import DatasetError
    from ..fileio import no_space
    from ..train import NO_SPACE_ADVICE, NO_SPACE_EXIT
    from .common import (MISSING_DATA_ADVICE, LaunchError, check_pack_mode, closing_report, decide,
                         missing_data, stage_runs)

    overrides = list(rest)
    for flag, key in (("nodes", "nodes"), ("min_nodes", "min_nodes"), ("gpus_per_node", "gpus"),
                      ("ranks_per_run", "ranks_per_run"), ("runs_per_gpu", "runs_per_gpu"), ("pack_mode", "pack_mode"),
                      ("jobs", "jobs"), ("cpus_per_task", "cpus_per_task"), ("partition", "partition"),
                      ("time", "time"), ("stall_timeout", "stall_timeout_s")):
        v = getattr(args, flag)
        if v is not None:
            overrides.append(f"--resources.{key}={v}")
    if args.max_parallel < 0:
        console.print("[red]error:[/] --max-parallel must be >= 0 (0: no limit)")
        return 2
    if args.json and not args.dry_run:
        console.print("[red]error:[/] --json goes with --dry-run (a plan for scripts)")
        return 2
    if args.config is None:
        args.config = paper_config()
        if args.config is None:
            console.print(f"[red]error:[/] no --config given, and the paper's grid ({PAPER_CONFIG}) is neither here "
                          "nor in the checkout fastbgm runs from: give --config FILE (the configs/ folder of the "
                          "fastbgm repository holds the paper's)")
            return 2
        console.print(f"no --config: the paper's CIFAR-10 grid, {args.config}")
    try:
        exp = load(ExperimentConfig, args.config, overrides)
        runs = plan(exp)
    except ConfigError as e:
        console.print(f"[red]error:[/] {escape(str(e))}")
        return 2
    from .cluster import slurm_available

    executor = args.executor
    if executor == "auto":
        executor = "slurm" if slurm_available() else "local"
    following: dict[str, str] = {}
    try:
        from .local import local_gpus

        # (the nodes' GPUs on Slurm; this machine's locally), before data is prepared or anything submitted
        check_pack_mode(runs, exp.resources,
                        on_gpu=exp.resources.gpus > 0 if executor == "slurm" else local_gpus() > 0)
        if not args.dry_run:
            _prepare_missing_data(exp, console)
        if executor == "slurm":
            from .slurm import active_allocation, check_request, queued_jobs

            if not slurm_available():
                raise LaunchError("--executor slurm, but sbatch/sinfo do not answer here; "
                                  "start a cluster (bash launch/slurm-start.sh) or use --executor local")
            check_request(exp)
            following = queued_jobs(runs)
            alloc = active_allocation(exp)
            if alloc:
                following.update({r.key: alloc for r in runs})
        decisions = decide(runs, args.retry_failed, set(following))
        # (a dataset the config embeds, prepare = "digits", is written as the launch starts)
        embedded = {str(Path(p).resolve()) for ds in exp.datasets if ds.prepare for p in (ds.train, ds.test) if p}
        missing = [] if args.no_data_check else missing_data(decisions, embedded)
        if missing and not args.dry_run:
            raise LaunchError(f"{len(missing)} dataset file(s) the runs read are not here, so nothing was started: "
                              + "; ".join(missing) + f": {MISSING_DATA_ADVICE}; --no-data-check starts them anyway")
        if args.dry_run:
            from .common import will_run
            from .estimate import estimate, other_sizes

            decided = {d.run.key: (d.status, will_run(d)) for d in decisions}
            est = estimate(exp, runs, plan=decided)
            if exp.resources.jobs == "allocation":
                est["by_nodes"] = other_sizes(exp, runs, plan=decided)
            if args.json:
                print(json.dumps(_plan_json(exp, runs, est, executor)))
            else:
                _print_plan(console, exp, decisions, executor, est)
            for line in missing:
                console.print(f"[yellow]not here yet:[/] {escape(line)}")
            return 0
        _print_plan(console, exp, decisions, executor, None)
        write_plan(exp, runs)
        stage_runs(decisions)
        retry_cmd = "python -m fastbgm.launch " + " ".join(sys.argv[1:] if argv is None else argv)
        if executor == "local":
            from .local import run_local

            if not run_local(runs, exp.resources, console):
                console.print(f"[red]error:[/] no space left to write the run folders under {exp.runs_dir}; "
                              f"{NO_SPACE_ADVICE}")
                closing_report(runs, console, retry_cmd)
                return NO_SPACE_EXIT
        else:
            from .trainproc import last_error
            from .cluster import lost_driver_node
            from .slurm import job_log, submit_allocation, submit_per_run, wait

            todo = [d for d in decisions if d.action in ("submit", "resume", "retry")]
            if exp.resources.jobs == "allocation":
                if todo and not any(v for v in following.values()):
                    job, nodes, why = submit_allocation(exp, runs)
                    following.update({r.key: job for r in runs})
                    console.print(f"submitted allocation {job}: {nodes} node(s) x "
                                  f"{exp.resources.slots_per_node} slot(s) for {len(todo)} run(s)"
                                  + (f" ({why})" if why else ""))
            else:
                following.update(submit_per_run(exp, decisions, args.max_parallel))
            if not following:
                console.print("nothing to submit")
            if args.no_wait:
                console.print(f"following nothing: {len(set(following.values()))} job(s) in the queue; "
                              "run the same command to follow them")
                return 0
            restart = None
            if exp.resources.jobs == "per-run":
                def restart(these: list) -> dict[str, str]:  # (per-run jobs killed by a signal, their dependents)
                    return submit_per_run(exp, decide(these, False), args.max_parallel)
            # A node can fail many times over a long grid: each time it is the driver's own,
            # Slurm ends the allocation and the launch submits the next (at most once a node).
            full = False  # an allocation's driver found no space to write the run folders
            for again in range(exp.resources.nodes + 1):
                ended = wait(runs, following, console, timeout_s=args.timeout, res=exp.resources, restart=restart)
                jobs = sorted(set(following.values()) & ended.keys() if exp.resources.jobs == "allocation" else ())
                lost = {job: lost_driver_node(job) for job in jobs if not ended[job].state.startswith("COMPLETED")}
                for job, node in lost.items():
                    if node:  # (Slurm ends a --no-kill job whose batch host fails)
                        console.print(f"[red]allocation {job} lost {node}, the node its driver ran on[/], and "
                                      f"Slurm ended it ({ended[job]})")
                        continue
                    if ended[job].exit_code == NO_SPACE_EXIT:  # its driver stopped, as the local executor does
                        console.print(f"[red]error:[/] allocation {job}: no space left to write the run folders "
                                      f"under {exp.runs_dir}; {NO_SPACE_ADVICE}")
                        full = True
                        continue
                    log_file = job_log(exp, job)  # (a driver that ended early, for one)
                    console.print(f"[red]allocation {job} ended {ended[job]}[/]: "
                                  + (f"its log is {log_file}" if log_file.exists() else
                                     f"it wrote no log ({log_file}): could its nodes not see or write the "
                                     "runs folder?"))
                per_run = exp.resources.jobs == "per-run"
                full_jobs = [job for job, end in ended.items() if per_run and end.exit_code == NO_SPACE_EXIT]
                if full_jobs:  # a per-run job's trainer found no space (job.RunJob)
                    console.print(f"[red]error:[/] job(s) {', '.join(full_jobs)}: no space left to write the run "
                                  f"folders under {exp.runs_dir}; {NO_SPACE_ADVICE}")
                    full = True
                unfinished = [r for r in runs if run_status(r.run_dir)[0] not in ("done", "failed", "cancelled")]
                for r in unfinished if per_run else []:  # (its trainer's whole log is its job's)
                    job = following.get(r.key, "")
                    if job in ended and job not in full_jobs:
                        log_file, said = job_log(exp, job), last_error(r.run_dir).split("; ")[0]
                        said = "" if said.startswith(f"its job {job} ") else said  # (wait said it: killed)
                        console.print(f"[red]{r.key}: its job {job} ended {ended[job]}[/] with the run unfinished"
                                      + (f" ({escape(said)})" if said else "")
                                      + (f"; its log is {log_file}" if log_file.exists() else ""))
                if full:
                    closing_report(runs, console, retry_cmd)
                    return NO_SPACE_EXIT
                if not (lost and all(lost.values()) and unfinished):
                    break
                if again == exp.resources.nodes:
                    console.print("[red]the allocation lost its driver's node too often[/]: the same command "
                                  "resumes its unfinished runs on a new allocation")
                    break
                job, nodes, why = submit_allocation(exp, runs)
                following = {r.key: job for r in runs}
                console.print(f"submitted allocation {job}: {nodes} node(s) x {exp.resources.slots_per_node} "
                              f"slot(s) for the {len(unfinished)} unfinished run(s)" + (f" ({why})" if why else ""))
    except (LaunchError, ConfigError, DatasetError, FileNotFoundError) as e:
        console.print(f"[red]error:[/] {escape(str(e))}")
        return 2
    except OSError as e:  # an unwritable or full runs folder
        full = no_space(e)
        console.print(f"[red]error:[/] cannot write {escape(str(e.filename or exp.runs_dir))}: {e.strerror or e}; "
                      + (NO_SPACE_ADVICE if full else "choose a writable runs_dir (--runs_dir=...) or free some space"))
        return NO_SPACE_EXIT if full else 2
    except KeyboardInterrupt as e:
        why = f" ({e.args[0]})" if e.args else ""
        if executor == "slurm":
            console.print(f"stopped following{why}; the jobs keep running: run the same command to follow them")
        else:
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


def _plan_json(exp, runs, est, executor: str) -> dict:
    res = exp.resources
    return {
        "experiment": exp.name, "executor": executor, "jobs": res.jobs,
        "allocation": {"nodes": res.nodes, "min_nodes": res.least_nodes, "gpus_per_node": res.gpus,
                       "slots": res.slots, "time": res.time},
        "runs": [{"key": r.key, "stage": r.stage, "depends_on": r.depends_on, "nodes": res.run_nodes,
                  "gpus": res.ranks_per_run if res.gpus else 0, "ranks": res.ranks_per_run} for r in runs],
        "estimate": {k: est[k] for k in ("gpu_hours", "held_gpu_hours", "wall_hours", "eval_share", "measured_on", "unmeasured", "assumed", "complete",
                                         "runs_per_gpu", "packed_speedup", "by_nodes") if k in est},
    }


def _print_plan(console: Console, exp, decisions, executor: str, est: dict | None) -> None:
    from rich.table import Table

    res = exp.resources
    if executor == "slurm":
        where = (f"{'one allocation of ' if res.jobs == 'allocation' else 'one job per run, within '}"
                 f"{res.nodes} node(s){f' (at least {res.least_nodes})' if res.least_nodes < res.nodes else ''} "
                 f"x {res.slots_per_node} {'GPU' if res.gpus else 'CPU task'}(s), "
                 f"{res.cpus_per_task} CPU(s)/task, {res.time}")
    else:
        where = "this machine"
    t = Table(title=f"{exp.name}: {len(decisions)} runs of {res.ranks_per_run} rank(s) on {executor} ({where})")
    for c in ("run", "stage", "depends on", "on disk", "action") + (("est. hours",) if est else ()):
        t.add_column(c)
    for d in decisions:
        action = d.action + (f" ({d.reason})" if d.reason and d.action in ("blocked", "keep-failed", "resume") else "")
        row = [d.run.key, str(d.run.stage), ", ".join(d.run.depends_on) or "-", d.status, action]
        if est:
            h = est["runs"].get(d.run.key)
            row.append(f"{h:.2f}" if h is not None else "?")
        t.add_row(*row)
    console.print(t)
    if est:
        on = ", ".join(est["measured_on"]) or "no measurement"
        packed = f" x {est['runs_per_gpu']} runs each" if est["runs_per_gpu"] > 1 else ""
        gains = ", ".join(f"{m} x{x:.2f}" for m, x in est["packed_speedup"].items())
        console.print(f"estimate of what is left: {est['gpu_hours']:.1f} GPU-hours, {est['wall_hours']:.1f} h "
                      f"wall-clock on {res.slots} slot(s){packed} (images/s measured on {on}"
                      + (f"; packed over alone: {gains}" if gains else "")
                      + f"; evaluation {est['eval_share']:.0%} of it; stage 1 at its max_epochs, an upper bound)")
        if executor == "slurm" and res.jobs == "allocation" and est["held_gpu_hours"] > 0:
            busy = est["gpu_hours"] / est["held_gpu_hours"]
            console.print(f"  the allocation holds its {res.slots} {'GPU' if res.gpus else 'CPU task'}(s) for all "
                          f"of it: {est['held_gpu_hours']:.1f} {'GPU' if res.gpus else 'slot'}-hours held "
                          f"(what Slurm accounts), {busy:.0%} of them training")
            others = [x for x in est.get("by_nodes", []) if x["nodes"] != res.nodes]
            if others:
                console.print("  other sizes: " + "; ".join(
                    f"--nodes {x['nodes']}: {x['wall_hours']:.1f} h, {x['held_gpu_hours']:.1f} held"
                    for x in others))
        for why in est["unmeasured"]:
            console.print(f"  not estimated: {why}")
        for what in est["assumed"]:
            console.print(f"  assumed: {what}")


if __name__ == "__main__":
    sys.exit(main())
