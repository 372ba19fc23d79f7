"""What an experiment will cost on an allocation, before anything runs: GPU-hours and
wall-clock hours, from measured images/s per (model, batch) (``throughput.json``,
filled from ``python -m fastbgm.bench`` with the card it was measured on).

Each run processes ``epochs x training images`` (stage 1: x R copies; at most
``max_epochs``, so stage 1's early stop makes this an upper bound); a run that already
trained some epochs counts only those it has left, a finished one nothing. Wall-clock
time is the DAG played out on the allocation's slots by the scheduler's own placement
rules (placement.py), as the driver and the local executor place runs.

Evaluation counts too: a run evaluates its training set (stage 1: all R copies) every
``stop.train_eval_every`` epochs and its test set every ``stop.test_eval_every``, and both
at its last epoch. An evaluated image costs what the table's ``eval`` row of the model
says (the Trainer's evaluation, measured by the GPU check's ``eval`` section); without
one, a third of a trained image (a forward pass, of a step's three passes), and the
estimate says so.

Packing (``resources.runs_per_gpu`` K > 1): j <= K one-rank runs on one GPU each train
at ``images/s of j packed runs / j``, from the table's ``runs_per_gpu = j`` rows in the
experiment's pack mode as the trainer resolves it for the run's speed switches
(:func:`gpu_packing`; the GPU check writes them: ``throughput-rows.json``), linear
between measured counts. Without such a row for the model, packing is counted as gaining
nothing (the runs share one run's images/s) and the estimate says so.
"""

from __future__ import annotations

import json
from importlib import resources as ir
from typing import Any, Mapping, Sequence

from ..trainer.config import RunConfig
from ..experiment import ExperimentConfig, Resources, RunSpec
from .placement import new_packs, partners_for, runs_alone

# Training- and test-set sizes of the paper's datasets, for plans made before the data is prepared.
KNOWN_TRAIN_SIZES = {"cifar10": 50_000, "cinic10": 90_000}
KNOWN_TEST_SIZES = {"cifar10": 10_000, "cinic10": 90_000}
# what an evaluated image costs, in trained images, where no eval row was measured: its
# forward pass, of a training step's three passes (forward, and backward's two)
EVAL_COST_UNMEASURED = 1 / 3


def throughput_table() -> list[dict[str, Any]]:
    return json.loads(ir.files("fastbgm.launch").joinpath("throughput.json").read_text())["rows"]


def _split_size(beton: str, known: int | None) -> int | None:
    """Images in the split of ``beton``, from its manifest; ``known`` (the paper's size of
    that split) when it is not prepared yet."""
    from ..data.manifest import Manifest

    try:
        return Manifest.for_beton(beton).num_samples
    except (FileNotFoundError, ValueError, TypeError):
        return known


def _train_size(r: RunSpec, exp: ExperimentConfig) -> int | None:
    if r.config.data.subset:
        return r.config.data.subset
    return _split_size(r.config.data.train, KNOWN_TRAIN_SIZES.get(r.dataset.lower()))


def _test_size(r: RunSpec) -> int:
    """Images in the run's test set (0 without one, or when its size is unknown)."""
    if not r.config.data.test:
        return 0
    return _split_size(r.config.data.test, KNOWN_TEST_SIZES.get(r.dataset.lower(), 0)) or 0


def evaluations_left(every: int, max_epochs: int, done: int) -> int:
    """How many of epochs done+1 .. max_epochs end with an evaluation: every ``every``-th,
    and the last."""
    if done >= max_epochs:
        return 0
    return max_epochs // every - done // every + (max_epochs % every != 0)


def gpu_packing(config: RunConfig, pack_mode: str) -> tuple[str, str]:
    """How the trainer packs one-rank runs of ``config`` on a GPU in ``pack_mode``: (the
    pack mode ``auto`` resolves to, and the step kind of the table's pack rows:
    ``stepgraph`` or ``cudagraphs``), by the trainer's own rules (trainer/speed.py)."""
    import torch

    from ..config import ConfigError
    from ..trainer.speed import resolve_pack_mode, resolve_speed

    gpu = torch.device("cuda")
    speed = resolve_speed(config, gpu, 1)
    try:
        mode = resolve_pack_mode(pack_mode, gpu, [speed])
    except ConfigError:  # (the launcher refuses it before it estimates: common.check_pack_mode)
        mode = pack_mode
    return mode, "stepgraph" if speed.step_graph else "cudagraphs"


def _row(table: list[dict[str, Any]], model: str, batch: int, packed: int = 1,
         packing: tuple[str, str] = ("streams", "stepgraph")) -> dict[str, Any] | None:
    """The row nearest ``batch`` for ``model`` with ``packed`` runs per GPU (1: one run,
    preferring a measurement through the Trainer over the bare step; K > 1: in the pack
    mode of ``packing``, of its step kind where a row names one)."""
    mode, step = packing
    rows = [x for x in table if x["model"] == model and x.get("kind") != "eval" and x.get("runs_per_gpu", 1) == packed
            and (packed == 1 or (x.get("pack_mode") == mode and x.get("step", step) == step))]
    return min(rows, key=lambda x: (abs(x["batch"] - batch), x.get("kind") != "trainer", x["images_per_s"]),
               default=None)


def _epochs_done(r: RunSpec, status: str, will_run: bool = True) -> int:
    """Epochs of the run that need no training: all when it is done or will not run
    (kept failed, blocked), those a resume keeps when it has started, else none."""
    from ..trainer.checkpoint import checkpointed_epochs

    if status == "done" or not will_run:
        return r.config.stop.max_epochs
    done = checkpointed_epochs(r.run_dir) if status in ("running", "failed", "cancelled") else 0
    return min(done, r.config.stop.max_epochs)


def estimate(exp: ExperimentConfig, runs: list[RunSpec], table: Sequence[dict[str, Any]] | None = None,
             plan: Mapping[str, tuple[str, bool]] | None = None) -> dict[str, Any]:
    """{gpu_hours (busy), held_gpu_hours (slots x wall-clock: what an allocation holds),
    wall_hours, eval_share (evaluation's share of the GPU time), measured_on, runs: {key:
    hours alone}, unmeasured: [why], assumed: [what was counted without a measurement],
    complete, runs_per_gpu, packed_speedup: {model: x}} for what is left of ``runs``.

    ``plan``: each run's (status on disk, whether this launch trains it), as the launcher
    decided them (``common.decide``), so that the estimate and the plan it prints read
    the run folders once; without it they are read here, every unfinished run counted."""
    res = exp.resources
    work, unmeasured, assumed, cards, speedup = _work(exp, runs, table, plan)
    wall, gpu = _simulate(runs, res, work)
    trained = sum(w[0] for w in work.values())
    return {**_hours(res, wall, gpu),
            "eval_share": round(sum(w[2] for w in work.values()) / trained, 3) if trained else 0.0,
            "measured_on": sorted(cards),
            "runs": {key: round(w[0] / w[1][0] / 3600, 3) for key, w in work.items()},
            "unmeasured": unmeasured, "assumed": assumed, "complete": not unmeasured, "runs_per_gpu": res.runs_per_gpu,
            "packed_speedup": {m: round(x, 2) for m, x in sorted(speedup.items()) if x != 1.0}}


def _hours(res: Resources, wall: float, gpu: float) -> dict[str, float]:
    """{gpu_hours (busy), held_gpu_hours (slots x wall-clock), wall_hours} from seconds."""
    return {"gpu_hours": round(gpu / 3600, 2), "held_gpu_hours": round(res.slots * wall / 3600, 2),
            "wall_hours": round(wall / 3600, 2)}


def _work(exp: ExperimentConfig, runs: list[RunSpec], table: Sequence[dict[str, Any]] | None,
          plan: Mapping[str, tuple[str, bool]] | None
          ) -> tuple[dict[str, tuple[float, list[float], float]], list[str], list[str], set[str], dict[str, float]]:
    """What each run has left and how fast it trains, whatever the allocation's size:
    ({run: (images left to train, its evaluations counted in as trained images; images/s
    with 1..K runs on its GPU; how many of those images are its evaluations)}, unmeasured:
    [why], assumed: [what was counted without a measurement], cards, packed speed-up by
    model)."""
    from ..experiment import run_status

    table = list(throughput_table() if table is None else table)
    if plan is None:
        plan = {r.key: (run_status(r.run_dir)[0], True) for r in runs}
    res = exp.resources
    k = res.runs_per_gpu
    work: dict[str, tuple[float, list[float], float]] = {}  # run: (images left, images/s with 1..K, of which eval)
    unmeasured: list[str] = []
    assumed: list[str] = []  # what was counted without a measurement
    cards: set[str] = set()
    speedup: dict[str, float] = {}

    def note(why: str) -> None:
        if why not in unmeasured:
            unmeasured.append(why)

    def note_assumed(model: str) -> None:
        why = (f"model {model}: no measured images/s of evaluation; an evaluated image counted as a third of "
               f"a trained one (its forward pass)")
        if why not in assumed:
            assumed.append(why)

    for r in runs:
        c = r.config
        row = _row(table, c.model.name, c.optim.batch_size)
        n = _train_size(r, exp)
        if row is None or n is None:
            note(f"model {c.model.name} has no measured images/s" if row is None else
                 f"the size of dataset {r.dataset} is unknown (prepare it first)")
            continue
        cards.add(row["card"])
        copies = c.data.copies if c.data.labels == "confusion" else 1
        done, epochs = _epochs_done(r, *plan[r.key]), c.stop.max_epochs
        # ranks split the batch: ideal scaling, the optimistic side of the estimate
        alone = row["images_per_s"] * c.dist.world
        evaluated = (evaluations_left(c.stop.train_eval_every, epochs, done) * n * copies
                     + evaluations_left(c.stop.test_eval_every, epochs, done) * _test_size(r))
        measured_eval = _eval_row(table, c.model.name)
        if measured_eval is None and evaluated:
            note_assumed(c.model.name)
        cost = alone / (measured_eval["images_per_s"] * c.dist.world) if measured_eval else EVAL_COST_UNMEASURED
        images = (epochs - done) * n * copies + evaluated * cost
        together = [alone]  # the GPU's images/s with j = 1..K runs on it
        if k > 1 and c.dist.world == 1:
            measured = {1: alone}
            packing = gpu_packing(c, res.pack_mode)
            for j in range(2, k + 1):
                pack = _row(table, c.model.name, c.optim.batch_size, packed=j, packing=packing)
                if pack is not None:  # its ratio to one run measured beside it, when it has one
                    cards.add(pack["card"])
                    measured[j] = alone * pack["x_alone"] if "x_alone" in pack else pack["images_per_s"]
            if len(measured) == 1:
                note(f"runs_per_gpu {k}: no measured images/s of packed {c.model.name} runs (pack mode "
                     f"{packing[0]}, {packing[1]}); counted as sharing one run's images/s (no gain: an upper bound)")
            speedup[c.model.name] = measured[max(measured)] / alone
            together = [_between(measured, j) for j in range(1, k + 1)]
        work[r.key] = (images, together, evaluated * cost)
    return work, unmeasured, assumed, cards, speedup


def _eval_row(table: list[dict[str, Any]], model: str) -> dict[str, Any] | None:
    """The model's measured evaluation (a GPU check's ``eval`` row), at its largest batch
    (the Trainer's auto batch on a GPU)."""
    rows = [x for x in table if x["model"] == model and x.get("kind") == "eval"]
    return max(rows, key=lambda x: x["batch"], default=None)


def other_sizes(exp: ExperimentConfig, runs: list[RunSpec], table: Sequence[dict[str, Any]] | None = None,
                plan: Mapping[str, tuple[str, bool]] | None = None) -> list[dict[str, Any]]:
    """The estimate on allocations of other sizes: [{nodes, wall_hours, held_gpu_hours,
    gpu_hours}] for 1, half, the asked and twice the asked number of nodes (those that
    can hold one run), to choose ``--nodes``: past some size a larger allocation only
    holds more GPUs idle while the runs that others wait on train."""
    from dataclasses import replace

    from ..config import ConfigError

    work = _work(exp, runs, table, plan)[0]  # (the runs' work does not depend on the size)
    out = []
    for n in sorted({1, max(1, exp.resources.nodes // 2), exp.resources.nodes, 2 * exp.resources.nodes}):
        try:
            sized = replace(exp.resources, nodes=n)
        except ConfigError:  # too few nodes for one run
            continue
        out.append({"nodes": n, **_hours(sized, *_simulate(runs, sized, work))})
    return out


def _between(measured: dict[int, float], j: int) -> float:
    """images/s with j runs on a GPU: measured, else linear between the nearest measured
    counts below and above, else the nearest below's (no further gain)."""
    if j in measured:
        return measured[j]
    lo = max(x for x in measured if x < j)
    hi = min((x for x in measured if x > j), default=None)
    if hi is None:
        return measured[lo]
    return measured[lo] + (measured[hi] - measured[lo]) * (j - lo) / (hi - lo)


def _simulate(runs: list[RunSpec], res: Resources, work: dict[str, tuple[float, list[float]]]) -> tuple[float, float]:
    """The launcher's schedule played out, by the scheduler's own rules (placement.py:
    :func:`runs_alone`, :func:`new_packs` on the free slots, then what is left of the
    ready one-rank runs offered to packs with room, :func:`partners_for`): (wall-clock seconds, GPU-seconds
    busy). A slot with j one-rank runs trains each at images/s(j) / j; a pack whose runs
    have all ended gives its slot back. Runs without an estimate, or with nothing left,
    take no time."""
    from .common import step_run

    per_slot = res.runs_per_gpu
    steps = {r.key: step_run(r, res) for r in sorted(runs, key=lambda r: r.stage)}  # plan order, as the scheduler
    waited_on = {d for x in steps.values() for d in x.depends_on}
    left = {key: work[key][0] if key in work else 0.0 for key in steps}
    todo, done = list(steps), set()
    packs: list[tuple[int, list[str]]] = []  # (slots, its live runs), in start order
    free, clock, gpu_s = res.slots, 0.0, 0.0
    while True:
        while nothing := [k for k in todo if left[k] <= 0 and all(d in done for d in steps[k].depends_on)]:
            for key in nothing:  # (a run with nothing left may free one that waits on it)
                todo.remove(key)
                done.add(key)
        ready = [steps[k] for k in todo if all(d in done for d in steps[k].depends_on)]
        alone = runs_alone({x.key for x in ready if x.key in waited_on}
                           | {k for _, live in packs for k in live if k in waited_on}, res.slots)
        for pack in new_packs(ready, free, per_slot, alone):
            free -= pack[0].ranks
            packs.append((pack[0].ranks, [x.key for x in pack]))
            for x in pack:
                ready.remove(x)
                todo.remove(x.key)
        for slots, live in packs:  # the scheduler's refill (Scheduler._refill)
            if slots == 1 and per_slot > 1 and ready and live and not alone.intersection(live):
                for x in partners_for(steps[live[0]], ready, alone)[:per_slot - len(live)]:
                    live.append(x.key)
                    ready.remove(x)
                    todo.remove(x.key)
        if not packs:
            return clock, gpu_s
        speed = {}
        for slots, live in packs:
            for key in live:  # (only runs with work left are placed)
                together = work[key][1]
                speed[key] = together[min(len(live), len(together)) - 1] / len(live)
        dt = min(left[key] / speed[key] for key in speed)
        gpu_s += dt * sum(slots for slots, _ in packs)
        clock += dt
        for key in speed:
            left[key] -= speed[key] * dt
        for slots, live in packs:
            for key in [k for k in live if left[k] <= 1e-9 * work[k][0] + 1e-9]:
                live.remove(key)
                done.add(key)
        free += sum(slots for slots, live in packs if not live)
        packs = [(slots, live) for slots, live in packs if live]
