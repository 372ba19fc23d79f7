#!/usr/bin/env bash
# Start a real single-node Slurm cluster on this Debian/Ubuntu machine, as root:
# munged, a private MariaDB on loopback + slurmdbd (accounting), slurmctld, slurmd.
# Idempotent: daemons already running (by their recorded PID) are left alone.
#   bash launch/slurm-start.sh        # then: sinfo, sbatch, python -m fastbgm.launch ...
#   bash launch/slurm-stop.sh         # stops exactly what this script started
# State, logs and PIDs live in $FASTBGM_SLURM_DIR (default /var/tmp/fastbgm-slurm).
# It writes /etc/slurm/slurm.conf and slurmdbd.conf, refusing to replace ones it did
# not write. Settings that keep jobs from hanging are explained inline.
set -euo pipefail
S=${FASTBGM_SLURM_DIR:-/var/tmp/fastbgm-slurm}
MARK="# written by fastbgm launch/slurm-start.sh"
DBPORT=${FASTBGM_SLURM_DBPORT:-3399}
[ "$(id -u)" = 0 ] || { echo "slurm-start.sh: run as root (it starts system daemons)" >&2; exit 1; }
if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge slurmdbd mariadb-server >/dev/null
fi
mkdir -p "$S"/{log,pid,spool/ctld,spool/d,db}

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
# The node exactly as slurmd sees it; RealMemory at 90% or the node drains.
read -r CPUS BOARDS SPB CPS TPC MEM < <(slurmd -C | head -1 | sed -E \
  's/.*CPUs=([0-9]+) Boards=([0-9]+) SocketsPerBoard=([0-9]+) CoresPerSocket=([0-9]+) ThreadsPerCore=([0-9]+) RealMemory=([0-9]+).*/\1 \2 \3 \4 \5 \6/')
write_conf /etc/slurm/slurm.conf 644 <<CONF
$MARK
ClusterName=fastbgm
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# expire job credentials fast and schedule often: a requeued job otherwise waits ~130 s
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2,bf_interval=2
# impossible requests are rejected at submit instead of pending forever
EnforcePartLimits=ALL
# a job whose afterok parent failed is cancelled instead of pending forever
DependencyParameters=kill_invalid_depend
KillWait=5
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=$S/spool/ctld
SlurmdSpoolDir=$S/spool/d
SlurmctldPidFile=$S/slurmctld.pid
SlurmdPidFile=$S/slurmd.pid
SlurmctldLogFile=$S/log/slurmctld-daemon.log
SlurmdLogFile=$S/log/slurmd-daemon.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS Boards=$BOARDS SocketsPerBoard=$SPB CoresPerSocket=$CPS ThreadsPerCore=$TPC RealMemory=$((MEM * 9 / 10)) State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF

start slurmdbd slurmdbd /usr/sbin/slurmdbd -D
wait_for slurmdbd 30 sacctmgr -n list cluster
sacctmgr -i -n list cluster fastbgm | grep -q fastbgm || sacctmgr -i add cluster fastbgm >/dev/null
start slurmctld slurmctld /usr/sbin/slurmctld -D -i
wait_for slurmctld 30 scontrol ping
start slurmd slurmd /usr/sbin/slurmd -D -N localhost
wait_for "the node" 30 sh -c 'sinfo -h -N -o "%T" | grep -Eq "^(idle|mixed|allocated)"'
scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
echo "slurm: up ($(sinfo -h -N -o '%N %T %c CPUs'))"
