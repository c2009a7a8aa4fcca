#!/usr/bin/env bash
# Installs adm_jax with its pinned dependencies into a virtual environment: once per machine
# (every TPU VM worker, a GPU host, or a SLURM cluster's shared file system before the first
# sbatch), never inside a job. The pins need Python >= 3.11; where the system has none (Ubuntu
# 22.04 TPU VMs have 3.10), uv downloads one into its own folder, without touching the system.
#
#   bash launch/install.sh ACCELERATOR [VENV]
#
# ACCELERATOR: tpu (jax[tpu]), cuda12 (jax[cuda12]) or cpu; VENV: default .venv in this
# checkout. About 3 GB in the venv (plus libtpu or the CUDA wheels) and 1-3 minutes with a
# warm network; running it again only checks that everything is installed (seconds).
set -euo pipefail

ACCELERATOR=${1:-}
cd "$(dirname "$0")/.."
VENV=${2:-.venv}
JAX_VERSION=$(grep -E '^jax==' requirements.txt | cut -d= -f3)
case "$ACCELERATOR" in
  tpu) JAX_EXTRA=("jax[tpu]==$JAX_VERSION") ;;
  cuda12) JAX_EXTRA=("jax[cuda12]==$JAX_VERSION") ;;
  cpu) JAX_EXTRA=() ;;
  *)
    echo "install.sh: ACCELERATOR must be tpu, cuda12 or cpu (got '$ACCELERATOR'); usage: bash launch/install.sh ACCELERATOR [VENV]" >&2
    exit 2
    ;;
esac

# uv: from PATH, from an earlier `pip install --user uv`, or installed now for this user.
export PATH="$HOME/.local/bin:$PATH"
if ! command -v uv >/dev/null 2>&1; then
  echo "[install] installing uv for $(id -un) (pip install --user uv)"
  python3 -m pip install -q --user uv 2>/dev/null ||
    python3 -m pip install -q --user --break-system-packages uv
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating $VENV with Python >= 3.11"
  uv venv -q --python '>=3.11' "$VENV"
fi
echo "[install] installing requirements.txt, adm_jax (editable)${JAX_EXTRA[*]:+, ${JAX_EXTRA[*]}} into $VENV"
uv pip install -q --python "$VENV/bin/python" -r requirements.txt -e . "${JAX_EXTRA[@]}"
"$VENV/bin/python" -c "import adm_jax, jax, sys; print('[install] adm_jax ready: Python', sys.version.split()[0], 'jax', jax.__version__)"
