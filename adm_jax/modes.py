"""``--mode`` of ``python -m adm_jax.main`` -> the library function that runs it.

train (``adm_jax.train.train_and_evaluate``), train_classifier (``train.train_classifier``),
sample (``adm_jax.sampling.sample``), edit (``adm_jax.sampling.edit.edit``), evaluate, nll,
sweep (``adm_jax.evaluation.evaluate`` / ``nll`` / ``guidance_sweep``), export
(``train.export``), checkpoints and verify (``adm_jax.checkpoints.tools``), demo
(``adm_jax.demo.run``; chosen by ``config.mode = "demo"``, so no --mode is needed there, and
another is refused). A config or checkpoint the mode cannot use is an ``app.UsageError``.
"""

from __future__ import annotations

import jax
from absl import app

from adm_jax import demo, evaluation, sampling
from adm_jax.sampling import edit

# adm_jax.train (and checkpoint_tools, through it) is imported only by the modes that use it:
# it imports TensorFlow (clu's TensorBoard writer), whose start-up messages on stderr would
# come before the one-line error of every other mode, and would slow their start.

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
    "checkpoints",  # list a workdir's checkpoints (adm_jax.checkpoints.tools)
    "verify",  # check one checkpoint against --config
)


def check_mode(config, mode: str, mode_given: bool, config_file: str) -> None:
    """Refuses an explicit --mode other than demo for the demo's config: it holds several
    models' sections and always runs the whole demo."""
    if config.get("mode") == "demo" and mode_given and mode != "demo":
        raise app.UsageError(
            f"--mode={mode}: --config={config_file} is the demo's config "
            "(config.mode='demo'), which runs the whole demo; leave out --mode"
        )


def run_mode(config, workdir: str, mode: str, step: int | None = None) -> None:
    """Runs ``mode`` on ``config`` and ``workdir`` (``step``: --mode=verify's checkpoint)."""
    if mode == "demo" or config.get("mode") == "demo":
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
            checkpoint_tools.main_verify(config, workdir, step)
        return
    # export / sample / evaluate report bad configs and mismatched checkpoints as one-line
    # ValueErrors naming the field: show that line, not a traceback.
    try:
        if mode == "export":
            from adm_jax import train

            print(train.export(config, workdir))
        elif mode == "sample":
            sampling.sample(config, workdir)
        elif mode == "edit":
            edit.edit(config, workdir)
        elif mode == "evaluate":
            evaluation.evaluate(config, workdir)
        elif mode == "nll":
            evaluation.nll(config, workdir)
        elif mode == "sweep":
            evaluation.guidance_sweep(config, workdir)
    except ValueError as err:
        raise app.UsageError(str(err)) from err
