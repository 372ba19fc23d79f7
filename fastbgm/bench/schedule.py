"""A whole experiment through the local launcher with K = 1, 2, ... runs per slot: how
long it takes, how many trainer processes it starts, and whether any result changed.

The pack benchmark (``bench pack``) times the step loop alone; this one times what a
user waits for, the launcher's scheduling included: packs filled from one group, ready
runs offered to packs with room, a pack whose runs have all ended taking the runs that
just became ready (stage 2 after its stage 1) rather than ending, and each process's
start-up. One slot: a GPU, or on a CPU machine ``cpus_per_task`` cores (default all of
them). The first K is the baseline; a result that differs from it is reported.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from fastbgm.trainer import checkpoint as C

from . import mini
from .common import print_table, write_json

NUMBERS = ("epochs", "train_acc", "train_loss", "test_acc")


def _results(root: Path) -> dict[str, dict[str, Any]]:
    return {str(p.parent.relative_to(root)): json.loads(p.read_text()) for p in root.rglob(C.RESULT)}


def _processes(root: Path) -> int:
    return len({json.loads(p.read_text())["pid"] for p in root.rglob(C.ENV)})


def run(out: Path, runs_per_gpu: list[int], seeds: int = 3, cpus_per_task: int | None = None,
        pack_modes: tuple[str, ...] = ("auto",)) -> dict[str, Any]:
    """Run the mini experiment (``seeds`` x 5 runs) once per K (and pack mode for K > 1);
    print and return the table. Each row's ``root`` is its experiment folder."""
    out.mkdir(parents=True, exist_ok=True)
    data = mini.dataset(out / "data")
    cpus = cpus_per_task or os.cpu_count() or 1
    cases = [(k, m) for k in runs_per_gpu for m in (pack_modes if k > 1 else ("auto",))]
    rows: list[dict[str, Any]] = []
    base: dict[str, dict[str, Any]] = {}
    for k, mode in cases:
        work = out / f"k{k}-{mode}"
        shutil.rmtree(work, ignore_errors=True)
        cfg = mini.experiment(work, data, seeds=seeds, modes=("vanilla", "da+l2+m"))
        cmd = mini.launch_cmd(cfg, "local", "--runs-per-gpu", str(k), "--cpus-per-task", str(cpus),
                              "--pack-mode", mode)
        with open(out / f"k{k}-{mode}.log", "w") as log:
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=3600, env=mini.start_env())
            wall = time.perf_counter() - t0
        root = work / "runs" / mini.NAME
        res = _results(root)
        if proc.returncode != 0 or not res:
            raise RuntimeError(f"K = {k} ({mode}): the launch failed (exit {proc.returncode}); "
                               f"see {out / f'k{k}-{mode}.log'}")
        if not base:
            base = res
        same = all(res.get(key, {}).get(m) == r.get(m) for key, r in base.items() for m in NUMBERS)
        loss_diff = max((abs(res[key]["train_loss"] - r["train_loss"]) for key, r in base.items()
                         if r.get("train_loss") is not None and res.get(key, {}).get("train_loss") is not None),
                        default=float("nan"))  # (a run that failed here or in the baseline has none)
        rows.append({"runs_per_gpu": k, "pack_mode": mode, "runs": len(res),
                     "done": sum(r.get("status") == "done" for r in res.values()), "processes": _processes(root),
                     "wall_s": wall, "identical": same, "max_train_loss_diff": loss_diff, "root": str(root)})
    for r in rows:
        r["speedup"] = rows[0]["wall_s"] / r["wall_s"]
    print_table(f"the mini experiment ({seeds} seed(s), {rows[0]['runs']} runs) through the local launcher, "
                f"slots of {cpus} core(s) or a GPU",
                ["K", "pack mode", "runs done", "processes", "wall s", "x first K", "identical", "max loss diff"],
                [[r["runs_per_gpu"], r["pack_mode"], f"{r['done']}/{r['runs']}", r["processes"], f"{r['wall_s']:.1f}",
                  f"{r['speedup']:.2f}", "yes" if r["identical"] else "no", f"{r['max_train_loss_diff']:.1e}"]
                 for r in rows])
    result = {"seeds": seeds, "cpus_per_task": cpus, "rows": rows}
    write_json(out, "schedule", result)
    return result
