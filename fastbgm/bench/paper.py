"""The paper on all of CIFAR-10 on one machine, in minutes: the GPU check's ``paper``
section. Real CIFAR-10 without ffcv (the JPEG archive decoded into resident caches, or a
prepared copy), then ``configs/cifar10-gpu.toml`` through the launcher as a user runs it
(``python -m fastbgm.launch --executor local``: stage 1, then stage 2 from random and
adversarial init, packed on the GPU), stopped when the time budget ends, then the report
(table, claims, figures), packed as one archive beside the check's table.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from .common import markdown_table

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "cifar10-gpu.toml"
STOP_GRACE_S = 60.0  # a stopped launch's time to stop its trainers (each checkpoints first)
REPORT_RESERVE_S = 45.0  # budget kept for the report after the launch


def ready(folder: Path) -> bool:
    return (folder / "train.beton").exists() or (folder / "train.resident.npz").exists()


def caches_from_archive(archive: Path, out: Path, per_class: tuple[int, int] = (1000, 200)) -> None:
    """Real CIFAR-10 without ffcv: decode the JPEG archive's first ``per_class`` train /
    test images of each class into resident caches + manifests that the trainer reads
    directly."""
    import posixpath

    from fastbgm.data.sources import imagefolder_splits
    from fastbgm.data.writer import prepare_cache_only, preset_normalization

    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(archive) as tf:
            # only the images kept (the first per class, in name order, as limit_per_class
            # keeps them): writing all 60,000 files cost most of the time
            by_folder: dict[str, list[tarfile.TarInfo]] = {}
            for m in tf.getmembers():
                if m.isfile():
                    by_folder.setdefault(posixpath.dirname(m.name), []).append(m)
            limit, keep = {"train": per_class[0], "test": per_class[1]}, []
            for folder, ms in by_folder.items():  # <root>/<split>/<class>
                keep += sorted(ms, key=lambda m: m.name)[:limit.get(posixpath.basename(posixpath.dirname(folder)), 0)]
            tf.extractall(tmp, members=keep, filter="data")
        root = Path(tmp)
        while not (root / "train").is_dir():
            root = next(p for p in root.iterdir() if p.is_dir())
        splits = imagefolder_splits(root, preset="cifar10")
        norm = preset_normalization("cifar10")
        prepare_cache_only({"train": splits["train"]}, out, normalization=norm, limit_per_class=per_class[0])
        prepare_cache_only({"test": splits["test"]}, out, normalization=norm, limit_per_class=per_class[1])


ARCHIVE = "cifar10-jpeg.tar.xz"


def decoded_folder(data: Path, per_class: tuple[int, int]) -> Path:
    """Where the archive's first ``per_class`` images a class are decoded to: a folder
    named for that size, so a smoke's toy subset is never read as the real thing."""
    return data / "cifar10-jpeg-{}-{}-per-class".format(*per_class)


def cifar10_folder(data: Path, per_class: tuple[int, int], prepared: Sequence[str] = ()) -> Path | None:
    """Where CIFAR-10 is ready for the trainer: the first of ``data/<prepared>`` that is
    (a .beton or its resident cache), else the archive ``data/cifar10-jpeg.tar.xz``'s
    first ``per_class`` train / test images a class, decoded once into
    :func:`decoded_folder`; None when neither is there."""
    for name in prepared:
        if ready(data / name):
            return data / name
    folder = decoded_folder(data, per_class)
    if _needs_decoding(data, per_class, prepared):
        caches_from_archive(data / ARCHIVE, folder, per_class)
    return folder if ready(folder) else None


def _needs_decoding(data: Path, per_class: tuple[int, int], prepared: Sequence[str]) -> bool:
    """Whether :func:`cifar10_folder` would decode the archive: none of ``prepared`` is
    ready, nor the decoded folder, and the archive is there."""
    return (not any(ready(data / name) for name in prepared) and not ready(decoded_folder(data, per_class))
            and (data / ARCHIVE).exists())


def decode_in_background(data: Path, per_class: tuple[int, int], prepared: Sequence[str],
                         log_path: Path) -> subprocess.Popen | None:
    """Start :func:`cifar10_folder` in a process of its own, so that decoding the archive
    (one core, about half a minute for all of CIFAR-10) overlaps the GPU check's sections
    before the paper instead of spending the paper's budget; :func:`run` waits for it.
    None when there is nothing to decode."""
    if not _needs_decoding(data, per_class, prepared):
        return None
    code = ("import sys; from pathlib import Path; from fastbgm.bench.paper import cifar10_folder; "
            "cifar10_folder(Path(sys.argv[1]), (int(sys.argv[2]), int(sys.argv[3])), sys.argv[4:])")
    with open(log_path, "w") as f:  # (the child keeps its own copy of the file descriptor)
        return subprocess.Popen([sys.executable, "-c", code, str(data.resolve()), str(per_class[0]),
                                 str(per_class[1]), *prepared], stdout=f, stderr=subprocess.STDOUT, cwd=REPO)


def _launch(cmd: list[str], log_path: Path, seconds: float) -> tuple[int | None, float]:
    """Run the launch, stopped (SIGTERM, as Ctrl-C stops it: its trainers checkpoint and
    exit) once ``seconds`` have passed: (its exit code, None when it had to be killed;
    wall seconds)."""
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "160"}
    with open(log_path, "a") as f:  # (a resumed launch's log follows the earlier call's)
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
        try:
            p.wait(timeout=max(1.0, seconds))
        except subprocess.TimeoutExpired:
            log.warning("paper: the time budget ends; stopping the launch (its runs resume on a re-launch)")
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                return None, time.perf_counter() - t0
    return p.returncode, time.perf_counter() - t0


Rows = list[list[Any]]


def run(data: Path, work: Path, out: Path | None, deadline: float, per_class: tuple[int, int],
        overrides: Sequence[str] = (), prepared: Sequence[str] = ("cifar10-full", "cifar10"),
        info: dict[str, Any] | None = None, decoding: subprocess.Popen | None = None) -> tuple[Rows, dict[str, Any]]:
    """The section's rows and its record: the launch's command, exit code and wall time,
    every run's result (results.csv), the claims, and the report archived as
    ``out/paper-report.tar.gz`` (report.md, results.csv, claims.json, the figures, the
    launch's log, each run's records, and ``facts.md``: the machine (``info``), the
    commands, times and the table, for the RUN.md that says what the numbers mean).
    ``decoding``: the :func:`decode_in_background` started earlier, waited for here."""
    from fastbgm.report import build_report

    if not CONFIG.exists():
        return [["paper", "full CIFAR-10", float("nan"), f"skipped: no {CONFIG} (run from a checkout)"]], {}
    t0 = time.perf_counter()
    if decoding is not None and decoding.wait() != 0:  # (decoded again below, which says why it fails)
        log.warning("paper: decoding the archive in the background failed (exit %s); decoding it here",
                    decoding.returncode)
    folder = cifar10_folder(data, per_class, prepared)
    if folder is None:
        return [["paper", "full CIFAR-10", float("nan"),
                 f"skipped: no prepared CIFAR-10 in {data} and no {data / 'cifar10-jpeg.tar.xz'}"]], {}
    decode_s = time.perf_counter() - t0
    name = "cifar10-gpu"
    cmd = [sys.executable, "-m", "fastbgm.launch", "--config", str(CONFIG), "--executor", "local", "--no-report",
           f"--runs_dir={work}", f"--name={name}", f"--datasets.0.train={folder / 'train.beton'}",
           f"--datasets.0.test={folder / 'test.beton'}", *overrides]
    work.mkdir(parents=True, exist_ok=True)
    exp = work / name
    earlier = _run_states(exp)  # a launch an earlier check left in ``work`` (--paper-dir): resumed
    images_before = _images_trained(exp) if earlier else 0.0  # (this call's images/s counts only its own)
    launch_log = work / "launch.log"
    if earlier:
        with open(launch_log, "a") as f:
            f.write(f"\n--- {time.strftime('%H:%M:%S')}: the GPU check again: the launch resumes ("
                    f"{_states_line(earlier)})\n")
    code, wall = _launch(cmd, launch_log, deadline - time.time() - REPORT_RESERVE_S)
    record: dict[str, Any] = {"command": " ".join(cmd[1:]), "data": str(folder), "decode_s": decode_s,
                              "decoded_in_background": decoding is not None, "exit_code": code, "wall_s": wall,
                              "earlier": earlier}
    rows: Rows = []
    try:
        rep = build_report(exp)
    except FileNotFoundError as e:
        tail = launch_log.read_text(errors="replace")[-600:] if launch_log.exists() else ""
        return [["paper", "full CIFAR-10", float("nan"), f"failed: no runs to report ({e}); launch: {tail}"]], record
    results = list(csv.DictReader(io.StringIO((rep["dir"] / "results.csv").read_text())))
    record["results"] = results
    record["claims"] = [{"passed": c.passed, "text": c.text} for c in rep["claims"]]
    images = 0.0
    metrics = {run.key: run.metrics for run in rep["runs"]}  # (each run's metrics.jsonl, as the report read it)
    for r in results:
        rows_of = metrics.get(r["key"], [])
        seconds = sum(m.get("epoch_seconds", 0.0) for m in rows_of)
        extras = sum(m.get("eval_seconds", 0.0) + m.get("checkpoint_seconds", 0.0) for m in rows_of)
        images += _images(rows_of)
        what = f"{r['key'].split('/')[-1]}: {r['status']}, {r['epochs'] or len(rows_of)} epochs"
        if r["status"] in ("running", "pending") and code != 0:
            what += " (the launch was stopped at the time budget)"
        rows.append(["paper", what, float("nan"),
                     f"train acc {_pct(r['train_acc'])}, test acc {_pct(r['test_acc'])}, "
                     f"{seconds:.0f} s training, {extras:.0f} s evaluating, measuring and checkpointing"
                     + (f"; {r['reason']}" if r.get("reason") else "")])
    for c in rep["claims"]:
        rows.append(["paper", "claim", float("nan"), {True: "PASS", False: "FAIL", None: "N/A"}[c.passed] + f": {c.text}"])
    images = max(0.0, images - images_before)
    rows.append(["paper", f"launch ({'exit ' + str(code) if code is not None else 'killed'}; "
                 + (f"waited {decode_s:.0f} s for the data" if decoding is not None else f"decode {decode_s:.0f} s")
                 + ")", images / wall if wall else float("nan"),
                 f"wall {wall:.0f} s; images/s = every run's trained images over the launch's wall time"
                 + (f" (this call's images only: it resumed an earlier call's launch, {_states_line(earlier)}; "
                    "the runs' epochs and seconds above are all calls')" if earlier else "")])
    if out is not None:
        facts = work / "facts.md"
        facts.write_text(_facts(info or {}, record, rows))
        out.mkdir(parents=True, exist_ok=True)
        with tarfile.open(out / "paper-report.tar.gz", "w:gz") as tf:
            tf.add(rep["dir"], arcname="report")
            tf.add(launch_log, arcname="launch.log")
            tf.add(facts, arcname="facts.md")
            for r in results:  # each run's metrics and result: what the numbers came from
                for f in ("metrics.jsonl", "result.json", "config.json"):
                    if (exp / r["key"] / f).exists():
                        tf.add(exp / r["key"] / f, arcname=f"runs/{r['key']}/{f}")
    return rows, record


def _run_states(exp: Path) -> dict[str, str]:
    """{run key: status} of the runs a launch left in the experiment folder ``exp`` (none
    when there is none): what an earlier GPU check given the same ``--paper-dir`` did."""
    from fastbgm.experiment import run_status

    if not exp.is_dir():
        return {}
    return {str(f.parent.relative_to(exp)): run_status(f.parent)[0] for f in sorted(exp.rglob("result.json"))}


def _images(metrics: list[dict[str, Any]]) -> float:
    """Images one run trained, from its metrics rows (each epoch's images/s times its seconds)."""
    return sum(m.get("images_per_s", 0.0) * m.get("epoch_seconds", 0.0) for m in metrics)


def _images_trained(exp: Path) -> float:
    """Images every run in the experiment folder ``exp`` has trained so far."""
    from fastbgm.fileio import read_jsonl
    from fastbgm.trainer import checkpoint as C

    return sum(_images(read_jsonl(f)) for f in exp.rglob(C.METRICS))


def _states_line(states: dict[str, str]) -> str:
    """"2 runs done, 1 running" for :func:`_run_states`' answer (running: stopped, to resume)."""
    from collections import Counter

    counts = Counter(states.values())
    return ", ".join(f"{n} run{'s' if n > 1 else ''} {state}" for state, n in counts.most_common()) + " before it"


def _facts(info: dict[str, Any], record: dict[str, Any], rows: Rows) -> str:
    """What the run was, as facts: machine, software, commands, times, the table."""
    import platform

    lines = [f"# The paper on CIFAR-10 through the launcher ({time.strftime('%Y-%m-%d')})", "",
             f"- Machine: {info.get('name', '?')}; torch {info.get('torch', '?')}; CUDA {info.get('cuda')}; "
             f"Python {platform.python_version()}",
             "- Command: `bash launch/gpu-check.sh ... --sections paper` (fastbgm.bench.paper), which ran",
             f"  `python {record['command']}`",
             f"- Data: {record['data']} (" + (f"decoded in the background while the sections before ran; the "
                                               f"paper waited {record['decode_s']:.0f} s for it)"
                                               if record.get("decoded_in_background") else
                                               f"decoded in {record['decode_s']:.0f} s when not there yet)"),
             f"- Launch: exit {record['exit_code']}, wall {record['wall_s']:.0f} s"
             + (f" (this call; it resumed an earlier call's launch in the same --paper-dir: "
                f"{_states_line(record['earlier'])}; the runs' epochs and seconds below are all calls')"
                if record.get("earlier") else ""), "",
             *markdown_table(["what", "images/s", "notes"], [r[1:] for r in rows])]
    return "\n".join(lines) + "\n"


def _pct(v: str) -> str:
    try:
        return f"{100 * float(v):.2f}%"
    except ValueError:
        return "-"
