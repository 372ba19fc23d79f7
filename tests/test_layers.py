"""The data flow runs one way: dataset files -> loader -> trainer -> experiment ->
launcher -> report. No library module imports a layer above its own (a command's
``__main__`` may compose the layers above it: the launcher's prints the report)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fastbgm

ROOT = Path(fastbgm.__file__).parent
# each top-level module or package of fastbgm, by layer; a layer may import only lower ones
LAYERS = [
    {"__init__", "config", "fileio", "lazy", "slurmenv", "ui"},  # shared plumbing
    {"distributed"},
    {"data"},
    {"models"},
    {"trainer", "train"},  # the Trainer and its command
    {"experiment"},
    {"launch"},
    {"report"},
    {"bench", "toy"},  # leaves: nothing imports them
]
LEVEL = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def _imports(path: Path) -> set[str]:
    """The top-level fastbgm units a file imports."""
    rel = path.relative_to(ROOT).parts
    package = ["fastbgm", *rel[:-1]]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
                names = [base] if node.module else [f"{base}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for n in names:
            parts = n.split(".")
            if parts[0] == "fastbgm":  # ``from .. import __version__`` is the package's own
                out.add(parts[1] if len(parts) > 1 and parts[1] in LEVEL else "__init__")
    return out


def test_every_unit_has_a_layer() -> None:
    units = {p.name.removesuffix(".py") for p in ROOT.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    assert units <= set(LEVEL), f"give {sorted(units - set(LEVEL))} a layer in this test"


def test_no_module_imports_a_layer_above_its_own() -> None:
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        unit = path.relative_to(ROOT).parts[0].removesuffix(".py")
        for target in _imports(path) - {unit}:
            if path.name == "__main__.py" and LEVEL[target] > LEVEL[unit]:
                continue  # a command composes what is above it
            if LEVEL[target] > LEVEL[unit] or (LEVEL[target] == LEVEL[unit] and target != unit
                                               and unit != "train"):
                wrong.append(f"{path.relative_to(ROOT)} imports fastbgm.{target}")
    assert not wrong, "imports against the data flow:\n" + "\n".join(wrong)


def test_the_launcher_and_what_slurm_runs_beside_the_trainers_import_no_torch() -> None:
    """A launch reads configs and run folders, plans, submits and reports; so do its
    --dry-run, an allocation's driver and a job's batch-script teardown. torch (1-2 s to
    import on the project's CPU, a few seconds on a cluster's shared disk) is for what
    trains."""
    code = """
import sys
import fastbgm.launch.__main__, fastbgm.launch.allocation, fastbgm.launch.job, fastbgm.launch.local
import fastbgm.launch.slurm, fastbgm.launch.cluster
import fastbgm.report.__main__
from fastbgm.config import load
from fastbgm.data import LABEL_MODES, Manifest
from fastbgm.experiment import ExperimentConfig, plan
from fastbgm.launch.common import decide, missing_data
from fastbgm.launch.estimate import estimate
from fastbgm.launch.job import requeue_killed_job
from fastbgm.trainer import RunConfig
exp = load(ExperimentConfig, sys.argv[1], [])
runs = plan(exp)
missing_data(decide(runs, False))
estimate(exp, runs)
print(sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
"""
    cfg = ROOT.parent / "configs" / "paper-mini.toml"
    out = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]", f"imported: {out.stdout[:500]}"
