"""K runs on one device as K processes, the issue's third candidate design (pack modes
``processes`` and ``mps`` of ``bench pack``; the trainer does not pack this way yet).

Each process trains one run exactly as it trains alone (the same state, loader and loop
as :func:`fastbgm.bench.pack.measure` with K = 1), so each run is the run alone by
construction; what is measured is whether K processes fill a GPU better than K runs in
one process. Without MPS the processes' CUDA contexts take turns on the GPU (time
slices); with CUDA MPS (``mps``: a control daemon started for the measurement, its
pipes in a temporary folder) their kernels run side by side.

The rate is every process's timed images over the window from the first process's
start to the last one's end; all start together, after each has compiled, captured and
warmed up (a barrier)."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import queue as queue_mod
import shutil
import subprocess
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

import torch

log = logging.getLogger(__name__)

EPOCHS = 2  # timed epochs per process, after one warm-up epoch (as pack.measure)
WORKER_TIMEOUT_S = 900.0  # a process that has not reported by then is taken as hung


def _worker(name: str, seed: int, batch: int, steps: int, mode: str, device: str, model_kw: dict[str, Any],
            threads: int, barrier: Any, results: Any, weights_path: str) -> None:
    """One run in this process: warm up, wait for the others, time ``EPOCHS`` epochs."""
    try:
        from fastbgm.trainer.loop import train_epoch_together

        from .common import synchronize
        from .pack import _state, bench_speed
        from .train import synthetic_arrays

        torch.set_num_threads(threads)
        dev = torch.device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        _, speed = bench_speed(mode, dev)
        images, labels = synthetic_arrays(batch * steps)
        s = _state(name, seed, images, labels, batch, speed, dev, False, **model_kw)

        def epoch() -> None:
            failed = train_epoch_together({0: s})
            if failed:
                raise next(iter(failed.values()))

        epoch()  # compilation, graph capture, allocator
        synchronize(dev)
        barrier.wait(timeout=WORKER_TIMEOUT_S)
        t0 = time.monotonic()  # (CLOCK_MONOTONIC: one clock for every process of the machine)
        for e in range(EPOCHS):
            s.epoch = e + 1
            epoch()
        synchronize(dev)
        t1 = time.monotonic()
        if seed == 0:
            torch.save({n: p.detach().float().cpu() for n, p in s.module.state_dict().items()
                        if p.is_floating_point()}, weights_path)
        s.close()
        results.put(("ok", seed, t0, t1, EPOCHS * len(images)))
    except BaseException as e:  # said to the parent, which names the run
        with contextlib.suppress(Exception):
            barrier.abort()  # the others must not wait for this one
        results.put(("error", seed, f"{type(e).__name__}: {e}", traceback.format_exc()[-2000:]))


@contextlib.contextmanager
def mps_daemon() -> Iterator[None]:
    """A CUDA MPS control daemon for the processes started inside (its pipe and log
    folders in a temporary folder, named to them by environment variables); stopped, and
    the variables restored, after. Raises RuntimeError when MPS cannot start here."""
    exe = shutil.which("nvidia-cuda-mps-control")
    if exe is None:
        raise RuntimeError("nvidia-cuda-mps-control is not on PATH (CUDA MPS is not installed here)")
    with tempfile.TemporaryDirectory(prefix="fastbgm-mps-") as tmp:
        env = {"CUDA_MPS_PIPE_DIRECTORY": str(Path(tmp) / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(Path(tmp) / "log")}
        for d in env.values():
            os.makedirs(d)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            res = subprocess.run([exe, "-d"], capture_output=True, text=True, timeout=60)
            if res.returncode != 0:
                raise RuntimeError(f"nvidia-cuda-mps-control -d failed ({res.returncode}): "
                                   f"{(res.stderr or res.stdout).strip()[-300:]}")
            try:
                yield
            finally:
                subprocess.run([exe], input="quit\n", capture_output=True, text=True, timeout=60)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def measure(name: str, k: int, batch: int, steps: int, mode: str, device: torch.device,
            model_kw: dict[str, Any] | None = None, mps: bool = False
            ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """images/s of ``k`` runs as ``k`` processes on ``device`` (under CUDA MPS when ``mps``);
    and run 0's final weights, which must equal those of run 0 trained alone."""
    if mps and device.type != "cuda":
        raise RuntimeError("CUDA MPS needs a GPU")
    ctx = mp.get_context("spawn")  # (CUDA cannot be used in a forked child)
    barrier, results = ctx.Barrier(k), ctx.Queue()
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="fastbgm-procs-") as tmp, \
            (mps_daemon() if mps else contextlib.nullcontext()):
        weights_path = str(Path(tmp) / "run0.pt")
        procs = [ctx.Process(target=_worker, args=(name, i, batch, steps, mode, str(device), dict(model_kw or {}),
                                                   threads, barrier, results, weights_path), daemon=True)
                 for i in range(k)]
        t_start = time.monotonic()
        for p in procs:
            p.start()
        got, errors = [], []
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        while len(got) + len(errors) < k:
            try:
                msg = results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue_mod.Empty:
                errors.append((-1, f"no report within {WORKER_TIMEOUT_S:.0f} s", ""))
                break
            (got if msg[0] == "ok" else errors).append(msg[1:])
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        if errors:
            # the run that failed first of its own accord (the others then find the barrier broken)
            seed, why, tb = min(errors, key=lambda e: (e[1].startswith("BrokenBarrierError"), e[0] < 0, e[0]))
            log.debug("run %d of %d processes failed:\n%s", seed, k, tb)
            raise RuntimeError(f"{name} K={k} {'mps' if mps else 'processes'}: run {seed}: {why}")
        weights = torch.load(weights_path)
    t0, t1 = min(g[1] for g in got), max(g[2] for g in got)
    ips = sum(g[3] for g in got) / (t1 - t0)
    from fastbgm.models import build_model

    from .pack import bench_speed, model_flops_utilization

    _, speed = bench_speed(mode, device)
    mfu = model_flops_utilization(build_model(name, 10, **(model_kw or {})).to(device), ips, device, speed.precision)
    return {"model": name, "K": k, "pack_mode": "mps" if mps else "processes", "batch": batch,
            "images_per_s": ips, "warmup_s": t0 - t_start, "mfu": mfu}, weights
