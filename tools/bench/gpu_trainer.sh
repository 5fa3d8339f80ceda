#!/usr/bin/env bash
# One call of a GPU lease for the trainer itself (`hpctrain sft`), results under $OUT:
#   seed     2 GPUs: the seed's quickstart recipe (examples/qwen2.5-7b-sft.toml: Qwen2.5-7B shape, TP=2,
#            micro-batch 4, global batch 16, selective recompute, 100 iterations, max_length 2048,
#            packing, chunked cross entropy) from random bf16 weights, then mcore -> HF export.
#            $OUT/seed.log (all output), $OUT/seed_logging.jsonl (per-iteration), $OUT/seed_stages.txt
#   trainer  2 GPUs: tests/train/test_trainer_gpu.py (Qwen2.5-0.5B shape at TP=2, see its docstring);
#            $OUT/trainer_gpu.json, $OUT/trainer_test.log
#   memcheck 2 GPUs: the seed recipe for 20 iterations without saving (memory and speed only)
#   portable 1 GPU: tests/portable/test_portable_gpu.py (CUDA attention kernels vs explicit masks)
#   speed    1 GPU: tools/bench/bench_train.py, 0.5B shape, HF baseline vs portable spec with and
#            without torch.compile'd layers, plus a profile of each; $OUT/results.jsonl, $OUT/profiles.txt
#   graphs   1 GPU: the same 0.5B step with forward + backward replayed as one CUDA graph; $OUT/graphs.jsonl
# Usage on the device machine, from the repo root:  bash tools/bench/gpu_trainer.sh seed trainer
# The image lacks megatron-core: carry its cp312 wheel in .whl/ (see gpu_lease.sh). The native
# extension is built in place here (g++/cmake are on the image).
set -uo pipefail
OUT=${OUT:-/tmp/hpctrain_gpu}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore OMP_NUM_THREADS=4 CUDA_DEVICE_MAX_CONNECTIONS=1
cd "$(dirname "$0")/../.."
ROOT=$PWD
WORK=${WORK:-/tmp/hpctrain_work}
mkdir -p "$WORK"
if [ ! -d /tmp/site/megatron ] && compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "[gpu] wheel install failed"; exit 1; }
fi
export PYTHONPATH=/tmp/site:$ROOT
if ! python3 -c "import hpctrain._C" 2>/dev/null; then
  t0=$(date +%s)
  python3 setup.py -q build_ext --inplace > "$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; exit 1; }
  echo "[gpu] built hpctrain._C in $(( $(date +%s) - t0 )) s"
fi
{ date -u; nvidia-smi -L; nvidia-smi --query-gpu=driver_version,memory.total --format=csv,noheader;
  python3 -c "import torch, transformers, megatron.core as m; print('torch', torch.__version__, 'transformers', transformers.__version__, 'megatron-core', m.__version__)"; } \
  >> "$OUT/machine.txt" 2>&1

model_dir() {  # model_dir NAME CONFIG: a config.json + the Qwen2.5 tokenizer (random weights)
  local d=$WORK/$1
  mkdir -p "$d"
  cp "$ROOT/hpctrain/assets/configs/$2" "$d/config.json"
  cp "$ROOT"/tests/fixtures/qwen2.5-tokenizer/* "$d/"
  echo "$d"
}

stage() {  # stage NAME CMD...: run, time, append to seed_stages.txt
  local name=$1; shift
  local t0; t0=$(date +%s.%N)
  "$@" >> "$OUT/seed.log" 2>&1
  local rc=$?
  printf "%s\trc=%s\t%s s\n" "$name" "$rc" "$(awk -v a="$t0" -v b="$(date +%s.%N)" "BEGIN{printf \"%.1f\", b-a}")" | tee -a "$OUT/seed_stages.txt"
  return $rc
}

for suite in "$@"; do
  case "$suite" in
    seed)
      M=$(model_dir qwen2.5-7b-random qwen2.5-7b-instruct.config.json)
      (cd "$WORK" && stage "sft (100 iterations, TP=2)" env NPROC_PER_NODE=2 python3 -m hpctrain.cli sft \
         "$ROOT/examples/qwen2.5-7b-sft.toml" --model "$M" --load "" --load_safetensors false --finetune false \
         --torch_dtype bfloat16 --save "$WORK/seed")
      run=$(ls -d "$WORK"/seed/v* 2>/dev/null | tail -1)
      [ -n "$run" ] && cp "$run/logging.jsonl" "$OUT/seed_logging.jsonl"
      [ -n "$run" ] && (cd "$WORK" && stage "export mcore -> HF" python3 -m hpctrain.cli export \
         --mcore_model "$run" --to_hf true --output_dir "$WORK/seed-hf" --test_convert_precision false)
      du -sh "$WORK/seed-hf" >> "$OUT/seed_stages.txt" 2>&1
      ;;
    memcheck)  # the seed recipe's memory and speed with 20 iterations, no checkpoint
      M=$(model_dir qwen2.5-7b-random qwen2.5-7b-instruct.config.json)
      (cd "$WORK" && stage "sft memcheck (20 iterations, TP=2)" env NPROC_PER_NODE=2 python3 -m hpctrain.cli sft \
         "$ROOT/examples/qwen2.5-7b-sft.toml" --model "$M" --load "" --load_safetensors false --finetune false \
         --torch_dtype bfloat16 --train_iters 20 --save "" --lr_warmup_iters 2)
      grep -h "iter 5/\|iter 20/" "$OUT/seed.log" | tail -2
      ;;
    portable)
      python3 -m pytest -x -q tests/portable/test_portable_gpu.py > "$OUT/portable_test.log" 2>&1
      echo "[gpu] portable attention test rc=$?"; tail -3 "$OUT/portable_test.log"
      ;;
    trainer)
      HPCTRAIN_GPU_RESULTS=$OUT python3 -m pytest -x -q -s tests/train/test_trainer_gpu.py \
        > "$OUT/trainer_test.log" 2>&1
      echo "[gpu] trainer test rc=$?"; tail -3 "$OUT/trainer_test.log"
      ;;
    speed)
      for args in "--seq 2048 --micro-batch 4 --variants hf,portable-dense,portable-dense+compile,portable,portable+compile" \
                  "--seq 8192 --micro-batch 1 --variants portable-dense+compile"; do
        # shellcheck disable=SC2086
        CUDA_VISIBLE_DEVICES=0 timeout "${SPEED_TIMEOUT_S:-240}" torchrun --standalone --nproc_per_node 1 tools/bench/bench_train.py \
          --model 0.5b $args --out "$OUT/results.jsonl" --profile-dir "$WORK/prof" >> "$OUT/speed.log" 2>&1 \
          || echo "[gpu] bench FAILED: $args" | tee -a "$OUT/speed.log"
      done
      cat "$WORK"/prof/*.txt > "$OUT/profiles.txt" 2>/dev/null
      python3 tools/bench/bench_train.py --summarize "$OUT/results.jsonl"
      ;;
    graphs)  # what CUDA graphs are worth on the 0.5B shape (host/launch-bound without them)
      CUDA_VISIBLE_DEVICES=0 timeout "${SPEED_TIMEOUT_S:-300}" torchrun --standalone --nproc_per_node 1 \
        tools/bench/bench_train.py --model 0.5b --seq 2048 --micro-batch 4 \
        --variants "${GRAPH_VARIANTS:-hf,portable-dense,portable-dense+graph,hf+graph,portable+graph}" \
        --out "$OUT/graphs.jsonl" >> "$OUT/graphs.log" 2>&1 || echo "[gpu] graphs bench FAILED (see graphs.log)"
      python3 tools/bench/bench_train.py --summarize "$OUT/graphs.jsonl"
      ;;
    *) echo "unknown suite $suite (seed | memcheck | portable | trainer | speed | graphs)"; exit 2 ;;
  esac
done
