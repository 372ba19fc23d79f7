"""The launcher against the real local Slurm cluster (.ci/run starts it with
launch/slurm-start.sh), and the same experiment with the local executor."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from fastbgm.config import load
from fastbgm.experiment import ExperimentConfig, expand_modes, parse_mode, plan
from fastbgm.fileio import read_jsonl
from fastbgm.launch.trainproc import last_error
from fastbgm.launch.cluster import job_end, queue, slurm_available

from .conftest import REPO, resize_disk, small_disk

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
max_epochs = {stage1_epochs}
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
checkpoint_every_s = 0  # every epoch: the faults here land mid-run

[resources]
gpus = 0
cpus_per_task = 1
time = "00:20:00"
"""


def write_experiment(tmp: Path, data: Path, name: str = "mini", modes: str = '["vanilla", "da+l2+m"]',
                     inits: str = '["random", "adversarial"]', epochs: int = 6, stage1_lr: float = 0.05,
                     batchnorm: str = "true", seeds: str = "[0]", stage1_epochs: int = 10) -> Path:
    p = tmp / f"{name}.toml"
    p.write_text(EXPERIMENT.format(name=name, runs=tmp / "runs", data=data, modes=modes, inits=inits,
                                   epochs=epochs, stage1_lr=stage1_lr, batchnorm=batchnorm,
                                   stage1_epochs=stage1_epochs)
                 .replace("seeds = [0]", f"seeds = {seeds}"))
    return p


LAUNCH_ENV = {"OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def launch(*args: str, timeout: float = 280) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastbgm.launch", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **LAUNCH_ENV})


# ``python -c WARM_LAUNCH ARGS``: the launcher with its imports done, waiting for a line
# on stdin before it runs ARGS (a relaunch that reads the queue the moment it is let go)
WARM_LAUNCH = ("import sys, torch, submitit; from fastbgm.launch.__main__ import main; "
               "import fastbgm.launch.slurm, fastbgm.launch.cluster, fastbgm.launch.common, fastbgm.launch.local, fastbgm.experiment; "
               "print('ready', flush=True); sys.stdin.readline(); sys.exit(main(sys.argv[1:]))")


def launch_in_background(*args: str) -> subprocess.Popen:
    """:func:`launch` without waiting: its output (stdout and stderr together) is read when it ends."""
    return subprocess.Popen([sys.executable, "-m", "fastbgm.launch", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO, env={**os.environ, **LAUNCH_ENV})


def results(runs_root: Path) -> dict[str, dict]:
    return {str(p.parent.relative_to(runs_root)): json.loads(p.read_text()) for p in runs_root.rglob("result.json")}


def sacct_count() -> int:
    out = subprocess.run(["sacct", "-n", "-X", "-a", "-o", "JobID", "-S", "2020-01-01"], capture_output=True,
                         text=True, timeout=30)
    return len(out.stdout.split())


def sbatch(out: Path, script: str, *options: str) -> str:
    """Submit a one-CPU batch script (its output to ``out``); its job id."""
    return subprocess.run(["sbatch", "--parsable", "-c", "1", "-o", str(out), *options, "--wrap", script],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip().split(";")[0]


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


def test_off_a_terminal_the_launch_says_each_change_of_a_run_in_one_line(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """In a log (nohup, Slurm, tee, CI) rich's live table shows nothing until its last
    frame: the log of a 14-minute main job was silent. Each change is a line instead."""
    import io

    from rich.console import Console

    from fastbgm.fileio import atomic_write_json
    from fastbgm.launch import common
    from fastbgm.launch.trainproc import mark_cancelled, start_line
    from fastbgm.trainer import checkpoint as C

    runs = plan(load(ExperimentConfig, write_experiment(tmp_path, tmp_path / "d")))
    s1, rnd, adv = runs[0], runs[1], runs[3]
    buf = io.StringIO()
    console = Console(file=buf, width=300)
    assert not console.is_terminal
    lines = lambda: [x.split(" ", 1)[1] for x in buf.getvalue().splitlines() if re.match(r"\d\d:\d\d:\d\d ", x)]
    with common.runs_view(runs, {rnd.key: "done"}, "fastbgm local", console, refresh_per_second=1) as view:
        view.show({rnd.key: "done"})
        assert lines() == []  # what was so before the launch is not news
        # a run seen running once it has trained 2 epochs: it started from epoch 0 (its
        # trainer's result.json says so), not from the epoch it is at
        s1.run_dir.mkdir(parents=True)
        atomic_write_json(s1.run_dir / C.RESULT, {"status": "running", "epoch": 0, "written": time.time()})
        rows = [{"epoch": e, "train_acc": 0.5, "checkpointed": e < 3} for e in (1, 2, 3)]
        (s1.run_dir / C.METRICS).write_text("".join(json.dumps(x) + "\n" for x in rows[:2]))
        view.show({rnd.key: "done", s1.key: "running"})
        (s1.run_dir / C.METRICS).write_text("".join(json.dumps(x) + "\n" for x in rows))
        (s1.run_dir / C.TRAIN_LOG).write_text(start_line("start") + "error: no progress for 60 s; it resumes\n")
        view.show({rnd.key: "done"})  # a hung trainer killed, its run to resume
        # started again, before its trainer says from where: from its last checkpoint (epoch 2)
        view.show({rnd.key: "done", s1.key: "running"})
        (s1.run_dir / C.METRICS).write_text('{"epoch": 10, "train_acc": 1.0, "test_acc": 0.25}\n')
        atomic_write_json(s1.run_dir / C.RESULT, {"status": "done"})
        mark_cancelled(adv.run_dir, adv.key, "its stage-1 run diverged")
        view.show({rnd.key: "done", s1.key: "done", adv.key: "cancelled"})
        monkeypatch.setattr(common, "HEARTBEAT_S", -1.0)
        view.show({rnd.key: "done", s1.key: "done", adv.key: "cancelled", runs[2].key: "running"},
                  "1 job pending (Dependency)")
    assert lines() == [
        f"{s1.key}: pending -> running",
        f"{s1.key}: running -> pending (error: no progress for 60 s)",
        f"{s1.key}: pending -> running (from epoch 2)",
        f"{s1.key}: running -> done (epoch 10, train acc 1.000, test acc 0.250)",
        f"{adv.key}: pending -> cancelled: its stage-1 run diverged",
        f"{runs[2].key}: pending -> running",
        f"1 running, 1 pending, 2 done, 1 cancelled of 5 ({runs[2].key} epoch 0); 1 job pending (Dependency)",
    ], buf.getvalue()
    assert buf.getvalue().rstrip("\n").endswith("┘")  # and the last table, whole


@needs_slurm
@pytest.mark.timeout(600)
def test_experiment_on_slurm_then_relaunch_then_local_gives_same_results(tiny_dir: Path, tmp_path: Path) -> None:
    cfg = write_experiment(tmp_path, tiny_dir)
    out = launch("--config", str(cfg), "--executor", "slurm", "--jobs", "per-run", "--timeout", "250")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    root = tmp_path / "runs" / "mini"
    res = results(root)
    assert len(res) == 5 and all(r["status"] == "done" for r in res.values()), res
    for key in res:  # a launch in a pipe says each run's end in a line of its own
        assert re.search(rf"^\d\d:\d\d:\d\d {re.escape(key)}: (pending|running) -> done \(epoch ", out.stdout, re.M), \
            out.stdout[-3000:]
    # stage 2 waited on stage 1: submitted with afterok, and started after stage 1 wrote final.pt
    s1 = root / "synthetic/small_cnn/seed0/stage1-R2-z0.1"
    s1_job = json.loads((s1 / "slurm-job.json").read_text())["job_id"]
    for mode in ("vanilla", "da_l2_m"):
        adv = root / f"synthetic/small_cnn/seed0/stage2-adversarial-{mode}"
        assert json.loads((adv / "slurm-job.json").read_text())["depends_on"] == [s1_job]
        assert (adv / "init.pt").stat().st_mtime >= (s1 / "final.pt").stat().st_mtime
    # every job asked to be requeued on a node failure, whatever the cluster's JobRequeue
    scripts = list((root / ".submitit").glob("*/*.sh"))
    assert scripts and all("#SBATCH --requeue" in x.read_text().splitlines() for x in scripts)
    # re-launching a finished experiment submits nothing
    before = sacct_count()
    again = launch("--config", str(cfg), "--executor", "slurm", "--jobs", "per-run", "--timeout", "60")
    assert again.returncode == 0 and "nothing to submit" in again.stdout
    assert sacct_count() == before
    # the same experiment without Slurm gives the same results
    local_cfg = write_experiment(tmp_path / "local", tiny_dir) if (tmp_path / "local").mkdir() is None else None
    # (2 runs a process: fewer process starts; packing changes no result, bitwise on a CPU:
    # test_local_runs_per_gpu_packs_runs_and_changes_no_result)
    loc = launch("--config", str(local_cfg), "--executor", "local", "--runs-per-gpu", "2")
    assert loc.returncode == 0, loc.stdout[-3000:]
    lres = results(tmp_path / "local" / "runs" / "mini")
    assert lres.keys() == res.keys()
    assert all(f"{key}: running -> done (epoch " in loc.stdout for key in res), loc.stdout[-3000:]
    for k in res:
        for m in ("train_acc", "test_acc", "epochs"):
            assert lres[k][m] == pytest.approx(res[k][m], abs=1e-9), (k, m)


@needs_slurm
@pytest.mark.timeout(400)
def test_preempted_job_requeues_and_matches_uninterrupted(tiny_dir: Path, tmp_path: Path) -> None:
    import submitit

    cfg = write_experiment(tmp_path, tiny_dir, name="pre", modes='["vanilla"]', inits='["random"]', epochs=14)
    out = launch("--config", str(cfg), "--executor", "slurm", "--jobs", "per-run", "--no-wait")
    assert out.returncode == 0, out.stdout[-2000:]
    run = tmp_path / "runs/pre/synthetic/small_cnn/seed0/stage2-random-vanilla"
    job_id = json.loads((run / "slurm-job.json").read_text())["job_id"]
    deadline = time.time() + 200
    while time.time() < deadline and len(read_jsonl(run / "metrics.jsonl")) < 3:
        time.sleep(0.1)
    assert len(read_jsonl(run / "metrics.jsonl")) >= 3
    job = submitit.SlurmJob(folder=str(tmp_path / "runs/pre/.submitit/%j"), job_id=job_id)
    job._interrupt()  # submitit's preemption signal: the job checkpoints and requeues itself
    follow = launch("--config", str(cfg), "--executor", "slurm", "--jobs", "per-run", "--timeout", "250")
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
def test_per_run_jobs_cancel_dependents_of_a_failed_stage1_without_cluster_help(tiny_dir: Path,
                                                                                  tmp_path: Path) -> None:
    # The test cluster has no DependencyParameters=kill_invalid_depend (like most
    # clusters): fastbgm cancels the array of a failed stage 1 itself.
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    assert "kill_invalid_depend" not in "".join(x for x in conf.read_text().splitlines() if not x.startswith("#"))
    cfg = write_experiment(tmp_path, tiny_dir, name="fail", modes='["vanilla", "da+l2+m", "l2"]', stage1_lr=1e12,
                           batchnorm="false", epochs=2)
    out = launch("--config", str(cfg), "--executor", "slurm", "--jobs", "per-run", "--max-parallel", "2",
                 "--timeout", "250")
    assert out.returncode == 1, out.stdout[-3000:]
    root = tmp_path / "runs/fail/synthetic/small_cnn/seed0"
    s1 = json.loads((root / "stage1-R2-z0.1/result.json").read_text())
    assert s1["status"] == "failed" and "non-finite loss" in s1["reason"]
    adv_jobs = set()
    for mode in ("vanilla", "da_l2_m", "l2"):
        adv = json.loads((root / f"stage2-adversarial-{mode}/result.json").read_text())
        assert adv["status"] == "cancelled" and "stage1-R2-z0.1" in adv["reason"]
        adv_jobs.add(json.loads((root / f"stage2-adversarial-{mode}/slurm-job.json").read_text())["job_id"]
                     .split("_")[0])
        assert json.loads((root / f"stage2-random-{mode}/result.json").read_text())["status"] == "done"
    assert len(adv_jobs) == 1  # the dependents of one stage-1 run are one job array
    # --max-parallel is the array throttle: never more than 2 random-init runs at once
    spans = [(json.loads((root / f"stage2-random-{m}/env.json").read_text())["started"],
              json.loads((root / f"stage2-random-{m}/result.json").read_text())["written"])
             for m in ("vanilla", "da_l2_m", "l2")]
    assert max(sum(a <= t < b for a, b in spans) for t, _ in spans) <= 2
    text = " ".join(out.stdout.split())
    assert "non-finite loss" in text and "--retry-failed" in text
    s1_log = next((tmp_path / "runs/fail/.submitit").rglob(
        json.loads((root / "stage1-R2-z0.1/slurm-job.json").read_text())["job_id"] + "_0_log.err")).read_text()
    assert "non-finite loss" in s1_log and "Traceback" not in s1_log, s1_log[-3000:]  # failed, not a bug
    # without --retry-failed a re-launch leaves the failure alone and keeps the dependents blocked
    again = launch("--config", str(cfg), "--executor", "slurm", "--jobs", "per-run", "--dry-run")
    assert "keep-failed" in again.stdout and "blocked" in again.stdout


@needs_slurm
@pytest.mark.timeout(300)
def test_runs_that_cannot_read_their_dataset_fail_saying_why_locally_and_as_per_run_jobs(tiny_dir: Path,
                                                                                        tmp_path: Path) -> None:
    # A per-run job whose trainer raised (here: a .beton of random bytes) ended FAILED with
    # nothing written in its run folder: the launch called the run "pending", and its
    # dependents "stopped unfinished; the same command resumes it", which no launch could.
    # The local executor recorded such runs failed, but only "exited with code 2".
    data = tmp_path / "data"
    data.mkdir()
    for f in tiny_dir.iterdir():
        if f.is_file() and not f.name.endswith(".npz"):
            (data / f.name).write_bytes(f.read_bytes())
    (data / "train.beton").write_bytes(os.urandom((tiny_dir / "train.beton").stat().st_size))
    for executor, how in (("local", []), ("slurm", ["--jobs", "per-run"])):
        (tmp_path / executor).mkdir()
        cfg = write_experiment(tmp_path / executor, data, name=executor, modes='["vanilla"]')
        out = launch("--config", str(cfg), "--executor", executor, *how, "--no-report", "--timeout", "200")
        text = " ".join(out.stdout.split())
        assert out.returncode == 1 and "--retry-failed" in text, text[-3000:]
        # (the live table's last frame ends its line in a pipe too, not glued to the next one)
        assert all(line.rstrip().endswith("┘") for line in out.stdout.splitlines() if "└" in line), out.stdout
        root = tmp_path / executor / "runs" / executor / "synthetic/small_cnn/seed0"
        for run in ("stage1-R2-z0.1", "stage2-random-vanilla"):
            res = json.loads((root / run / "result.json").read_text())
            assert res["status"] == "failed" and "train.beton cannot be read as a .beton" in res["reason"], res
        adv = json.loads((root / "stage2-adversarial-vanilla/result.json").read_text())
        assert adv["status"] == "cancelled" and "stage1-R2-z0.1 failed" in adv["reason"], (executor, adv)
        # the run folder's train.log ends with the trainer's error, whatever ran it (a
        # per-run job's trainer logged only to submitit's log, in the experiment's folder)
        assert "cannot be read as a .beton" in last_error(root / "stage1-R2-z0.1"), executor
        # a mistake with its fix is said without a traceback, in a per-run job's log too
        logs = [p.read_text() for p in (tmp_path / executor / "runs").rglob("*.err")]
        assert all("Traceback" not in x for x in logs) and any(".beton" in x for x in logs) == (executor == "slurm")


@needs_slurm
@pytest.mark.timeout(400)
def test_per_run_dependents_of_a_stage1_job_ended_unfinished_say_so_and_are_planned_again(tiny_dir: Path,
                                                                                         tmp_path: Path) -> None:
    # A stage-1 job that ends with its run unfinished (cancelled here; a full disk, a kill)
    # leaves its dependents' jobs never to start. They were marked "its stage-1 run ...
    # failed", which it had not: the next launch resumes it and runs them.
    cfg = write_experiment(tmp_path, tiny_dir, name="gone", modes='["vanilla"]', inits='["adversarial"]')
    args = ["--config", str(cfg), "--executor", "slurm", "--jobs", "per-run", "--no-report",
            "--stage1.max_epochs=400", "--stage1.target_train_acc=0"]
    p = launch_in_background(*args, "--timeout", "300")
    s1 = tmp_path / "runs/gone/synthetic/small_cnn/seed0/stage1-R2-z0.1"
    deadline = time.time() + 200
    while time.time() < deadline and len(read_jsonl(s1 / "metrics.jsonl")) < 2:
        time.sleep(0.2)
    job = json.loads((s1 / "slurm-job.json").read_text())["job_id"]
    subprocess.run(["scancel", job], check=True, timeout=60)
    out, _ = p.communicate(timeout=320)
    adv = json.loads((s1.parent / "stage2-adversarial-vanilla/result.json").read_text())
    assert adv["status"] == "cancelled", out[-3000:]
    assert f"stage1-R2-z0.1 stopped unfinished (its job {job} ended CANCELLED" in adv["reason"], adv
    said = " ".join(out.split())  # and where the stopped run's trainer logged
    assert f"stage1-R2-z0.1: its job {job} ended CANCELLED with the run unfinished; its log is " in said, said[-3000:]
    log = (s1 / "train.log").read_text()  # and its trainer's log lines are in the run folder
    assert f"stage1-R2-z0.1 in Slurm job {job}" in log and "stage1-R2-z0.1 epoch 1 " in log, log[-3000:]
    plan_again = launch(*args, "--dry-run")
    rows = {line.split()[1].rsplit("/", 1)[-1]: line for line in plan_again.stdout.splitlines() if "seed0/" in line}
    assert "resume" in rows["stage1-R2-z0.1"] and "submit" in rows["stage2-adversarial-vanilla"], plan_again.stdout


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
    out = launch("--config", str(cfg), "--executor", "slurm", "--nodes", "9")
    assert out.returncode == 2 and "9 nodes asked" in " ".join(out.stdout.split())
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


def test_a_local_ddp_run_whose_rank_is_killed_starts_again_in_the_same_launch(tiny_dir: Path, tmp_path: Path) -> None:
    """torchrun exits 1 however a rank ended, and the local launcher recorded a 2-rank run
    whose rank 1 the OOM killer ended as failed ("exited with code 1"), until
    --retry-failed. Now torchrun runs under fastbgm.launch.ddplocal, which exits as the
    killed rank did (128 + 9): the run starts again from its last checkpoint in the same
    launch and ends as an uninterrupted run."""
    (tmp_path / "ref").mkdir()
    cfgs = [write_experiment(d, tiny_dir, name="ddp", modes='["vanilla"]', inits='["random"]', epochs=40)
            for d in (tmp_path, tmp_path / "ref")]
    args = ("--executor", "local", "--ranks-per-run", "2", "--gpus-per-node", "2", "--resources.ranks_per_node=2",
            "--no-report")
    ref = launch_in_background("--config", str(cfgs[1]), *args)  # uninterrupted, beside it
    follower = launch_in_background("--config", str(cfgs[0]), *args)
    run = tmp_path / "runs/ddp/synthetic/small_cnn/seed0/stage2-random-vanilla"
    deadline = time.time() + 120
    while time.time() < deadline and len(read_jsonl(run / "metrics.jsonl")) < 3:
        time.sleep(0.02)
    rank1 = [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _rank_of(int(pid), run) == 1]
    assert len(rank1) == 1, rank1
    os.kill(rank1[0], signal.SIGKILL)
    out, _ = follower.communicate(timeout=240)
    assert follower.returncode == 0, out[-3000:]
    assert "its process was killed by signal 9 (SIGKILL); it starts again from its last checkpoint" in out, out[-3000:]
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, 41))
    out, _ = ref.communicate(timeout=240)
    assert ref.returncode == 0, out[-3000:]
    got, want = results(tmp_path / "runs" / "ddp"), results(tmp_path / "ref" / "runs" / "ddp")
    for m in ("status", "epochs", "train_acc", "train_loss", "test_acc", "test_loss"):
        assert got[next(iter(got))][m] == want[next(iter(want))][m], m


def test_a_local_ddp_runs_status_is_the_rank_that_ended_it() -> None:
    """What fastbgm.launch.ddplocal exits with, from the ranks' exits torchrun saw
    (negative: killed by that signal)."""
    from fastbgm.launch.ddplocal import exit_status
    from fastbgm.train import PEER_LOST_EXIT, STOP_EXIT

    assert exit_status({}) == 0
    assert exit_status({0: STOP_EXIT, 1: -9}) == 128 + 9  # rank 1 killed; torchrun then stopped rank 0
    assert exit_status({0: PEER_LOST_EXIT, 1: -9}) == 128 + 9
    assert exit_status({0: -15, 1: -11}) == 128 + 11  # (SIGTERM: torchrun's own, to the ranks left)
    assert exit_status({0: PEER_LOST_EXIT, 1: 1}) == 1  # rank 1's error, which it wrote down
    assert exit_status({0: 74, 1: STOP_EXIT}) == 74
    assert exit_status({0: PEER_LOST_EXIT, 1: PEER_LOST_EXIT}) == PEER_LOST_EXIT
    assert exit_status({0: STOP_EXIT, 1: -15}) == STOP_EXIT


def _rank_of(pid: int, run: Path) -> int | None:
    """The DDP rank (torchrun's RANK) of trainer process ``pid`` if it trains ``run``."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        env = dict(x.split(b"=", 1) for x in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in x)
    except OSError:
        return None
    if b"fastbgm.train" not in cmd or str(run).encode() not in cmd or b"RANK" not in env:
        return None
    return int(env[b"RANK"])


def _cluster_shape() -> tuple[int, int]:
    """(nodes, most GPUs on a node) of the running test cluster."""
    from fastbgm.launch.cluster import cluster_capacity

    cap = cluster_capacity()
    return cap["nodes"], cap["gpus"]


needs_multinode = pytest.mark.skipif(not slurm_available() or _cluster_shape() < (2, 2),
                                     reason="needs the multi-node test cluster: "
                                            "bash launch/slurm-start.sh --nodes 2 --gpus-per-node 2")


def _spans(root: Path) -> dict[str, dict]:
    """Per run: when it started and ended, where it ran, in which job."""
    out = {}
    for env_file in root.rglob("env.json"):
        run = env_file.parent
        env = json.loads(env_file.read_text())
        res = json.loads((run / "result.json").read_text())
        out[str(run.relative_to(root))] = {"start": env["started"], "end": res["written"], "hosts": env["hosts"],
                                           "gpus": env["cuda_visible_devices"], "job": env["slurm_job"]}
    return out


_LOCAL_ALLOC: dict[str, dict] = {}  # the local executor's results of the "alloc" experiment, run once


@needs_multinode
@pytest.mark.timeout(600)
@pytest.mark.parametrize("k", [1, 2])
def test_allocation_packs_the_runs_onto_its_gpus_and_matches_local(tiny_dir: Path, tmp_path: Path, k: int) -> None:
    # K = 1: 10 runs (6 ready at once), each on its own (node, GPU) of 2 x 2. K = 2: 15 runs
    # on 2 x 1 GPUs, up to 2 per GPU in one job step; a pack whose runs end asks for more
    # and takes the runs ready by then (its inbox on the shared disk)
    n_seeds = 2 if k == 1 else 3
    cfg = write_experiment(tmp_path, tiny_dir, name="alloc", seeds=str(list(range(n_seeds))), epochs=4)
    before = sacct_count()
    gpus = 2 if k == 1 else 1
    out = launch("--config", str(cfg), "--executor", "slurm", "--nodes", "2", "--gpus-per-node", str(gpus),
                 "--runs-per-gpu", str(k), "--timeout", "500", "--no-report", timeout=560)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert sacct_count() == before + 1  # ONE job for the experiment
    root = tmp_path / "runs" / "alloc"
    job = json.loads((root / "slurm-allocation.json").read_text())["job_id"]
    spans = _spans(root)
    assert len(spans) == 5 * n_seeds and {s["job"] for s in spans.values()} == {job}
    events = sorted(t for s in spans.values() for t in (s["start"], s["end"]))
    for t in events:  # at every moment: at most K runs on each of the 2 x gpus (node, GPU)
        live = [s for s in spans.values() if s["start"] <= t < s["end"]]
        assert len(live) <= 2 * gpus * k
        places = [(s["hosts"][0], s["gpus"]) for s in live]
        assert max(places.count(x) for x in places) <= k if places else True, places
    assert {s["hosts"][0] for s in spans.values()} == {"node1", "node2"}
    for key, s in spans.items():
        if "stage2-adversarial" in key:
            parent = key.rsplit("/", 1)[0] + "/stage1-R2-z0.1"
            assert s["start"] >= spans[parent]["end"], key
    assert not list(root.rglob("pack-inbox*"))
    if k > 1:  # a job step trained a run it was given while it ran
        assert any("joins the pack" in p.read_text() for p in root.rglob("train.log"))
    if not _LOCAL_ALLOC:
        (tmp_path / "local").mkdir()
        local_cfg = write_experiment(tmp_path / "local", tiny_dir, name="alloc", seeds="[0, 1]", epochs=4)
        loc = launch("--config", str(local_cfg), "--executor", "local", "--no-report", "--runs-per-gpu", "2")
        assert loc.returncode == 0, loc.stdout[-3000:]
        _LOCAL_ALLOC.update(results(tmp_path / "local" / "runs" / "alloc"))
    res = results(root)
    assert set(res) >= set(_LOCAL_ALLOC) and len(_LOCAL_ALLOC) == 10  # seeds 0 and 1: same configs, same results
    for key in _LOCAL_ALLOC:
        for m in ("train_acc", "test_acc", "epochs", "train_loss"):
            assert res[key][m] == _LOCAL_ALLOC[key][m], (key, m)


def _stop_a_trainer(run: Path, epochs: int = 3, sig: int = signal.SIGSTOP) -> int:
    """SIGSTOP ``run``'s trainer once it has ``epochs`` epochs (a hang: it holds its
    folder and slot, and makes no progress), or send it ``sig``; its pid."""
    from fastbgm.fileio import lock_holder

    deadline = time.time() + 240
    while time.time() < deadline and not (len(read_jsonl(run / "metrics.jsonl")) >= epochs and lock_holder(run)):
        time.sleep(0.1)
    holder = lock_holder(run)
    assert holder, "the trainer did not start"
    pid = int(holder.split()[1])
    os.kill(pid, sig)
    return pid


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] in "ZX"


def _hang_a_run(tmp_path: Path, tiny_dir: Path, name: str, *launch_args: str) -> tuple[str, Path, Path]:
    """Launch a 14-epoch vanilla experiment with ``launch_args`` and --stall-timeout 15,
    SIGSTOP its random-init run's trainer 3 epochs in, and let the launch end, which must
    exit 0 with every run as uninterrupted, the stopped trainer gone: (the launch's
    output, the experiment folder, that run's folder)."""
    reference = _local_reference(tmp_path, tiny_dir, name=name)
    cfg = write_experiment(tmp_path, tiny_dir, name=name, modes='["vanilla"]', epochs=14)
    p = launch_in_background("--config", str(cfg), *launch_args, "--no-report", "--stall-timeout", "15")
    root = tmp_path / "runs" / name
    run = root / "synthetic/small_cnn/seed0/stage2-random-vanilla"
    pid = _stop_a_trainer(run)
    out, _ = p.communicate(timeout=450)
    assert p.returncode == 0, out[-3000:]
    assert _gone(pid)
    _assert_as_uninterrupted(root, reference())
    return out, root, run


@pytest.mark.timeout(600)
def test_a_hung_local_trainer_is_killed_and_its_run_resumes_within_the_same_launch(tiny_dir: Path,
                                                                                 tmp_path: Path) -> None:
    """A trainer that stops making progress (stopped, as a deadlock or a lost collective
    would leave it) holds its slot for ever, and its dependents wait on it. The launch
    sees its heartbeat stand still for --stall-timeout, kills it, and starts its run again
    from its last checkpoint: the same launch ends with every run as if uninterrupted."""
    out, _, run = _hang_a_run(tmp_path, tiny_dir, "hang", "--executor", "local")
    assert "stage2-random-vanilla: no progress for" in out and "taken as hung" in out, out[-3000:]
    assert "resuming" in (run / "train.log").read_text()


def _allocation_args(cfg: Path) -> list[str]:
    """The launch of ``cfg`` as one allocation on the 2-node cluster."""
    return ["--config", str(cfg), "--executor", "slurm", "--nodes", "2", "--gpus-per-node", "2", "--no-report"]


def _allocation_three_epochs_in(tmp_path: Path, tiny_dir: Path, **kw: Any) -> tuple[list[str], Path, str, Path]:
    """Submit a 14-epoch vanilla experiment as one allocation on the 2-node cluster and
    wait until its random-init run has 3 epochs: (launch args, experiment folder, job id,
    that run's folder)."""
    args = _allocation_args(write_experiment(tmp_path, tiny_dir, modes='["vanilla"]', epochs=14, **kw))
    out = launch(*args, "--no-wait")
    assert out.returncode == 0, out.stdout[-3000:]
    root = tmp_path / "runs" / kw["name"]
    job = json.loads((root / "slurm-allocation.json").read_text())["job_id"]
    run = root / "synthetic/small_cnn/seed0/stage2-random-vanilla"
    deadline = time.time() + 240
    while time.time() < deadline and len(read_jsonl(run / "metrics.jsonl")) < 3:
        time.sleep(0.2)
    assert len(read_jsonl(run / "metrics.jsonl")) >= 3
    return args, root, job, run


# the uninterrupted launches started so far, by what they were started with: an
# experiment's name enters no run's config, so tests whose experiments differ only in
# name compare with one reference (six fewer 14-epoch launches in the suite)
_REFERENCES: dict[tuple, tuple[subprocess.Popen, Path, list]] = {}


def _local_reference(tmp_path: Path, tiny_dir: Path, name: str, **kw: Any) -> Callable[[], Path]:
    """Start the same experiment, uninterrupted, with the local executor, beside the test's
    own (2 runs a process: fewer process starts; packing changes no result, bitwise on a
    CPU), unless an earlier test started it; returns what waits for it and gives its
    experiment folder."""
    key = (str(tiny_dir), *sorted(kw.items()))
    if key not in _REFERENCES:
        (tmp_path / "ref").mkdir()
        cfg = write_experiment(tmp_path / "ref", tiny_dir, name=name, modes='["vanilla"]', **{"epochs": 14, **kw})
        p = launch_in_background("--config", str(cfg), "--executor", "local", "--no-report", "--runs-per-gpu", "2")
        _REFERENCES[key] = (p, tmp_path / "ref" / "runs" / name, [])
    p, root, said = _REFERENCES[key]

    def wait() -> Path:
        if not said:
            said.append(p.communicate(timeout=300)[0])
        assert p.returncode == 0, said[0][-3000:]
        return root
    return wait


@needs_multinode
@pytest.mark.timeout(600)
def test_an_allocation_whose_driver_is_killed_requeues_itself_and_resumes_every_run_exactly(tiny_dir: Path,
                                                                                          tmp_path: Path) -> None:
    """The allocation's driver killed by a signal (the OOM killer, say; its steps go on
    without it): its batch script requeues the job, as an admin's ``scontrol requeue``
    or a preemption would, and every run resumes from its last checkpoint, with the
    numbers of an uninterrupted run."""
    from fastbgm.bench.localslurm import job_process

    reference = _local_reference(tmp_path, tiny_dir, name="rq")
    args, root, job, _ = _allocation_three_epochs_in(tmp_path, tiny_dir, name="rq")
    os.kill(job_process(job, b"submitit.core._submit"), signal.SIGKILL)
    follow = launch(*args, "--timeout", "450", timeout=500)  # follows the same job, submits nothing
    assert follow.returncode == 0, follow.stdout[-3000:]
    assert json.loads((root / "slurm-allocation.json").read_text())["job_id"] == job
    # (its steps train on without the driver for the seconds the batch script takes to
    # requeue the job: the runs it found unfinished say so; the driver starts again in it)
    logs = "".join(p.read_text() for p in root.rglob("train.log"))
    assert f"allocation {job} (restart 1)" in (root / ".submitit" / job / f"{job}_0_log.err").read_text()
    assert (f"error: its driver was killed by signal 9 (SIGKILL) in job {job} (1 of 3 in that job); the job is "
            "requeued and resumes every unfinished run from its last checkpoint") in logs, logs[-3000:]
    assert json.loads((root / "kills.json").read_text()) == {job: 1}
    ref = reference()
    for key, r in results(root).items():
        assert r["status"] == "done"
        rows = read_jsonl(root / key / "metrics.jsonl")
        assert [x["epoch"] for x in rows] == list(range(1, r["epochs"] + 1))  # nothing trained twice
        assert "already done" not in (root / key / "train.log").read_text()
        ref_rows = read_jsonl(ref / key / "metrics.jsonl")
        assert [x["train_loss"] for x in rows] == [x["train_loss"] for x in ref_rows], key


@needs_multinode
@pytest.mark.timeout(600)
def test_a_hung_step_of_an_allocation_is_killed_and_its_run_resumes_in_the_same_job(tiny_dir: Path,
                                                                                    tmp_path: Path) -> None:
    """The same on Slurm: the allocation's driver finds the hung run's job step by name,
    SIGKILLs its tasks (scancel of the step; a stopped task too) and starts the run
    again, in the same job, which is never requeued."""
    _, root, run = _hang_a_run(tmp_path, tiny_dir, "hs", "--executor", "slurm", "--nodes", "2", "--gpus-per-node",
                               "2", "--timeout", "400")
    job = json.loads((root / "slurm-allocation.json").read_text())["job_id"]
    log = (root / ".submitit" / job / f"{job}_0_log.err").read_text()
    assert "stage2-random-vanilla: no progress for" in log and "taken as hung" in log, log[-3000:]
    history = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-o", "State", "-j", job], capture_output=True,
                             text=True, timeout=60).stdout.split()
    assert history == ["COMPLETED"], history  # never requeued
    assert "resuming" in (run / "train.log").read_text()


def _wait_out(jobs: list[str], timeout_s: float = 400) -> None:
    """Until none of ``jobs`` is in the queue (no launch follows them)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and queue(jobs):
        time.sleep(1)
    assert not queue(jobs), "the jobs did not end"


@needs_slurm
@pytest.mark.timeout(600)
def test_a_hung_per_run_job_requeues_itself_with_no_launch_following_it(tiny_dir: Path, tmp_path: Path) -> None:
    """With one Slurm job a run, no scheduler runs beside the trainers, and with --no-wait
    no launch follows them: each job watches its own run's heartbeat. The random-init
    run's trainer, stopped, is requeued by its own job (Slurm kills it, a stopped
    process too); it resumes from its last checkpoint and ends as if uninterrupted.
    Stage 1's trainer, stopped at what its job counts as the run's MAX_STALLS-th hang in
    it, fails with the reason and the fix, and Slurm cancels the run waiting on it."""
    from concurrent.futures import ThreadPoolExecutor

    from fastbgm.launch.job import HANGS
    from fastbgm.launch.trainproc import MAX_STALLS

    reference = _local_reference(tmp_path, tiny_dir, name="hp")
    cfg = write_experiment(tmp_path, tiny_dir, name="hp", modes='["vanilla"]', epochs=14)
    out = launch("--config", str(cfg), "--executor", "slurm", "--jobs", "per-run", "--no-report", "--stall-timeout",
                 "15", "--no-wait")
    assert out.returncode == 0, out.stdout[-3000:]
    seed = tmp_path / "runs" / "hp" / "synthetic/small_cnn/seed0"
    stage1, run, adv = next(seed.glob("stage1-*")), seed / "stage2-random-vanilla", seed / "stage2-adversarial-vanilla"
    jobs = {r: json.loads((r / "slurm-job.json").read_text())["job_id"] for r in (stage1, run, adv)}
    # (as if stage 1's trainer had hung twice before in this job, each time requeued)
    (stage1 / HANGS).write_text(json.dumps({jobs[stage1]: MAX_STALLS - 1}))
    with ThreadPoolExecutor(2) as pool:  # both stopped 3 epochs in, neither near its end
        pids = list(pool.map(_stop_a_trainer, [stage1, run]))
    _wait_out(list(jobs.values()))
    assert all(_gone(pid) for pid in pids)
    log = "".join(p.read_text() for p in (tmp_path / "runs" / "hp" / ".submitit").rglob(f"{jobs[run]}_*_log.*"))
    assert f"its job {jobs[run]} is requeued, taken as hung (1 of {MAX_STALLS})" in log, log[-3000:]
    # the same job, requeued (Slurm sends SIGCONT, SIGTERM, then SIGKILL: a stopped
    # process may go on until the SIGKILL, as a deadlocked one would not)
    assert "DUE TO JOB REQUEUE" in log, log[-3000:]
    ref = reference()
    rows = read_jsonl(run / "metrics.jsonl")
    assert json.loads((run / "result.json").read_text())["status"] == "done"
    assert [x["epoch"] for x in rows] == list(range(1, 15))
    assert [x["train_loss"] for x in rows] == [x["train_loss"] for x in read_jsonl(ref / run.relative_to(
        tmp_path / "runs" / "hp") / "metrics.jsonl")]
    failed = json.loads((stage1 / "result.json").read_text())
    assert failed["status"] == "failed" and f"{MAX_STALLS} times" in failed["reason"], failed
    assert "stall_timeout_s" in failed["reason"], failed
    assert not (adv / "metrics.jsonl").exists() and job_end(jobs[adv]).state.startswith("CANCELLED")


@needs_slurm
@pytest.mark.timeout(600)
def test_a_per_run_job_whose_trainer_is_killed_requeues_itself_with_no_launch_following_it(
        tiny_dir: Path, tmp_path: Path) -> None:
    """A per-run job whose trainer a signal kills (the OOM killer, a segfault) requeues
    itself from its batch script, as the local scheduler and an allocation's driver start
    a killed trainer again, whether or not a launch follows it (here none: --no-wait): the
    job that waits on it (afterok) keeps waiting, and every run ends as if uninterrupted.
    Two seeds: the stage-1 jobs are the tasks of one job array, as a real grid's are."""
    from fastbgm.launch.job import KILLS
    from fastbgm.launch.trainproc import MAX_KILLS

    # (seed 0's runs compared with the one-seed reference other tests share: a run's
    # numbers do not depend on the experiment's other seeds)
    reference = _local_reference(tmp_path, tiny_dir, name="pq")
    cfg = write_experiment(tmp_path, tiny_dir, name="pq", modes='["vanilla"]', epochs=14, seeds="[0, 1]")
    out = launch("--config", str(cfg), "--executor", "slurm", "--jobs", "per-run", "--no-report", "--no-wait")
    assert out.returncode == 0, out.stdout[-3000:]
    root = tmp_path / "runs" / "pq"
    runs = [p.parent for p in root.rglob("slurm-job.json")]
    job = lambda run: json.loads((run / "slurm-job.json").read_text())["job_id"]
    jobs = {run: job(run) for run in runs}
    stage1 = root / "synthetic/small_cnn/seed0/stage1-R2-z0.1"
    assert "_" in jobs[stage1] and len(jobs) == 6, jobs  # (an array's task: "A_a")
    pid = _stop_a_trainer(stage1, sig=signal.SIGKILL)
    _wait_out(list(jobs.values()))
    assert _gone(pid) and {run: job(run) for run in runs} == jobs  # the same jobs: nothing submitted again
    log = (stage1 / "train.log").read_text()
    assert (f"error: its trainer was killed by signal 9 (SIGKILL) in job {jobs[stage1]} (1 of {MAX_KILLS} in that "
            "job); the job is requeued and resumes it from its last checkpoint") in log, log[-3000:]
    assert json.loads((stage1 / KILLS).read_text()) == {jobs[stage1]: 1}
    _assert_as_uninterrupted(root, reference(), compared="/seed0/")


@needs_slurm
@pytest.mark.timeout(600)
def test_a_per_run_job_killed_with_its_batch_script_is_submitted_again_by_the_launch_following_it(
        tiny_dir: Path, tmp_path: Path) -> None:
    """A per-run job killed whole, its batch script with its trainer (nothing of it left to
    requeue it), ends FAILED, and Slurm cancels the jobs that wait on it. The launch
    following it submits it again, with the run waiting on it: every run ends as if
    uninterrupted, in the same launch."""
    from fastbgm.bench.localslurm import job_process

    reference = _local_reference(tmp_path, tiny_dir, name="pk")
    cfg = write_experiment(tmp_path, tiny_dir, name="pk", modes='["vanilla"]', epochs=14)
    p = launch_in_background("--config", str(cfg), "--executor", "slurm", "--jobs", "per-run", "--no-report",
                             "--timeout", "450")
    root = tmp_path / "runs" / "pk"
    stage1 = root / "synthetic/small_cnn/seed0/stage1-R2-z0.1"
    job = lambda run: json.loads((run / "slurm-job.json").read_text())["job_id"]
    pid = _stop_a_trainer(stage1, sig=signal.SIGSTOP)
    killed, adv = job(stage1), stage1.parent / "stage2-adversarial-vanilla"
    os.kill(job_process(killed, b"slurm_script"), signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)
    out, _ = p.communicate(timeout=500)
    assert p.returncode == 0, out[-3000:]
    said = " ".join(out.split())
    assert job(stage1) != killed and f"stage1-R2-z0.1: its job {killed} ended FAILED (a task killed by SIGKILL) with " \
        f"the run unfinished (1 of 3 in this launch); job {job(stage1)} resumes it from its last checkpoint" in said, \
        said[-3000:]
    assert f"stage2-adversarial-vanilla: submitted again as job {job(adv)}, waiting on its stage-1 run" in said
    assert _gone(pid)
    _assert_as_uninterrupted(root, reference())
    assert "error: its job" in (stage1 / "train.log").read_text()


@needs_slurm
@pytest.mark.timeout(180)
def test_a_per_run_job_killed_at_every_try_is_left_unfinished_and_its_dependents_say_why(tiny_dir: Path,
                                                                                       tmp_path: Path) -> None:
    """The same, killed at every try (plain batch jobs here, a task of each SIGKILLed): the
    launch submits the job, and the job waiting on it, again until the run's kills, those
    its first job counted as it requeued itself included, reach MAX_KILLS; then the run is
    left unfinished, not failed, and the run waiting on it is cancelled, saying why."""
    from rich.console import Console

    from fastbgm.launch.job import KILLS
    from fastbgm.launch.trainproc import MAX_KILLS
    from fastbgm.launch.slurm import wait

    exp = load(ExperimentConfig, write_experiment(tmp_path, tiny_dir, name="kk", modes='["vanilla"]',
                                                  inits='["adversarial"]'))
    stage1, adv = runs = plan(exp)
    for r in runs:
        Path(r.run_dir).mkdir(parents=True)
    submitted: list[dict[str, str]] = []

    def submit(these: list) -> dict[str, str]:
        assert [r.key for r in these] == [stage1.key, adv.key]
        first = sbatch(tmp_path / "out", "srun sh -c 'kill -9 $$'")
        submitted.append({stage1.key: first, adv.key: sbatch(tmp_path / "out", "true", f"--dependency=afterok:{first}",
                                                             "--kill-on-invalid-dep=yes")})
        return submitted[-1]

    jobs = submit(runs)
    # (as if the first job had requeued itself after all but one of the kills it may take)
    (Path(stage1.run_dir) / KILLS).write_text(json.dumps({jobs[stage1.key]: MAX_KILLS - 1}))
    ended = wait(runs, jobs, Console(file=open(os.devnull, "w"), width=200), poll_s=0.2, restart=submit)
    assert len(submitted) == 2 and jobs == submitted[-1]
    assert [str(ended[s[stage1.key]]) for s in submitted] == ["FAILED (a task killed by SIGKILL)"] * 2
    result = json.loads((Path(adv.run_dir) / "result.json").read_text())
    assert result["status"] == "cancelled", result
    assert result["reason"].startswith(f"its stage-1 run {stage1.key} stopped unfinished (its job {jobs[stage1.key]} "
                                       f"ended FAILED (a task killed by SIGKILL), {MAX_KILLS} times in this launch)")
    log = (Path(stage1.run_dir) / "train.log").read_text()
    assert log.count("error: its job") == 2 and f"({MAX_KILLS - 1} of {MAX_KILLS} in this launch)" in log, log
    assert f", {MAX_KILLS} times in this launch; it is left unfinished" in log, log
    assert not (Path(stage1.run_dir) / "result.json").exists()  # unfinished, not failed


@needs_slurm
@pytest.mark.timeout(120)
def test_a_job_cancelled_a_moment_ago_is_waited_out_not_counted_as_live(tmp_path: Path) -> None:
    """A cancelled job stays in the queue as COMPLETING while its processes end (up to the
    cluster's KillWait): what decides whether to follow or submit must wait it out."""
    from fastbgm.launch.cluster import queue, settled_queue

    # a batch script that, like a stopping trainer, takes a few seconds over SIGTERM
    job = sbatch(tmp_path / "out", "trap 'sleep 4; exit 0' TERM; sleep 100 & wait; sleep 4")
    deadline = time.time() + 60
    while time.time() < deadline and queue([job]).get(job, ("",))[0] != "RUNNING":
        time.sleep(0.2)
    subprocess.run(["scancel", job], check=True, timeout=60)
    time.sleep(0.5)
    assert queue([job]).get(job, ("",))[0] == "COMPLETING"  # what a launch used to follow out
    assert settled_queue([job], timeout_s=60) == {}


@needs_slurm
@pytest.mark.timeout(120)
def test_following_says_how_a_job_that_left_runs_unfinished_ended(tiny_dir: Path, tmp_path: Path) -> None:
    """An allocation whose driver ended early (it could not write the runs folder, say) left
    the launcher printing only "pending" runs; wait() now says how each such job ended,
    and the launcher prints it with the job's log."""
    from rich.console import Console

    from fastbgm.launch.cluster import JobEnd, job_end, queue
    from fastbgm.launch.slurm import wait

    from fastbgm.train import PEER_LOST_EXIT

    # (the second: a task of a step SIGKILLed, as by the OOM killer; the third: a DDP rank's
    # step whose peer was, which says so by its exit)
    job, killed = sbatch(tmp_path / "out", "exit 3"), sbatch(tmp_path / "out", "srun sh -c 'kill -9 $$'")
    lost = sbatch(tmp_path / "out", f"srun sh -c 'exit {PEER_LOST_EXIT}'")
    deadline = time.time() + 60
    while time.time() < deadline and (queue([job, killed, lost]) or "UNKNOWN" in (
            job_end(job).state, job_end(killed).state, job_end(lost).state)):
        time.sleep(0.2)
    assert str(job_end(killed)) == "FAILED (a task killed by SIGKILL)", job_end(killed)
    assert job_end(lost).killed and job_end(lost).peer_lost, job_end(lost)
    assert str(job_end(lost)) == "FAILED (a rank lost its peer: killed by a signal, or its node lost)"
    exp = load(ExperimentConfig, write_experiment(tmp_path, tiny_dir, modes='["vanilla"]', inits='["random"]'))
    runs = plan(exp)
    ended = wait(runs, {r.key: job for r in runs}, Console(file=open(os.devnull, "w")), poll_s=0.1)
    assert ended == {job: JobEnd("FAILED", 3)} and str(ended[job]) == "FAILED"


@needs_slurm
@pytest.mark.timeout(120)
def test_the_live_table_says_what_pending_jobs_wait_for(tmp_path: Path) -> None:
    from fastbgm.launch.cluster import queue, queue_summary

    jobs = [sbatch(tmp_path / "out", "true", "--hold") for _ in range(2)]
    try:
        assert queue_summary(queue(jobs)) == "2 jobs pending (JobHeldUser)"
        assert queue_summary(queue(jobs[:1])) == "1 job pending (JobHeldUser)"
        assert queue_summary({}) == ""
    finally:
        subprocess.run(["scancel", *jobs], timeout=60)


@needs_multinode
@pytest.mark.timeout(600)
def test_relaunch_right_after_scancel_submits_a_new_allocation_and_resumes_exactly(tiny_dir: Path,
                                                                                   tmp_path: Path) -> None:
    """The allocation cancelled by hand and the same command run at once: the old job is
    still COMPLETING (its steps ending). The launch must not follow it out and stop with
    every run unfinished; it waits for it to go, then submits a new one. (With
    ``launch.cluster.queue`` in place of ``settled_queue`` this fails: checked.)"""
    reference = _local_reference(tmp_path, tiny_dir, name="sc")
    # the relaunch is started (its imports take ~5 s here) before the allocation and let
    # go right after the scancel, so that it reads the queue while the old job is still there
    cfg = write_experiment(tmp_path, tiny_dir, modes='["vanilla"]', epochs=14, name="sc")
    again = subprocess.Popen([sys.executable, "-c", WARM_LAUNCH, *_allocation_args(cfg), "--timeout", "450"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             cwd=REPO, env={**os.environ, **LAUNCH_ENV})
    while (line := again.stdout.readline()) not in ("ready\n", ""):
        pass  # (import warnings)
    assert line == "ready\n", "the launcher ended before it was let go"
    args, root, job, run = _allocation_three_epochs_in(tmp_path, tiny_dir, name="sc")
    subprocess.run(["scancel", job], check=True, timeout=60)
    state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30)
    again.stdin.write("go\n")
    again.stdin.flush()
    out, _ = again.communicate(timeout=500)
    assert again.returncode == 0, out[-3000:]
    assert state.stdout.strip() in ("COMPLETING", "RUNNING"), f"the old job was gone before the relaunch read the queue: {state}"
    assert json.loads((root / "slurm-allocation.json").read_text())["job_id"] != job
    assert "resuming" in (run / "train.log").read_text()
    ref = reference()
    for key, r in results(root).items():
        assert r["status"] == "done", (key, r)
        rows = read_jsonl(root / key / "metrics.jsonl")
        assert [x["epoch"] for x in rows] == list(range(1, r["epochs"] + 1))
        assert [x["train_loss"] for x in rows] == [x["train_loss"] for x in read_jsonl(ref / key / "metrics.jsonl")]


# the lost-node tests' epochs: each run long enough to be training still when the test
# stops it on the node it loses. Stage 1 at 10 epochs once finished in the seconds the loss
# took, and never had to resume; a stage-2 run at 14 epochs (0.04 s each here) once
# finished in the second between its first row and the test's look (CI, 2026-12-02)
LOST_NODE_EPOCHS = {"stage1_epochs": 30, "epochs": 40}


def _one_run_a_node(tmp_path: Path, tiny_dir: Path, name: str, *extra: str,
                    lose_driver_node: bool = False) -> tuple[subprocess.Popen, Path, str, dict[str, Path], str]:
    """Launch a vanilla experiment (:data:`LOST_NODE_EPOCHS`) as one allocation of 2 nodes x 1 GPU whose two
    first runs (stage 1, and stage 2 from random init) train one on each node, and pick
    the node to lose: the one the allocation's driver runs on if ``lose_driver_node``,
    else the other. The run on that node stops where it stands (SIGSTOP) as soon as it
    has 2 epochs, as on a node that fails: a run left to train on while the other ran its
    2 epochs could finish first (a 14-epoch stage-2 run did, on CI, 2026-12-01: stage 1's
    epochs are R times longer). Returns once the other run has 2 epochs too: (the launch,
    following the job; experiment folder, job id, {node: its run's folder}, the node to
    lose)."""
    from fastbgm.fileio import lock_holder
    from fastbgm.launch.allocation import allocation_nodes

    cfg = write_experiment(tmp_path, tiny_dir, name=name, modes='["vanilla"]', **LOST_NODE_EPOCHS)
    args = ["--config", str(cfg), "--executor", "slurm", "--nodes", "2", "--gpus-per-node", "1", "--no-report", *extra]
    follower = launch_in_background(*args, "--timeout", "400")
    root = tmp_path / "runs" / name
    seed = root / "synthetic/small_cnn/seed0"
    deadline = time.time() + 240
    allocation = root / "slurm-allocation.json"
    while time.time() < deadline and not (list(seed.glob("stage1-*")) and allocation.exists()):
        time.sleep(0.2)
    first = [*seed.glob("stage1-*"), seed / "stage2-random-vanilla"]
    job = json.loads(allocation.read_text())["job_id"]
    # the driver's node first: scontrol takes its time on a loaded machine, while the runs
    # it would keep the test from seeing train on
    driver = _batch_host(job)
    while time.time() < deadline and driver in ("", "(null)"):
        time.sleep(0.2)
        driver = _batch_host(job)
    where: dict[str, Path] = {}
    while time.time() < deadline and len(where) < len(first):
        where = {json.loads((r / "env.json").read_text())["hosts"][0]: r for r in first if (r / "env.json").exists()}
        time.sleep(0.05)
    assert sorted(where) == allocation_nodes(job) == ["node1", "node2"], where
    lost = next(n for n in where if (n == driver) == lose_driver_node)
    _stop_a_trainer(where[lost], epochs=2)  # (Slurm's kill of the node's steps ends it)
    while time.time() < deadline and not all(len(read_jsonl(r / "metrics.jsonl")) >= 2 for r in first):
        time.sleep(0.1)
    assert len(read_jsonl(where[lost] / "metrics.jsonl")) >= 2, f"the run on {lost} did not train 2 epochs in time"
    assert lock_holder(where[lost]), f"{where[lost].name}, stopped on {lost}, no longer holds its folder"
    return follower, root, job, where, lost


def _batch_host(job: str) -> str:
    """The node a job's batch script runs on ("" or "(null)" until it starts)."""
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=60).stdout
    return out.split("BatchHost=")[1].split()[0] if "BatchHost=" in out else ""


def _lose_node(job: str, node: str) -> None:
    """``node`` fails for good: DOWN (Slurm takes it from the job), then DRAIN, so that it
    does not come back into service while the test runs (the cluster's ReturnToService
    would return a DOWN node whose slurmd answers)."""
    from fastbgm.bench.localslurm import set_node
    from fastbgm.launch.allocation import allocation_nodes

    set_node(node, "down", reason="fastbgm test")
    set_node(node, "drain", reason="fastbgm test")
    deadline = time.time() + 60
    while time.time() < deadline and node in allocation_nodes(job):
        time.sleep(0.5)


def _follow_losing(follower: subprocess.Popen, job: str, node: str,
                   then: Callable[[], None] = lambda: None) -> str:
    """Fail ``node`` of ``job`` for good (:func:`_lose_node`; its run stopped already, in
    :func:`_one_run_a_node`), do ``then``, and let the launch following the job end, which
    must exit 0; the node is back in service after. Returns the launch's output."""
    from fastbgm.bench.localslurm import resume_node

    try:
        _lose_node(job, node)
        then()
        out, _ = follower.communicate(timeout=450)
    finally:
        resume_node(node)
    assert follower.returncode == 0, out[-3000:]
    return out


def _assert_as_uninterrupted(root: Path, ref: Path, compared: str = "") -> None:
    """Every run of ``root`` done, no epoch trained twice, and (those whose key holds
    ``compared``) with the reference's numbers."""
    for key, r in results(root).items():
        assert r["status"] == "done", (key, r)
        rows = read_jsonl(root / key / "metrics.jsonl")
        assert [x["epoch"] for x in rows] == list(range(1, r["epochs"] + 1)), key
        if compared in key:
            ref_rows = read_jsonl(ref / key / "metrics.jsonl")
            assert ref_rows and [x["train_loss"] for x in rows] == [x["train_loss"] for x in ref_rows], key


@needs_multinode
@pytest.mark.timeout(600)
def test_a_node_lost_for_good_costs_only_its_run_which_resumes_on_the_nodes_left(tiny_dir: Path,
                                                                                 tmp_path: Path) -> None:
    """A node of the 2-node allocation fails and never comes back: the job goes on, on the
    node left; the run that was on the lost node starts again there from its last.pt,
    and the launch following the job ends with every run done as if nothing had happened.
    The run on the other node never stopped."""
    reference = _local_reference(tmp_path, tiny_dir, name="nl", **LOST_NODE_EPOCHS)
    follower, root, job, where, lost = _one_run_a_node(tmp_path, tiny_dir, "nl")
    _follow_losing(follower, job, lost)
    assert json.loads((root / "slurm-allocation.json").read_text())["job_id"] == job
    history = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-o", "State", "-j", job], capture_output=True,
                             text=True, timeout=60).stdout.split()
    assert "NODE_FAIL" not in history and history[-1] == "COMPLETED", history  # never requeued
    log = (root / ".submitit" / job / f"{job}_0_log.err").read_text()
    assert f"lost node(s) {lost}" in log and "its node was lost" in log, log[-3000:]
    assert "resuming" in (where[lost] / "train.log").read_text()
    kept = next(r for n, r in where.items() if n != lost)
    assert "resuming" not in (kept / "train.log").read_text()
    _assert_as_uninterrupted(root, reference())


@needs_multinode
@pytest.mark.timeout(600)
def test_the_node_of_the_allocations_driver_lost_the_launch_submits_the_next_allocation(tiny_dir: Path,
                                                                                         tmp_path: Path) -> None:
    """The node the driver runs on fails: Slurm ends the job (it cannot go on without its
    batch script). The launch following it says so and submits a new allocation, on the
    node left (``--min-nodes 1``; the failed node stays down), which resumes every
    unfinished run exactly; the launch ends with every run done."""
    reference = _local_reference(tmp_path, tiny_dir, name="nb", **LOST_NODE_EPOCHS)
    follower, root, job, where, lost = _one_run_a_node(tmp_path, tiny_dir, "nb", "--min-nodes", "1",
                                                       lose_driver_node=True)
    text = " ".join(_follow_losing(follower, job, lost).split())
    assert f"allocation {job} lost {lost}, the node its driver ran on" in text, text[-3000:]
    # the runs unfinished when the new allocation was submitted: stage 2 from adversarial
    # init (it waits on stage 1) and those of the first two still training then (the one
    # on the node left trains on until Slurm ends the job: seconds, which a run near its
    # end can finish in)
    m = re.search(r"node\(s\) x 1 slot\(s\) for the (\d) unfinished run\(s\) \(only 1 of the partition's nodes "
                  r"are up; --min-nodes 1 lets it start on 1\)", text)
    assert m and int(m.group(1)) in (2, 3), text[-3000:]
    assert json.loads((root / "slurm-allocation.json").read_text())["job_id"] != job
    resumed = [r for r in where.values() if "resuming" in (r / "train.log").read_text()]
    assert len(resumed) == int(m.group(1)) - 1, (m.group(0), resumed)  # each from its last.pt
    _assert_as_uninterrupted(root, reference())


@needs_multinode
@pytest.mark.timeout(600)
def test_a_requeued_allocation_waiting_for_a_lost_node_asks_for_the_nodes_up_under_min_nodes(tiny_dir: Path,
                                                                                              tmp_path: Path) -> None:
    """A node fails for good, then the allocation is requeued (as at its time limit): the
    job waits for the lost node. Under ``--min-nodes 1`` the launch following it has it
    ask for the node up, where it starts again and every run resumes exactly."""
    reference = _local_reference(tmp_path, tiny_dir, name="nr", **LOST_NODE_EPOCHS)
    follower, root, job, where, lost = _one_run_a_node(tmp_path, tiny_dir, "nr", "--min-nodes", "1")
    log = root / ".submitit" / job / f"{job}_0_log.err"

    def requeue_once_it_went_on() -> None:  # (as at its time limit)
        deadline = time.time() + 60
        while time.time() < deadline and f"lost node(s) {lost}" not in log.read_text():
            time.sleep(0.2)
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=60)

    out = _follow_losing(follower, job, lost, requeue_once_it_went_on)
    assert f"allocation {job} waited for 2 node(s), 1 are up: it now asks for 1 (--min-nodes 1)" in \
        " ".join(out.split()), out[-3000:]
    assert json.loads((root / "slurm-allocation.json").read_text())["job_id"] == job
    # the runs unfinished then: stage 2 from adversarial init, the stopped run, and the
    # kept node's run unless it finished before the requeue
    assert re.search(r"\(restart 1\): [23] runs, 1 node\(s\)", log.read_text()), log.read_text()[-3000:]
    _assert_as_uninterrupted(root, reference())


@needs_multinode
@pytest.mark.timeout(600)
def test_a_run_wider_than_the_nodes_left_waits_for_the_allocation_at_full_size(tiny_dir: Path,
                                                                              tmp_path: Path) -> None:
    """A 2-node DDP run loses a node: it cannot train on the one left, so the driver
    requeues the allocation at its full size, which starts once the node is back, and
    the run resumes from its last.pt: every epoch trained once."""
    from fastbgm.bench.localslurm import resume_node

    cfg = write_experiment(tmp_path, tiny_dir, name="wide", modes='["vanilla"]', inits='["random"]', epochs=10)
    args = ["--config", str(cfg), "--executor", "slurm", "--nodes", "2", "--gpus-per-node", "1", "--ranks-per-run",
            "2", "--resources.ranks_per_node=1", "--no-report"]
    follower = launch_in_background(*args, "--timeout", "400")
    root = tmp_path / "runs" / "wide"
    run = root / "synthetic/small_cnn/seed0/stage2-random-vanilla"
    deadline = time.time() + 240
    while time.time() < deadline and len(read_jsonl(run / "metrics.jsonl")) < 2:
        time.sleep(0.2)
    job = json.loads((root / "slurm-allocation.json").read_text())["job_id"]
    lost = next(n for n in ("node1", "node2") if n != _batch_host(job))
    try:
        _lose_node(job, lost)
        deadline = time.time() + 120
        while time.time() < deadline and "requeueing it at its first size" not in (
                root / ".submitit" / job / f"{job}_0_log.err").read_text():
            time.sleep(0.5)
    finally:
        resume_node(lost)
    out, _ = follower.communicate(timeout=450)
    assert follower.returncode == 0, out[-3000:]
    log = (root / ".submitit" / job / f"{job}_0_log.err").read_text()
    assert "need more than the 1 node(s) left; requeueing it at its first size" in log, log[-3000:]
    restarts = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=60).stdout
    assert "Restarts=0" not in restarts, restarts
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "done", result
    assert [x["epoch"] for x in read_jsonl(run / "metrics.jsonl")] == list(range(1, 11))
    assert "resuming" in (run / "train.log").read_text()
    assert sorted(json.loads((run / "env.json").read_text())["hosts"]) == ["node1", "node2"]


@needs_multinode
@pytest.mark.timeout(400)
@pytest.mark.parametrize("jobs", ["allocation", "per-run"])
def test_two_node_ddp_run_with_batchnorm_equals_one_process(tiny_dir: Path, tmp_path: Path, jobs: str) -> None:
    """One run over 2 ranks, one a node, in an allocation's job step and as a job of its
    own (submitit's tasks: RunJob on each rank), equal to one process on the combined
    batches."""
    import torch

    from fastbgm.trainer import checkpoint as C

    from .reference import reference_ddp_training

    cfg = write_experiment(tmp_path, tiny_dir, name="ddp", modes='["vanilla"]', inits='["random"]', epochs=2)
    out = launch("--config", str(cfg), "--executor", "slurm", "--jobs", jobs, "--nodes", "2", "--gpus-per-node", "1",
                 "--ranks-per-run", "2", "--resources.ranks_per_node=1", "--timeout", "300", "--no-report")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = tmp_path / "runs/ddp/synthetic/small_cnn/seed0/stage2-random-vanilla"
    env = json.loads((run / "env.json").read_text())
    assert env["world"] == 2 and sorted(env["hosts"]) == ["node1", "node2"]  # one rank per node
    rec = json.loads((run / "config.json").read_text())
    assert rec["dist"] == {"world": 2, "per_rank_batch": 32}
    if jobs == "per-run":  # rank 0 logs to train.log; rank 1 only its errors, and had none
        log = (run / "train.log").read_text()
        assert "started synthetic/small_cnn/seed0/stage2-random-vanilla in Slurm job" in log and " rank 1 " not in log, log[-2000:]
    model, _ = reference_ddp_training(tiny_dir, world=2, batch_size=64, epochs=2, lr=0.05, augment=False)
    final = C.load(run / C.FINAL)["model"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(final[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_time_limits_read_as_sbatch_reads_them() -> None:
    from fastbgm.config import ConfigError
    from fastbgm.experiment.config import Resources

    for text, minutes in (("30", 30), ("30:30", 31), ("12:00:00", 720), ("2-12", 3600), ("1-00:30", 1470),
                          ("1-00:00:01", 1441)):
        assert Resources(time=text).timeout_min == minutes, text
    for bad in ("abc", "1:2:3:4", "-5", "1-", "12h"):
        with pytest.raises(ConfigError, match="resources.time: .* is not a Slurm time limit"):
            Resources(time=bad)
    out = launch("--config", str(REPO / "configs/paper-mini.toml"), "--executor", "local", "--time", "abc",
                 "--dry-run")
    assert out.returncode == 2 and "not a Slurm time limit" in out.stdout and "Traceback" not in out.stderr


def test_dry_run_json_of_the_paper_grid_on_four_nodes() -> None:
    # the mission's command: no --config is the paper's grid
    out = launch("--executor", "local", "--nodes", "4", "--gpus-per-node", "8", "--dry-run", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "no --config: the paper's CIFAR-10 grid" in out.stderr, out.stderr[-2000:]
    plan_ = json.loads(out.stdout)
    assert plan_["experiment"] == "cifar10-paper"
    assert plan_["allocation"] == {"nodes": 4, "min_nodes": 4, "gpus_per_node": 8, "slots": 32, "time": "24:00:00"}
    assert len(plan_["runs"]) == 204 and all(r["gpus"] == 1 and r["nodes"] == 1 for r in plan_["runs"])
    est = plan_["estimate"]
    assert est["gpu_hours"] > 0 and est["wall_hours"] > 0 and est["measured_on"] == ["NVIDIA H200"]
    assert est["wall_hours"] < est["gpu_hours"]  # 32 GPUs at once
    # the allocation holds all 32 GPUs until its last run ends: more than they train
    assert est["held_gpu_hours"] == pytest.approx(32 * est["wall_hours"], abs=0.2)
    assert est["held_gpu_hours"] > est["gpu_hours"]
    # the same on 1, 2, 4 and 8 nodes: more nodes, never slower, never fewer GPU-hours held
    sizes = est["by_nodes"]
    assert [x["nodes"] for x in sizes] == [1, 2, 4, 8]
    assert next(x for x in sizes if x["nodes"] == 4)["wall_hours"] == est["wall_hours"]
    for a, b in zip(sizes, sizes[1:]):
        assert b["wall_hours"] <= a["wall_hours"] and b["held_gpu_hours"] >= a["held_gpu_hours"] - 0.1
    assert any("model resnet50 has no measured" in w for w in est["unmeasured"])  # named, not guessed
    packed = launch("--config", str(REPO / "configs/cifar10-paper.toml"), "--executor", "local", "--nodes", "4",
                    "--gpus-per-node", "8", "--runs-per-gpu", "4", "--dry-run", "--json")
    assert packed.returncode == 0, packed.stderr[-2000:]
    est4 = json.loads(packed.stdout)["estimate"]
    # packing measured on the H200 (throughput.json), in the mode the trainer packs in: for
    # auto with the default step graphs, streams; threads when asked
    assert est4["runs_per_gpu"] == 4 and est4["gpu_hours"] < est["gpu_hours"]
    assert est4["packed_speedup"]["resnet18"] == pytest.approx(1.44, abs=0.01)
    assert not any("packed resnet18" in w for w in est4["unmeasured"])
    threads = launch("--config", str(REPO / "configs/cifar10-paper.toml"), "--executor", "local", "--nodes", "4",
                     "--gpus-per-node", "8", "--runs-per-gpu", "4", "--pack-mode", "threads", "--dry-run", "--json")
    assert threads.returncode == 0, threads.stderr[-2000:]
    assert json.loads(threads.stdout)["estimate"]["packed_speedup"]["resnet18"] == pytest.approx(1.38, abs=0.01)


def test_a_launch_whose_datasets_are_not_there_starts_nothing_and_names_them(tmp_path: Path) -> None:
    """From a folder with no data/ (no --config: the paper's grid, found in the checkout):
    every run would have started and failed on the missing .beton, all 204 recorded failed.
    Now the launch names the files and starts nothing; --dry-run lists them."""
    run = lambda *a: subprocess.run([sys.executable, "-m", "fastbgm.launch", "--executor", "local", *a],
                                    capture_output=True, text=True, timeout=120, cwd=tmp_path,
                                    env={**os.environ, **LAUNCH_ENV, "PYTHONPATH": str(REPO)})
    beton = tmp_path / "data/cifar10/train.beton"
    dry = run("--dry-run")
    assert dry.returncode == 0 and f"not here yet: {beton} (read by 204 run(s))" in dry.stdout, dry.stdout[-2000:]
    out = run("--no-report")
    said = " ".join(out.stdout.split())
    assert out.returncode == 2, said[-2000:]
    assert (f"2 dataset file(s) the runs read are not here, so nothing was started: {beton} (read by 204 run(s))"
            in said and "python -m fastbgm.data prepare" in said), said[-2000:]
    assert not (tmp_path / "runs").exists()
    # a split's resident cache without its .beton is readable (the loader reads the cache alone)
    beton.parent.mkdir(parents=True)
    (beton.parent / "train.resident.npz").touch()
    dry = run("--dry-run")
    assert "not here yet" in dry.stdout and str(beton) not in dry.stdout, dry.stdout[-2000:]
    # nor is a dataset the config embeds (prepare = "synthetic"): the launch writes it first
    mini = run("--config", str(REPO / "configs/paper-mini.toml"), "--dry-run")
    assert mini.returncode == 0 and "not here yet" not in mini.stdout, mini.stdout[-2000:]


def _paper_grid(tmp_path: Path, *over: str) -> tuple[ExperimentConfig, list]:
    exp = load(ExperimentConfig, REPO / "configs/cifar10-paper.toml",
               [f"--runs_dir={tmp_path}", "--models=[resnet18]", "--seeds=[0]", *over])
    return exp, plan(exp)


def test_estimate_counts_packing_only_as_measured_and_only_what_is_left(tmp_path: Path) -> None:
    from fastbgm.launch.estimate import _between, estimate, evaluations_left, throughput_table

    table = [r for r in throughput_table() if r["kind"] != "pack"]  # (as if no pack were measured)
    one = estimate(*_paper_grid(tmp_path, "--resources.gpus=2"), table=table)  # 17 runs on 2 GPUs
    assert one["complete"] and one["runs_per_gpu"] == 1 and one["packed_speedup"] == {}
    # evaluation counted: with no eval row an evaluated image is a third of a trained one, and said
    assert 0 < one["eval_share"] < 0.5 and "resnet18: no measured images/s of evaluation" in one["assumed"][0]
    assert [evaluations_left(*a) for a in ((3, 30, 0), (3, 31, 0), (3, 30, 15), (3, 30, 30), (25, 350, 0))] == \
        [10, 11, 5, 0, 14]
    alone = next(r for r in table if r["model"] == "resnet18" and r["batch"] == 128)
    for x, share in ((3.0, one["eval_share"]), (1e9, 0.0)):  # measured at 3x (the assumption) and as free
        ev = estimate(*_paper_grid(tmp_path, "--resources.gpus=2"),
                      table=table + [{**alone, "kind": "eval", "batch": 1024, "images_per_s": x * alone["images_per_s"]}])
        assert ev["assumed"] == [] and ev["eval_share"] == pytest.approx(share, abs=1e-3)
        assert ev["gpu_hours"] == pytest.approx(one["gpu_hours"] * (1 - one["eval_share"] + share), abs=0.02)
    # K = 4 with no packed measurement: no gain counted, and said
    four = estimate(*_paper_grid(tmp_path, "--resources.gpus=2", "--resources.runs_per_gpu=4"), table=table)
    assert four["gpu_hours"] == pytest.approx(one["gpu_hours"], rel=1e-3)
    assert not four["complete"] and "no measured images/s of packed resnet18" in four["unmeasured"][0]
    assert four["wall_hours"] >= one["wall_hours"]  # runs that share a GPU at no gain only wait on each other
    # measured: 4 packed runs at 2.5x to 3x one run's images/s, by pack mode
    packed = [{**alone, "runs_per_gpu": 4, "kind": "pack", "pack_mode": mode, "images_per_s": x * alone["images_per_s"]}
              for mode, x in (("threads", 2.5), ("streams", 2.8), ("fused", 3.0))]
    fast = estimate(*_paper_grid(tmp_path, "--resources.gpus=2", "--resources.runs_per_gpu=4"), table=table + packed)
    # (auto, as the trainer resolves it for the paper's runs on a GPU: streams, their step graphs)
    assert fast["complete"] and fast["packed_speedup"] == {"resnet18": 2.8}
    assert fast["gpu_hours"] < one["gpu_hours"] and fast["wall_hours"] < one["wall_hours"]
    fused = estimate(*_paper_grid(tmp_path, "--resources.gpus=2", "--resources.runs_per_gpu=4",
                                  "--resources.pack_mode=fused"), table=table + packed)
    assert fused["packed_speedup"] == {"resnet18": 3.0}  # the rows of the pack mode the runs will use
    assert _between({1: 10.0, 4: 25.0}, 2) == 15.0 and _between({1: 10.0, 4: 25.0}, 8) == 25.0
    # what is done costs nothing; a run that has trained some epochs, only the rest
    exp, runs = _paper_grid(tmp_path, "--resources.gpus=2")
    stage2 = [r for r in runs if r.stage == 2 and not r.depends_on]
    for r in stage2[:2]:
        r.run_dir.mkdir(parents=True)
    (stage2[0].run_dir / "result.json").write_text(json.dumps({"status": "done"}))
    (stage2[1].run_dir / "result.json").write_text(json.dumps({"status": "running"}))
    # its checkpoint after half its epochs, and rows since that a resume trains again
    epochs = stage2[1].config.stop.max_epochs
    (stage2[1].run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": e, **({"checkpoint_seconds": 0.1} if e in (1, epochs // 2) else {})}) + "\n"
        for e in range(1, epochs // 2 + 50)))
    left = estimate(exp, runs, table=table)
    assert stage2[0].key not in left["runs"] or left["runs"][stage2[0].key] == 0
    assert left["runs"][stage2[1].key] == pytest.approx(one["runs"][stage2[1].key] * (epochs - epochs // 2) / epochs,
                                                        rel=1e-2)
    assert left["gpu_hours"] < one["gpu_hours"]
    # as the launcher plans it (common.decide): a failed stage-1 run kept failed costs
    # nothing, nor do the runs blocked on it; retried, it trains what it has left
    from fastbgm.launch.common import decide, will_run

    s1 = next(r for r in runs if r.stage == 1)
    s1.run_dir.mkdir(parents=True)
    (s1.run_dir / "result.json").write_text(json.dumps({"status": "failed", "reason": "nan"}))
    for retry in (False, True):
        decisions = decide(runs, retry_failed=retry)
        est = estimate(exp, runs, table=table, plan={d.run.key: (d.status, will_run(d)) for d in decisions})
        blocked = [r.key for r in runs if s1.key in r.depends_on]
        assert blocked and all((est["runs"][k] == 0) != retry for k in [s1.key, *blocked])
        assert (est["gpu_hours"] < left["gpu_hours"]) != retry


def test_a_lost_node_restarts_its_runs_on_the_slots_left_and_starts_nothing_on_its_own(tmp_path: Path) -> None:
    """The scheduler as the allocation's driver drives it when a node goes: the run whose
    step ended because of it (its exit code 0, as srun's may be) waits for a slot again,
    not failed; the lost slots take nothing more, and a two-node run that no longer fits
    ends the loop unfinished (``outgrown``: the driver then requeues the allocation)."""
    import subprocess as sp

    from fastbgm.launch.placement import StepRun
    from fastbgm.launch.schedule import Scheduler

    runs = [StepRun(f"r{i}", str(tmp_path / f"r{i}")) for i in range(4)] + [
        StepRun("wide", str(tmp_path / "wide"), depends_on=["r0", "r1", "r2", "r3"], ranks=2, ranks_per_node=1)]
    started: list[tuple[str, int]] = []  # (run, how many steps ran beside it)
    lost = {"now": False}

    def start(pack: list[StepRun], slots: list[str]) -> sp.Popen:
        r = pack[0]
        Path(r.run_dir).mkdir(exist_ok=True)
        started.append((r.key, len(sched.running)))
        if r.key == "r1" and not lost["now"]:  # on the node that fails: ends with no result
            return sp.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
        (Path(r.run_dir) / "result.json").write_text(json.dumps({"status": "done"}))
        return sp.Popen([sys.executable, "-c", "import time; time.sleep(0.1)"])

    sched = Scheduler(runs, ["gpu0", "gpu1"], start, interrupted=lambda pack: lost["now"])
    sched.poll()
    assert started == [("r0", 0), ("r1", 1)]
    lost["now"] = True
    sched.lose_slots(1, nodes_left=1)  # a node leaves, r1's step still running on it
    while not sched.finished:
        sched.poll()
        time.sleep(0.02)
    assert sched.states == {"r0": "done", "r1": "done", "r2": "done", "r3": "done", "wide": "pending"}
    assert sorted(started[2:]) == [("r1", 0), ("r2", 0), ("r3", 0)]  # one slot left: one step at a time
    assert sched.outgrown and sched.slots == 1 and sched.slot_debt == 0
    assert not (tmp_path / "wide").exists()  # not started, not cancelled: it waits for a larger allocation


def test_a_killed_process_starts_again_in_the_same_launch_and_is_left_unfinished_at_the_last_kill(
        tmp_path: Path) -> None:
    """A trainer killed by a signal (the OOM killer, a segfault; srun says 128 + the signal)
    left its run "running" with no process, and its dependents were cancelled as "a
    dependency did not finish" until a re-launch. Now it starts again from its last
    checkpoint in the same launch; killed MAX_KILLS times it is left unfinished (not
    failed), and its dependents say which run stopped, why, and that the same command
    resumes them."""
    import subprocess as sp

    from fastbgm.launch import placement as P
    from fastbgm.launch import schedule as S
    from fastbgm.launch import trainproc as T

    from fastbgm.train import PEER_LOST_EXIT

    runs = [P.StepRun("once", str(tmp_path / "once")), P.StepRun("oom", str(tmp_path / "oom")),
            P.StepRun("after-once", str(tmp_path / "after-once"), depends_on=["once"]),
            P.StepRun("after-oom", str(tmp_path / "after-oom"), depends_on=["oom"]),
            P.StepRun("peer", str(tmp_path / "peer"))]
    starts: list[str] = []
    done = "import json, sys; open(sys.argv[1] + '/result.json', 'w').write(json.dumps({'status': 'done'}))"

    def start(pack: list[P.StepRun], slots: list[str]) -> sp.Popen:
        r = pack[0]
        Path(r.run_dir).mkdir(exist_ok=True)
        starts.append(r.key)
        if r.key == "oom":
            code = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
        elif r.key == "once" and starts.count("once") == 1:
            code = "import sys; sys.exit(128 + 11)"  # srun's word for a task's SIGSEGV
        elif r.key == "peer" and starts.count("peer") == 1:  # a DDP rank whose peer was killed
            code = f"import sys; sys.exit({PEER_LOST_EXIT})"
        else:
            code = done
        return sp.Popen([sys.executable, "-c", code, r.run_dir])

    sched = S.Scheduler(runs, ["slot0", "slot1"], start)
    deadline = time.time() + 60
    while not sched.finished and time.time() < deadline:
        sched.poll()
        time.sleep(0.02)
    assert sched.states == {"once": "done", "oom": "running", "after-once": "done", "after-oom": "cancelled",
                            "peer": "done"}
    assert sched.kills == {"once": 1, "oom": T.MAX_KILLS, "peer": 1} and starts.count("oom") == T.MAX_KILLS
    assert T.last_error(tmp_path / "peer").startswith("error: a rank of it was lost, with no reason given (killed by "
                                                      "a signal, or its node lost); it starts again")
    assert T.last_error(tmp_path / "once") == ("error: its process was killed by signal 11 (SIGSEGV); it starts "
                                               f"again from its last checkpoint (1 of {T.MAX_KILLS} in this launch)")
    assert not (tmp_path / "oom" / "result.json").exists()  # unfinished, not failed: the next launch resumes it
    assert "left unfinished: the same command resumes it" in T.last_error(tmp_path / "oom")
    reason = json.loads((tmp_path / "after-oom" / "result.json").read_text())["reason"]
    assert reason == (f"its stage-1 run oom stopped unfinished (its process was killed by signal 9 (SIGKILL), "
                      f"{T.MAX_KILLS} times in this launch); the same command resumes it, then runs this one"), reason


def test_a_process_whose_heartbeat_stops_is_killed_with_its_children_and_its_run_fails_at_the_last_stall(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stall watchdog: a pack whose heartbeat has not moved for the stall timeout is
    killed (its whole process tree, as torchrun's ranks would be), its run waits for a
    slot again, and at the MAX_STALLS-th hang it fails with the reason; a run that beats
    goes on for longer than the timeout untouched."""
    import subprocess as sp

    from fastbgm.launch import placement as P
    from fastbgm.launch import schedule as S
    from fastbgm.launch import trainproc as T
    from fastbgm.trainer import checkpoint as C

    monkeypatch.setattr(S, "STALL_CHECK_S", 0.1)
    runs = [P.StepRun("hang", str(tmp_path / "hang")), P.StepRun("beats", str(tmp_path / "beats"))]
    children: list[int] = []
    beating = ("import time, pathlib, json, sys; d = pathlib.Path(sys.argv[1])\n"
               "for _ in range(25):\n (d / 'heartbeat').touch(); time.sleep(0.1)\n"
               "(d / 'result.json').write_text(json.dumps({'status': 'done'}))")
    hanging = ("import subprocess, sys, time; c = subprocess.Popen(['sleep', '600'])\n"
               "open(sys.argv[1] + '/child', 'w').write(str(c.pid)); time.sleep(600)")

    def start(pack: list[P.StepRun], slots: list[str]) -> sp.Popen:
        r = pack[0]
        Path(r.run_dir).mkdir(exist_ok=True)
        if r.key == "hang" and (Path(r.run_dir) / "child").exists():
            children.append(int((Path(r.run_dir) / "child").read_text()))
        return sp.Popen([sys.executable, "-c", beating if r.key == "beats" else hanging, r.run_dir])

    sched = S.Scheduler(runs, ["slot0", "slot1"], start, stall_s=1.0)
    deadline = time.time() + 60
    while not sched.finished and time.time() < deadline:
        sched.poll()
        time.sleep(0.02)
    assert sched.states == {"hang": "failed", "beats": "done"}, sched.states
    assert sched.stalls == {"hang": T.MAX_STALLS}
    reason = json.loads((tmp_path / "hang" / "result.json").read_text())["reason"]
    assert f"no progress for 1 s, {T.MAX_STALLS} times" in reason and "stall_timeout_s" in reason, reason
    children.append(int((tmp_path / "hang" / "child").read_text()))
    assert len(children) == T.MAX_STALLS
    time.sleep(0.2)
    for pid in children:  # the hung process's own children went with it
        assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] in "ZX", pid
    assert C.last_beat(tmp_path / "beats") > 0 and C.last_beat(tmp_path / "hang") == 0


def test_a_run_whose_folder_another_process_holds_waits_for_it_and_is_never_recorded_failed(tmp_path: Path) -> None:
    """A restarted run whose folder a live process still holds (its old trainer, frozen
    on a lost node; another launch's trainer) used to fail on the lock (exit 2), and the
    scheduler then wrote "failed" into that process's folder and cancelled its
    dependents. Now it is not started while the folder is held, its dependents wait with
    it, and it starts once the folder is free; one that failed on the lock waits too."""
    import contextlib
    import subprocess as sp

    from fastbgm.fileio import exclusive_folder
    from fastbgm.launch.placement import StepRun
    from fastbgm.launch.schedule import Scheduler

    runs = [StepRun("a", str(tmp_path / "a")), StepRun("b", str(tmp_path / "b"), depends_on=["a"]),
            StepRun("c", str(tmp_path / "c")), StepRun("d", str(tmp_path / "d"))]
    held = {k: contextlib.ExitStack() for k in ("a", "d")}
    held["a"].enter_context(exclusive_folder(tmp_path / "a"))  # (flock: per open file, so held here too)
    started: list[str] = []

    def start(pack: list[StepRun], slots: list[str]) -> sp.Popen:
        r = pack[0]
        Path(r.run_dir).mkdir(exist_ok=True)
        started.append(r.key)
        if r.key == "d" and started.count("d") == 1:  # the lock is taken between the check and the trainer
            held["d"].enter_context(exclusive_folder(tmp_path / "d"))
            return sp.Popen([sys.executable, "-c", "raise SystemExit(2)"])
        (Path(r.run_dir) / "result.json").write_text(json.dumps({"status": "done"}))
        return sp.Popen([sys.executable, "-c", "pass"])

    sched = Scheduler(runs, ["s0", "s1"], start)
    deadline = time.time() + 30
    while not sched.finished and time.time() < deadline:
        sched.poll()
        time.sleep(0.02)
    assert sched.finished and sorted(started) == ["c", "d"], started
    assert sched.states == {"a": "pending", "b": "pending", "c": "done", "d": "pending"}, sched.states
    assert not (tmp_path / "d" / "result.json").exists()  # never written into a folder another process holds
    assert "error: its folder is in use by pid" in (tmp_path / "a" / "train.log").read_text()
    for h in held.values():
        h.close()
    while not all(v == "done" for v in sched.states.values()) and time.time() < deadline:
        sched.poll()
        time.sleep(0.02)
    assert sched.states == {k: "done" for k in "abcd"} and sorted(started) == ["a", "b", "c", "d", "d"], started


def test_ready_runs_spread_over_free_slots_before_sharing_one(tmp_path: Path) -> None:
    # K = 4 on 3 free slots: 5 ready runs go 2 + 2 + 1, not 4 + 1 beside an idle slot;
    # 2 ready runs on 3 slots, one each
    import subprocess as sp

    from fastbgm.launch.placement import StepRun
    from fastbgm.launch.schedule import Scheduler

    for n, want in ((5, [2, 2, 1]), (2, [1, 1])):
        runs = [StepRun(f"r{n}-{i}", str(tmp_path / f"r{n}-{i}")) for i in range(n)]
        packs: list[tuple[list[str], list[str]]] = []

        def start(pack: list[StepRun], slots: list[str]) -> sp.Popen:
            packs.append(([r.key for r in pack], slots))
            for r in pack:
                Path(r.run_dir).mkdir(exist_ok=True)
                (Path(r.run_dir) / "result.json").write_text(json.dumps({"status": "done"}))
            return sp.Popen([sys.executable, "-c", "pass"])

        sched = Scheduler(runs, ["gpu0", "gpu1", "gpu2"], start, runs_per_slot=4)
        while not sched.finished:
            sched.poll()
            time.sleep(0.02)
        assert [len(p) for p, _ in packs] == want and len({s[0] for _, s in packs}) == len(want)
        assert sorted(k for p, _ in packs for k in p) == sorted(r.key for r in runs)


def test_a_run_others_wait_on_trains_alone_while_slots_outnumber_such_runs(tmp_path: Path) -> None:
    # 3 slots, K = 4: stage-1 run p (c waits on it) and 9 runs nobody waits on. p gets a
    # slot of its own and is never offered a run (packed, it would train slower and c
    # start later); the others pack 4 + 4, the 9th waits for a slot rather than join p
    import subprocess as sp

    from fastbgm.launch.placement import StepRun
    from fastbgm.launch.schedule import Scheduler
    from fastbgm.trainer import inbox

    runs = [StepRun("p", str(tmp_path / "p"), group="stage1")]
    runs += [StepRun(f"s{i}", str(tmp_path / f"s{i}"), group="stage2") for i in range(9)]
    runs += [StepRun("c", str(tmp_path / "c"), depends_on=["p"], group="stage2")]
    for r in runs:
        Path(r.run_dir).mkdir()
    packs: list[list[str]] = []
    done = json.dumps({"status": "done"})

    def start(pack: list[StepRun], slots: list[str]) -> sp.Popen:
        packs.append([r.key for r in pack])
        if pack[0].key == "p":  # stage 1 trains a while
            code = f"import time, pathlib; time.sleep(1.5); pathlib.Path({pack[0].run_dir!r}, 'result.json').write_text({done!r})"
            return sp.Popen([sys.executable, "-c", code])
        for r in pack:
            (Path(r.run_dir) / "result.json").write_text(done)
        return sp.Popen([sys.executable, "-c", "pass"])

    sched = Scheduler(runs, ["gpu0", "gpu1", "gpu2"], start, runs_per_slot=4)
    offered = False
    while not sched.finished:
        sched.poll()
        offered = offered or bool(inbox.unclaimed(inbox.inbox_for(tmp_path / "p")))
        time.sleep(0.05)
    assert packs[:3] == [["p"], ["s0", "s1", "s2", "s3"], ["s4", "s5", "s6", "s7"]], packs
    assert not offered and ["s8"] in packs and packs[-1] == ["c"]
    assert set(sched.states.values()) == {"done"}
    # one slot: as many runs waited on as slots, so p packs like any run
    for r in runs:
        (Path(r.run_dir) / "result.json").unlink()
    packs.clear()
    sched = Scheduler(runs, ["gpu0"], start, runs_per_slot=4)
    sched.poll()
    assert packs == [["p", "s0", "s1", "s2"]]
    sched.stop_all(grace_s=5)


@pytest.fixture(scope="module")
def full_disk_reference(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted runs of the full-disk tests (one local launch for all of them)."""
    ref = tmp_path_factory.mktemp("fs-ref")
    out = launch("--config", str(write_experiment(ref, tiny_dir, name="fs", modes='["vanilla"]')),
                 "--executor", "local", "--no-report", "--runs-per-gpu", "2")
    assert out.returncode == 0, out.stdout[-3000:]
    return ref / "runs"


@pytest.mark.timeout(400)
@pytest.mark.parametrize("k", [1, 2])
def test_a_full_disk_fails_no_run_and_the_relaunch_resumes_every_run_exactly(tiny_dir: Path, tmp_path: Path,
                                                                             k: int, full_disk_reference: Path) -> None:
    # The runs folder on a small tmpfs that fills mid-experiment. torch.save used to report
    # a full disk as an opaque RuntimeError, so runs were recorded failed (and their stage-2
    # runs cancelled, both needing --retry-failed). Now no run fails: the launcher stops
    # (exit 74) saying so, and once space is freed the same command finishes every run as
    # an uninterrupted launch does. K = 2: two runs packed in one process, both stopped.
    import math

    from fastbgm.train import NO_SPACE_EXIT

    extra = ["--runs-per-gpu", "2", "--cpus-per-task", "2"] if k == 2 else []
    reference = full_disk_reference
    if k == 2:  # (one slot of 2 cores: its trainers run 2 threads, whose sums round otherwise)
        (tmp_path / "ref").mkdir()
        ref = launch("--config", str(write_experiment(tmp_path / "ref", tiny_dir, name="fs", modes='["vanilla"]')),
                     "--executor", "local", "--no-report", *extra)
        assert ref.returncode == 0, ref.stdout[-3000:]
        reference = tmp_path / "ref/runs"
    # what the finished experiment takes on a tmpfs (whole pages): 60% of it fills up mid-way
    need = sum(4096 * math.ceil(f.stat().st_size / 4096) for f in reference.rglob("*") if f.is_file())
    disk = tmp_path / "disk"
    with small_disk(disk / "runs", int(0.6 * need) // 4096 * 4):
        cfg = write_experiment(disk, tiny_dir, name="fs", modes='["vanilla"]')
        full = launch("--config", str(cfg), "--executor", "local", "--no-report", *extra)
        out = full.stdout + full.stderr
        assert full.returncode == NO_SPACE_EXIT and "Traceback" not in out, out[-3000:]
        assert "no space left" in out and "no run failed" in out, out[-3000:]
        states = {key: r["status"] for key, r in results(disk / "runs").items()}
        assert "running" in states.values() and not {"failed", "cancelled"} & set(states.values()), states
        # each unfinished run listed with its trainer's error (a packed run, its pack's)
        for key in (k.split("/", 1)[1] for k, v in states.items() if v == "running"):
            assert f"running {key}: error:" in " ".join(out.split()), out[-3000:]
        assert not list((disk / "runs").rglob(".*.tmp"))  # no half-written file left behind
        logs = "".join(p.read_text() for p in (disk / "runs").rglob("train.log"))
        assert "No space left on device" in logs and "Traceback" not in logs, logs[-3000:]
        resize_disk(disk / "runs", 4 * need // 1024)
        again = launch("--config", str(cfg), "--executor", "local", "--no-report", *extra)
        assert again.returncode == 0, again.stdout[-3000:]
        want, got = results(reference), results(disk / "runs")
        assert want.keys() == got.keys()
        for key, r in want.items():
            for m in ("status", "epochs", "train_loss", "train_acc", "test_loss", "test_acc"):
                assert got[key][m] == r[m], (key, m)


@needs_multinode
@pytest.mark.timeout(600)
@pytest.mark.parametrize("jobs", ["allocation", "per-run"])
def test_a_full_disk_on_slurm_fails_no_run_and_the_relaunch_resumes_every_run_exactly(
        tiny_dir: Path, tmp_path: Path, jobs: str, full_disk_reference: Path) -> None:
    """The same on Slurm, the small tmpfs mounted after the cluster started (its nodes see
    it, as they would shared storage). An allocation's driver starts nothing more and
    ends (exit 74) instead of requeueing onto the full disk; a per-run job whose trainer
    found no space ends with exit 74 (Slurm then cancels the runs that wait on it: they
    say the same command runs them). Before, that job ended as any failed job, and the
    launch said nothing of the disk. The launch following the jobs says so as the local
    one does, with the same exit code; once space is freed the same command finishes
    every run as an uninterrupted launch does."""
    import math

    from fastbgm.bench.localslurm import nodes_see_new_mounts
    from fastbgm.train import NO_SPACE_EXIT

    if not nodes_see_new_mounts():
        pytest.skip("the cluster's nodes do not see mounts made after they started: restart it with "
                    "launch/slurm-start.sh")
    need = sum(4096 * math.ceil(f.stat().st_size / 4096) for f in full_disk_reference.rglob("*") if f.is_file())
    disk = tmp_path / "disk"
    with small_disk(disk / "runs", int(0.6 * need) // 4096 * 4):
        args = [*_allocation_args(write_experiment(disk, tiny_dir, name="fs", modes='["vanilla"]')), "--jobs", jobs]
        full = launch(*args, "--timeout", "400", timeout=500)
        out = " ".join((full.stdout + full.stderr).split())
        assert full.returncode == NO_SPACE_EXIT and "Traceback" not in out, out[-3000:]
        assert "no space left to write the run folders" in out and "no run failed" in out, out[-3000:]
        states = results(disk / "runs")
        assert "running" in {r["status"] for r in states.values()}, states
        assert not list((disk / "runs").rglob(".*.tmp"))  # no half-written file left behind
        if jobs == "allocation":
            job = json.loads((disk / "runs/fs/slurm-allocation.json").read_text())["job_id"]
            history = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-o", "State,ExitCode", "-j", job],
                                     capture_output=True, text=True, timeout=60).stdout.split()
            assert history == [f"FAILED|{NO_SPACE_EXIT}:0"], history  # ended, not requeued onto the full disk
            assert not {"failed", "cancelled"} & {r["status"] for r in states.values()}, states
            for key in (k.split("/", 1)[1] for k, r in states.items() if r["status"] == "running"):
                assert f"running {key}: error:" in out, out[-3000:]  # each with its trainer's error
        else:
            for key, r in states.items():  # (a run may have ended before the disk filled)
                if r["status"] == "running":  # each listed with its trainer's error, as above
                    assert f"running {key.split('/', 1)[1]}: error:" in out, out[-3000:]
                assert r["status"] in ("running", "done") or (
                    r["status"] == "cancelled" and "the same command" in r["reason"]
                    and "no space left" in r["reason"]), (key, r)
        resize_disk(disk / "runs", 4 * need // 1024)
        again = launch(*args, "--timeout", "400", timeout=500)
        assert again.returncode == 0, again.stdout[-3000:]
        _assert_as_uninterrupted(disk / "runs/fs", full_disk_reference / "fs")


def test_local_runs_per_gpu_packs_runs_and_changes_no_result(tmp_path: Path) -> None:
    # Through the schedule benchmark (so that it is tested too): on a CPU machine a "GPU" is
    # a slot of cpus_per_task cores: 2 cores / 2 = one slot, which takes up to 2 runs in
    # one process.
    from fastbgm.bench.schedule import run as bench_schedule

    rows = bench_schedule(tmp_path, [1, 2], seeds=1, cpus_per_task=2, pack_modes=("auto", "fused"))["rows"]
    assert [(r["runs_per_gpu"], r["pack_mode"]) for r in rows] == [(1, "auto"), (2, "auto"), (2, "fused")]
    results_by_k = {}
    for r in rows:
        k, root = r["runs_per_gpu"], Path(r["root"])
        assert r["done"] == r["runs"] == 5
        results_by_k[f"k{k}" + ("-fused" if r["pack_mode"] == "fused" else "")] = results(root)
        spans = [(json.loads((p.parent / "env.json").read_text())["started"], json.loads(p.read_text())["written"],
                  json.loads((p.parent / "env.json").read_text())["pid"]) for p in root.rglob("result.json")]
        for t, _, _ in spans:  # one slot: one process at a time, never more than K runs in it at once
            assert len({pid for a, b, pid in spans if a <= t < b}) == 1
            assert sum(a <= t < b for a, b, _ in spans) <= k
        per_pid = [sum(pid == q for _, _, q in spans) for pid in {q for _, _, q in spans}]
        # K = 2: a pack takes runs that become ready as its own end, stage 2 after its stage 1
        assert max(per_pid) == 1 if k == 1 else max(per_pid) > 2, per_pid
        assert r["processes"] == len(per_pid)
        assert not list(root.rglob("pack-inbox*"))  # the launcher cleans up after its packs
        logs = "".join(p.read_text() for p in root.rglob("train.log"))
        assert ("train as one network" in logs) == (r["pack_mode"] == "fused")
    assert rows[1]["identical"] and rows[1]["max_train_loss_diff"] == 0
    for key, r in results_by_k["k1"].items():
        for m in ("train_acc", "train_loss", "test_acc", "epochs"):
            assert results_by_k["k2"][key][m] == r[m], (key, m)
        # fused: other kernels (float tolerance), the same runs
        assert results_by_k["k2-fused"][key]["epochs"] == r["epochs"]
        assert results_by_k["k2-fused"][key]["train_loss"] == pytest.approx(r["train_loss"], rel=1e-3), key


@needs_multinode
@pytest.mark.timeout(600)
def test_time_limit_warning_requeues_the_allocation_and_every_run_resumes(tiny_dir: Path, tmp_path: Path) -> None:
    # Before the time limit Slurm signals the job steps (submitit's --signal=USR2@90):
    # the trainers stop cleanly, the driver requeues its own allocation, and every run
    # resumes from last.pt with the numbers of an uninterrupted run.
    reference = _local_reference(tmp_path, tiny_dir, name="tl", inits='["random"]')
    args, root, job, run = _allocation_three_epochs_in(tmp_path, tiny_dir, name="tl", inits='["random"]')
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=60)  # the steps only, as Slurm does
    follow = launch(*args, "--timeout", "450", timeout=500)
    assert follow.returncode == 0, follow.stdout[-3000:]
    restarts = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    assert "Restarts=1" in restarts  # the driver requeued its allocation
    log = (run / "train.log").read_text()
    assert "stopped on request (SIGUSR2)" in log and "resuming" in log
    ref_root = reference()
    ref = read_jsonl(ref_root / "synthetic/small_cnn/seed0/stage2-random-vanilla/metrics.jsonl")
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == list(range(1, 15))
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in ref]


def test_a_packs_command_says_its_pack_mode(tmp_path: Path) -> None:
    from fastbgm.launch.placement import StepRun
    from fastbgm.launch.trainproc import train_command

    two = [StepRun(f"r{i}", str(tmp_path / f"r{i}"), pack_mode="fused") for i in range(2)]
    assert train_command(two)[-1] == "--pack-mode=fused"
    assert "--pack-mode=fused" not in train_command(two[:1])  # one run alone is no pack
    assert not any(a.startswith("--pack-mode") for a in train_command([StepRun("a", str(tmp_path / "a"))] * 2))


def test_packs_are_filled_from_one_group_first(tmp_path: Path) -> None:
    # stage-1 runs stop when memorised, stage-2 runs train a fixed number of epochs: a pack
    # of one of each would leave its slot to a straggler; same-group runs end together
    import subprocess as sp

    from fastbgm.launch.placement import StepRun
    from fastbgm.launch.schedule import Scheduler

    runs = [StepRun(f"s2-{i}", str(tmp_path / f"s2-{i}"), group="stage2/a/m") for i in range(2)]
    runs += [StepRun(f"s1-{i}", str(tmp_path / f"s1-{i}"), group="stage1/a/m") for i in range(3)]
    runs.insert(1, runs.pop(2))  # interleaved: s2-0, s1-0, s2-1, s1-1, s1-2
    packs: list[list[str]] = []

    def start(pack: list[StepRun], slots: list[str]) -> sp.Popen:
        packs.append([r.key for r in pack])
        for r in pack:
            Path(r.run_dir).mkdir(exist_ok=True)
            (Path(r.run_dir) / "result.json").write_text(json.dumps({"status": "done"}))
        return sp.Popen([sys.executable, "-c", "pass"])

    sched = Scheduler(runs, ["gpu0"], start, runs_per_slot=2)
    while not sched.finished:
        sched.poll()
        time.sleep(0.02)
    assert packs == [["s2-0", "s2-1"], ["s1-0", "s1-1"], ["s1-2"]]


def test_a_pack_with_room_is_offered_ready_runs_and_what_it_never_claims_runs_later(tmp_path: Path) -> None:
    # x ends early in the pack [x, y]: z, waiting for a slot, is offered to that pack. This
    # pack's process ends without claiming it (as one killed would): z starts on its own.
    import subprocess as sp

    from fastbgm.launch.placement import StepRun
    from fastbgm.launch.schedule import Scheduler
    from fastbgm.trainer import inbox

    runs = [StepRun(k, str(tmp_path / k)) for k in ("x", "y", "z")]
    for r in runs:
        Path(r.run_dir).mkdir()
    packs: list[list[str]] = []
    done = lambda r: json.dumps({"status": "done"})  # noqa: E731

    def start(pack: list[StepRun], slots: list[str]) -> sp.Popen:
        packs.append([r.key for r in pack])
        (Path(pack[0].run_dir) / "result.json").write_text(done(pack[0]))
        rest = [str(Path(r.run_dir) / "result.json") for r in pack[1:]]
        code = f"import time, pathlib; time.sleep(1.5); [pathlib.Path(p).write_text('{done(None)}') for p in {rest!r}]"
        return sp.Popen([sys.executable, "-c", code])

    sched = Scheduler(runs, ["gpu0"], start, runs_per_slot=2)
    offered = False
    while not sched.finished:
        sched.poll()
        offered = offered or bool(inbox.unclaimed(inbox.inbox_for(tmp_path / "x")))
        time.sleep(0.05)
    assert offered and packs == [["x", "y"], ["z"]]
    assert sched.states == {"x": "done", "y": "done", "z": "done"}
    assert not (tmp_path / "x" / inbox.INBOX).exists()


def test_a_pack_whose_runs_all_end_asks_and_takes_their_dependents(tmp_path: Path) -> None:
    # [x, y] on the only slot; z depends on x. Both end in the same moment: the pack asks
    # for more (inbox.last_call), the scheduler's next look sees z ready, no slot free and
    # the asking pack with room, and offers z to it; the pack trains z rather than ending
    # (with no ask it would close at once and z would start a process of its own)
    import subprocess as sp

    from fastbgm.launch.placement import StepRun
    from fastbgm.launch.schedule import Scheduler

    runs = [StepRun("x", str(tmp_path / "x")), StepRun("y", str(tmp_path / "y")),
            StepRun("z", str(tmp_path / "z"), depends_on=["x"])]
    for r in runs:
        Path(r.run_dir).mkdir()
    packs: list[list[str]] = []
    code = """
import json, pathlib, sys
from fastbgm.trainer import inbox
box, dirs = pathlib.Path(sys.argv[1]), sys.argv[2:]
while dirs:
    for d in dirs:
        (pathlib.Path(d) / "result.json").write_text(json.dumps({"status": "done"}))
    dirs = [str(d) for d in inbox.last_call(box, wait_s=60)]
    print("took", *dirs, flush=True)
"""

    def start(pack: list[StepRun], slots: list[str]) -> sp.Popen:
        packs.append([r.key for r in pack])
        log = open(tmp_path / f"{pack[0].key}.log", "w")
        return sp.Popen([sys.executable, "-c", code, str(inbox_for(pack[0].run_dir)), *(r.run_dir for r in pack)],
                        stdout=log, cwd=REPO)

    from fastbgm.trainer.inbox import inbox_for

    sched = Scheduler(runs, ["gpu0"], start, runs_per_slot=2)
    t0 = time.time()
    while not sched.finished:
        sched.poll()
        time.sleep(0.2)
    assert packs == [["x", "y"]] and sched.states == {"x": "done", "y": "done", "z": "done"}
    assert f"took {tmp_path / 'z'}" in (tmp_path / "x.log").read_text()
    assert time.time() - t0 < 30  # answered, not timed out
    assert not list(tmp_path.rglob("pack-inbox*"))


def test_an_inbox_refuses_offers_once_closed(tmp_path: Path) -> None:
    from fastbgm.trainer import inbox

    box = inbox.inbox_for(tmp_path)
    inbox.open_inbox(box)
    assert inbox.offer(box, "exp/a", tmp_path / "a") and inbox.offer(box, "exp/b", tmp_path / "b")
    assert sorted(inbox.unclaimed(box)) == ["exp/a", "exp/b"]
    assert inbox.claim(box) == [tmp_path / "a", tmp_path / "b"] and inbox.claim(box) == []
    assert inbox.offer(box, "exp/c", tmp_path / "c")
    assert inbox.close(box) == [tmp_path / "c"]  # what landed before it closed is the pack's
    assert not inbox.offer(box, "exp/d", tmp_path / "d") and inbox.unclaimed(box) == []


def test_an_offer_the_disk_refuses_leaves_nothing_and_a_stopped_launchs_inboxes_are_removed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a launcher stopped by a full disk left a pack's inbox, with a half-written offer, in
    # a run folder that the next launch packed differently: nothing ever removed it
    import errno

    from fastbgm.fileio import exclusive_folder
    from fastbgm.launch.placement import StepRun
    from fastbgm.launch.schedule import Scheduler
    from fastbgm.trainer import inbox

    box = inbox.inbox_for(tmp_path / "a")
    inbox.open_inbox(box)

    def full(*a: Any, **k: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(json, "dump", full)
        with pytest.raises(OSError):
            inbox.offer(box, "exp/b", tmp_path / "b")
    assert list(box.iterdir()) == []
    assert inbox.offer(box, "exp/c", tmp_path / "c")
    busy = inbox.inbox_for(tmp_path / "d")
    inbox.open_inbox(busy)
    with exclusive_folder(tmp_path / "d"):  # a live pack's: kept
        Scheduler([StepRun("exp/a", str(tmp_path / "a")), StepRun("exp/d", str(tmp_path / "d"))], [None],
                  lambda p, s: None)
        assert not box.exists() and busy.exists()


def test_an_unfinished_runs_last_error_is_its_last_trainers_own(tmp_path: Path) -> None:

    a, b, c = (tmp_path / x for x in "abc")
    for d in (a, b, c):
        d.mkdir()
    (a / "train.log").write_text("--- 1: started a\nerror: an older one\n--- 2: started a, b\nresuming\n"
                                 "error: a: No space left on device (a/last.pt); no run failed: ...\n"
                                 "srun: error: node1: task 0: Exited with exit code 74\n")
    (b / "train.log").write_text(f"packed with a: this process logs to {a / 'train.log'}\n")
    (c / "train.log").write_text("--- 1: started c\nerror: an older one\n--- 2: started c\nresuming\n")
    assert last_error(a).startswith("error: a: No space left on device (a/last.pt)")
    assert last_error(b) == last_error(a)  # a packed run: its pack's log
    assert last_error(c) == "" and last_error(tmp_path / "none") == ""  # killed, or never started


def test_a_per_run_ddp_jobs_other_ranks_put_their_errors_and_traceback_in_train_log(tmp_path: Path) -> None:
    """In a per-run job every rank logs to its run folder's train.log: rank 0 all it says
    (an "error: ..." line bare, for last_error); a DDP run's other ranks only their errors,
    each saying its rank, and what they raised with its traceback: a failure only rank 1
    meets is in train.log, not only in that task's submitit log. The job's own one-line
    mistake, which every rank would say, only rank 0 says."""
    import logging
    from types import SimpleNamespace

    from fastbgm.launch.runlog import log_rank_traceback, log_to_run_folder

    run = tmp_path / "run"
    run.mkdir()
    envs = [SimpleNamespace(global_rank=r, job_id="7", paths=SimpleNamespace(stderr=tmp_path / f"7_{r}_log.err"))
            for r in (0, 1)]
    handlers = [log_to_run_folder(str(run), "stage2", env) for env in envs]
    said = logging.getLogger("fastbgm.trainer")
    old_level = said.level
    said.setLevel(logging.INFO)
    try:
        said.info("epoch 1 | loss 2.3")
        said.error("%s: RuntimeError: boom on rank 1", run)  # (Trainer.fail's line, on both ranks here)
        said.error("error: ConfigError: a mistake")  # the job's own line for a mistake
        try:
            raise RuntimeError("boom on rank 1")
        except RuntimeError as e:
            for h, env in zip(handlers, envs):
                log_rank_traceback(h, env, e)
    finally:
        said.setLevel(old_level)
        for h in handlers:
            logging.getLogger().removeHandler(h)
            h.close()
    text = (run / "train.log").read_text()
    lines = text.splitlines()
    assert lines[0].startswith("--- ") and "started stage2 in Slurm job 7" in lines[0]
    assert sum("epoch 1 | loss 2.3" in x for x in lines) == 1 and "rank 1" not in next(x for x in lines if "epoch 1" in x)
    assert sum("boom on rank 1" in x and " rank 1 " in x for x in lines) == 1  # rank 1's error line, said so
    assert sum(x.startswith("error: ConfigError") for x in lines) == 1  # bare, from rank 0 only
    assert f"rank 1 (its whole log: {tmp_path / '7_1_log.err'}) raised:" in text and "Traceback" in text
    assert text.count("Traceback") == 1  # rank 0 writes none: it records the run's failure itself
    assert last_error(run) == "error: ConfigError: a mistake"
