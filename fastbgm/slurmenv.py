"""What Slurm says about a job's nodes, without torch: the launchers ask it as the
trainers' ranks do (:mod:`fastbgm.distributed`)."""

from __future__ import annotations

import subprocess


def slurm_hostnames(nodelist: str) -> list[str]:
    """A Slurm node list (``node[1-2]``) as names; none when Slurm cannot say."""
    if not nodelist:
        return []
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    return out.stdout.split() if out.returncode == 0 else []
