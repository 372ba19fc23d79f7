"""Several batch-128 runs on one device: images/s for K = 1, 2, 4, 8 packed runs, and
the ratio to K = 1, all measured in one run, through the trainer's own packed loop
(:func:`fastbgm.trainer.loop.train_epoch_together`: each run its own model, optimizer,
data order and, on a GPU in pack modes threads and streams, CUDA stream; or fused into
one network), in each pack mode asked for; and how far run 0 of each pack ends from run
0 trained alone. With ``ceiling``, also one run at batch K x 128 for each K: the rate K
packed runs would reach if packing cost nothing over one run with K times the batch
(each pack's share of it is the "of one run at K x batch" column)."""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from fastbgm import distributed as D
from fastbgm.data import loader_from_arrays
from fastbgm.models import build_model
from fastbgm.trainer.config import PACK_MODES as LOOP_PACK_MODES
from fastbgm.trainer.loop import train_epoch_together
from fastbgm.trainer.runstate import RunState
from fastbgm.trainer.measures import peak_flops, train_flops_per_image
from fastbgm.trainer.stepgraph import StepGraphs
from fastbgm.trainer.speed import Speed, compile_model, make_sgd, threaded_compile_ok

from .common import device_info, print_table, synchronize, write_json
from .train import synthetic_arrays

log = logging.getLogger(__name__)

# the trainer's pack modes, and K runs as K processes (bench/processes.py; ``mps``: under CUDA MPS)
PROCESS_MODES = ("processes", "mps")
PACK_MODES = tuple(m for m in LOOP_PACK_MODES if m != "auto") + PROCESS_MODES


def _state(name: str, seed: int, images: Any, labels: Any, batch: int, speed: Speed, device: torch.device,
           packed: bool, graphs: bool = True, **model_kw: Any) -> RunState:
    torch.manual_seed(seed)
    module = build_model(name, 10, **model_kw).to(device)
    if speed.channels_last:
        module = module.to(memory_format=torch.channels_last)
    model = compile_model(module, speed.compile_mode) if speed.compile else module
    opt = make_sgd([{"params": list(module.parameters()), "weight_decay": 5e-4}], 0.05, 0.9, False, device)
    dtype = torch.bfloat16 if speed.precision == "bf16" else torch.float32
    train = loader_from_arrays(images, labels, batch_size=batch, device=device, augment=True, seed=seed,
                               dtype=dtype, drop_last=True, channels_last=speed.channels_last, num_classes=10)
    env = D.DistEnv(0, 1, 0, device)
    s = RunState(None, env, speed, module, model, opt, None, None, train, train, None, {}, None, None, 0, 1,
                 stream=torch.cuda.Stream(device) if packed and device.type == "cuda" else None)
    if speed.step_graph and graphs:
        s.graphs = StepGraphs(s)
    return s


def bench_speed(mode: str, device: torch.device) -> tuple[str, Speed]:
    """A bench's step mode (auto: as the trainer's default, step graphs on a GPU; eager on a CPU) and its speed switches:
    eager, compiled, cudagraphs (torch.compile's reduce-overhead) or stepgraph (compiled,
    the whole step one CUDA graph: trainer/stepgraph.py); bf16 on a GPU."""
    gpu = device.type == "cuda"
    if mode == "auto":
        mode = "stepgraph" if gpu else "eager"
    compile_mode = "reduce-overhead" if mode == "cudagraphs" else "default"
    return mode, Speed(device.type, mode != "eager", compile_mode, True, "bf16" if gpu else "fp32", gpu,
                       torch.get_num_threads(), step_graph=mode == "stepgraph")


def model_flops_utilization(module: torch.nn.Module, images_per_s: float, device: torch.device,
                            precision: str) -> float | None:
    """The share of the device's peak FLOP/s that training ``module`` on CIFAR-size images
    at ``images_per_s`` uses (None where either is unknown: a CPU, an unlisted card)."""
    flops = train_flops_per_image(module, (3, 32, 32), device)
    peak = peak_flops(device, precision)
    return flops * images_per_s / peak if flops and peak else None


def measure(name: str, k: int, batch: int, steps: int, speed: Speed, device: torch.device,
            arrays: tuple[Any, Any], pack_mode: str = "serial",
            model_kw: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """images/s of ``k`` runs packed as ``pack_mode`` says; and run 0's final weights (on
    the CPU), which must equal those of run 0 trained alone."""
    images, labels = arrays[0][: batch * steps], arrays[1][: batch * steps]
    fused = k > 1 and pack_mode == "fused"
    streams = k > 1 and pack_mode not in ("serial", "fused")
    states = {i: _state(name, i, images, labels, batch, speed, device, streams, graphs=not fused, **(model_kw or {}))
              for i in range(k)}
    threads = pack_mode == "threads"
    fusions: dict | None = {} if fused else None  # the loop's fused groups, kept across epochs

    def epoch(runs: dict[int, RunState]) -> None:
        failed = train_epoch_together(runs, threads=threads, fusions=fusions)
        if failed:
            raise RuntimeError(f"{name} K={k}: {next(iter(failed.values()))}")

    t0 = time.perf_counter()
    epoch(states)  # warm-up epoch: compilation, CUDA graph capture, allocator
    synchronize(device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    epochs = 2
    for e in range(epochs):
        for s in states.values():
            s.epoch = e + 1
        epoch(states)
    synchronize(device)
    dt = time.perf_counter() - t0
    ips = k * epochs * len(images) / dt
    mfu = model_flops_utilization(states[0].module, ips, device, speed.precision)
    weights = {n: p.detach().float().cpu() for n, p in states[0].module.state_dict().items() if p.is_floating_point()}
    for s in states.values():
        s.close()
    del states
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"model": name, "K": k, "pack_mode": pack_mode if k > 1 else "alone", "batch": batch,
            "images_per_s": ips, "warmup_s": warm, "mfu": mfu}, weights


EARLY_STEPS = 3  # a measurement's three epochs of one step each: where a fused run's exactness is judged


def _rel_diff(w: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """The largest difference of ``w`` from ``ref``, each tensor's as a share of its largest
    value (BatchNorm statistics grow large: an absolute difference says little)."""
    return max(float((w[n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-12)) for n in ref)


def run(device: torch.device, models: list[str], ks: list[int], batch: int, steps: int, out: Path | None,
        mode: str = "auto", pack_modes: tuple[str, ...] = ("serial", "threads"),
        deadline: float | None = None, baselines: dict | None = None,
        model_kw: dict[str, Any] | None = None, ceiling: bool = False) -> list[dict[str, Any]]:
    """The table: for each model, K = 1 alone, then each K > 1 in each pack mode, with the
    largest difference of run 0's weights from run 0 alone (0 on a CPU: bitwise, but for
    ``fused``: other kernels, float tolerance). ``mode``: eager, compiled, cudagraphs
    (torch.compile's reduce-overhead) or stepgraph (compiled, each run's whole step one
    CUDA graph); pack mode ``fused`` (trainer/fused.py) compiles when ``mode`` does and
    captures the whole fused step as one CUDA graph on a GPU. ``baselines``: K = 1 rows
    (and weights) already measured in this process, by model, mode, batch and steps,
    reused instead of measured again (and filled).

    ``streams`` with CUDA graphs (``mode`` cudagraphs) is measured when asked, and marked
    unsafe: the trainer refuses it, because the runs' graphs share one memory pool; its
    difference column shows what that race does. ``model_kw``: the models' options
    (e.g. small_cnn's width). ``ceiling``: after each K's packs, one run at batch K x
    ``batch`` (row ``ceiling`` True), and each pack's images/s as a share of it."""
    gpu = device.type == "cuda"
    mode, speed = bench_speed(mode, device)
    arrays = synthetic_arrays(batch * steps)
    rows = []
    early_ref: dict[str, dict[str, torch.Tensor]] = {}  # run 0 alone after EARLY_STEPS steps, by model

    def failed(name: str, k: int, pm: str, at_batch: int, e: Exception) -> None:
        """One measurement that raised (out of memory, a kernel that will not compile): a
        row that says so, and the others go on (one GPU session must not lose them)."""
        log.error("%s K=%d %s at batch %d failed: %s: %s", name, k, pm, at_batch, type(e).__name__, e)
        rows.append({"model": name, "K": k, "pack_mode": pm, "batch": at_batch,
                     "failed": f"{type(e).__name__}: {e}"[:300]})
        traceback.clear_frames(e.__traceback__)
        if gpu:
            torch.cuda.empty_cache()

    for name in models:
        base, ref = None, None
        for k in ks:
            for pm in (pack_modes if k > 1 else ("serial",)):
                if deadline is not None and time.time() > deadline:
                    log.warning("time budget spent: %s K=%d %s skipped", name, k, pm)
                    continue
                if pm == "threads" and k > 1 and speed.compile and not threaded_compile_ok():
                    log.warning("%s K=%d threads skipped: torch %s cannot compile from several threads at once "
                                "(the trainer packs such runs on streams or serially)", name, k, torch.__version__)
                    continue
                if pm == "threads" and k > 1 and gpu and speed.torch_graphs:
                    log.warning("%s K=%d threads skipped: torch.compile's CUDA graphs cannot be recorded from "
                                "several threads (the trainer refuses it: trainer/speed.py)", name, k)
                    continue
                if pm == "mps" and k > 1 and not gpu:
                    log.warning("%s K=%d mps skipped: CUDA MPS needs a GPU", name, k)
                    continue
                if k > 1 and base is None:  # (K = 1 failed: nothing to compare with)
                    continue
                key = (name, mode, batch, steps)
                try:
                    if k == 1 and baselines is not None and key in baselines:
                        r, w = dict(baselines[key][0]), baselines[key][1]
                    elif pm in PROCESS_MODES and k > 1:  # (MPS may not start on a machine: a failed row says why)
                        from .processes import measure as measure_processes

                        r, w = measure_processes(name, k, batch, steps, mode, device, model_kw, mps=pm == "mps")
                    else:
                        r, w = measure(name, k, batch, steps, speed, device, arrays, pm, model_kw)
                        if k == 1 and baselines is not None:
                            baselines[key] = (r, w)
                    if base is None:
                        base, ref = r["images_per_s"], w
                    r["x_k1"] = r["images_per_s"] / base
                    r["max_abs_diff"] = max(float((w[n] - ref[n]).abs().max()) for n in ref)
                    r["max_rel_diff"] = _rel_diff(w, ref)
                    r["unsafe"] = pm == "streams" and gpu and speed.torch_graphs
                    if pm == "fused" and k > 1:
                        # other kernels: any float difference grows step by step (on a CPU, fp32, from
                        # 1e-7 after 3 steps to 5% after 30), so exactness is judged a few steps in
                        early = early_ref.get(name)
                        if early is None:
                            early = early_ref[name] = measure(name, 1, batch, 1, speed, device, arrays, "serial",
                                                              model_kw)[1]
                        r["early_rel_diff"] = _rel_diff(measure(name, k, batch, 1, speed, device, arrays, pm,
                                                                model_kw)[1], early)
                except Exception as e:
                    failed(name, k, pm if k > 1 else "alone", batch, e)
                    continue
                if ceiling and k > 1:
                    r["of_ceiling"] = None  # filled below, once the one run at batch K x batch is measured
                rows.append(r)
                log.info("%s K=%d %s: %.0f img/s (x%.2f), max |dw| %.3g (%.2g relative%s)", name, k, r["pack_mode"],
                         r["images_per_s"], r["x_k1"], r["max_abs_diff"], r["max_rel_diff"],
                         f"; {r['early_rel_diff']:.2g} after {EARLY_STEPS} steps" if "early_rel_diff" in r else "")
            if ceiling and k > 1 and base is not None and (deadline is None or time.time() <= deadline):
                try:
                    big = measure(name, 1, batch * k, steps, speed, device, synthetic_arrays(batch * k * steps),
                                  "serial", model_kw)[0]
                except Exception as e:
                    failed(name, k, f"one run, batch {batch * k}", batch * k, e)
                    continue
                big.update(K=k, pack_mode=f"one run, batch {batch * k}", ceiling=True, unsafe=False,
                           x_k1=big["images_per_s"] / base)
                for r in rows:
                    if r["model"] == name and r["K"] == k and "of_ceiling" in r:
                        r["of_ceiling"] = r["images_per_s"] / big["images_per_s"]
                rows.append(big)
                log.info("%s one run at batch %d: %.0f img/s (x%.2f of K=1)", name, batch * k, big["images_per_s"],
                         big["x_k1"])
    info = device_info(device)

    def num(r: dict[str, Any], key: str, fmt: str) -> str:
        return format(r[key], fmt) if r.get(key) is not None else ""

    print_table(f"packed runs, batch {batch}, {speed.precision}, "
                f"{mode} on {info['device']}",
                ["model", "K", "pack mode", "images/s", "x K=1", "of one run at K x batch", "max |dw| vs alone",
                 "relative", f"relative after {EARLY_STEPS} steps", "MFU", "warm-up s"],
                [[r["model"], r["K"], r["pack_mode"], "failed", "", "", r["failed"][:60], "", "", "", ""]
                 if "failed" in r else
                 [r["model"], r["K"], r["pack_mode"] + (" (unsafe: graphs race)" if r["unsafe"] else ""),
                  f"{r['images_per_s']:,.0f}", f"{r['x_k1']:.2f}",
                  f"{100 * r['of_ceiling']:.0f}%" if r.get("of_ceiling") is not None else "",
                  num(r, "max_abs_diff", ".2g"), num(r, "max_rel_diff", ".2g"), num(r, "early_rel_diff", ".2g"),
                  f"{100 * r['mfu']:.1f}%" if r["mfu"] else "",
                  f"{r['warmup_s']:.1f}"] for r in rows])
    if out:
        write_json(out, "pack", {"device": info, "compile": mode, "rows": rows})
    return rows
