"""Turn an experiment into runs and dependencies, and know the folder layout.

One stage-1 run per (dataset, model, seed), shared by every stage-2 run that starts
from it; stage-2 runs from ``random`` init have no dependency, from ``adversarial``
init they depend on their stage-1 run. Folder names derive from the settings:
``<runs>/<exp>/<dataset>/<model>/seed<k>/stage1-R<copies>-z<ratio>`` and
``.../stage2-<init>-<mode>``, so re-launching finds what exists.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import from_dict, to_dict
from ..trainer import checkpoint as C
from ..trainer.config import RunConfig
from .config import ExperimentConfig, parse_mode

STATUSES = ("pending", "running", "done", "failed", "cancelled")


@dataclass
class RunSpec:
    key: str  # path relative to the experiment folder
    run_dir: Path
    config: RunConfig
    stage: int
    dataset: str
    model: str
    seed: int
    init: str = ""  # stage 2: random | adversarial
    mode: str = ""  # stage 2: vanilla, da, ... da+l2+m
    depends_on: list[str] = field(default_factory=list)


def experiment_dir(exp: ExperimentConfig) -> Path:
    # absolute: jobs may start in another working directory
    return Path(exp.runs_dir).resolve() / exp.name


def _abs(path: str) -> str:
    return str(Path(path).resolve()) if path else ""


def stage1_key(dataset: str, model: str, seed: int, copies: int, zero_ratio: float) -> str:
    return f"{dataset}/{model}/seed{seed}/stage1-R{copies}-z{zero_ratio:g}"


def stage2_key(dataset: str, model: str, seed: int, init: str, mode: str) -> str:
    return f"{dataset}/{model}/seed{seed}/stage2-{init}-{mode.replace('+', '_')}"


def parse_run_key(key: str) -> dict[str, Any]:
    """The inverse of :func:`stage1_key` / :func:`stage2_key` (for run folders found
    without an experiment.json)."""
    parts = key.split("/")
    nested = len(parts) > 3
    info: dict[str, Any] = {"dataset": parts[0] if nested else "", "model": parts[1] if nested else "",
                            "seed": 0, "stage": 0, "init": "", "mode": ""}
    if nested and parts[2].startswith("seed"):
        info["seed"] = int(parts[2][4:] or 0)
    leaf = parts[-1]
    if leaf.startswith("stage1"):
        info["stage"] = 1
    elif leaf.startswith("stage2-"):
        _, init, mode = leaf.split("-", 2)
        info.update(stage=2, init=init, mode=mode.replace("_", "+"))
    return info


def plan(exp: ExperimentConfig) -> list[RunSpec]:
    root = experiment_dir(exp)
    runs: list[RunSpec] = []
    for ds in exp.datasets:
        for model in exp.models:
            for seed in exp.seeds:
                s1 = exp.stage1
                key1 = stage1_key(ds.name, model, seed, s1.copies, s1.zero_ratio)
                model_cfg = dataclasses.replace(exp.model, name=model)
                # the run's size is part of what it is: its per-rank batch follows from it
                common = {"seed": seed, "model": to_dict(model_cfg), "speed": to_dict(exp.speed),
                          "dist": {"world": exp.resources.ranks_per_run}}
                data = {"train": _abs(ds.train), "test": _abs(ds.test), "subset": ds.subset, "placement": ds.placement,
                        "crop_padding": ds.crop_padding,
                        "seed": seed}
                cfg1 = from_dict(RunConfig, {
                    **common, "name": key1,
                    "data": {**data, "labels": "confusion", "label_seed": seed, "copies": s1.copies,
                             "zero_ratio": s1.zero_ratio},
                    "optim": {"lr": s1.lr, "momentum": s1.momentum, "weight_decay": s1.weight_decay,
                              "batch_size": s1.batch_size, "schedule": s1.schedule, "milestones": s1.milestones},
                    "stop": {"max_epochs": s1.max_epochs, "target_train_acc": s1.target_train_acc,
                             "train_eval_every": s1.check_every, "test_eval_every": s1.check_every},
                })
                needs_stage1 = "adversarial" in exp.inits
                if needs_stage1:
                    runs.append(RunSpec(key1, root / key1, cfg1, 1, ds.name, model, seed))
                s2 = exp.stage2
                for init in exp.inits:
                    for mode in exp.modes:
                        regs = parse_mode(mode)
                        key2 = stage2_key(ds.name, model, seed, init, mode)
                        cfg2 = from_dict(RunConfig, {
                            **common, "name": key2,
                            "init_from": str(root / key1) if init == "adversarial" else "",
                            "data": {**data, "labels": "true", "augment": "da" in regs},
                            "optim": {"lr": s2.lr, "batch_size": s2.batch_size, "schedule": s2.schedule,
                                      "milestones": s2.milestones,
                                      "momentum": s2.momentum if "m" in regs else 0.0,
                                      "weight_decay": s2.weight_decay if "l2" in regs else 0.0,
                                      "wd_exclude_bn_bias": s2.wd_exclude_bn_bias},
                            "stop": {"max_epochs": s2.max_epochs, "target_train_acc": s2.target_train_acc,
                                     "train_eval_every": s2.check_every or s2.eval_every,
                                     "test_eval_every": s2.eval_every},
                        })
                        runs.append(RunSpec(key2, root / key2, cfg2, 2, ds.name, model, seed, init, mode,
                                            [key1] if init == "adversarial" else []))
    return runs


def run_status(run_dir: Path) -> tuple[str, dict[str, Any]]:
    """(status, result.json contents) read from a run folder."""
    p = Path(run_dir) / C.RESULT
    if p.exists():
        try:
            res = json.loads(p.read_text())
            if not isinstance(res, dict):
                raise ValueError("not a JSON object")
        except (json.JSONDecodeError, ValueError, OSError) as e:
            # the run resumes from its last.pt, which rewrites it; say so rather than nothing
            return "running", {"reason": f"{p.name} is unreadable ({e}); the next launch resumes the run from "
                                         f"its last checkpoint and writes it again"}
        st = res.get("status", "running")
        return (st if st in STATUSES else "running"), res
    if (Path(run_dir) / C.LAST).exists():
        return "running", {}
    return "pending", {}


def write_plan(exp: ExperimentConfig, runs: list[RunSpec]) -> Path:
    """The experiment's resolved config and run list, for the report and for humans."""
    from ..fileio import atomic_write_json

    root = experiment_dir(exp)
    atomic_write_json(root / "experiment.json", {
        "config": to_dict(exp),
        "runs": [{"key": r.key, "stage": r.stage, "dataset": r.dataset, "model": r.model, "seed": r.seed,
                  "init": r.init, "mode": r.mode, "depends_on": r.depends_on} for r in runs],
    })
    return root / "experiment.json"
