"""What an experiment will cost on an allocation, before anything runs: GPU-hours and
wall-clock hours, from measured images/s per (model, batch) (``throughput.json``,
filled from ``python -m fastbgm.bench`` with the card it was measured on).

Each run processes ``epochs x training images`` (stage 1: x R copies; at most
``max_epochs``, so stage 1's early stop makes this an upper bound); a run that already
trained some epochs counts only those it has left, a finished one nothing. Wall-clock
time is the DAG list-scheduled onto the allocation's slots, as the driver schedules it.

Packing (``resources.runs_per_gpu`` K > 1): j <= K one-rank runs on one GPU each train
at ``images/s of j packed runs / j``, from the table's ``runs_per_gpu = j`` rows in the
experiment's pack mode (the GPU check writes them: ``throughput-rows.json``), linear
between measured counts. Without such a row for the model, packing is counted as gaining
nothing (the runs share one run's images/s) and the estimate says so.
"""

from __future__ import annotations

import json
from importlib import resources as ir
from typing import Any, Sequence

from ..experiment import ExperimentConfig, RunSpec

# Training-set sizes of the paper's datasets, for plans made before the data is prepared.
KNOWN_TRAIN_SIZES = {"cifar10": 50_000, "cinic10": 90_000}


def throughput_table() -> list[dict[str, Any]]:
    return json.loads(ir.files("fastbgm.launch").joinpath("throughput.json").read_text())["rows"]


def _train_size(r: RunSpec, exp: ExperimentConfig) -> int | None:
    if r.config.data.subset:
        return r.config.data.subset
    from ..data.manifest import Manifest

    try:
        return Manifest.for_beton(r.config.data.train).num_samples
    except (FileNotFoundError, ValueError, TypeError):
        return KNOWN_TRAIN_SIZES.get(r.dataset.lower())


# what pack mode ``auto`` is on a GPU (trainer/loop.py resolve_pack_mode): threads, or
# streams when every run uses step graphs
AUTO_ON_GPU = ("threads", "streams")


def _row(table: list[dict[str, Any]], model: str, batch: int, packed: int = 1,
         pack_mode: str = "auto") -> dict[str, Any] | None:
    """The row nearest ``batch`` for ``model`` with ``packed`` runs per GPU (1: one run,
    preferring a measurement through the Trainer over the bare step; K > 1: in
    ``pack_mode``, for ``auto`` the slower of what it may be)."""
    modes = AUTO_ON_GPU if pack_mode == "auto" else (pack_mode,)
    rows = [x for x in table if x["model"] == model and x.get("runs_per_gpu", 1) == packed
            and (packed == 1 or x.get("pack_mode") in modes)]
    return min(rows, key=lambda x: (abs(x["batch"] - batch), x.get("kind") != "trainer", x["images_per_s"]),
               default=None)


def _epochs_left(r: RunSpec) -> int:
    """Epochs the run has still to train: none when it is done, its max_epochs less those
    its metrics record (the epochs a resume keeps) when it has started."""
    from ..experiment import run_status
    from ..fileio import read_jsonl
    from ..trainer import checkpoint as C

    status, _ = run_status(r.run_dir)
    if status == "done":
        return 0
    done = len(read_jsonl(r.run_dir / C.METRICS)) if status == "running" else 0
    return max(0, r.config.stop.max_epochs - done)


def estimate(exp: ExperimentConfig, runs: list[RunSpec],
             table: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """{gpu_hours, wall_hours, measured_on, runs: {key: hours alone}, unmeasured: [why],
    complete, runs_per_gpu, packed_speedup: {model: x}} for what is left of ``runs``."""
    table = list(throughput_table() if table is None else table)
    res = exp.resources
    k = res.runs_per_gpu
    work: dict[str, tuple[float, list[float]]] = {}  # run: (images left, images/s with 1..K on its GPU)
    unmeasured: list[str] = []
    cards: set[str] = set()
    speedup: dict[str, float] = {}

    def note(why: str) -> None:
        if why not in unmeasured:
            unmeasured.append(why)

    for r in runs:
        c = r.config
        row = _row(table, c.model.name, c.optim.batch_size)
        n = _train_size(r, exp)
        if row is None or n is None:
            note(f"model {c.model.name} has no measured images/s" if row is None else
                 f"the size of dataset {r.dataset} is unknown (prepare it first)")
            continue
        cards.add(row["card"])
        images = _epochs_left(r) * n * (c.data.copies if c.data.labels == "confusion" else 1)
        # ranks split the batch: ideal scaling, the optimistic side of the estimate
        alone = row["images_per_s"] * c.dist.world
        together = [alone]  # the GPU's images/s with j = 1..K runs on it
        if k > 1 and c.dist.world == 1:
            measured = {1: alone}
            for j in range(2, k + 1):
                pack = _row(table, c.model.name, c.optim.batch_size, packed=j, pack_mode=res.pack_mode)
                if pack is not None:  # its ratio to one run measured beside it, when it has one
                    cards.add(pack["card"])
                    measured[j] = alone * pack["x_alone"] if "x_alone" in pack else pack["images_per_s"]
            if len(measured) == 1:
                note(f"runs_per_gpu {k}: no measured images/s of packed {c.model.name} runs (pack mode "
                     f"{res.pack_mode}); counted as sharing one run's images/s (no gain: an upper bound)")
            speedup[c.model.name] = measured[max(measured)] / alone
            together = [_between(measured, j) for j in range(1, k + 1)]
        work[r.key] = (images, together)
    wall, gpu = _simulate(runs, work, res.slots, k)
    return {"gpu_hours": round(gpu / 3600, 2), "wall_hours": round(wall / 3600, 2),
            "measured_on": sorted(cards),
            "runs": {key: round(w[0] / w[1][0] / 3600, 3) for key, w in work.items()},
            "unmeasured": unmeasured, "complete": not unmeasured, "runs_per_gpu": k,
            "packed_speedup": {m: round(x, 2) for m, x in sorted(speedup.items()) if x != 1.0}}


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


def _simulate(runs: list[RunSpec], work: dict[str, tuple[float, list[float]]], slots: int,
              per_slot: int = 1) -> tuple[float, float]:
    """The launcher's schedule played out: (wall-clock seconds, GPU-seconds held).

    Runs start in plan order once their dependencies are done, as the scheduler starts
    them (launch/schedule.py): a one-rank run on the free GPU if there is one, else on the
    busiest GPU with room (a pack with room takes ready runs); a run of W ranks on W
    free GPUs. A GPU with j one-rank runs trains each at images/s(j) / j. Runs without an
    estimate, or with nothing left, take no time."""
    on: list[list[str]] = [[] for _ in range(slots)]  # the one-rank runs on each GPU
    whole: dict[str, list[int]] = {}  # a multi-rank run's GPUs
    left = {key: w[0] for key, w in work.items()}
    done: set[str] = set()
    todo = sorted(runs, key=lambda r: r.stage)
    clock = gpu_s = 0.0

    def rate(key: str, g: int) -> float:
        together = work[key][1]
        j = len(on[g])
        return together[min(j, len(together)) - 1] / j

    while True:
        for r in [r for r in todo if all(d in done for d in r.depends_on)]:
            if left.get(r.key, 0.0) <= 0:
                todo.remove(r)
                done.add(r.key)
                continue
            taken = {g for gs in whole.values() for g in gs}
            free = [g for g in range(slots) if not on[g] and g not in taken]
            world = r.config.dist.world
            if world > 1:
                if len(free) >= world:
                    whole[r.key] = free[:world]
                    todo.remove(r)
                continue
            room = sorted((g for g in range(slots) if 0 < len(on[g]) < per_slot and g not in taken),
                          key=lambda g: -len(on[g]))
            g = free[0] if free else (room[0] if room else None)
            if g is not None:
                on[g].append(r.key)
                todo.remove(r)
        live = [(key, g) for g in range(slots) for key in on[g]] + [(key, -1) for key in whole]
        if not live:
            return clock, gpu_s
        speed = {key: (rate(key, g) if g >= 0 else work[key][1][0]) for key, g in live}
        dt = min(left[key] / speed[key] for key, _ in live)
        gpu_s += dt * (sum(1 for g in on if g) + sum(len(gs) for gs in whole.values()))
        clock += dt
        for key, g in live:
            left[key] -= speed[key] * dt
            if left[key] <= 1e-9 * work[key][0] + 1e-9:
                done.add(key)
                if g >= 0:
                    on[g].remove(key)
                else:
                    del whole[key]
