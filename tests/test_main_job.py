"""The pieces of the main job and the GPU check that can be checked on a CPU."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fastbgm.config import ConfigError, load
from fastbgm.experiment import ExperimentConfig, plan

from .conftest import REPO


def test_digits_writer_is_real_embedded_data(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    from fastbgm.data.__main__ import main as data_main
    from fastbgm.data.cache import load_resident
    from fastbgm.data import Manifest

    assert data_main(["prepare", "digits", "--out", str(tmp_path), "--resolution", "8", "--quiet"]) == 0
    train, test = Manifest.for_beton(tmp_path / "train.beton"), Manifest.for_beton(tmp_path / "test.beton")
    assert train.num_samples + test.num_samples == 1797 and train.resolution == [8, 8]
    assert min(test.class_counts) >= 55  # stratified: a third of every class
    arr = load_resident(tmp_path / "train.beton")
    assert (arr.images[..., 0] == arr.images[..., 2]).all()  # grey, replicated to 3 channels
    from sklearn.datasets import load_digits

    d = load_digits()
    real = np.clip(d.images * 255 / 16, 0, 255).astype(np.uint8)
    both = np.concatenate([arr.images, load_resident(tmp_path / "test.beton").images])[..., 0]
    assert sorted(map(bytes, both)) == sorted(map(bytes, real))  # exactly the real images, each once


def test_shipped_experiment_configs_parse_and_plan() -> None:
    sizes = {}
    for p in sorted((REPO / "configs").glob("*.toml")):
        exp = load(ExperimentConfig, p)
        sizes[p.stem] = len(plan(exp))
    assert sizes["paper-mini"] == 15 and sizes["cifar10-cpu"] == 15 and sizes["rimagenet-cpu"] == 15
    assert sizes["cifar10-study"] == 3  # stage 1 + vanilla from both inits
    assert sizes["cifar10-gpu"] == 5  # the GPU check's paper section: stage 1 + 2 modes x 2 inits
    study = plan(load(ExperimentConfig, REPO / "configs/cifar10-study.toml",
                      ["--name=study-R8", "--stage1.copies=8"]))
    assert study[0].key.endswith("stage1-R8-z0.1") and study[0].config.data.copies == 8
    n4k = load(ExperimentConfig, REPO / "configs/cifar10-study.toml", ["--datasets.0.subset=4000"])
    assert n4k.datasets[0].subset == 4000 and n4k.datasets[0].name == "cifar10-jpeg"
    with pytest.raises(ConfigError, match=r"has 1 \[\[datasets\]\] table\(s\)"):
        load(ExperimentConfig, REPO / "configs/cifar10-study.toml", ["--datasets.1.subset=4000"])
    with pytest.raises(ConfigError, match="unknown config key 'subst'; did you mean 'subset'"):
        load(ExperimentConfig, REPO / "configs/cifar10-study.toml", ["--datasets.0.subst=4000"])
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.subset: expected an integer"):
        load(ExperimentConfig, REPO / "configs/cifar10-study.toml", ["--datasets.0.subset=many"])
    cpu = next(r for r in plan(load(ExperimentConfig, REPO / "configs/cifar10-cpu.toml")) if r.stage == 2)
    assert (cpu.config.stop.target_train_acc, cpu.config.stop.train_eval_every) == (1.0, 5)
    assert sizes["cifar10-paper"] == 3 * 4 * (1 + 16)  # seeds x models x (stage 1 + 8 modes x 2 inits)
    exp = load(ExperimentConfig, REPO / "configs/restricted-imagenet.toml")
    assert exp.resources.gpus == 8 and all(m.startswith("imagenet_") for m in exp.models)


def test_prepare_options_errors_name_the_key(tmp_path: Path) -> None:
    toml = tmp_path / "e.toml"
    toml.write_text('[[datasets]]\nname = "s"\ntrain = "x.beton"\nprepare = "cifar"\n')
    with pytest.raises(ConfigError, match="datasets\\[0\\].prepare: must be digits or synthetic"):
        load(ExperimentConfig, toml)


@pytest.mark.timeout(300)
def test_launch_prepares_embedded_data_and_reports(tmp_path: Path) -> None:
    from .test_launch import launch

    toml = tmp_path / "tiny.toml"
    toml.write_text(f'''
name = "tiny"
runs_dir = "{tmp_path / 'runs'}"
models = ["small_cnn"]
modes = ["vanilla"]
inits = ["random"]
[[datasets]]
name = "gen"
train = "{tmp_path / 'data/train.beton'}"
test = "{tmp_path / 'data/test.beton'}"
prepare = "synthetic"
prepare_options = {{ num_train = 128, num_test = 64, resolution = 8 }}
[model]
width = 8
depth = 2
[stage2]
max_epochs = 2
eval_every = 1
milestones = []
[resources]
gpus = 0
cpus_per_task = 1
''')
    out = launch("--config", str(toml), "--executor", "local")
    assert out.returncode == 0, out.stdout[-3000:]
    assert (tmp_path / "data/train.beton").exists() and (tmp_path / "runs/tiny/report/report.md").exists()
    assert "test accuracy" in out.stdout  # the report's table was printed at the end

    # a longer stage 2 in the same experiment: the finished run must not be reused
    toml.write_text(toml.read_text().replace("max_epochs = 2", "max_epochs = 3"))
    out = launch("--config", str(toml), "--executor", "local")
    assert out.returncode != 0
    assert "stage2-random-vanilla: stop.max_epochs" in out.stderr + out.stdout
    assert "new name" in out.stderr + out.stdout
    res = json.loads((tmp_path / "runs/tiny/gen/small_cnn/seed0/stage2-random-vanilla/result.json").read_text())
    assert res["status"] == "done" and res["epochs"] == 2  # untouched


def test_gpu_check_sections_fall_back_and_say_why(tmp_path: Path) -> None:
    from fastbgm.bench.gpu import _two_gpu_section
    from fastbgm.bench.gpu_trainer import two_stage_section

    rows = two_stage_section(torch.device("cpu"), tmp_path, tmp_path / "work", {})
    assert rows[0][0] == "two-stage" and "skipped: no" in rows[0][3]
    from fastbgm.bench.paper import run as run_paper

    rows, record = run_paper(tmp_path, tmp_path / "paper", tmp_path / "out", time.time() + 60, (12, 4))
    assert rows[0][0] == "paper" and "skipped: no prepared CIFAR-10" in rows[0][3] and "cifar10-jpeg.tar.xz" in rows[0][3]
    assert record == {} and not (tmp_path / "out").exists() and not (tmp_path / "paper").exists()
    if torch.cuda.device_count() < 2:
        assert "skipped: only one GPU" in _two_gpu_section(tmp_path)[0][3]


def test_gpu_check_holds_the_loop_and_the_trainer_to_the_bare_step() -> None:
    from fastbgm.bench.gpu_trainer import trainer_vs_bare

    results = {
        "train": [{"model": "resnet18", "batch": 128, "mode": "cudagraphs-bf16", "loader": False, "images_per_s": 40e3}],
        "pack": [{"model": "resnet18", "K": 1, "images_per_s": 38e3}, {"model": "resnet18", "K": 4, "images_per_s": 9e4}],
        "two_stage": [{"run": "stage1", "label": "step graphs", "images_per_s": 1.0, "result": {"status": "done"}},
                      *({"run": r, "label": "step graphs", "images_per_s": ips, "result": {"status": "done"}}
                        for r, ips in (("random", 35e3), ("adversarial", 37e3)))],
    }
    rows = trainer_vs_bare(results)
    assert results["loop_over_bare"] == {"compiled (reduce-overhead)": 0.95}
    assert results["trainer_over_bare"] == {"step graphs": 0.9}
    assert "skipped" in next(r[3] for r in rows if r[1] == "compiled (reduce-overhead)")  # no Trainer rows for it
    alone = {"pack": results["pack"]}  # no bare step: nothing to hold the loop to
    assert all("skipped" in r[3] for r in trainer_vs_bare(alone)) and "loop_over_bare" not in alone


def test_cache_only_prepare_trains_without_ffcv(tmp_path: Path) -> None:
    """What a GPU box without ffcv does: images -> manifest + resident cache -> training."""
    import subprocess
    import sys

    from fastbgm.data.__main__ import main as data_main

    assert data_main(["prepare", "synthetic", "--out", str(tmp_path / "d"), "--train-size", "200", "--test-size", "50",
                      "--resolution", "8", "--cache-only", "--limit-per-class", "5"]) == 0
    assert not (tmp_path / "d/train.beton").exists() and (tmp_path / "d/train.resident.npz").exists()
    code = (
        "import sys; sys.modules['ffcv'] = None\n"
        "from fastbgm.config import load\nfrom fastbgm.trainer import RunConfig, Trainer\n"
        f"cfg = load(RunConfig, None, ['--data.train={tmp_path}/d/train.beton', '--data.test={tmp_path}/d/test.beton',"
        " '--model.width=8', '--model.depth=2', '--stop.max_epochs=1'])\n"
        f"r = Trainer(cfg, {str(tmp_path / 'run')!r}).run()\nprint('STATUS', r['status'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert "STATUS done" in out.stdout, out.stderr[-2000:]
    from fastbgm.data import Manifest

    m = Manifest.for_beton(tmp_path / "d/train.beton")
    assert m.num_samples == 50 and m.class_counts == [5] * 10 and m.extra["cache_only"]


def test_bad_prepare_options_are_a_clear_error(tmp_path: Path) -> None:
    from .test_launch import launch

    toml = tmp_path / "bad.toml"
    toml.write_text(f'''
name = "bad"
runs_dir = "{tmp_path / 'runs'}"
models = ["small_cnn"]
[[datasets]]
name = "gen"
train = "{tmp_path / 'data/train.beton'}"
prepare = "synthetic"
prepare_options = {{ num_trian = 10 }}
''')
    out = launch("--config", str(toml), "--executor", "local")
    assert out.returncode == 2 and "prepare_options of 'gen'" in out.stdout and "num_trian" in out.stdout


def test_each_gpu_check_section_leaves_time_for_the_sections_asked_for_after_it() -> None:
    """A section stops starting measurements while the sections asked for after it still
    need their time (the paper most); the last one asked for may spend all that is left."""
    from fastbgm.bench.gpu import FULL, reserve_after

    assert reserve_after("pack-ceiling", ("pack-ceiling", "paper")) == FULL.paper_s
    assert reserve_after("pack-ceiling", ("pack-ceiling", "paper", "pack-processes")) == FULL.paper_s
    assert reserve_after("paper", ("pack-ceiling", "paper", "pack-processes")) == FULL.reserve_s
    assert reserve_after("paper", ("pack-ceiling", "paper")) == 0.0
    assert reserve_after("pack-processes", ("paper", "pack-processes")) == 0.0
    assert FULL.paper_s > FULL.reserve_s > 0


def test_gpu_check_smoke_runs_every_section_on_cpu(tmp_path: Path) -> None:
    """``bench gpu --smoke``: the whole GPU check, every section, at toy size on a CPU, from a
    CIFAR-10-shaped JPEG archive, as a GPU session would run it (compilation is switched
    off here for time; the compiled paths have tests of their own)."""
    import os
    import subprocess
    import sys
    import tarfile
    from importlib.util import find_spec

    from PIL import Image

    from fastbgm.bench.gpu import SECTIONS, SMOKE
    from fastbgm.data.sources import PRESETS

    rng = np.random.default_rng(0)
    src = tmp_path / "jpeg"
    for split, n in (("train", SMOKE.per_class[0] + 2), ("test", SMOKE.per_class[1] + 1)):
        for c in PRESETS["cifar10"]["classes"]:
            (src / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(src / split / c / f"{i:04d}.jpg")
    data = tmp_path / "data"
    data.mkdir()
    with tarfile.open(data / "cifar10-jpeg.tar.xz", "w:xz") as tf:
        tf.add(src, arcname="cifar10")
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1",
           "TMPDIR": str(tmp_path)}
    check = [sys.executable, "-m", "fastbgm.bench", "gpu", "--smoke", "--device", "cpu", "--data", str(data),
             "--paper-dir", "paper-runs"]  # (relative: to where the check is run)
    res = subprocess.run([*check, "--out", str(tmp_path / "out"), "--budget", "900"], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert out["scale"] == "smoke"
    rows = out["rows"]
    assert list(out["section_seconds"]) == list(SECTIONS)  # every section ran, in order
    assert not [r for r in rows if "failed" in str(r[3]) or "Traceback" in str(r[3])], rows
    skipped = [r for r in rows if "skipped" in str(r[3])]
    cannot = ["loader"] * (find_spec("ffcv") is None) + ["ddp"]  # what this machine cannot do
    assert [r[0] for r in skipped] == cannot, skipped
    # every pack measured, each run exactly as alone on a CPU but the fused (other kernels)
    packs = {k: out[k] for k in ("pack", "pack_stepgraph", "pack_unsafe", "pack_fused", "pack_processes",
                                 "pack_ceiling")}
    assert [(r["K"], r["pack_mode"]) for r in packs["pack"]] == [(1, "alone"), (2, "serial")]
    assert all(r["max_abs_diff"] == 0 for k in ("pack", "pack_stepgraph", "pack_unsafe", "pack_processes")
               for r in packs[k])
    assert [(r["K"], r["pack_mode"]) for r in packs["pack_processes"]] == [(1, "alone"), (2, "processes")]
    # the default packing beside one run at K x the batch
    assert [(r["K"], r["pack_mode"], r["batch"]) for r in packs["pack_ceiling"]] == [
        (1, "alone", SMOKE.batch), (2, "streams", SMOKE.batch), (2, f"one run, batch {2 * SMOKE.batch}", 2 * SMOKE.batch)]
    assert packs["pack_ceiling"][1]["max_abs_diff"] == 0 and packs["pack_ceiling"][1]["of_ceiling"] > 0
    assert 0 < max(r["max_abs_diff"] for r in packs["pack_fused"]) < 1e-2
    # a fused run's exactness judged a few steps in, before float differences grow
    assert all(0 < r["early_rel_diff"] < 1e-3 for r in packs["pack_fused"] if r["K"] > 1)
    # the two-stage runs trained on the decoded subset, alone and packed, all done
    two = out["two_stage"]
    assert {r["run"] for r in two} == {"stage1", "stage2-random", "stage2-adversarial"}
    assert all(r["result"]["status"] == "done" for r in two)
    assert [(p["pack_mode"], p["max_abs_diff"] == 0) for p in out["packed_vs_alone"]] == \
        [("auto", True), ("auto", True)]
    assert set(out["trainer_over_bare"]) == {"compiled (reduce-overhead)", "step graphs"}
    # the Trainer's evaluation at the training batch (auto on a CPU) and at 8 x it
    evals = [r for r in rows if r[0] == "eval"]
    assert [r[1].split("batch ")[1] for r in evals] == [f"{SMOKE.batch} (auto here)", str(8 * SMOKE.batch)], evals
    assert all(r[2] > 0 for r in evals)
    # the paper through the launcher (configs/cifar10-gpu.toml at toy size): every run done,
    # the report's claims beside the table, the report and the runs' records archived
    paper = out["paper"]
    assert paper["exit_code"] == 0 and "fastbgm.launch --config" in paper["command"]
    assert sorted(r["key"].split("/")[-1] for r in paper["results"]) == [
        "stage1-R2-z0.1", "stage2-adversarial-da_l2_m", "stage2-adversarial-vanilla", "stage2-random-da_l2_m",
        "stage2-random-vanilla"]
    assert all(r["status"] == "done" for r in paper["results"]) and paper["claims"]
    assert sum(r[0] == "paper" and r[1] == "claim" for r in rows) == len(paper["claims"])
    with tarfile.open(tmp_path / "out" / "paper-report.tar.gz") as tf:
        names = tf.getnames()
        facts = tf.extractfile("facts.md").read().decode()
    assert {"report/report.md", "report/claims.json", "report/results.csv", "launch.log"} <= set(names)
    assert "torch " in facts and "fastbgm.launch --config" in facts and "| stage1-R2-z0.1: done" in facts
    assert sum(n.endswith("/metrics.jsonl") for n in names) == 5
    assert (data / "cifar10-jpeg-{}-{}-per-class".format(*SMOKE.per_class) / "train.resident.npz").exists()
    # the paper's own subset, decoded in a process of its own while the sections before it ran
    assert paper["decoded_in_background"] and "decoded in the background" in facts
    assert paper["data"] == str(data / "cifar10-jpeg-{}-{}-per-class".format(*SMOKE.paper_per_class))
    assert not (data / "cifar10").exists()  # where a full check reads a prepared CIFAR-10: untouched
    assert not list(tmp_path.glob("fastbgm-gpu-*"))  # the runs' folders are removed
    assert "fastbgm GPU check" in res.stdout
    md = (tmp_path / "out" / "gpu.md").read_text().splitlines()  # the table for BENCHMARKS.md
    assert md[2] == "| section | what | images/s | notes |" and len(md) == 4 + len(rows)
    # the rates, as rows of the launcher's estimate table: every exact pack mode's K = 2
    # (never the unsafe one, nor fused: refused on a GPU), with its ratio to K = 1 measured beside it
    rates = json.loads((tmp_path / "out" / "throughput-rows.json").read_text())["rows"]
    # (and the Trainer's evaluation at its auto batch, the estimate's cost of an evaluated image)
    assert [(r["kind"], r["model"], r["batch"]) for r in rates[:3]] == [("step", "small_cnn", 32),
                                                                         ("trainer", "small_cnn", 32),
                                                                         ("eval", "small_cnn", 32)]
    packed = [r for r in rates[3:] if r["kind"] == "pack"]
    assert sorted((r["step"], r["pack_mode"]) for r in packed) == [
        ("cudagraphs", "serial"), ("stepgraph", "streams"), ("stepgraph", "streams"), ("stepgraph", "threads")]
    assert all(r["runs_per_gpu"] == 2 and r["x_alone"] > 0 and r["images_per_s"] > 0 for r in packed)
    # and pack-ceiling's one run at K x the batch, as a step row of that batch
    assert [(r["kind"], r["batch"], r["step"]) for r in rates[3:] if r not in packed] == [
        ("step", 2 * SMOKE.batch, "stepgraph")]
    # the paper again with the same --paper-dir (a second call while the GPU machine is
    # warm): the launch resumes what the first left, and trains nothing twice
    epochs = {f: f.read_text() for f in (tmp_path / "paper-runs").rglob("metrics.jsonl")}
    assert len(epochs) == 5
    again = subprocess.run([*check, "--out", str(tmp_path / "out2"), "--budget", "300", "--sections", "paper"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    paper2 = json.loads((tmp_path / "out2" / "gpu.json").read_text())["paper"]
    assert paper2["exit_code"] == 0 and paper2["earlier"] == {r["key"]: "done" for r in paper["results"]}
    assert {f: f.read_text() for f in epochs} == epochs  # no epoch trained again
    launch_row = next(r for r in json.loads((tmp_path / "out2" / "gpu.json").read_text())["rows"]
                      if r[0] == "paper" and r[1].startswith("launch"))
    assert "resumed an earlier call's launch, 5 runs done before it" in launch_row[3], launch_row
    assert launch_row[2] == 0  # images/s: this call's own images (none), not the first call's again
    with tarfile.open(tmp_path / "out2" / "paper-report.tar.gz") as tf:
        assert "the GPU check again: the launch resumes (5 runs done before it)" in \
            tf.extractfile("launch.log").read().decode()


def test_the_paper_sections_launch_is_stopped_when_the_budget_ends(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``paper`` section's launch gets the budget left: then SIGTERM (the launcher stops
    its trainers, which checkpoint), and a kill of its whole process group if it has not
    ended a grace period later; the report is built from what the runs did."""
    import sys

    from fastbgm.bench import paper

    polite = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(130)); time.sleep(60)"
    t0 = time.perf_counter()
    code, wall = paper._launch([sys.executable, "-c", polite], tmp_path / "a.log", 1.0)
    assert code == 130 and 1.0 <= wall < 30 and time.perf_counter() - t0 < 30
    monkeypatch.setattr(paper, "STOP_GRACE_S", 1.0)
    deaf = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    code, wall = paper._launch([sys.executable, "-c", deaf], tmp_path / "b.log", 1.0)
    assert code is None and wall < 30 and (tmp_path / "b.log").read_text() == "up\n"


def test_gpu_check_says_when_torch_compile_stops_compiling() -> None:
    """Past its recompile limit torch runs a function uncompiled, with one warning: the GPU
    check puts that warning beside its rows; the trainer and the benches raise the limit."""
    from fastbgm.bench.common import RecompileLimitHits
    from fastbgm.trainer.speed import COMPILED_VARIANTS, compile_model, recompile_limit_name

    def f(x: torch.Tensor) -> torch.Tensor:
        return (x * 2).sum()

    with torch._dynamo.config.patch(**{recompile_limit_name(): 1}), RecompileLimitHits() as hits:
        g = torch.compile(f, backend="eager", dynamic=False)
        for n in (2, 3, 4):
            g(torch.ones(n))
    limit = recompile_limit_name()
    assert len(hits.hits) == 1 and f"{limit} (1)" in hits.hits[0] and "'f'" in hits.hits[0]
    with torch._dynamo.config.patch(**{limit: 8}):
        compile_model(torch.nn.Linear(2, 2), "default")
        assert getattr(torch._dynamo.config, limit) == COMPILED_VARIANTS
