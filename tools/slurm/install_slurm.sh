#!/usr/bin/env bash
# Install Debian's Slurm + munge packages for the local test cluster (tools/slurm/start_cluster.sh).
# Idempotent: does nothing when the binaries are already there. Needs root (CI runs as root).
set -euo pipefail
need=()
for bin in slurmctld slurmd sbatch munged; do
  command -v "$bin" >/dev/null 2>&1 || need+=("$bin")
done
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "[slurm] missing ${need[*]}; run as root: apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge" >&2
  exit 1
fi
pkgs=(slurmctld slurmd slurm-client munge)
export DEBIAN_FRONTEND=noninteractive
echo "[slurm] installing ${pkgs[*]}"
if ! apt-get install -y -q --no-install-recommends "${pkgs[@]}"; then
  # A fresh machine may have no package lists yet.
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${pkgs[@]}"
fi
