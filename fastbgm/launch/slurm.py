"""Submit an experiment's DAG to Slurm with submitit: one job per run (one task per
GPU, or per node's worth of tasks across ``nodes`` for a multi-node DDP run),
stage-2 adversarial jobs with ``afterok`` on their stage-1 job, requeue on
preemption or time-out (see :mod:`fastbgm.launch.job`)."""

from __future__ import annotations

import shutil
import subprocess
import time
from typing import Any

from ..experiment import ExperimentConfig, RunSpec, experiment_dir, run_status
from ..fileio import atomic_write_json
from .common import Decision, LaunchError, mark_cancelled, read_json, table, will_run
from .job import RunJob

JOB_FILE = "slurm-job.json"
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "REQUEUE_HOLD",
          "REQUEUE_FED"}


def slurm_available() -> bool:
    if not shutil.which("sbatch"):
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def cluster_capacity(partition: str = "") -> dict[str, int]:
    """Nodes, and the most CPUs and GPUs one node of the partition has."""
    cmd = ["sinfo", "-h", "-N", "-o", "%N %c %G"] + (["-p", partition] if partition else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise LaunchError(f"sinfo failed ({out.stderr.strip()}); is Slurm running? (bash launch/slurm-start.sh)")
    nodes, cpus, gpus = set(), 0, 0
    for line in out.stdout.splitlines():
        name, c, gres = (line.split() + ["", "", ""])[:3]
        nodes.add(name)
        cpus = max(cpus, int(c.rstrip("+") or 0))
        for g in gres.split(","):
            parts = g.split(":")
            if parts[0] == "gpu" and parts[-1].split("(")[0].isdigit():
                gpus = max(gpus, int(parts[-1].split("(")[0]))
    if not nodes:
        raise LaunchError(f"partition {partition or '(default)'} has no nodes")
    return {"nodes": len(nodes), "cpus": cpus, "gpus": gpus}


def check_request(exp: ExperimentConfig) -> None:
    """Reject what the cluster can never run, before anything is submitted or waits."""
    res = exp.resources
    cap = cluster_capacity(res.partition)
    need_cpus = res.tasks * res.cpus_per_task
    problems = []
    if res.nodes > cap["nodes"]:
        problems.append(f"{res.nodes} nodes asked, the partition has {cap['nodes']}")
    if need_cpus > cap["cpus"]:
        problems.append(f"{need_cpus} CPUs per node asked ({res.tasks} tasks x {res.cpus_per_task}), "
                        f"the largest node has {cap['cpus']}")
    if res.gpus > cap["gpus"]:
        problems.append(f"{res.gpus} GPUs per node asked, the largest node has {cap['gpus']}")
    if problems:
        raise LaunchError("Slurm cannot satisfy this request: " + "; ".join(problems)
                          + ". Lower --nodes / --gpus-per-node / --cpus-per-task (or --resources.*)")


def queued_jobs(runs: list[RunSpec]) -> dict[str, str]:
    """Runs whose recorded job is still in the queue (key -> job id)."""
    ids = {r.key: read_json(r.run_dir / JOB_FILE).get("job_id") for r in runs}
    ids = {k: v for k, v in ids.items() if v}
    if not ids:
        return {}
    out = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(sorted(set(ids.values())))],
                         capture_output=True, text=True, timeout=30)
    active = {line.split()[0] for line in out.stdout.splitlines() if line.split()[1:] and line.split()[1] in ACTIVE}
    return {k: v for k, v in ids.items() if v in active}


def submit(exp: ExperimentConfig, decisions: list[Decision], max_parallel: int = 0) -> dict[str, Any]:
    import submitit

    res = exp.resources
    folder = experiment_dir(exp) / ".submitit"
    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="slurm", slurm_max_num_timeout=20)
    params: dict[str, Any] = {
        "name": f"fastbgm-{exp.name}", "timeout_min": res.timeout_min, "nodes": res.nodes,
        "tasks_per_node": res.tasks, "cpus_per_task": res.cpus_per_task,
    }
    if res.gpus:
        params["gpus_per_node"] = res.gpus
    if res.partition:
        params["slurm_partition"] = res.partition
    if res.mem_gb:
        params["mem_gb"] = res.mem_gb
    jobs: dict[str, Any] = {}
    job_ids = {d.run.key: read_json(d.run.run_dir / JOB_FILE).get("job_id") for d in decisions
               if d.action == "queued"}
    for d in decisions:
        r = d.run
        if d.action == "blocked":
            mark_cancelled(r, d.reason)
            continue
        if not will_run(d):
            continue
        deps = [job_ids[k] for k in r.depends_on if job_ids.get(k)]
        extra: dict[str, Any] = {"dependency": "afterok:" + ":".join(deps)} if deps else {}
        executor.update_parameters(**params, slurm_additional_parameters=extra)
        if d.action == "retry":
            (r.run_dir / "result.json").unlink(missing_ok=True)
        r.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            job = executor.submit(RunJob(r.config, r.run_dir, threads=res.cpus_per_task))
        except Exception as e:  # sbatch said no: say what and why, not a traceback
            raise LaunchError(f"Slurm rejected {r.key}: {str(e).strip().splitlines()[-1] if str(e) else e}") from e
        job_ids[r.key] = job.job_id
        jobs[r.key] = job
        atomic_write_json(r.run_dir / JOB_FILE, {"job_id": job.job_id, "submitted": time.time(),
                                                  "depends_on": deps})
        if max_parallel:
            _throttle(jobs, max_parallel)
    return jobs


def _throttle(jobs: dict[str, Any], limit: int) -> None:
    """Hold further submissions while ``limit`` of ours are queued or running."""
    while True:
        active = [j for j in jobs.values() if j.get_info().get("State", "UNKNOWN").split()[0] in ACTIVE]
        if len(active) < limit:
            return
        time.sleep(2)


def wait(runs: list[RunSpec], jobs: dict[str, Any], console: Any, poll_s: float = 2.0,
         timeout_s: float | None = None) -> None:
    """Live table until every run we track has left the queue."""
    from rich.live import Live

    start = time.time()
    tracked = {r.key: r for r in runs}
    with Live(table(runs, {}, "fastbgm on Slurm"), console=console, refresh_per_second=1) as view:
        while True:
            states = {}
            active = 0
            for key, r in tracked.items():
                st = run_status(r.run_dir)[0]
                job = jobs.get(key)
                if job is not None:
                    slurm_state = job.get_info().get("State", "UNKNOWN").split()[0]
                    if slurm_state == "UNKNOWN" and st not in ("done", "failed", "cancelled"):
                        slurm_state = "PENDING"  # just submitted: not in sacct yet
                    if slurm_state in ACTIVE:
                        active += 1
                        if st not in ("done", "failed"):
                            st = "running" if slurm_state == "RUNNING" else "pending"
                    elif slurm_state == "CANCELLED" and st not in ("done", "failed"):
                        parent = next((p for p in r.depends_on), "")
                        mark_cancelled(r, f"its stage-1 run {parent} failed" if parent else "cancelled in Slurm")
                        st = "cancelled"
                states[key] = st
            view.update(table(runs, states, "fastbgm on Slurm"))
            if not active:
                return
            if timeout_s is not None and time.time() - start > timeout_s:
                raise LaunchError(f"still waiting after {timeout_s:.0f} s; jobs keep running, re-launch to follow them")
            time.sleep(poll_s)
