"""``--mode=export``: a training run's EMA parameters in the shared inference format.

An inference checkpoint (``adm_jax.checkpoints.inference``) holds only float32 EMA params plus
the reference constructor kwargs and diffusion kwargs, so sampling needs neither the optimizer
state nor this package's training config; plain Orbax restores its ``params/``.
"""

from __future__ import annotations

import os

from absl import logging

from adm_jax import paths, posthoc_ema
from adm_jax.checkpoints import inference as inference_lib
from adm_jax.checkpoints.restore import (
    abstract_params_of,
    inference_checkpoint_of,
    load_run_config,
    restore_inference,
)
from adm_jax.recipe import config as config_lib


def export_posthoc_ema(
    workdir, run_config, std: float, *, step=None, from_stds=None
) -> inference_lib.InferenceCheckpoint:
    """The EMA of relative std ``std`` reconstructed from the run's post-hoc EMA snapshots."""
    params, at_step = posthoc_ema.reconstruct(
        workdir, std, abstract_params_of(run_config), step=step, from_stds=from_stds
    )
    extra = {"step": at_step, "ema_rate": None, "ema_std": float(std), "source": str(workdir)}
    return inference_checkpoint_of(run_config, params, extra)


def export(config, workdir: str, out: str | None = None, *, ema_rate=None) -> str:
    """Writes the latest checkpoint's EMA params of ``workdir`` as an inference checkpoint
    (default ``WORKDIR/export/step_<N>``) and returns its path. With
    ``config.train.export_ema_std`` set, the EMA of that relative std is reconstructed from the
    post-hoc EMA snapshots instead (default ``WORKDIR/export/step_<N>_std<std>``). The model
    description comes from the config stored with the checkpoint (``config`` is used only if
    none is stored)."""
    workdir = paths.resolved(workdir)
    try:
        run_config = load_run_config(workdir)
    except Exception:  # noqa: BLE001 - fall back to the given config
        run_config = config
    std = config.train.get("export_ema_std")
    if std is not None:
        restored = export_posthoc_ema(workdir, run_config, float(std))
        out = out or posthoc_ema.default_export_path(workdir, restored.extra["step"], float(std))
    else:
        restored = restore_inference(workdir, ema_rate=ema_rate)
    step = restored.extra["step"]
    out = out or workdir / "export" / f"step_{step:08d}"
    inference_lib.save_inference_checkpoint(
        out,
        restored.params,
        kind=restored.kind,
        model_kwargs=restored.model_kwargs,
        diffusion_kwargs=config_lib.diffusion_kwargs(run_config),
        extra=restored.extra,
    )
    ema = restored.extra["ema_rate"] if std is None else f"std {std}"
    logging.info("Exported step %d (EMA %s) to %s", step, ema, out)
    return os.fspath(out)


__all__ = ["export", "export_posthoc_ema"]
