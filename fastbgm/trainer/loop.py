"""The training loop: one run, or several runs packed into one process.

A GPU is mostly idle under one of the paper's batch-128 CIFAR runs, so runs can share
a device: each packed run keeps everything of its own (config, folder, seed, data
order, noise, optimizer, metrics, checkpoints, resume, failure). A run computes
exactly what it computes alone: the same operations on the same tensors in the same
order (bitwise on CPU; tested). One run is a pack of one.
Each run's live objects and its step are a :class:`runstate.RunState`; this module
decides which runs step when.

How the runs of a pack share the device (``pack_mode``, one of ``config.PACK_MODES``;
``auto`` and what is refused are decided by ``speed.resolve_pack_mode``):

- ``serial``: their steps in turn, on one stream. Always safe; no overlap on a GPU. The
  default on a GPU for runs with ``torch.compile``'s CUDA graphs.
- ``streams``: their steps in turn from one thread, each run on its own CUDA stream,
  so that their kernels overlap. Unsafe with CUDA graphs from ``torch.compile``
  (``compile_mode = "reduce-overhead"``): every graph one thread records shares one
  memory pool and may only be replayed one after another, so two runs' graphs
  replayed on two streams would overwrite each other's memory. Refused then. Safe
  with step graphs (``speed.step_graph``: stepgraph.py, the GPU default), each run's
  in a pool of its own; the default for a pack whose runs all use them (and the
  fastest exact mode measured on an H200: BENCHMARKS.md).
- ``threads``: each run's epochs in a thread of its own (the same one for the run's
  whole life) on its own stream. Not with CUDA graphs from ``torch.compile`` on a GPU:
  on an H200 with torch 2.11 (2026-11-30) two runs recording theirs from two threads
  met in one memory pool ("beginAllocateToPool: already recording to mempool_id"), the
  runs failed and every later capture in the process failed the same way; refused then.
  Safe with step graphs (each capture takes a process-wide lock) and with uncompiled or
  ``compile_mode = default`` runs: the default on a GPU for those. Compiled runs need
  torch >= 2.5 for it (``speed.THREADED_COMPILE_FROM``); on 2.4 the default is ``streams``
  and ``threads`` is refused.

- ``fused`` (CPU only for now: refused on a GPU, where the first measurement found it
  slower than one run, its runs not shown to end where they end alone): runs of one
  architecture, batch shape and speed switches trained as one network (HFTA; fused.py):
  their parameters stacked, the step ``torch.func.vmap``-ed over the runs, so each
  kernel does K runs' work (and on a GPU the whole fused step is one CUDA graph). Other
  kernels than alone (a grouped convolution's): equal to the run alone to float
  tolerance, not bitwise. A run that fits no group steps in turn.

On a CPU the default is ``serial`` (its cores are already shared by every op).

Read :func:`train_runs` top to bottom: set up each run; then, epoch after epoch, step
every active run through its batches, end each run's epoch (evaluate, checkpoint,
stop?); a run that stops or fails leaves the pack, the others go on.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import traceback
from typing import Any, Callable, Iterator

import torch

from .. import distributed as D
from ..config import ConfigError
from ..fileio import exclusive_folder, no_space
from . import checkpoint as C
from .fused import FusedRuns, fused_epoch, fusion_key
from .runstate import RunState
from .speed import on_stream, resolve_pack_mode, resolve_speed
from .stepgraph import StepGraphs
from .stops import NonFiniteLoss, forget_stop_request, run_failure, stop_requested
from .trainer import Trainer

log = logging.getLogger("fastbgm.trainer")


HEARTBEAT_S = 2.0  # how often a training process touches its runs' heartbeat (at most)


class Heartbeat:
    """This process's sign to its scheduler that it makes progress (checkpoint.beat): the
    steps, set-ups and epoch ends of its runs touch their heartbeat, at most every
    :data:`HEARTBEAT_S` seconds. A scheduler that sees none for its stall timeout takes
    the process as hung (a deadlock, a stopped process, a collective that never returns)
    and starts its runs again. Rank 0 only: a hung peer stops rank 0's steps too."""

    def __init__(self, on: bool) -> None:
        self.on = on
        self.last = 0.0

    def __call__(self, run_dirs: list[str], force: bool = False) -> None:
        now = time.monotonic()
        if self.on and (force or now - self.last >= HEARTBEAT_S):
            self.last = now
            C.beat(run_dirs)


# autograd on whatever mode the caller is in (a no_grad block; or a signal that raised
# between a no_grad's enter and its with, in a process that trains again); the caller's
# mode comes back after
@torch.enable_grad()
def train_runs(trainers: list[Trainer], pack_mode: str = "auto",
               more: Callable[[bool], list[Trainer]] | None = None) -> list[dict[str, Any]]:
    """Train ``trainers``' runs side by side in this process; their results, in order.

    A run already done returns its result; a run whose loss goes non-finite, or that
    raises, is recorded failed and leaves the pack while the others go on (alone, an
    unexpected error is raised after it is recorded). ``pack_mode``: how the runs
    share the device (``config.PACK_MODES``). ``more(last)``: runs that join the pack
    between two epochs (a scheduler's offers, inbox.py); ``last`` is True once nothing
    is left to train: none may come after a ``more(True)`` that gives none. Their results follow, in order."""
    forget_stop_request()
    env = D.setup(trainers[0].cfg.speed.device)
    try:
        mode = resolve_pack_mode(pack_mode, env.device, [resolve_speed(t.cfg, env.device, env.world) for t in trainers])
    except ConfigError:
        D.teardown(abort=False)
        raise
    alone = len(trainers) == 1 and more is None
    trainers = list(trainers)
    results: list[dict[str, Any] | None] = [None] * len(trainers)
    aborting = True
    try:
        with contextlib.ExitStack() as held:
            active: dict[int, RunState] = {}
            fusions: dict[tuple[int, ...], FusedRuns] | None = {} if mode == "fused" and not alone else None
            held.callback(lambda: [s.close() for s in active.values()])  # their threads, however this ends
            heartbeat = Heartbeat(env.is_main)

            def open_run(i: int, t: Trainer) -> None:
                """Set one run up: identity check, finished?, folder lock, build + resume."""
                t.env = env
                t.pack = [str(x.run_dir) for x in trainers]
                locked = False
                try:
                    speed = t.check(env)
                    done = t.finished_result()
                    if done is not None:
                        log.info("%s is already done; nothing to do", t.run_dir)
                        results[i] = done
                        return
                    resolve_pack_mode(mode, env.device, [speed])  # a run that joins: fits the pack's mode?
                    # one trainer per run folder, for its whole life (rank 0 holds the lock)
                    if env.is_main:
                        held.enter_context(exclusive_folder(t.run_dir, "run folder"))
                        locked = True
                        stale = C.remove_stale_temp(t.run_dir)
                        if stale:
                            log.info("%s: removed %d half-written file(s) of a killed process", t.run_dir,
                                     len(stale))
                    s = t.open(env, speed)
                except Exception as e:  # alone: the caller says it; packed: this run only
                    if (alone and not run_failure(e)) or no_space(e):  # (a full disk: every run's)
                        raise
                    traceback.clear_frames(e.__traceback__)
                    results[i] = t.fail(None, e, record=locked)  # in its folder only once that is ours
                    _release_memory(env)
                    return
                if not alone and env.device.type == "cuda" and mode in ("streams", "threads"):
                    s.stream = torch.cuda.Stream(env.device)
                if s.speed.step_graph:
                    s.graphs = StepGraphs(s)
                if s.epoch >= s.end_epoch:  # killed after its last checkpoint, before its result
                    results[i] = t._finish(s.module, env, speed)
                else:
                    active[i] = s
                    heartbeat([str(t.run_dir)], force=True)  # (a pack's set-ups may take long together)

            def leave(i: int) -> None:
                active.pop(i).close()
                for ix in [ix for ix in fusions or {} if i in ix]:  # its fused group's state too
                    del fusions[ix]

            def end_epoch(i: int, failure: BaseException | None, seconds: float) -> None:
                """Run i's epoch ends (its numbers, evaluation, checkpoint, stop rule); a run
                that stops or fails leaves the pack, and nothing of it stays held (a long-lived
                pack would keep its memory)."""
                s, t = active[i], trainers[i]
                try:
                    if failure is not None:
                        raise failure
                    loss, acc, n = s.epoch_means()
                    if t.end_epoch(s, loss, acc, n, seconds):
                        results[i] = t._finish(s.module, env, s.speed)
                        leave(i)
                except Exception as e:  # this run fails; alone, an unexpected error is raised on
                    if stop_requested() or no_space(e):  # a full disk fails no run: the pack
                        raise  # stops, and every run resumes from its last checkpoint once space is freed
                    traceback.clear_frames(e.__traceback__)
                    results[i] = t.fail(s, e)
                    leave(i)
                    _release_memory(env)
                    if alone and not run_failure(e) and "failed_rank" not in results[i]:
                        raise

            def join(last: bool) -> None:
                """Runs a scheduler gave this pack meanwhile (none when it has no ``more``)."""
                for t in more(last) if more is not None else []:
                    trainers.append(t)
                    results.append(None)
                    log.info("%s joins the pack", t.run_dir)
                    open_run(len(trainers) - 1, t)

            for i, t in enumerate(trainers):
                open_run(i, t)
            join(not active)
            # ---- epoch after epoch, every active run through its own batches, in turn
            while active:
                t0 = time.perf_counter()
                dirs = [str(trainers[i].run_dir) for i in active]
                with trainers[next(iter(active))]._progress(
                        f"epoch {min(s.epoch for s in active.values()) + 1}",
                        sum(len(s.train) for s in active.values()), env) as show:
                    def advance(n: int) -> None:
                        show(n)
                        heartbeat(dirs)
                    failed = train_epoch_together(active, advance, threads=mode == "threads" and not alone,
                                                  fusions=fusions)
                seconds = time.perf_counter() - t0
                for i in list(active):
                    heartbeat([str(trainers[i].run_dir)], force=True)  # (evaluations and checkpoints take long)
                    end_epoch(i, failed.get(i), seconds)
                del failed
                join(not active)
    except Exception as e:
        if stop_requested():
            log.warning("stopped while being requeued (%s: %s); last.pt is kept and the run(s) resume from it",
                        type(e).__name__, e)
        raise
    else:  # a rank that failed leaves its peers inside a collective: do not wait for them
        aborting = any(r is not None and r.get("status") == "failed" for r in results)
    finally:
        D.teardown(abort=aborting)
    return [r if r is not None else {"status": "failed", "reason": "did not run"} for r in results]


def _release_memory(env: D.DistEnv) -> None:
    """Give a failed run's memory back to the runs still training (a pack on one GPU)."""
    if env.device.type == "cuda":
        torch.cuda.empty_cache()


def train_epoch_together(active: dict[int, RunState], advance: Any = lambda n: None, threads: bool = False,
                         fusions: dict[tuple[int, ...], FusedRuns] | None = None) -> dict[int, BaseException]:
    """One epoch of every run in ``active``: their steps taken in turn from this thread,
    or (``threads``) each run's epoch in a thread of its own; each run on its stream
    when it has one; or (``fusions``, pack mode fused: the groups fused so far, kept
    across epochs) fused. Returns the runs that raised, with what they raised."""
    dev = next(iter(active.values())).env.device if active else None
    for s in active.values():  # what the default stream did for a run (set-up, resume,
        if s.stream is not None:  # evaluation) comes before its steps
            s.stream.wait_stream(torch.cuda.current_stream(dev))
    if fusions is not None:
        failed = _epoch_fused(active, advance, fusions)
    elif threads:  # (even when one run is left: its CUDA graphs belong to its thread)
        failed = _epoch_in_threads(active, advance)
    else:
        failed = _epoch_in_turn(active, advance)
    if dev is not None and dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return failed


def _epoch_in_turn(active: dict[int, RunState], advance: Any) -> dict[int, BaseException]:
    steps: dict[int, Iterator] = {}
    failed: dict[int, BaseException] = {}
    for i, s in active.items():
        with on_stream(s.stream):
            steps[i] = s.begin_epoch()
    while steps:
        for i in list(steps):
            s = active[i]
            try:
                with on_stream(s.stream):
                    nxt = next(steps[i], None)
                    if nxt is None:
                        del steps[i]
                        continue
                    step, (x, y, _) = nxt
                    s.step(step, x, y)
            except Exception as e:  # this run fails; the others go on
                if stop_requested():
                    raise
                traceback.clear_frames(e.__traceback__)  # its step's tensors: memory the others can use
                failed[i] = e
                del steps[i]
            advance(1)
    return failed


def _epoch_in_threads(active: dict[int, RunState], advance: Any) -> dict[int, BaseException]:
    halt = threading.Event()  # this thread was stopped (a signal): each run ends its step and returns

    def epoch(s: RunState) -> None:
        with on_stream(s.stream):
            for step, (x, y, _) in s.begin_epoch():
                if halt.is_set():
                    return
                s.step(step, x, y)
                advance(1)

    failed: dict[int, BaseException] = {}
    futures = {i: s.thread().submit(epoch, s) for i, s in active.items()}
    try:
        for i, f in futures.items():
            e = f.exception()  # waits; a signal handler's exception is raised here
            if e is None:
                continue
            if stop_requested() or not isinstance(e, Exception):
                raise e
            traceback.clear_frames(e.__traceback__)
            failed[i] = e
    except BaseException:
        halt.set()  # then wait only for the steps under way
        for f in futures.values():
            with contextlib.suppress(BaseException):
                f.exception()
        raise
    return failed


def _epoch_fused(active: dict[int, RunState], advance: Any,
                 fusions: dict[tuple[int, ...], FusedRuns]) -> dict[int, BaseException]:
    """Each group of runs that can be fused (fused.fusion_key) through one epoch as one
    network; any other run steps in turn. A group's fused state lives while its members
    do (a run that leaves or joins makes a new group); between epochs every run's own
    module and optimizer hold its state, for evaluation and checkpoints."""
    groups: dict[Any, list[int]] = {}
    for i, s in active.items():
        key = fusion_key(s)
        groups.setdefault(key if key is not None else ("alone", i), []).append(i)
    fused = [tuple(ix) for ix in groups.values() if len(ix) > 1]
    for ix in [ix for ix in fusions if ix not in fused]:
        del fusions[ix]
    failed = _epoch_in_turn({ix[0]: active[ix[0]] for ix in groups.values() if len(ix) == 1}, advance)
    for ix in fused:
        try:
            f = fusions.get(ix)
            if f is None:
                f = fusions[ix] = FusedRuns([active[i] for i in ix])
                log.info("%d runs train as one network: %s", len(ix), ", ".join(
                    active[i].trainer.cfg.name if active[i].trainer is not None else f"run {i}" for i in ix))
            else:
                f.load()
            for _ in fused_epoch(f):
                advance(len(ix))
            f.write_back()
        except Exception as e:  # the fused step itself failed (say, out of memory): its runs fail
            if stop_requested():
                raise
            traceback.clear_frames(e.__traceback__)
            fusions.pop(ix, None)
            failed.update({i: e for i in ix})
            continue
        for i in ix:  # a non-finite loss fails its own run only
            try:
                active[i].check_finite()
            except NonFiniteLoss as e:
                failed[i] = e
    return failed
