"""An experiment on Slurm, through submitit: ONE allocation whose driver packs the runs
onto it as job steps (the default), or one job per run in job arrays (stage-2 arrays
``afterok`` on their stage-1 job); and following either until it ends. Requeue on
preemption or time-out resumes every run from its last.pt. What Slurm says of its nodes
and jobs is asked through cluster.py; what runs inside a job is job.py's."""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from ..experiment import ExperimentConfig, RunSpec, experiment_dir, run_status
from ..fileio import atomic_write_json
from ..train import NO_SPACE_EXIT
from .cluster import (NEVER, NODES_OUT, JobEnd, cluster_capacity, job_end, job_fields, max_array_size, queue,
                      queue_summary, settled_queue, usable_nodes)
from .common import Decision, LaunchError, read_json, runs_view, will_run
from .job import ENDED, HANGS, JOB_FILE, KILLS, RunJob, job_counts, requeue_killed_teardown
from .trainproc import MAX_KILLS, MAX_STALLS, log_error, mark_cancelled


def nodes_to_ask(res: Any) -> tuple[int, int]:
    """(nodes an allocation asks for, nodes of the partition up): ``nodes``, or as few as
    ``min_nodes`` when fewer are up."""
    up = usable_nodes(res.partition)
    return max(res.least_nodes, min(res.nodes, up)), up


def allocation_size(res: Any) -> tuple[int, str]:
    """How many nodes a new allocation asks for (:func:`nodes_to_ask`), and why, when
    fewer than ``nodes`` are up."""
    n, up = nodes_to_ask(res)
    if up >= res.nodes:
        return n, ""
    if n < res.nodes:
        return n, f"only {up} of the partition's nodes are up; --min-nodes {res.least_nodes} lets it start on {n}"
    return n, (f"only {up} of the partition's nodes are up, the others down or drained: it waits for {res.nodes}"
               + (f"; --min-nodes {max(up, res.run_nodes)} would start it on {max(up, res.run_nodes)}"
                  if 0 < up and res.run_nodes <= up else ""))


def job_shape(res: Any) -> tuple[int, int, int]:
    """(nodes, tasks per node, GPUs per node) of one job: the whole allocation, or, with
    ``jobs = "per-run"``, one run."""
    if res.jobs == "allocation":
        return res.nodes, res.slots_per_node, res.gpus
    return res.run_nodes, res.run_ranks_per_node, res.run_ranks_per_node if res.gpus else 0


def _shape_params(res: Any) -> dict[str, Any]:
    nodes, tasks, gpus = job_shape(res)
    return {"nodes": nodes, "tasks_per_node": tasks, **({"gpus_per_node": gpus} if gpus else {})}


def check_request(exp: ExperimentConfig) -> None:
    """Reject what the cluster can never run, before anything is submitted or waits."""
    res = exp.resources
    cap = cluster_capacity(res.partition)
    nodes, tasks, gpus = job_shape(res)
    problems = []
    if nodes > cap["nodes"]:
        problems.append(f"{nodes} nodes asked, the partition has {cap['nodes']}")
    if tasks * res.cpus_per_task > cap["cpus"]:
        problems.append(f"{tasks * res.cpus_per_task} CPUs per node asked ({tasks} tasks x {res.cpus_per_task}), "
                        f"the largest node has {cap['cpus']}")
    if gpus > cap["gpus"]:
        problems.append(f"{gpus} GPUs per node asked, the largest node has {cap['gpus']}")
    if problems:
        raise LaunchError("Slurm cannot satisfy this request: " + "; ".join(problems)
                          + ". Lower --nodes / --gpus-per-node / --cpus-per-task (or --resources.*)")


def queued_jobs(runs: list[RunSpec]) -> dict[str, str]:
    """Runs whose recorded per-run job is still in the queue (key -> job id)."""
    ids = {r.key: read_json(r.run_dir / JOB_FILE).get("job_id") for r in runs}
    active = settled_queue([v for v in ids.values() if v])
    return {k: v for k, v in ids.items() if v in active}


def _executor(exp: ExperimentConfig, **params: Any) -> Any:
    import submitit

    res = exp.resources
    executor = submitit.AutoExecutor(folder=str(experiment_dir(exp) / ".submitit" / "%j"), cluster="slurm",
                                     slurm_max_num_timeout=20)
    base: dict[str, Any] = {"name": f"fastbgm-{exp.name}", "timeout_min": res.timeout_min,
                            "cpus_per_task": res.cpus_per_task}
    if res.partition:
        base["slurm_partition"] = res.partition
    if res.mem_gb:
        base["mem_gb"] = res.mem_gb
    executor.update_parameters(**base, **params)
    return executor


def _rejected(what: str, e: Exception) -> LaunchError:
    return LaunchError(f"Slurm rejected {what}: {str(e).strip().splitlines()[-1] if str(e) else e}")


def submit_per_run(exp: ExperimentConfig, decisions: list[Decision], max_parallel: int = 0) -> dict[str, str]:
    """One job per run, in job arrays: the stage-1 runs, the random-init runs, and for each
    stage-1 run the runs that start from it (``afterok`` on it). ``max_parallel`` is each
    array's throttle (``%N``); arrays are split to the cluster's ``MaxArraySize``."""
    res = exp.resources
    # a task that dies (killed as hung by its job's watch, out of memory) ends the step: its
    # peers would otherwise wait in their collective until the process group's timeout
    executor = _executor(exp, **_shape_params(res), slurm_srun_args=["--kill-on-bad-exit=1"],
                         slurm_teardown=requeue_killed_teardown(experiment_dir(exp)))
    job_ids = {d.run.key: read_json(d.run.run_dir / JOB_FILE).get("job_id") for d in decisions
               if d.action == "queued"}
    groups: dict[tuple[int, str], list[Decision]] = {}
    for d in decisions:
        if will_run(d):
            groups.setdefault((d.run.stage, ",".join(d.run.depends_on)), []).append(d)
    limit = max_array_size()
    submitted: dict[str, str] = {}
    for (_, parents), group in sorted(groups.items()):
        deps = [job_ids[k] for k in parents.split(",") if k and job_ids.get(k)]
        # a failed parent cancels, on any cluster; a job on a node that fails goes back in
        # the queue (not left NODE_FAIL) even where the cluster's JobRequeue is 0
        extra: dict[str, Any] = {"kill-on-invalid-dep": "yes", "requeue": True}
        if deps:
            extra["dependency"] = "afterok:" + ":".join(deps)
        for i in range(0, len(group), limit):
            chunk = group[i:i + limit]
            executor.update_parameters(slurm_additional_parameters=extra,
                                       slurm_array_parallelism=max_parallel or len(chunk))
            try:
                with executor.batch():
                    jobs = [executor.submit(RunJob(d.run.config, d.run.run_dir, threads=res.cpus_per_task,
                                                   stall_s=res.stall_timeout_s)) for d in chunk]
            except Exception as e:  # sbatch said no: say what and why, not a traceback
                raise _rejected(chunk[0].run.key, e) from e
            for d, job in zip(chunk, jobs):
                job_ids[d.run.key] = submitted[d.run.key] = job.job_id
                atomic_write_json(d.run.run_dir / JOB_FILE, {"job_id": job.job_id, "submitted": time.time(),
                                                             "depends_on": deps})
    return submitted


def submit_allocation(exp: ExperimentConfig, runs: list[RunSpec]) -> tuple[str, int, str]:
    """ONE job for the experiment: its allocation, with the driver that packs the runs
    onto it as job steps (:mod:`fastbgm.launch.allocation`). Returns its job id, its
    nodes, and why they are fewer than asked (:func:`allocation_size`)."""
    from .allocation import ALLOCATION_FILE, AllocationDriver
    from .common import step_run

    res = exp.resources
    nodes, why = allocation_size(res)
    executor = _executor(exp, **{**_shape_params(res), "nodes": nodes},
                         slurm_use_srun=False,  # the driver runs in the batch script and starts steps
                         slurm_teardown=requeue_killed_teardown(experiment_dir(exp)),  # (a killed driver)
                         # a failed node leaves the job, which goes on (the driver restarts
                         # the runs that were on it), instead of ending it
                         slurm_additional_parameters={"requeue": True, "no-kill": True})
    driver = AllocationDriver([step_run(r, res) for r in runs], res.slots_per_node, res.cpus_per_task,
                              gpus=res.gpus > 0,
                              runs_per_slot=res.runs_per_gpu, stall_s=res.stall_timeout_s,
                              mem_mb_per_rank=res.mem_gb * 1024 // res.slots_per_node if res.mem_gb else 0)
    try:
        job = executor.submit(driver)
    except Exception as e:
        raise _rejected(f"the allocation for {exp.name}", e) from e
    atomic_write_json(experiment_dir(exp) / ALLOCATION_FILE, {
        "job_id": job.job_id, "submitted": time.time(), "nodes": nodes, "gpus_per_node": res.gpus,
        "runs": [r.key for r in runs]})
    return job.job_id, nodes, why


def job_log(exp: ExperimentConfig, job: str) -> Path:
    """Where a job's first task logs (submitit's file for its stderr): an allocation's
    driver, or a per-run job's trainer (rank 0)."""
    return experiment_dir(exp) / ".submitit" / job / f"{job}_0_log.err"


def active_allocation(exp: ExperimentConfig) -> str | None:
    """The experiment's allocation job, while it is queued or running."""
    from .allocation import ALLOCATION_FILE

    job = read_json(experiment_dir(exp) / ALLOCATION_FILE).get("job_id")
    return job if job and settled_queue([job]) else None


def shrink_pending(job: str, res: Any) -> str:
    """A pending allocation that waits for nodes which are down or drained (requeued
    after one failed for good): ask for only the nodes up, down to ``min_nodes``. Says
    what it did ("" when nothing)."""
    fields = job_fields(job)
    # (a job that lost a node shows fewer NumNodes, but its tasks, one a slot, still
    # need every node it first had)
    asked = max(int(fields.get("NumNodes", "0").split("-")[0] or 0),
                -(-int(fields.get("NumTasks", "0") or 0) // res.slots_per_node))
    n, up = nodes_to_ask(res)
    if fields.get("JobState") != "PENDING" or not n < asked:
        return ""
    # its tasks and their CPUs too: Slurm keeps the old counts otherwise, and a job with
    # GPUs per node is then never runnable (BadConstraints)
    tasks = n * res.slots_per_node
    r = subprocess.run(["scontrol", "update", f"JobId={job}", f"NumNodes={n}", f"NumTasks={tasks}",
                        f"NumCPUs={tasks * res.cpus_per_task}"], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        return f"could not shrink allocation {job} to the {n} node(s) up: {(r.stderr or r.stdout).strip()}"
    return (f"allocation {job} waited for {asked} node(s), {up} are up: it now asks for {n} "
            f"(--min-nodes {res.least_nodes})")


def wait(runs: list[RunSpec], jobs: dict[str, str], console: Any, poll_s: float = 2.0,
         timeout_s: float | None = None, res: Any = None,
         restart: Callable[[list[RunSpec]], dict[str, str]] | None = None) -> dict[str, JobEnd]:
    """Live table until every job we follow has left the queue. ``jobs``: run key -> job
    id (one per run, or the same allocation job for every run). A job pending for a
    reason that never resolves is cancelled and its runs marked with that reason; an
    allocation pending for nodes that are down asks for fewer when ``res.min_nodes``
    lets it (:func:`shrink_pending`). Hung runs are not this function's: the allocation's
    driver watches its steps, and a per-run job its own run (job.watch_own_run), whether
    or not a launch follows them. A per-run job whose trainer a signal kills requeues
    itself too (:func:`requeue_killed_job`); one that ends killed all the same, with its
    run unfinished (:attr:`JobEnd.killed`: its batch script was killed with it, say), is
    submitted again through ``restart``, with the unfinished runs that wait on it (Slurm
    cancels their jobs), up to :data:`MAX_KILLS` kills a run, the job's own counted, as
    the local scheduler and an allocation's driver start a killed trainer again; ``jobs``
    is updated in place. Returns how each job that left the
    queue with a run unfinished ended (sacct's state and exit code)."""

    start = time.time()
    shrinkable = res is not None and res.jobs == "allocation" and res.least_nodes < res.nodes
    last_shrink = 0.0
    gone: dict[str, JobEnd] = {}
    by_key = {r.key: r for r in runs}
    per_run = {j for j, n in Counter(jobs.values()).items() if j and n == 1}  # (not the allocation all share)
    said_counts: dict[tuple[str, str], int] = {}  # per folder and counter: its job's count when last said
    # (the experiment folder, where an allocation counts the kills of its driver: runs live at root / key)
    root = Path(runs[0].run_dir).parents[len(Path(runs[0].key).parts) - 1] if runs else None

    def say_requeues(folder: Path, who: str, job: str) -> None:
        """Say it when a job has requeued itself, or given up, because a per-run job's
        trainer hung (job.watch_own_run) or a signal killed it, or an allocation's driver
        was killed (:func:`requeue_killed_job`): jobs watch themselves, whether or not a
        launch follows them. ``folder``: the run's, or the experiment's (an allocation)."""
        if folder == root:
            counters = [(KILLS, "found its driver killed by a signal", MAX_KILLS, "left the runs unfinished",
                         "every unfinished run resumes")]
        else:
            counters = [(HANGS, "found it hung", MAX_STALLS, "failed the run", "the run resumes"),
                        (KILLS, "found its trainer killed by a signal", MAX_KILLS, "left the run unfinished",
                         "the run resumes")]
        for name, what, most, given_up, resumes in counters:
            n = job_counts(folder, name).get(job, 0)
            if n > said_counts.setdefault((str(folder), name), n):
                said_counts[str(folder), name] = n
                end = given_up if n >= most else f"requeued itself; {resumes} from its last checkpoint"
                console.print(f"{who}: its job {job} {what} ({n} of {most}) and {end}")

    def parent_why(parent: str) -> str:
        """Why a run whose job waited on its stage-1 run's job can never start: that run
        failed, or its job ended with the run unfinished (cancelled, killed, a full disk),
        which the next launch resumes."""
        status = run_status(by_key[parent].run_dir)[0] if parent in by_key else "failed"
        if status in ("failed", "cancelled"):
            return f"its stage-1 run {parent} {status}"
        job = jobs.get(parent)
        end = end_of(job) if job else None
        how = "" if end is None else (f" (its job {job} found no space left to write its run folder)"
                                      if end.exit_code == NO_SPACE_EXIT else f" (its job {job} ended {end}"
                                      + (f", {kills[parent]} times in this launch" if kills.get(parent, 0) > 1
                                         else "") + ")")
        return f"its stage-1 run {parent} stopped unfinished{how}; the same command resumes it, then runs this one"

    kills: dict[str, int] = {}  # per run: its jobs killed by a signal in this launch
    ends: dict[str, JobEnd] = {}

    def end_of(job: str) -> JobEnd:
        """How a job that left the queue ended (sacct, asked once)."""
        if job not in ends:
            ends[job] = job_end(job)
        return ends[job]

    def restart_killed(q: dict[str, tuple[str, str]]) -> bool:
        """Submit again the per-run jobs that a signal killed with their run unfinished,
        and the unfinished runs that wait on them (Slurm cancels their jobs: afterok), up
        to MAX_KILLS times a run. Says so in the launch's output and the run's train.log.
        Whether it submitted any."""
        said: dict[str, str] = {}  # per killed run: what became of its job
        for r in runs:
            job = jobs.get(r.key)
            if job not in per_run or job in q or job in gone or run_status(r.run_dir)[0] in ENDED:
                continue
            end = end_of(job)
            if not end.killed:
                continue
            gone[job] = end
            # (a job that requeued itself after kills, up to MAX_KILLS: job.KILLS, counts them all)
            n = kills[r.key] = kills.get(r.key, 0) + max(1, job_counts(r.run_dir, KILLS).get(job, 0))
            said[r.key] = f"its job {job} ended {end} with the run unfinished" + (
                f" ({n} of {MAX_KILLS} in this launch)" if n < MAX_KILLS else
                f", {n} times in this launch; it is left unfinished: the same command resumes it from its last "
                "checkpoint (if an OOM killer ended it, give it more memory: --mem-gb)")
        again = [r for r in runs if r.key in said and kills[r.key] < MAX_KILLS]
        names = {r.key for r in again}
        waiting = [r for r in runs if names & set(r.depends_on) and run_status(r.run_dir)[0] not in ENDED]
        new: dict[str, str] = {}
        if again:
            old = [jobs[r.key] for r in waiting if jobs.get(r.key)]
            if old:  # (never to start: their dependency failed)
                subprocess.run(["scancel", *old], capture_output=True, timeout=60)
            try:
                new = restart(again + waiting)
            except LaunchError as e:  # (sbatch said no): they stay unfinished, for the next launch
                for key in names:
                    said[key] += f"; it could not be submitted again ({e}): the same command resumes it"
                    kills[key] = MAX_KILLS
            jobs.update(new)
            per_run.update(new.values())
        for r in runs:
            if r.key in said:
                line = said[r.key] + (f"; job {new[r.key]} resumes it from its last checkpoint" if r.key in new
                                      else "")
                log_error(r.run_dir, line)
                console.print(f"[yellow]{r.key}[/]: {line}")
            elif r.key in new:
                console.print(f"{r.key}: submitted again as job {new[r.key]}, waiting on its stage-1 run")
        return bool(new)

    ended_before = {r.key: st for r in runs if (st := run_status(r.run_dir)[0]) in ENDED}
    with runs_view(runs, ended_before, "fastbgm on Slurm", console, refresh_per_second=1) as view:
        while True:
            q = queue(list(jobs.values()))
            if restart is not None and restart_killed(q):
                q = queue(list(jobs.values()))
            states = {}
            for job in {j for j in jobs.values() if j and j not in per_run} if root is not None else ():
                say_requeues(root, "the allocation", job)
            for r in runs:
                st = run_status(r.run_dir)[0]
                job = jobs.get(r.key)
                if job in per_run:
                    say_requeues(Path(r.run_dir), r.key, job)
                parent_job = jobs.get(next(iter(r.depends_on), ""))
                if job in per_run and parent_job in q and st not in ENDED \
                        and (job not in q or q[job][1].startswith("Dependency")):
                    # its stage-1 run's job has not left the queue (it may be COMPLETING
                    # as it fails, and this one already cancelled): what becomes of that
                    # job, submitted again or not, decides what becomes of this one
                    states[r.key] = "pending"
                    continue
                if job in q and st not in ENDED:
                    slurm_state, reason = q[job]
                    if slurm_state == "PENDING" and reason.split(",")[0] in NEVER:
                        subprocess.run(["scancel", job], capture_output=True, timeout=60)
                        parent = next(iter(r.depends_on), "")
                        why = (parent_why(parent) if reason.startswith("Dependency") and parent
                               else f"Slurm can never start its job {job} ({reason})")
                        mark_cancelled(r.run_dir, r.key, why)
                        st = "cancelled"
                    elif slurm_state != "RUNNING":
                        st = "pending"
                elif job and job not in q and job not in gone and st not in ENDED:
                    gone[job] = final = end_of(job)
                    if job in per_run and final.state.startswith("CANCELLED") and r.depends_on:
                        mark_cancelled(r.run_dir, r.key, parent_why(r.depends_on[0]))
                        st = "cancelled"
                states[r.key] = st
            waits_for_nodes = [j for j, (state, reason) in q.items()
                               if state == "PENDING" and reason.startswith(NODES_OUT)]
            if shrinkable and waits_for_nodes and time.time() - last_shrink > 10:
                last_shrink = time.time()
                for job in waits_for_nodes:
                    said = shrink_pending(job, res)
                    if said:
                        view.console.print(said)
            waiting = queue_summary(q)
            view.show(states, waiting)
            if not q:
                return gone
            if timeout_s is not None and time.time() - start > timeout_s:
                raise LaunchError(f"still waiting after {timeout_s:.0f} s; the jobs keep running: run the same "
                                  "command again to follow them")
            time.sleep(poll_s)
