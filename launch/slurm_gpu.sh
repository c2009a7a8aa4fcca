#!/usr/bin/env bash
# Train adm_jax on a SLURM GPU cluster: one process per node, each driving all its GPUs.
#
#   sbatch --nodes=4 --gpus-per-node=8 launch/slurm_gpu.sh configs/imagenet256.py \
#       --workdir=gs://my-bucket/adm_jax/in256 --config.data.data_dir=gs://my-bucket/tfds
#
# srun starts the same command on every node; adm_jax.main calls jax.distributed.initialize(),
# which reads the coordinator, process count and process id from SLURM's variables. The
# workdir must be storage every node sees (a bucket or a shared file system). Requeue after a
# preemption (`#SBATCH --requeue`, or sbatch again): the run resumes from its last checkpoint.
# SLURM sends SIGTERM before killing a job (see --signal): every process then stops at the
# same step and saves (JAX's preemption sync). If one node dies, the others exit with an
# error within --heartbeat_timeout seconds (default 60) instead of hanging.
#SBATCH --job-name=adm_jax
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=TERM@120
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
CONFIG=${1:?usage: sbatch launch/slurm_gpu.sh CONFIG [flags for adm_jax.main]}
shift
JAX_VERSION=$(grep -E '^jax==' requirements.txt | cut -d= -f3)
if [ ! -d .venv ]; then  # on the shared file system: installed once, used by every node
  python3 -m venv .venv
  . .venv/bin/activate
  pip install -q -r requirements.txt -e .
  pip install -q "jax[cuda12]==$JAX_VERSION"
fi
. .venv/bin/activate
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
# --kill-on-bad-exit: one failed task ends the step instead of leaving the others waiting.
srun --kill-on-bad-exit=1 --ntasks-per-node=1 python -m adm_jax.main --config="$CONFIG" "$@"
