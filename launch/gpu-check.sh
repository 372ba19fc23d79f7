#!/usr/bin/env bash
# The one command to run on a GPU machine (no install, no network, no ffcv needed):
#   bash launch/gpu-check.sh --out DIR [--data DIR] [--budget SECONDS]
# It runs `python -m fastbgm.bench gpu` from this checkout, sections in the order the
# open work needs them (each described in fastbgm/bench/gpu.py; --sections A,B picks some):
# the bare batch-128 step; K packed batch-128 runs (torch.compile's CUDA graphs in turn,
# step graphs on streams and threads) with each pack's largest difference from alone;
# the two-stage Trainer runs on real CIFAR-10, alone and packed (when the --data folder
# holds a prepared cifar10/, or cifar10-jpeg.tar.xz); the Trainer over the bare step;
# every paper model's default packing beside one run at K x the batch; the paper on all
# of CIFAR-10 through the launcher (its report as OUT/paper-report.tar.gz); the packings
# the trainer does not use (torch.compile's graphs on streams, K processes with and
# without CUDA MPS, K runs fused into one vmapped network); then the loader, batch-512
# training, 2-GPU DDP rows and the loop's host cost per step. Each section leaves time
# for the sections asked for after it (the paper 6 min, others 2.5). Writes
# OUT/gpu.json after every section, and the table last: printed, and as OUT/gpu.md.
# --smoke --device cpu: every section at toy size on a CPU (2.5 to 8 min with compilation
# on 2 cores): run it first, on the torch the GPU machine has, so its minutes go to measuring.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
case " $* " in *" --out "*) ;; *) set -- --out bench-out/gpu "$@" ;; esac
exec python3 -m fastbgm.bench gpu "$@"
