"""``python -m fastbgm.bench {loader,train,pack,overhead,schedule,gpu,faults} [options]``"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastbgm.bench", description=__doc__)
    sub = p.add_subparsers(dest="what", required=True)
    for name in ("loader", "train", "pack", "overhead", "schedule", "gpu", "faults"):
        s = sub.add_parser(name)
        s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="cuda or cpu (default: cuda when a GPU is visible)")
        s.add_argument("--data", type=Path, default=Path("bench-out/data"), help="where bench datasets are cached")
        s.add_argument("--out", type=Path, default=None, help="folder for the JSON copy of the table")
        s.add_argument("--seconds", type=float, default=3.0, help="minimum timing per measurement")
        s.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                       help="loader: the baseline DataLoader's and ffcv's worker processes (default: all cores)")
        if name == "loader":
            s.add_argument("--batch-size", type=int, default=512, help="images a batch")
        if name == "gpu":
            s.add_argument("--budget", type=float, default=420.0, help="seconds before remaining sections are skipped")
            s.add_argument("--sections", default="", help="comma-separated sections (default: all, in order: "
                           "train128, pack, pack-stepgraph, two-stage, trainer/bare, pack-ceiling, paper, pack-unsafe, "
                           "pack-processes, pack-fused, loader, train, ddp, overhead)")
            s.add_argument("--smoke", action="store_true", help="every section at toy size (small_cnn, K = 1, 2, a few "
                           "steps, 12 CIFAR-10 images a class): runs the whole check on a CPU in minutes, before a "
                           "GPU session spends its time on it")
            s.add_argument("--paper-dir", type=Path, default=None, help="keep the paper section's launch in this "
                           "folder: a check given the same folder again resumes it where the budget stopped it "
                           "(default: a temporary folder, removed)")
        if name == "pack":
            s.add_argument("--models", default="resnet18,vgg16_bn,resnet50,densenet40_bc",
                           help="comma-separated models (fastbgm.models)")
            s.add_argument("--runs", default="1,2,4,8", help="K values: runs packed on the device")
            s.add_argument("--batch-size", type=int, default=128, help="each run's batch (the paper's: 128)")
            s.add_argument("--steps", type=int, default=20, help="steps per run per timed epoch")
            s.add_argument("--pack-modes", default="serial,streams,threads",
                           help="how K > 1 runs share the device: serial, streams, threads (see fastbgm.trainer.loop), "
                           "fused (one vmapped network: fastbgm.trainer.fused), processes (K processes), mps (K "
                           "processes under CUDA MPS: fastbgm.bench.processes)")
            s.add_argument("--mode", choices=["auto", "eager", "compiled", "cudagraphs", "stepgraph"],
                           default="auto", help="auto: stepgraph on a GPU (the trainer's default), eager on a CPU; "
                           "stepgraph: each run's whole step one CUDA graph")
            s.add_argument("--ceiling", action="store_true", help="also one run at batch K x --batch-size for each "
                           "K > 1, and each pack's images/s as a share of it (what packing at no cost would give)")
        if name == "overhead":
            s.add_argument("--steps", type=int, default=100, help="steps per timed epoch")
            s.add_argument("--mode", choices=["auto", "eager", "compiled", "cudagraphs", "stepgraph"],
                           default="auto", help="auto: stepgraph on a GPU, eager (ops counted) on a CPU")
        if name == "schedule":
            s.add_argument("--runs", default="1,2", help="K values: runs per slot (the first is the baseline)")
            s.add_argument("--seeds", type=int, default=3, help="the mini experiment's seeds (5 runs each)")
            s.add_argument("--cpus-per-task", type=int, default=None,
                           help="cores per slot on a CPU machine (default: all, one slot)")
            s.add_argument("--pack-modes", default="auto", help="pack modes for K > 1 (fastbgm.trainer.loop)")
        if name == "faults":
            s.add_argument("--faults", type=int, default=50, help="how many faults to inject")
            s.add_argument("--seed", type=int, default=0, help="chooses the faults and their moments")
            s.add_argument("--slurm", action="store_true", help="also run on Slurm and preempt its allocation")
            s.add_argument("--kinds", default="", help="comma-separated fault kinds (default: all)")
            s.add_argument("--runs-per-gpu", type=int, default=1,
                           help="pack this many runs a slot in every launch (the launcher's --runs-per-gpu)")
            s.add_argument("--slurm-jobs", default="allocation", choices=("allocation", "per-run"),
                           help="how the Slurm launches submit (the launcher's --jobs)")
        if name == "train":
            s.add_argument("--models", default="resnet18,vgg16_bn,resnet50,densenet40_bc",
                           help="comma-separated models (fastbgm.models)")
            s.add_argument("--batch-sizes", default="128,512", help="comma-separated batch sizes")
            s.add_argument("--modes", default="eager-fp32,eager-bf16,compiled-fp32,compiled-bf16",
                           help="comma-separated HOW-PRECISION pairs: HOW eager, compiled or cudagraphs, "
                           "PRECISION fp32 or bf16")
            s.add_argument("--steps", type=int, default=10, help="timed steps a measurement")
    args = p.parse_args(argv)
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO if args.what == "gpu" else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(show_path=False)])
    try:
        device = torch.device(args.device)
    except RuntimeError:
        print(f"error: --device {args.device!r} is not a device: use cpu or cuda", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but no GPU is visible here: use --device cpu", file=sys.stderr)
        return 2
    for flag in ("batch_size", "steps", "seconds", "workers", "runs_per_gpu", "faults"):
        if getattr(args, flag, 1) is not None and getattr(args, flag, 1) <= 0:
            print(f"error: --{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}", file=sys.stderr)
            return 2
    for flag in ("batch_sizes", "runs"):
        v = getattr(args, flag, None)
        if v is not None and not all(x.strip().isdigit() and int(x) > 0 for x in v.split(",")):
            print(f"error: --{flag.replace('_', '-')} takes positive whole numbers separated by commas, got {v!r}",
                  file=sys.stderr)
            return 2
    models = getattr(args, "models", None)
    if models is not None:
        from fastbgm.models import MODELS

        bad = [m for m in models.split(",") if m not in MODELS]
        if bad:
            print(f"error: --models {','.join(bad)} unknown: choose from {', '.join(MODELS)}", file=sys.stderr)
            return 2
    if args.what == "loader":
        from .loader import run

        run(device, args.data, args.seconds, args.batch_size, args.out, args.workers)
    elif args.what == "faults":
        from .faults import check_args, run as run_faults

        kinds = [k for k in args.kinds.split(",") if k]
        try:
            check_args(args.slurm, kinds, args.runs_per_gpu, args.slurm_jobs)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        res = run_faults(args.out or Path("bench-out/faults"), args.faults, args.seed, args.slurm, kinds or None,
                         args.runs_per_gpu, args.slurm_jobs)
        return 0 if res["total"]["damaged"] == 0 and res["total"]["recovered"] == res["total"]["injected"] else 1
    elif args.what == "pack":
        from .pack import PACK_MODES, run as run_pack

        bad = [m for m in args.pack_modes.split(",") if m not in PACK_MODES]
        if bad:
            print(f"error: --pack-modes {','.join(bad)} unknown: choose from {', '.join(PACK_MODES)}",
                  file=sys.stderr)
            return 2
        run_pack(device, args.models.split(","), [int(k) for k in args.runs.split(",")], args.batch_size, args.steps,
                 args.out, args.mode, tuple(args.pack_modes.split(",")), ceiling=args.ceiling)
    elif args.what == "schedule":
        from .schedule import run as run_schedule

        from fastbgm.trainer.config import PACK_MODES as LOOP_MODES

        if args.seeds <= 0 or (args.cpus_per_task is not None and args.cpus_per_task <= 0):
            print("error: --seeds and --cpus-per-task must be > 0", file=sys.stderr)
            return 2
        bad = [m for m in args.pack_modes.split(",") if m not in LOOP_MODES]
        if bad:
            print(f"error: --pack-modes {','.join(bad)} unknown: choose from {', '.join(LOOP_MODES)}",
                  file=sys.stderr)
            return 2
        res = run_schedule(args.out or Path("bench-out/schedule"), [int(k) for k in args.runs.split(",")],
                           args.seeds, args.cpus_per_task, tuple(args.pack_modes.split(",")))
        return 0 if all(r["done"] == r["runs"] for r in res["rows"]) else 1
    elif args.what == "overhead":
        from .overhead import run as run_overhead

        run_overhead(device, args.steps, args.out, args.mode)
    elif args.what == "train":
        from .train import run as run_train

        run_train(device, args.data, args.models.split(","), [int(b) for b in args.batch_sizes.split(",")],
                  args.modes.split(","), args.steps, args.out)
    else:
        from .gpu import run as run_gpu

        from .gpu import FULL, SECTIONS, SMOKE

        run_gpu(device, args.data, args.out, args.seconds, args.budget,
                tuple(x for x in args.sections.split(",") if x) or SECTIONS, SMOKE if args.smoke else FULL,
                args.paper_dir.resolve() if args.paper_dir else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
