#!/usr/bin/env bash
# The same job on 4 nodes x 8 GPUs: TP=2 -> DP=16. The global batch must be a multiple of
# micro_batch_size x DP, so keep the seed's global batch 16 with micro-batch 1 (one micro-batch per
# rank per step) -- or raise --global_batch_size to 64 with micro-batch 4 (and retune lr / train_iters).
# Add --dry-run to print the plan and the sbatch script without submitting.
set -euo pipefail
cd "$(dirname "$0")/.."
hpctrain submit \
  --profile examples/cluster.toml \
  --nodes 4 --gpus-per-node 8 \
  examples/qwen2.5-7b-sft.toml \
  --micro_batch_size 1 \
  --global_batch_size 16 \
  --slurm.time 00:30:00 \
  "$@"
