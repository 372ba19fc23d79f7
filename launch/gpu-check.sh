#!/usr/bin/env bash
# The one command to run on a GPU machine (no install, no network, no ffcv needed):
#   bash launch/gpu-check.sh --out DIR [--data DIR] [--budget SECONDS]
# It runs `python -m fastbgm.bench gpu` from this checkout: loader and training
# images/s + MFU (ResNet18, VGG16; eager vs compiled; bf16), 2-process DDP when 2+
# GPUs, and a short real two-stage run when DIR/cifar10 holds a prepared CIFAR-10
# (its .beton, or just its .resident.npz caches + manifests copied from a machine
# with ffcv). Writes DIR/gpu.json and DIR/train.json, prints the table last.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
case " $* " in *" --out "*) ;; *) set -- --out bench-out/gpu "$@" ;; esac
exec python3 -m fastbgm.bench gpu "$@"
