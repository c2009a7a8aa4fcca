"""Training losses and likelihood terms (DDPM sec. 3, Improved DDPM sec. 3.1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from adm_jax.diffusion import gaussian
from adm_jax.diffusion.schedules import Diffusion

_LOG2 = float(np.log(2.0))


def mean_flat(x):
    """Mean over every axis but the batch axis."""
    return jnp.mean(x, axis=tuple(range(1, jnp.ndim(x))))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + ((mean1 - mean2) ** 2) * jnp.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    """Fast tanh approximation of the standard normal CDF (as in the reference)."""
    return 0.5 * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """log p(x_0 | x_1) of 8-bit data in [-1, 1] under a discretised Gaussian, DDPM eq. 13.

    Bins are 2/255 wide; the edge bins at -1 and 1 extend to -inf and +inf.
    """
    centered_x = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(
        x < -0.999,
        log_cdf_plus,
        jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta),
    )


def vb_terms_bpd(diffusion: Diffusion, p_mean_var, x_start, x_t, t):
    """One term of the variational bound, in bits per dim (DDPM eq. 5).

    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) for t > 0, and the
    discretised decoder NLL L_0 = -log p_theta(x_0 | x_1) at t = 0. Returns (B,).
    """
    true_mean, _, true_log_variance = gaussian.q_posterior_mean_variance(diffusion, x_start, x_t, t)
    kl = normal_kl(true_mean, true_log_variance, p_mean_var["mean"], p_mean_var["log_variance"])
    kl = mean_flat(kl) / _LOG2
    decoder_nll = -discretized_gaussian_log_likelihood(
        x_start, means=p_mean_var["mean"], log_scales=0.5 * p_mean_var["log_variance"]
    )
    decoder_nll = mean_flat(decoder_nll) / _LOG2
    return jnp.where(t == 0, decoder_nll, kl)


def prior_bpd(diffusion: Diffusion, x_start):
    """Prior term L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dim (DDPM eq. 5). (B,)."""
    t = jnp.full((jnp.shape(x_start)[0],), diffusion.num_timesteps - 1, jnp.int32)
    # The KL is ~1e-5 from 0.5 (exp(lv) - 1 - lv + mean^2) in float32, so its value hangs on
    # the rounding of exp(lv); keep XLA from constant-folding that under jit (off by 5e-4
    # relative) so jitted and eager results both equal the reference's.
    t = jax.lax.optimization_barrier(t)
    mean, _, log_variance = gaussian.q_mean_variance(diffusion, x_start, t)
    return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / _LOG2


def training_losses(diffusion: Diffusion, model_fn, x_start, t, noise, *, channel_axis=-1):
    """Per-example training losses at steps t with noise eps; model_fn(x_t, timestep_map[t]).

    mse/rescaled_mse: "mse" = ||target - output||^2 averaged over non-batch axes (DDPM eq. 14,
    L_simple; target eps, x_0 or the posterior mean); with a learned variance also "vb", the
    bound term (`vb_terms_bpd`) on the variance with the mean under stop-gradient (Improved
    DDPM eq. 16, L_hybrid), times T/1000 for rescaled_mse; "loss" = mse (+ vb).
    kl/rescaled_kl: "loss" = the bound term alone (times T for rescaled_kl).
    """
    x_t = gaussian.q_sample(diffusion, x_start, t, noise)
    ts = gaussian.model_timesteps(diffusion, t)
    loss_type = diffusion.loss_type

    if loss_type in ("kl", "rescaled_kl"):
        out = gaussian.p_mean_variance(
            diffusion, model_fn, x_t, t, clip_denoised=False, channel_axis=channel_axis
        )
        loss = vb_terms_bpd(diffusion, out, x_start, x_t, t)
        if loss_type == "rescaled_kl":
            loss = loss * diffusion.num_timesteps
        return {"loss": loss}

    model_output = model_fn(x_t, ts)
    terms = {}
    if diffusion.learns_sigma:
        model_output, var_values = jnp.split(model_output, 2, axis=channel_axis)
        # Learn the variance through the bound, but keep the bound off the mean.
        frozen_out = jnp.concatenate(
            [jax.lax.stop_gradient(model_output), var_values], axis=channel_axis
        )
        out = gaussian.p_mean_variance_from_output(
            diffusion, frozen_out, x_t, t, clip_denoised=False, channel_axis=channel_axis
        )
        terms["vb"] = vb_terms_bpd(diffusion, out, x_start, x_t, t)
        if loss_type == "rescaled_mse":
            terms["vb"] = terms["vb"] * (diffusion.num_timesteps / 1000.0)

    if diffusion.model_mean_type == "previous_x":
        target = gaussian.q_posterior_mean_variance(diffusion, x_start, x_t, t)[0]
    elif diffusion.model_mean_type == "start_x":
        target = x_start
    else:
        target = noise
    terms["mse"] = mean_flat((target - model_output) ** 2)
    terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
    return terms


def bpd_terms(
    diffusion: Diffusion, model_fn, x_start, t, noise, *, clip_denoised=True, channel_axis=-1
):
    """One step of the bound at steps t with noise eps (one iteration of the reference's
    `calc_bpd_loop`): x_t = q_sample(x_0, t, eps), then per example (B,) "vb" (the bound term
    `vb_terms_bpd` in bits/dim, full model output: no stop-gradient, no T/1000 rescaling),
    "xstart_mse" = mean (x_0_theta - x_0)^2 and "mse" = mean (eps(x_0_theta) - eps)^2, eps
    re-derived from the (clipped, if clip_denoised) predicted x_0. model_fn(x_t, timestep_map[t]).
    """
    x_t = gaussian.q_sample(diffusion, x_start, t, noise)
    out = gaussian.p_mean_variance(
        diffusion, model_fn, x_t, t, clip_denoised=clip_denoised, channel_axis=channel_axis
    )
    eps = gaussian.predict_eps_from_xstart(diffusion, x_t, t, out["pred_xstart"])
    return {
        "vb": vb_terms_bpd(diffusion, out, x_start, x_t, t),
        "xstart_mse": mean_flat((out["pred_xstart"] - x_start) ** 2),
        "mse": mean_flat((eps - noise) ** 2),
    }


def calc_bpd_loop(
    diffusion: Diffusion,
    model_fn,
    x_start,
    key=None,
    *,
    noise=None,
    clip_denoised=True,
    channel_axis=-1,
):
    """The full variational bound in bits per dim (DDPM eq. 5), one `lax.scan` over t.

    Iteration j evaluates step t = T - 1 - j (the reference's loop order) with `bpd_terms`;
    its noise is normal(fold_in(key, t)), or noise[j] when `noise` (T, *x_start.shape) is given
    instead of a key. Returns per-example total_bpd = sum_t vb + prior_bpd and prior_bpd (B,),
    and (B, T) vb, xstart_mse, mse whose column j is step T - 1 - j.
    """
    if (key is None) == (noise is None):
        raise ValueError("calc_bpd_loop: give exactly one of key and noise")
    num_steps = diffusion.num_timesteps
    batch, shape = jnp.shape(x_start)[0], jnp.shape(x_start)
    if noise is not None and jnp.shape(noise) != (num_steps, *shape):
        raise ValueError(
            f"calc_bpd_loop: noise must have shape {(num_steps, *shape)} (T, *x_start.shape), "
            f"got {jnp.shape(noise)}"
        )

    def body(_, xs):
        t_scalar, step_noise = xs
        if step_noise is None:
            step_noise = jax.random.normal(
                jax.random.fold_in(key, t_scalar), shape, jnp.result_type(x_start)
            )
        t = jnp.full((batch,), t_scalar, jnp.int32)
        terms = bpd_terms(
            diffusion,
            model_fn,
            x_start,
            t,
            step_noise,
            clip_denoised=clip_denoised,
            channel_axis=channel_axis,
        )
        return None, (terms["vb"], terms["xstart_mse"], terms["mse"])

    steps = jnp.arange(num_steps - 1, -1, -1, dtype=jnp.int32)
    _, (vb, xstart_mse, mse) = jax.lax.scan(body, None, (steps, noise))
    vb, xstart_mse, mse = vb.T, xstart_mse.T, mse.T
    prior = prior_bpd(diffusion, x_start)
    return {
        "total_bpd": jnp.sum(vb, axis=1) + prior,
        "prior_bpd": prior,
        "vb": vb,
        "xstart_mse": xstart_mse,
        "mse": mse,
    }
