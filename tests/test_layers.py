"""The data flow runs one way: dataset files -> loader -> trainer -> experiment ->
launcher -> report. No library module imports a layer above its own (a command's
``__main__`` may compose the layers above it: the launcher's prints the report)."""

from __future__ import annotations

import ast
from pathlib import Path

import fastbgm

ROOT = Path(fastbgm.__file__).parent
# each top-level module or package of fastbgm, by layer; a layer may import only lower ones
LAYERS = [
    {"__init__", "config", "fileio", "ui"},  # shared plumbing
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
