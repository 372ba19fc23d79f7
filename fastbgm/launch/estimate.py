"""What an experiment will cost on an allocation, before anything runs: GPU-hours and
wall-clock hours, from measured images/s per (model, batch) (``throughput.json``,
filled from ``python -m fastbgm.bench`` with the card it was measured on).

Each run processes ``epochs x training images`` (stage 1: x R copies; at most
``max_epochs``, so stage 1's early stop makes this an upper bound). Wall-clock time is
the DAG list-scheduled onto the allocation's slots, as the driver schedules it.
"""

from __future__ import annotations

import heapq
import json
from importlib import resources as ir
from typing import Any

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


def estimate(exp: ExperimentConfig, runs: list[RunSpec]) -> dict[str, Any]:
    """{gpu_hours, wall_hours, measured_on, runs: {key: hours}, unmeasured: [why]}."""
    table = throughput_table()
    res = exp.resources
    hours: dict[str, float] = {}
    gpu_hours = 0.0
    unmeasured: list[str] = []
    cards: set[str] = set()
    for r in runs:
        c = r.config
        rows = [x for x in table if x["model"] == c.model.name]
        row = min(rows, key=lambda x: (abs(x["batch"] - c.optim.batch_size), x["kind"] != "trainer"), default=None)
        n = _train_size(r, exp)
        if row is None or n is None:
            why = f"model {c.model.name} has no measured images/s" if row is None else \
                f"the size of dataset {r.dataset} is unknown (prepare it first)"
            if why not in unmeasured:
                unmeasured.append(why)
            continue
        cards.add(row["card"])
        images = c.stop.max_epochs * n * (c.data.copies if c.data.labels == "confusion" else 1)
        gpu_hours += images / row["images_per_s"] / 3600
        # ranks split the batch: ideal scaling, the optimistic side of the estimate
        hours[r.key] = images / row["images_per_s"] / r.config.dist.world / 3600
    return {"gpu_hours": round(gpu_hours, 2), "wall_hours": round(_makespan(runs, hours, res.slots), 2),
            "measured_on": sorted(cards), "runs": {k: round(v, 3) for k, v in hours.items()},
            "unmeasured": unmeasured, "complete": not unmeasured}


def _makespan(runs: list[RunSpec], hours: dict[str, float], slots: int) -> float:
    """List scheduling of the DAG on ``slots`` (runs without an estimate count as 0 h)."""
    done: dict[str, float] = {}
    todo = sorted(runs, key=lambda r: r.stage)
    free = slots
    clock = 0.0
    running: list[tuple[float, str, int]] = []
    while todo or running:
        ready = [r for r in todo if all(d in done for d in r.depends_on)]
        started = False
        for r in ready:
            if r.config.dist.world <= free:
                todo.remove(r)
                free -= r.config.dist.world
                heapq.heappush(running, (clock + hours.get(r.key, 0.0), r.key, r.config.dist.world))
                started = True
        if not running:
            if not started:
                break  # nothing can ever start (a run larger than the allocation)
            continue
        clock, key, ranks = heapq.heappop(running)
        done[key] = clock
        free += ranks
    return clock

