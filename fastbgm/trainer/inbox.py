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
- ``close``: a pack with nothing left to train renames the inbox folder to
  ``<inbox>.closed`` (no offer can then land) and claims what had landed before that.
- ``unclaimed``: after the pack's process ends, the offers it never claimed (it crashed,
  or was stopped first); their runs go back to the scheduler's queue.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

INBOX = "pack-inbox"  # in the folder of a pack's first run
CLOSED = INBOX + ".closed"


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
