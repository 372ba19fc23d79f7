"""What both executors share: deciding what to do with each run, the live table,
and the closing report."""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterable, Iterator

from ..config import to_dict
from ..experiment import Resources, RunSpec, run_status
from ..fileio import atomic_write_json, lock_holder, read_jsonl
from ..trainer import checkpoint as C
from ..trainer.config import identity_changes
from .placement import StepRun
from .trainproc import last_error, mark_cancelled


class LaunchError(RuntimeError):
    """A launch that cannot go ahead; the message says why and what to do."""


@dataclass
class Decision:
    run: RunSpec
    status: str  # on disk: pending | running | done | failed | cancelled
    action: str  # skip (done) | submit | resume | retry | keep-failed | blocked | queued
    reason: str = ""


def check_configs(runs: list[RunSpec]) -> None:
    """Refuse to launch when a run folder on disk holds a different run than the plan.

    Otherwise a finished run would be skipped and reported under a config it was not
    trained with (say, after lengthening stage 2 in the experiment file)."""
    clashes = []
    for r in runs:
        p = r.run_dir / C.CONFIG
        if not p.exists() or not C.has_training(r.run_dir):
            continue  # nothing trained under the old config
        try:
            old = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue  # a run that never wrote its config fully: the trainer rewrites it
        diff, _ = identity_changes(old, to_dict(r.config), planned=True)
        if diff:
            clashes.append(f"  {r.key}: {', '.join(diff[:6])}{' ...' if len(diff) > 6 else ''}")
    if clashes:
        raise LaunchError(
            f"{len(clashes)} run folder(s) hold runs made with a different config than this experiment file:\n"
            + "\n".join(clashes[:20]) + ("\n  ..." if len(clashes) > 20 else "")
            + "\nGive the experiment a new name (name = ...), or move those folders away to run them again."
        )


def check_pack_mode(runs: list[RunSpec], res: Resources, on_gpu: bool) -> None:
    """Refuse, before anything is submitted, a pack mode the trainer would refuse on the
    GPUs the runs will train on (fused; threads or streams with torch.compile's CUDA
    graphs): every pack would fail at its start otherwise. One-rank runs only (those are
    what ``runs_per_gpu`` packs); the trainer decides the rest (trainer/speed.py)."""
    if not on_gpu or res.runs_per_gpu == 1 or res.ranks_per_run > 1:
        return
    import torch

    from ..config import ConfigError
    from ..trainer.speed import resolve_pack_mode, resolve_speed

    gpu = torch.device("cuda")
    try:
        resolve_pack_mode(res.pack_mode, gpu, [resolve_speed(r.config, gpu, 1) for r in runs])
    except ConfigError as e:
        raise LaunchError(f"--pack-mode {res.pack_mode} (resources.pack_mode): {e}") from None


def decide(runs: list[RunSpec], retry_failed: bool, queued: set[str] = frozenset()) -> list[Decision]:
    """What to do with each run, in dependency order (stage 1 first)."""
    check_configs(runs)
    busy = [(r.key, h) for r in runs if r.key not in queued and (h := lock_holder(r.run_dir))]
    if busy:
        raise LaunchError(
            f"{len(busy)} run(s) are being trained right now by another process:\n"
            + "\n".join(f"  {k}: {h}" for k, h in busy[:10])
            + "\nStop that launch (or its trainers) first, or wait for it to end; two trainers on one run "
              "folder would mix their checkpoints."
        )
    out: list[Decision] = []
    by_key: dict[str, Decision] = {}
    for r in sorted(runs, key=lambda r: r.stage):
        status, res = run_status(r.run_dir)
        if status == "done":
            d = Decision(r, status, "skip")
        elif r.key in queued:
            d = Decision(r, status, "queued")
        elif status == "failed":
            d = Decision(r, status, "retry" if retry_failed else "keep-failed", res.get("reason", ""))
        else:
            d = Decision(r, status, "resume" if status == "running" else "submit", res.get("reason", ""))
        for dep in r.depends_on:
            parent = by_key.get(dep)
            if parent is not None and parent.action in ("keep-failed", "blocked") and d.action != "skip":
                d = Decision(r, status, "blocked", f"its stage-1 run {dep} failed")
        by_key[r.key] = d
        out.append(d)
    return out


def will_run(d: Decision) -> bool:
    return d.action in ("submit", "resume", "retry")


def missing_data(decisions: list[Decision], written_at_launch: Collection[str] = ()) -> list[str]:
    """The dataset files that runs about to run would read and that are not there (one
    line each, with how many runs read it): started, each run would fail on it. A .beton
    whose resident cache is there counts as there (the loader reads the cache alone)."""
    from ..data.cache import cache_path

    readers: dict[str, int] = {}
    for d in decisions:
        if will_run(d):
            for path in (d.run.config.data.train, d.run.config.data.test):
                there = Path(path).exists() or cache_path(path).exists()
                if path and path not in written_at_launch and not there:
                    readers[path] = readers.get(path, 0) + 1
    return [f"{path} (read by {n} run(s))" for path, n in readers.items()]


MISSING_DATA_ADVICE = ("write them with `python -m fastbgm.data prepare ...` (the README's 'Prepare datasets'), "
                       "or point the config's datasets.N.train / datasets.N.test at them (relative paths are from "
                       "the folder you launch in)")


def live_row(r: RunSpec, state: str) -> list[str]:
    rows = read_jsonl(r.run_dir / C.METRICS) if state in ("running", "done", "failed") else []
    last = rows[-1] if rows else {}
    test = next((x["test_acc"] for x in reversed(rows) if "test_acc" in x), None)
    return [r.key, state, str(last.get("epoch", "")), f"{last['train_acc']:.3f}" if "train_acc" in last else "",
            f"{test:.3f}" if test is not None else ""]


def table(runs: Iterable[RunSpec], states: dict[str, str], title: str) -> Any:
    from rich.table import Table

    t = Table(title=title)
    for c in ("run", "state", "epoch", "train acc", "test acc"):
        t.add_column(c)
    colors = {"done": "green", "failed": "red", "cancelled": "red", "running": "yellow"}
    for r in runs:
        row = live_row(r, states.get(r.key, "pending"))
        st = row[1]
        row[1] = f"[{colors.get(st, 'white')}]{st}[/]"
        t.add_row(*row)
    return t


HEARTBEAT_S = 300.0  # off a terminal, a line of counts when no run changed state for this long


class RunsView:
    """How a launch shows its runs while it follows them. On a terminal: rich's live
    table, redrawn in place. In a log file or a pipe (a launch under nohup or Slurm, tee,
    CI), where a redrawn table cannot show and rich prints only its last frame, the log
    would say nothing for hours: there each change of a run's state is one timestamped
    line, with a line of counts when nothing changed for :data:`HEARTBEAT_S`, and the
    last table at the end. ``show(states, note)`` after each poll; ``console`` prints
    between them."""

    def __init__(self, runs: Iterable[RunSpec], states: dict[str, str], title: str, console: Any) -> None:
        self.runs, self.console, self.title, self.note = list(runs), console, title, ""
        self.states = self._of_every_run(states)
        self.live: Any = None
        self.said_at = time.monotonic()
        self.polled_at = time.time()  # (wall clock, as result.json's "written")

    def _of_every_run(self, states: dict[str, str]) -> dict[str, str]:
        return {r.key: states.get(r.key, "pending") for r in self.runs}

    def table(self) -> Any:
        return table(self.runs, self.states, self.title + (f": {self.note}" if self.note else ""))

    def show(self, states: dict[str, str], note: str = "") -> None:
        """The runs' states now; ``note``: what their jobs wait for, on Slurm (after the
        table's title; off a terminal, in the line of counts)."""
        self.note = note
        if self.live is not None:
            self.states = self._of_every_run(states)
            self.live.update(self.table())
            return
        for r in self.runs:
            old, new = self.states[r.key], states.get(r.key, "pending")
            if new != old:
                self.states[r.key] = new
                self._say(f"{r.key}: {old} -> {new}{_what_it_did(r, old, new, self.polled_at)}")
        self.polled_at = time.time()
        if time.monotonic() - self.said_at > HEARTBEAT_S:
            self._say(self.counts())

    def counts(self) -> str:
        """E.g. "2 running, 3 pending, 10 done of 15 (KEY epoch 12; KEY epoch 3)"."""
        n = Counter(self.states.values())
        running = [r for r in self.runs if self.states[r.key] == "running"]
        epochs = [f"{r.key} epoch {live_row(r, 'running')[2] or 0}" for r in running[:4]]
        more = [f"+{len(running) - 4} more"] if len(running) > 4 else []
        return (", ".join(f"{n[s]} {s}" for s in ("running", "pending", "done", "failed", "cancelled") if n[s])
                + f" of {len(self.runs)}" + (f" ({'; '.join(epochs + more)})" if epochs else "")
                + (f"; {self.note}" if self.note else ""))

    def _say(self, line: str) -> None:
        self.console.print(f"{time.strftime('%H:%M:%S')} {line}", markup=False, highlight=False, soft_wrap=True)
        self.said_at = time.monotonic()


def _what_it_did(r: RunSpec, old: str, state: str, last_poll: float) -> str:
    """After a state change off a terminal (``last_poll``: when the states were read
    before): where a run starts or ended, or why it stopped."""
    if state == "running":
        epoch = started_from(r, last_poll)
        return f" (from epoch {epoch})" if epoch else ""
    if state == "pending" and old == "running":  # stopped, to resume: a kill, a hang, a lost node
        said = last_error(r.run_dir).split("; ")[0]
        return f" ({said})" if said else ""
    if state in ("failed", "cancelled"):
        reason = run_status(r.run_dir)[1].get("reason", "")
        return f": {reason}" if reason else ""
    if state == "done":
        _, _, epoch, train, test = live_row(r, state)
        return f" (epoch {epoch}, train acc {train or '-'}, test acc {test or '-'})"
    return ""


@contextlib.contextmanager
def runs_view(runs: Iterable[RunSpec], states: dict[str, str], title: str, console: Any,
              refresh_per_second: float) -> Iterator[RunsView]:
    """A :class:`RunsView` for as long as the launch follows its runs. Its last table
    ends its line on any console: rich ends it only on a terminal, and in a log the next
    line printed was glued to the table's bottom border."""
    view = RunsView(runs, states, title, console)
    if console.is_terminal:
        from rich.live import Live

        with Live(view.table(), console=console, refresh_per_second=refresh_per_second) as view.live:
            yield view
        return
    try:
        yield view
    finally:
        console.print(view.table())
        console.line()


def started_from(r: RunSpec, since: float) -> int:
    """The epoch a run that started running after ``since`` (a time.time()) started from:
    its trainer writes it in result.json as it starts; until then, the epochs its resume
    keeps. (Not its last row's epoch: by the time a launch sees it running it may have
    trained for seconds.)"""
    status, res = run_status(r.run_dir)
    if status == "running" and res.get("written", 0.0) >= since:
        return int(res.get("epoch", 0))
    return C.checkpointed_epochs(r.run_dir)


def closing_report(runs: list[RunSpec], console: Any, retry_cmd: str) -> bool:
    """Print what failed and why; True when every run is done."""
    bad = []
    for r in runs:
        status, res = run_status(r.run_dir)
        if status != "done":
            # a run stopped unfinished: its trainer's last error, without the advice after "; "
            why = res.get("reason", "") or (last_error(r.run_dir).split("; ")[0] if status == "running" else "")
            bad.append((r, status, why))
    if not bad:
        console.print(f"[green]all {len(runs)} runs done[/]")
        return True
    for r, status, reason in bad:
        console.print(f"[red]{status}[/] {r.key}" + (f": {reason}" if reason else ""))
    failed = any(status == "failed" for _, status, _ in bad)
    console.print(f"{len(bad)} of {len(runs)} runs not done. Re-launch to resume unfinished runs"
                  + (f"; to retry failed ones: {retry_cmd} --retry-failed" if failed else ""))
    return False


def step_run(r: RunSpec, res: Resources) -> StepRun:
    return StepRun(r.key, str(r.run_dir), list(r.depends_on), res.ranks_per_run, res.run_ranks_per_node,
                   group=f"stage{r.stage}/{r.dataset}/{r.model}", pack_mode=res.pack_mode)


def stage_runs(decisions: list[Decision]) -> None:
    """Put each decision on disk before any executor starts: the planned config of each
    run to run, a cleared result for each retry, the reason in each blocked run."""
    for d in decisions:
        r = d.run
        if d.action == "blocked":
            mark_cancelled(r.run_dir, r.key, d.reason)
        elif will_run(d):
            r.run_dir.mkdir(parents=True, exist_ok=True)
            if d.action == "retry" or d.status == "cancelled":  # to run again, it must not read as ended
                (r.run_dir / C.RESULT).unlink(missing_ok=True)
            atomic_write_json(r.run_dir / C.PLANNED, to_dict(r.config))


def read_json(p: Path) -> dict[str, Any]:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
