"""The jitted train/eval steps for the diffusion model and the noisy classifier.

One step = one optimizer update on one global batch (sharded over ("data", "fsdp")); with
``grad_accum_steps`` > 1 the batch is split into strided microbatches that a ``lax.scan``
walks inside the same compiled program (the reference's --microbatch). Gradients are the
mean over the whole batch (the reference sums microbatch gradients for the diffusion model;
identical when there is one microbatch, which is how every published model was trained).

A non-finite loss or gradient norm leaves params, EMA, optimizer and sampler state exactly as
they were (one ``lax.cond`` on an ``ok`` flag); the step counter still advances (the batch is
consumed) and ``skipped`` / ``nonfinite_streak`` count the event.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from adm_jax import diffusion as dlib
from adm_jax import posthoc_ema
from adm_jax.recipe import config as config_lib
from adm_jax.recipe.train import TrainSettings, read_train
from adm_jax.train import sharding as sharding_lib
from adm_jax.train.state import TrainState, current_lr

# Number of times each step function was traced (tests assert a step traces once).
TRACE_COUNTS: dict[str, int] = {}


def _count_trace(name: str) -> None:
    TRACE_COUNTS[name] = TRACE_COUNTS.get(name, 0) + 1


def step_keys(state: TrainState):
    """(t_key, noise_key, dropout_key) for this step, independent of the device layout."""
    return jax.random.split(jax.random.fold_in(state.rng, state.step), 3)


def label_dropout_key(state: TrainState):
    """Key for classifier-free label dropout: a stream beside ``step_keys``, which it leaves
    unchanged, so runs without label dropout stay bitwise what they were."""
    return jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 3)


def drop_labels(key, labels, prob: float, null_label: int):
    """Each label becomes ``null_label`` with probability ``prob`` (classifier-free guidance
    training, Ho & Salimans 2022: one network learns the conditional and the unconditional
    model)."""
    dropped = jax.random.bernoulli(key, prob, labels.shape)
    return jnp.where(dropped, jnp.asarray(null_label, labels.dtype), labels)


def area_downsample(x, size: int):
    """F.interpolate(mode="area") for integer factors: the upsampler's low_res input
    (reference super_res_train.py)."""
    b, h, w, c = x.shape
    f = h // size
    return x.reshape(b, size, f, size, f, c).mean(axis=(2, 4))


def low_res_size(config) -> int | None:
    """Size of the upsampler's low-resolution input (None for other models)."""
    return int(config.model.small_size) if config.model.kind == "superres" else None


def model_kwargs_from_batch(module, batch, low_res: int | None = None) -> dict:
    """Conditioning inputs of the network for a batch: y (class_cond), low_res (superres:
    the batch area-downsampled to ``low_res`` pixels)."""
    kwargs = {}
    if getattr(module, "num_classes", None) is not None:
        kwargs["y"] = batch["label"]
    if low_res is not None:
        kwargs["low_res"] = area_downsample(batch["image"], low_res)
    return kwargs


def quartile_sums(values: dict, t, num_timesteps: int) -> dict:
    """Per-quartile sums and counts of per-example values (reference ``log_loss_dict``:
    quartile = int(4 * t / T)), to be averaged on the host over a logging interval."""
    q = jnp.clip((4 * t) // num_timesteps, 0, 3)
    onehot = jax.nn.one_hot(q, 4, dtype=jnp.float32)  # (B, 4)
    out = {"q_count": onehot.sum(0)}
    for name, v in values.items():
        out[f"q_sum/{name}"] = (onehot * v.astype(jnp.float32)[:, None]).sum(0)
    return out


def _split_microbatches(tree, k: int):
    """(B, ...) -> (k, B/k, ...) with microbatch j = rows j, j+k, ...: every microbatch stays
    spread over all devices (a contiguous split would put each on a subset of devices)."""

    def split(x):
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:])
        x = jnp.swapaxes(x, 0, 1)
        return jax.lax.with_sharding_constraint(x, P(None, sharding_lib.BATCH_AXES))

    return jax.tree.map(split, tree)


def _merge_microbatches(tree):
    def merge(x):
        x = jnp.swapaxes(x, 0, 1)
        return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])

    return jax.tree.map(merge, tree)


def _accumulate_grads(loss_and_aux: Callable, params, inputs, k: int):
    """Mean gradient over k microbatches of ``inputs`` (a dict of (B, ...) arrays) with one
    ``lax.scan``; returns (mean loss, grads, per-example aux merged back to (B, ...))."""
    grad_fn = jax.value_and_grad(loss_and_aux, has_aux=True)
    if k == 1:
        (loss, aux), grads = grad_fn(params, inputs, 0)
        return loss, grads, aux
    micro = _split_microbatches(inputs, k)

    def body(carry, xs):
        i, mb = xs
        (loss, aux), grads = grad_fn(params, mb, i)
        acc_loss, acc_grads = carry
        return (acc_loss + loss, jax.tree.map(jnp.add, acc_grads, grads)), aux

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss, grads), aux = jax.lax.scan(body, (jnp.zeros(()), zeros), (jnp.arange(k), micro))
    grads = jax.tree.map(lambda g: g / k, grads)
    return loss / k, grads, _merge_microbatches(aux)


def ema_decays(settings: TrainSettings) -> tuple:
    """One decay per ``TrainState.ema_params`` entry: the constant ``train.ema_rate`` values
    (Python floats, folded into the program), then a function of the step for each post-hoc
    power EMA (``train.posthoc_ema_stds``)."""
    constant = settings.ema_rate
    powers = tuple(
        functools.partial(posthoc_ema.power_decay, gamma=posthoc_ema.std_to_exp(std))
        for std in settings.posthoc_ema_stds
    )
    return constant + powers


def _apply_update(state: TrainState, tx, grads, ok, ema_rates, sampler_state):
    """AdamW update + EMA, all kept unchanged when ``ok`` is False.

    One ``lax.cond`` rather than a ``where`` per leaf: a skipped step then runs nothing, and
    the update writes the donated buffers in place (on XLA:CPU the per-leaf selects cost a copy
    of every parameter and Adam moment per step: the demo UNet's step took 174 ms, now 167)."""

    def update(_):
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        decays = [r(state.step + 1) if callable(r) else r for r in ema_rates]
        new_ema = tuple(
            jax.tree.map(lambda e, p, r=r: r * e + (1.0 - r) * p, ema, new_params)
            for r, ema in zip(decays, state.ema_params, strict=True)
        )
        return new_params, new_opt, new_ema, sampler_state

    def keep(_):
        return state.params, state.opt_state, state.ema_params, state.sampler_state

    params, opt_state, ema_params, sampler_state = jax.lax.cond(ok, update, keep, None)
    streak = jnp.where(ok, 0, state.nonfinite_streak + 1)
    return state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        ema_params=ema_params,
        sampler_state=sampler_state,
        skipped=state.skipped + jnp.where(ok, 0, 1).astype(jnp.int32),
        nonfinite_streak=streak.astype(jnp.int32),
    )


def make_diffusion_train_step(module, diffusion, tx, config, settings: TrainSettings | None = None):
    """(state, batch) -> (state, metrics): hybrid loss (adm_jax.diffusion.training_losses)
    at t from the configured timestep sampler, weighted by its importance weights; class
    labels go to class-conditional models (as the reference's image_train.py), each replaced
    by ``module.null_label`` with probability model.class_dropout_prob. ``config`` gives the
    model section; ``settings`` the train section (default: ``read_train(config)``)."""
    p_drop = config_lib.class_dropout_prob(config)
    null_label = getattr(module, "null_label", None)
    if p_drop > 0 and null_label is None:
        raise ValueError(
            f"model.class_dropout_prob: {p_drop} needs a module with a null-label embedding "
            "(build it with adm_jax.train.build_model)"
        )
    settings = read_train(config) if settings is None else settings
    rates = ema_decays(settings)
    importance = settings.schedule_sampler == "loss-second-moment"
    k = settings.grad_accum_steps
    T = diffusion.num_timesteps
    small = low_res_size(config)

    def train_step(state: TrainState, batch):
        _count_trace("diffusion_train")
        x = batch["image"].astype(jnp.float32)
        bsz = x.shape[0]
        t_key, noise_key, dropout_key = step_keys(state)
        if importance:
            weights = dlib.loss_second_moment_weights(state.sampler_state)
            t, w = dlib.importance_sample_timesteps(t_key, weights, bsz)
        else:
            t, w = dlib.uniform_sample_timesteps(t_key, T, bsz)
        noise = jax.random.normal(noise_key, x.shape, jnp.float32)
        if p_drop > 0:
            labels = drop_labels(label_dropout_key(state), batch["label"], p_drop, null_label)
            batch = {**batch, "label": labels}
        inputs = {"x": x, "t": t, "w": w, "noise": noise, **batch}
        inputs.pop("image")

        def loss_fn(params, mb, i):
            cond = model_kwargs_from_batch(module, {"image": mb["x"], **mb}, small)
            rng = jax.random.fold_in(dropout_key, i)

            def model_fn(x_t, ts):
                return module.apply(
                    {"params": params}, x_t, ts, **cond, train=True, rngs={"dropout": rng}
                )

            terms = dlib.training_losses(diffusion, model_fn, mb["x"], mb["t"], mb["noise"])
            loss = jnp.mean(terms["loss"] * mb["w"])
            return loss, {name: v * mb["w"] for name, v in terms.items()}

        loss, grads, terms = _accumulate_grads(loss_fn, state.params, inputs, k)
        grad_norm = optax.global_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        sampler_state = state.sampler_state
        if importance:
            # The reference updates with the unweighted per-example losses of the batch.
            raw = terms["loss"] / w
            sampler_state = dlib.loss_second_moment_update(sampler_state, t, raw)
        new_state = _apply_update(state, tx, grads, ok, rates, sampler_state)
        return new_state, _step_metrics(state, new_state, loss, terms, grad_norm, ok, t, T)

    return train_step


def _step_metrics(state, new_state, loss, terms, grad_norm, ok, t, T):
    """Per-step scalars both train steps log: loss, the batch means of the other terms (mse, vb
    or acc@1/@5), optimisation health, and the per-timestep-quartile sums."""
    return {
        "loss": loss,
        **{name: jnp.mean(v) for name, v in terms.items() if name != "loss"},
        "grad_norm": grad_norm,
        "lr": current_lr(state.opt_state),
        "finite": ok.astype(jnp.float32),
        "skipped": new_state.skipped,
        "nonfinite_streak": new_state.nonfinite_streak,
        **quartile_sums(terms, t, T),
    }


def make_classifier_train_step(
    module, diffusion, tx, config, settings: TrainSettings | None = None
):
    """(state, batch) -> (state, metrics) for the noisy classifier (reference
    classifier_train.py): x_t = q_sample(x_0, t) at uniformly random t (if train.noised),
    cross-entropy, acc@1 / acc@5, per-quartile logging. ``settings``: the train section
    (default: ``read_train(config)``)."""
    settings = read_train(config) if settings is None else settings
    rates = ema_decays(settings)
    k = settings.grad_accum_steps
    noised = settings.noised
    T = diffusion.num_timesteps

    def train_step(state: TrainState, batch):
        _count_trace("classifier_train")
        x = batch["image"].astype(jnp.float32)
        t_key, noise_key, dropout_key = step_keys(state)
        t, x_t = noised_inputs(diffusion, x, t_key, noise_key, noised=noised)
        inputs = {"x": x_t, "t": t, "label": batch["label"]}

        def loss_fn(params, mb, i):
            logits = module.apply(
                {"params": params},
                mb["x"],
                dlib.model_timesteps(diffusion, mb["t"]),
                train=True,
                rngs={"dropout": jax.random.fold_in(dropout_key, i)},
            )
            terms = classification_terms(logits, mb["label"])
            return jnp.mean(terms["loss"]), terms

        loss, grads, terms = _accumulate_grads(loss_fn, state.params, inputs, k)
        grad_norm = optax.global_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = _apply_update(state, tx, grads, ok, rates, state.sampler_state)
        return new_state, _step_metrics(state, new_state, loss, terms, grad_norm, ok, t, T)

    return train_step


def jit_train_step(
    module,
    diffusion,
    tx,
    config,
    state_shardings,
    mesh,
    *,
    classifier: bool,
    settings: TrainSettings | None = None,
):
    """The train step as the train loop runs it: state and batch shardings on ``mesh``,
    replicated metrics, donated state. The loop, the benchmark and the tests all call this.
    ``settings``: the train section (default: ``read_train(config)``)."""
    make_step = make_classifier_train_step if classifier else make_diffusion_train_step
    return jax.jit(
        make_step(module, diffusion, tx, config, settings),
        in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
        donate_argnums=(0,),
    )


def noised_inputs(diffusion, x, t_key, noise_key, *, noised: bool = True):
    """(t, x_t) for classifier training: t ~ U{0..T-1}; x_t = x_0 (t = 0) when not noised."""
    bsz = x.shape[0]
    if not noised:
        return jnp.zeros((bsz,), jnp.int32), x
    t, _ = dlib.uniform_sample_timesteps(t_key, diffusion.num_timesteps, bsz)
    noise = jax.random.normal(noise_key, x.shape, jnp.float32)
    return t, dlib.q_sample(diffusion, x, t, noise)


def classification_terms(logits, labels) -> dict:
    """Per-example cross-entropy, acc@1, acc@5 (reference compute_top_k)."""
    logits = logits.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    hit = top5 == labels[:, None]
    return {
        "loss": loss,
        "acc@1": hit[:, 0].astype(jnp.float32),
        "acc@5": hit.any(-1).astype(jnp.float32),
    }


def _masked_sums(terms: dict, batch) -> dict:
    """Sums over real examples (eval batches pad with mask=False) plus their count."""
    mask = batch.get("mask")
    n = terms["loss"].shape[0]
    mask = jnp.ones((n,), jnp.float32) if mask is None else mask.astype(jnp.float32)
    out = {name: jnp.sum(v * mask) for name, v in terms.items()}
    out["count"] = jnp.sum(mask)
    return out


def make_diffusion_eval_step(module, diffusion, low_res: int | None = None):
    """(params, batch, key) -> summed validation terms + "count" (no dropout, uniform t)."""

    def eval_step(params, batch, key):
        _count_trace("diffusion_eval")
        x = batch["image"].astype(jnp.float32)
        t_key, noise_key = jax.random.split(key)
        t, _ = dlib.uniform_sample_timesteps(t_key, diffusion.num_timesteps, x.shape[0])
        noise = jax.random.normal(noise_key, x.shape, jnp.float32)
        cond = model_kwargs_from_batch(module, batch, low_res)

        def model_fn(x_t, ts):
            return module.apply({"params": params}, x_t, ts, **cond, train=False)

        terms = dlib.training_losses(diffusion, model_fn, x, t, noise)
        return _masked_sums(terms, batch)

    return eval_step


def make_classifier_eval_step(module, diffusion, *, noised: bool = True):
    def eval_step(params, batch, key):
        _count_trace("classifier_eval")
        x = batch["image"].astype(jnp.float32)
        t_key, noise_key = jax.random.split(key)
        t, x_t = noised_inputs(diffusion, x, t_key, noise_key, noised=noised)
        logits = module.apply(
            {"params": params}, x_t, dlib.model_timesteps(diffusion, t), train=False
        )
        return _masked_sums(classification_terms(logits, batch["label"]), batch)

    return eval_step
