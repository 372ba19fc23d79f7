#!/usr/bin/env bash
# Stop the daemons launch/slurm-start.sh started (by recorded PID, checking the
# program name before signalling): slurmd(s), slurmctld, slurmdbd, mariadbd, munged;
# for a multi-node cluster also every process left in the nodes' network namespaces,
# the namespaces themselves and their bridge.
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
for f in "$S"/pid/slurmd-node*.pid; do
  [ -e "$f" ] || continue
  n=$(basename "$f" .pid); n=${n#slurmd-}
  stop "slurmd-$n" slurmd
  if ip netns list 2>/dev/null | grep -qw "$n"; then
    pids=$(ip netns pids "$n" 2>/dev/null)  # slurmstepd and job tasks left in the node
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null
    ip netns del "$n" 2>/dev/null  # removes its veth too
  fi
  rm -rf "/etc/netns/$n"
done
ip link show slmn0 >/dev/null 2>&1 && ip link del slmn0
if [ -f "$S/made-root-shared" ]; then  # (slurm-start.sh shared the host's mounts with the nodes)
  mount --make-rprivate / && rm -f "$S/made-root-shared"
fi
stop slurmctld slurmctld
stop slurmdbd slurmdbd
stop mariadbd mariadbd
stop munged munged
echo "slurm: stopped"
