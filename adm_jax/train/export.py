"""``--mode=export`` and ``restore_inference``: EMA parameters in the shared inference format.

An inference checkpoint (``adm_jax.checkpoints``) holds only float32 EMA params plus the
reference constructor kwargs and diffusion kwargs, so sampling needs neither the optimizer
state nor this package's training config; plain Orbax restores its ``params/``.
"""

from __future__ import annotations

import os

import jax
import ml_collections
from absl import logging

from adm_jax import checkpoints as inference_lib
from adm_jax import paths, posthoc_ema
from adm_jax.models import abstract_params
from adm_jax.recipe import config as config_lib
from adm_jax.train import checkpointing


def _ema_index(config, ema_rate: str | float | None) -> int | None:
    rates = config_lib.ema_rates(config)
    if not rates:
        return None
    if ema_rate is None or ema_rate == "":
        return 0
    return rates.index(float(ema_rate))


def _abstract_params(config, sharding=None):
    """ShapeDtypeStructs of config.model's parameters, placed by ``sharding`` (default:
    replicated), for a restore straight into place."""
    if sharding is None:
        sharding = inference_lib.replicated_sharding()
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
        abstract_params(config_lib.build_model(config)),
    )


def _inference_checkpoint(config, params, extra) -> inference_lib.InferenceCheckpoint:
    return inference_lib.InferenceCheckpoint(
        kind=config.model.kind,
        model_kwargs=inference_lib._jsonable(config_lib.model_kwargs(config)),
        diffusion_kwargs=config_lib.diffusion_kwargs(config),
        params=params,
        extra=extra,
    )


def _restore_params(workdir: str, config, *, ema_rate=None, step=None, sharding=None):
    """(params, step, rate) from a training workdir: the EMA for ``ema_rate`` (default: the
    first configured rate), or the raw params when the run keeps no EMA (classifiers)."""
    ckpt = checkpointing.Checkpointer(workdir, max_to_keep=None, async_save=False, read_only=True)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"checkpoint: no training checkpoint in {ckpt.directory}")
    params_abs = _abstract_params(config, sharding)
    index = _ema_index(config, ema_rate)
    if index is None:
        tree = ckpt.restore_subtree({"params": params_abs}, step)
        params, rate = tree["params"], None
    else:
        # The EMA tuple is stored as a list, which partial restore cannot thin out.
        rates = config_lib.ema_rates(config)
        num = config_lib.num_emas(config)
        tree = ckpt.restore_subtree({"ema_params": [params_abs] * num}, step)
        params, rate = tree["ema_params"][index], rates[index]
    ckpt.close()
    return params, step, rate


def load_run_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
    """The config stored with a training checkpoint."""
    ckpt = checkpointing.Checkpointer(workdir, max_to_keep=None, async_save=False, read_only=True)
    try:
        return ml_collections.ConfigDict(ckpt.restore_config(step))
    finally:
        ckpt.close()


def restore_inference(
    path: str, *, ema_rate=None, step: int | None = None, sharding=None
) -> inference_lib.InferenceCheckpoint:
    """An InferenceCheckpoint from an inference checkpoint directory, or from a training
    workdir (its latest checkpoint's EMA params, or params for EMA-less classifier runs)."""
    path = paths.resolved(path)
    if inference_lib.is_inference_checkpoint(path):
        return inference_lib.load_inference_checkpoint(path, sharding=sharding)
    if path.name == checkpointing.CHECKPOINT_DIR:
        path = path.parent
    config = load_run_config(path, step)
    params, step, rate = _restore_params(
        path, config, ema_rate=ema_rate, step=step, sharding=sharding
    )
    extra = {"step": int(step), "ema_rate": rate, "source": os.fspath(path)}
    return _inference_checkpoint(config, params, extra)


def export_posthoc_ema(
    workdir, run_config, std: float, *, step=None, from_stds=None
) -> inference_lib.InferenceCheckpoint:
    """The EMA of relative std ``std`` reconstructed from the run's post-hoc EMA snapshots."""
    params, at_step = posthoc_ema.reconstruct(
        workdir, std, _abstract_params(run_config), step=step, from_stds=from_stds
    )
    extra = {"step": at_step, "ema_rate": None, "ema_std": float(std), "source": str(workdir)}
    return _inference_checkpoint(run_config, params, extra)


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


__all__ = ["export", "export_posthoc_ema", "load_run_config", "restore_inference"]
