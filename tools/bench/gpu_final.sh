#!/usr/bin/env bash
# The closing GPU lease of the 2026-12-02 session, one H200, in two calls (each < 10 min):
#   call A:  bash tools/bench/gpu_final.sh setup fast mfu7b m019   (the lean trainer after the merges; 0.19.2)
#   call B:  bash tools/bench/gpu_final.sh setup lora moe          (issues 20 and 21)
#   (next session) call C: LORA_VARIANTS=... bash tools/bench/gpu_final.sh setup checkmoe dense lora
# 2026-12-04 (issue 21's dense target; raw in docs/gpu-results/2026-12-04/):
#   DENSE_PROFILE=1 bash tools/bench/gpu_final.sh setup dense
#   DENSE_ARGS="--steps 12 --warmup 3" bash tools/bench/gpu_final.sh setup moe dense
#   DENSE_ARGS="--steps 20 --warmup 3" bash tools/bench/gpu_final.sh setup dense dense_sft
#   GPU_TESTS="<the four single-GPU test files>" bash tools/bench/gpu_final.sh setup gputests
#   bash tools/bench/gpu_final.sh setup fast hf mfu7b      (issue 16's figures with the new cross entropy)
# Stages (results under $OUT, at most 8 files come back: each stage writes one file, <stage>.txt,
# with every JSON record / log tail it produced):
#   fast   tests/train/test_trainer_gpu_fast.py: plain vs fast (CUDA graph) `hpctrain sft`, 0.5B shape,
#          + tests/portable/test_portable_gpu.py; per-iteration records of both runs
#   hf     bench_train.py: plain HF and HF + Liger on the same shape and batch (same lease as fast)
#   mem7b  `hpctrain sft` on the 7B shape cut to 2 and 6 layers (mb 4 x 2048, selective core_attn +
#          mlp_act: memory per layer)
#   mfu7b  the same shape at 12 layers with the whole-step CUDA graph (MFU)
#   lora   tools/bench/bench_lora.py (issue 20)
#   moe    tests/portable/test_portable_moe_gpu.py + tools/bench/bench_moe.py (issue 21)
#   gputests  every test marked gpu under tests/portable (attention, cross entropy, MoE experts)
#   checkmoe  tools/bench/check_moe.py --device cuda alone, its whole output kept (what the moe test runs)
#   dense  tools/bench/bench_moe.py --shapes dense: ours, HF, ours+graph (issue 21's dense target;
#          DENSE_ARGS adds bench_moe flags, e.g. "--steps 12 --warmup 3")
#   dense_sft  `hpctrain sft` itself on that Qwen3-1.7B shape (8 layers, packed real data, mb 4 x 2048),
#          eager and with --cuda_graph_impl local: what the trainer gives of the benchmark's figure
#   m019   megatron-core 0.19.2 from .whl019/: the portable + fast GPU tests and one bench_train run
# Wheels: .whl/ (megatron-core 0.16.1 cp312, liger-kernel 0.8.5), .whl019/ (megatron-core 0.19.2).
set -uo pipefail
OUT=${OUT:-/tmp/hpctrain_final}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore OMP_NUM_THREADS=8 CUDA_DEVICE_MAX_CONNECTIONS=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$(dirname "$0")/../.."
ROOT=$PWD
WORK=${WORK:-/tmp/hpctrain_final_work}
mkdir -p "$WORK"
BUDGET=${FINAL_BUDGET_S:-570}
START=$(date +%s)
left() { echo $((BUDGET - $(date +%s) + START)); }
DATA=$ROOT/hpctrain/assets/data
say() { echo "[final] $(date +%T) $*" | tee -a "$OUT/console.txt"; }

install() {  # install WHEEL_DIR: that folder's wheels into /tmp/site (replacing what was there)
  rm -rf /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$1"/*.whl \
    || { say "wheel install from $1 failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$ROOT
  python3 -c "import hpctrain._C" 2>/dev/null || python3 setup.py -q build_ext --inplace > "$WORK/build.log" 2>&1 \
    || { tail -30 "$WORK/build.log"; exit 1; }
  { date -u; nvidia-smi -L; python3 -c "import torch, transformers, megatron.core as m; print('torch', torch.__version__, 'transformers', transformers.__version__, 'megatron-core', m.__version__)"; } >> "$OUT/machine.txt" 2>&1
  tail -1 "$OUT/machine.txt"
}

model_dir() {  # model_dir NAME CONFIG [num_layers]
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

sft() {  # sft NAME MODEL_DIR SECONDS FLAGS...: one `hpctrain sft`; its last records -> $OUT/${SFT_TXT:-mem7b.txt}
  local name=$1 model=$2 secs=$3; shift 3
  local rem; rem=$(left); [ "$rem" -lt "$secs" ] && secs=$rem
  [ "$secs" -lt 30 ] && { say "SKIPPED (budget): $name"; return; }
  say "sft $name"
  (cd "$WORK" && timeout "$secs" python3 -m hpctrain.cli sft --model "$model" --load_safetensors false \
     --dataset "$DATA/alpaca_gpt4_en.jsonl" "$DATA/self_cognition.jsonl" --model_name hpctrain-bot \
     --model_author hpctrain --max_length 2048 --packing true --cross_entropy_loss_fusion true \
     --torch_dtype bfloat16 --lr 1e-5 --lr_warmup_iters 2 --save "$WORK/$name" --add_version false \
     --save_interval 1000 --no_save_optim true --log_interval 1 "$@") > "$WORK/$name.log" 2>&1 \
     || { say "sft $name FAILED rc=$?"; tail -5 "$WORK/$name.log" >> "$OUT/${SFT_TXT:-mem7b.txt}"; }
  [ -f "$WORK/$name/logging.jsonl" ] && { echo "# $name $*"; grep tokens_per_s "$WORK/$name/logging.jsonl" | tail -3; } >> "$OUT/${SFT_TXT:-mem7b.txt}"
}

for stage in "$@"; do
  case "$stage" in
    setup) install .whl ;;
    fast)
      say "fast"
      HPCTRAIN_GPU_RESULTS=$WORK timeout "$(left)" python3 -m pytest -x -q -p no:cacheprovider \
        tests/portable/test_portable_gpu.py tests/train/test_trainer_gpu_fast.py > "$WORK/fast.log" 2>&1
      rc=$?
      { echo "# rc=$rc"; tail -3 "$WORK/fast.log"; for f in "$WORK"/fast-*.jsonl; do echo "# $f"; cat "$f"; done; } > "$OUT/fast.txt"
      say "fast rc=$rc" ;;
    hf)
      say "hf"
      timeout "$(left)" torchrun --standalone --nproc_per_node 1 tools/bench/bench_train.py --model 0.5b \
        --seq 2048 --micro-batch 4 --variants hf,hf+liger --out "$OUT/hf.txt" > "$WORK/hf.log" 2>&1 \
        || { say "hf FAILED"; tail -5 "$WORK/hf.log" >> "$OUT/hf.txt"; } ;;
    mem7b)
      for n in 2 6; do
        sft "mem7b_L$n" "$(model_dir "q7_$n" qwen2.5-7b-instruct.config.json "$n")" 100 --micro_batch_size 4 \
          --global_batch_size 8 --train_iters 8 --recompute_granularity selective --recompute_modules core_attn mlp_act
      done ;;
    mfu7b)
      sft "mfu7b_L12" "$(model_dir q7_12 qwen2.5-7b-instruct.config.json 12)" 120 --micro_batch_size 4 \
        --global_batch_size 8 --train_iters 10 --cuda_graph_impl local ;;
    lora)
      say "lora"
      timeout "$(left)" python3 tools/bench/bench_lora.py --out "$WORK/lora" --budget_s "${LORA_BUDGET_S:-240}" \
        ${LORA_VARIANTS:+--variants "$LORA_VARIANTS"} > "$WORK/lora.log" 2>&1
      rc=$?
      { echo "# rc=$rc"; cat "$WORK/lora/summary.md" 2>/dev/null; cat "$WORK/lora/bench_lora.jsonl" 2>/dev/null; tail -8 "$WORK/lora.log"; } > "$OUT/lora.txt"
      say "lora rc=$rc" ;;
    moe)
      say "moe"
      timeout "${MOE_TEST_S:-150}" python3 -m pytest -x -q -s -p no:cacheprovider tests/portable/test_portable_moe_gpu.py > "$WORK/moe_test.log" 2>&1
      rc=$?
      b=$(( $(left) - 20 )); [ "$b" -gt 200 ] && b=200
      timeout "$(( b + 20 ))" python3 tools/bench/bench_moe.py --out "$WORK/moe.jsonl" --budget_s "$b" > "$WORK/moe.log" 2>&1
      rc2=$?
      { echo "# test rc=$rc bench rc=$rc2"; grep "^{" "$WORK/moe_test.log"; tail -3 "$WORK/moe_test.log";
        cat "$WORK/moe.jsonl" 2>/dev/null; grep -v "^{" "$WORK/moe.log" | tail -25; } > "$OUT/moe.txt"
      say "moe rc=$rc/$rc2" ;;
    gputests)
      say "gputests"
      HPCTRAIN_GPU_RESULTS=$WORK timeout 300 python3 -m pytest -q -p no:cacheprovider ${GPU_TESTS:--m gpu tests/portable} \
        > "$WORK/gputests.log" 2>&1
      rc=$?
      { echo "# rc=$rc"; tail -40 "$WORK/gputests.log"; for f in "$WORK"/fast-*.jsonl; do [ -f "$f" ] && { echo "# $f"; tail -4 "$f"; }; done; } > "$OUT/gputests.txt"
      say "gputests rc=$rc" ;;
    checkmoe)
      say "checkmoe"
      timeout "${MOE_TEST_S:-150}" python3 tools/bench/check_moe.py --device cuda > "$WORK/checkmoe.log" 2>&1
      rc=$?
      { echo "# rc=$rc"; grep "^{" "$WORK/checkmoe.log"; grep -v "^{" "$WORK/checkmoe.log" | tail -60; } > "$OUT/checkmoe.txt"
      say "checkmoe rc=$rc" ;;
    dense)
      say "dense"
      rm -f "$WORK/dense.jsonl"  # bench_moe appends: a warm machine would report the last call's rows again
      timeout 150 python3 tools/bench/bench_moe.py --shapes dense --out "$WORK/dense.jsonl" --budget_s 130 \
        ${DENSE_PROFILE:+--profile_out "$OUT/dense_profile.txt"} ${DENSE_ARGS:-} > "$WORK/dense.log" 2>&1
      rc=$?
      { echo "# rc=$rc"; cat "$WORK/dense.jsonl" 2>/dev/null; grep -v "^{" "$WORK/dense.log" | tail -30; } > "$OUT/dense.txt"
      say "dense rc=$rc" ;;
    dense_sft)
      d=$WORK/qwen3_1.7b_L8
      mkdir -p "$d" && cp "$ROOT"/tests/fixtures/qwen2.5-tokenizer/* "$d/"
      python3 -c "import json, sys; sys.path.insert(0, 'tools/bench'); import bench_moe as b; \
c = b.hf_config('dense', False); c['dtype'] = 'bfloat16'; json.dump(c, open('$d/config.json', 'w'), indent=1)"
      for g in none local; do
        SFT_TXT=dense_sft.txt sft "dense_sft_graph_$g" "$d" 110 --micro_batch_size 4 --global_batch_size 8 --train_iters 16 \
          --cuda_graph_impl "$g"
      done ;;
    m019)
      install .whl019
      say "m019"
      mkdir -p "$WORK/019"
      HPCTRAIN_GPU_RESULTS=$WORK/019 timeout "$(( $(left) - 70 ))" python3 -m pytest -x -q -p no:cacheprovider \
        tests/portable/test_portable_gpu.py tests/train/test_trainer_gpu_fast.py > "$WORK/m019.log" 2>&1
      rc=$?
      timeout 65 torchrun --standalone --nproc_per_node 1 tools/bench/bench_train.py --model 0.5b --seq 2048 \
        --micro-batch 4 --variants portable,portable+graph --out "$WORK/019/bench.jsonl" >> "$WORK/m019.log" 2>&1
      { echo "# tests rc=$rc"; grep -h "megatron-core" "$OUT/machine.txt" | tail -1; tail -3 "$WORK/m019.log";
        for f in "$WORK"/019/*.jsonl; do echo "# $f"; cat "$f"; done; } > "$OUT/m019.txt"
      say "m019 rc=$rc" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
say "done in $(( $(date +%s) - START )) s"
