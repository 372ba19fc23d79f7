"""Fault injection: break a mini experiment at a random moment, re-run the same launch
command, and check what the engine promises.

Each fault, chosen with its moment by a seed, hits a fresh copy of a tiny two-stage
experiment (stage 1, then stage 2 from random and adversarial init) run by the local
executor (and, with ``--slurm``, by a Slurm allocation):

- ``kill-run``: SIGKILL of one trainer mid-run (the OOM killer, a segfault): the launch
  must start it again from its last checkpoint and finish every run itself, before any
  re-run (with ``--slurm-jobs per-run`` the run's job requeues itself; the launch following
  it submits it again when the job ended all the same);
- ``hang``: SIGSTOP of one trainer mid-run (a deadlock, a collective that never returns):
  the launch, run with a stall timeout of :data:`HANG_STALL_S`, must kill it (with
  ``--slurm-jobs per-run``, the run's own job requeues itself) and finish every run
  itself, before any re-run;
- ``kill-launcher`` / ``term-launcher``: SIGKILL / SIGTERM of the launcher itself;
- ``corrupt-last`` / ``truncate-last``: a run's last.pt overwritten or cut short while stopped;
- ``truncate-result``: a finished run's result.json cut short;
- ``corrupt-cache``: the dataset's resident cache cut short;
- ``corrupt-beton``: the training .beton overwritten (the runs cannot finish: they must say why);
- ``nan-stage1``: stage 1 diverges (its dependents must be cancelled with the reason);
- ``preempt`` (Slurm): ``scontrol requeue`` of the allocation;
- ``kill-job`` (Slurm): SIGKILL of what a job runs beside its trainers: the allocation's
  driver (its batch script then requeues the job), or, with ``--slurm-jobs per-run``, a
  run's job whole, its batch script with its trainer (the launch following it submits it
  again); either way the launch it hit must finish every run itself, before any re-run;
- ``node-fail`` (Slurm): a node of the allocation set DOWN mid-run, then back to service.
  Slurm takes it from the job, whose driver restarts the runs that were on it on the
  nodes left; if it was the driver's own node, Slurm ends the job, and the launch
  following it submits the next allocation, which resumes every unfinished run. With
  ``--slurm-jobs per-run``, Slurm requeues the job of the run on it.

With ``--runs-per-gpu K`` every launch (the references' too) packs K runs a slot, so a
killed trainer takes a pack with it and runs join running packs.

After each fault the same command runs again (up to three times) and then: every run that
can finish must be done with results identical to an uninterrupted run (the numbers in
result.json and every weight of final.pt, bitwise on CPU); the others must say why; and
no file may be half-written (every .json parses, every .pt loads, no temporary file).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import torch

from fastbgm.config import load
from fastbgm.experiment import ExperimentConfig, plan, run_status
from fastbgm.fileio import lock_holder, read_jsonl
from fastbgm.launch.allocation import allocation_nodes
from fastbgm.launch.job import JOB_FILE as SLURM_JOB_FILE
from fastbgm.trainer import checkpoint as C

from . import mini
from .common import print_table, wait_for, write_json
from .localslurm import job_process, nodes_see_new_mounts, resume_node, set_node

LOCAL_KINDS = ("kill-run", "hang", "kill-launcher", "term-launcher", "corrupt-last", "truncate-last", "truncate-result",
               "corrupt-cache", "corrupt-beton", "nan-stage1", "disk-full")
SLURM_KINDS = ("preempt", "node-fail", "kill-job")
# kinds that need root (they mount a small tmpfs); on Slurm only where the cluster's nodes
# see a mount made after they started (nodes_see_new_mounts)
ROOT_KINDS = ("disk-full",)
# stage 1's learning rate for nan-stage1: the mini's BatchNorm keeps a loss finite at lr 1e12
# (huge, not diverged); at 1e30 its first step overflows and its loss is NaN
DIVERGING_LR = 1e30
HANG_STALL_S = 15  # the launch's --stall-timeout for the hang fault
NUMBERS = ("epochs", "train_acc", "train_loss", "test_acc", "test_loss", "epochs_to_100_train")

def _runs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob(C.PLANNED))


def _weights_digest(path: Path) -> str:
    state = C.load(path)["model"]
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _outcome(root: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for run in _runs(root):
        try:
            res = json.loads((run / C.RESULT).read_text())
        except (OSError, json.JSONDecodeError):
            res = {"status": "unreadable"}
        entry = {"status": res.get("status"), "reason": res.get("reason", "")}
        if res.get("status") == "done":
            entry.update({k: res.get(k) for k in NUMBERS})
            entry["weights"] = _weights_digest(run / C.FINAL)
        out[str(run.relative_to(root))] = entry
    return out


def _damaged_files(root: Path) -> list[str]:
    """Half-written or corrupt files left in the run folders (must be none)."""
    bad = []
    for p in root.rglob("*"):
        if not p.is_file() or ".submitit" in p.parts or ".unreadable-" in p.name:
            continue
        if p.name.endswith(".tmp"):
            bad.append(f"{p} (temporary file left behind)")
        elif p.suffix == ".json":
            try:
                json.loads(p.read_text())
            except (OSError, json.JSONDecodeError) as e:
                bad.append(f"{p} ({e})")
        elif p.suffix == ".pt":
            try:
                C.load(p)
            except Exception as e:
                bad.append(f"{p} ({type(e).__name__})")
    return bad


def _tmpfs_bytes(folder: Path) -> int:
    """What ``folder``'s files take on a tmpfs (whole pages)."""
    return sum(4096 * -(-f.stat().st_size // 4096) for f in folder.rglob("*") if f.is_file())


def _inject(kind: str, rng: random.Random, cfg: Path, data: Path, executor: str, cmd: list[str], log: Path,
            full_size: int = 0) -> str:
    """Run the experiment (its launch command ``cmd``) with the fault; return what was
    done. ``full_size``: what the finished experiment's runs folder takes on a tmpfs."""
    root = cfg.parent / "runs" / mini.NAME
    if kind == "disk-full":  # the runs folder on a tmpfs too small for the experiment; freed after
        frac = rng.uniform(0.3, 0.9)
        runs = cfg.parent / "runs"
        runs.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(frac * full_size) // 4096 * 4}k", "tmpfs",
                        str(runs)], check=True, capture_output=True, timeout=60)
        r = subprocess.run(cmd, stdout=open(log, "a"), stderr=subprocess.STDOUT, timeout=600)
        subprocess.run(["mount", "-o", f"remount,size={4 * full_size // 1024}k", str(runs)], check=True,
                       capture_output=True, timeout=60)
        return f"runs folder on a tmpfs of {frac:.0%} of what the experiment needs (launch exit {r.returncode}), then enlarged"
    if kind == "corrupt-cache":
        from fastbgm.data.cache import cache_path

        c = cache_path(data / "train.beton")
        c.write_bytes(c.read_bytes()[: rng.randint(10, 2000)])
        subprocess.run(cmd, stdout=open(log, "a"), stderr=subprocess.STDOUT, timeout=600)
        return f"cut {c.name} short before launching"
    if kind == "corrupt-beton":
        b = data / "train.beton"
        b.write_bytes(os.urandom(b.stat().st_size))
        subprocess.run(cmd, stdout=open(log, "a"), stderr=subprocess.STDOUT, timeout=600)
        return "overwrote train.beton with random bytes"
    proc = mini.start(cmd, log)
    target_rows = rng.randint(1, 4)

    def some_run_at(rows: int) -> Path | None:
        for run in _runs(root):
            if len(read_jsonl(run / C.METRICS)) >= rows and lock_holder(run):
                return run
        return None

    frozen: int | None = None  # the pid of the trainer stopped by the hang fault
    try:
        if kind == "truncate-result":
            ok = wait_for(lambda: any((r / C.RESULT).exists() and json.loads((r / C.RESULT).read_text() or "{}")
                                       .get("status") == "done" for r in _runs(root)), 300, proc)
            proc.wait(timeout=600)
            done = [r for r in _runs(root) if (r / C.RESULT).exists()] if ok else []
            victim = rng.choice(done)
            text = (victim / C.RESULT).read_text()
            (victim / C.RESULT).write_text(text[: rng.randint(1, len(text) - 1)])
            return f"cut {victim.name}/result.json short after the launch ended"
        if kind == "preempt":
            wait_for(lambda: some_run_at(target_rows) is not None, 300, proc)
            job = _job_of(root, some_run_at(target_rows))
            if job is None:
                proc.wait(timeout=600)
                return "no job was training a run: nothing to preempt"
            subprocess.run(["scontrol", "requeue", job], capture_output=True, timeout=60)
            proc.wait(timeout=600)
            return f"requeued job {job} after {target_rows} epoch(s) of a run"
        if kind == "kill-job":
            wait_for(lambda: some_run_at(target_rows) is not None, 300, proc)
            run = some_run_at(target_rows)
            job = _job_of(root, run)
            per_run = not (root / "slurm-allocation.json").exists()
            try:  # an allocation's driver; a per-run job's batch script, then its trainer
                pids = [job_process(job, b"slurm_script" if per_run else b"submitit.core._submit")] if job else []
            except LookupError:
                pids = []
            holder = (lock_holder(run) or "") if run is not None and per_run else ""
            pids += [int(holder.split()[1])] if holder.startswith("pid ") else []
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=600)
            if not pids:
                return "no job was training a run: nothing to kill"
            return (f"SIGKILL of job {job}'s " + ("batch script and the trainer of " + run.name if per_run else "driver")
                    + f" after {target_rows} epoch(s) of a run")
        if kind == "node-fail":
            wait_for(lambda: some_run_at(target_rows) is not None, 300, proc)
            job = _job_of(root, some_run_at(target_rows))
            nodes = allocation_nodes(job) if job else []
            if not nodes:
                proc.wait(timeout=600)
                return "no job was training a run: no node to fail"
            node = rng.choice(nodes)
            set_node(node, "down", reason="fastbgm fault injection")
            try:  # Slurm takes the node from the job (or requeues a per-run job); the node returns after
                wait_for(lambda: node not in allocation_nodes(job), 60)
            finally:
                resume_node(node)
            proc.wait(timeout=600)
            return f"node {node} of job {job} set DOWN after {target_rows} epoch(s) of a run, then resumed"
        if kind == "nan-stage1":  # the fault is in the config: the launch itself meets it
            proc.wait(timeout=600)
            return f"stage 1 at learning rate {DIVERGING_LR:g}, which diverges"
        wait_for(lambda: some_run_at(target_rows) is not None, 300, proc)
        run = some_run_at(target_rows)
        holder = (lock_holder(run) or "") if run is not None else ""
        pid = int(holder.split()[1]) if holder.startswith("pid ") else None  # (the run's trainer)
        if kind == "kill-run" and run is not None:
            if pid:
                os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=600)
            return f"SIGKILL of the trainer of {run.name} after {target_rows} epoch(s)"
        if kind == "hang" and pid:
            frozen = pid
            os.kill(frozen, signal.SIGSTOP)
            try:
                rc: int | str = proc.wait(timeout=600)
            except subprocess.TimeoutExpired:
                rc = "none: it did not end within 600 s"  # (not recovered: the runs are checked as left)
            return f"SIGSTOP of the trainer of {run.name} after {target_rows} epoch(s) (launch exit {rc})"
        if kind in ("kill-launcher", "term-launcher", "corrupt-last", "truncate-last"):
            proc.send_signal(signal.SIGTERM if kind == "term-launcher" else signal.SIGKILL)
            proc.wait(timeout=60)
            jobs = _slurm_jobs(root)
            if kind in ("corrupt-last", "truncate-last") and executor == "slurm" and jobs:
                # on Slurm the runs outlive the launcher: damage a stopped run, so lose its jobs too
                subprocess.run(["scancel", *jobs], capture_output=True, timeout=60)
            wait_for(lambda: run is None or lock_holder(run) is None, 60)  # its trainers are gone
            if kind in ("corrupt-last", "truncate-last"):
                # a stopped run's checkpoint: the run caught may have finished on its own
                # while the launcher went (a done run's last.pt is then only a spare)
                stopped = [r for r in _runs(root) if (r / C.LAST).exists() and run_status(r)[0] != "done"]
                if not stopped:
                    return f"every started run had finished when the launcher was killed at epoch {target_rows}"
                victim = run if run in stopped else rng.choice(stopped)
                b = (victim / C.LAST).read_bytes()
                (victim / C.LAST).write_bytes(os.urandom(len(b)) if kind == "corrupt-last" else b[: len(b) // 2])
                return f"{kind} of {victim.name} after killing the launcher at epoch {target_rows}"
            return f"{'SIGTERM' if kind == 'term-launcher' else 'SIGKILL'} of the launcher at epoch {target_rows}"
        proc.wait(timeout=600)
        return "no moment found: ran to the end"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if frozen is not None:  # (never left stopped, holding its run folder, whatever happened)
            with contextlib.suppress(ProcessLookupError):
                os.kill(frozen, signal.SIGKILL)


def _slurm_jobs(root: Path) -> list[str]:
    """The Slurm jobs the launcher submitted for the experiment: its allocation, or (with
    ``--jobs per-run``) one a run."""
    files = [root / "slurm-allocation.json"] + [r / SLURM_JOB_FILE for r in _runs(root)]
    return sorted({json.loads(f.read_text())["job_id"] for f in files if f.exists()})


def _job_of(root: Path, run: Path | None) -> str | None:
    """The Slurm job training ``run``: the allocation, or the run's own job."""
    for f in (root / "slurm-allocation.json", run / SLURM_JOB_FILE if run else None):
        if f is not None and f.exists():
            return json.loads(f.read_text())["job_id"]
    return None


def check_args(slurm: bool, kinds: list[str], runs_per_gpu: int, slurm_jobs: str) -> None:
    """ValueError, naming the flag and the fix, for a sweep that cannot run as asked."""
    bad = [k for k in kinds if k not in LOCAL_KINDS + SLURM_KINDS]
    if bad:
        raise ValueError(f"--kinds {','.join(bad)}: unknown; choose from {', '.join(LOCAL_KINDS + SLURM_KINDS)}")
    if not slurm and any(k in SLURM_KINDS for k in kinds):
        raise ValueError(f"--kinds {','.join(k for k in kinds if k in SLURM_KINDS)}: needs --slurm")
    if slurm_jobs not in ("allocation", "per-run"):
        raise ValueError(f"--slurm-jobs must be allocation or per-run, got {slurm_jobs!r}")
    if any(k in ROOT_KINDS for k in kinds) and os.geteuid() != 0:
        raise ValueError(f"--kinds {','.join(k for k in kinds if k in ROOT_KINDS)}: needs root (it mounts a small "
                         "tmpfs); run as root, or leave it out")
    if slurm_jobs == "per-run" and runs_per_gpu > 1:
        raise ValueError("--slurm-jobs per-run packs nothing (runs share a slot only inside an allocation): "
                         "drop --runs-per-gpu")


def run(out: Path, faults: int, seed: int, slurm: bool = False, kinds: list[str] | None = None,
        runs_per_gpu: int = 1, slurm_jobs: str = "allocation") -> dict[str, Any]:
    """Inject ``faults`` faults; print and return the table. ``runs_per_gpu`` > 1: every
    launch packs that many runs a slot (a killed trainer then takes a pack with it).
    ``slurm_jobs``: how the Slurm launches submit (the launcher's ``--jobs``: one
    allocation, or one job a run)."""
    check_args(slurm, kinds or [], runs_per_gpu, slurm_jobs)
    rng = random.Random(seed)
    packing = ("--runs-per-gpu", str(runs_per_gpu)) if runs_per_gpu > 1 else ()
    extras = {"local": packing, "slurm": packing + (("--jobs", "per-run") if slurm_jobs == "per-run" else ())}
    out.mkdir(parents=True, exist_ok=True)
    clean_data = mini.dataset(out / "data")
    executors = ["local"] + (["slurm"] if slurm else [])
    reference: dict[str, dict] = {}
    for executor in executors:  # uninterrupted, once per executor
        work = out / f"reference-{executor}"
        shutil.rmtree(work, ignore_errors=True)
        ref = subprocess.run(mini.launch_cmd(mini.experiment(work, clean_data), executor, *extras[executor]),
                             capture_output=True, text=True, timeout=900)
        reference[executor] = _outcome(work / "runs" / mini.NAME)
        if ref.returncode != 0 or not reference[executor]:
            raise RuntimeError(f"the uninterrupted {executor} run did not finish (exit {ref.returncode}): "
                               f"{(ref.stdout + ref.stderr)[-1500:]}")
    # a stage 1 that diverges: the runs that do not start from a stage 1 must still finish,
    # as uninterrupted (stage 1's learning rate is not in their configs); the others must
    # say why they cannot
    exp = load(ExperimentConfig, mini.experiment(out / "reference-nan", clean_data, stage1_lr=DIVERGING_LR))
    reference["nan"] = {r.key: reference["local"][r.key] for r in plan(exp) if r.stage == 2 and not r.depends_on}
    pool = list(kinds or (LOCAL_KINDS + (SLURM_KINDS if slurm else ())))
    if not kinds and os.geteuid() != 0:
        print(f"not root: the sweep leaves out {', '.join(ROOT_KINDS)} (it mounts a small tmpfs)", flush=True)
        pool = [k for k in pool if k not in ROOT_KINDS]
    full_size = {e: _tmpfs_bytes(out / f"reference-{e}" / "runs") for e in executors}  # (Slurm's: its logs too)
    shared_mounts = slurm and nodes_see_new_mounts()
    rows: list[dict[str, Any]] = []
    for i in range(faults):
        kind = pool[i % len(pool)] if i < len(pool) else rng.choice(pool)
        executor = "slurm" if kind in SLURM_KINDS else "local" if kind in ROOT_KINDS and not shared_mounts \
            else rng.choice(executors)
        work = out / f"fault-{i:03d}"
        shutil.rmtree(work, ignore_errors=True)
        data = work / "data"
        shutil.copytree(clean_data, data)
        cfg = mini.experiment(work, data, stage1_lr=DIVERGING_LR if kind == "nan-stage1" else 0.05)
        log = work / "launch.log"
        cmd = mini.launch_cmd(cfg, executor, *extras[executor],
                              *(("--stall-timeout", str(HANG_STALL_S)) if kind == "hang" else ()))
        try:
            what = _inject(kind, rng, cfg, data, executor, cmd, log, full_size[executor])
            # a hang, and a killed trainer, must be undone by the launch it hit, not by a
            # re-run; a full disk must fail no run (the launch stops, and says so)
            in_launch = True
            if kind in ("hang", "kill-run", "kill-job"):
                in_launch = all(v["status"] == "done" for k, v in _outcome(work / "runs" / mini.NAME).items()
                                if reference[executor].get(k, {}).get("status") == "done")
            elif kind == "disk-full":  # (with one Slurm job a run, Slurm cancels the runs that wait
                # on the job that found the disk full: they must say that the same command runs them)
                in_launch = not any(v["status"] == "failed"
                                    or (v["status"] == "cancelled" and "the same command" not in v["reason"])
                                    for v in _outcome(work / "runs" / mini.NAME).values())
            if kind == "corrupt-beton":  # the fault stays: the runs must say why they cannot finish
                reruns = 1
            else:
                reruns = 0
                for _ in range(3):
                    r = subprocess.run(cmd, stdout=open(log, "a"), stderr=subprocess.STDOUT, timeout=900)
                    reruns += 1
                    if r.returncode in (0, 1):
                        break
            got = _outcome(work / "runs" / mini.NAME)
            damaged = _damaged_files(work / "runs")
        finally:
            if kind in ROOT_KINDS:
                subprocess.run(["umount", "--lazy", str(work / "runs")], capture_output=True, timeout=60)
        ref = reference["nan" if kind == "nan-stage1" else executor]
        finishable = [k for k, v in ref.items() if v["status"] == "done"] if kind != "corrupt-beton" else []
        identical = all(got.get(k, {}).get(m) == ref[k].get(m) for k in finishable for m in (*NUMBERS, "weights"))
        recovered = in_launch and all(got.get(k, {}).get("status") == "done" for k in finishable)
        others = [k for k in got if k not in finishable]
        explained = all(got[k]["status"] in ("failed", "cancelled") and got[k]["reason"] for k in others)
        rows.append({"fault": i, "kind": kind, "executor": executor, "what": what, "reruns": reruns,
                     "recovered": recovered and explained, "identical": identical, "damaged": damaged})
        print(f"fault {i:3d} {kind:16s} {executor:5s} recovered={recovered and explained} identical={identical} "
              f"damaged={len(damaged)}: {what}", flush=True)
    table = {}
    for r in rows:
        t = table.setdefault(r["kind"], {"injected": 0, "recovered": 0, "identical": 0, "damaged": 0})
        t["injected"] += 1
        t["recovered"] += int(r["recovered"])
        t["identical"] += int(r["identical"])
        t["damaged"] += len(r["damaged"])
    total = {k: sum(t[k] for t in table.values()) for k in ("injected", "recovered", "identical", "damaged")}
    packed = (f", {runs_per_gpu} runs a slot" if runs_per_gpu > 1 else "") + \
        (", one Slurm job a run" if slurm and slurm_jobs == "per-run" else "")
    print_table(f"fault injection: {faults} faults, seed {seed}{packed}",
                ["fault", "injected", "runs recovered", "results identical", "files corrupted"],
                [[k, t["injected"], t["recovered"], t["identical"], t["damaged"]] for k, t in sorted(table.items())]
                + [["all", total["injected"], total["recovered"], total["identical"], total["damaged"]]])
    result = {"seed": seed, "faults": faults, "runs_per_gpu": runs_per_gpu, "slurm_jobs": slurm_jobs, "table": table, "total": total,
              "rows": rows, "torch": torch.__version__}
    write_json(out, "faults", result)
    return result
