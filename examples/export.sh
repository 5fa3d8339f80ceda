#!/usr/bin/env bash
# The seed's checkpoint conversions with hpctrain (one GPU each; they also run on CPU, slower).
#   bash examples/export.sh hf-to-mcore [HF_MODEL_DIR]          # default: Qwen/Qwen2.5-7B-Instruct
#   bash examples/export.sh mcore-to-hf megatron_output/Qwen2.5-7B-Instruct/v0-YYYYmmdd-HHMMSS
# On a Slurm login node, prefix a command with `hpctrain submit` to run it on a GPU node:
#   hpctrain submit export --profile examples/cluster.toml --model ... --to_mcore true ...
set -euo pipefail
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
case "${1:-}" in
  hf-to-mcore)
    hpctrain export \
      --model "${2:-Qwen/Qwen2.5-7B-Instruct}" \
      --to_mcore true \
      --torch_dtype bfloat16 \
      --output_dir Qwen2.5-7B-Instruct-mcore \
      --test_convert_precision true
    ;;
  mcore-to-hf)
    ckpt=${2:?"give the training run's folder, e.g. megatron_output/Qwen2.5-7B-Instruct/v0-20250101-120000"}
    hpctrain export \
      --mcore_model "$ckpt" \
      --to_hf true \
      --torch_dtype bfloat16 \
      --output_dir "$ckpt-hf" \
      --test_convert_precision true
    # then chat with it:
    echo "hpctrain infer --model '$ckpt-hf' --stream true --temperature 0 --max_new_tokens 2048"
    ;;
  *)
    sed -n '2,6p' "$0"
    exit 2
    ;;
esac
