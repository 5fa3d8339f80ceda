#!/usr/bin/env bash
# Start a real, private Slurm cluster on this host for tests: one munged, one slurmctld and
# N slurmd ("fake nodes" n1..nN on 127.0.0.1, ports 17001..), each node advertising CPUS cores
# and GPUS fake GPUs (character devices), all state under one directory.
#
#   tools/slurm/start_cluster.sh [STATE_DIR] [NODES] [CPUS] [GPUS]
#   STATE_DIR defaults to $HPCTRAIN_SLURM_DIR or /tmp/hpctrain-slurm.
#
# Afterwards `export SLURM_CONF=$STATE_DIR/etc/slurm.conf` points sbatch/squeue/srun at it.
# Stop it with tools/slurm/stop_cluster.sh STATE_DIR (kills the recorded PIDs only).
# Needs root (Debian's packages; CI runs as root). The host's /etc/hosts is never modified:
# each slurmd runs in its own mount namespace with a hosts file that resolves n1..nN.
set -euo pipefail
STATE=${1:-${HPCTRAIN_SLURM_DIR:-/tmp/hpctrain-slurm}}
NODES=${2:-4}
CPUS=${3:-8}
GPUS=${4:-2}
CTLD_PORT=${HPCTRAIN_SLURMCTLD_PORT:-16817}
HERE=$(cd "$(dirname "$0")" && pwd)

die() { echo "[slurm] $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (slurmd runs as root without cgroups)"
for bin in munged slurmctld slurmd sinfo; do
  command -v "$bin" >/dev/null || die "$bin not found: run tools/slurm/install_slurm.sh"
done
if [ -f "$STATE/pids" ]; then
  bash "$HERE/stop_cluster.sh" "$STATE" || true
fi
rm -rf "$STATE"
mkdir -p "$STATE"/{etc,log,run,state,dev,munge} "$STATE"/spool
STATE=$(cd "$STATE" && pwd)
: > "$STATE/pids"

# munge: a private daemon, key and socket (never touches the host's munged).
chown munge: "$STATE/munge"
chmod 755 "$STATE/munge"   # clients (root) must reach the socket
dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1 count=128 status=none
chown munge: "$STATE/munge/munge.key"
chmod 400 "$STATE/munge/munge.key"
runuser -u munge -- munged --socket="$STATE/munge/munge.socket" \
  --key-file="$STATE/munge/munge.key" --pid-file="$STATE/munge/munged.pid" \
  --log-file="$STATE/munge/munged.log" --seed-file="$STATE/munge/munged.seed"
for _ in $(seq 50); do [ -s "$STATE/munge/munged.pid" ] && break; sleep 0.1; done
echo "munged $(cat "$STATE/munge/munged.pid")" >> "$STATE/pids"

# Fake GPUs: gres.conf File= entries must be character devices for CUDA_VISIBLE_DEVICES to be set.
for g in $(seq 0 $((GPUS - 1))); do mknod "$STATE/dev/gpu$g" c 1 3; done

NODELIST="n[1-$NODES]"
[ "$NODES" = 1 ] && NODELIST=n1
HOST=$(hostname -s)
{
  echo "ClusterName=hpctrain-test"
  echo "SlurmctldHost=$HOST(127.0.0.1)"
  echo "SlurmctldPort=$CTLD_PORT"
  echo "SlurmUser=root"
  echo "SlurmdUser=root"
  echo "AuthType=auth/munge"
  echo "CredType=cred/munge"
  # Short credential lifetime + fast scheduler: a requeued job restarts in ~10 s, not ~120 s.
  echo "AuthInfo=socket=$STATE/munge/munge.socket,cred_expire=10"
  echo "SchedulerParameters=bf_interval=1,sched_interval=2"
  echo "SchedulerType=sched/backfill"
  echo "SelectType=select/cons_tres"
  echo "SelectTypeParameters=CR_Core"
  echo "ProctrackType=proctrack/linuxproc"
  echo "TaskPlugin=task/none"
  echo "MpiDefault=none"
  echo "SwitchType=switch/none"
  echo "GresTypes=gpu"
  echo "SlurmdParameters=config_overrides"
  echo "AccountingStorageType=accounting_storage/none"
  echo "JobCompType=jobcomp/filetxt"
  echo "JobCompLoc=$STATE/log/jobcomp.txt"
  echo "JobAcctGatherType=jobacct_gather/none"
  # Impossible requests (more nodes than exist) are rejected at submission, not left pending.
  echo "EnforcePartLimits=ALL"
  echo "JobRequeue=1"
  echo "ReturnToService=2"
  echo "KillWait=5"
  echo "InactiveLimit=0"
  echo "MinJobAge=600"
  echo "StateSaveLocation=$STATE/state"
  echo "SlurmdSpoolDir=$STATE/spool/%n"
  echo "SlurmctldPidFile=$STATE/run/slurmctld.pid"
  echo "SlurmdPidFile=$STATE/run/slurmd-%n.pid"
  echo "SlurmctldLogFile=$STATE/log/slurmctld.log"
  echo "SlurmdLogFile=$STATE/log/slurmd-%n.log"
  echo "SlurmctldDebug=info"
  echo "SlurmdDebug=info"
  echo "NodeName=$NODELIST NodeHostname=$HOST NodeAddr=127.0.0.1 Port=[17001-$((17000 + NODES))] CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=4000 Gres=gpu:$GPUS State=UNKNOWN"
  echo "PartitionName=debug Nodes=$NODELIST Default=YES MaxTime=INFINITE State=UP"
} > "$STATE/etc/slurm.conf"
{
  echo "AutoDetect=off"
  echo "NodeName=$NODELIST Name=gpu File=$STATE/dev/gpu[0-$((GPUS - 1))]"
} > "$STATE/etc/gres.conf"
[ "$GPUS" = 1 ] && echo -e "AutoDetect=off\nNodeName=$NODELIST Name=gpu File=$STATE/dev/gpu0" > "$STATE/etc/gres.conf"
touch "$STATE/etc/cgroup.conf"
export SLURM_CONF="$STATE/etc/slurm.conf"

# A hosts file in which n1..nN resolve (bind-mounted over /etc/hosts inside each slurmd's
# private mount namespace, so job processes see it and the host's file stays untouched).
{ cat /etc/hosts; for i in $(seq 1 "$NODES"); do echo "127.0.0.1 n$i"; done; } > "$STATE/etc/hosts"

slurmctld -D -c -f "$SLURM_CONF" > "$STATE/log/slurmctld.stdout" 2>&1 &
echo "slurmctld $!" >> "$STATE/pids"
for i in $(seq 1 "$NODES"); do
  mkdir -p "$STATE/spool/n$i"
  unshare -m sh -c 'mount --bind "$1" /etc/hosts && exec slurmd -D -N "$2" -f "$3"' \
    sh "$STATE/etc/hosts" "n$i" "$SLURM_CONF" > "$STATE/log/slurmd-n$i.stdout" 2>&1 &
  echo "slurmd-n$i $!" >> "$STATE/pids"
done

# Record each slurmd's private mount namespace: stop_cluster.sh ends leftover job processes by it.
for _ in $(seq 50); do
  : > "$STATE/namespaces"
  ok=1
  while read -r name pid; do
    case "$name" in
      slurmd-*)
        ns=$(readlink "/proc/$pid/ns/mnt" 2>/dev/null) || { ok=0; continue; }
        [ "$ns" = "$(readlink /proc/$$/ns/mnt)" ] && ok=0   # not yet unshared
        echo "$ns" >> "$STATE/namespaces" ;;
    esac
  done < "$STATE/pids"
  [ "$ok" = 1 ] && break
  sleep 0.1
done

# Wait until every node is idle (normally ~1-3 s).
for _ in $(seq 150); do
  idle=$(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l)
  [ "$idle" -ge "$NODES" ] && { echo "[slurm] $NODES nodes idle; export SLURM_CONF=$SLURM_CONF"; exit 0; }
  sleep 0.2
done
echo "[slurm] nodes did not come up; logs in $STATE/log" >&2
sinfo -N >&2 || true
tail -n 20 "$STATE/log/slurmctld.log" >&2 || true
exit 1
