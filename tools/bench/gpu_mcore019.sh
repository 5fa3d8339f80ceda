#!/usr/bin/env bash
# One call of a GPU lease: the GPU tests and the bench under megatron-core 0.19.2 (the upper end of
# the supported range, hpctrain/train/mcore_version.py) on the image's Python 3.12. Results under $OUT:
#   $OUT/machine.txt          GPUs, torch, transformers, megatron-core (must say 0.19.2)
#   $OUT/portable_test.log    tests/portable/test_portable_gpu.py (CUDA attention kernels vs explicit masks)
#   $OUT/trainer_test.log     tests/train/test_trainer_gpu.py (needs 2 GPUs; skips cleanly on one)
#   $OUT/sft.log, sft_logging.jsonl   `hpctrain sft` on the Qwen2.5-0.5B shape, 1 GPU, 20 iterations
#   $OUT/results.jsonl, speed.log     tools/bench/bench_train.py, 0.5B shape (gpu_trainer.sh speed)
# Wheels: the image has torch 2.11.0, transformers 5.17.0, safetensors, pybind11, cmake, g++; it lacks
# megatron-core. Carry ONE megatron-core wheel for cp312 in .whl/:
#   pip download megatron-core==0.19.2 --no-deps --only-binary=:all: --python-version 3.12 -d .whl
# (only that file is installed here, whatever else .whl/ holds; its dependencies numpy, packaging
# and torch are on the image.) Usage on the device machine, from the repo root:
#   OUT=$OUT bash tools/bench/gpu_mcore019.sh            # about 6-8 minutes on one H200
set -uo pipefail
OUT=${OUT:-/tmp/hpctrain_mcore019}
mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
ROOT=$PWD
WORK=${WORK:-/tmp/hpctrain_work019}
mkdir -p "$WORK"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore OMP_NUM_THREADS=4 CUDA_DEVICE_MAX_CONNECTIONS=1
WHEEL=$(compgen -G ".whl/megatron_core-0.19.2-cp312-*.whl" | head -1)
[ -n "$WHEEL" ] || { echo "[019] no .whl/megatron_core-0.19.2-cp312-*.whl (see the header)"; exit 1; }
rm -rf /tmp/site  # gpu_trainer.sh reuses /tmp/site: it must hold 0.19.2 and nothing older
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$WHEEL" \
  || { echo "[019] wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$ROOT
python3 -c "import megatron.core as m; assert m.__version__ == '0.19.2', m.__version__" || exit 1
{ date -u; nvidia-smi -L;
  python3 -c "import sys, torch, transformers, megatron.core as m; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'megatron-core', m.__version__)"; } \
  > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# the GPU tests + the bench, as gpu_trainer.sh runs them (it builds hpctrain._C in place when missing)
OUT=$OUT WORK=$WORK bash tools/bench/gpu_trainer.sh portable trainer

# `hpctrain sft` end to end on one GPU: Qwen2.5-0.5B shape, random bf16 weights, packed alpaca + self-cognition
M=$WORK/qwen2.5-0.5b-random
mkdir -p "$M" && cp hpctrain/assets/configs/qwen2.5-0.5b-instruct.config.json "$M/config.json" \
  && cp tests/fixtures/qwen2.5-tokenizer/* "$M/"
(cd "$WORK" && timeout 240 python3 -m hpctrain.cli sft --model "$M" --load_safetensors false --torch_dtype bfloat16 \
   --dataset "AI-ModelScope/alpaca-gpt4-data-en#400" "swift/self-cognition#100" --model_name hpctrain-bot hpctrain-bot \
   --model_author hpctrain hpctrain --packing true --max_length 2048 --micro_batch_size 4 --global_batch_size 16 \
   --train_iters 20 --lr_warmup_iters 2 --save "$WORK/sft" --save_interval 20 --log_interval 5 \
   > "$OUT/sft.log" 2>&1)
echo "[019] sft rc=$?"; grep -h "iter 20/\|Error\|error" "$OUT/sft.log" | tail -3
run=$(ls -d "$WORK"/sft/v* 2>/dev/null | tail -1)
[ -n "$run" ] && cp "$run/logging.jsonl" "$OUT/sft_logging.jsonl" && cp "$run/train_loss.png" "$OUT/" 2>/dev/null

SPEED_TIMEOUT_S=120 OUT=$OUT WORK=$WORK bash tools/bench/gpu_trainer.sh speed
