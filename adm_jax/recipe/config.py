"""Config checks and the objects a config describes (network, diffusion, optimiser sizes).

``validate_config`` runs before anything is built or compiled, so a typo or an impossible
value costs a one-line error naming the field instead of a TPU-hour: every name must exist in
``configs/default.py`` (model fields: the README flags of the model kind), and values are
checked against each other (batch vs device count, image sizes, learn_sigma, ...). The train
section's checks and accessors live in ``adm_jax.recipe.train`` (``read_train``); the
accessors are importable from here too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from adm_jax.data import validate_data_config
from adm_jax.diffusion import create_diffusion
from adm_jax.models import module_from_kwargs, reference_kwargs_from_flags, with_shape
from adm_jax.recipe import default_config
from adm_jax.recipe.reader import ConfigError
from adm_jax.recipe.train import (  # noqa: F401  (re-exported: the accessors' old home)
    DTYPES,
    SCHEDULE_SAMPLERS,
    attention_impl,
    check_init_from,
    check_train,
    ema_rates,
    module_options,
    num_emas,
    posthoc_ema_stds,
    remat_policy,
    train_fields,
)

MODEL_KINDS = ("unet", "superres", "classifier")
NOISE_SCHEDULES = ("linear", "cosine")
# config.model fields that are not README flags (configs/default.py DIFFUSION_MODEL_EXTRAS).
MODEL_EXTRAS = ("class_dropout_prob", "in_channels", "num_classes")


def _default_module():
    """The base config, adm_jax/recipe/default_config.py (configs/default.py re-exports it):
    part of the package, so an installed adm_jax validates configs without a checkout."""
    return default_config


def _model_schema(kind: str) -> dict[str, Any]:
    d = _default_module()
    if kind == "unet":
        return dict(d.unet_model())
    if kind == "superres":
        return dict(d.superres_model())
    return dict(d.classifier_model())


def model_flags(config) -> dict[str, Any]:
    """README flags of config.model (without ``kind`` and the non-flag MODEL_EXTRAS)."""
    flags = {k: v for k, v in config.model.items() if k != "kind" and k not in MODEL_EXTRAS}
    if config.model.kind == "classifier":
        flags.pop("channel_mult", None)
    return flags


def class_dropout_prob(config) -> float:
    """config.model.class_dropout_prob (0 when absent: configs stored before it existed)."""
    return float(config.model.get("class_dropout_prob", 0.0) or 0.0)


def model_kwargs(config) -> dict[str, Any]:
    """Reference constructor kwargs (what inference checkpoints store) for config.model.

    Label dropout (class_dropout_prob > 0) adds ``null_class_embedding=True``, so an exported
    checkpoint rebuilds the module with its null-label row; without it the kwargs are exactly
    the reference's.
    """
    kind = config.model.kind
    kwargs = with_shape(
        kind,
        _reference_model_kwargs(config),
        in_channels=in_channels(config),
        num_classes=num_classes(config),
    )
    if kind != "classifier" and class_dropout_prob(config) > 0:
        kwargs["null_class_embedding"] = True
    return kwargs


def in_channels(config) -> int:
    """config.model.in_channels (3 for configs stored before the field existed)."""
    return int(config.model.get("in_channels", 3))


def num_classes(config) -> int:
    """config.model.num_classes: the label range of a class-conditional model or classifier
    (1000, ImageNet's, for configs stored before the field existed)."""
    return int(config.model.get("num_classes", 1000))


def _reference_model_kwargs(config) -> dict[str, Any]:
    kind = config.model.kind
    flags = model_flags(config)
    if kind == "classifier" and config.model.get("channel_mult"):
        # Extension for tiny test configs: create_classifier only knows sizes 64..512, so
        # resolve the flags at 64 and substitute the size, channel_mult and attention ds.
        size = int(flags["image_size"])
        kwargs = reference_kwargs_from_flags(kind, {**flags, "image_size": 64})
        mult = tuple(float(m) for m in config.model.channel_mult.split(","))
        kwargs["channel_mult"] = tuple(int(m) if m == int(m) else m for m in mult)
        kwargs["image_size"] = size
        resolutions = str(flags["classifier_attention_resolutions"]).split(",")
        kwargs["attention_resolutions"] = tuple(size // int(r) for r in resolutions)
        return kwargs
    return reference_kwargs_from_flags(kind, flags)


def build_model(config, **overrides):
    """The linen module for config.model with the training compute dtype and remat."""
    options = {**module_options(config), **overrides}
    return module_from_kwargs(config.model.kind, model_kwargs(config), **options)


def diffusion_kwargs(config) -> dict[str, Any]:
    return {k: v for k, v in config.diffusion.items()}


def build_diffusion(config, **overrides):
    return create_diffusion(**{**diffusion_kwargs(config), **overrides})


def model_image_size(config) -> int:
    m = config.model
    return int(m.large_size if m.kind == "superres" else m.image_size)


def validate_config(config, *, num_devices: int | None = None, mode: str | None = None) -> None:
    """Raises ConfigError("<field>: <problem>") for the first unknown or impossible field.

    ``num_devices``: the global device count the run will use (checks batch and mesh sizes);
    ``mode``: "train" / "train_classifier" (checks the model kind fits the mode).
    """
    _check_names(config, _default_module().get_config())
    _check_model_data_diffusion(config, mode)
    check_init_from(config)  # the train section's checks: adm_jax.recipe.train
    check_train(config, num_devices)
    _check_builds(config)


def _fail(field: str, problem: str):
    """Raises the one-line ConfigError of ``field``."""
    raise ConfigError(f"{field}: {problem}")


def _check_model_data_diffusion(config, mode: str | None) -> None:
    """The model fits the mode, the diffusion and the data."""
    m, d, data = config.model, config.diffusion, config.data
    if mode == "train" and m.kind == "classifier":
        _fail("model.kind", "a classifier config needs --mode=train_classifier")
    if mode == "train_classifier" and m.kind != "classifier":
        _fail("model.kind", f"--mode=train_classifier needs a classifier config, got {m.kind!r}")
    if d.noise_schedule not in NOISE_SCHEDULES:
        _fail(
            "diffusion.noise_schedule", f"unknown schedule {d.noise_schedule!r}; {NOISE_SCHEDULES}"
        )
    if d.steps <= 0:
        _fail("diffusion.steps", f"must be positive, got {d.steps}")
    if m.kind != "classifier" and bool(m.learn_sigma) != bool(d.learn_sigma):
        _fail("diffusion.learn_sigma", f"{d.learn_sigma} but model.learn_sigma is {m.learn_sigma}")
    if data.image_size != model_image_size(config):
        field = "large_size" if m.kind == "superres" else "image_size"
        _fail(
            "data.image_size", f"{data.image_size} but model.{field} is {model_image_size(config)}"
        )
    if m.kind == "superres" and m.large_size % m.small_size:
        _fail("model.small_size", f"{m.small_size} does not divide large_size {m.large_size}")
    if m.kind != "classifier" and bool(m.class_cond) != bool(data.class_cond):
        _fail("data.class_cond", f"{data.class_cond} but model.class_cond is {m.class_cond}")
    if m.kind == "classifier" and not data.class_cond:
        _fail("data.class_cond", "a classifier needs labels (set it True)")
    if m.kind != "classifier":
        try:
            p_drop = class_dropout_prob(config)
        except (TypeError, ValueError):
            _fail("model.class_dropout_prob", f"expected a number, got {m.class_dropout_prob!r}")
        if not 0 <= p_drop < 1:
            _fail("model.class_dropout_prob", f"must be in [0, 1), got {p_drop}")
        if p_drop > 0 and not m.class_cond:
            _fail("model.class_dropout_prob", f"{p_drop} needs model.class_cond (labels to drop)")
    try:
        validate_data_config(data)
    except ValueError as err:
        _fail("data", str(err))
    for name in ("in_channels", "num_classes"):
        value = m.get(name, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            _fail(f"model.{name}", f"expected a positive integer, got {value!r}")
    if data.channels != in_channels(config):
        _fail(
            "data.channels",
            f"{data.channels} but model.in_channels is {in_channels(config)} (set both: 1 for "
            "grey images, 3 for RGB)",
        )


def _check_builds(config) -> None:
    """Builds the network description (and the sample-grid diffusion) now: unknown README
    flag values fail here, not in jit."""
    t = train_fields(config)
    try:
        model_kwargs(config)
    except (ValueError, TypeError, AssertionError) as err:
        _fail("model", str(err))
    if config.model.kind != "classifier" and t["sample_every"]:
        try:
            build_diffusion(config, timestep_respacing=t["sample_respacing"])
        except (ValueError, AssertionError) as err:
            _fail("train.sample_respacing", str(err))


def _check_names(config, default) -> None:
    for section in config:
        if section not in default:
            raise ConfigError(f"{section}: unknown config section; expected {sorted(default)}")
    for section in default:
        if section not in config:
            raise ConfigError(f"{section}: missing config section")
    kind = config.model.get("kind")
    if kind not in MODEL_KINDS:
        raise ConfigError(f"model.kind: expected one of {MODEL_KINDS}, got {kind!r}")
    schema = {"model": _model_schema(kind)}
    for section in default:
        allowed = schema.get(section, default[section])
        given = config[section]
        if not isinstance(given, (Mapping, ml_collections.ConfigDict)):
            raise ConfigError(f"{section}: expected a ConfigDict, got {type(given).__name__}")
        for name in given:
            if name not in allowed:
                raise ConfigError(f"{section}.{name}: unknown field for this config")


def config_to_dict(config) -> dict[str, Any]:
    """JSON-able nested dict (stored next to every checkpoint)."""
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)
