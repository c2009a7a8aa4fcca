"""``config.train`` read and checked once, into ``TrainSettings``.

The train loops, the train state, the train steps and the benchmark's train step receive a
``TrainSettings``; nothing above this module reads ``config.train`` again. A field is checked
here (``check_train``, which ``validate_config`` runs in its place among the other sections'
checks) and keeps its config name down to the step: ``train.grad_accum_steps`` is
``TrainSettings.grad_accum_steps`` is the length of the step's microbatch ``lax.scan``.

Configs stored next to old checkpoints may lack newer fields; a missing field reads as the base
config's default (``adm_jax/recipe/default_config.py``), so they read as they always did.
Bad values are one-line ``ConfigError``s naming the field, raised before anything is built.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax.numpy as jnp

from adm_jax import paths, posthoc_ema
from adm_jax.models import ATTENTION_IMPLS, REMAT_POLICIES, remat_policy_name
from adm_jax.recipe import default_config
from adm_jax.recipe.reader import ConfigError, config_get, to_dict

SCHEDULE_SAMPLERS = ("uniform", "loss-second-moment")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The ``train`` section, checked; each field is the config field of the same name (see
    ``default_config._train_section`` for what each means). ``ema_rate`` and
    ``posthoc_ema_stds`` are the comma-separated lists as floats; ``dtype`` is the compute
    dtype's name (``DTYPES[dtype]`` is the jnp dtype); ``remat`` is the policy name (the
    booleans of old configs read as "full" / "none")."""

    seed: int = 0
    num_steps: int = 500_000
    batch_size: int = 256
    grad_accum_steps: int = 1
    lr: float = 1e-4
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_anneal_steps: int = 0
    grad_clip: float = 0.0
    ema_rate: tuple[float, ...] = (0.9999,)
    posthoc_ema_stds: tuple[float, ...] = ()
    posthoc_ema_every: int = 0
    export_ema_std: float | None = None
    schedule_sampler: str = "uniform"
    noised: bool = True
    dtype: str = "bfloat16"
    remat: str = "none"
    attention_impl: str = "auto"
    fsdp: int = 1
    fsdp_min_size: int = 2**18
    max_consecutive_nonfinite: int = 20
    log_every: int = 100
    checkpoint_every: int = 5_000
    max_to_keep: int = 3
    async_checkpointing: bool = True
    eval_every: int = 5_000
    eval_batches: int = 4
    sample_every: int = 20_000
    num_sample_images: int = 16
    sample_respacing: str = "ddim50"
    profile_steps: int = 0
    tensorboard: bool = True
    init_from: str = ""

    @property
    def microbatch(self) -> int:
        """The global batch of one microbatch: ``batch_size // grad_accum_steps``."""
        return self.batch_size // self.grad_accum_steps

    @property
    def num_emas(self) -> int:
        """``TrainState.ema_params`` entries: one per ``ema_rate``, then one per
        ``posthoc_ema_stds``."""
        return len(self.ema_rate) + len(self.posthoc_ema_stds)


def train_fields(config: Any) -> dict[str, Any]:
    """``config.train`` as a plain dict, the base config's default in place of each missing
    field (configs stored before the field existed)."""
    return {**_defaults(), **to_dict(config_get(config, "train"))}


@functools.cache
def _defaults() -> dict[str, Any]:
    return default_config.get_config().train.to_dict()


def float_list(text: Any) -> tuple[float, ...]:
    """A comma-separated list of floats ("0.9999,0.99"; "" or None: none). ValueError if an
    entry is not a number."""
    text = "" if text is None else str(text).strip()
    return tuple(float(r) for r in text.split(",") if r.strip()) if text else ()


def ema_rates(config) -> tuple[float, ...]:
    """config.train.ema_rate ("0.9999" or "0.9999,0.99" or "") as floats."""
    return float_list(train_fields(config)["ema_rate"])


def posthoc_ema_stds(config) -> tuple[float, ...]:
    """config.train.posthoc_ema_stds ("0.05,0.10" or "") as floats: the power-function EMAs
    kept after the constant-rate ones in ``TrainState.ema_params``."""
    return float_list(train_fields(config)["posthoc_ema_stds"])


def num_emas(config) -> int:
    return len(ema_rates(config)) + len(posthoc_ema_stds(config))


def remat_policy(config) -> str:
    """config.train.remat as a policy name; the booleans of configs stored before the policies
    existed mean "full" (True) and "none" (False)."""
    return remat_policy_name(train_fields(config)["remat"])


def attention_impl(config) -> str:
    """config.train.attention_impl ("auto" for configs stored before the field existed)."""
    return str(train_fields(config)["attention_impl"])


def module_options(config) -> dict[str, Any]:
    """The network options of the train section: compute dtype, remat policy, attention kernel
    (what ``build_model`` passes to the module)."""
    return dict(
        dtype=DTYPES[train_fields(config)["dtype"]],
        remat=remat_policy(config),
        attention_impl=attention_impl(config),
    )


def read_train(config: Any, *, num_devices: int | None = None) -> TrainSettings:
    """``config.train`` checked (``check_train``) and read as ``TrainSettings``."""
    check_train(config, num_devices)
    t = train_fields(config)
    ints = (
        "seed", "num_steps", "batch_size", "grad_accum_steps", "warmup_steps", "lr_anneal_steps",
        "posthoc_ema_every", "fsdp", "fsdp_min_size", "max_consecutive_nonfinite", "log_every",
        "checkpoint_every", "max_to_keep", "eval_every", "eval_batches", "sample_every",
        "num_sample_images", "profile_steps",
    )  # fmt: skip
    floats = ("lr", "b1", "b2", "eps", "weight_decay", "grad_clip")
    bools = ("noised", "async_checkpointing", "tensorboard")
    texts = ("schedule_sampler", "dtype", "attention_impl", "sample_respacing", "init_from")
    export_std = t["export_ema_std"]
    return TrainSettings(
        **{name: int(t[name]) for name in ints},
        **{name: float(t[name]) for name in floats},
        **{name: bool(t[name]) for name in bools},
        **{name: "" if t[name] is None else str(t[name]) for name in texts},
        ema_rate=float_list(t["ema_rate"]),
        posthoc_ema_stds=float_list(t["posthoc_ema_stds"]),
        export_ema_std=None if export_std is None else float(export_std),
        remat=remat_policy_name(t["remat"]),
    )


def check_train(config: Any, num_devices: int | None = None) -> None:
    """Raises ConfigError("train.<field>: <problem>") for the first impossible train field;
    ``num_devices`` (the run's global device count) also checks the batch and the mesh."""
    t = train_fields(config)
    _check_optimizer(t)
    _check_emas(t)
    _check_kernels(t)
    _check_batch(t, num_devices)


def _fail(field: str, problem: str):
    """Raises the one-line ConfigError of ``field``."""
    raise ConfigError(f"{field}: {problem}")


def check_init_from(config: Any) -> None:
    """train.init_from names a checkpoint or workdir that exists (remote paths are not looked
    up here). Not part of ``read_train``: a stored config's source may be long gone."""
    init_from = str(train_fields(config)["init_from"] or "")
    if init_from and not paths.is_remote(init_from) and not paths.path(init_from).exists():
        _fail("train.init_from", f"{init_from}: no such checkpoint or workdir")


def _check_optimizer(t: dict[str, Any]) -> None:
    """Optimizer and loop sizes."""
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


def _check_emas(t: dict[str, Any]) -> None:
    """train.ema_rate and the post-hoc EMA fields."""
    try:
        rates = float_list(t["ema_rate"])
    except ValueError:
        _fail("train.ema_rate", f"expected comma-separated floats, got {t['ema_rate']!r}")
    if any(not 0 < r < 1 for r in rates):
        _fail("train.ema_rate", f"every rate must be in (0, 1), got {t['ema_rate']!r}")
    try:
        stds = float_list(t["posthoc_ema_stds"])
    except ValueError:
        _fail(
            "train.posthoc_ema_stds",
            f"expected comma-separated floats, got {t['posthoc_ema_stds']!r}",
        )
    for std in stds:
        try:
            posthoc_ema.std_to_exp(std)
        except ValueError as err:
            _fail("train.posthoc_ema_stds", str(err))
    every = t["posthoc_ema_every"]
    if not isinstance(every, int) or every < 0:
        _fail("train.posthoc_ema_every", f"expected an integer >= 0, got {every!r}")
    if stds and not every:
        _fail("train.posthoc_ema_every", "must be > 0 when train.posthoc_ema_stds is set")
    if t["export_ema_std"] is not None:
        try:
            posthoc_ema.std_to_exp(float(t["export_ema_std"]))
        except (TypeError, ValueError) as err:
            _fail("train.export_ema_std", str(err))


def _check_kernels(t: dict[str, Any]) -> None:
    """Schedule sampler, compute dtype, attention kernel, remat policy."""
    if t["schedule_sampler"] not in SCHEDULE_SAMPLERS:
        _fail("train.schedule_sampler", f"unknown {t['schedule_sampler']!r}; {SCHEDULE_SAMPLERS}")
    if t["dtype"] == "float16":
        # float16 needs dynamic loss scaling (the reference's lg_loss_scale) or small gradients
        # underflow to zero silently; bfloat16 has float32's range, runs at the same speed on
        # every accelerator adm_jax targets (TPU v4+, A100/H100) and needs none.
        _fail("train.dtype", "float16 training is not supported (no loss scaling); use bfloat16")
    if t["dtype"] not in DTYPES:
        _fail("train.dtype", f"unknown {t['dtype']!r}; {tuple(DTYPES)}")
    if str(t["attention_impl"]) not in ATTENTION_IMPLS:
        _fail(
            "train.attention_impl",
            f"unknown {t['attention_impl']!r}; expected one of {ATTENTION_IMPLS}",
        )
    if remat_policy_name(t["remat"]) not in REMAT_POLICIES:
        _fail(
            "train.remat", f"unknown policy {t['remat']!r}; expected one of {tuple(REMAT_POLICIES)}"
        )


def _check_batch(t: dict[str, Any], num_devices: int | None) -> None:
    """The batch against the accumulation steps, the mesh and the devices."""
    batch, accum, fsdp = t["batch_size"], t["grad_accum_steps"], t["fsdp"]
    if t["lr_anneal_steps"] and t["warmup_steps"] >= t["lr_anneal_steps"]:
        _fail(
            "train.warmup_steps", f"{t['warmup_steps']} >= lr_anneal_steps {t['lr_anneal_steps']}"
        )
    if batch % accum:
        _fail("train.batch_size", f"{batch} not divisible by grad_accum_steps")
    if fsdp < 1:
        _fail("train.fsdp", f"must be >= 1, got {fsdp}")
    if num_devices is not None:
        if num_devices % fsdp:
            _fail("train.fsdp", f"{fsdp} does not divide the device count {num_devices}")
        if (batch // accum) % num_devices:
            _fail(
                "train.batch_size",
                f"{batch} (/ grad_accum_steps {accum}) is not divisible by the {num_devices} "
                "devices",
            )
