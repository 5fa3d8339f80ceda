#!/usr/bin/env bash
# The seed's recipe on Slurm: 1 node x 2 GPUs, TP=2 (DP=1), micro-batch 4, global batch 16.
# Add --dry-run to print the plan and the sbatch script without submitting.
set -euo pipefail
cd "$(dirname "$0")/.."
hpctrain submit \
  --profile examples/cluster.toml \
  --nodes 1 --gpus-per-node 2 \
  examples/qwen2.5-7b-sft.toml "$@"
