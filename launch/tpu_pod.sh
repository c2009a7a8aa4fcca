#!/usr/bin/env bash
# Train (or sample / evaluate) adm_jax on a Cloud TPU pod slice.
#
# Creates a TPU VM slice, installs the package on every worker, and runs the SAME command on
# every worker; adm_jax.main calls jax.distributed.initialize(), which discovers the other
# workers on Cloud TPU by itself, so no coordinator address is needed.
#
#   ZONE=us-central2-b TPU_NAME=adm TPU_TYPE=v4-64 BUCKET=gs://my-bucket \
#     bash launch/tpu_pod.sh configs/imagenet256.py [--mode=train] [--config.train.batch_size=256]
#
# Data: prepare imagenet2012 as a TFDS ArrayRecord dataset once (docs/data.md) and point
# --config.data.data_dir at the bucket (every worker reads its own shard). Checkpoints and
# TensorBoard logs go to the workdir, which should also be in the bucket so that a preempted
# slice resumes where it stopped when this script is run again.
set -euo pipefail

CONFIG=${1:?usage: tpu_pod.sh CONFIG [extra flags for adm_jax.main]}
shift
ZONE=${ZONE:?set ZONE, e.g. us-central2-b}
TPU_NAME=${TPU_NAME:-adm-jax}
TPU_TYPE=${TPU_TYPE:-v4-64}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
BUCKET=${BUCKET:?set BUCKET, e.g. gs://my-bucket}
WORKDIR=${WORKDIR:-$BUCKET/adm_jax/$(basename "$CONFIG" .py)}
JAX_VERSION=$(grep -E '^jax==' "$(dirname "$0")/../requirements.txt" | cut -d= -f3)

if ! gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" >/dev/null 2>&1; then
  echo "[tpu_pod] creating $TPU_TYPE slice $TPU_NAME in $ZONE"
  gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" \
    --accelerator-type "$TPU_TYPE" --version "$RUNTIME" ${SPOT:+--spot}
fi

run_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"
}

echo "[tpu_pod] copying this checkout (git archive of HEAD) to every worker"
ARCHIVE=$(mktemp /tmp/adm_jax.XXXXXX.tar.gz)
git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$ARCHIVE" HEAD
gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME":adm_jax.tar.gz --zone "$ZONE" --worker=all

echo "[tpu_pod] installing on every worker"
run_all "set -e; rm -rf adm_jax && mkdir adm_jax && tar -xzf adm_jax.tar.gz -C adm_jax; cd adm_jax; \
  python3 -m venv ~/venv && . ~/venv/bin/activate && pip install -q -U pip && \
  pip install -q -r requirements.txt -e . && pip install -q 'jax[tpu]==$JAX_VERSION'"

echo "[tpu_pod] running $CONFIG on every worker (workdir $WORKDIR)"
run_all "cd adm_jax && . ~/venv/bin/activate && python -m adm_jax.main \
  --config=$CONFIG --workdir=$WORKDIR $*"
