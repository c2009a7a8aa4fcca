"""Gaussian diffusion math: forward process, posterior and the model's reverse step.

Pure functions `f(diffusion, arrays..., t)`: `t` is a (B,) int array of step indices into the
(possibly respaced) process, arrays have the batch on axis 0 and are otherwise any layout
(only the learned-variance channel split needs `channel_axis`, -1 for NHWC). Coefficients
are gathered as float32 copies of the float64 numpy constants, like the reference's
`_extract_into_tensor`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from adm_jax.diffusion.schedules import Diffusion


def extract(arr: np.ndarray, t, x) -> jnp.ndarray:
    """arr[t] as float32, shaped (B, 1, ..., 1) to broadcast against x."""
    a = jnp.asarray(np.asarray(arr, dtype=np.float32))[t]
    return a.reshape(a.shape + (1,) * (jnp.ndim(x) - a.ndim))


def model_timesteps(diffusion: Diffusion, t) -> jnp.ndarray:
    """The ORIGINAL timestep indices a network receives for steps t (timestep_map[t])."""
    return jnp.asarray(diffusion.timestep_map)[t]


def q_mean_variance(diffusion: Diffusion, x_start, t):
    """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), DDPM eq. 4.

    Returns (mean, variance, log_variance), each of x_start's shape.
    """
    mean = extract(diffusion.sqrt_alphas_cumprod, t, x_start) * x_start
    variance = extract(1.0 - diffusion.alphas_cumprod, t, x_start)
    log_variance = extract(diffusion.log_one_minus_alphas_cumprod, t, x_start)
    shape = jnp.shape(x_start)
    return mean, jnp.broadcast_to(variance, shape), jnp.broadcast_to(log_variance, shape)


def q_sample(diffusion: Diffusion, x_start, t, noise):
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, a sample of q(x_t | x_0) (DDPM eq. 4)."""
    return (
        extract(diffusion.sqrt_alphas_cumprod, t, x_start) * x_start
        + extract(diffusion.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
    )


def q_posterior_mean_variance(diffusion: Diffusion, x_start, x_t, t):
    """Posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t I), DDPM eqs. 6-7.

    Returns (mean, variance, log_variance_clipped); the log is clipped at t = 0 (beta~_1).
    """
    mean = (
        extract(diffusion.posterior_mean_coef1, t, x_t) * x_start
        + extract(diffusion.posterior_mean_coef2, t, x_t) * x_t
    )
    shape = jnp.shape(x_t)
    variance = jnp.broadcast_to(extract(diffusion.posterior_variance, t, x_t), shape)
    log_variance = jnp.broadcast_to(
        extract(diffusion.posterior_log_variance_clipped, t, x_t), shape
    )
    return mean, variance, log_variance


def predict_xstart_from_eps(diffusion: Diffusion, x_t, t, eps):
    """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), DDPM eq. 4 solved for x_0."""
    return (
        extract(diffusion.sqrt_recip_alphas_cumprod, t, x_t) * x_t
        - extract(diffusion.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
    )


def predict_eps_from_xstart(diffusion: Diffusion, x_t, t, pred_xstart):
    """eps = (x_t / sqrt(abar_t) - x_0) / sqrt(1 / abar_t - 1), the inverse of the above."""
    return (
        extract(diffusion.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart
    ) / _exact_divisor(extract(diffusion.sqrt_recipm1_alphas_cumprod, t, x_t), jnp.shape(x_t))


def _exact_divisor(coef, shape):
    """Broadcasts coef so XLA divides exactly: it rewrites x / broadcast(c) as x * (1 / c),
    one ulp off, which sqrt(1 / abar - 1) ~ 2e4 at the end of the cosine schedule amplifies
    (eps is recomputed from a clipped x_0 in DDIM and guidance)."""
    return jax.lax.optimization_barrier(jnp.broadcast_to(coef, shape))


def predict_xstart_from_xprev(diffusion: Diffusion, x_t, t, xprev):
    """x_0 = (x_{t-1} - coef2 x_t) / coef1, the posterior mean (DDPM eq. 7) solved for x_0."""
    coef1, coef2 = diffusion.posterior_mean_coef1, diffusion.posterior_mean_coef2
    return extract(1.0 / coef1, t, x_t) * xprev - extract(coef2 / coef1, t, x_t) * x_t


def model_variance(diffusion: Diffusion, var_values, x, t):
    """The reverse-step variance Sigma_theta(x_t, t): (variance, log_variance).

    learned: log Sigma = v. learned_range (Improved DDPM eq. 15): log Sigma =
    frac log beta_t + (1 - frac) log beta~_t, frac = (v + 1) / 2, v unclipped.
    fixed_small: beta~_t; fixed_large: beta_t, with beta~_1 at t = 0 (better decoder NLL).
    """
    kind = diffusion.model_var_type
    if kind == "learned":
        return jnp.exp(var_values), var_values
    if kind == "learned_range":
        min_log = extract(diffusion.posterior_log_variance_clipped, t, x)
        max_log = extract(np.log(diffusion.betas), t, x)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        return jnp.exp(log_variance), log_variance
    if kind == "fixed_large":
        var = np.append(diffusion.posterior_variance[1], diffusion.betas[1:])
        log_var = np.log(var)
    else:
        var, log_var = diffusion.posterior_variance, diffusion.posterior_log_variance_clipped
    shape = jnp.shape(x)
    return (
        jnp.broadcast_to(extract(var, t, x), shape),
        jnp.broadcast_to(extract(log_var, t, x), shape),
    )


def p_mean_variance_from_output(
    diffusion: Diffusion,
    model_output,
    x,
    t,
    *,
    clip_denoised=True,
    channel_axis=-1,
    denoised_fn=None,
):
    """p_theta(x_{t-1} | x_t) = N(mu_theta, Sigma_theta) from a network output (DDPM eq. 1).

    The mean is the posterior mean (DDPM eq. 7) at the predicted x_0 (denoised_fn(x_0) when
    given, then clipped to [-1, 1] if clip_denoised, as the reference's process_xstart), or
    the output itself for previous_x prediction. Returns a dict with mean, variance,
    log_variance, pred_xstart.
    """
    if diffusion.learns_sigma:
        model_output, var_values = jnp.split(model_output, 2, axis=channel_axis)
    else:
        var_values = None
    variance, log_variance = model_variance(diffusion, var_values, x, t)

    def process_xstart(x0):
        if denoised_fn is not None:
            x0 = denoised_fn(x0)
        return jnp.clip(x0, -1, 1) if clip_denoised else x0

    if diffusion.model_mean_type == "previous_x":
        pred_xstart = process_xstart(predict_xstart_from_xprev(diffusion, x, t, model_output))
        mean = model_output
    else:
        if diffusion.model_mean_type == "start_x":
            pred_xstart = process_xstart(model_output)
        else:
            pred_xstart = process_xstart(predict_xstart_from_eps(diffusion, x, t, model_output))
        mean, _, _ = q_posterior_mean_variance(diffusion, pred_xstart, x, t)
    return {
        "mean": mean,
        "variance": variance,
        "log_variance": log_variance,
        "pred_xstart": pred_xstart,
    }


def p_mean_variance(
    diffusion: Diffusion, model_fn, x, t, *, clip_denoised=True, channel_axis=-1, denoised_fn=None
):
    """Applies model_fn(x, timestep_map[t]) and returns `p_mean_variance_from_output`."""
    model_output = model_fn(x, model_timesteps(diffusion, t))
    return p_mean_variance_from_output(
        diffusion,
        model_output,
        x,
        t,
        clip_denoised=clip_denoised,
        channel_axis=channel_axis,
        denoised_fn=denoised_fn,
    )


def condition_mean(p_mean_var, gradient):
    """Classifier guidance for ancestral sampling: mu' = mu + Sigma g (ADM Algorithm 1).

    `gradient` is g = s * grad_x log p_phi(y | x_t, t), the guidance scale already applied.
    """
    return p_mean_var["mean"] + p_mean_var["variance"] * gradient


def condition_score(diffusion: Diffusion, p_mean_var, x, t, gradient):
    """Classifier guidance on the score: eps' = eps - sqrt(1 - abar_t) g (ADM eq. 14,
    Algorithm 2); x_0 and the mean are recomputed from eps'. Returns an updated copy of
    p_mean_var (variance unchanged). eps is re-derived from the (clipped) pred_xstart.
    """
    alpha_bar = extract(diffusion.alphas_cumprod, t, x)
    eps = predict_eps_from_xstart(diffusion, x, t, p_mean_var["pred_xstart"])
    eps = eps - jnp.sqrt(1 - alpha_bar) * gradient
    out = dict(p_mean_var)
    out["pred_xstart"] = predict_xstart_from_eps(diffusion, x, t, eps)
    out["mean"], _, _ = q_posterior_mean_variance(diffusion, out["pred_xstart"], x, t)
    return out
