"""A running pack's inbox: how a scheduler gives a pack more runs while it trains.

A pack's runs do not end together (a stage-1 run stops once it has memorised its
labels; a stage-2 run becomes ready only when its stage 1 is done), so a pack started
with K runs soon trains fewer, and one started with the only ready run trains it alone
on a whole GPU. Its process keeps the GPU either way (a Slurm job step holds it), so
rather than idle, it takes new runs: the scheduler *offers* a ready run by writing a
file into the pack's inbox, and the pack *claims* it between two epochs and trains it
beside the others, as exactly as if it had started with it.

A folder on the shared file system, and renames, which are atomic:

- ``offer``: ``<inbox>/<key>.offer`` (written beside, then renamed in): refused once the
  inbox is closed or gone.
- ``claim``: the pack renames each offer to ``<key>.taken``; the run is then its own.
- ``last_call``: a pack with nothing left to train *asks* (``<inbox>/more.ask``) and
  waits for the scheduler's next look, which offers what is ready for it and answers by
  removing the ask. Without it the pack's process would end in the same moment as its
  runs, the scheduler would see their dependents become ready only after that, and
  start a new process for them (a fresh start, a fresh compile) on the slot just left.
- ``close``: a pack that was offered nothing renames the inbox folder to
  ``<inbox>.closed`` (no offer can then land) and claims what had landed before that.
- ``unclaimed``: after the pack's process ends, the offers it never claimed (it crashed,
  or was stopped first); their runs go back to the scheduler's queue.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

INBOX = "pack-inbox"  # in the folder of a pack's first run
CLOSED = INBOX + ".closed"
ASK = "more.ask"  # a pack with nothing left to train asks for more; the scheduler answers by removing it
ANSWER_WAIT_S = 20.0  # no answer by then: no scheduler is looking (a pack started by hand)


def inbox_for(first_run_dir: str | os.PathLike) -> Path:
    return Path(first_run_dir) / INBOX


def remove(inbox: Path) -> None:
    """The inbox gone, open or closed."""
    for d in (inbox, inbox.with_name(CLOSED)):
        shutil.rmtree(d, ignore_errors=True)


def open_inbox(inbox: Path) -> None:
    """A fresh, empty inbox (an earlier pack's, open or closed, is removed)."""
    remove(inbox)
    inbox.mkdir(parents=True)


def _file(key: str) -> str:
    return key.replace("/", "~")  # a run's key is its path under the experiment


def offer(inbox: Path, key: str, run_dir: str | os.PathLike) -> bool:
    """Offer ``run_dir`` to the pack; False when its inbox is closed (the pack is ending)."""
    tmp = inbox / f".{_file(key)}.offer.tmp"
    try:
        with open(tmp, "w") as f:  # fails once the folder was renamed away
            json.dump({"key": key, "run_dir": str(run_dir)}, f)
        os.replace(tmp, inbox / f"{_file(key)}.offer")
    except FileNotFoundError:
        return False
    finally:
        tmp.unlink(missing_ok=True)  # (a write that failed half-way: a full disk)
    return True


def claim(inbox: Path) -> list[Path]:
    """Take every offer in ``inbox``: the run folders, in the order they were offered."""
    taken = []
    try:
        offers = sorted(inbox.glob("*.offer"), key=lambda p: p.stat().st_mtime_ns)
    except FileNotFoundError:
        return []
    for p in offers:
        try:
            run_dir = Path(json.loads(p.read_text())["run_dir"])
            os.replace(p, p.with_suffix(".taken"))
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            continue
        taken.append(run_dir)
    return taken


def ask(inbox: Path) -> bool:
    """The pack has nothing left to train; False when its inbox is gone."""
    tmp = inbox / f".{ASK}.tmp"
    try:
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, inbox / ASK)
    except FileNotFoundError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def asking(inbox: Path) -> bool:
    return (inbox / ASK).exists()


def answer(inbox: Path) -> None:
    """The scheduler has looked: it offered what it had for this pack (maybe nothing)."""
    (inbox / ASK).unlink(missing_ok=True)


def last_call(inbox: Path, wait_s: float = ANSWER_WAIT_S, poll_s: float = 0.05) -> list[Path]:
    """For a pack with nothing left to train: ask for more and wait for the answer (at
    most ``wait_s``); the runs offered meanwhile (the inbox stays open), or, when there
    were none, the inbox closed and what landed before that."""
    if ask(inbox):
        deadline = time.monotonic() + wait_s
        while asking(inbox) and time.monotonic() < deadline:
            time.sleep(poll_s)
        answer(inbox)  # (unanswered: withdrawn)
        taken = claim(inbox)
        if taken:
            return taken
    return close(inbox)


def close(inbox: Path) -> list[Path]:
    """No more offers: the run folders offered before the inbox closed (claimed now)."""
    closed = inbox.with_name(CLOSED)  # (open_inbox removed any earlier one)
    try:
        os.replace(inbox, closed)
    except FileNotFoundError:
        return []
    return claim(closed)


def unclaimed(inbox: Path) -> list[str]:
    """The keys of offers no process claimed (in the inbox, open or closed)."""
    keys = []
    for d in (inbox, inbox.with_name(CLOSED)):
        for p in d.glob("*.offer") if d.is_dir() else []:
            try:
                keys.append(json.loads(p.read_text())["key"])
            except (OSError, json.JSONDecodeError, KeyError):
                continue
    return keys
