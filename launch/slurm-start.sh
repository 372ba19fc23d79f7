#!/usr/bin/env bash
# Start a real Slurm cluster on this Debian/Ubuntu machine, as root: munged, a private
# MariaDB on loopback + slurmdbd (accounting), slurmctld, and
#   - by default one slurmd for this machine (node "localhost"), or
#   - with --nodes K and/or --gpus-per-node G: K nodes node1..nodeK, each a slurmd in its
#     own network namespace (10.77.0.K on a private bridge, nothing routed beyond it),
#     with G fake GPUs each (character devices /dev/fakegpuN as gres), so multi-node
#     jobs, job steps and GPU placement are real Slurm behaviour on one box.
# Idempotent: daemons already running (by their recorded PID) are left alone; a cluster
# of another shape must be stopped first.
#   bash launch/slurm-start.sh [--nodes K] [--gpus-per-node G]
#   bash launch/slurm-stop.sh         # stops exactly what this script started
# State, logs and PIDs live in $FASTBGM_SLURM_DIR (default /var/tmp/fastbgm-slurm).
# It writes /etc/slurm/slurm.conf, gres.conf and slurmdbd.conf, refusing to replace ones
# it did not write. Settings that keep jobs from hanging are explained inline.
set -euo pipefail
S=${FASTBGM_SLURM_DIR:-/var/tmp/fastbgm-slurm}
MARK="# written by fastbgm launch/slurm-start.sh"
DBPORT=${FASTBGM_SLURM_DBPORT:-3399}
NODES=1; GPUS=0; MULTI=""
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES=$2; MULTI=1; shift 2 ;;
    --nodes=*) NODES=${1#*=}; MULTI=1; shift ;;
    --gpus-per-node) GPUS=$2; MULTI=1; shift 2 ;;
    --gpus-per-node=*) GPUS=${1#*=}; MULTI=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "slurm-start.sh: unknown option $1 (use --nodes K --gpus-per-node G)" >&2; exit 2 ;;
  esac
done
case "$NODES$GPUS" in *[!0-9]*) echo "slurm-start.sh: --nodes and --gpus-per-node take whole numbers" >&2; exit 2 ;; esac
[ "$NODES" -ge 1 ] && [ "$NODES" -le 16 ] || { echo "slurm-start.sh: --nodes must be 1-16" >&2; exit 2; }
[ "$GPUS" -le 8 ] || { echo "slurm-start.sh: --gpus-per-node must be 0-8" >&2; exit 2; }
SHAPE=$([ -n "$MULTI" ] && echo "nodes=$NODES gpus=$GPUS" || echo "single")
[ "$(id -u)" = 0 ] || { echo "slurm-start.sh: run as root (it starts system daemons)" >&2; exit 1; }
if [ -f "$S/shape" ] && [ "$(cat "$S/shape")" != "$SHAPE" ] && pgrep -x slurmctld >/dev/null; then
  echo "slurm-start.sh: a cluster of another shape ($(cat "$S/shape")) is running; stop it first: bash launch/slurm-stop.sh" >&2
  exit 1
fi
if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge slurmdbd mariadb-server iproute2 >/dev/null
fi
if [ -f "$S/shape" ] && [ "$(cat "$S/shape")" != "$SHAPE" ]; then
  rm -rf "$S/spool"  # node state of the old shape
fi
if [ -n "$MULTI" ]; then
  # One network namespace per node on a private bridge whose host side (10.77.0.254)
  # is the controller's and the accounting's address. Only addresses of these
  # namespaces are used; no route leads beyond the bridge.
  ip link show slmn0 >/dev/null 2>&1 || { ip link add slmn0 type bridge; ip addr add 10.77.0.254/24 dev slmn0; }
  ip link set slmn0 up
fi
mkdir -p "$S"/{log,pid,spool/ctld,spool/d,db}
echo "$SHAPE" > "$S/shape"

alive() {  # alive NAME COMM: the recorded PID is running and is that program (PID 1 reaps slowly here)
  local f="$S/pid/$1.pid" pid state
  [ -f "$f" ] || return 1
  pid=$(cat "$f")
  [ -r "/proc/$pid/stat" ] || return 1
  state=$(awk '{print $3}' "/proc/$pid/stat")
  [ "$state" != Z ] && [ "$state" != X ] && grep -q "$2" "/proc/$pid/comm"
}
start() {  # start NAME COMM CMD...: run in the background, stdin from /dev/null, log to a file
  local name=$1 comm=$2; shift 2
  if alive "$name" "$comm"; then return 0; fi
  "$@" </dev/null >"$S/log/$name.log" 2>&1 &
  echo $! >"$S/pid/$name.pid"
}
wait_for() {  # wait_for WHAT SECONDS CMD...
  local what=$1 t=$2; shift 2
  for _ in $(seq 1 $((t * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "slurm-start.sh: $what did not come up; see $S/log/" >&2; exit 1
}

# munge: /run/munge must exist and belong to munge; munged refuses root, and runuser
# forks (wrong PID), so setpriv execs it as munge.
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
[ -s /etc/munge/munge.key ] || mungekey --create --keyfile /etc/munge/munge.key
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
start munged munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F
wait_for munged 10 munge -n

# Accounting: without it sacct fails and submitit never learns a dead job's state.
if [ ! -d "$S/db/mysql" ]; then
  mariadb-install-db --user=mysql --datadir="$S/db" --auth-root-authentication-method=socket >"$S/log/db-init.log" 2>&1
fi
chown -R mysql:mysql "$S/db"
mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
start mariadbd mariadbd /usr/sbin/mariadbd --user=mysql --datadir="$S/db" --bind-address=127.0.0.1 \
  --port="$DBPORT" --socket=/run/mysqld/fastbgm.sock --pid-file=/run/mysqld/fastbgm.pid --skip-log-error
wait_for mariadb 30 mariadb-admin --socket=/run/mysqld/fastbgm.sock ping
mariadb --socket=/run/mysqld/fastbgm.sock -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
  CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'fastbgm-slurm';
  CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'fastbgm-slurm';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"

write_conf() {  # write_conf PATH MODE: stdin -> PATH, unless PATH exists and is not ours
  if [ -f "$1" ] && ! grep -q "^$MARK" "$1"; then
    echo "slurm-start.sh: $1 exists and was not written by fastbgm; not touching it" >&2; exit 1
  fi
  cat >"$1"; chmod "$2" "$1"
}
mkdir -p /etc/slurm
write_conf /etc/slurm/slurmdbd.conf 600 <<CONF
$MARK
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DBPORT
StorageUser=slurm
StoragePass=fastbgm-slurm
StorageLoc=slurm_acct_db
PidFile=$S/slurmdbd.pid
LogFile=$S/log/slurmdbd-daemon.log
CONF
if [ -z "$MULTI" ]; then
  # The node exactly as slurmd sees it; RealMemory at 90% or the node drains.
  read -r CPUS BOARDS SPB CPS TPC MEM < <(slurmd -C | head -1 | sed -E \
    's/.*CPUs=([0-9]+) Boards=([0-9]+) SocketsPerBoard=([0-9]+) CoresPerSocket=([0-9]+) ThreadsPerCore=([0-9]+) RealMemory=([0-9]+).*/\1 \2 \3 \4 \5 \6/')
  CTLD_HOST="localhost"; DBD_HOST="localhost"
  NODE_LINES="NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS Boards=$BOARDS SocketsPerBoard=$SPB CoresPerSocket=$CPS ThreadsPerCore=$TPC RealMemory=$((MEM * 9 / 10)) State=UNKNOWN"
  PART_NODES=localhost; NODE_EXTRA="SlurmdSpoolDir=$S/spool/d
SlurmdPidFile=$S/slurmd.pid
SlurmdLogFile=$S/log/slurmd-daemon.log"
  GRES_TYPES=""
else
  # Each node claims 8 CPUs whatever the machine has (config_overrides): keep jobs tiny.
  CTLD_HOST="localhost(10.77.0.254)"; DBD_HOST="10.77.0.254"
  NODE_LINES=""
  for k in $(seq 1 "$NODES"); do
    g=""; [ "$GPUS" -gt 0 ] && g=" Gres=gpu:$GPUS"
    NODE_LINES="$NODE_LINES
NodeName=node$k NodeAddr=10.77.0.$k CPUs=8 Boards=1 SocketsPerBoard=1 CoresPerSocket=8 ThreadsPerCore=1 RealMemory=2000$g State=UNKNOWN"
  done
  PART_NODES="node[1-$NODES]"
  mkdir -p "$S/spool/nodes"
  NODE_EXTRA="SlurmdSpoolDir=$S/spool/nodes/%n
SlurmdPidFile=$S/spool/nodes/%n/slurmd.pid
SlurmdLogFile=$S/log/slurmd-%n.log
SlurmdParameters=config_overrides"
  GRES_TYPES="GresTypes=gpu
AccountingStorageTRES=gres/gpu"
fi
write_conf /etc/slurm/slurm.conf 644 <<CONF
$MARK
ClusterName=fastbgm
SlurmctldHost=$CTLD_HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# expire job credentials fast and schedule often: a requeued job otherwise waits ~130 s
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2,bf_interval=2
# impossible requests are rejected at submit instead of pending forever
EnforcePartLimits=ALL
# No DependencyParameters=kill_invalid_depend: like most clusters, a job whose afterok
# parent failed pends forever here; fastbgm cancels such jobs itself.
KillWait=5
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=$S/spool/ctld
SlurmctldPidFile=$S/slurmctld.pid
SlurmctldLogFile=$S/log/slurmctld-daemon.log
$NODE_EXTRA
$GRES_TYPES
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$DBD_HOST
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=300
$NODE_LINES
PartitionName=debug Nodes=$PART_NODES Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
if [ -n "$MULTI" ] && [ "$GPUS" -gt 0 ]; then
  for i in $(seq 0 $((GPUS - 1))); do [ -e /dev/fakegpu$i ] || mknod /dev/fakegpu$i c 1 3; done
  write_conf /etc/slurm/gres.conf 644 <<CONF
$MARK
AutoDetect=off
NodeName=node[1-$NODES] Name=gpu File=/dev/fakegpu[0-$((GPUS - 1))]
CONF
elif [ -f /etc/slurm/gres.conf ] && grep -q "^$MARK" /etc/slurm/gres.conf; then
  rm -f /etc/slurm/gres.conf
fi

start slurmdbd slurmdbd /usr/sbin/slurmdbd -D
wait_for slurmdbd 30 sacctmgr -n list cluster
sacctmgr -i -n list cluster fastbgm | grep -q fastbgm || sacctmgr -i add cluster fastbgm >/dev/null
start slurmctld slurmctld /usr/sbin/slurmctld -D -i
wait_for slurmctld 30 scontrol ping
if [ -z "$MULTI" ]; then
  start slurmd slurmd /usr/sbin/slurmd -D -N localhost
  wait_for "the node" 30 sh -c 'sinfo -h -N -o "%T" | grep -Eq "^(idle|mixed|allocated)"'
  scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
else
  hosts="127.0.0.1 localhost
10.77.0.254 slurmctl"
  for k in $(seq 1 "$NODES"); do hosts="$hosts
10.77.0.$k node$k"; done
  # A mount made on the host after the nodes started (a test's small tmpfs, a file system
  # mounted late) must reach them, as shared storage reaches a real cluster's nodes: the
  # host's mounts shared (as systemd has them; slurm-stop.sh undoes it if this did it),
  # each node's mount namespace their slave.
  if ! grep -q "^[0-9]* [0-9]* [^ ]* / / .*shared:" /proc/self/mountinfo; then
    if mount --make-rshared /; then touch "$S/made-root-shared"
    else echo "slurm-start.sh: cannot share the host's mounts with the nodes: a mount made later will not reach them" >&2
    fi
  fi
  for k in $(seq 1 "$NODES"); do
    n=node$k
    if ! ip netns list | grep -qw "$n"; then
      ip netns add $n
      ip link add v$n type veth peer name eth0 netns $n
      ip link set v$n master slmn0; ip link set v$n up
      ip -n $n link set lo up; ip -n $n addr add 10.77.0.$k/24 dev eth0; ip -n $n link set eth0 up
    fi
    mkdir -p /etc/netns/$n
    printf '%s\n' "$hosts" > /etc/netns/$n/hosts
    # no DNS server is reachable: fail look-ups at once (torch's reverse look-ups)
    printf 'nameserver 127.0.0.1\noptions timeout:1 attempts:1\n' > /etc/netns/$n/resolv.conf
    # nsenter joins only the network namespace (ip netns exec would hide the cgroup fs)
    start slurmd-$n slurmd nsenter --net=/run/netns/$n -- unshare --uts --mount --propagation slave -- sh -c \
      "mount --bind /etc/netns/$n/hosts /etc/hosts && mount --bind /etc/netns/$n/resolv.conf /etc/resolv.conf \
       && hostname $n && exec /usr/sbin/slurmd -D -N $n"
  done
  wait_for "the nodes" 30 sh -c "[ \$(sinfo -h -N -o '%T' | grep -Ec '^(idle|mixed|allocated)') -ge $NODES ]"
  scontrol update nodename="node[1-$NODES]" state=resume >/dev/null 2>&1 || true
fi
echo "slurm: up ($(sinfo -h -N -o '%N %T %c CPUs %G' | tr '\n' ';' | sed 's/;$//'))"
