#!/usr/bin/env bash
# The GPU benchmark in one command (one H100/H200; about 8 minutes including compiles):
#
#   bash launch/gpu_bench.sh [OUT_DIR]      # default OUT_DIR=gpu_bench
#
# 1. ImageNet-128 and -256 bfloat16 train steps (img/s, MFU) at large per-device batches
#    (MAXBATCH=1: at the largest that fits, found by compiling);
# 2. the attention kernels side by side (XLA vs cuDNN flash attention, ImageNet-128 step;
#    the train runs of part 1 also time the inference forward, these skip it);
# 3. time per sampling step, unguided / classifier-guided / classifier-free, for DDPM, DDIM
#    and DPM-Solver++ (ImageNet-128 and its classifier).
# Each part prints its table (the rows docs/benchmarks.md records) and writes OUT_DIR/*.json.
# The environment is launch/gpu.sh's (.venv with the CUDA build of the pinned JAX).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_bench}
mkdir -p "$OUT"
bench() { ADM_JAX_MODULE=adm_jax.bench bash launch/gpu.sh "$@"; }
# Per-device train batches: bfloat16 ImageNet-128 / -256 on an 80-141 GB GPU. MAXBATCH=1
# searches the largest that fits instead (8-10 compiles each: adds 10-20 minutes).
declare -A BATCH=([128]=${BATCH128:-64} [256]=${BATCH256:-16})

for size in 128 256; do
  if [ "${MAXBATCH:-0}" = 1 ]; then
    bench "configs/imagenet$size.py" --what=maxbatch --json="$OUT/maxbatch$size.json"
    BATCH[$size]=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["maxbatch"]["max_batch_per_device"])' "$OUT/maxbatch$size.json")
  fi
  bench "configs/imagenet$size.py" --what=train --steps=20 --batch="${BATCH[$size]}" \
    --json="$OUT/train$size.json"
done
for impl in xla cudnn; do
  bench configs/imagenet128.py --what=train --steps=20 --batch="${BATCH[128]}" \
    --config.train.attention_impl=$impl --noforward \
    --json="$OUT/attention_$impl.json"
done
bench configs/imagenet128.py --what=sample --samplers=ddpm250,ddim25,dpm++20 \
  --sample_guidance=none,classifier,cfg --json="$OUT/sample128.json"
echo "wrote $OUT/*.json"
