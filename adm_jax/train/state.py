"""Train state and optimiser.

Everything that determines the next step lives in ``TrainState`` (a pytree of arrays), so
a checkpoint of it plus the data iterator position resumes a run bit-for-bit: parameters,
AdamW state (float32), one EMA per configured rate and post-hoc EMA std, the step, the base
RNG key (per-step keys are ``fold_in(rng, step)``), the importance sampler's loss history,
and the non-finite-step counters.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from adm_jax.checkpoints import replicated_sharding
from adm_jax.diffusion import loss_second_moment_init
from adm_jax.models import example_inputs
from adm_jax.recipe import config as config_lib
from adm_jax.recipe.train import TrainSettings, read_train
from adm_jax.train import sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: steps taken (skipped non-finite steps included)
    params: Any
    opt_state: Any
    # One params pytree per train.ema_rate entry, then one per train.posthoc_ema_stds entry.
    ema_params: tuple
    rng: jax.Array  # uint32[2] base key
    sampler_state: Any  # LossSecondMomentState for "loss-second-moment", else None
    skipped: jax.Array  # int32: total non-finite steps skipped
    nonfinite_streak: jax.Array  # int32: non-finite steps in a row ending at this step


def lr_schedule(settings: TrainSettings) -> optax.Schedule:
    """Linear warmup (optional) then constant, or linear decay to 0 at ``lr_anneal_steps``
    (the reference's ``lr * (1 - step / lr_anneal_steps)``). ``settings``: ``TrainSettings`` (a
    ``config.train`` section reads the same)."""
    lr = float(settings.lr)
    if settings.lr_anneal_steps:
        main = optax.linear_schedule(lr, 0.0, settings.lr_anneal_steps - settings.warmup_steps)
    else:
        main = optax.constant_schedule(lr)
    if not settings.warmup_steps:
        return main
    warm = optax.linear_schedule(0.0, lr, settings.warmup_steps)
    return optax.join_schedules([warm, main], [settings.warmup_steps])


def make_optimizer(settings: TrainSettings) -> optax.GradientTransformation:
    """AdamW with decoupled weight decay on every parameter (torch.optim.AdamW, as the
    reference), optional global-norm clipping; the learning rate is an injected
    hyperparameter so the logged value is the one applied. ``settings``: ``TrainSettings`` (a
    ``config.train`` section reads the same)."""

    def build(learning_rate):
        parts = []
        if settings.grad_clip:
            parts.append(optax.clip_by_global_norm(settings.grad_clip))
        parts.append(
            optax.adamw(
                learning_rate,
                b1=settings.b1,
                b2=settings.b2,
                eps=settings.eps,
                weight_decay=settings.weight_decay,
            )
        )
        return optax.chain(*parts)

    return optax.inject_hyperparams(build)(learning_rate=lr_schedule(settings))


def current_lr(opt_state) -> jax.Array:
    return opt_state.hyperparams["learning_rate"]


def _settings(config, settings: TrainSettings | None) -> TrainSettings:
    return read_train(config) if settings is None else settings


def make_init_fn(module, config, tx, settings: TrainSettings | None = None):
    """rng -> TrainState (pure; jit it with out_shardings to build it in place). ``config``
    gives the diffusion steps; ``settings`` the train section (default: ``read_train``)."""
    settings = _settings(config, settings)
    num_emas = settings.num_emas
    use_sampler = settings.schedule_sampler == "loss-second-moment"

    def init(rng):
        init_rng, state_rng = jax.random.split(rng)
        args, kwargs = example_inputs(module)  # zeros: x, t; y, low_res
        params = module.init(init_rng, *args, **kwargs)["params"]
        params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
        sampler_state = None
        if use_sampler:
            sampler_state = loss_second_moment_init(config.diffusion.steps)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            ema_params=tuple(params for _ in range(num_emas)),
            rng=state_rng,
            sampler_state=sampler_state,
            skipped=jnp.zeros((), jnp.int32),
            nonfinite_streak=jnp.zeros((), jnp.int32),
        )

    return init


def create_train_state(module, config, tx, mesh, settings: TrainSettings | None = None):
    """Builds the state directly into its shards: ``jax.jit(init, out_shardings=...)``, so no
    host or device ever holds a full unsharded copy of a large model.

    Returns (state, state_shardings).
    """
    settings = _settings(config, settings)
    init = make_init_fn(module, config, tx, settings)
    rng = jax.random.PRNGKey(settings.seed)
    abstract = jax.eval_shape(init, rng)
    shardings = state_shardings(abstract, mesh, settings)
    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)(rng)
    return state, shardings


def state_shardings(abstract_state, mesh, settings: TrainSettings):
    """The state's shardings: arrays of ``train.fsdp_min_size`` elements or more split over
    "fsdp"."""
    return sharding.tree_shardings(abstract_state, mesh, min_size=settings.fsdp_min_size)


def abstract_train_state(module, config, tx, mesh, settings: TrainSettings | None = None):
    """(ShapeDtypeStructs with shardings, shardings) of the state, without allocating."""
    settings = _settings(config, settings)
    init = make_init_fn(module, config, tx, settings)
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    shardings = state_shardings(abstract, mesh, settings)
    return (
        jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        ),
        shardings,
    )


def replicated_abstract_state(config):
    """ShapeDtypeStructs of the TrainState ``config`` trains, replicated on every device (a
    check needs every value, not the training mesh): ``--mode=verify``'s restore target."""
    settings = read_train(config)
    module = config_lib.build_model(config)
    init = make_init_fn(module, config, make_optimizer(settings), settings)
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    sharding = replicated_sharding()
    place = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)  # noqa: E731
    return jax.tree.map(place, abstract)
