"""adm_jax entry point: ``python -m adm_jax.main --config=configs/X.py --workdir=DIR [--mode=]``.

Modes: ``adm_jax.modes`` (train, sample, evaluate, ..., demo), each an importable function a
notebook can call. Any config field can be overridden, e.g. ``--config.train.batch_size=64``.
Expected errors are one line ``adm_jax: ...`` on stderr and exit codes 2/3/4 (``adm_jax.cli``);
``run(argv)`` is the whole command as a function returning the exit code (tests).
"""

from adm_jax import xla_cpu

if __name__ == "__main__":
    xla_cpu.prepare_entry_point()  # may restart the process: before the imports below

import pathlib
import sys
from collections.abc import Sequence

# configs/*.py import their base as `from configs import default`: make this checkout's
# configs/ importable however the entry point was started.
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if (_REPO_ROOT / "configs").is_dir() and str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

import jax
from absl import app, flags
from ml_collections import config_flags

from adm_jax import cli, modes
from adm_jax import workdir as workdir_lib
from adm_jax.cli import EXIT_FAILED, EXIT_LOCKED, EXIT_USAGE  # noqa: F401 (the exit codes)

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_enum("mode", "train", modes.MODES, "What to run.")
flags.DEFINE_integer(
    "heartbeat_timeout",
    60,
    "Multi-process runs: seconds without a heartbeat after which a process is declared dead "
    "and every other process stops with an error (JAX's default is 100).",
)
flags.DEFINE_bool(
    "verbose",
    False,
    "Print the traceback of expected errors too (also: environment ADM_JAX_VERBOSE=1).",
)
flags.DEFINE_bool(
    "break_lock",
    False,
    "Remove the workdir's lock before starting: for a run that was killed on another machine "
    "(a stale lock on this machine is taken over by itself).",
)
flags.DEFINE_integer(
    "step", None, "--mode=verify: the checkpoint step to check (default: the newest complete one)."
)
config_flags.DEFINE_config_file("config", None, "ml_collections config file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> int:
    """Runs the parsed command; returns its exit code (expected errors: one line)."""
    try:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]} (flags are --name=value)")
        config_file = config_flags.get_config_filename(FLAGS["config"])
        modes.check_mode(FLAGS.config, FLAGS.mode, FLAGS["mode"].present, config_file)
        cli.initialize_distributed(FLAGS.heartbeat_timeout)
        if FLAGS.break_lock and jax.process_index() == 0:
            workdir_lib.break_lock(FLAGS.workdir)
        modes.run_mode(FLAGS.config, FLAGS.workdir, FLAGS.mode, FLAGS.step)
    except Exception as err:
        code = cli.report(err)
        if code is None:
            raise
        return code
    return 0


def run(argv: Sequence[str]) -> int:
    """The command ``python -m adm_jax.main ARGS`` as a function: ``argv`` includes the program
    name; returns the exit code, with the same one-line errors on stderr."""
    return cli.run(main, argv)


if __name__ == "__main__":
    jax.config.config_with_absl()
    app.run(main, flags_parser=cli.parse_flags)
