#!/usr/bin/env bash
# One call of a GPU lease: check the portable attention on the GPU, then benchmark training steps
# (tools/bench/bench_train.py) and write everything under $OUT:
#   $OUT/machine.txt  GPUs, driver, torch        $OUT/attention.json  check_attention.py result
#   $OUT/results.jsonl one line per variant      $OUT/bench.log       all output
#   $OUT/summary.md   markdown table of results.jsonl
#
# Usage (from the repo root on the GPU machine):  bash tools/bench/gpu_lease.sh SUITE
#   1gpu  one H100: check_attention.py; Qwen2.5-0.5B seq 2048 (mb 4) and 8192 (mb 1), all
#         variants incl. the HF baseline; 1.5B seq 2048; 1.5B at 32k with CP=1
#   2gpu  two H100s: 7B TP=2+SP seq 2048 / 8192 (portable vs local); 1.5B CP=2 at 32k;
#         0.5B TP=2+SP; 7B TP=2 at 32k without CP (expected out of memory)
#   4gpu  four H100s: 7B TP=2+SP x CP=2 at 32k, 7B TP=4+SP seq 8192
# The image has no megatron-core: carry its cp312 wheel in .whl/ (megatron_core-0.16.1; it needs
# only numpy, packaging, torch, all on the image). Each run stops early when the time budget
# BENCH_BUDGET_S (default 540 s, under the 600 s command limit) would be exceeded.
# CPU smoke test of this script (venv python as python3, no wheels):
#   BENCH_NO_WHEELS=1 BENCH_EXTRA=--tiny OUT=/tmp/x bash tools/bench/gpu_lease.sh 1gpu
set -uo pipefail
SUITE=${1:-1gpu}
OUT=${OUT:-/tmp/hpctrain_bench}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore OMP_NUM_THREADS=4
export CUDA_DEVICE_MAX_CONNECTIONS=1  # megatron TP: comm kernels issue before the compute they overlap
cd "$(dirname "$0")/../.."
if [ -z "${BENCH_NO_WHEELS:-}" ] && compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "[lease] wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
BUDGET=${BENCH_BUDGET_S:-540}
START=$(date +%s)
LOG=$OUT/bench.log
{ nvidia-smi -L; nvidia-smi --query-gpu=driver_version,memory.total --format=csv;
  python3 -c "import torch, transformers, megatron.core as m; print('torch', torch.__version__, 'transformers', transformers.__version__, 'megatron-core', m.__version__)"; } \
  > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

left() { echo $((BUDGET - $(date +%s) + START)); }

bench() {  # bench NPROC ARGS...: one torchrun of bench_train.py, bounded by the remaining budget
  local n=$1; shift
  local rem; rem=$(left)
  if [ -n "${CAP:-}" ] && [ "$CAP" -lt "$rem" ]; then rem=$CAP; fi
  if [ "$rem" -lt 60 ]; then echo "[lease] SKIPPED (time budget): $*" | tee -a "$LOG"; return; fi
  echo "[lease] $(date +%T) nproc=$n $*" | tee -a "$LOG"
  timeout "$rem" torchrun --standalone --nproc_per_node "$n" tools/bench/bench_train.py \
    --out "$OUT/results.jsonl" "$@" ${BENCH_EXTRA:-} >> "$LOG" 2>&1 \
    || echo "[lease] FAILED rc=$? nproc=$n $*" | tee -a "$LOG"
  grep '^{' "$LOG" | tail -n 4 | cut -c1-240
}

case "$SUITE" in
  1gpu)
    timeout 120 python3 tools/bench/check_attention.py > "$OUT/attention.json" 2>> "$LOG" \
      || echo "[lease] attention check FAILED (see attention.json / bench.log)" | tee -a "$LOG"
    cat "$OUT/attention.json"
    bench 1 --model 0.5b --seq 2048 --micro-batch 4
    bench 1 --model 0.5b --seq 8192 --micro-batch 1
    bench 1 --model 0.5b --seq 2048 --micro-batch 4 --variants portable --no-chunked-ce
    bench 1 --model 1.5b --seq 2048 --micro-batch 4 --variants portable,portable-dense,hf
    CAP=150 bench 1 --model 1.5b --seq 32768 --micro-batch 1 --variants portable --steps 3 --warmup 1
    ;;
  2gpu)
    bench 2 --model 7b --tp 2 --sp --seq 2048 --micro-batch 2 --variants portable,portable-dense,local
    bench 2 --model 7b --tp 2 --sp --seq 8192 --micro-batch 1 --variants portable
    bench 2 --model 1.5b --cp 2 --seq 32768 --micro-batch 1 --variants portable --steps 3 --warmup 1
    bench 2 --model 0.5b --tp 2 --sp --seq 8192 --micro-batch 1 --variants portable,local
    # 7B TP=2 at 32k without CP: expected to run out of memory (the 4gpu suite runs it with CP=2)
    CAP=150 bench 2 --model 7b --tp 2 --sp --seq 32768 --micro-batch 1 --variants portable --steps 2 --warmup 1
    ;;
  4gpu)
    bench 4 --model 7b --tp 2 --sp --cp 2 --seq 32768 --micro-batch 1 --variants portable --steps 3 --warmup 1
    bench 4 --model 7b --tp 4 --sp --seq 8192 --micro-batch 1 --variants portable,local
    ;;
  *) echo "unknown suite $SUITE (1gpu | 2gpu | 4gpu)"; exit 2 ;;
esac
if [ -s "$OUT/results.jsonl" ]; then
  python3 tools/bench/bench_train.py --summarize "$OUT/results.jsonl" > "$OUT/summary.md"
  cat "$OUT/summary.md"
fi
