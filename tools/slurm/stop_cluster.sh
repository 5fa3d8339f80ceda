#!/usr/bin/env bash
# Stop the test cluster started by start_cluster.sh: cancel its jobs, then kill exactly the PIDs it
# recorded (munged, slurmctld, slurmd) and the job processes left in the slurmds' private mount
# namespaces (slurmstepd and the tasks it started; nothing else lives in those namespaces).
#   tools/slurm/stop_cluster.sh [STATE_DIR]
set -uo pipefail
STATE=${1:-${HPCTRAIN_SLURM_DIR:-/tmp/hpctrain-slurm}}
[ -f "$STATE/pids" ] || { echo "[slurm] no cluster recorded in $STATE"; exit 0; }
export SLURM_CONF="$STATE/etc/slurm.conf"

# The mount namespaces of our slurmds (recorded at start; also read live).
declare -A OURNS=()
if [ -f "$STATE/namespaces" ]; then
  while read -r ns; do [ -n "$ns" ] && OURNS[$ns]=1; done < "$STATE/namespaces"
fi
while read -r name pid; do
  case "$name" in slurmd-*) ns=$(readlink "/proc/$pid/ns/mnt" 2>/dev/null) && OURNS[$ns]=1 ;; esac
done < "$STATE/pids"

# Cancel running jobs so their steps end cleanly (a few seconds at most).
if command -v scancel >/dev/null && timeout 10 squeue -h -o %i >/dev/null 2>&1; then
  timeout 10 scancel --full --user="$(id -un)" 2>/dev/null || true
  for _ in $(seq 50); do
    [ -z "$(timeout 5 squeue -h -t running,completing -o %i 2>/dev/null)" ] && break
    sleep 0.2
  done
fi

job_pids() {
  local p ns self=$$
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    [ "$p" = "$self" ] && continue
    ns=$(readlink "/proc/$p/ns/mnt" 2>/dev/null) || continue
    [ -n "${OURNS[$ns]:-}" ] && echo "$p"
  done
}

# slurmd first (they own the job processes), then slurmctld, munged last.
mapfile -t lines < <(tac "$STATE/pids")
for line in "${lines[@]}"; do kill -TERM "${line##* }" 2>/dev/null || true; done
for line in "${lines[@]}"; do
  pid=${line##* }
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
done
if [ ${#OURNS[@]} -gt 0 ]; then
  for p in $(job_pids); do kill -TERM "$p" 2>/dev/null || true; done
  sleep 1
  for p in $(job_pids); do kill -KILL "$p" 2>/dev/null || true; done
fi
rm -f "$STATE/pids" "$STATE/namespaces"
echo "[slurm] stopped cluster in $STATE"
