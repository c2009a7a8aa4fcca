"""From a config to objects: read, check, and turn each section into typed settings.

The layer below checkpoints, train, sampling, evaluation and the benchmark. A section is read
and checked in one place, and what the rest of the code receives is its typed settings:

- ``reader``: ``config_get`` / ``config_text`` (the one accessor) and ``ConfigError``;
- ``config``: the model, diffusion and data sections (the field schema,
  ``validate_config``, the network and diffusion they describe);
- ``train``: ``read_train`` -> ``TrainSettings`` (optimizer, EMAs, batch, kernels, periodic
  work); its checks are the train part of ``validate_config``;
- ``sample``: ``read_sample`` -> ``SampleSettings`` (sampler, guidance, labels, counts);
- ``sweep``: ``read_sweep`` -> ``SweepSettings`` (the guidance sweep's scales and grid);
- ``edit``: ``read_edit`` -> ``EditSettings``;
- ``evaluate``: ``read_evaluate`` -> ``EvaluateSettings``, ``read_nll`` -> ``NllSettings``.

Nothing here compiles, loads weights or reads data.
"""

from adm_jax.recipe.config import (
    build_diffusion,
    build_model,
    diffusion_kwargs,
    ema_rates,
    model_kwargs,
    validate_config,
)
from adm_jax.recipe.edit import EditSettings, read_edit
from adm_jax.recipe.evaluate import EvaluateSettings, NllSettings, read_evaluate, read_nll
from adm_jax.recipe.reader import ConfigError, config_get, config_text, to_dict
from adm_jax.recipe.sample import (
    SampleSettings,
    cfg_scale_of,
    check_scale,
    parse_class_labels,
    parse_sampler,
    read_sample,
    sampler_spec,
)
from adm_jax.recipe.sweep import SweepSettings, read_sweep
from adm_jax.recipe.train import TrainSettings, read_train

__all__ = [
    "ConfigError",
    "EditSettings",
    "EvaluateSettings",
    "NllSettings",
    "SampleSettings",
    "SweepSettings",
    "TrainSettings",
    "build_diffusion",
    "cfg_scale_of",
    "check_scale",
    "build_model",
    "config_get",
    "config_text",
    "diffusion_kwargs",
    "ema_rates",
    "model_kwargs",
    "parse_class_labels",
    "parse_sampler",
    "read_edit",
    "read_evaluate",
    "read_nll",
    "read_sample",
    "read_sweep",
    "read_train",
    "sampler_spec",
    "to_dict",
    "validate_config",
]
