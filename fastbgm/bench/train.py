"""Training throughput: images/s and MFU per model, batch size and speed mode, with
the resident loader in the loop and with one pre-made batch (the difference is the
loader's overhead). Modes: ``eager-fp32``, ``eager-bf16``, ``compiled-fp32``,
``compiled-bf16``; channels-last throughout."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fastbgm.models import build_model
from fastbgm.trainer.measures import peak_flops, train_flops_per_image
from fastbgm.trainer.speed import compile_model, make_sgd

from .common import device_info, print_table, synchronize, write_json

log = logging.getLogger(__name__)


def synthetic_arrays(n: int, resolution: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Learnable synthetic images in memory (no files, no ffcv)."""
    from fastbgm.data.sources import synthetic_splits

    split = synthetic_splits(n, 0, 10, resolution, seed)["train"]
    return np.stack([split.image(i) for i in range(n)]), split.labels


def bare_step(fwd: Any, opt: torch.optim.Optimizer, precision: str, device: torch.device) -> Any:
    """The bare training step the trainer is held to: forward, mean loss, backward, SGD."""
    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        if precision == "bf16":
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = fwd(x)
        else:
            out = fwd(x)
        loss = F.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def measure(name: str, batch_size: int, mode: str, device: torch.device, steps: int,
            loaders: dict[str, Any | None], input_shape: tuple[int, int, int] = (3, 32, 32),
            model_kw: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Build and (maybe) compile the model once, then time each entry of ``loaders``
    (``None`` = one pre-made batch on the device). ``mode`` is ``<how>-<precision>``:
    how = eager | compiled (inductor) | cudagraphs (inductor + CUDA graphs)."""
    how, precision = mode.split("-")
    torch.manual_seed(0)
    model = build_model(name, 10, **(model_kw or {})).to(device).to(memory_format=torch.channels_last)
    flops = train_flops_per_image(model, input_shape, device)
    opt = make_sgd([{"params": list(model.parameters()), "weight_decay": 5e-4}], 0.01, 0.9, False, device)
    fwd = {"eager": lambda m: m, "compiled": lambda m: compile_model(m, "default"),
           "cudagraphs": lambda m: compile_model(m, "reduce-overhead")}[how](model)
    x0 = torch.randn(batch_size, *input_shape, device=device).to(memory_format=torch.channels_last)
    if precision == "bf16":
        x0 = x0.to(torch.bfloat16)
    y0 = torch.randint(0, 10, (batch_size,), device=device)
    peak = peak_flops(device, precision)

    step = bare_step(fwd, opt, precision, device)
    rows = []
    def batches(loader: Any | None):
        while True:
            if loader is None:
                yield x0, y0
            else:
                yield from ((x, y) for x, y, _ in loader)

    for label, loader in loaders.items():
        it = batches(loader)
        t0 = time.perf_counter()
        for _ in range(3):  # warm-up (and, the first time, compilation)
            step(*next(it))
        synchronize(device)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        images = 0
        for _ in range(steps):
            x, y = next(it)
            step(x, y)
            images += len(y)
        synchronize(device)
        dt = time.perf_counter() - t0
        ips = images / dt
        rows.append({"model": name, "batch": batch_size, "mode": mode, "loader": loader is not None,
                     "images_per_s": ips, "step_ms": 1000 * dt / steps, "warmup_s": warm,
                     "mfu": (flops * ips / peak) if (flops and peak) else None,
                     "train_gflops_per_image": (flops or 0) / 1e9})
    return rows


def make_bench_loader(device: torch.device, batch_size: int, precision: str, n: int = 20000) -> Any:
    from fastbgm.data import loader_from_arrays

    images, labels = synthetic_arrays(n)
    # drop_last: a smaller last batch would make a compiled model recompile inside the timing
    return loader_from_arrays(images, labels, batch_size=batch_size, device=device, augment=True, drop_last=True,
                              dtype=torch.bfloat16 if precision == "bf16" else torch.float32)


def run(device: torch.device, data_root: Path, models: list[str], batch_sizes: list[int], modes: list[str],
        steps: int, out: Path | None, loader_modes: tuple[str, ...] = ("without", "with"),
        deadline: float | None = None, loader_images: int = 20000,
        model_kw: dict[str, Any] | None = None) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    results: dict[str, Any] = {"info": device_info(device), "rows": rows, "skipped": []}
    loaders: dict[tuple[int, str], Any] = {}
    for name in models:
        for bs in batch_sizes:
            for mode in modes:
                if deadline is not None and time.time() > deadline:
                    results["skipped"].append(f"{name} bs{bs} {mode} (time budget)")
                    continue
                use: dict[str, Any | None] = {}
                for lm in loader_modes:
                    if lm == "with":
                        key = (bs, mode.split("-")[1])
                        if key not in loaders:
                            loaders[key] = make_bench_loader(device, bs, key[1], loader_images)
                        use[lm] = loaders[key]
                    else:
                        use[lm] = None
                try:
                    rows.extend(measure(name, bs, mode, device, steps, use, model_kw=model_kw))
                except Exception as e:  # one failing mode must not lose the table
                    log.warning("%s bs%d %s failed: %s", name, bs, mode, e)
                    results["skipped"].append(f"{name} bs{bs} {mode}: {type(e).__name__}: {e}")
                    continue
                write_json(out, "train", results)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    # loader overhead: share of the step time the loader adds, per (model, batch, mode)
    base = {(r["model"], r["batch"], r["mode"]): r["images_per_s"] for r in rows if not r["loader"]}
    for r in rows:
        b = base.get((r["model"], r["batch"], r["mode"]))
        if r["loader"] and b:
            r["loader_overhead"] = max(0.0, 1 - r["images_per_s"] / b)
    print_table(
        f"training images/s on {results['info']['name']} ({device})",
        ["model", "batch", "mode", "loader", "images/s", "MFU", "step ms", "warm-up s", "loader overhead"],
        [[r["model"], r["batch"], r["mode"], "in loop" if r["loader"] else "fixed batch", r["images_per_s"],
          f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-", f"{r['step_ms']:.2f}", f"{r['warmup_s']:.1f}",
          f"{100 * r['loader_overhead']:.1f}%" if "loader_overhead" in r else "-"] for r in rows],
    )
    for s in results["skipped"]:
        print(f"skipped: {s}")
    write_json(out, "train", results)
    return results
