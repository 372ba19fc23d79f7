"""Which runs start when: the one scheduling loop behind the local executor and the
Slurm allocation driver.

A run is ready when every run it depends on is done; it starts as soon as its ranks
fit in the free slots (a slot is a GPU, or a CPU task); a finished run frees its slots;
a failed or cancelled run cancels its dependents, with the reason. The run folders are
the only truth about a run: a scheduler started again (a re-launch, a requeued
allocation) rebuilds everything from them. How a run is started (a local process, a
Slurm job step) is the caller's ``start`` function.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Generic, Sequence, TypeVar

from ..experiment import run_status
from ..fileio import NO_SPACE_WORDS, atomic_write_json, lock_holder
from ..train import NO_SPACE_EXIT, STOP_EXIT
from ..trainer import checkpoint as C
from ..trainer import inbox as I

log = logging.getLogger(__name__)

S = TypeVar("S")

STALL_CHECK_S = 5.0  # how often the scheduler looks at its packs' heartbeats (with a stall timeout)
MAX_STALLS = 3  # a run whose process hangs this many times in one launch fails, and says so
# a run whose process is killed by a signal (the OOM killer, a segfault, a kill from outside)
# starts again from its last checkpoint in the same launch, up to this many times; then it
# is left, unfinished and not failed (a signal is not the run's own failure), to the next launch
MAX_KILLS = 3


@dataclass
class StepRun:
    """What scheduling needs of one run: where it lives, what it waits for, its size."""

    key: str
    run_dir: str
    depends_on: list[str] = field(default_factory=list)
    ranks: int = 1  # processes (one per GPU, or CPU tasks)
    ranks_per_node: int = 1
    # Runs of one group (a stage of one dataset and model) take about as long as each
    # other: a pack is filled from its first run's group first, so that its runs end
    # together and the slot does not idle with one straggler for most of its life.
    group: str = ""
    pack_mode: str = "auto"  # how a pack shares its device (fastbgm.trainer.loop.PACK_MODES)

    @property
    def nodes(self) -> int:
        return -(-self.ranks // self.ranks_per_node)


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


def runs_alone(waited_on: Collection[str], slots: int) -> frozenset[str]:
    """The runs that train on a slot of their own: the ready or training runs that others
    wait on (stage 1), while the slots outnumber them. Packed, such a run trains slower,
    and every run that waits for it starts later: on a large allocation that chain sets
    the experiment's wall-clock time. On a small one (as many such runs as slots, or
    more) they pack like any run, since slots given to one run each would leave most of
    the work waiting. Played out on the paper grid this is never slower than packing
    them, and up to a third faster on 4 to 32 GPUs (BENCHMARKS.md, session 11)."""
    return frozenset(waited_on) if slots > len(waited_on) else frozenset()


def partners_for(first: StepRun, ready: Sequence[StepRun], alone: Collection[str] = ()) -> list[StepRun]:
    """The one-rank runs of ``ready`` that may share a slot with ``first`` (none of
    ``alone``), its group first (runs of one group end about together: the slot does not
    idle with one straggler)."""
    return sorted((x for x in ready if x is not first and x.ranks == 1 and x.key not in alone),
                  key=lambda x: x.group != first.group)


def new_packs(ready: Sequence[StepRun], free: int, per_slot: int, alone: Collection[str] = ()) -> list[list[StepRun]]:
    """The packs that start now on ``free`` slots, from ``ready`` in plan order: a run of
    W ranks takes W slots; a run of ``alone`` (:func:`runs_alone`) one slot by itself; any
    other one-rank run starts a pack of up to ``per_slot`` one-rank runs
    (:func:`partners_for`), spread over the free slots first: a slot alone trains a run
    fastest, so K runs share one only when every slot is taken (5 ready runs on 3 free
    slots at K = 4: 2 + 2 + 1). The estimate plays the same rules out (estimate.py)."""
    left, packs = list(ready), []
    while left:
        r = next((x for x in left if x.ranks <= free), None)
        if r is None:
            break
        pack = [r]
        if r.ranks == 1 and r.key not in alone:
            partners = partners_for(r, left, alone)
            pack += partners[:min(per_slot, -(-(1 + len(partners)) // free)) - 1]
        free -= r.ranks
        for x in pack:
            left.remove(x)
        packs.append(pack)
    return packs


class Scheduler(Generic[S]):
    """Start ready runs on free slots; call :meth:`poll` until :attr:`finished`.

    With ``runs_per_slot`` K > 1, up to K ready one-rank runs start together on one slot
    as one process (``fastbgm.train --pack``), spread over the free slots first
    (:func:`new_packs`); and when a pack trains fewer than K runs
    (some ended, or too few were ready when it started) while ready runs wait for a slot,
    they are offered to it (``fastbgm.trainer.inbox``): it takes them between epochs.

    With ``stall_s`` > 0, a process whose runs' heartbeats (checkpoint.beat: every step,
    set-up and epoch end) have not moved for ``stall_s`` seconds is taken as hung (a
    deadlock, a stopped process, a collective that never returns) and ``kill``-ed; its
    unfinished runs then start again from their last checkpoint, and a run that hangs
    :data:`MAX_STALLS` times in this launch fails with the reason. A process killed by a
    signal likewise starts its unfinished runs again, up to :data:`MAX_KILLS` times a run
    (:meth:`_killed`)."""

    def __init__(self, runs: Sequence[StepRun], slots: Sequence[S],
                 start: Callable[[list[StepRun], list[S]], subprocess.Popen], runs_per_slot: int = 1,
                 interrupted: Callable[[list[StepRun]], bool] | None = None, stall_s: float = 0.0,
                 kill: Callable[[subprocess.Popen, list[StepRun]], None] = kill_tree):
        self.runs = list(runs)
        self.stall_s = stall_s
        self.kill = kill
        self.watch = StallWatch(stall_s)  # the running packs' heartbeats, by their first run's key
        self.stalled: set[str] = set()  # packs killed as hung (by their first run's key)
        self.stalls: dict[str, int] = {}  # times each run's process hung, in this launch
        self.kills: dict[str, int] = {}  # times each run's process was killed by a signal, in this launch
        self.left: dict[str, str] = {}  # runs left unfinished to the next launch, and why
        # runs whose folder another live process holds (a trainer left on a lost node,
        # another launch's): never started nor recorded failed while it does
        self.held: dict[str, StepRun] = {}
        self.watched = 0.0
        # whether a process that ended with its runs unsettled was stopped from outside
        # (its node was lost): its runs then start again here, from their last.pt
        self.interrupted = interrupted or (lambda pack: False)
        self.node_limit: int | None = None  # nodes a run may span, once the allocation lost some
        self.slot_debt = 0  # slots lost while in use: dropped as they come free
        self.free: list[S] = list(slots)
        self.start = start
        self.runs_per_slot = max(1, runs_per_slot)
        self.slots = len(slots)
        self.waited_on = {d for r in self.runs for d in r.depends_on}  # runs others wait on
        self.states = {r.key: run_status(Path(r.run_dir))[0] for r in self.runs}
        self.todo = [r for r in self.runs if self.states[r.key] not in ("done", "failed", "cancelled")]
        for r in self.runs:  # inboxes of an earlier launch's packs, stopped before it could remove them
            if lock_holder(r.run_dir) is None:
                I.remove(I.inbox_for(r.run_dir))
        self.running: dict[str, tuple[subprocess.Popen, list[StepRun], list[S]]] = {}  # by its first run's key
        self.stop_requested = False  # a trainer exited with STOP_EXIT: start nothing more
        self.no_space = False  # a trainer found no space to write its run folder: start nothing more
        too_big = [r.key for r in self.todo if r.ranks > len(self.free)]
        if too_big:
            raise ValueError(f"{len(too_big)} run(s) need more ranks than there are slots ({len(self.free)}): "
                             f"{', '.join(too_big[:3])}")

    @property
    def finished(self) -> bool:
        """Nothing runs, and nothing more can start here: the runs left (if any) wait for
        a folder another process holds, or for what only a later launch can give them."""
        waiting = [r for r in self.todo if not any(d in self.held for d in r.depends_on)]
        return not self.running and (not waiting or self.stop_requested or self.no_space or self.outgrown)

    @property
    def outgrown(self) -> bool:
        """Nothing runs, and the ready runs all need more than the slots (or nodes) left:
        only an allocation of the first size can train them."""
        ready = [r for r in self.todo if self._ready(r)]
        return not self.running and bool(ready) and not any(self._fits(r) for r in ready)

    def lose_slots(self, n: int, nodes_left: int) -> None:
        """The allocation lost a node (``n`` slots; ``nodes_left`` remain): start no run on
        them again, and none that spans more nodes than are left."""
        self.slots -= n
        self.node_limit = nodes_left
        dropped = min(n, len(self.free))
        self.free = self.free[:len(self.free) - dropped]
        self.slot_debt += n - dropped

    def poll(self) -> None:
        """Settle the runs that ended, cancel what can no longer run, start what is ready;
        then answer the packs that asked for more (inbox.last_call) before this look began,
        whose runs it has therefore seen end."""
        boxes = (self._inbox(pack) for _, pack, _ in self.running.values())
        asked = [box for box in boxes if box is not None and I.asking(box)]
        self._poll()
        for box in asked:
            I.answer(box)

    def _poll(self) -> None:
        self._check_held()
        watch = self.stall_s > 0 and time.monotonic() - self.watched >= STALL_CHECK_S
        if watch:
            self.watched = time.monotonic()
        for key, (proc, pack, slots) in list(self.running.items()):
            if proc.poll() is None:
                if watch:
                    self._watch(key, proc, pack)
                # a packed run that ended: its dependents need not wait for its pack, and its
                # place in the pack can be offered (_refill)
                for r in pack:
                    if self.runs_per_slot > 1 and self.states[r.key] == "running":
                        status = run_status(Path(r.run_dir))[0]
                        if status in ("done", "failed"):
                            self.states[r.key] = status
                            log.info("%s: %s (seen before its pack's process ends)", r.key, status)
                continue
            del self.running[key]
            self.watch.stop(key)
            stalled = key in self.stalled
            self.stalled.discard(key)
            repaid = min(self.slot_debt, len(slots))
            self.slot_debt -= repaid
            self.free.extend(slots[repaid:])
            box = I.inbox_for(pack[0].run_dir)
            never = set(I.unclaimed(box))
            I.remove(box)
            interrupted: bool | None = None  # (asked once for the pack, if a run of it is unsettled)
            for r in pack:
                if r.key in never:  # offered, but the pack ended first: it waits for a slot again
                    self._wait_again(r)
                    continue
                # (torchrun reports a rank's exit 74 as 1: its log says why)
                no_space = proc.returncode == NO_SPACE_EXIT or (
                    proc.returncode != 0 and any(w in last_error(r.run_dir) for w in NO_SPACE_WORDS))
                if ((proc.returncode == STOP_EXIT or no_space)
                        and run_status(Path(r.run_dir))[0] not in ("done", "failed")
                        and not C.rank_failures(r.run_dir)):  # not a rank's peers stopped after it failed
                    # resumable from last.pt; a full disk would stop every run started next, too
                    if no_space:
                        self.no_space = True
                    else:
                        self.stop_requested = True
                    self.states[r.key] = "running"
                    log.info("%s: %s; it resumes later", r.key, "no space left to write its run folder"
                             if no_space else "stopped on request")
                    continue
                unsettled = run_status(Path(r.run_dir))[0] not in ("done", "failed")
                if unsettled and stalled:
                    self._hung(r)
                    continue
                if unsettled and interrupted is None:
                    interrupted = self.interrupted(pack)
                if unsettled and interrupted:
                    self._wait_again(r)  # it resumes from its last.pt on the nodes left
                    log.info("%s: its node was lost (exit %s); it starts again from its last checkpoint",
                             r.key, proc.returncode)
                    continue
                self.states[r.key] = self._settle(r, proc.returncode)
                log.info("%s: %s (exit %s)", r.key, self.states[r.key], proc.returncode)
        self._cancel_blocked()
        if self.stop_requested or self.no_space:
            return
        ready = [r for r in self.todo if self._ready(r) and self._fits(r)]
        alone = runs_alone({r.key for r in ready if r.key in self.waited_on}
                           | {k for k in self.waited_on if self.states.get(k) == "running"}, self.slots)
        for pack in new_packs(ready, len(self.free), self.runs_per_slot, alone):
            pack = [x for x in pack if not self._held_elsewhere(x)]
            if not pack:
                continue
            r = pack[0]
            slots, self.free = self.free[:r.ranks], self.free[r.ranks:]
            for x in pack:
                ready.remove(x)
                self.todo.remove(x)
                self.states[x.key] = "running"
            box = self._inbox(pack)
            if box is not None:
                I.open_inbox(box)
            else:  # an earlier launch's
                I.remove(I.inbox_for(r.run_dir))
            self.running[r.key] = (self.start(pack, slots), pack, slots)
            self.watch.start(r.key, [x.run_dir for x in pack])
        self._refill([x for x in ready if x.ranks == 1 and x.key not in self.held], alone)
        if not self.running and self.todo and not any(self._ready(r) for r in self.todo):
            # waiting on something that will never finish (but for a held run: a later launch runs it)
            never = [r for r in self.todo if not any(d in self.held for d in r.depends_on)]
            for r in never:
                mark_cancelled(r.run_dir, r.key, self._why_never(r))
                self.states[r.key] = "cancelled"
            self.todo = [r for r in self.todo if r not in never]

    def stop_all(self, grace_s: float = 20.0) -> None:
        """SIGTERM every running run (each keeps its last.pt), SIGKILL what outlives ``grace_s``."""
        import time

        procs = [p for p, _, _ in self.running.values() if p.poll() is None]
        for p in procs:
            p.terminate()
        deadline = time.time() + grace_s
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    # ------------------------------------------------------------------ pieces
    def _inbox(self, pack: list[StepRun]) -> Path | None:
        """The inbox of a pack that can take more runs: one-rank runs, K > 1; else None."""
        return I.inbox_for(pack[0].run_dir) if pack[0].ranks == 1 and self.runs_per_slot > 1 else None

    def _refill(self, ready: list[StepRun], alone: Collection[str] = ()) -> None:
        """Offer ready one-rank runs that found no free slot to packs with room (not to a
        pack training a run of ``alone``, nor one of them to a pack)."""
        for proc, pack, _ in self.running.values():
            if not ready:
                return
            box = self._inbox(pack)
            if box is None or proc.poll() is not None:
                continue
            if any(r.key in alone and self.states[r.key] == "running" for r in pack):
                continue
            live = sum(self.states[r.key] == "running" for r in pack)  # (settled above, from the folders)
            for x in partners_for(pack[0], ready, alone)[:self.runs_per_slot - live]:
                if not I.offer(box, x.key, x.run_dir):
                    break  # the pack is ending
                pack.append(x)
                ready.remove(x)
                self.todo.remove(x)
                self.states[x.key] = "running"
                log.info("%s: offered to the pack of %s", x.key, pack[0].key)

    def _watch(self, key: str, proc: subprocess.Popen, pack: list[StepRun]) -> None:
        """Kill the pack's process if its heartbeats have not moved for the stall timeout."""
        quiet = self.watch.quiet(key, [r.run_dir for r in pack]) if key not in self.stalled else 0.0
        if not quiet:
            return
        self.stalled.add(key)
        log.warning("%s: no progress for %.0f s (stall timeout %g s): its process is taken as hung and killed; "
                    "its unfinished run(s) start again from their last checkpoint",
                    ", ".join(r.key for r in pack), quiet, self.stall_s)
        self.kill(proc, pack)

    def _hung(self, r: StepRun) -> None:
        """``r``'s process was killed as hung: it starts again, or fails at the last stall."""
        n = self.stalls[r.key] = self.stalls.get(r.key, 0) + 1
        if n < MAX_STALLS:
            self._wait_again(r)
            log.info("%s: starts again from its last checkpoint (hung %d time(s); it fails at %d)", r.key, n,
                     MAX_STALLS)
            return
        mark_cancelled(r.run_dir, r.key, hung_reason(self.stall_s, n, r.run_dir), status="failed")
        self.states[r.key] = "failed"
        log.info("%s: failed (hung %d times)", r.key, n)

    def _killed(self, r: StepRun, returncode: int) -> str:
        """``r``'s process was killed by a signal: it starts again from its last checkpoint,
        or, killed :data:`MAX_KILLS` times in this launch, is left to the next one. Its
        train.log says so (what the launch's progress lines and closing report show)."""
        n = self.kills[r.key] = self.kills.get(r.key, 0) + 1
        number = -returncode if returncode < 0 else returncode - 128
        name = signal_name(number)
        killed = f"its process was killed by signal {number}" + (f" ({name})" if name else "")
        if n < MAX_KILLS:
            self._wait_again(r)
            said = f"{killed}; it starts again from its last checkpoint ({n} of {MAX_KILLS} in this launch)"
        else:
            self.left[r.key] = f"{killed}, {n} times in this launch"
            said = (f"{killed}, {n} times in this launch; it is left unfinished: the same command resumes it from "
                    "its last checkpoint (if the kernel's OOM killer killed it, give it more memory or pack fewer "
                    "runs per slot)")
        log_error(r.run_dir, said)
        log.warning("%s: %s", r.key, said)  # (as a hang: the launch's own output says it)
        return "pending" if n < MAX_KILLS else "running"

    def _held_elsewhere(self, r: StepRun) -> bool:
        """Whether another live process holds ``r``'s folder; if so ``r`` waits, apart,
        until it is free (:meth:`_check_held`): a second trainer would fail on the lock,
        and a result written from here would be written into that process's folder."""
        holder = lock_holder(r.run_dir)
        if holder is None:
            return False
        if r in self.todo:
            self.todo.remove(r)
        self.held[r.key] = r
        self.states[r.key] = "pending"
        log_error(r.run_dir, f"its folder is in use by {holder}; it starts once that process ends (a trainer left on "
                  "a lost node ends with it; another launch's, with that launch)", before=start_line("not started"))
        log.warning("%s: its folder is in use by %s; it waits until that process ends", r.key, holder)
        return True

    def _check_held(self) -> None:
        """Held runs whose holder ended: settled if it finished them, else ready to start."""
        for key, r in list(self.held.items()):
            status = run_status(Path(r.run_dir))[0]
            if status in ("done", "failed", "cancelled"):
                self.states[key] = status
            elif lock_holder(r.run_dir) is None:
                self._wait_again(r)
                log.info("%s: its folder is free again; it waits for a slot", key)
            else:
                continue
            del self.held[key]

    def _why_never(self, r: StepRun) -> str:
        """Why ``r`` cannot start in this launch: the run it waits on was left unfinished."""
        dep = next((d for d in r.depends_on if self.states.get(d) != "done"), None)
        if dep is None:
            return "a dependency did not finish"
        why = f" ({self.left[dep]})" if dep in self.left else ""
        return f"its stage-1 run {dep} stopped unfinished{why}; the same command resumes it, then runs this one"

    def _wait_again(self, r: StepRun) -> None:
        """``r`` waits for a slot again, in its place in the plan."""
        self.states[r.key] = "pending"
        self.todo.append(r)
        self.todo.sort(key=self.runs.index)

    def _ready(self, r: StepRun) -> bool:
        return all(self.states.get(d) == "done" for d in r.depends_on)

    def _fits(self, r: StepRun) -> bool:
        """Whether the slots (and nodes) the allocation has now can ever hold ``r``."""
        return r.ranks <= self.slots and (self.node_limit is None or r.nodes <= self.node_limit)

    def _settle(self, r: StepRun, returncode: int) -> str:
        status = run_status(Path(r.run_dir))[0]
        if status in ("done", "failed"):
            return status
        failed_ranks = C.rank_failures(r.run_dir)
        if failed_ranks:  # a rank said why, and its peers were stopped before rank 0 wrote it down
            first = failed_ranks[0]
            atomic_write_json(Path(r.run_dir) / C.RESULT, {
                "name": r.key, "status": "failed", "failed_rank": first["rank"],
                "reason": C.rank_failure_reason(first)})
            return "failed"
        if self._held_elsewhere(r):  # (it failed on the lock: not its failure, nor ours to record)
            return "pending"
        if returncode < 0 or returncode > 128:  # killed by a signal (SIGKILL, the OOM killer; srun says
            return self._killed(r, returncode)  # 128 + the signal): interrupted, not failed
        # exited with an error before it recorded a result: the error it printed (an
        # unreadable dataset, a mistake in its config), or where to look when it said none
        said = last_error(r.run_dir).removeprefix("error: ")
        atomic_write_json(Path(r.run_dir) / C.RESULT, {
            "name": r.key, "status": "failed",
            "reason": f"{said} (exit {returncode})" if said else
            f"exited with code {returncode}; see {Path(r.run_dir) / C.TRAIN_LOG}"})
        return "failed"

    def _cancel_blocked(self) -> None:
        keep = []
        for r in self.todo:
            bad = next((d for d in r.depends_on if self.states.get(d) in ("failed", "cancelled")), None)
            if bad is None:
                keep.append(r)
                continue
            mark_cancelled(r.run_dir, r.key, f"its stage-1 run {bad} {self.states[bad]}")
            self.states[r.key] = "cancelled"
            log.info("%s: cancelled (its stage-1 run %s %s)", r.key, bad, self.states[bad])
        self.todo = keep
