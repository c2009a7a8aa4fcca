"""Ancestral (DDPM) and DDIM sampling with classifier guidance, each loop one `lax.scan`.

Networks are plain callables: `model_fn(x, t)` and `classifier_fn(x, t) -> logits`, always
called with ORIGINAL timestep indices (`timestep_map[i]`). The loops are jitted with the
callables (and `diffusion`) static, so to reuse one compiled program across new parameters,
call the loop inside your own jit and close over traced params:

    @jax.jit
    def run(params, cls_params, key, labels, scale):
        model_fn = lambda x, t: unet.apply(params, x, t, y=labels)
        classifier_fn = lambda x, t: classifier.apply(cls_params, x, t)
        return sample(diffusion, model_fn, key, (n, h, w, 3), classifier_fn=classifier_fn,
                      y=labels, classifier_scale=scale)

`classifier_scale`, `eta` and `y` are traced, so one program serves a whole guidance sweep.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

from adm_jax.diffusion import gaussian
from adm_jax.diffusion.schedules import Diffusion


def classifier_guidance_grad(classifier_fn, x, t, y, classifier_scale):
    """g = s * grad_x sum_i log softmax(classifier_fn(x, t))_i[y_i] (ADM sec. 4.1).

    t are the original timesteps the classifier receives.
    """

    def selected_log_prob(x_in):
        logits = classifier_fn(x_in, t).astype(jnp.float32)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        return jnp.sum(jnp.take_along_axis(log_probs, y[:, None], axis=-1))

    grad_fn = jax.grad(selected_log_prob)
    # On CPU only, the input gradient's convolutions get their kernels transposed explicitly
    # (see `_with_canonical_conv_kernels`); other backends compile the plain gradient.
    grad = jax.lax.platform_dependent(x, cpu=_with_canonical_conv_kernels(grad_fn), default=grad_fn)
    return grad * classifier_scale


def _with_canonical_conv_kernels(fn):
    """fn (one array in, one out) with every convolution whose kernel is not laid out
    spatial..., in, out (HWIO) given an explicitly transposed HWIO kernel instead.

    JAX's transpose of a convolution (the input gradient of each classifier conv) reverses the
    kernel and swaps its in/out dimension numbers (HWOI). XLA:CPU runs only HWIO convolutions
    with its fast (Eigen, multi-threaded) kernel and its pass that canonicalises the others
    (`ConvCanonicalization`) visits only the entry computation, so inside the sampling
    `lax.scan` (a while-loop body) those convolutions fall back to a naive loop: ~6x slower
    guided steps on CPU (docs/history.md, "Guidance overhead on CPU"). Transposing the
    kernel here is what that pass does outside a loop, so results equal a standalone step's.
    """

    def canonical(x):
        closed = jax.make_jaxpr(fn)(x)
        (out,) = _eval_canonical_convs(closed.jaxpr, closed.consts, x)
        return out

    return canonical


def _eval_canonical_convs(jaxpr, consts, *args):
    env = {}

    def read(v):
        return v.val if isinstance(v, jax_core.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        params = eqn.primitive.get_bind_params(eqn.params)
        if eqn.primitive is jax.lax.conv_general_dilated_p:
            invals, params = _canonical_conv_args(*invals, params)
        with eqn.ctx.manager:
            out = eqn.primitive.bind(*invals, **params)
        outs = out if eqn.primitive.multiple_results else [out]
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(v) for v in jaxpr.outvars]


def _canonical_conv_args(lhs, rhs, params):
    dn = params["dimension_numbers"]
    n = len(dn.rhs_spec)
    hwio = (n - 1, n - 2, *range(n - 2))  # (out, in, spatial...) positions of an HWIO kernel
    if (
        dn.rhs_spec == hwio
        or params["feature_group_count"] != 1
        or params["batch_group_count"] != 1
    ):
        return (lhs, rhs), params
    rhs = jnp.transpose(rhs, (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0]))
    dn = jax.lax.ConvDimensionNumbers(dn.lhs_spec, hwio, dn.out_spec)
    return (lhs, rhs), {**params, "dimension_numbers": dn}


def _nonzero_mask(t, x):
    return (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))


def p_sample(
    diffusion: Diffusion,
    model_fn,
    x,
    t,
    noise,
    *,
    clip_denoised=True,
    cond_fn=None,
    channel_axis=-1,
):
    """One ancestral step x_{t-1} = mu + [t > 0] Sigma^(1/2) z (DDPM Algorithm 2), the mean
    shifted by Sigma g when cond_fn(x, timestep_map[t]) -> g is given (ADM Algorithm 1).

    Returns {"sample", "pred_xstart"} and "cond_grad" when guided.
    """
    out = gaussian.p_mean_variance(
        diffusion, model_fn, x, t, clip_denoised=clip_denoised, channel_axis=channel_axis
    )
    result = {"pred_xstart": out["pred_xstart"]}
    mean = out["mean"]
    if cond_fn is not None:
        result["cond_grad"] = cond_fn(x, gaussian.model_timesteps(diffusion, t))
        mean = gaussian.condition_mean(out, result["cond_grad"])
    result["sample"] = mean + _nonzero_mask(t, x) * jnp.exp(0.5 * out["log_variance"]) * noise
    return result


def ddim_sample(
    diffusion: Diffusion,
    model_fn,
    x,
    t,
    noise,
    *,
    clip_denoised=True,
    cond_fn=None,
    eta=0.0,
    channel_axis=-1,
):
    """One DDIM step (DDIM eq. 12): x_{t-1} = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev -
    sigma^2) eps + [t > 0] sigma z, sigma = eta sqrt((1 - abar_prev) / (1 - abar))
    sqrt(1 - abar / abar_prev); guided through the score (ADM Algorithm 2, `condition_score`).

    Returns {"sample", "pred_xstart"} and "cond_grad" when guided.
    """
    out = gaussian.p_mean_variance(
        diffusion, model_fn, x, t, clip_denoised=clip_denoised, channel_axis=channel_axis
    )
    result = {}
    if cond_fn is not None:
        result["cond_grad"] = cond_fn(x, gaussian.model_timesteps(diffusion, t))
        out = gaussian.condition_score(diffusion, out, x, t, result["cond_grad"])
    eps = gaussian.predict_eps_from_xstart(diffusion, x, t, out["pred_xstart"])
    alpha_bar = gaussian.extract(diffusion.alphas_cumprod, t, x)
    alpha_bar_prev = gaussian.extract(diffusion.alphas_cumprod_prev, t, x)
    sigma = (
        eta
        * jnp.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
        * jnp.sqrt(1 - alpha_bar / alpha_bar_prev)
    )
    mean_pred = (
        out["pred_xstart"] * jnp.sqrt(alpha_bar_prev)
        + jnp.sqrt(1 - alpha_bar_prev - sigma**2) * eps
    )
    result["sample"] = mean_pred + _nonzero_mask(t, x) * sigma * noise
    result["pred_xstart"] = out["pred_xstart"]
    return result


def ddim_reverse_sample(
    diffusion: Diffusion, model_fn, x, t, *, clip_denoised=True, channel_axis=-1
):
    """Deterministic DDIM step forwards, x_t -> x_{t+1} (DDIM eq. 12 with eta = 0, reversed,
    using abar_next). Returns {"sample", "pred_xstart"}."""
    out = gaussian.p_mean_variance(
        diffusion, model_fn, x, t, clip_denoised=clip_denoised, channel_axis=channel_axis
    )
    eps = gaussian.predict_eps_from_xstart(diffusion, x, t, out["pred_xstart"])
    alpha_bar_next = gaussian.extract(diffusion.alphas_cumprod_next, t, x)
    sample = out["pred_xstart"] * jnp.sqrt(alpha_bar_next) + jnp.sqrt(1 - alpha_bar_next) * eps
    return {"sample": sample, "pred_xstart": out["pred_xstart"]}


def _reverse_loop(
    diffusion,
    model_fn,
    x_init,
    xs,
    noise_fn,
    *,
    use_ddim,
    eta,
    clip_denoised,
    classifier_fn,
    y,
    classifier_scale,
    return_trajectory,
    channel_axis,
):
    """Scan over steps k = 0..T-1 at index i = T-1-k; noise_fn(k, xs_k) is that step's z."""
    num_steps = diffusion.num_timesteps
    batch = x_init.shape[0]
    cond_fn = None
    if classifier_fn is not None:
        if y is None:
            raise ValueError("classifier guidance needs the target labels y")
        y = jnp.asarray(y, jnp.int32)
        cond_fn = functools.partial(_cond_fn, classifier_fn, y=y, classifier_scale=classifier_scale)
    step = functools.partial(ddim_sample, eta=eta) if use_ddim else p_sample

    def body(x, k_and_xs):
        k, xs_k = k_and_xs
        t = jnp.full((batch,), num_steps - 1 - k, jnp.int32)
        out = step(
            diffusion,
            model_fn,
            x,
            t,
            noise_fn(k, xs_k),
            clip_denoised=clip_denoised,
            cond_fn=cond_fn,
            channel_axis=channel_axis,
        )
        traj = None
        if return_trajectory:
            traj = {
                "samples": out["sample"],
                "pred_xstart": out["pred_xstart"],
                "timesteps": gaussian.model_timesteps(diffusion, t),
            }
            if cond_fn is not None:
                traj["cond_grad"] = out["cond_grad"]
        return out["sample"], traj

    ks = jnp.arange(num_steps, dtype=jnp.int32)
    final, traj = jax.lax.scan(body, x_init, (ks, xs))
    if not return_trajectory:
        return final
    return {"sample": final, **traj}


def _cond_fn(classifier_fn, x, t, *, y, classifier_scale):
    return classifier_guidance_grad(classifier_fn, x, t, y, classifier_scale)


_STATIC = (
    "diffusion",
    "model_fn",
    "use_ddim",
    "clip_denoised",
    "classifier_fn",
    "return_trajectory",
    "channel_axis",
)


def _traced_kwargs(kwargs):
    """Fixed dtypes for the traced options, so 1.0, 1 and jnp.float32(1) share one trace."""
    kwargs = dict(kwargs)
    for name in ("eta", "classifier_scale"):
        if name in kwargs:
            kwargs[name] = jnp.asarray(kwargs[name], jnp.float32)
    if kwargs.get("y") is not None:
        kwargs["y"] = jnp.asarray(kwargs["y"], jnp.int32)
    return kwargs


def sample_loop(diffusion: Diffusion, model_fn, noise, **kwargs):
    """Samples x_0 from x_T = noise[0] (the reference's p_sample_loop / ddim_sample_loop).

    noise: (T + 1, *sample_shape); noise[k] is the fresh noise of the k-th reverse step (DDIM
    with eta = 0 ignores it). Keyword arguments: use_ddim=False, eta=0.0,
    clip_denoised=True, classifier_fn=None, y=None, classifier_scale=0.0,
    return_trajectory=False, channel_axis=-1. With classifier_fn, every step is guided by
    classifier_scale * grad_x log p(y | x_t, t) (`classifier_guidance_grad`). Returns x_0,
    or with return_trajectory a dict: "sample" (x_0) and per step (T, ...) "samples" (x
    after the step), "pred_xstart", "timesteps" (what the networks received) and, when
    guided, "cond_grad".
    """
    return _sample_loop(diffusion, model_fn, noise, **_traced_kwargs(kwargs))


@functools.partial(jax.jit, static_argnames=_STATIC)
def _sample_loop(
    diffusion,
    model_fn,
    noise,
    *,
    use_ddim=False,
    eta=0.0,
    clip_denoised=True,
    classifier_fn=None,
    y=None,
    classifier_scale=0.0,
    return_trajectory=False,
    channel_axis=-1,
):
    return _reverse_loop(
        diffusion,
        model_fn,
        noise[0],
        noise[1:],
        lambda k, z: z,
        use_ddim=use_ddim,
        eta=eta,
        clip_denoised=clip_denoised,
        classifier_fn=classifier_fn,
        y=y,
        classifier_scale=classifier_scale,
        return_trajectory=return_trajectory,
        channel_axis=channel_axis,
    )


def sample_noise(key, num_timesteps: int, shape, dtype=jnp.float32):
    """The (T + 1, *shape) noise `sample` draws from key: slot k is normal(fold_in(key, k))."""
    return jnp.stack(
        [
            jax.random.normal(jax.random.fold_in(key, k), tuple(shape), dtype)
            for k in range(num_timesteps + 1)
        ]
    )


def sample(diffusion: Diffusion, model_fn, key, shape, **kwargs):
    """`sample_loop` with its noise drawn from key inside the scan (equal to
    `sample_loop(..., sample_noise(key, T, shape))`), so the T + 1 noise arrays are never
    materialised together. Same keyword arguments."""
    shape = tuple(int(s) for s in shape)
    return _sample(diffusion, model_fn, key, shape, **_traced_kwargs(kwargs))


@functools.partial(jax.jit, static_argnames=(*_STATIC, "shape"))
def _sample(
    diffusion,
    model_fn,
    key,
    shape,
    *,
    use_ddim=False,
    eta=0.0,
    clip_denoised=True,
    classifier_fn=None,
    y=None,
    classifier_scale=0.0,
    return_trajectory=False,
    channel_axis=-1,
):
    def noise_fn(k, _):
        return jax.random.normal(jax.random.fold_in(key, k + 1), shape, jnp.float32)

    x_init = jax.random.normal(jax.random.fold_in(key, 0), shape, jnp.float32)
    return _reverse_loop(
        diffusion,
        model_fn,
        x_init,
        None,
        noise_fn,
        use_ddim=use_ddim,
        eta=eta,
        clip_denoised=clip_denoised,
        classifier_fn=classifier_fn,
        y=y,
        classifier_scale=classifier_scale,
        return_trajectory=return_trajectory,
        channel_axis=channel_axis,
    )
