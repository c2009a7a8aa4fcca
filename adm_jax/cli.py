"""The error funnel of ``python -m adm_jax.main``: flags parsing, exit codes, one-line errors.

The expected errors (a bad flag or config field, missing data, an unusable or locked workdir,
a failed checkpoint save, non-finite losses, ...) end the run with ONE line
``adm_jax: <what and where>`` on stderr and an exit code; anything else keeps its traceback.
``--verbose`` (or ADM_JAX_VERBOSE=1) shows the traceback of expected errors too. Exit codes:
0 done; 1 unexpected error; 2 bad command line or config (``EXIT_USAGE``); 3 the run cannot
start or had to stop: data, workdir, checkpoints, non-finite losses (``EXIT_FAILED``); 4 the
workdir is held by another run (``EXIT_LOCKED``; ``--break_lock`` if that run is gone).
A multi-process run's failed process leaves at once (``os._exit``), without waiting for
peers that may be gone.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence

import jax
from absl import app, flags, logging

from adm_jax import workdir as workdir_lib
from adm_jax.recipe import ConfigError

FLAGS = flags.FLAGS

EXIT_USAGE = 2  # bad command line or config
EXIT_FAILED = 3  # data, workdir, checkpoint, non-finite losses: the run cannot go on
EXIT_LOCKED = 4  # another run holds the workdir


def exit_code(err: BaseException) -> int | None:
    """The exit code of an expected error, None for an unexpected one (traceback).

    Expected: usage and config errors, ValueError (the project's one-line bad-input error),
    OSError (files, disk, permissions: the message names the path) and every exception class
    adm_jax defines (NonFiniteError, CheckpointSaveError, TooManyCorruptImagesError, ...).
    """
    if isinstance(err, workdir_lib.WorkdirLockedError):
        return EXIT_LOCKED
    if isinstance(err, (app.UsageError, flags.Error, ConfigError)):
        return EXIT_USAGE
    if isinstance(err, (ValueError, OSError)) or type(err).__module__.startswith("adm_jax."):
        return EXIT_FAILED
    return None


def one_line(err: BaseException) -> str:
    """The first non-empty line of the error's message (the type's name if it has none)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def verbose() -> bool:
    """--verbose or ADM_JAX_VERBOSE: tracebacks of expected errors too."""
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


def flag_error(err: Exception, argv: Sequence[str]) -> str:
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
        if verbose() or "--verbose" in argv:
            traceback.print_exc()
        print(f"adm_jax: {flag_error(err, argv)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)


def run(main: Callable[[list[str]], int], argv: Sequence[str]) -> int:
    """Parses ``argv`` (with the program name) afresh and runs ``main`` on what remains: the
    whole command as a function returning its exit code, with the same one-line errors."""
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


def report(err: Exception) -> int | None:
    """The end of a run that raised ``err`` (called inside its ``except``): one line on
    stderr and its exit code; None for an unexpected error, which the caller raises again
    (its traceback). In a multi-process run the process
    exits at once: it must not wait in jax.distributed's shutdown barrier for peers that will
    never arrive (often a peer died inside a collective)."""
    code = exit_code(err)
    if jax.process_count() > 1:
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
        return None
    if verbose():
        traceback.print_exc()
    print(f"adm_jax: {one_line(err)}", file=sys.stderr, flush=True)
    return code


def initialize_distributed(heartbeat_timeout: int) -> None:
    """jax.distributed.initialize() on multi-process launches, then logs the devices: explicit
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
    else:
        try:
            jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout)
        except (ValueError, RuntimeError) as err:
            logging.info("Single-process run (no cluster detected: %s)", err)
    logging.info(
        "JAX process %d/%d; %d local / %d global devices: %s",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.local_devices(),
    )
