"""From a config to objects: read, check, and turn each section into typed settings.

The layer below train, sampling, evaluation and the benchmark: ``reader`` (``config_get``,
``ConfigError``), ``config`` (the model, diffusion and train sections: the field schema of
configs/default.py, ``validate_config``, the network and diffusion they describe) and
``sample`` (``read_sample`` -> ``SampleSettings``). Nothing here compiles or loads weights.
"""

from adm_jax.recipe.config import (
    build_diffusion,
    build_model,
    diffusion_kwargs,
    ema_rates,
    model_kwargs,
    validate_config,
)
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

__all__ = [
    "ConfigError",
    "SampleSettings",
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
    "read_sample",
    "sampler_spec",
    "to_dict",
    "validate_config",
]
