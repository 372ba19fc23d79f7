#!/usr/bin/env bash
# Install what fastbgm needs and is missing, on Debian/Ubuntu: ffcv's system libraries
# (apt), torch, fastbgm with ffcv (pip). Idempotent: what is there is not reinstalled.
#   bash launch/install.sh            # needs root or sudo for apt
#   NO_APT=1 bash launch/install.sh   # skip apt (libraries already there, e.g. conda)
#   TORCH_SPEC="torch==2.11.0" ...    # pin torch (default: 2.13.0 without an NVIDIA driver, else >= 2.4)
#   WITH_SLURM=1 ...                  # also the Slurm/munge/MariaDB packages for launch/slurm-start.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
die() { echo "install: error: $*" >&2; exit 1; }
command -v "$PY" >/dev/null || die "no $PY: install Python 3.10-3.12 first (or set PYTHON=...)"
"$PY" -c 'import sys; sys.exit(not ((3, 10) <= sys.version_info[:2] <= (3, 12)))' \
  || die "fastbgm needs Python 3.10-3.12; $PY is $("$PY" -V 2>&1)"

apt_pkgs="pkg-config libturbojpeg0-dev libopencv-dev"   # ffcv builds and links against these
[ -n "${WITH_SLURM:-}" ] && apt_pkgs="$apt_pkgs slurmctld slurmd slurm-client munge slurmdbd mariadb-server iproute2"
missing_apt=""
if [ -z "${NO_APT:-}" ]; then
  command -v dpkg >/dev/null || die "no dpkg/apt: this script is for Debian/Ubuntu; see the README's manual install (or NO_APT=1)"
  for p in $apt_pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing_apt="$missing_apt $p"; done
fi
# torch: with no NVIDIA driver, 2.13.0 (the release CI tests on CPUs; where pip's
# find-links hold its CPU wheel, as on this project's machines, that is what it takes);
# with one, the newest torch >= 2.4 for the machine's CUDA.
if [ -z "${TORCH_SPEC:-}" ]; then
  if [ -e /proc/driver/nvidia/version ] || command -v nvidia-smi >/dev/null; then TORCH_SPEC="torch>=2.4"; else TORCH_SPEC="torch==2.13.0"; fi
fi
missing_pip=""
"$PY" -c 'import torch, sys; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(v < (2, 4))' \
  2>/dev/null || missing_pip="$missing_pip $TORCH_SPEC"
# fastbgm installed from this checkout (asked from another folder, so the checkout itself is not on the path)
here=$(cd "$(dirname "$0")/.." && pwd)
[ "$(cd / && "$PY" -c 'import fastbgm, submitit, rich, matplotlib, sklearn, pytest, os; print(os.path.dirname(os.path.dirname(fastbgm.__file__)))' 2>/dev/null)" = "$here" ] \
  || missing_pip="$missing_pip fastbgm[ffcv,dev]"
"$PY" -c 'import ffcv' 2>/dev/null || missing_pip="$missing_pip ffcv==1.0.2"

if [ -z "$missing_apt" ] && [ -z "$missing_pip" ]; then
  echo "install: everything is already installed ($("$PY" -c 'import torch, ffcv; from importlib.metadata import version; print("torch", torch.__version__, "+ ffcv", version("ffcv"))' 2>/dev/null)); nothing to do"
  exit 0
fi
echo "install: installing${missing_apt:+ apt:$missing_apt;}${missing_pip:+ pip:$missing_pip} (usually 2-5 min on a fresh 2-core machine; a CUDA torch download takes longer)"

if [ -n "$missing_apt" ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || die "installing$missing_apt needs root: run as root, or with sudo installed (or install them yourself and set NO_APT=1)"
    SUDO=sudo
  fi
  command -v apt-get >/dev/null || die "no apt-get: install$missing_apt yourself, then run again with NO_APT=1"
  $SUDO apt-get update -qq || die "apt-get update failed: is the Debian/Ubuntu package mirror reachable?"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing_apt >/dev/null \
    || die "apt-get install$missing_apt failed (see above)"
fi
pip() { "$PY" -m pip install -q "$@" || die "pip install $* failed (see above): is the package index reachable?"; }
case "$missing_pip" in *torch*) pip "$TORCH_SPEC" ;; esac   # first, so nothing pulls another build
case "$missing_pip" in *fastbgm*) pip -e ".[ffcv,dev]" ;; esac
# ffcv without its declared deps (they pull the GUI opencv-python); the ffcv extra lists what it needs
case "$missing_pip" in *ffcv==*) pip --no-deps "ffcv==1.0.2" ;; esac
"$PY" -c "import ffcv, fastbgm.data" || die "ffcv or fastbgm does not import after installing (see above)"
echo "install: done ($("$PY" -c 'import torch, ffcv; from importlib.metadata import version; print("torch", torch.__version__, "+ ffcv", version("ffcv"))'))"
