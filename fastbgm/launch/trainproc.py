"""A trainer process seen from outside, by whatever starts and watches it (the
scheduler, an allocation's driver, a per-run job's watch): the command that trains a
run or a pack, the lines it leaves in the runs' train.log and how the last error is
read back, how it is seen to hang (its runs' heartbeats) and how it is killed, and how
a run that will not finish is recorded."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

from ..fileio import atomic_write_json
from ..trainer import checkpoint as C
from ..trainer import inbox as I
from .placement import StepRun

STALL_CHECK_S = 5.0  # how often the scheduler looks at its packs' heartbeats (with a stall timeout)
MAX_STALLS = 3  # a run whose process hangs this many times in one launch fails, and says so
# a run whose process is killed by a signal (the OOM killer, a segfault, a kill from outside)
# starts again from its last checkpoint in the same launch, up to this many times; then it
# is left, unfinished and not failed (a signal is not the run's own failure), to the next launch
MAX_KILLS = 3


def train_command(pack: list[StepRun]) -> list[str]:
    """``-m fastbgm.train ...`` for one run or a pack, from the planned configs; with the
    pack's inbox when the scheduler opened one (it may then give the pack more runs)."""
    box = I.inbox_for(pack[0].run_dir)
    mode = [f"--pack-mode={pack[0].pack_mode}"] if pack[0].pack_mode != "auto" else []
    if box.is_dir():
        return ["-m", "fastbgm.train", "--pack", *(r.run_dir for r in pack), "--inbox", str(box), *mode]
    if len(pack) == 1:
        r = pack[0]
        return ["-m", "fastbgm.train", "--config", str(Path(r.run_dir) / C.PLANNED), "--run-dir", r.run_dir]
    return ["-m", "fastbgm.train", "--pack", *(r.run_dir for r in pack), *mode]


def start_line(what: str) -> str:
    """The line a run's train.log gets each time a process starts on it, or does not
    ("--- TIME: what"): last_error reads only what follows the last one, so that nothing
    an earlier process printed last reads as this one's."""
    import datetime

    return f"--- {datetime.datetime.now().isoformat(timespec='seconds')}: {what}\n"


def pack_log(pack: list[StepRun]) -> Any:
    """The log file a process writes to: its first run's train.log (the others say where)."""
    first = Path(pack[0].run_dir) / C.TRAIN_LOG
    for r in pack[1:]:
        with open(Path(r.run_dir) / C.TRAIN_LOG, "a") as f:
            f.write(f"packed with {', '.join(x.key for x in pack if x is not r)}: this process logs to {first}\n")
    log = open(first, "a")
    log.write(start_line(f"started {', '.join(x.key for x in pack)}"))
    log.flush()
    return log


def log_error(run_dir: str | Path, said: str, before: str = "") -> None:
    """Append "error: SAID" to a run's train.log from outside its trainer (a kill, a folder
    in use), for :func:`last_error` and the closing report; a folder it cannot write is
    passed over."""
    with contextlib.suppress(OSError), open(Path(run_dir) / C.TRAIN_LOG, "a") as f:
        f.write(f"{before}error: {said}\n")


def last_error(run_dir: str | Path) -> str:
    """The error line its last trainer process printed near its end ("error: ..."; a
    packed run's log points to its pack's): why a run that is neither done nor failed
    stopped, a full disk say. Empty when it ended without one (a kill)."""
    log = Path(run_dir) / C.TRAIN_LOG
    for _ in range(2):
        try:
            with open(log, "rb") as f:
                f.seek(max(0, f.seek(0, 2) - 8192))
                tail = f.read().decode(errors="replace").splitlines()[-10:]
        except OSError:
            return ""
        pointer = [x for x in tail if "this process logs to " in x]
        if tail and pointer and tail[-1] == pointer[-1]:  # packed, not first: its pack's log says
            log = Path(pointer[-1].rsplit("this process logs to ", 1)[1].strip())
            continue
        starts = [i for i, x in enumerate(tail) if x.startswith("--- ")]  # (start_line's)
        # (srun may add its own "srun: error: ..." lines after the trainer's)
        return next((x.strip() for x in reversed(tail[starts[-1] + 1 if starts else 0:])
                     if x.startswith("error: ")), "")
    return ""


class StallWatch:
    """When the heartbeats (checkpoint.beat) of what is watched last moved, by this
    process's own clock (a shared file system's clock may be skewed from it): what has
    stood still for ``stall_s`` seconds is hung. A key is one process, or one job, with
    the run folders whose heartbeats it touches."""

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self.seen: dict[str, tuple[float, float]] = {}  # key -> (newest heartbeat, when it was first seen)

    def start(self, key: str, run_dirs: Sequence[str | Path]) -> None:
        """Watch ``key`` from now (it just started, or was just found running)."""
        self.seen[key] = (max((C.last_beat(d) for d in run_dirs), default=0.0), time.monotonic())

    def stop(self, key: str) -> None:
        self.seen.pop(key, None)

    def quiet(self, key: str, run_dirs: Sequence[str | Path]) -> float:
        """Seconds ``key``'s heartbeats have stood still; 0 while under ``stall_s``."""
        if self.stall_s <= 0 or key not in self.seen:
            return 0.0
        newest = max((C.last_beat(d) for d in run_dirs), default=0.0)
        seen, since = self.seen[key]
        now = time.monotonic()
        if newest != seen:
            self.seen[key] = (newest, now)
            return 0.0
        return now - since if now - since >= self.stall_s else 0.0


def hung_reason(stall_s: float, times: int, run_dir: str | Path) -> str:
    """Why a run that hung :data:`MAX_STALLS` times failed, and the fix."""
    return (f"its process made no progress for {stall_s:g} s, {times} times (hung; the end of "
            f"{Path(run_dir) / C.TRAIN_LOG} says where it was); if its steps, set-up or evaluation really take "
            "that long, raise resources.stall_timeout_s (--stall-timeout)")


def kill_tree(proc: subprocess.Popen, pack: list[StepRun] | None = None) -> None:
    """SIGKILL ``proc`` and every process under it (torchrun's ranks), stopped ones too:
    a rank left alive would keep its run folder locked."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # (ended meanwhile)
        children.setdefault(ppid, []).append(int(stat.parent.name))
    pids = [proc.pid]
    for pid in pids:  # (grows as it goes: the whole tree, found before any of it dies)
        pids += children.get(pid, [])
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def signal_name(number: int) -> str | None:
    """SIGKILL for 9; None for a number that names no signal."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return None


def mark_cancelled(run_dir: str | Path, key: str, reason: str, status: str = "cancelled") -> None:
    """Record from outside a run that it will not finish (``status`` cancelled, or failed), and why."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(run_dir) / C.RESULT, {"name": key, "status": status, "reason": reason})
