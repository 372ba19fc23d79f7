"""Which runs start when: the one scheduling loop behind the local executor and the
Slurm allocation driver.

A run is ready when every run it depends on is done; it starts as soon as its ranks
fit in the free slots (a slot is a GPU, or a CPU task); a finished run frees its slots;
a failed or cancelled run cancels its dependents, with the reason. The run folders are
the only truth about a run: a scheduler started again (a re-launch, a requeued
allocation) rebuilds everything from them. How a run is started (a local process, a
Slurm job step) is the caller's ``start`` function; which ready runs share a slot is
placement.py's rule, and a trainer process's command, log lines, hangs and kills are
trainproc.py's.
"""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path
from typing import Callable, Collection, Generic, Sequence, TypeVar

from ..experiment import run_status
from ..fileio import NO_SPACE_WORDS, atomic_write_json, lock_holder
from ..train import NO_SPACE_EXIT, PEER_LOST_EXIT, STOP_EXIT
from ..trainer import checkpoint as C
from ..trainer import inbox as I
from .placement import StepRun, new_packs, partners_for, runs_alone
from .trainproc import (MAX_KILLS, MAX_STALLS, STALL_CHECK_S, StallWatch, hung_reason, kill_tree, last_error,
                        log_error, mark_cancelled, signal_name, start_line)

log = logging.getLogger(__name__)

S = TypeVar("S")


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
        """``r``'s process was killed by a signal (or a peer rank of it was, ``returncode``
        :data:`PEER_LOST_EXIT`): it starts again from its last checkpoint, or, killed
        :data:`MAX_KILLS` times in this launch, is left to the next one. Its train.log says
        so (what the launch's progress lines and closing report show)."""
        n = self.kills[r.key] = self.kills.get(r.key, 0) + 1
        if returncode == PEER_LOST_EXIT:
            killed = "a rank of it was lost, with no reason given (killed by a signal, or its node lost)"
        else:
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
        if returncode < 0 or returncode > 128 or returncode == PEER_LOST_EXIT:  # killed by a signal (SIGKILL,
            # the OOM killer; srun says 128 + the signal), or a DDP rank's peer was: interrupted, not failed
            return self._killed(r, returncode)
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
