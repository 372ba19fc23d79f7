#!/usr/bin/env bash
# Install fastbgm with ffcv on Debian/Ubuntu: system libraries, then pip.
#   bash launch/install.sh            # everything (needs root or sudo for apt)
#   NO_APT=1 bash launch/install.sh   # skip apt (libraries already there)
#   TORCH_SPEC="torch==2.13.0" ...    # pin torch (CI pins a CPU build this way)
#   WITH_SLURM=1 ...                  # also the Slurm/munge/MariaDB packages for launch/slurm-start.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi

if [ -z "${NO_APT:-}" ]; then
  pkgs="pkg-config libturbojpeg0-dev libopencv-dev"   # ffcv builds and links against these
  if [ -n "${WITH_SLURM:-}" ]; then
    pkgs="$pkgs slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
fi

# torch first, so nothing below pulls a different (multi-GB CUDA) build.
$PY -m pip install -q "${TORCH_SPEC:-torch>=2.4}"
# ffcv without its declared deps (they pull the GUI opencv-python), then what it really needs.
$PY -m pip install -q -e ".[ffcv,dev]"
$PY -m pip install -q --no-deps "ffcv==1.0.2"
$PY -c "import ffcv, fastbgm.data; print('fastbgm + ffcv installed')"
