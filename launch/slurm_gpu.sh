#!/usr/bin/env bash
# Train adm_jax on a SLURM GPU cluster: one process per node (srun), each driving all the GPUs
# of its node. docs/gpu.md is the user's page; in short, from the checkout on the shared file
# system:
#
#   bash launch/install.sh cuda12 [VENV]     # once, on a login node (never inside a job)
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm_gpu.sh configs/imagenet256.py \
#       --workdir=/shared/runs/in256 --config.data.data_dir=/shared/tfds
#
# The job installs nothing (compute nodes often have no internet): it activates the venv made
# by launch/install.sh, $ADM_JAX_VENV (default .venv in the submit directory), and stops with
# the install command if there is none. adm_jax.main calls jax.distributed.initialize(), which
# reads the coordinator (first node, port from the job id), the process count and id from the
# variables srun sets. The workdir must be storage every node sees.
#
# Preemption and time limits: --requeue and --signal below. 300 s before the time limit SLURM
# sends SIGUSR1 to this script, which passes SIGTERM to the training processes; a preemption
# sends SIGTERM to all of them itself. JAX's preemption sync then stops every process at the
# same step with one checkpoint, and this script requeues the job (scontrol requeue); the
# requeued job runs this script again and resumes from that checkpoint by itself.
# The log of every run of the job goes to one file, slurm-JOBID.out (--open-mode=append).
#SBATCH --job-name=adm_jax
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:?slurm_gpu.sh is a batch script: submit it with sbatch (docs/gpu.md)}"
CONFIG=${1:?usage: sbatch [--nodes=N] --gpus-per-node=G launch/slurm_gpu.sh CONFIG [flags for python -m adm_jax.main]}
shift

VENV=${ADM_JAX_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "slurm_gpu.sh: no virtual environment at $VENV (ADM_JAX_VENV); install once on a login node, outside the job: bash launch/install.sh cuda12 $VENV" >&2
  exit 2
fi
. "$VENV/bin/activate"

# jax's SLURM detection gives each process the single GPU numbered SLURM_LOCALID (it assumes
# one process per GPU); here one process per node drives every GPU of its node.
if [ -z "${JAX_LOCAL_DEVICE_IDS:-}" ]; then
  GPUS_ON_NODE=${SLURM_GPUS_ON_NODE:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}
  if [ "$GPUS_ON_NODE" -gt 0 ]; then
    JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((GPUS_ON_NODE - 1)))
    export JAX_LOCAL_DEVICE_IDS
  fi
fi
# Let XLA use most of the GPU memory (docs/gpu.md: memory fraction).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
echo "[slurm_gpu] job $SLURM_JOB_ID run $((${SLURM_RESTART_COUNT:-0} + 1)):" \
  "$SLURM_JOB_NUM_NODES node(s) $SLURM_JOB_NODELIST, GPUs ${JAX_LOCAL_DEVICE_IDS:-none}, $(date -u)"

STOP_SIGNAL=""
on_time_limit() { # --signal=B:USR1: pass SIGTERM to the training processes
  STOP_SIGNAL=USR1
  echo "[slurm_gpu] time limit near: SIGTERM to the training processes (they checkpoint)"
  scancel --signal=TERM "$SLURM_JOB_ID"
}
on_preemption() { # SLURM has sent SIGTERM to the whole job: the processes checkpoint by themselves
  STOP_SIGNAL=TERM
  echo "[slurm_gpu] SIGTERM (preemption): waiting for the checkpoint"
}
trap on_time_limit USR1
trap on_preemption TERM

# In the background, so that the traps above run at once (bash defers them while a command runs
# in the foreground). --kill-on-bad-exit: one failed process ends the step instead of leaving
# the others waiting.
srun --kill-on-bad-exit=1 --ntasks-per-node=1 python -m adm_jax.main --config="$CONFIG" "$@" &
STEP=$!
STATUS=0
while true; do
  STATUS=0
  wait "$STEP" || STATUS=$?
  # 128 + n: wait was interrupted by a trapped signal while srun still runs; wait again.
  if [ "$STATUS" -le 128 ] || ! kill -0 "$STEP" 2>/dev/null; then break; fi
done

if [ -n "$STOP_SIGNAL" ]; then
  echo "[slurm_gpu] step ended with status $STATUS after SIG$STOP_SIGNAL: requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID" ||
    echo "[slurm_gpu] scontrol requeue failed: submit the same sbatch command again to resume"
  exit 0
fi
exit "$STATUS"
