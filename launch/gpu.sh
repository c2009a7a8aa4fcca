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
. launch/gpu_env.sh
nvidia-smi -L || true
exec python -m adm_jax.main --config="$CONFIG" "$@"
