#!/usr/bin/env bash
# Run adm_jax on a GPU host: one process driving all the host's GPUs (docs/gpu.md).
#
#   bash launch/install.sh cuda12 [VENV]     # once per host (or once on a shared file system)
#   bash launch/gpu.sh configs/imagenet128.py --workdir=/data/runs/in128 [--mode=train]
#
# Several hosts: run the same command on every host with JAX_COORDINATOR_ADDRESS=host0:1234
# JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i (0 on host0); adm_jax.main passes them to
# jax.distributed.initialize(). Installs nothing: it activates $ADM_JAX_VENV (default .venv in
# this checkout), made by launch/install.sh, and stops with the install command if it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: bash launch/gpu.sh CONFIG [flags for python -m adm_jax.main]}
shift

VENV=${ADM_JAX_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "gpu.sh: no virtual environment at $VENV (ADM_JAX_VENV); install once: bash launch/install.sh cuda12 $VENV" >&2
  exit 2
fi
. "$VENV/bin/activate"

# Let XLA use most of the GPU memory, and keep the autotuner's picks between runs.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
nvidia-smi -L 2>/dev/null || echo "[gpu] nvidia-smi found no GPU (JAX uses what JAX_PLATFORMS allows)"
# python -m adm_jax.main, or the module named by ADM_JAX_MODULE (launch/gpu_bench.sh runs
# adm_jax.bench through this script, so both share one environment).
exec python -m "${ADM_JAX_MODULE:-adm_jax.main}" --config="$CONFIG" "$@"
