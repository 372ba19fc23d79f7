"""What the fault sweep (faults.py) and the tests do to the local Slurm cluster from
outside, as an operator or the hardware would: find the process a job runs, take a node
down and return it to service, and ask whether a file system mounted now reaches the
nodes (each slurmd runs in a network namespace of its own on this machine:
launch/slurm-start.sh)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .common import wait_for


def job_process(job: str, command: bytes) -> int:
    """The pid of the process of Slurm job ``job`` (an array's task "A_a", or one job)
    whose command line holds ``command`` (``b"slurm_script"``: its batch script), on this
    machine (the local cluster's nodes are all here). Raises LookupError when none runs."""
    array, _, task = job.partition("_")
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if command not in (environ.parent / "cmdline").read_bytes():
                continue
            env = dict(x.split("=", 1) for x in environ.read_bytes().decode(errors="replace").split("\0") if "=" in x)
        except OSError:
            continue  # (ended meanwhile)
        if (env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")) == (array, task) or (
                not task and env.get("SLURM_JOB_ID") == job):
            return int(environ.parent.name)
    raise LookupError(f"no process of job {job} runs {command!r} here")


def set_node(node: str, state: str, reason: str = "") -> None:
    """``scontrol update`` of a node's state. ``resume`` of a node already back in
    service (the cluster's ReturnToService) is refused by Slurm, and is not an error."""
    cmd = ["scontrol", "update", f"nodename={node}", f"state={state}"] + ([f"reason={reason}"] if reason else [])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0 and not (state == "resume" and "Invalid node state" in r.stderr + r.stdout):
        raise RuntimeError(f"{' '.join(cmd)}: {(r.stderr or r.stdout).strip()}")


def resume_node(node: str, timeout_s: float = 60.0) -> None:
    """Return ``node`` to service and wait until Slurm counts it usable again (a resumed
    node passes through DOWN until its slurmd registers): a launch that starts right after
    would otherwise see one node fewer, and under --min-nodes start on the others."""
    from fastbgm.launch.cluster import usable_node_names

    set_node(node, "resume")
    wait_for(lambda: node in usable_node_names(), timeout_s)


def nodes_see_new_mounts() -> bool:
    """Whether a file system mounted here now reaches the local cluster's nodes, as shared
    storage reaches a real cluster's: each slurmd in this mount namespace, or in one that
    is its slave (launch/slurm-start.sh makes them so)."""
    own = os.readlink("/proc/self/ns/mnt")
    found = False
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() != "slurmd":
                continue
            pid = comm.parent
            root = [x for x in (pid / "mountinfo").read_text().splitlines() if x.split()[4] == "/"]
            if os.readlink(pid / "ns/mnt") != own and not any("master:" in x for x in root):
                return False
            found = True
        except OSError:
            continue  # (ended meanwhile, or not ours to read)
    return found
