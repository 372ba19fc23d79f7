"""The report: from a real small experiment, and from hand-made run folders covering
missing, failed and partial runs and claims that must pass or fail."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from fastbgm.fileio import atomic_write_json
from fastbgm.report import build_report

from .conftest import REPO, small_disk
from .test_launch import launch, write_experiment


def _panels(rep: dict, kind: str) -> int:
    return next(f["panels"] for f in rep["figures"] if f["kind"] == kind)


@pytest.mark.timeout(400)
def test_report_of_a_real_small_experiment(tiny_dir: Path, tmp_path: Path) -> None:
    cfg = write_experiment(tmp_path, tiny_dir, name="real")
    out = launch("--config", str(cfg), "--executor", "local")
    assert out.returncode == 0, out.stdout[-3000:]
    root = tmp_path / "runs" / "real"
    cli = subprocess.run([sys.executable, "-m", "fastbgm.report", str(root)], capture_output=True, text=True,
                         cwd=REPO, timeout=200)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert "vanilla" in cli.stdout and "da+l2+m" in cli.stdout
    rep_dir = root / "report"
    md = (rep_dir / "report.md").read_text()
    assert "## synthetic / small_cnn" in md and "| vanilla |" in md and "## Provenance" in md
    assert "sha256" in md and "BatchNorm init: ones" in md and "git commit" in md
    rows = list(csv.DictReader((rep_dir / "results.csv").open()))
    assert len(rows) == 5 and all(r["status"] == "done" for r in rows)
    figs = json.loads((rep_dir / "figures.json").read_text())
    assert {f["kind"]: f["panels"] for f in figs} == {"curves": 4, "gap": 1, "complexity": 4}
    for f in figs:
        with Image.open(rep_dir / f["file"]) as im:
            im.verify()
            assert im.format == "PNG"
        assert f"]({f['file']})" in md


def _hand_run(root: Path, key: str, status: str | None, test_acc: float | None, train_acc: float = 1.0,
              epochs: int = 4, reason: str = "") -> None:
    d = root / key
    d.mkdir(parents=True)
    metrics = []
    for e in range(1, epochs + 1):
        row = {"epoch": e, "train_acc": min(1.0, train_acc * e / epochs), "train_loss": 1.0 / e,
               "param_l2": 10 + e, "dist_from_init": e, "path_l1": 100.0 * e, "path_l2": 10.0 * e}
        if e == epochs and test_acc is not None:
            row.update(test_acc=test_acc, train_eval_acc=train_acc)
        metrics.append(row)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    (d / "env.json").write_text(json.dumps({"device": "cpu", "bn_init": "uniform", "seed": 0, "torch": "x",
                                            "git_commit": "abc", "speed": {"compile": False}}))
    if status:
        atomic_write_json(d / "result.json", {"status": status, **({"reason": reason} if reason else {})})


def _hand_experiment(tmp_path: Path, gaps: dict[str, list[float]], extra: list[tuple] = (),
                     config: dict | None = None, name: str = "hand") -> Path:
    """One stage-2 pair per (mode, seed) with the given random-minus-adversarial gaps."""
    root = tmp_path / name
    runs = [{"key": "ds/net/seed0/stage1-R2-z0.1", "stage": 1, "dataset": "ds", "model": "net", "seed": 0,
             "init": "", "mode": "", "depends_on": []}]
    _hand_run(root, runs[0]["key"], "done", None, train_acc=1.0, epochs=3)
    for mode, gs in gaps.items():
        for seed, g in enumerate(gs):
            for init, acc in (("random", 0.80), ("adversarial", 0.80 - g)):
                key = f"ds/net/seed{seed}/stage2-{init}-{mode.replace('+', '_')}"
                runs.append({"key": key, "stage": 2, "dataset": "ds", "model": "net", "seed": seed, "init": init,
                             "mode": mode, "depends_on": []})
                _hand_run(root, key, "done", acc)
    for key, mode, seed, init, status, reason in extra:
        runs.append({"key": key, "stage": 2, "dataset": "ds", "model": "net", "seed": seed, "init": init,
                     "mode": mode, "depends_on": []})
        if status == "missing":
            continue
        _hand_run(root, key, None if status == "running" else status, None if status != "done" else 0.5,
                  reason=reason, epochs=2)
        if status == "running":
            atomic_write_json(root / key / "result.json", {"status": "running", "epoch": 2})
    atomic_write_json(root / "experiment.json", {"config": config or {}, "runs": runs})
    return root


def test_claims_pass_and_fail_as_the_data_says(tmp_path: Path) -> None:
    root = _hand_experiment(tmp_path, {
        "vanilla": [0.10, 0.11, 0.09],  # clear harm: PASS
        "da": [0.08, 0.09, 0.085],  # still hurts: the "no harm" claim must FAIL
        "l2": [0.003, -0.004, 0.002],  # within noise: PASS
    })
    rep = build_report(root)
    vanilla = next(c for c in rep["claims"] if "generalises" in c.text)
    assert vanilla.passed is True and "gap 10.0 points" in vanilla.text and "n=3" in vanilla.text
    da = next(c for c in rep["claims"] if "with DA " in c.text)
    assert da.passed is False and "still hurts" in da.text
    l2 = next(c for c in rep["claims"] if "with L2 " in c.text)
    assert l2.passed is True and "does no harm" in l2.text
    # the vanilla claim fails when the data shows no harm
    root2 = _hand_experiment(tmp_path / "b", {"vanilla": [0.001, -0.002, 0.0]})
    van2 = next(c for c in build_report(root2)["claims"] if "generalises" in c.text)
    assert van2.passed is False and "no worse than noise" in van2.text


def test_unconverged_gap_does_not_count(tmp_path: Path) -> None:
    root = _hand_experiment(tmp_path, {"vanilla": [0.10]})
    for p in root.rglob("stage2-adversarial-vanilla/metrics.jsonl"):
        rows = [json.loads(x) for x in p.read_text().splitlines()]
        rows[-1]["train_eval_acc"] = 0.9
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = next(c for c in build_report(root)["claims"] if "vanilla:" in c.text)
    assert c.passed is None and "not converged" in c.text and "adversarial 90.0%" in c.text


def test_partial_experiment_shows_missing_failed_and_running_runs(tmp_path: Path) -> None:
    root = _hand_experiment(tmp_path, {"vanilla": [0.1, 0.12]}, extra=[
        ("ds/net/seed2/stage2-random-vanilla", "vanilla", 2, "random", "failed", "non-finite loss at epoch 3, step 7"),
        ("ds/net/seed2/stage2-adversarial-vanilla", "vanilla", 2, "adversarial", "running", ""),
        ("ds/net/seed3/stage2-random-vanilla", "vanilla", 3, "random", "missing", ""),
        ("ds/net/seed3/stage2-adversarial-vanilla", "vanilla", 3, "adversarial", "cancelled",
         "its stage-1 run ds/net/seed3/stage1-R2-z0.1 failed"),
    ])
    rep = build_report(root)
    row = rep["rows"][0]
    assert row.gap.n == 2 and row.test["random"].n == 2  # only finished pairs count ...
    assert row.not_done["random"] == ["seed2: failed", "seed3: missing"]  # ... the rest is shown
    assert row.not_done["adversarial"] == ["seed2: running", "seed3: cancelled"]
    md = (rep["dir"] / "report.md").read_text()
    assert "## Runs not done" in md and "non-finite loss at epoch 3, step 7" in md
    assert "**missing**" in md and "**running**" in md and "**cancelled**" in md
    statuses = {r["key"]: r["status"] for r in csv.DictReader((rep["dir"] / "results.csv").open())}
    assert statuses["ds/net/seed3/stage2-random-vanilla"] == "missing"
    assert statuses["ds/net/seed2/stage2-random-vanilla"] == "failed"
    assert len(statuses) == 9
    with Image.open(rep["dir"] / "curves-ds-net.png") as im:
        im.verify()


def test_report_errors_name_the_problem(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "fastbgm.report", str(tmp_path / "nope")], capture_output=True,
                         text=True, cwd=REPO, timeout=60)
    assert out.returncode == 2 and "not an experiment folder" in out.stdout
    (tmp_path / "empty").mkdir()
    out = subprocess.run([sys.executable, "-m", "fastbgm.report", str(tmp_path / "empty")], capture_output=True,
                         text=True, cwd=REPO, timeout=60)
    assert out.returncode == 2 and "holds no runs" in out.stdout
    # no room for the report's figures: said, not a traceback, and nothing half-written
    with small_disk(tmp_path / "disk", 64) as disk:
        root = _hand_experiment(disk, {"vanilla": [0.1]})
        out = subprocess.run([sys.executable, "-m", "fastbgm.report", str(root)], capture_output=True, text=True,
                             cwd=REPO, timeout=120, env={**os.environ, "COLUMNS": "300"})
        assert out.returncode == 2 and "Traceback" not in out.stdout + out.stderr, out.stdout[-2000:] + out.stderr
        assert "cannot write the report" in out.stdout and "No space left" in out.stdout, out.stdout[-2000:]
        assert not list(root.rglob(".*.tmp"))
        for png in root.rglob("*.png"):  # a figure is whole, or absent
            with Image.open(png) as im:
                im.verify()


def test_comparison_names_what_the_experiments_varied(tmp_path: Path) -> None:
    base = {"name": "r4", "seeds": [0, 1], "stage1": {"copies": 4, "lr": 0.05}, "speed": {"threads": 1},
            "datasets": [{"name": "ds", "subset": 1000}]}
    r8 = {**base, "name": "r8", "seeds": [0], "stage1": {"copies": 8, "lr": 0.05}, "speed": {"threads": 2}}
    a = _hand_experiment(tmp_path, {"vanilla": [0.05, 0.07]}, config=base, name="r4")
    b = _hand_experiment(tmp_path, {"vanilla": [0.12], "da": [0.01]}, config=r8, name="r8")
    out = subprocess.run([sys.executable, "-m", "fastbgm.report", str(a), str(b), "--out", str(tmp_path / "cmp")],
                         capture_output=True, text=True, cwd=REPO, timeout=200)
    assert out.returncode == 0, out.stderr[-2000:]
    md = (tmp_path / "cmp/comparison.md").read_text()
    assert "differ between the experiments: `stage1.copies`." in md  # not name, seeds or speed
    assert "| r4 | stage1.copies=4 | ds / net | vanilla |" in md and "| 6.0 ± 1.4 (n=2) |" in md
    assert "| r8 | stage1.copies=8 | ds / net | vanilla |" in md and "| 12.0 (n=1) |" in md
    assert "| r8 | stage1.copies=8 | ds / net | da |" in md
    rows = list(csv.DictReader((tmp_path / "cmp/comparison.csv").open()))
    assert [(r["experiment"], r["stage1.copies"], r["mode"]) for r in rows] == \
        [("r4", "4", "vanilla"), ("r8", "8", "vanilla"), ("r8", "8", "da")]
    assert abs(float(rows[1]["gap"]) - 0.12) < 1e-9
    with Image.open(tmp_path / "cmp/comparison-gaps.png") as im:
        im.verify()
    assert (a / "report/report.md").exists() and (b / "report/report.md").exists()
