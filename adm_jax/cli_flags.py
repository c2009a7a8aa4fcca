"""absl flags for the library modules that are also commands: ``python -m adm_jax.convert``,
``adm_jax.sampling.io``, ``adm_jax.evaluation.convert_inception`` and
``adm_jax.data.prepare``.

Each defines its flags on a ``flags.FlagValues`` of its own, not on absl's global ``FLAGS``:
these modules are imported by ``adm_jax.main``, the benchmark and the tests, and flags defined
on ``FLAGS`` at import would join those commands' flags (two ``--out`` would even collide).
Bad input is one line on stderr, ``error: ...`` naming the flag or file, and exit code 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags

EXIT_USAGE = 2
# Bad input from the command line or the files it names: one line, no traceback.
USAGE_ERRORS = (flags.Error, app.UsageError, ValueError, OSError, ImportError)
HELP = ("-h", "--help", "--helpshort", "--helpfull")


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def parse(
    flag_values: flags.FlagValues,
    argv: Sequence[str] | None,
    *,
    usage: str,
    required: Sequence[str] = (),
    description: str = "",
) -> list[str]:
    """Parses ``argv`` (without the program name; None: ``sys.argv[1:]``) into
    ``flag_values`` and returns the positional arguments; ``--help`` prints ``usage``,
    ``description`` (if any) and the flags, then exits. A bad flag raises ``flags.Error``
    naming it, a missing ``required`` one ``app.UsageError``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg in HELP for arg in argv):
        text = f"{description}\n" if description else ""
        print(f"usage: {usage}\n{text}{flag_values.get_help(include_special_flags=False)}")
        raise SystemExit(0)
    positional = flag_values(["", *argv])[1:]
    missing = [f"--{name}" for name in required if flag_values[name].value is None]
    if missing:
        raise app.UsageError(f"{', '.join(missing)}: required (usage: {usage})")
    return positional


def run(main: Callable[[list[str]], Any]) -> None:
    """``app.run`` for a command whose ``main(argv)`` (argv without the program name) parses
    its own flags with ``parse``: a ``USAGE_ERRORS`` error is one line on stderr and exit code
    ``EXIT_USAGE``."""

    def run_main(argv: list[str]) -> None:
        try:
            main(argv[1:])
        except USAGE_ERRORS as err:
            print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USAGE)

    def keep_argv(argv: list[str]) -> list[str]:  # absl's own flags keep their defaults
        flags.FLAGS.mark_as_parsed()
        return list(argv)

    app.run(run_main, flags_parser=keep_argv)
