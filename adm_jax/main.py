"""adm_jax entry point: ``python -m adm_jax.main --config=configs/X.py --workdir=DIR [--mode=]``.

Modes: train (diffusion model), train_classifier (noisy classifier), sample, edit (inpaint,
SDEdit or class-swap existing images: ``adm_jax.sampling.edit``), evaluate, nll
(bits/dim), sweep (``adm_jax.evaluation.guidance_sweep``: sample and evaluate at every point
of ``sample.sweep_scales`` x ``sample.sweep_samplers`` x ``sample.sweep_steps``), export (EMA
params -> inference checkpoint), demo (``adm_jax.demo.run``; chosen by ``config.mode =
"demo"`` in configs/demo.py, so no --mode is needed there, and another is refused). Any config
field can be overridden, e.g. ``--config.train.batch_size=64``. All logic lives in importable
functions (``adm_jax.train.train_and_evaluate`` ...), so a notebook runs the same code.

Errors: the expected ones (a bad flag or config field, missing data, an unusable or locked
workdir, a failed checkpoint save, non-finite losses, ...) end the run with ONE line
``adm_jax: <what and where>`` on stderr and an exit code; anything else keeps its traceback.
``--verbose`` (or ADM_JAX_VERBOSE=1) shows the traceback of expected errors too. Exit codes:
0 done; 1 unexpected error; 2 bad command line or config (``EXIT_USAGE``); 3 the run cannot
start or had to stop: data, workdir, checkpoints, non-finite losses (``EXIT_FAILED``); 4 the
workdir is held by another run (``EXIT_LOCKED``; ``--break_lock`` if that run is gone).
``run(argv)`` is the whole command as a function returning the exit code (tests).
"""

from adm_jax import xla_cpu

if __name__ == "__main__":
    xla_cpu.prepare_entry_point()  # may restart the process: before the imports below

import os
import pathlib
import re
import sys
import traceback
from collections.abc import Sequence

# configs/*.py import their base as `from configs import default`: make this checkout's
# configs/ importable however the entry point was started.
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if (_REPO_ROOT / "configs").is_dir() and str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from adm_jax import workdir as workdir_lib

MODES = (
    "train",
    "train_classifier",
    "sample",
    "edit",
    "evaluate",
    "export",
    "demo",
    "nll",
    "sweep",
    "checkpoints",  # list a workdir's checkpoints (adm_jax.train.checkpoint_tools)
    "verify",  # check one checkpoint against --config
)
FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_enum("mode", "train", MODES, "What to run.")
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

EXIT_USAGE = 2  # bad command line or config
EXIT_FAILED = 3  # data, workdir, checkpoint, non-finite losses: the run cannot go on
EXIT_LOCKED = 4  # another run holds the workdir


def exit_code(err: BaseException) -> int | None:
    """The exit code of an expected error, None for an unexpected one (traceback).

    Expected: usage and config errors, ValueError (the project's one-line bad-input error),
    OSError (files, disk, permissions: the message names the path) and every exception class
    adm_jax defines (NonFiniteError, CheckpointSaveError, TooManyCorruptImagesError, ...).
    """
    # ConfigError's module is imported lazily (only training modes need it).
    config_lib = sys.modules.get("adm_jax.recipe.reader")
    if isinstance(err, workdir_lib.WorkdirLockedError):
        return EXIT_LOCKED
    if isinstance(err, (app.UsageError, flags.Error)) or (
        config_lib is not None and isinstance(err, config_lib.ConfigError)
    ):
        return EXIT_USAGE
    if isinstance(err, (ValueError, OSError)) or type(err).__module__.startswith("adm_jax."):
        return EXIT_FAILED
    return None


def one_line(err: BaseException) -> str:
    """The first non-empty line of the error's message (the type's name if it has none)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _verbose() -> bool:
    env = os.environ.get("ADM_JAX_VERBOSE", "").strip().lower()
    return bool(FLAGS["verbose"].value) or env not in ("", "0", "false", "no")


def _arg_value(argv: Sequence[str], name: str) -> str:
    """The value given to ``--name`` in ``argv`` ("" if absent)."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return ""


def _flag_error(err: Exception, argv: Sequence[str]) -> str:
    """One line for an error raised while parsing flags."""
    text = str(err)
    if isinstance(err, (AttributeError, KeyError)):
        # A --config.<path> override naming no field: config_dict raises KeyError('<name>\n
        # Did you mean "<close>" instead of "<name>"?'), quoted again by AttributeError.
        text = text.replace("\\n", "\n").replace("\\'", "'")
        name = text.strip("'\" \n").splitlines()[0].strip("'\" ")
        overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
        arg = next((a for a in overrides if name in a[len("--config.") :].split(".")), None)
        suggestion = re.search(r'Did you mean "([^"]+)"', text)
        line = f"{arg or '--config.' + name}: no such config field"
        return line + (f'; did you mean "{suggestion.group(1)}"?' if suggestion else "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(err, OSError):  # the config file could not be loaded
        reason = lines[-1] if lines else type(err).__name__
        return f"--config={_arg_value(argv, 'config')}: cannot load the config file ({reason})"
    if not lines:
        return type(err).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"


def parse_flags(argv: Sequence[str]) -> list[str]:
    """``app.run``'s flags parser: a bad flag, override or config file is one line on stderr
    and exit code EXIT_USAGE (config_flags raises AttributeError / OSError for some)."""
    try:
        remaining = FLAGS(list(argv))
        FLAGS.config.get("mode")  # a config file that failed to load raises OSError here
        return remaining
    except Exception as err:  # noqa: BLE001 - every parsing failure is the user's input
        if _verbose() or "--verbose" in argv:
            traceback.print_exc()
        print(f"adm_jax: {_flag_error(err, argv)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)


def run(argv: Sequence[str]) -> int:
    """The command ``python -m adm_jax.main ARGS`` as a function: ``argv`` includes the program
    name; returns the exit code, with the same one-line errors on stderr."""
    FLAGS.unparse_flags()
    for name in [n for n in FLAGS if n.startswith("config.")]:
        delattr(FLAGS, name)  # --config.<field> flags defined by a previous parse
    saved, sys.argv = sys.argv, list(argv)  # config_flags reads its overrides from sys.argv
    try:
        try:
            remaining = parse_flags(argv)
        except SystemExit as stop:
            return int(stop.code or 0)
        return main(remaining)
    finally:
        sys.argv = saved


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


def main(argv) -> int:
    """Runs the parsed command; returns its exit code (expected errors: one line)."""
    try:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]} (flags are --name=value)")
        if FLAGS.config.get("mode") == "demo" and FLAGS["mode"].present and FLAGS.mode != "demo":
            # The demo's config holds several models' sections; it always runs the whole demo.
            config_file = config_flags.get_config_filename(FLAGS["config"])
            raise app.UsageError(
                f"--mode={FLAGS.mode}: --config={config_file} is the demo's config "
                "(config.mode='demo'), which runs the whole demo; leave out --mode"
            )
        _maybe_initialize_distributed(FLAGS.heartbeat_timeout)
        logging.info(
            "JAX process %d/%d; %d local / %d global devices: %s",
            jax.process_index(),
            jax.process_count(),
            jax.local_device_count(),
            jax.device_count(),
            jax.local_devices(),
        )
        if FLAGS.break_lock and jax.process_index() == 0:
            workdir_lib.break_lock(FLAGS.workdir)
        _run_mode(FLAGS.config, FLAGS.workdir, FLAGS.mode)
    except Exception as err:
        code = exit_code(err)
        if jax.process_count() > 1:
            # A failed process (often: a peer died inside a collective) must not wait in
            # jax.distributed's shutdown barrier for peers that will never arrive.
            logging.exception("adm_jax process %d failed", jax.process_index())
            print(
                f"adm_jax process {jax.process_index()}/{jax.process_count()}: "
                f"{type(err).__name__}: {one_line(err)}",
                file=sys.stderr,
                flush=True,
            )
            logging.flush()
            os._exit(code or 1)
        if code is None:
            raise
        if _verbose():
            traceback.print_exc()
        print(f"adm_jax: {one_line(err)}", file=sys.stderr, flush=True)
        return code
    return 0


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
    if mode in ("checkpoints", "verify"):  # read-only checkpoint tools
        from adm_jax.train import checkpoint_modes as checkpoint_tools

        if mode == "checkpoints":
            checkpoint_tools.main_checkpoints(workdir)
        else:
            checkpoint_tools.main_verify(config, workdir, FLAGS.step)
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
        elif mode == "edit":
            from adm_jax.sampling import edit

            edit.edit(config, workdir)
        elif mode == "evaluate":
            from adm_jax import evaluation

            evaluation.evaluate(config, workdir)
        elif mode == "nll":
            from adm_jax import evaluation

            evaluation.nll(config, workdir)
        elif mode == "sweep":
            from adm_jax import evaluation

            evaluation.guidance_sweep(config, workdir)
    except ValueError as err:
        raise app.UsageError(str(err)) from err


if __name__ == "__main__":
    jax.config.config_with_absl()
    app.run(main, flags_parser=parse_flags)
