"""What the training loop adds to each step, on the host: ops dispatched and
microseconds per step of the bare step (forward, loss, backward, SGD on one fixed
batch), of the loader (one batch), and of the loop's step (its loader's batch, the
step, the record of its loss and correct count, the non-finite check every 20 steps),
for a model so small that its arithmetic is negligible.

At the paper's batch 128 a GPU step is bound by the host (BENCHMARKS.md), so what the
loop launches beyond the bare step is what keeps the Trainer from the bare step's speed;
the numbers here are that cost, measurable on any device. Ops are counted eagerly (a
compiled or captured step launches fewer, and is timed as it runs)."""

from __future__ import annotations

import collections
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .common import device_info, print_table, synchronize, write_json
from .pack import _state, bench_speed
from .train import bare_step, synthetic_arrays


class _CountOps(TorchDispatchMode):
    """Counts the aten ops dispatched under it (the kernels an eager step launches)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], Any]) -> collections.Counter[str]:
    """The ops one call of ``fn`` dispatches, by name."""
    with _CountOps() as c:
        fn()
    return c.ops


def run(device: torch.device, steps: int, out: Path | None, mode: str = "auto", batch: int = 128,
        resolution: int = 8, repeats: int = 7) -> dict[str, Any]:
    """The table (and its rows): bare step, loader, loop step, and what the loop adds.
    ``mode``: eager (ops counted), or compiled / cudagraphs / stepgraph (timed only)."""
    mode, speed = bench_speed(mode, device)
    images, labels = synthetic_arrays(batch * steps, resolution)
    s = _state("small_cnn", 0, images, labels, batch, speed, device, packed=False, width=4, depth=1)
    x0, y0, _ = next(iter(s.train))
    bare = bare_step(s.model, s.optimizer, speed.precision, device)

    def loader_epoch() -> None:
        for _ in s.train:
            pass

    def loop_epoch() -> None:
        for step, (x, y, _) in s.begin_epoch():
            s.step(step, x, y)
        s.epoch += 1

    def bare_epoch() -> None:
        for _ in range(steps):
            bare(x0, y0)

    what = {"bare step (fixed batch)": bare_epoch, "loader (one batch)": loader_epoch,
            "training loop step (loader + step + record)": loop_epoch}
    for fn in what.values():  # warm-up: compilation, graph capture, allocator
        fn()
    # the three interleaved, the median of each: a shared machine's noise falls on all alike
    times: dict[str, list[float]] = {k: [] for k in what}
    for _ in range(repeats):
        for k, fn in what.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[k].append((time.perf_counter() - t0) / steps * 1e6)
    rows = [{"what": k, "us_per_step": statistics.median(v)} for k, v in times.items()]
    if mode == "eager":
        for r, fn in zip(rows, what.values()):
            r["ops"] = dict(count_ops(fn))
            r["ops_per_step"] = sum(r["ops"].values()) / steps
    bare_r, loader_r, loop_r = rows
    extra = {"what": "the loop's own (loop - bare - loader)",
             "us_per_step": loop_r["us_per_step"] - bare_r["us_per_step"] - loader_r["us_per_step"]}
    if "ops_per_step" in loop_r:
        extra["ops_per_step"] = loop_r["ops_per_step"] - bare_r["ops_per_step"] - loader_r["ops_per_step"]
    rows.append(extra)
    info = device_info(device)
    print_table(f"host cost per step, small_cnn (width 4, depth 1) batch {batch} at {resolution}px, {mode} on "
                f"{info['device']}", ["what", "ops / step", "us / step", "x bare step"],
                [[r["what"], f"{r['ops_per_step']:.1f}" if "ops_per_step" in r else "-", f"{r['us_per_step']:.0f}",
                  f"{r['us_per_step'] / bare_r['us_per_step']:.2f}"] for r in rows])
    res = {"device": info, "mode": mode, "batch": batch, "steps": steps, "repeats": repeats, "rows": rows}
    write_json(out, "overhead", res)
    return res
