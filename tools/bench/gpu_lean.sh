#!/usr/bin/env bash
# One call of a GPU lease for the lean trainer (issue 16), one H200. Results under $OUT:
#   machine.txt                 GPU, driver, versions
#   fast_test.log, fast-*.jsonl tests/train/test_trainer_gpu_fast.py: plain (eager, explicit-mask SDPA) vs
#                               fast (whole-step CUDA graph + flex) `hpctrain sft`, 0.5B shape, per-iteration
#   hf.jsonl                    bench_train.py: plain HF and HF + Liger on the same shape and batch
#   eager.jsonl, profile.txt    `hpctrain sft` eager (flex, no graph) with --profile over steps 10-12
#   sync.txt                    host syncs seen by torch.cuda.set_sync_debug_mode in 6 eager iterations
#   mem7b.jsonl                 7B shape cut to 2 and 6 layers, mb 4 x 2048, selective core_attn + mlp_act
#   lean.log                    everything else the stages printed
# Usage on the device machine, from the repo root:  bash tools/bench/gpu_lean.sh [stage ...]
#   stages: setup fast hf eager sync mem7b (default: all, in that order, inside LEAN_BUDGET_S)
set -uo pipefail
OUT=${OUT:-/tmp/hpctrain_lean}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore OMP_NUM_THREADS=8 CUDA_DEVICE_MAX_CONNECTIONS=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$(dirname "$0")/../.."
ROOT=$PWD
WORK=${WORK:-/tmp/hpctrain_lean_work}
mkdir -p "$WORK"
LOG=$OUT/lean.log
BUDGET=${LEAN_BUDGET_S:-560}
START=$(date +%s)
left() { echo $((BUDGET - $(date +%s) + START)); }
DATA=$ROOT/hpctrain/assets/data

setup() {
  if [ -n "${WHEELS:-.whl}" ] && compgen -G "${WHEELS:-.whl}/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "${WHEELS:-.whl}"/*.whl || { echo "[lean] wheel install failed"; exit 1; }
  fi
  export PYTHONPATH=/tmp/site:$ROOT
  if ! python3 -c "import hpctrain._C" 2>/dev/null; then
    python3 setup.py -q build_ext --inplace > "$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; exit 1; }
  fi
  { date -u; nvidia-smi -L; python3 -c "import torch, transformers, megatron.core as m; print('torch', torch.__version__, 'transformers', transformers.__version__, 'megatron-core', m.__version__)"; } > "$OUT/machine.txt" 2>&1
  cat "$OUT/machine.txt"
}

model_dir() {  # model_dir NAME CONFIG [num_layers]: config.json (+ layer cut) + the Qwen2.5 tokenizer
  local d=$WORK/$1
  mkdir -p "$d"
  python3 - "$ROOT/hpctrain/assets/configs/$2" "$d/config.json" "${3:-}" <<'EOF'
import json, sys
cfg = json.load(open(sys.argv[1]))
if sys.argv[3]:
    cfg["num_hidden_layers"] = int(sys.argv[3])
json.dump(cfg, open(sys.argv[2], "w"), indent=1)
EOF
  cp "$ROOT"/tests/fixtures/qwen2.5-tokenizer/* "$d/"
  echo "$d"
}

sft() {  # sft NAME MODEL_DIR SECONDS FLAGS...: one `hpctrain sft`, its per-iteration records -> $OUT/NAME.jsonl
  local name=$1 model=$2 secs=$3; shift 3
  local rem; rem=$(left); [ "$rem" -lt "$secs" ] && secs=$rem
  if [ "$secs" -lt 30 ]; then echo "[lean] SKIPPED (budget): $name" | tee -a "$LOG"; return; fi
  echo "[lean] $(date +%T) sft $name ($secs s max)" | tee -a "$LOG"
  (cd "$WORK" && timeout "$secs" python3 -m hpctrain.cli sft --model "$model" --load_safetensors false \
     --dataset "$DATA/alpaca_gpt4_en.jsonl" "$DATA/self_cognition.jsonl" --model_name hpctrain-bot \
     --model_author hpctrain --max_length 2048 --packing true --cross_entropy_loss_fusion true \
     --torch_dtype bfloat16 --lr 1e-5 --lr_warmup_iters 2 --save "$WORK/$name" --add_version false \
     --save_interval 1000 --no_save_optim true --log_interval 1 "$@") >> "$LOG" 2>&1 \
     || echo "[lean] sft $name FAILED rc=$?" | tee -a "$LOG"
  [ -f "$WORK/$name/logging.jsonl" ] && cp "$WORK/$name/logging.jsonl" "$OUT/$name.jsonl"
  grep -h "iter .*/" "$LOG" | tail -1
}

for stage in ${@:-setup fast hf eager sync mem7b}; do
  case "$stage" in
    setup) setup ;;
    fast)
      HPCTRAIN_GPU_RESULTS=$OUT timeout "$(left)" python3 -m pytest -x -q -p no:cacheprovider \
        tests/portable/test_portable_gpu.py tests/train/test_trainer_gpu_fast.py > "$OUT/fast_test.log" 2>&1
      echo "[lean] fast test rc=$?"; tail -3 "$OUT/fast_test.log" ;;
    hf)
      timeout "$(left)" torchrun --standalone --nproc_per_node 1 tools/bench/bench_train.py --model 0.5b \
        --seq 2048 --micro-batch 4 --variants hf,hf+liger --out "$OUT/hf.jsonl" >> "$LOG" 2>&1 \
        || echo "[lean] hf bench FAILED" | tee -a "$LOG"
      cat "$OUT/hf.jsonl" 2>/dev/null | cut -c1-400 ;;
    eager)
      M=$(model_dir q05 qwen2.5-0.5b-instruct.config.json)
      sft eager "$M" 150 --micro_batch_size 4 --global_batch_size 16 --train_iters 30 --profile true \
        --profile_step_start 10 --profile_step_end 12
      cp "$WORK"/eager/profile/steps_10-12.txt "$OUT/profile.txt" 2>/dev/null; head -1 "$OUT/profile.txt" ;;
    sync)
      M=$(model_dir q05 qwen2.5-0.5b-instruct.config.json)
      (cd "$WORK" && timeout 120 python3 -W default -c "
import sys, torch
torch.cuda.set_sync_debug_mode('warn')
from hpctrain.cli import main
sys.exit(main(['sft', '--model', '$M', '--load_safetensors', 'false', '--dataset', '$DATA/alpaca_gpt4_en.jsonl', '--max_length', '2048',
               '--packing', 'true', '--cross_entropy_loss_fusion', 'true', '--torch_dtype', 'bfloat16',
               '--micro_batch_size', '4', '--global_batch_size', '16', '--train_iters', '6', '--save', '',
               '--log_interval', '1']))" > "$WORK/sync.log" 2>&1)
      grep -A1 "synchronizing CUDA operation" "$WORK/sync.log" | grep -v "synchronizing\|^--" | sort | uniq -c \
        | sort -rn > "$OUT/sync.txt"; head -20 "$OUT/sync.txt" ;;
    mem7b)
      for n in 2 6; do
        M=$(model_dir "q7_$n" qwen2.5-7b-instruct.config.json "$n")
        sft "mem7b_L$n" "$M" 110 --micro_batch_size 4 --global_batch_size 8 --train_iters 8 \
          --recompute_granularity selective --recompute_modules core_attn mlp_act
        [ -f "$OUT/mem7b_L$n.jsonl" ] && sed "s/^/{\"layers\": $n, \"rec\": /; s/$/}/" "$OUT/mem7b_L$n.jsonl" \
          | tail -1 >> "$OUT/mem7b.jsonl"
      done
      cat "$OUT/mem7b.jsonl" 2>/dev/null | cut -c1-300 ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
echo "[lean] done in $(( $(date +%s) - START )) s"
