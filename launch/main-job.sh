#!/usr/bin/env bash
# The main job in one command on a fresh Debian/Ubuntu machine: install what is missing
# (launch/install.sh), then reproduce the paper in miniature on this machine
# (configs/paper-mini.toml: no download, no GPU, no Slurm needed) and print the report.
#   bash launch/main-job.sh [extra launcher options, e.g. --seeds=0]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
echo "main job: the paper in miniature (7-16 min on 2 CPU cores, by CPU); report in runs/paper-mini/report/"
exec "${PYTHON:-python3}" -m fastbgm.launch --config configs/paper-mini.toml --executor local "$@"
