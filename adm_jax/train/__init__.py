"""Training: configs checks, sharded train state, jitted steps, loops (their Orbax checkpoints:
``adm_jax.checkpoints.training``).

Entry points (what ``adm_jax.main`` calls; a notebook can call them too):
``train_and_evaluate(config, workdir)``, ``train_classifier(config, workdir)``,
``export(config, workdir)``, and ``restore_inference(workdir_or_checkpoint)`` for samplers.

``export``, ``export_posthoc_ema``, ``restore_inference`` and ``load_run_config`` live in
``adm_jax.checkpoints`` (the layer below); they are named here as well for notebooks.
"""

from adm_jax.checkpoints.export import export, export_posthoc_ema
from adm_jax.checkpoints.restore import load_run_config, restore_inference
from adm_jax.recipe.config import (
    ConfigError,
    build_diffusion,
    build_model,
    diffusion_kwargs,
    ema_rates,
    model_kwargs,
    validate_config,
)
from adm_jax.train.loop import NonFiniteError, RunResult, train_and_evaluate, train_classifier
from adm_jax.train.sharding import create_mesh
from adm_jax.train.state import TrainState, create_train_state, make_optimizer

__all__ = [
    "ConfigError",
    "NonFiniteError",
    "RunResult",
    "TrainState",
    "build_diffusion",
    "build_model",
    "create_mesh",
    "create_train_state",
    "diffusion_kwargs",
    "ema_rates",
    "export",
    "export_posthoc_ema",
    "load_run_config",
    "make_optimizer",
    "model_kwargs",
    "restore_inference",
    "train_and_evaluate",
    "train_classifier",
    "validate_config",
]
