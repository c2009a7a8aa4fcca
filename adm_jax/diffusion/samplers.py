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
import numpy as np
from jax.extend import core as jax_core

from adm_jax.diffusion import gaussian, guidance
from adm_jax.diffusion import start as start_lib
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
    denoised_fn=None,
    guided=None,
):
    """One ancestral step x_{t-1} = mu + [t > 0] Sigma^(1/2) z (DDPM Algorithm 2), the mean
    shifted by Sigma g when cond_fn(x, timestep_map[t]) -> g is given (ADM Algorithm 1).

    denoised_fn: applied to the x_0 prediction before the clip (the reference's argument).
    guided: a traced scalar bool; where False the classifier is not run (`lax.cond`) and its
    gradient is 0. Returns {"sample", "pred_xstart"} and "cond_grad" when guided.
    """
    out = gaussian.p_mean_variance(
        diffusion,
        model_fn,
        x,
        t,
        clip_denoised=clip_denoised,
        channel_axis=channel_axis,
        denoised_fn=denoised_fn,
    )
    result = {"pred_xstart": out["pred_xstart"]}
    mean = out["mean"]
    if cond_fn is not None:

        def on():
            grad = cond_fn(x, gaussian.model_timesteps(diffusion, t))
            return grad, gaussian.condition_mean(out, grad)

        result["cond_grad"], mean = guidance.switch(
            guided, on, lambda: (jnp.zeros_like(x), out["mean"])
        )
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
    denoised_fn=None,
    guided=None,
):
    """One DDIM step (DDIM eq. 12): x_{t-1} = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev -
    sigma^2) eps + [t > 0] sigma z, sigma = eta sqrt((1 - abar_prev) / (1 - abar))
    sqrt(1 - abar / abar_prev); guided through the score (ADM Algorithm 2, `condition_score`).

    denoised_fn and guided as `p_sample`. Returns {"sample", "pred_xstart"} and "cond_grad"
    when guided.
    """
    out = gaussian.p_mean_variance(
        diffusion,
        model_fn,
        x,
        t,
        clip_denoised=clip_denoised,
        channel_axis=channel_axis,
        denoised_fn=denoised_fn,
    )
    result = {}
    if cond_fn is not None:
        result["cond_grad"], out = _score_guidance(diffusion, cond_fn, out, x, t, guided)
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


def _score_guidance(diffusion, cond_fn, out, x, t, guided):
    """(g, `condition_score`(out)) where guided, else (0, out) without running cond_fn."""

    def on():
        grad = cond_fn(x, gaussian.model_timesteps(diffusion, t))
        return grad, gaussian.condition_score(diffusion, out, x, t, grad)

    return guidance.switch(guided, on, lambda: (jnp.zeros_like(x), dict(out)))


def ddim_reverse_sample(
    diffusion: Diffusion,
    model_fn,
    x,
    t,
    *,
    clip_denoised=True,
    channel_axis=-1,
    denoised_fn=None,
    cond_fn=None,
    guided=None,
):
    """Deterministic DDIM step forwards, x_t -> x_{t+1} (DDIM eq. 12 with eta = 0, reversed,
    using abar_next). cond_fn / guided: classifier guidance on the score as `ddim_sample`.
    Returns {"sample", "pred_xstart"}."""
    out = gaussian.p_mean_variance(
        diffusion,
        model_fn,
        x,
        t,
        clip_denoised=clip_denoised,
        channel_axis=channel_axis,
        denoised_fn=denoised_fn,
    )
    if cond_fn is not None:
        _, out = _score_guidance(diffusion, cond_fn, out, x, t, guided)
    eps = gaussian.predict_eps_from_xstart(diffusion, x, t, out["pred_xstart"])
    alpha_bar_next = gaussian.extract(diffusion.alphas_cumprod_next, t, x)
    sample = out["pred_xstart"] * jnp.sqrt(alpha_bar_next) + jnp.sqrt(1 - alpha_bar_next) * eps
    return {"sample": sample, "pred_xstart": out["pred_xstart"]}


def guided_steps(diffusion: Diffusion, guidance_interval, *, reverse=True):
    """Per scan step of a (respaced) process: whether guidance is on, lo < sigma <= hi with
    sigma = sqrt((1 - abar) / abar) of the step's ORIGINAL timestep (the respaced
    alphas_cumprod hold the base schedule's abar at timestep_map); None without interval.
    reverse: scan step k is index T-1-k (sampling), else index k (inversion)."""
    if guidance_interval is None:
        return None
    mask = guidance.interval_mask(guidance.vp_sigmas(diffusion.alphas_cumprod), guidance_interval)
    return jnp.asarray(mask[::-1] if reverse else mask)


def _classifier_cond_fn(classifier_fn, y, classifier_scale):
    if classifier_fn is None:
        return None
    if y is None:
        raise ValueError("classifier guidance needs the target labels y")
    y = jnp.asarray(y, jnp.int32)
    return functools.partial(_cond_fn, classifier_fn, y=y, classifier_scale=classifier_scale)


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
    denoised_fn=None,
    guidance_interval=None,
    unguided_model_fn=None,
    start=None,
):
    """Scan over steps k = 0..T-1 at index i = T-1-k; noise_fn(k, xs_k) is that step's z.

    start: None, or per example the first step k it takes (earlier steps keep x; steps
    before every example's start are skipped)."""
    num_steps = diffusion.num_timesteps
    batch = x_init.shape[0]
    guidance.check_switches(guidance_interval, classifier_fn, unguided_model_fn)
    cond_fn = _classifier_cond_fn(classifier_fn, y, classifier_scale)
    step = functools.partial(ddim_sample, eta=eta) if use_ddim else p_sample
    guided_per_step = guided_steps(diffusion, guidance_interval)

    def body(x, k_xs_guided):
        k, xs_k, guided = k_xs_guided
        t = jnp.full((batch,), num_steps - 1 - k, jnp.int32)

        def run(x):
            return step(
                diffusion,
                guidance.interval_model_fn(model_fn, unguided_model_fn, guided),
                x,
                t,
                noise_fn(k, xs_k),
                clip_denoised=clip_denoised,
                cond_fn=cond_fn,
                channel_axis=channel_axis,
                denoised_fn=denoised_fn,
                guided=guided,
            )

        if start is None:
            out = run(x)
        else:
            active = k >= start
            shapes = jax.eval_shape(run, x)

            def skip(x):
                out = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
                return {**out, "sample": x}

            out = jax.lax.cond(jnp.any(active), run, skip, x)
            out["sample"] = jnp.where(start_lib.bcast(active, x), out["sample"], x)
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
    final, traj = jax.lax.scan(body, x_init, (ks, xs, guided_per_step))
    if not return_trajectory:
        return final
    return {"sample": final, **traj}


def _start_point(diffusion, x_T, x_init, strength):
    """(x at the first step, per-example first step k or None): SDEdit's start (see
    `adm_jax.diffusion.start`): n = ceil(s * T) steps from x_n-1 = q_sample(x_init, n - 1,
    x_T); n = T starts from x_T itself."""
    if x_init is None:
        return x_T, None
    num_steps = diffusion.num_timesteps
    x_init = jnp.asarray(x_init, jnp.float32)
    if x_init.shape != x_T.shape:
        raise ValueError(f"x_init: expected shape {x_T.shape}, got {x_init.shape}")
    n = start_lib.steps_to_run(start_lib.per_example(strength, x_T.shape[0]), num_steps)
    noised = gaussian.q_sample(diffusion, x_init, n - 1, x_T)
    x = jnp.where(start_lib.bcast(n == num_steps, x_T), x_T, noised)
    return x, num_steps - n


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
    "denoised_fn",
    "guidance_interval",
    "unguided_model_fn",
)


def _traced_kwargs(kwargs):
    """Fixed dtypes for the traced options, so 1.0, 1 and jnp.float32(1) share one trace;
    the guidance interval as a hashable tuple of floats."""
    kwargs = dict(kwargs)
    for name in ("eta", "classifier_scale", "strength"):
        if name in kwargs:
            kwargs[name] = jnp.asarray(kwargs[name], jnp.float32)
    for name in ("x_T", "x_init"):
        if kwargs.get(name) is not None:
            kwargs[name] = jnp.asarray(kwargs[name], jnp.float32)
    if kwargs.get("y") is not None:
        kwargs["y"] = jnp.asarray(kwargs["y"], jnp.int32)
    if kwargs.get("guidance_interval") is not None:
        kwargs["guidance_interval"] = guidance.check_interval(kwargs["guidance_interval"])
    return kwargs


def sample_loop(diffusion: Diffusion, model_fn, noise, **kwargs):
    """Samples x_0 from x_T = noise[0] (the reference's p_sample_loop / ddim_sample_loop).

    noise: (T + 1, *sample_shape); noise[k] is the fresh noise of the k-th reverse step (DDIM
    with eta = 0 ignores it). Keyword arguments: use_ddim=False, eta=0.0,
    clip_denoised=True, classifier_fn=None, y=None, classifier_scale=0.0,
    return_trajectory=False, channel_axis=-1, and:

    denoised_fn=None: x_0 -> x_0 applied to every x_0 prediction before the clip (e.g.
    `dynamic_threshold`; the reference's argument). guidance_interval=None: (sigma_lo,
    sigma_hi), guidance only at steps with lo < sqrt((1 - abar_t) / abar_t) <= hi, t the
    step's original timestep; outside it the classifier is skipped and the model is
    unguided_model_fn (when given, e.g. the conditional model for a classifier-free guidance
    model_fn). x_init=None, strength=1.0: SDEdit, start from x_init (x_0 images) noised with
    noise[0] to respaced step ceil(strength * T) - 1 and run only the remaining steps
    (strength may be a (B,) array; see `adm_jax.diffusion.start`).

    With classifier_fn, every (guided) step is guided by classifier_scale * grad_x log
    p(y | x_t, t) (`classifier_guidance_grad`). Returns x_0, or with return_trajectory a
    dict: "sample" (x_0) and per step (T, ...) "samples" (x after the step), "pred_xstart",
    "timesteps" (what the networks received) and, when guided, "cond_grad".
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
    denoised_fn=None,
    guidance_interval=None,
    unguided_model_fn=None,
    x_init=None,
    strength=1.0,
):
    x_start, start = _start_point(diffusion, noise[0], x_init, strength)
    return _reverse_loop(
        diffusion,
        model_fn,
        x_start,
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
        denoised_fn=denoised_fn,
        guidance_interval=guidance_interval,
        unguided_model_fn=unguided_model_fn,
        start=start,
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
    materialised together. Same keyword arguments, and x_T=None: a given x_T (standard
    normal, `shape`) replaces the draw normal(fold_in(key, 0)) (with x_init: the noise
    x_init is noised with)."""
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
    denoised_fn=None,
    guidance_interval=None,
    unguided_model_fn=None,
    x_T=None,
    x_init=None,
    strength=1.0,
):
    def noise_fn(k, _):
        return jax.random.normal(jax.random.fold_in(key, k + 1), shape, jnp.float32)

    if x_T is None:
        x_T = jax.random.normal(jax.random.fold_in(key, 0), shape, jnp.float32)
    elif x_T.shape != shape:
        raise ValueError(f"x_T: expected shape {shape}, got {x_T.shape}")
    x_start, start = _start_point(diffusion, x_T, x_init, strength)
    return _reverse_loop(
        diffusion,
        model_fn,
        x_start,
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
        denoised_fn=denoised_fn,
        guidance_interval=guidance_interval,
        unguided_model_fn=unguided_model_fn,
        start=start,
    )


def ddim_invert(
    diffusion: Diffusion,
    model_fn,
    x_0,
    *,
    clip_denoised=True,
    denoised_fn=None,
    classifier_fn=None,
    y=None,
    classifier_scale=0.0,
    guidance_interval=None,
    unguided_model_fn=None,
    channel_axis=-1,
    refine_steps=0,
):
    """DDIM inversion (DDIM sec. 4.3 / eq. 12 with eta = 0, run forwards): x_T such that DDIM
    sampling (eta 0) from it with the same model and options returns approximately x_0.

    x_0 (images in [-1, 1], NHWC) is taken as x at respaced index 0 and carried through the
    T - 1 deterministic steps x_t -> x_{t+1} (`ddim_reverse_sample`, t = 0..T-2, one
    `lax.scan`) to index T - 1, where `sample(..., use_ddim=True, eta=0)` starts: T - 1 model
    calls (T the respaced process's length). The round trip is exact for a model whose x_0
    prediction is constant along the path, and otherwise off by the discretisation error of
    both directions (first order in the step size: about 0.07 of x_0's scale after 50 steps
    on Gaussian data, 0.008 after 1000).

    refine_steps=K > 0 corrects each step by K fixed-point iterations (one model call each)
    towards the x_{t+1} that the DDIM step of the same model, guidance and correction maps
    back to x_t exactly: x_{t+1} <- x_{t+1} + sqrt(abar_{t+1} / abar_t) (x_t -
    DDIM(x_{t+1})); a few make the round trip exact but for the first step's image-as-x_0
    (cost (K + 1) (T - 1) model calls). Guidance as `sample_loop` (classifier guidance
    on the score, guidance_interval, unguided_model_fn), denoised_fn and clip_denoised as
    `ddim_sample`'s. diffusion, model_fn, classifier_fn and the interval are static; x_0, y
    and classifier_scale are traced.
    """
    x_0 = jnp.asarray(x_0, jnp.float32)
    if x_0.ndim < 2:
        raise ValueError(f"x_0: expected a batch of NHWC images, got shape {x_0.shape}")
    kwargs = _traced_kwargs(
        dict(y=y, classifier_scale=classifier_scale, guidance_interval=guidance_interval)
    )
    return _ddim_invert(
        diffusion,
        model_fn,
        x_0,
        clip_denoised=bool(clip_denoised),
        denoised_fn=denoised_fn,
        classifier_fn=classifier_fn,
        unguided_model_fn=unguided_model_fn,
        channel_axis=channel_axis,
        refine_steps=int(refine_steps),
        **kwargs,
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "diffusion",
        "model_fn",
        "clip_denoised",
        "denoised_fn",
        "classifier_fn",
        "guidance_interval",
        "unguided_model_fn",
        "channel_axis",
        "refine_steps",
    ),
)
def _ddim_invert(
    diffusion,
    model_fn,
    x_0,
    *,
    clip_denoised,
    denoised_fn,
    classifier_fn,
    y,
    classifier_scale,
    guidance_interval,
    unguided_model_fn,
    channel_axis,
    refine_steps,
):
    guidance.check_switches(guidance_interval, classifier_fn, unguided_model_fn)
    cond_fn = _classifier_cond_fn(classifier_fn, y, classifier_scale)
    num_steps = diffusion.num_timesteps - 1
    guided_all = guided_steps(diffusion, guidance_interval, reverse=False)
    guided_here = guided_next = None
    if guided_all is not None:
        guided_here, guided_next = guided_all[:num_steps], guided_all[1:]
    abar = np.asarray(diffusion.alphas_cumprod, np.float64)
    ratio = jnp.asarray(np.sqrt(abar[1:] / abar[:-1]).astype(np.float32))
    batch = x_0.shape[0]
    options = dict(
        clip_denoised=clip_denoised,
        channel_axis=channel_axis,
        denoised_fn=denoised_fn,
        cond_fn=cond_fn,
    )

    def body(x, s):
        k, guided, guided_up, scale = s
        t = jnp.full((batch,), k, jnp.int32)
        net = guidance.interval_model_fn(model_fn, unguided_model_fn, guided)
        x_next = ddim_reverse_sample(diffusion, net, x, t, guided=guided, **options)["sample"]
        if refine_steps:
            net_up = guidance.interval_model_fn(model_fn, unguided_model_fn, guided_up)

            def refine(x_next, _):
                zero = jnp.zeros_like(x_next)  # eta 0: no noise
                back = ddim_sample(
                    diffusion, net_up, x_next, t + 1, zero, guided=guided_up, **options
                )["sample"]
                return x_next + scale * (x - back), None

            x_next, _ = jax.lax.scan(refine, x_next, None, length=refine_steps)
        return x_next, None

    ks = jnp.arange(num_steps, dtype=jnp.int32)
    x_T, _ = jax.lax.scan(body, x_0, (ks, guided_here, guided_next, ratio))
    return x_T
