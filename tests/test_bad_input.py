"""A new user's mistakes, one at a time: each must end in one clear line that names the
problem and the fix (exit 2), never a traceback, a hang, or a silent exit 0, and must
leave every file as it was. RELIABILITY.md records the sweep's figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import REPO


def _tree(root: Path, classes: dict[str, int], split: str = "train") -> Path:
    rng = np.random.default_rng(0)
    for c, n in classes.items():
        (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> dict[str, Path]:
    return _world(tmp_path_factory.mktemp("bad"), tiny_dir)


def _world(w: Path, tiny_dir: Path) -> dict[str, Path]:
    """Files the cases break copies of: a tiny dataset, an experiment, a finished layout."""
    data = w / "data"
    data.mkdir()
    for f in tiny_dir.iterdir():
        if f.is_file():
            (data / f.name).write_bytes(f.read_bytes())
    exp = w / "exp.toml"
    exp.write_text(f'''name = "bad"\nruns_dir = "{w / 'runs'}"\nmodels = ["small_cnn"]\n
[[datasets]]\nname = "tiny"\ntrain = "{data / 'train.beton'}"\ntest = "{data / 'test.beton'}"\n
[model]\nwidth = 8\ndepth = 2\n[stage1]\nmax_epochs = 1\n[stage2]\nmax_epochs = 1\n
[resources]\ngpus = 0\ncpus_per_task = 1\n''')
    _tree(w / "empty-class", {"a": 2, "b": 0})
    _tree(w / "two", {"a": 2, "b": 2})
    (w / "a-file").write_text("not a folder")
    return {"w": w, "data": data, "exp": exp}


def _broken(world: dict[str, Path], how: str) -> Path:
    """A copy of the tiny dataset, broken as ``how`` says; returns its train.beton."""
    d = world["w"] / f"broken-{how}"
    if not d.exists():
        d.mkdir()
        for f in world["data"].iterdir():
            if not f.name.endswith(".npz"):
                (d / f.name).write_bytes(f.read_bytes())
        if how == "random-bytes":
            (d / "train.beton").write_bytes(os.urandom(5000))
        elif how == "truncated":
            b = (d / "train.beton").read_bytes()
            (d / "train.beton").write_bytes(b[: len(b) // 3])
        elif how == "bad-manifest":
            (d / "train.manifest.json").write_text("{ not json")
        elif how == "edited-counts":
            m = json.loads((d / "train.manifest.json").read_text())
            m["num_samples"] += 10
            m["class_counts"][0] += 10
            (d / "train.manifest.json").write_text(json.dumps(m))
    return d / "train.beton"


def _train(world: dict[str, Path], *extra: str) -> list[str]:
    return ["fastbgm.train", f"--data.train={world['data'] / 'train.beton'}", "--model.width=8", "--model.depth=2",
            "--stop.max_epochs=1", "--quiet", *extra]


# (case, argv after `python -m` (a function of the fixture), words the message must hold)
CASES = [
    ("prepare: a class folder with no image", lambda w: ["fastbgm.data", "prepare", "imagefolder", "--src",
     str(w["w"] / "empty-class"), "--out", str(w["w"] / "o1"), "--quiet"], ["folder(s) b", "empty folder"]),
    ("prepare: --classes names a class with no folder", lambda w: ["fastbgm.data", "prepare", "imagefolder", "--src",
     str(w["w"] / "two"), "--out", str(w["w"] / "o2"), "--classes", "a,b,zebra", "--quiet"], ["zebra", "no folder"]),
    ("prepare: --jpeg-quality 500", lambda w: ["fastbgm.data", "prepare", "synthetic", "--out", str(w["w"] / "o3"),
     "--jpeg-quality", "500", "--quiet"], ["--jpeg-quality", "1-100"]),
    ("prepare: --resolution -8", lambda w: ["fastbgm.data", "prepare", "synthetic", "--out", str(w["w"] / "o4"),
     "--resolution", "-8", "--quiet"], ["--resolution", "positive"]),
    ("prepare: --resolution 0", lambda w: ["fastbgm.data", "prepare", "synthetic", "--out", str(w["w"] / "o5"),
     "--resolution", "0", "--quiet"], ["--resolution", "positive"]),
    ("prepare: --out is a file", lambda w: ["fastbgm.data", "prepare", "synthetic", "--out", str(w["w"] / "a-file"),
     "--train-size", "20", "--test-size", "5", "--quiet"], ["could not write", "nothing in"]),
    ("train: --config is a folder", lambda w: [*_train(w), "--config", str(w["w"])], ["is a folder"]),
    ("train: --speed.device=cuda without a GPU", lambda w: _train(w, "--speed.device=cuda"), ["no GPU", "cpu"]),
    ("train: random bytes as .beton", lambda w: ["fastbgm.train", f"--data.train={_broken(w, 'random-bytes')}",
     "--data.placement=stream", "--quiet"], ["cannot be read as a .beton", "prepare"]),
    ("train: truncated .beton, no cache", lambda w: ["fastbgm.train", f"--data.train={_broken(w, 'truncated')}",
     "--quiet"], ["cannot be read as a .beton", "prepare"]),
    ("train: manifest is not JSON", lambda w: ["fastbgm.train", f"--data.train={_broken(w, 'bad-manifest')}",
     "--quiet"], ["manifest", "unreadable", "prepare"]),
    ("train: manifest counts edited", lambda w: ["fastbgm.train", f"--data.train={_broken(w, 'edited-counts')}",
     "--quiet"], ["manifest says", "prepare"]),
    ("train: --optim.lr=-1", lambda w: _train(w, "--optim.lr=-1"), ["optim.lr", "> 0"]),
    ("train: run folder under a file", lambda w: _train(w, "--run-dir", str(w["w"] / "a-file" / "run")),
     ["writable"]),
    ("launch: --stage1.lr=-1", lambda w: ["fastbgm.launch", "--config", str(w["exp"]), "--executor", "local",
     "--stage1.lr=-1", "--dry-run"], ["stage1.lr", "> 0"]),
    ("launch: --stage2.batch_size=0", lambda w: ["fastbgm.launch", "--config", str(w["exp"]), "--executor", "local",
     "--stage2.batch_size=0", "--dry-run"], ["stage2.batch_size", ">= 1"]),
    ("launch: --time abc", lambda w: ["fastbgm.launch", "--config", str(w["exp"]), "--executor", "local",
     "--time", "abc", "--dry-run"], ["not a Slurm time limit"]),
    ("launch: --pack-mode hfta", lambda w: ["fastbgm.launch", "--config", str(w["exp"]), "--executor", "local",
     "--pack-mode", "hfta", "--dry-run"], ["resources.pack_mode", "fused"]),
    ("launch: --min-nodes above --nodes", lambda w: ["fastbgm.launch", "--config", str(w["exp"]), "--executor",
     "local", "--nodes", "2", "--min-nodes", "3", "--dry-run"], ["resources.min_nodes", "between 0"]),
    ("launch: --min-nodes below a run's nodes", lambda w: ["fastbgm.launch", "--config", str(w["exp"]),
     "--executor", "local", "--nodes", "2", "--gpus-per-node", "1", "--ranks-per-run", "2", "--min-nodes", "1",
     "--dry-run"], ["resources.min_nodes", "raise --min-nodes to 2"]),
    ("launch: --stall-timeout -5", lambda w: ["fastbgm.launch", "--config", str(w["exp"]), "--executor", "local",
     "--stall-timeout", "-5", "--dry-run"], ["resources.stall_timeout_s", ">= 0", "0: never"]),
    ("launch: --pack-mode fused on GPU nodes", lambda w: ["fastbgm.launch", "--config", str(w["exp"]),
     "--executor", "slurm", "--gpus-per-node", "2", "--runs-per-gpu", "2", "--pack-mode", "fused", "--dry-run"],
     ["--pack-mode fused", "refused on a GPU", "use pack mode auto"]),
    ("launch: --config is a folder", lambda w: ["fastbgm.launch", "--config", str(w["w"]), "--executor", "local"],
     ["is a folder"]),
    ("launch: --max-parallel -1", lambda w: ["fastbgm.launch", "--config", str(w["exp"]), "--executor", "local",
     "--max-parallel", "-1"], ["--max-parallel"]),
    ("launch: runs_dir under a file", lambda w: ["fastbgm.launch", "--config", str(w["exp"]), "--executor", "local",
     f"--runs_dir={w['w'] / 'a-file' / 'runs'}", "--no-report"], ["writable runs_dir"]),
    ("bench: --device cuda without a GPU", lambda w: ["fastbgm.bench", "train", "--device", "cuda"], ["no GPU"]),
    ("bench: --batch-size 0", lambda w: ["fastbgm.bench", "loader", "--device", "cpu", "--batch-size", "0"],
     ["--batch-size", "> 0"]),
    ("bench: --runs 0", lambda w: ["fastbgm.bench", "pack", "--device", "cpu", "--runs", "0"], ["--runs"]),
    ("bench: --models with a typo", lambda w: ["fastbgm.bench", "pack", "--device", "cpu", "--models",
     "resnet18,resnet19"], ["--models resnet19 unknown", "choose from", "resnet50"]),
    ("bench: faults --kinds unknown", lambda w: ["fastbgm.bench", "faults", "--kinds", "kill-run,explode"],
     ["--kinds explode", "choose from"]),
    ("bench: faults --kinds preempt without --slurm", lambda w: ["fastbgm.bench", "faults", "--kinds", "preempt"],
     ["--kinds preempt", "needs --slurm"]),
]


def _run_case(case: str, world: dict[str, Path]) -> tuple[subprocess.CompletedProcess, list[str]]:
    """One mistake's process, and the files it lost or altered in its own world."""
    _, argv, _ = next(c for c in CASES if c[0] == case)
    args = argv(world)
    before = _snapshot(world["w"])
    # run from its world: a default run folder (runs/<name>) is its own, not the repo's
    out = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=world["w"], timeout=180,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200",
                              "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    after = _snapshot(world["w"])
    return out, [k for k in before if after.get(k) != before[k]]


@pytest.fixture(scope="module")
def mistakes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
             tiny_dir: Path) -> dict[str, Future]:
    """The selected cases' processes, two at a time, each in a world of its own (a process
    is mostly one core's imports: this halves the cases' time on the 2-core machine)."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_a_mistake_gets_one_clear_line_and_changes_nothing"]
    pool = ThreadPoolExecutor(2)
    request.addfinalizer(pool.shutdown)
    return {case: pool.submit(_run_case, case, _world(tmp_path_factory.mktemp("bad"), tiny_dir)) for case in selected}


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_a_mistake_gets_one_clear_line_and_changes_nothing(case: str, mistakes: dict[str, Future]) -> None:
    out, changed = mistakes[case].result()
    words = next(c for c in CASES if c[0] == case)[2]
    text = " ".join((out.stdout + out.stderr).split())
    assert out.returncode == 2, (case, out.returncode, text[-1500:])
    assert "Traceback" not in text, text[-3000:]
    for w in words:
        assert w in text, (case, w, text[-1500:])
    assert not changed, (case, changed[:5])  # nothing lost or altered


def test_loader_api_refuses_labels_out_of_range() -> None:
    from fastbgm.data import loader_from_arrays
    from fastbgm.data.sources import DatasetError

    imgs = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(DatasetError, match=r"labels must lie in \[0, 3\)"):
        loader_from_arrays(imgs, np.array([0, 1, 2, 3]), batch_size=2, num_classes=3)
    with pytest.raises(DatasetError, match="found -1"):
        loader_from_arrays(imgs, np.array([0, -1, 1, 1]), batch_size=2)
    with pytest.raises(DatasetError, match="one integer class per image"):
        loader_from_arrays(imgs, np.array([0.5, 1, 1, 1]), batch_size=2)


def test_a_run_that_failed_to_start_does_not_block_its_fix(world: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "r"
    missing = subprocess.run([sys.executable, "-m", *_train(world, "--data.train=nowhere/train.beton",
                                                               "--run-dir", str(run))],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    fixed = subprocess.run([sys.executable, "-m", *_train(world, "--run-dir", str(run), "--speed.threads=1")],
                           capture_output=True, text=True, cwd=REPO, timeout=240)
    assert fixed.returncode == 0, fixed.stderr[-2000:]


def test_unreadable_result_is_said_and_the_run_resumes(tmp_path: Path) -> None:
    from fastbgm.experiment import run_status

    (tmp_path / "result.json").write_text("{ torn")
    status, res = run_status(tmp_path)
    assert status == "running" and "unreadable" in res["reason"] and "resumes" in res["reason"]


def test_the_disk_full_fault_needs_root_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastbgm.bench.faults import check_args

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ValueError, match="--kinds disk-full: needs root .*leave it out"):
        check_args(False, ["kill-run", "disk-full"], 1, "allocation")
    check_args(False, ["kill-run"], 1, "allocation")


@pytest.mark.timeout(900)
def test_fault_injection_small_seeded_instance(tmp_path: Path) -> None:
    """A small instance of ``python -m fastbgm.bench faults`` (RELIABILITY.md has a full
    run): a trainer SIGKILLed, the launcher SIGKILLed, a damaged last.pt and a stage 1 that
    diverges; after each, the same command finishes every run that can finish, bitwise as
    an uninterrupted run, and leaves no damaged file. (A full disk has tests of its own,
    local and on Slurm, in test_launch.py.)"""
    from fastbgm.bench.faults import run

    kinds = ["kill-run", "kill-launcher", "corrupt-last", "nan-stage1"]
    res = run(tmp_path, faults=len(kinds), seed=1, kinds=kinds)
    n = len(kinds)
    assert res["total"] == {"injected": n, "recovered": n, "identical": n, "damaged": 0}, res["rows"]
