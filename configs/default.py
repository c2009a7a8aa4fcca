"""Base config: every field any mode reads, with the reference's defaults.

The config lives in the package, ``adm_jax/recipe/default_config.py`` (so an installed adm_jax
has it); this module re-exports it for the variants, which import it as
``from configs import default`` and override a handful of fields.
"""

from adm_jax.recipe.default_config import (
    CLASSIFIER_FLAGS,
    DIFFUSION_MODEL_EXTRAS,
    SHAPE_EXTRAS,
    UNET_FLAGS,
    classifier_config,
    classifier_model,
    get_config,
    superres_model,
    unet_model,
)

__all__ = [
    "CLASSIFIER_FLAGS",
    "DIFFUSION_MODEL_EXTRAS",
    "SHAPE_EXTRAS",
    "UNET_FLAGS",
    "classifier_config",
    "classifier_model",
    "get_config",
    "superres_model",
    "unet_model",
]
