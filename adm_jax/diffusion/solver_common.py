"""What the ODE solvers (DPM-Solver++, UniPC) share: the discrete-time VP schedule read as a
continuous one (`NoiseScheduleVP('discrete', betas)` of dpm_solver_pytorch.py / uni_pc.py), the
solver time grid, and the data-prediction model wrapper (eps model, classifier guidance on
eps, dynamic thresholding).

Schedule quantities are float64 numpy, computed once per (static) plan; the traced arithmetic
of the solvers is float32.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from adm_jax.diffusion import guidance
from adm_jax.diffusion import start as start_lib
from adm_jax.diffusion.guidance import (  # noqa: F401  (importable from here as before)
    THRESHOLDING_MAX_VAL,
    THRESHOLDING_RATIO,
    dynamic_threshold,
)
from adm_jax.diffusion.samplers import classifier_guidance_grad
from adm_jax.diffusion.schedules import Diffusion

SKIP_TYPES = ("time_uniform", "logSNR", "time_quadratic")
# DPM-Solver's NoiseScheduleVP.numerical_clip_alpha: trailing steps whose half-log-SNR is below
# this go. UniPC's NoiseScheduleVP has no such clipping.
CLIPPED_LAMBDA = -5.1


def vp_log_alpha_table(betas, *, clip_low_lambda: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints (t_n, log alpha_n) of the discrete VP schedule, t_n = n / N, n = 1..N.

    log alpha_n = 0.5 * cumsum(log(1 - beta)), alpha being DPM-Solver's alpha (= sqrt(abar)).
    With clip_low_lambda (DPM-Solver's numerical_clip_alpha) the trailing entries with
    lambda < -5.1 are dropped (cosine schedules lose a few), which changes N and so every
    model time; UniPC keeps all N.
    """
    log_alphas = 0.5 * np.cumsum(np.log(1.0 - np.asarray(betas, np.float64)))
    if clip_low_lambda:
        lambdas = log_alphas - 0.5 * np.log(-np.expm1(2.0 * log_alphas))
        num_clipped = int(np.searchsorted(lambdas[::-1], CLIPPED_LAMBDA, side="left"))
        if num_clipped:
            log_alphas = log_alphas[:-num_clipped]
    total_n = log_alphas.shape[0]
    t_array = np.linspace(0.0, 1.0, total_n + 1, dtype=np.float64)[1:]
    return t_array, log_alphas


def _interpolate(x, xp, yp):
    """Piecewise-linear y(x) through (xp, yp), xp increasing, extrapolated linearly past both
    ends with the outermost segments (the reference's interpolate_fn)."""
    x = np.asarray(x, np.float64)
    idx = np.clip(np.searchsorted(xp, x, side="right") - 1, 0, len(xp) - 2)
    x0, x1, y0, y1 = xp[idx], xp[idx + 1], yp[idx], yp[idx + 1]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


def marginal_log_alpha(table, t):
    """log alpha(t), piecewise linear in t between the schedule's keypoints."""
    t_array, log_alphas = table
    return _interpolate(t, t_array, log_alphas)


def marginal_lambda(table, t):
    """Half-log-SNR lambda(t) = log alpha(t) - log sigma(t), sigma(t) = sqrt(1 - alpha(t)^2)."""
    log_alpha = marginal_log_alpha(table, t)
    return log_alpha - 0.5 * np.log(-np.expm1(2.0 * log_alpha))


def inverse_lambda(table, lamb):
    """t(lambda): log alpha = -0.5 log(1 + exp(-2 lambda)), then the schedule read backwards."""
    t_array, log_alphas = table
    log_alpha = -0.5 * np.logaddexp(0.0, -2.0 * np.asarray(lamb, np.float64))
    return _interpolate(log_alpha, log_alphas[::-1], t_array[::-1])


def time_steps(table, steps: int, skip_type: str) -> np.ndarray:
    """The steps + 1 solver times from t_T = 1 down to t_0 = 1/N (reference get_time_steps):
    uniform in t, uniform in lambda ("logSNR") or uniform in sqrt(t) ("time_quadratic")."""
    t_T, t_0 = 1.0, 1.0 / table[0].shape[0]
    if skip_type == "time_uniform":
        return np.linspace(t_T, t_0, steps + 1, dtype=np.float64)
    if skip_type == "time_quadratic":
        return np.linspace(np.sqrt(t_T), np.sqrt(t_0), steps + 1, dtype=np.float64) ** 2
    if skip_type == "logSNR":
        lambda_T, lambda_0 = marginal_lambda(table, t_T), marginal_lambda(table, t_0)
        return inverse_lambda(table, np.linspace(lambda_T, lambda_0, steps + 1))
    raise ValueError(f"skip_type: expected one of {SKIP_TYPES}, got {skip_type!r}")


def schedule_at(table, ts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(alpha, sigma, lambda) at times ts, float64: alpha = exp(log alpha(t)),
    sigma = sqrt(1 - alpha^2) (via expm1, exact near t = 0), lambda = log alpha - log sigma."""
    log_alphas = marginal_log_alpha(table, ts)
    alphas = np.exp(log_alphas)
    sigmas = np.sqrt(-np.expm1(2.0 * log_alphas))
    return alphas, sigmas, log_alphas - np.log(sigmas)


def model_input_times(ts, total_n: int) -> np.ndarray:
    """The float model time a network receives at solver time t: (t - 1/N) * 1000, float64
    (cast to float32 at the call)."""
    return (np.asarray(ts, np.float64) - 1.0 / total_n) * 1000.0


def base_betas(diffusion: Diffusion, solver: str = "DPM-Solver") -> np.ndarray:
    """The training schedule's betas; an ODE solver discretises its own time grid over them, so
    a respaced process (which keeps only abar on a subset) cannot serve."""
    n = diffusion.num_timesteps
    if not np.array_equal(diffusion.timestep_map, np.arange(n)):
        raise ValueError(
            f"diffusion: {solver} needs the unrespaced schedule, got one respaced to {n} steps "
            f"(create it with timestep_respacing='')"
        )
    return np.asarray(diffusion.betas, np.float64)


def validate_solver_args(steps, order, skip_type):
    """One-line errors for the options DPM-Solver++ and UniPC share."""
    if order not in (1, 2, 3):
        raise ValueError(f"order: expected 1, 2 or 3, got {order!r}")
    if not isinstance(steps, int) or steps < order:
        raise ValueError(f"steps: expected an int >= order ({order}), got {steps!r}")
    if skip_type not in SKIP_TYPES:
        raise ValueError(f"skip_type: expected one of {SKIP_TYPES}, got {skip_type!r}")


def model_eps(output, channels):
    """The eps part of a model output: all of it, or the first C of 2C channels (the rest is
    the learned variance, which an ODE solver does not use)."""
    if output.shape[-1] not in (channels, 2 * channels):
        raise ValueError(
            f"model_fn output: expected {channels} or {2 * channels} channels (NHWC), "
            f"got shape {output.shape}"
        )
    return output[..., :channels].astype(jnp.float32)


def data_prediction_fn(
    model_fn,
    *,
    batch: int,
    channels: int,
    classifier_fn=None,
    y=None,
    classifier_scale=0.0,
    thresholding: bool = False,
    denoised_fn=None,
    unguided_model_fn=None,
):
    """The solvers' data-prediction model (x, model_time, alpha_t, sigma_t, guided=None) -> x_0.

    x_0 = (x_t - sigma_t eps') / alpha_t (DPM-Solver++ eq. 8 / UniPC's data prediction), with
    eps' = eps - sigma_t * classifier_scale * grad_x log p(y | x_t, t) when classifier_fn is
    given (ADM's classifier guidance on the score, the gradient taken by `jax.grad` where this
    is called: inside the solver's scan), then denoised_fn(x_0) (`dynamic_threshold` when
    thresholding). guided (a traced scalar bool, or None = always): where False, the
    classifier is skipped and the model is unguided_model_fn (when given), by `lax.cond`.
    All examples share the step, so the scalar sigma_t applies to each example's gradient
    (uni_pc.py's model_wrapper broadcasts a (B,) sigma_t over the last image axis instead, a
    bug that only batch 1 escapes). The networks receive t = model_time as (B,) float32.
    """
    if thresholding:
        if denoised_fn is not None and denoised_fn is not dynamic_threshold:
            raise ValueError("thresholding, denoised_fn: pass at most one of them")
        denoised_fn = dynamic_threshold

    def predict(x, model_time, alpha, sigma, guided=None):
        t = jnp.full((batch,), model_time, jnp.float32)
        net = guidance.interval_model_fn(model_fn, unguided_model_fn, guided)
        eps = model_eps(net(x, t), channels)
        if classifier_fn is not None:
            grad = guidance.switch(
                guided,
                lambda: classifier_guidance_grad(classifier_fn, x, t, y, classifier_scale),
                lambda: jnp.zeros_like(x),
            )
            eps = eps - sigma * grad
        x0 = (x - sigma * eps) / alpha
        return x0 if denoised_fn is None else denoised_fn(x0)

    return predict


def guided_mask(plan, guidance_interval):
    """Per solver step: guidance on (lo < sigma_t / alpha_t <= hi, the VE sigma of the solver's
    own interpolated schedule at the step's time), or None without interval."""
    if guidance_interval is None:
        return None
    sigmas = np.asarray(plan["sigma"], np.float64) / np.asarray(plan["alpha"], np.float64)
    return jnp.asarray(guidance.interval_mask(sigmas, guidance_interval))


def start_point(plan, x_T, x_init, strength, steps):
    """SDEdit's start on a solver grid (see `adm_jax.diffusion.start`): per example the first
    step j0 = steps - ceil(strength * steps) and x = alpha_j0 x_init + sigma_j0 x_T (x_T when
    j0 = 0). Returns (x, j0), or (x_T, None) without x_init."""
    if x_init is None:
        return x_T, None
    x_init = jnp.asarray(x_init, jnp.float32)
    if x_init.shape != x_T.shape:
        raise ValueError(f"x_init: expected shape {x_T.shape}, got {x_init.shape}")
    n = start_lib.steps_to_run(start_lib.per_example(strength, x_T.shape[0]), steps)
    j0 = steps - n
    alpha = jnp.asarray(np.asarray(plan["alpha"], np.float32))[j0]
    sigma = jnp.asarray(np.asarray(plan["sigma"], np.float32))[j0]
    noised = start_lib.bcast(alpha, x_T) * x_init + start_lib.bcast(sigma, x_T) * x_T
    return jnp.where(start_lib.bcast(j0 == 0, x_T), x_T, noised), j0


def check_inputs(x_T, classifier_fn, y):
    """x_T as float32 NHWC (one-line errors for a missing label or a non-batch x_T)."""
    if classifier_fn is not None and y is None:
        raise ValueError("y: classifier guidance needs the target labels")
    x_T = jnp.asarray(x_T, jnp.float32)
    if x_T.ndim < 2:
        raise ValueError(f"x_T: expected a batch of NHWC images, got shape {x_T.shape}")
    return x_T
