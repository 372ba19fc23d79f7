"""The GPU check's sections on the Trainer itself (bench/gpu.py runs them): ``two-stage``
(stage 1 and both stage-2 runs of ResNet18 on real CIFAR-10, alone and packed, with
torch.compile's graphs and with step graphs), ``trainer/bare`` (the Trainer's images/s
over the bare compiled step's: the issue's within-10% goal) and ``eval`` (what the
Trainer's evaluation costs at the training batch and at its auto batch)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .common import time_images
from .gpu_scale import FULL, Scale


def eval_section(device: torch.device, scale: Scale = FULL, deadline: float | None = None,
                  results: dict[str, Any] | None = None) -> list[list[Any]]:
    """images/s of the Trainer's evaluation (trainer.evaluate: eager, eval mode) of
    ``scale.trainer_model`` over ``scale.eval_images`` images at batch ``scale.batch``, at
    the batch ``speed.eval_batch_size = auto`` resolves to here, and at 8 x ``scale.batch``;
    each after one pass that lets cuDNN pick its kernels for the shapes, as a run's first
    evaluation does."""
    from fastbgm.data import loader_from_arrays
    from fastbgm.models import build_model
    from fastbgm.trainer.config import DataConfig, OptimConfig, RunConfig
    from fastbgm.trainer.measures import evaluate
    from fastbgm.trainer.speed import eval_batch_size

    from .pack import bench_speed
    from .train import synthetic_arrays

    _, speed = bench_speed("eager", device)
    torch.backends.cudnn.benchmark = speed.cudnn_benchmark
    cfg = RunConfig(data=DataConfig(train="-"), optim=OptimConfig(batch_size=scale.batch))
    auto = eval_batch_size(cfg, device.type == "cuda", (32, 32))
    images, labels = synthetic_arrays(scale.eval_images)
    torch.manual_seed(0)
    module = build_model(scale.trainer_model, 10, **dict(scale.model_kw)).to(device)
    module = module.to(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if speed.precision == "bf16" else torch.float32
    rows, base = [], None
    for batch in sorted({scale.batch, auto, 8 * scale.batch}):
        if deadline is not None and time.time() > deadline:
            rows.append(["eval", f"batch {batch}", float("nan"), "skipped: time budget spent"])
            continue
        loader = loader_from_arrays(images, labels, batch_size=batch, device=device, train=False, dtype=dtype,
                                    channels_last=True)
        first = time.perf_counter()
        evaluate(module, loader, speed)  # (cuDNN's choice of kernels for these shapes)
        first = time.perf_counter() - first

        def once(loader: Any = loader) -> int:
            evaluate(module, loader, speed)
            return len(labels)

        ips = time_images(once, device, 0.5, warmup=0)
        base = base or ips
        if results is not None:
            results.setdefault("eval", []).append({"model": scale.trainer_model, "batch": batch, "auto": batch == auto,
                                                   "images_per_s": ips, "first_pass_s": first})
        rows.append(["eval", f"{scale.trainer_model} eval mode, {speed.precision}, batch {batch}"
                     + (" (auto here)" if batch == auto else ""), ips,
                     f"x{ips / base:.2f} of batch {scale.batch}; {len(labels):,} images in {len(labels) / ips:.2f} s "
                     f"(the first pass {first:.2f} s)"])
        del loader
    return rows


def two_stage_section(device: torch.device, data: Path, work: Path, results: dict[str, Any],
                     deadline: float | None = None, scale: Scale = FULL) -> list[list[Any]]:
    """Stage 1 on the confusion set, then stage 2 from it and from random init, through
    the Trainer; then both stage-2 runs packed on the GPU, and how far each ends from
    alone. Twice: with torch.compile's CUDA graphs (the default), then with step graphs
    (``speed.step_graph``: the whole step one CUDA graph; its pack replays on streams);
    then fused into one network. What is left once ``deadline`` passes is skipped."""
    from fastbgm.config import load
    from fastbgm.fileio import read_jsonl
    from fastbgm.trainer import RunConfig, Trainer
    from fastbgm.trainer import checkpoint as C
    from fastbgm.trainer.loop import train_runs

    from .paper import cifar10_folder

    # a prepared CIFAR-10 at full scale; else a subset decoded from the JPEG archive
    found = cifar10_folder(data, scale.per_class, ("cifar10",) if scale == FULL else ())
    if found is None:
        return [["two-stage", "real CIFAR-10 run", float("nan"),
                 f"skipped: no {data / 'cifar10' / 'train.beton'} (or its resident cache), and no "
                 f"{data / 'cifar10-jpeg.tar.xz'}"]]
    folder = found
    beton, test = folder / "train.beton", folder / "test.beton"
    rows: list[list[Any]] = []
    epochs, model = scale.epochs, scale.trainer_model

    def config(name: str, step_graph: bool, *extra: str) -> RunConfig:
        base = {"data": {"train": str(beton), "test": str(test)}, "model": {"name": model, **dict(scale.model_kw)},
                "optim": {"lr": 0.1, "batch_size": scale.batch, "milestones": []},
                "stop": {"max_epochs": epochs, "train_eval_every": epochs, "test_eval_every": epochs},
                "speed": {"device": device.type, "compile": "true", "precision": "bf16", "channels_last": "true",
                          "step_graph": "true" if step_graph else "false"}}
        return load(RunConfig, None, [f"--name={name}", *extra], base=base)

    def steady(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], float]:
        """A run's metrics rows, those after its first epoch (compilation, graph capture), and
        their mean images/s."""
        m = read_jsonl(run_dir / C.METRICS)
        after = m[1:] or m
        return m, after, sum(r["images_per_s"] for r in after) / max(1, len(after))

    def record(name: str, run_dir: Path, res: dict[str, Any], wall: float, label: str) -> None:
        m, steady_rows, ips = steady(run_dir)
        mfu = [r["mfu"] for r in steady_rows if r.get("mfu")]
        extras = (sum(r.get("eval_seconds", 0) + r.get("checkpoint_seconds", 0) for r in steady_rows)
                  / max(1e-9, sum(r["epoch_seconds"] for r in steady_rows)))
        results.setdefault("two_stage", []).append({"run": name, "label": label, "images_per_s": ips, "wall_s": wall,
                                                    "eval_over_train": extras, "result": res})
        if res.get("status") != "done":
            rows.append(["two-stage", f"{name} ({label})", float("nan"), f"{res.get('status')}: {res.get('reason')}"])
            return
        rows.append(["two-stage", f"{name}: {model} {label} bf16, {len(m)} epochs", ips,
                     f"train loss {m[0]['train_loss']:.3f} -> {m[-1]['train_loss']:.3f}, "
                     f"train acc {res.get('train_acc', float('nan')):.3f}, test acc {res.get('test_acc') or float('nan'):.3f}, "
                     + (f"MFU {100 * sum(mfu) / len(mfu):.1f}%, " if mfu else "")
                     + f"per-epoch extras {100 * extras:.0f}% of training time, wall {wall:.0f}s"])

    def pack_ips(dirs: list[Path]) -> float:
        """The pack's images/s: its runs' steady images/s summed (each run's row counts its own images)."""
        return sum(steady(d)[2] for d in dirs)

    def max_diff(a: Path, b: Path) -> float:
        if not ((a / C.FINAL).exists() and (b / C.FINAL).exists()):
            return float("nan")
        wa, wb = C.load(a / C.FINAL)["model"], C.load(b / C.FINAL)["model"]
        return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa if wa[k].is_floating_point())

    t0 = time.perf_counter()
    res = Trainer(config("stage1", False, "--data.labels=confusion", "--data.copies=2", "--data.zero_ratio=0.1"),
                  work / "stage1").run()
    record("stage1", work / "stage1", res, time.perf_counter() - t0, "compiled (reduce-overhead)")
    stage2 = {"random": [], "adversarial": [f"--init_from={work / 'stage1'}"]}

    def alone_dir(init: str, graphs: bool) -> Path:
        return work / f"stage2-{init}{'-graphs' if graphs else ''}"

    def alone(graphs: bool, label: str) -> None:
        for init, extra in stage2.items():
            d = alone_dir(init, graphs)
            t0 = time.perf_counter()
            res = Trainer(config(f"stage2-{init}", graphs, *extra), d).run()
            record(f"stage2-{init}", d, res, time.perf_counter() - t0, label)

    def together(graphs: bool, label: str, mode: str) -> None:
        """Both stage-2 runs in one pack, and how far each ends from alone."""
        tag = f"{mode}{'-graphs' if graphs else ''}"
        t0 = time.perf_counter()
        packed = train_runs([Trainer(config(f"stage2-{init}", graphs, *extra), work / f"{tag}-{init}")
                             for init, extra in stage2.items()], pack_mode=mode)
        wall = time.perf_counter() - t0
        diff = max(max_diff(alone_dir(i, graphs), work / f"{tag}-{i}") for i in stage2)
        results.setdefault("packed_vs_alone", []).append({"label": label, "pack_mode": mode, "max_abs_diff": diff,
                                                          "wall_s": wall, "results": packed})
        rows.append(["two-stage", f"both stage-2 runs packed ({mode}) vs alone, {label}",
                     pack_ips([work / f"{tag}-{i}" for i in stage2]),
                     f"max |dw| {diff:.3g}; status " + ", ".join(r.get("status", "?") for r in packed)
                     + "; test acc " + ", ".join(f"{r.get('test_acc') or float('nan'):.4f}" for r in packed)
                     + f"; wall {wall:.0f}s"])

    compiled, graphed = "compiled (reduce-overhead)", "step graphs"
    # in the order they matter: the Trainer alone (against the bare step), packed in the
    # default modes (serial with torch.compile's graphs; streams with step graphs); each
    # skipped once the budget is spent (fused runs are refused on a GPU: the pack-fused
    # section measures them)
    for what, step in ((f"stage 2 alone, {compiled}", lambda: alone(False, compiled)),
                       (f"stage 2 packed, {compiled}", lambda: together(False, compiled, "auto")),
                       (f"stage 2 alone, {graphed}", lambda: alone(True, graphed)),
                       (f"stage 2 packed, {graphed}", lambda: together(True, graphed, "auto"))):
        if deadline is not None and time.time() > deadline:
            rows.append(["two-stage", what, float("nan"), "skipped: time budget spent"])
        else:
            step()
    diff = max_diff(alone_dir("random", False), alone_dir("random", True))
    results["graphs_vs_compiled"] = diff
    rows.append(["two-stage", "stage2-random: step graphs vs compiled (other kernels: float noise)", float("nan"),
                 f"max |dw| {diff:.3g}"])
    return rows


def bare_steps(results: dict[str, Any], scale: Scale = FULL) -> list[dict[str, Any]]:
    """The ``train128`` section's rows: the bare compiled step at ``scale.batch``."""
    return [r for r in results.get("train", [])
            if r["batch"] == scale.batch and r["mode"] == "cudagraphs-bf16" and not r["loader"]]


def trainer_ips(results: dict[str, Any], label: str) -> float | None:
    """The stage-2 runs' mean images/s through the Trainer (``label``: its step mode), or
    None when none of them ended done."""
    runs = [r["images_per_s"] for r in results.get("two_stage", []) if r["run"] != "stage1"
            and r["label"] == label and r["result"].get("status") == "done"]
    return sum(runs) / len(runs) if runs else None


def trainer_vs_bare(results: dict[str, Any], scale: Scale = FULL) -> list[list[Any]]:
    """The Trainer at batch 128 against the bare compiled step (goal: within 10%)."""
    model, batch = scale.trainer_model, scale.batch
    bare = next((r["images_per_s"] for r in bare_steps(results, scale) if r["model"] == model), None)
    out = []
    # the step loop alone (one run through the packed loop, its loader in the loop, no
    # per-epoch extras) separates the per-step overhead from the epochs' evaluation etc.
    for key, label in (("pack", "compiled (reduce-overhead)"), ("pack_stepgraph", "step graphs")):
        loop = next((r["images_per_s"] for r in results.get(key, []) if r["model"] == model and r["K"] == 1), None)
        if bare is not None and loop is not None:
            results.setdefault("loop_over_bare", {})[label] = loop / bare
            out.append(["trainer/bare", f"{model} batch {batch}: training loop, one run ({label}) vs bare compiled step",
                        loop, f"{100 * loop / bare:.0f}% of the bare step's {bare:,.0f} img/s"])
    for label in ("compiled (reduce-overhead)", "step graphs"):
        ips = trainer_ips(results, label)
        if bare is None or ips is None:
            out.append(["trainer/bare", label, float("nan"), "skipped: needs the train and two-stage sections"])
            continue
        results.setdefault("trainer_over_bare", {})[label] = ips / bare
        out.append(["trainer/bare", f"{model} batch {batch}: Trainer epoch ({label}) vs bare compiled step", ips,
                    f"{100 * ips / bare:.0f}% of the bare step's {bare:,.0f} img/s (goal >= 90%)"])
    return out
