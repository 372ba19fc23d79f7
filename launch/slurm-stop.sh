#!/usr/bin/env bash
# Stop the daemons launch/slurm-start.sh started (by recorded PID, checking the
# program name before signalling): slurmd, slurmctld, slurmdbd, mariadbd, munged.
set -uo pipefail
S=${FASTBGM_SLURM_DIR:-/var/tmp/fastbgm-slurm}
stop() {
  local f="$S/pid/$1.pid" pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if [ -r "/proc/$pid/comm" ] && grep -q "$2" "/proc/$pid/comm"; then
    kill "$pid" 2>/dev/null
    for _ in $(seq 1 50); do
      [ -r "/proc/$pid/stat" ] || break
      case "$(awk '{print $3}' "/proc/$pid/stat")" in Z|X) break ;; esac
      sleep 0.2
    done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}
stop slurmd slurmd
stop slurmctld slurmctld
stop slurmdbd slurmdbd
stop mariadbd mariadbd
stop munged munged
echo "slurm: stopped"
