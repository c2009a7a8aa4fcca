"""Config checks and the objects a config describes (network, diffusion, optimiser sizes).

``validate_config`` runs before anything is built or compiled, so a typo or an impossible
value costs a one-line error naming the field instead of a TPU-hour: every name must exist in
``configs/default.py`` (model fields: the README flags of the model kind), and values are
checked against each other (batch vs device count, image sizes, learn_sigma, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections

from adm_jax import paths, posthoc_ema
from adm_jax.data import validate_data_config
from adm_jax.diffusion import create_diffusion
from adm_jax.models import (
    ATTENTION_IMPLS,
    REMAT_POLICIES,
    module_from_kwargs,
    reference_kwargs_from_flags,
    remat_policy_name,
    with_shape,
)
from adm_jax.recipe import default_config
from adm_jax.recipe.reader import ConfigError

MODEL_KINDS = ("unet", "superres", "classifier")
SCHEDULE_SAMPLERS = ("uniform", "loss-second-moment")
NOISE_SCHEDULES = ("linear", "cosine")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
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


def ema_rates(config) -> tuple[float, ...]:
    """config.train.ema_rate ("0.9999" or "0.9999,0.99" or "") as floats."""
    text = str(config.train.ema_rate).strip()
    return tuple(float(r) for r in text.split(",") if r.strip()) if text else ()


def posthoc_ema_stds(config) -> tuple[float, ...]:
    """config.train.posthoc_ema_stds ("0.05,0.10" or "") as floats: the power-function EMAs
    kept after the constant-rate ones in ``TrainState.ema_params``."""
    text = str(config.train.get("posthoc_ema_stds", "") or "").strip()
    return tuple(float(s) for s in text.split(",") if s.strip()) if text else ()


def num_emas(config) -> int:
    return len(ema_rates(config)) + len(posthoc_ema_stds(config))


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


def remat_policy(config) -> str:
    """config.train.remat as a policy name; the booleans of configs stored before the policies
    existed mean "full" (True) and "none" (False)."""
    return remat_policy_name(config.train.get("remat", "none"))


def attention_impl(config) -> str:
    """config.train.attention_impl ("auto" for configs stored before the field existed)."""
    return str(config.train.get("attention_impl", "auto"))


def build_model(config, **overrides):
    """The linen module for config.model with the training compute dtype and remat."""
    options = dict(
        dtype=DTYPES[config.train.dtype],
        remat=remat_policy(config),
        attention_impl=attention_impl(config),
    )
    options.update(overrides)
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
    _check_optimizer(config)
    _check_emas(config)
    _check_kernels(config)
    _check_batch(config, num_devices)
    _check_builds(config)


def _fail(field: str, problem: str):
    """Raises the one-line ConfigError of ``field``."""
    raise ConfigError(f"{field}: {problem}")


def _check_model_data_diffusion(config, mode: str | None) -> None:
    """The model fits the mode, the diffusion and the data."""
    m, d, data, t = config.model, config.diffusion, config.data, config.train
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
    init_from = str(t.get("init_from", "") or "")
    if init_from and not paths.is_remote(init_from) and not paths.path(init_from).exists():
        _fail("train.init_from", f"{init_from}: no such checkpoint or workdir")


def _check_optimizer(config) -> None:
    """Optimizer and loop sizes."""
    t = config.train
    positive = ("num_steps", "batch_size", "grad_accum_steps", "lr", "max_to_keep")
    for name in positive:
        if not t[name] > 0:
            _fail(f"train.{name}", f"must be > 0, got {t[name]}")
    non_negative = (
        "weight_decay", "warmup_steps", "lr_anneal_steps", "grad_clip", "log_every",
        "checkpoint_every", "eval_every", "eval_batches", "sample_every", "profile_steps",
        "max_consecutive_nonfinite", "num_sample_images", "eps",
    )  # fmt: skip
    for name in non_negative:
        if t[name] < 0:
            _fail(f"train.{name}", f"must be >= 0, got {t[name]}")
    for name in ("b1", "b2"):
        if not 0 <= t[name] < 1:
            _fail(f"train.{name}", f"must be in [0, 1), got {t[name]}")


def _check_emas(config) -> None:
    """train.ema_rate and the post-hoc EMA fields."""
    t = config.train
    try:
        rates = ema_rates(config)
    except ValueError:
        _fail("train.ema_rate", f"expected comma-separated floats, got {t.ema_rate!r}")
    if any(not 0 < r < 1 for r in rates):
        _fail("train.ema_rate", f"every rate must be in (0, 1), got {t.ema_rate!r}")
    try:
        stds = posthoc_ema_stds(config)
    except ValueError:
        _fail(
            "train.posthoc_ema_stds", f"expected comma-separated floats, got {t.posthoc_ema_stds!r}"
        )
    for std in stds:
        try:
            posthoc_ema.std_to_exp(std)
        except ValueError as err:
            _fail("train.posthoc_ema_stds", str(err))
    every = t.get("posthoc_ema_every", 0)
    if not isinstance(every, int) or every < 0:
        _fail("train.posthoc_ema_every", f"expected an integer >= 0, got {every!r}")
    if stds and not every:
        _fail("train.posthoc_ema_every", "must be > 0 when train.posthoc_ema_stds is set")
    if t.get("export_ema_std") is not None:
        try:
            posthoc_ema.std_to_exp(float(t.export_ema_std))
        except (TypeError, ValueError) as err:
            _fail("train.export_ema_std", str(err))


def _check_kernels(config) -> None:
    """Schedule sampler, compute dtype, attention kernel, remat policy."""
    t = config.train
    if t.schedule_sampler not in SCHEDULE_SAMPLERS:
        _fail("train.schedule_sampler", f"unknown {t.schedule_sampler!r}; {SCHEDULE_SAMPLERS}")
    if t.dtype == "float16":
        # float16 needs dynamic loss scaling (the reference's lg_loss_scale) or small gradients
        # underflow to zero silently; bfloat16 has float32's range, runs at the same speed on
        # every accelerator adm_jax targets (TPU v4+, A100/H100) and needs none.
        _fail("train.dtype", "float16 training is not supported (no loss scaling); use bfloat16")
    if t.dtype not in DTYPES:
        _fail("train.dtype", f"unknown {t.dtype!r}; {tuple(DTYPES)}")
    if attention_impl(config) not in ATTENTION_IMPLS:
        _fail(
            "train.attention_impl",
            f"unknown {t.attention_impl!r}; expected one of {ATTENTION_IMPLS}",
        )
    if remat_policy(config) not in REMAT_POLICIES:
        _fail("train.remat", f"unknown policy {t.remat!r}; expected one of {tuple(REMAT_POLICIES)}")


def _check_batch(config, num_devices: int | None) -> None:
    """The batch against the accumulation steps, the mesh and the devices."""
    t = config.train
    if t.lr_anneal_steps and t.warmup_steps >= t.lr_anneal_steps:
        _fail("train.warmup_steps", f"{t.warmup_steps} >= lr_anneal_steps {t.lr_anneal_steps}")
    if t.batch_size % t.grad_accum_steps:
        _fail("train.batch_size", f"{t.batch_size} not divisible by grad_accum_steps")
    if t.fsdp < 1:
        _fail("train.fsdp", f"must be >= 1, got {t.fsdp}")
    if num_devices is not None:
        if num_devices % t.fsdp:
            _fail("train.fsdp", f"{t.fsdp} does not divide the device count {num_devices}")
        micro = t.batch_size // t.grad_accum_steps
        if micro % num_devices:
            _fail(
                "train.batch_size",
                f"{t.batch_size} (/ grad_accum_steps {t.grad_accum_steps}) is not divisible by "
                f"the {num_devices} devices",
            )


def _check_builds(config) -> None:
    """Builds the network description (and the sample-grid diffusion) now: unknown README
    flag values fail here, not in jit."""
    m, t = config.model, config.train
    # Build the network description now: unknown README flag values fail here, not in jit.
    try:
        model_kwargs(config)
    except (ValueError, TypeError, AssertionError) as err:
        _fail("model", str(err))
    if m.kind != "classifier" and t.sample_every:
        try:
            build_diffusion(config, timestep_respacing=t.sample_respacing)
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
