"""Every checkpoint this project reads or writes, and the one check that it fits a config.

* ``inference``: the inference format (``DIR/params/`` + ``DIR/model.json``) that
  ``--mode=export``, the reference-checkpoint converter and the sampler share;
* ``training``: a training run's Orbax checkpoints, ``WORKDIR/checkpoints/<step>/`` (the
  TrainState, the input position, the config), with retention and one-line save errors;
* ``restore``: any of those as an ``InferenceCheckpoint`` (``load_checkpoint``,
  ``restore_inference``) and a run's stored config (``load_run_config``);
* ``compat``: whether a checkpoint fits a config (sampling, ``--mode=nll``, ``--mode=verify``
  and ``train.init_from`` all ask it);
* ``export``: ``--mode=export`` (a run's EMA, or a post-hoc EMA, as an inference checkpoint);
* ``init_from``: ``train.init_from``, a run's start from another model's parameters;
* ``tools``: listing a workdir's checkpoints and verifying one (``--mode=checkpoints`` /
  ``--mode=verify``).

The layer sits above ``recipe``, ``models``, ``diffusion``, ``paths`` and ``posthoc_ema`` and
below ``train`` and ``sampling``: it builds models from configs but never trains or samples.
"""

from adm_jax.checkpoints.compat import check_matches_config
from adm_jax.checkpoints.inference import (
    KINDS,
    MODEL_JSON,
    PARAMS_DIR,
    InferenceCheckpoint,
    is_inference_checkpoint,
    load_inference_checkpoint,
    replicated_sharding,
    save_inference_checkpoint,
)
from adm_jax.checkpoints.restore import load_checkpoint, load_run_config, restore_inference
from adm_jax.checkpoints.training import Checkpointer, CheckpointSaveError

__all__ = [
    "KINDS",
    "MODEL_JSON",
    "PARAMS_DIR",
    "CheckpointSaveError",
    "Checkpointer",
    "InferenceCheckpoint",
    "check_matches_config",
    "is_inference_checkpoint",
    "load_checkpoint",
    "load_inference_checkpoint",
    "load_run_config",
    "replicated_sharding",
    "restore_inference",
    "save_inference_checkpoint",
]
