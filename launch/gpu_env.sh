# Sourced by launch/gpu.sh and launch/slurm_gpu.sh from the checkout's root: creates .venv with
# the CUDA build of the pinned JAX version (first run only; on a shared file system, once for
# every node), activates it, and sets the GPU XLA options.
JAX_VERSION=$(grep -E '^jax==' requirements.txt | cut -d= -f3)
if [ ! -d .venv ]; then
  python3 -m venv .venv
  . .venv/bin/activate
  pip install -q -r requirements.txt -e .
  pip install -q "jax[cuda12]==$JAX_VERSION"
fi
. .venv/bin/activate
# Let XLA use most of the GPU memory, and overlap collectives with compute.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
