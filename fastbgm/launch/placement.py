"""Placement: which ready runs start together on which free slots (a slot is a GPU, or a
CPU task). One set of rules, used by the scheduler behind the local executor and the
Slurm allocation driver, and played out by the launcher's estimate; nothing of Slurm or
of processes in it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection, Sequence


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
    pack_mode: str = "auto"  # how a pack shares its device (fastbgm.trainer.config.PACK_MODES)

    @property
    def nodes(self) -> int:
        return -(-self.ranks // self.ranks_per_node)


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
