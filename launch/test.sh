#!/usr/bin/env bash
# The tests in one command on a fresh Debian/Ubuntu machine, as root: install what is
# missing (launch/install.sh, Slurm included), start a real 2-node x 2-GPU Slurm cluster
# on this box (launch/slurm-start.sh), run the README's test command, stop the cluster.
# .ci/run is this command.
#   bash launch/test.sh [pytest options]
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "test: error: the tests start a local Slurm cluster, which needs root: run as root (sudo bash launch/test.sh)" >&2; exit 1; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} MKL_NUM_THREADS=${MKL_NUM_THREADS:-2} PYTHONUNBUFFERED=1
WITH_SLURM=1 bash launch/install.sh
bash launch/slurm-stop.sh >/dev/null 2>&1 || true   # a cluster of another shape left by hand
bash launch/slurm-start.sh --nodes 2 --gpus-per-node 2
trap 'bash launch/slurm-stop.sh >/dev/null 2>&1 || true' EXIT
echo "test: running the suite (about 18-23 min on 2 cores)"
set +e
"${PYTHON:-python3}" -m pytest -q -p no:cacheprovider "$@"   # the README's test command
rc=$?
set -e
if [ "$rc" = 5 ]; then echo "test: pytest collected no tests" >&2; exit 1; fi
exit "$rc"
