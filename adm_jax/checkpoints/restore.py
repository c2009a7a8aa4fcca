"""Reading any checkpoint as an ``InferenceCheckpoint``: an inference checkpoint directory
(exported or converted) or a training workdir (its EMA parameters, or its parameters for
EMA-less classifier runs, with the model described by the config stored alongside).

``load_checkpoint`` is what sampling and ``--mode=nll`` call; ``restore_inference`` is what
``export`` and ``train.init_from`` call; ``load_run_config`` reads a run's stored config.
"""

from __future__ import annotations

import os

import jax
import ml_collections

from adm_jax import paths
from adm_jax.batch_sampler import replicate
from adm_jax.checkpoints import inference as inference_lib
from adm_jax.checkpoints import training
from adm_jax.models import abstract_params
from adm_jax.recipe import config as config_lib


def _ema_index(config, ema_rate: str | float | None) -> int | None:
    rates = config_lib.ema_rates(config)
    if not rates:
        return None
    if ema_rate is None or ema_rate == "":
        return 0
    return rates.index(float(ema_rate))


def abstract_params_of(config, sharding=None):
    """ShapeDtypeStructs of config.model's parameters, placed by ``sharding`` (default:
    replicated), for a restore straight into place."""
    if sharding is None:
        sharding = inference_lib.replicated_sharding()
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
        abstract_params(config_lib.build_model(config)),
    )


def inference_checkpoint_of(config, params, extra) -> inference_lib.InferenceCheckpoint:
    """``params`` of the model ``config`` describes, as an InferenceCheckpoint."""
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
    ckpt = training.Checkpointer(workdir, max_to_keep=None, async_save=False, read_only=True)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"checkpoint: no training checkpoint in {ckpt.directory}")
    params_abs = abstract_params_of(config, sharding)
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
    ckpt = training.Checkpointer(workdir, max_to_keep=None, async_save=False, read_only=True)
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
    if path.name == training.CHECKPOINT_DIR:
        path = path.parent
    config = load_run_config(path, step)
    params, step, rate = _restore_params(
        path, config, ema_rate=ema_rate, step=step, sharding=sharding
    )
    extra = {"step": int(step), "ema_rate": rate, "source": os.fspath(path)}
    return inference_checkpoint_of(config, params, extra)


def load_checkpoint(path: str, sharding: jax.sharding.NamedSharding | None = None):
    """An ``InferenceCheckpoint`` from an exported/converted checkpoint or a training workdir,
    its parameters laid out with ``sharding`` (a replicated one) when given."""
    if not path or not paths.path(path).exists():
        raise FileNotFoundError(f"checkpoint: {path!r} does not exist")
    if inference_lib.is_inference_checkpoint(path):
        ckpt = inference_lib.load_inference_checkpoint(path, sharding=sharding)
    else:
        ckpt = restore_inference(path, sharding=sharding)
    if sharding is not None:
        ckpt.params = replicate(ckpt.params, sharding)
    return ckpt


__all__ = ["load_checkpoint", "load_run_config", "restore_inference"]
