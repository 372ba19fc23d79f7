"""Read an experiment's run folders: every run the plan names (so missing ones show),
or every folder with a config when there is no plan. Reads only; writes nothing."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..experiment.plan import parse_run_key, run_status
from ..trainer import checkpoint as C
from ..fileio import read_jsonl


@dataclass
class Run:
    key: str
    stage: int
    dataset: str
    model: str
    seed: int
    init: str
    mode: str
    status: str  # done | failed | running | pending | cancelled | missing
    result: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    env: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, Any]:
        return self.metrics[-1] if self.metrics else {}

    def last(self, key: str) -> float | None:
        for row in reversed(self.metrics):
            if key in row and row[key] is not None and not (isinstance(row[key], float) and math.isnan(row[key])):
                return row[key]
        return None

    @property
    def test_acc(self) -> float | None:
        return self.last("test_acc")

    @property
    def train_acc(self) -> float | None:
        """Eval-mode accuracy on the training set when measured, else the running one."""
        return self.last("train_eval_acc") if self.last("train_eval_acc") is not None else self.last("train_acc")

    @property
    def epochs(self) -> int | None:
        return self.final.get("epoch")

    @property
    def epochs_to_100(self) -> int | None:
        return C.epochs_to_full_train(self.metrics)


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def collect(exp_dir: str | Path) -> tuple[list[Run], dict[str, Any]]:
    root = Path(exp_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not an experiment folder (expected runs/<experiment>)")
    plan = _read(root / "experiment.json")
    entries = plan.get("runs") or [
        {"key": str(p.parent.relative_to(root)), **parse_run_key(str(p.parent.relative_to(root)))}
        for p in sorted(root.rglob(C.CONFIG)) if ".submitit" not in p.parts
    ]
    if not entries:
        raise FileNotFoundError(f"{root} holds no runs (no experiment.json and no run folders with config.json)")
    runs = []
    for e in entries:
        d = root / e["key"]
        status, result = run_status(d)
        if status == "pending" and not d.exists():
            status = "missing"
        runs.append(Run(key=e["key"], stage=e["stage"], dataset=e["dataset"], model=e["model"], seed=e["seed"],
                        init=e.get("init", ""), mode=e.get("mode", ""), status=status, result=result,
                        metrics=read_jsonl(d / C.METRICS), env=_read(d / C.ENV),
                        config=_read(d / C.CONFIG)))
    return runs, plan.get("config", {})
