"""``python -m fastbgm.bench gpu --out DIR``: the one command to run on a GPU machine.

Sections, in priority order, each skipped (and said so) once the time budget is
spent: device and versions; loader images/s (resident; stream only with ffcv);
training images/s and MFU for ResNet18 and VGG16 on 32x32, eager vs compiled, bf16,
with the loader in the loop and without; the same ResNet18 on 2 processes when
there are 2+ GPUs; a short real two-stage run through the Trainer (compiled, bf16)
when a prepared dataset is found under ``--data`` (``<data>/cifar10/train.beton`` or
its resident cache), or the JPEG archive ``<data>/cifar10-jpeg.tar.xz`` (decoded
without ffcv into resident caches); else that section says it was skipped. Writes ``gpu.json`` (updated after
every section) and prints the table last.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .common import device_info, print_table, time_images, write_json

log = logging.getLogger(__name__)


def _loader_section(device: torch.device, seconds: float) -> list[list[Any]]:
    from fastbgm.data import LabelSpec, loader_from_arrays
    from fastbgm.data.ffcv_io import ffcv_available

    from .train import synthetic_arrays

    images, labels = synthetic_arrays(20000)
    rows = []
    for bs in (512,):
        spec = LabelSpec("confusion", seed=0, copies=4, zero_ratio=0.1)
        t0 = time.perf_counter()
        L = loader_from_arrays(images, labels, batch_size=bs, device=device, label_spec=spec, augment=True,
                               dtype=torch.bfloat16)
        setup = time.perf_counter() - t0
        ips = time_images(lambda loader=L: sum(len(y) for _, y, _ in loader), device, seconds)
        rows.append(["loader", f"resident confusion R=4 + crop/flip, bf16, batch {bs}", ips,
                     f"setup {setup:.1f}s (80k noised copies)"])
    if not ffcv_available():
        rows.append(["loader", "stream (ffcv JPEG)", float("nan"), "skipped: ffcv is not installed here"])
    return rows


def _two_gpu_section(out: Path) -> list[list[Any]]:
    if torch.cuda.device_count() < 2:
        return [["ddp", "resnet18 on 2 processes", float("nan"), "skipped: only one GPU"]]
    code = ("import os, torch; from fastbgm.bench.train import measure; import torch.distributed as d;"
            "d.init_process_group('nccl'); r=d.get_rank(); torch.cuda.set_device(r);"
            "m=measure('resnet18', 512, 'cudagraphs-bf16', torch.device('cuda', r), 30, {'without': None})[0];"
            "print('IPS', m['images_per_s']) if r==0 else None")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-c", code], capture_output=True, text=True, timeout=400)
    ips = next((float(line.split()[1]) for line in res.stdout.splitlines() if line.startswith("IPS")), float("nan"))
    return [["ddp", "resnet18 cudagraphs-bf16 batch 512/GPU, 2 processes (per GPU)", ips,
             "ok" if res.returncode == 0 else res.stderr[-300:]]]


def _caches_from_archive(archive: Path, out: Path, per_class: tuple[int, int] = (1000, 200)) -> None:
    """Real CIFAR-10 without ffcv: decode the JPEG archive (1,000 train / 200 test images
    per class) into resident caches + manifests that the trainer reads directly."""
    import tarfile

    from fastbgm.data.sources import imagefolder_splits
    from fastbgm.data.writer import prepare_cache_only, preset_normalization

    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(archive) as tf:
            tf.extractall(tmp, filter="data")
        root = Path(tmp)
        while not (root / "train").is_dir():
            root = next(p for p in root.iterdir() if p.is_dir())
        splits = imagefolder_splits(root, preset="cifar10")
        norm = preset_normalization("cifar10")
        prepare_cache_only({"train": splits["train"]}, out, normalization=norm, limit_per_class=per_class[0])
        prepare_cache_only({"test": splits["test"]}, out, normalization=norm, limit_per_class=per_class[1])


def _trainer_section(device: torch.device, data: Path, work: Path, epochs: int) -> list[list[Any]]:
    """Stage 1 on the confusion set, then stage 2 from it and from random init."""
    from fastbgm.config import load
    from fastbgm.fileio import read_jsonl
    from fastbgm.trainer import RunConfig, Trainer
    from fastbgm.trainer import checkpoint as C

    beton = data / "cifar10" / "train.beton"
    test = data / "cifar10" / "test.beton"
    archive = data / "cifar10-jpeg.tar.xz"
    if not (beton.exists() or beton.with_name("train.resident.npz").exists()) and archive.exists():
        _caches_from_archive(archive, data / "cifar10")
    if not (beton.exists() or beton.with_name("train.resident.npz").exists()):
        return [["two-stage", "real CIFAR-10 run", float("nan"),
                 f"skipped: no {beton} (or its resident cache), and no {archive}"]]
    base = {"data": {"train": str(beton), "test": str(test)}, "model": {"name": "resnet18"},
            "optim": {"lr": 0.1, "batch_size": 128, "milestones": []},
            "stop": {"max_epochs": epochs, "train_eval_every": epochs, "test_eval_every": epochs},
            "speed": {"device": device.type, "compile": "true", "precision": "bf16", "channels_last": "true"}}
    rows = []
    s1 = load(RunConfig, None, ["--name=stage1", "--data.labels=confusion", "--data.copies=2",
                                "--data.zero_ratio=0.1"], base=json.loads(json.dumps(base)))
    runs = {"stage1": (s1, work / "stage1")}
    for init in ("random", "adversarial"):
        extra = [f"--name=stage2-{init}"] + ([f"--init_from={work / 'stage1'}"] if init == "adversarial" else [])
        runs[f"stage2-{init}"] = (load(RunConfig, None, extra, base=json.loads(json.dumps(base))),
                                  work / f"stage2-{init}")
    for name, (cfg, run_dir) in runs.items():
        t0 = time.perf_counter()
        res = Trainer(cfg, run_dir).run()
        wall = time.perf_counter() - t0
        m = read_jsonl(run_dir / C.METRICS)
        steady = [r for r in m[1:]] or m
        ips = sum(r["images_per_s"] for r in steady) / max(1, len(steady))
        mfu = [r["mfu"] for r in steady if r.get("mfu")]
        rows.append(["two-stage", f"{name}: resnet18 compiled ({res.get('speed', {}).get('compile_mode')}) bf16, "
                     f"{len(m)} epochs", ips,
                     f"train loss {m[0]['train_loss']:.3f} -> {m[-1]['train_loss']:.3f}, "
                     f"train acc {res.get('train_acc', float('nan')):.3f}, test acc {res.get('test_acc') or float('nan'):.3f}, "
                     + (f"MFU {100 * sum(mfu) / len(mfu):.1f}%, " if mfu else "") + f"wall {wall:.0f}s"])
    return rows


def run(device: torch.device, data: Path, out: Path | None, seconds: float, budget_s: float = 420.0) -> dict:
    start = time.time()
    deadline = start + budget_s
    info = device_info(device)
    info["cuda_devices"] = torch.cuda.device_count()
    results: dict[str, Any] = {"info": info, "rows": [], "skipped": []}
    rows: list[list[Any]] = [["device", f"{info['name']}; torch {info['torch']}; CUDA {info.get('cuda')}",
                              float("nan"), f"{info['cuda_devices']} GPU(s)"]]

    def section(name: str, fn, *a) -> None:
        if time.time() > deadline:
            rows.append([name, "-", float("nan"), "skipped: time budget spent"])
            return
        t0 = time.time()
        try:
            rows.extend(fn(*a))
        except Exception as e:  # a failing section must not lose the others
            log.exception("section %s failed", name)
            rows.append([name, "-", float("nan"), f"failed: {type(e).__name__}: {e}"[:300]])
        results["rows"] = rows
        results.setdefault("section_seconds", {})[name] = time.time() - t0
        write_json(out, "gpu", results)

    section("loader", _loader_section, device, seconds)

    def train_rows() -> list[list[Any]]:
        from .train import run as run_train

        res = run_train(device, data, ["resnet18", "vgg16_bn"], [512],
                        ["eager-bf16", "compiled-bf16", "cudagraphs-bf16"], 40, out,
                        loader_modes=("without", "with"), deadline=deadline - 120)
        res2 = run_train(device, data, ["resnet18", "vgg16_bn"], [128], ["cudagraphs-bf16"], 60, None,
                         loader_modes=("without",), deadline=deadline - 120)
        out_rows = []
        for r in res["rows"] + res2["rows"]:
            note = f"MFU {100 * r['mfu']:.1f}%" if r["mfu"] else "MFU -"
            if "loader_overhead" in r:
                note += f", loader overhead {100 * r['loader_overhead']:.1f}%"
            out_rows.append(["train", f"{r['model']} batch {r['batch']} {r['mode']} "
                             f"{'loader in loop' if r['loader'] else 'fixed batch'}", r["images_per_s"],
                             note + f", warm-up {r['warmup_s']:.0f}s"])
        results["train"] = res["rows"] + res2["rows"]
        results["skipped"] += res["skipped"] + res2["skipped"]
        return out_rows

    section("train", train_rows)

    def pack_rows() -> list[list[Any]]:
        from .pack import run as run_pack

        res = run_pack(device, ["resnet18", "vgg16_bn"], [1, 2, 4, 8], 128, 40, out)
        results["pack"] = res
        return [["pack", f"{r['model']} batch 128, K={r['K']} runs on the GPU", r["images_per_s"],
                 f"x{r['x_k1']:.2f} of K=1"] for r in res]

    section("pack", pack_rows)
    section("ddp", _two_gpu_section, out or Path("."))
    work = Path(tempfile.mkdtemp(prefix="fastbgm-gpu-"))
    section("two-stage", _trainer_section, device, data, work, 8)
    results["wall_seconds"] = time.time() - start
    write_json(out, "gpu", results)
    print_table(f"fastbgm GPU check ({results['wall_seconds']:.0f} s)", ["section", "what", "images/s", "notes"], rows)
    return results
