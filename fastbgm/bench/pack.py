"""Several batch-128 runs on one device: images/s for K = 1, 2, 4, 8 packed runs, and
the ratio to K = 1, all measured in one run, through the trainer's own packed loop
(:func:`fastbgm.trainer.loop.train_epoch_together`: each run its own model, optimizer,
data order and, on a GPU, CUDA stream; their steps taken in turn)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from fastbgm import distributed as D
from fastbgm.data import loader_from_arrays
from fastbgm.models import build_model
from fastbgm.trainer.loop import RunState, train_epoch_together
from fastbgm.trainer.measures import peak_flops, train_flops_per_image
from fastbgm.trainer.trainer import Speed, make_sgd

from .common import device_info, print_table, synchronize, write_json
from .train import synthetic_arrays

log = logging.getLogger(__name__)


def _state(name: str, seed: int, images: Any, labels: Any, batch: int, speed: Speed, device: torch.device,
           packed: bool) -> RunState:
    torch.manual_seed(seed)
    module = build_model(name, 10).to(device)
    if speed.channels_last:
        module = module.to(memory_format=torch.channels_last)
    model = torch.compile(module, mode=None if speed.compile_mode == "default" else speed.compile_mode) \
        if speed.compile else module
    opt = make_sgd([{"params": list(module.parameters()), "weight_decay": 5e-4}], 0.05, 0.9, False, device)
    dtype = torch.bfloat16 if speed.precision == "bf16" else torch.float32
    train = loader_from_arrays(images, labels, batch_size=batch, device=device, augment=True, seed=seed,
                               dtype=dtype, drop_last=True, channels_last=speed.channels_last, num_classes=10)
    env = D.DistEnv(0, 1, 0, device)
    return RunState(None, env, speed, module, model, opt, None, None, train, train, None, {}, None, None, 0, 1,
                    stream=torch.cuda.Stream(device) if packed and device.type == "cuda" else None)


def measure(name: str, k: int, batch: int, steps: int, speed: Speed, device: torch.device,
            arrays: tuple[Any, Any]) -> dict[str, Any]:
    images, labels = arrays[0][: batch * steps], arrays[1][: batch * steps]
    states = {i: _state(name, i, images, labels, batch, speed, device, k > 1) for i in range(k)}
    t0 = time.perf_counter()
    train_epoch_together(states)  # warm-up epoch: compilation, CUDA graph capture, allocator
    synchronize(device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    epochs = 2
    for e in range(epochs):
        for s in states.values():
            s.epoch = e + 1
        failed = train_epoch_together(states)
        if failed:
            raise RuntimeError(f"{name} K={k}: {next(iter(failed.values()))}")
    synchronize(device)
    dt = time.perf_counter() - t0
    ips = k * epochs * len(images) / dt
    flops = train_flops_per_image(states[0].module, (3, 32, 32), device)
    peak = peak_flops(device, speed.precision)
    return {"model": name, "K": k, "batch": batch, "images_per_s": ips, "warmup_s": warm,
            "mfu": flops * ips / peak if peak else None}


def run(device: torch.device, models: list[str], ks: list[int], batch: int, steps: int, out: Path | None,
        mode: str = "auto") -> list[dict[str, Any]]:
    gpu = device.type == "cuda"
    if mode == "auto":
        mode = "cudagraphs" if gpu else "eager"
    compile_mode = "reduce-overhead" if mode == "cudagraphs" else "default"
    speed = Speed(device.type, mode != "eager", compile_mode, True, "bf16" if gpu else "fp32", gpu,
                  torch.get_num_threads())
    arrays = synthetic_arrays(batch * steps)
    rows = []
    for name in models:
        base = None
        for k in ks:
            r = measure(name, k, batch, steps, speed, device, arrays)
            base = base or r["images_per_s"]
            r["x_k1"] = r["images_per_s"] / base
            rows.append(r)
            log.info("%s K=%d: %.0f img/s (x%.2f)", name, k, r["images_per_s"], r["x_k1"])
    info = device_info(device)
    print_table(f"packed runs, batch {batch}, {speed.precision}, "
                f"{mode} on {info['device']}",
                ["model", "K", "images/s", "x K=1", "MFU", "warm-up s"],
                [[r["model"], r["K"], f"{r['images_per_s']:,.0f}", f"{r['x_k1']:.2f}",
                  f"{100 * r['mfu']:.1f}%" if r["mfu"] else "", f"{r['warmup_s']:.1f}"] for r in rows])
    if out:
        write_json(out, "pack", {"device": info, "rows": rows})
    return rows
