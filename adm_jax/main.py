"""adm_jax entry point: ``python -m adm_jax.main --config=configs/X.py --workdir=DIR [--mode=]``.

Modes: train (diffusion model), train_classifier (noisy classifier), sample, evaluate,
export (EMA params -> inference checkpoint), demo (``adm_jax.demo.run``; chosen by
``config.mode = "demo"`` in configs/demo.py, so no --mode is needed there). Any config
field can be overridden, e.g. ``--config.train.batch_size=64``. All logic lives in importable
functions (``adm_jax.train.train_and_evaluate`` ...), so a notebook runs the same code.
"""

import os
import pathlib
import sys

# configs/*.py import their base as `from configs import default`: make this checkout's
# configs/ importable however the entry point was started.
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if (_REPO_ROOT / "configs").is_dir() and str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

MODES = ("train", "train_classifier", "sample", "evaluate", "export", "demo", "nll")
FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_enum("mode", "train", MODES, "What to run.")
flags.DEFINE_integer(
    "heartbeat_timeout",
    60,
    "Multi-process runs: seconds without a heartbeat after which a process is declared dead "
    "and every other process stops with an error (JAX's default is 100).",
)
config_flags.DEFINE_config_file("config", None, "ml_collections config file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def _maybe_initialize_distributed(heartbeat_timeout: int) -> None:
    """jax.distributed.initialize() on multi-process launches: explicit
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (GPU hosts, launch/gpu.sh),
    else JAX's own cluster detection (Cloud TPU pod slices, SLURM, Open MPI). A plain
    single-process run has no cluster and continues without it."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
            heartbeat_timeout_seconds=heartbeat_timeout,
        )
        return
    try:
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout)
    except (ValueError, RuntimeError) as err:
        logging.info("Single-process run (no cluster detected: %s)", err)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
    _maybe_initialize_distributed(FLAGS.heartbeat_timeout)
    logging.info(
        "JAX process %d/%d; %d local / %d global devices: %s",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.local_devices(),
    )
    try:
        _run_mode(FLAGS.config, FLAGS.workdir, FLAGS.mode)
    except app.UsageError:
        raise
    except Exception as err:
        if jax.process_count() == 1:
            raise
        # A failed process (often: a peer died inside a collective) must not wait in
        # jax.distributed's shutdown barrier for peers that will never arrive.
        logging.exception("adm_jax process %d failed", jax.process_index())
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(
            f"adm_jax process {jax.process_index()}/{jax.process_count()}: "
            f"{type(err).__name__}: {message}",
            file=sys.stderr,
            flush=True,
        )
        logging.flush()
        os._exit(1)


def _run_mode(config, workdir: str, mode: str) -> None:
    if mode == "demo" or config.get("mode") == "demo":
        from adm_jax import demo

        try:
            demo.run(config, workdir)
        except ValueError as err:  # e.g. a workdir made with another config: one line
            raise app.UsageError(str(err)) from err
        return
    if mode in ("train", "train_classifier"):
        from adm_jax import train

        # Fail fast, before any compilation, on unknown fields or impossible values.
        try:
            train.validate_config(config, num_devices=jax.device_count(), mode=mode)
        except train.ConfigError as err:
            raise app.UsageError(f"--config: {err}") from None
        run = train.train_and_evaluate if mode == "train" else train.train_classifier
        run(config, workdir)
        return
    # export / sample / evaluate report bad configs and mismatched checkpoints as one-line
    # ValueErrors naming the field: show that line, not a traceback.
    try:
        if mode == "export":
            from adm_jax import train

            print(train.export(config, workdir))
        elif mode == "sample":
            from adm_jax import sampling

            sampling.sample(config, workdir)
        elif mode == "evaluate":
            from adm_jax import evaluation

            evaluation.evaluate(config, workdir)
        elif mode == "nll":
            from adm_jax import evaluation

            evaluation.nll(config, workdir)
    except ValueError as err:
        raise app.UsageError(str(err)) from err


if __name__ == "__main__":
    jax.config.config_with_absl()
    app.run(main)
