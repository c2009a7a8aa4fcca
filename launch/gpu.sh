#!/usr/bin/env bash
# Run adm_jax on a single GPU host (all local GPUs form the mesh; one process).
#
#   bash launch/gpu.sh configs/imagenet128.py --workdir=/data/runs/in128 [--mode=train]
#
# Installs the CUDA build of the pinned JAX version into .venv (first run only), then runs the
# same entry point as on TPU. For several GPU hosts, run this on every host with
# JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i set; adm_jax.main
# passes them to jax.distributed.initialize().
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: gpu.sh CONFIG [flags for adm_jax.main]}
shift
JAX_VERSION=$(grep -E '^jax==' requirements.txt | cut -d= -f3)

if [ ! -d .venv ]; then
  python3 -m venv .venv
  . .venv/bin/activate
  pip install -q -r requirements.txt -e .
  pip install -q "jax[cuda12]==$JAX_VERSION"
fi
. .venv/bin/activate

# Let XLA use most of the GPU memory, and keep the autotuner's picks between runs.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
nvidia-smi -L || true
# python -m adm_jax.main, or the module named by ADM_JAX_MODULE (launch/gpu_bench.sh runs
# adm_jax.bench through this script, so both share one environment).
exec python -m "${ADM_JAX_MODULE:-adm_jax.main}" --config="$CONFIG" "$@"
