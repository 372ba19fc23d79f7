"""The pieces of the main job and the GPU check that can be checked on a CPU."""

from __future__ import annotations

import json
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
    from fastbgm.bench.gpu import _trainer_section, _two_gpu_section

    rows = _trainer_section(torch.device("cpu"), tmp_path, tmp_path / "work", 1, {})
    assert rows[0][0] == "two-stage" and "skipped: no" in rows[0][3]
    if torch.cuda.device_count() < 2:
        assert "skipped: only one GPU" in _two_gpu_section(tmp_path)[0][3]


def test_gpu_check_holds_the_loop_and_the_trainer_to_the_bare_step() -> None:
    from fastbgm.bench.gpu import _trainer_vs_bare

    results = {
        "train": [{"model": "resnet18", "batch": 128, "mode": "cudagraphs-bf16", "loader": False, "images_per_s": 40e3}],
        "pack": [{"model": "resnet18", "K": 1, "images_per_s": 38e3}, {"model": "resnet18", "K": 4, "images_per_s": 9e4}],
        "two_stage": [{"run": "stage1", "label": "step graphs", "images_per_s": 1.0, "result": {"status": "done"}},
                      *({"run": r, "label": "step graphs", "images_per_s": ips, "result": {"status": "done"}}
                        for r, ips in (("random", 35e3), ("adversarial", 37e3)))],
    }
    rows = _trainer_vs_bare(results)
    assert results["loop_over_bare"] == {"compiled (reduce-overhead)": 0.95}
    assert results["trainer_over_bare"] == {"step graphs": 0.9}
    assert "skipped" in next(r[3] for r in rows if r[1] == "compiled (reduce-overhead)")  # no Trainer rows for it
    alone = {"pack": results["pack"]}  # no bare step: nothing to hold the loop to
    assert all("skipped" in r[3] for r in _trainer_vs_bare(alone)) and "loop_over_bare" not in alone


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
