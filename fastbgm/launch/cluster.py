"""What Slurm says about the cluster and the jobs on it: whether it answers, its nodes
and their capacity, the queue, and how a job that left it ended (sinfo, squeue, sacct,
scontrol show). Only questions: submitting and following an experiment's jobs is
slurm.py's, what runs inside a job is job.py's."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass

from ..train import PEER_LOST_EXIT
from .common import LaunchError
from .trainproc import signal_name

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


# sinfo's long node states that can run a job now (a "~" suffix, powered down to save
# power, is resumed by Slurm; a "*" suffix, not responding, is not usable)
USABLE = {"idle", "mixed", "allocated", "completing", "reserved", "planned", "powering_up"}


def usable_nodes(partition: str = "") -> int:
    """How many nodes of the partition could run a job now: not down, drained, failed, or
    silent."""
    return len(usable_node_names(partition))


def usable_node_names(partition: str = "") -> set[str]:
    """The nodes of the partition that could run a job now (:func:`usable_nodes`)."""
    cmd = ["sinfo", "-h", "-N", "-o", "%N %T"] + (["-p", partition] if partition else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise LaunchError(f"sinfo failed ({out.stderr.strip()}); is Slurm running? (bash launch/slurm-start.sh)")
    up = set()
    for line in out.stdout.splitlines():
        name, state = (line.split() + ["", ""])[:2]
        if "*" not in state and state.rstrip("~#!%$@^-") in USABLE:
            up.add(name)
    return up


def queue(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """{job id: (state, reason)} of those still in the queue; array elements one by one."""
    ids = sorted({j for j in job_ids if j})
    if not ids:
        return {}
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T|%r", "-j", ",".join(ids)], capture_output=True,
                         text=True, timeout=60)
    states = {}
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3 and parts[1] in ACTIVE:
            states[parts[0]] = (parts[1], parts[2])
    return states


def settled_queue(job_ids: list[str], timeout_s: float = 120.0, poll_s: float = 1.0) -> dict[str, tuple[str, str]]:
    """``queue`` once no job in it is COMPLETING (or ``timeout_s`` has passed). A job
    cancelled a moment ago stays in the queue while its steps end: a launch that counted
    it as live would follow it out and submit nothing, and one that did not would start
    trainers beside the ending ones. A requeued job leaves COMPLETING for PENDING, and is
    followed as before."""
    deadline = time.time() + timeout_s
    q = queue(job_ids)
    while any(state == "COMPLETING" for state, _ in q.values()) and time.time() < deadline:
        time.sleep(poll_s)
        q = queue(job_ids)
    return q


@dataclass(frozen=True)
class JobEnd:
    """How a job that left the queue ended, as sacct records it: its state (FAILED,
    CANCELLED by 0, ...; UNKNOWN when Slurm does not say), its exit code ("74:0" -> 74;
    None when Slurm does not say, or a signal ended it) and the signal that killed a task
    of its steps (DerivedExitCode "0:9" -> 9: the OOM killer's, say), or whether a DDP rank
    of its steps lost a peer that a signal killed (``peer_lost``: that rank's exit,
    :data:`~fastbgm.train.PEER_LOST_EXIT`, is the step's code, the highest of its tasks',
    and hides the signal). Prints as its state, and that signal."""
    state: str
    exit_code: int | None = None
    killed_by: int | None = None
    peer_lost: bool = False

    def __str__(self) -> str:
        if self.killed_by:
            return f"{self.state} (a task killed by {signal_name(self.killed_by) or f'signal {self.killed_by}'})"
        if self.peer_lost:
            return f"{self.state} (a rank lost its peer: killed by a signal, or its node lost)"
        return self.state

    @property
    def killed(self) -> bool:
        """Whether a signal ended it (the kernel's or Slurm's OOM killer, a segfault, a kill
        from outside), not its own code, a cancel or a time limit."""
        return self.state == "OUT_OF_MEMORY" or (self.state == "FAILED" and (self.killed_by is not None
                                                                             or self.peer_lost))


# states sacct may still give a job that has just left the queue: the accounting database
# learns of its end a moment after squeue does
_NOT_ENDED = ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "REQUEUED", "RESIZING", "SIGNALING",
              "STAGE_OUT", "STOPPED")


def job_end(job_id: str, settle_s: float = 15.0) -> JobEnd:
    """How a job that left the queue ended. While sacct still says it runs (for up to
    ``settle_s``), ask again."""
    deadline = time.monotonic() + settle_s
    while True:
        end = _job_end_now(job_id)
        if end.state not in _NOT_ENDED or time.monotonic() >= deadline:
            return end
        time.sleep(0.5)


def _job_end_now(job_id: str) -> JobEnd:
    for jid in dict.fromkeys([job_id, job_id.split("_")[0]]):  # an array cancelled before it started
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State,ExitCode,DerivedExitCode", "-j", jid],
                             capture_output=True, text=True, timeout=60)  # is one record, under the array's id
        rows = [x.split("|") for x in out.stdout.splitlines() if x.strip()]
        if rows and rows[-1][0].strip():
            row = rows[-1] + ["", ""]
            code, derived = row[1].strip().split(":"), row[2].strip().split(":")
            killed = int(derived[1]) if len(derived) == 2 and derived[1].isdigit() and derived[1] != "0" else None
            state = row[0].split()[0]
            lost = False
            if killed is None and state == "FAILED":
                killed, lost = step_kill(jid)
            return JobEnd(state, int(code[0]) if len(code) == 2 and code[1] == "0" and code[0].isdigit() else None,
                          killed, lost)
    return JobEnd("UNKNOWN")


def step_kill(job_id: str) -> tuple[int | None, bool]:
    """How a signal ended one of the job's steps, from their ExitCodes in sacct: the signal
    that ended a task ("0:9" -> 9), if one did, and whether a DDP rank exited as having lost
    a peer that gave no reason ("76:0": :data:`~fastbgm.train.PEER_LOST_EXIT`).

    The job's own DerivedExitCode gives the signal too, but not always: on the local
    cluster a per-run job whose trainer was SIGKILLed was left "0:0" there in 2 of 8 kills,
    its step "0:9". A lost peer shows only here: the step's code is the highest of its
    tasks' statuses, and the surviving rank's 76 hides its killed peer's signal (the local
    cluster, 2026-12-02, rank 1 SIGKILLed and Slurm's KillWait longer than rank 0's wait
    for a reason)."""
    out = subprocess.run(["sacct", "-n", "-P", "-o", "JobID,ExitCode", "-j", job_id], capture_output=True, text=True,
                         timeout=60).stdout
    exits = []
    for line in out.splitlines():
        step, _, code = line.strip().partition("|")
        number, _, sig = code.partition(":")
        if "." in step and step.rsplit(".", 1)[1].isdigit() and number.isdigit() and sig.isdigit():
            exits.append((int(number), int(sig)))
    return next((sig for _, sig in exits if sig), None), any(number == PEER_LOST_EXIT for number, _ in exits)


def max_array_size() -> int:
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    for line in out.splitlines():
        if line.split("=")[0].strip() == "MaxArraySize":
            return max(1, int(line.split("=")[1].strip()))
    return 1001


def job_fields(job: str) -> dict[str, str]:
    """``scontrol show job JOB`` as {field: value} (JobState, NumNodes, ...; empty when Slurm
    no longer knows it)."""
    info = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=60).stdout
    return dict(x.split("=", 1) for x in info.split() if "=" in x)


def lost_driver_node(job: str) -> str:
    """The node a finished allocation lost its batch script with (the driver's node, which
    Slurm took from the job when it failed), or "" when it did not."""
    from ..slurmenv import slurm_hostnames

    out = subprocess.run(["sacct", "-n", "-D", "-P", "-o", "JobID,NodeList", "-j", job], capture_output=True,
                         text=True, timeout=60).stdout.splitlines()
    rows = [line.split("|") for line in out if line.count("|") == 1]
    batch = [nodes for jid, nodes in rows if jid == f"{job}.batch"]
    last = [nodes for jid, nodes in rows if jid == job]
    if not batch or not last or batch[-1] in ("", "None assigned"):
        return ""
    return batch[-1] if batch[-1] not in slurm_hostnames(last[-1]) else ""


def queue_summary(q: dict[str, tuple[str, str]]) -> str:
    """What the followed jobs wait for, for the live table's title: pending jobs counted
    by Slurm's reason (a requeued allocation waiting for a node that went down reads
    "1 job pending (Nodes required for job are DOWN, DRAINED or ...)")."""
    from collections import Counter

    pending = Counter(reason for state, reason in q.values() if state == "PENDING")
    return ", ".join(f"{n} job{'s' if n > 1 else ''} pending ({reason})" for reason, n in pending.most_common(3))


# Pending reasons that no amount of waiting resolves.
NEVER = ("DependencyNeverSatisfied", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints", "InvalidQOS",
         "InvalidAccount", "PartitionConfig")


# Pending reasons that say a node the job needs is down or drained (not merely busy).
NODES_OUT = ("ReqNodeNotAvail", "Nodes required for job are DOWN")
