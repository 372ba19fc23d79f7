"""The launcher against the real local Slurm cluster (.ci/run starts it with
launch/slurm-start.sh), and the same experiment with the local executor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastbgm.config import load
from fastbgm.experiment import ExperimentConfig, expand_modes, parse_mode, plan
from fastbgm.fileio import read_jsonl
from fastbgm.launch.slurm import slurm_available

from .conftest import REPO

needs_slurm = pytest.mark.skipif(not slurm_available(), reason="no Slurm cluster answers here "
                                 "(start one with: bash launch/slurm-start.sh)")

EXPERIMENT = """
name = "{name}"
runs_dir = "{runs}"
models = ["small_cnn"]
seeds = [0]
modes = {modes}
inits = {inits}

[[datasets]]
name = "synthetic"
train = "{data}/train.beton"
test = "{data}/test.beton"

[model]
width = 16
depth = 3
batchnorm = {batchnorm}

[stage1]
copies = 2
lr = {stage1_lr}
momentum = 0.9
batch_size = 64
milestones = []
max_epochs = 10
target_train_acc = 1.0
check_every = 5

[stage2]
lr = 0.05
batch_size = 64
milestones = [4]
max_epochs = {epochs}
eval_every = 3

[speed]
threads = 1

[resources]
gpus = 0
cpus_per_task = 1
tasks_per_node = {tasks}
time = "00:20:00"
"""


def write_experiment(tmp: Path, data: Path, name: str = "mini", modes: str = '["vanilla", "da+l2+m"]',
                     inits: str = '["random", "adversarial"]', epochs: int = 6, stage1_lr: float = 0.05,
                     tasks: int = 0, batchnorm: str = "true") -> Path:
    p = tmp / f"{name}.toml"
    p.write_text(EXPERIMENT.format(name=name, runs=tmp / "runs", data=data, modes=modes, inits=inits,
                                   epochs=epochs, stage1_lr=stage1_lr, tasks=tasks, batchnorm=batchnorm))
    return p


def launch(*args: str, timeout: float = 280) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "fastbgm.launch", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


def results(runs_root: Path) -> dict[str, dict]:
    return {str(p.parent.relative_to(runs_root)): json.loads(p.read_text()) for p in runs_root.rglob("result.json")}


def sacct_count() -> int:
    out = subprocess.run(["sacct", "-n", "-X", "-a", "-o", "JobID", "-S", "2020-01-01"], capture_output=True,
                         text=True, timeout=30)
    return len(out.stdout.split())


def test_modes_and_plan(tmp_path: Path) -> None:
    assert len(expand_modes(["all"])) == 8 and parse_mode("m+DA") == ("da", "m")
    with pytest.raises(Exception, match="unknown regulariser 'wd'"):
        parse_mode("wd")
    exp = load(ExperimentConfig, write_experiment(tmp_path, tmp_path / "d"))
    runs = plan(exp)
    assert len(runs) == 5 and sum(r.stage == 1 for r in runs) == 1
    adv = [r for r in runs if r.init == "adversarial"]
    assert all(r.depends_on == [runs[0].key] for r in adv)
    assert all(r.config.init_from == str(runs[0].run_dir) for r in adv)
    full = next(r for r in runs if r.mode == "da+l2+m" and r.init == "random")
    assert full.config.data.augment and full.config.optim.momentum == 0.9 and full.config.optim.weight_decay == 5e-4
    van = next(r for r in runs if r.mode == "vanilla")
    assert not van.config.data.augment and van.config.optim.momentum == 0 and van.config.optim.weight_decay == 0
    assert runs[0].config.data.labels == "confusion" and runs[0].config.stop.target_train_acc == 1.0
    assert (van.config.stop.train_eval_every, van.config.stop.test_eval_every) == (3, 3)
    exp2 = load(ExperimentConfig, write_experiment(tmp_path, tmp_path / "d"), ["--stage2.check_every=1"])
    van2 = next(r for r in plan(exp2) if r.mode == "vanilla")
    assert (van2.config.stop.train_eval_every, van2.config.stop.test_eval_every) == (1, 3)
    from fastbgm.experiment.plan import parse_run_key

    for r in runs:  # the report reads back exactly what the plan wrote
        info = parse_run_key(r.key)
        assert (info["dataset"], info["model"], info["seed"], info["stage"], info["init"], info["mode"]) == \
            (r.dataset, r.model, r.seed, r.stage, r.init, r.mode)


@needs_slurm
@pytest.mark.timeout(600)
def test_experiment_on_slurm_then_relaunch_then_local_gives_same_results(tiny_dir: Path, tmp_path: Path) -> None:
    cfg = write_experiment(tmp_path, tiny_dir)
    out = launch("--config", str(cfg), "--executor", "slurm", "--timeout", "250")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    root = tmp_path / "runs" / "mini"
    res = results(root)
    assert len(res) == 5 and all(r["status"] == "done" for r in res.values()), res
    # stage 2 waited on stage 1: submitted with afterok, and started after stage 1 wrote final.pt
    s1 = root / "synthetic/small_cnn/seed0/stage1-R2-z0.1"
    s1_job = json.loads((s1 / "slurm-job.json").read_text())["job_id"]
    for mode in ("vanilla", "da_l2_m"):
        adv = root / f"synthetic/small_cnn/seed0/stage2-adversarial-{mode}"
        assert json.loads((adv / "slurm-job.json").read_text())["depends_on"] == [s1_job]
        assert (adv / "init.pt").stat().st_mtime >= (s1 / "final.pt").stat().st_mtime
    # re-launching a finished experiment submits nothing
    before = sacct_count()
    again = launch("--config", str(cfg), "--executor", "slurm", "--timeout", "60")
    assert again.returncode == 0 and "nothing to submit" in again.stdout
    assert sacct_count() == before
    # the same experiment without Slurm gives the same results
    local_cfg = write_experiment(tmp_path / "local", tiny_dir) if (tmp_path / "local").mkdir() is None else None
    loc = launch("--config", str(local_cfg), "--executor", "local")
    assert loc.returncode == 0, loc.stdout[-3000:]
    lres = results(tmp_path / "local" / "runs" / "mini")
    assert lres.keys() == res.keys()
    for k in res:
        for m in ("train_acc", "test_acc", "epochs"):
            assert lres[k][m] == pytest.approx(res[k][m], abs=1e-9), (k, m)


@needs_slurm
@pytest.mark.timeout(300)
def test_two_task_job_trains_with_gloo_ddp(tiny_dir: Path, tmp_path: Path) -> None:
    cfg = write_experiment(tmp_path, tiny_dir, name="ddp", modes='["vanilla"]', inits='["random"]', tasks=2,
                           epochs=2)
    out = launch("--config", str(cfg), "--executor", "slurm", "--timeout", "250")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = tmp_path / "runs/ddp/synthetic/small_cnn/seed0/stage2-random-vanilla"
    assert json.loads((run / "env.json").read_text())["world"] == 2
    assert json.loads((run / "result.json").read_text())["status"] == "done"


@needs_slurm
@pytest.mark.timeout(400)
def test_preempted_job_requeues_and_matches_uninterrupted(tiny_dir: Path, tmp_path: Path) -> None:
    import submitit

    cfg = write_experiment(tmp_path, tiny_dir, name="pre", modes='["vanilla"]', inits='["random"]', epochs=14)
    out = launch("--config", str(cfg), "--executor", "slurm", "--no-wait")
    assert out.returncode == 0, out.stdout[-2000:]
    run = tmp_path / "runs/pre/synthetic/small_cnn/seed0/stage2-random-vanilla"
    job_id = json.loads((run / "slurm-job.json").read_text())["job_id"]
    deadline = time.time() + 200
    while time.time() < deadline and len(read_jsonl(run / "metrics.jsonl")) < 3:
        time.sleep(0.1)
    assert len(read_jsonl(run / "metrics.jsonl")) >= 3
    job = submitit.SlurmJob(folder=str(tmp_path / "runs/pre/.submitit/%j"), job_id=job_id)
    job._interrupt()  # submitit's preemption signal: the job checkpoints and requeues itself
    follow = launch("--config", str(cfg), "--executor", "slurm", "--timeout", "250")
    assert follow.returncode == 0, follow.stdout[-3000:]
    assert json.loads((run / "slurm-job.json").read_text())["job_id"] == job_id  # same job, requeued
    log = "".join(p.read_text() for p in (tmp_path / "runs/pre/.submitit").rglob("*_log.*"))
    assert "resuming" in log  # the requeued job resumed from last.pt
    ref_cfg = write_experiment(tmp_path / "ref", tiny_dir, name="pre", modes='["vanilla"]', inits='["random"]',
                               epochs=14) if (tmp_path / "ref").mkdir() is None else None
    ref = launch("--config", str(ref_cfg), "--executor", "local")
    assert ref.returncode == 0
    a = read_jsonl(run / "metrics.jsonl")
    b = read_jsonl(tmp_path / "ref/runs/pre/synthetic/small_cnn/seed0/stage2-random-vanilla/metrics.jsonl")
    assert [r["epoch"] for r in a] == list(range(1, 15))
    for ra, rb in zip(a, b):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-6)
        assert ra.get("test_acc") == rb.get("test_acc")


@needs_slurm
@pytest.mark.timeout(300)
def test_failed_stage1_cancels_dependents_and_is_reported(tiny_dir: Path, tmp_path: Path) -> None:
    cfg = write_experiment(tmp_path, tiny_dir, name="fail", modes='["vanilla"]', stage1_lr=1e12,
                           batchnorm="false", epochs=2)
    out = launch("--config", str(cfg), "--executor", "slurm", "--timeout", "250")
    assert out.returncode == 1
    root = tmp_path / "runs/fail/synthetic/small_cnn/seed0"
    s1 = json.loads((root / "stage1-R2-z0.1/result.json").read_text())
    assert s1["status"] == "failed" and "non-finite loss" in s1["reason"]
    adv = json.loads((root / "stage2-adversarial-vanilla/result.json").read_text())
    assert adv["status"] == "cancelled" and "stage1-R2-z0.1" in adv["reason"]
    assert json.loads((root / "stage2-random-vanilla/result.json").read_text())["status"] == "done"
    text = " ".join(out.stdout.split())
    assert "non-finite loss" in text and "--retry-failed" in text
    # without --retry-failed a re-launch leaves the failure alone and keeps the dependent blocked
    again = launch("--config", str(cfg), "--executor", "slurm", "--dry-run")
    assert "keep-failed" in again.stdout and "blocked" in again.stdout


@needs_slurm
@pytest.mark.timeout(120)
def test_impossible_request_is_rejected_before_anything_waits(tiny_dir: Path, tmp_path: Path) -> None:
    cfg = write_experiment(tmp_path, tiny_dir, name="big")
    before = sacct_count()
    t0 = time.time()
    out = launch("--config", str(cfg), "--executor", "slurm", "--cpus-per-task", "512")
    assert out.returncode == 2 and "Slurm cannot satisfy this request" in " ".join(out.stdout.split())
    assert "512 CPUs per node asked" in " ".join(out.stdout.split())
    out = launch("--config", str(cfg), "--executor", "slurm", "--gpus-per-node", "8")
    assert out.returncode == 2 and "8 GPUs per node asked" in " ".join(out.stdout.split())
    assert time.time() - t0 < 60 and sacct_count() == before


def test_stopped_local_launcher_leaves_no_trainer_and_relaunch_resumes(tiny_dir: Path, tmp_path: Path) -> None:
    # SIGTERM (kill, timeout, a closed terminal) used to orphan the trainers; the next
    # launch then started a second trainer on the same folder and mixed their epochs.
    import signal

    from fastbgm.fileio import lock_holder

    cfg = write_experiment(tmp_path, tiny_dir, name="stop", modes='["vanilla"]', inits='["random"]', epochs=40)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    p = subprocess.Popen([sys.executable, "-m", "fastbgm.launch", "--config", str(cfg), "--executor", "local",
                          "--no-report"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    run = tmp_path / "runs/stop/synthetic/small_cnn/seed0/stage2-random-vanilla"
    deadline = time.time() + 120
    while time.time() < deadline and len(read_jsonl(run / "metrics.jsonl")) < 2:
        time.sleep(0.1)
    holder = lock_holder(run)
    assert holder, "the trainer did not start"
    trainer_pid = int(holder.split()[1])
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in out and "resumes" in out, out[-2000:]
    deadline = time.time() + 10
    while time.time() < deadline and Path(f"/proc/{trainer_pid}").exists() and \
            Path(f"/proc/{trainer_pid}/stat").read_text().split()[2] not in "ZX":
        time.sleep(0.1)
    assert lock_holder(run) is None  # its trainer is gone with it
    again = launch("--config", str(cfg), "--executor", "local", "--no-report")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    epochs = [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")]
    assert epochs == list(range(1, 41))
