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

from adm_jax.diffusion.samplers import classifier_guidance_grad
from adm_jax.diffusion.schedules import Diffusion

SKIP_TYPES = ("time_uniform", "logSNR", "time_quadratic")
# DPM-Solver's NoiseScheduleVP.numerical_clip_alpha: trailing steps whose half-log-SNR is below
# this go. UniPC's NoiseScheduleVP has no such clipping.
CLIPPED_LAMBDA = -5.1
THRESHOLDING_RATIO = 0.995
THRESHOLDING_MAX_VAL = 1.0


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


def dynamic_threshold(x0, ratio=THRESHOLDING_RATIO, max_val=THRESHOLDING_MAX_VAL):
    """Dynamic thresholding (Imagen, Saharia et al. 2022, sec. 2.3): s = max(ratio-quantile of
    |x_0| per example, max_val), x_0 <- clip(x_0, -s, s) / s; keeps guided x_0 in range."""
    flat = jnp.abs(x0).reshape(x0.shape[0], -1)
    s = jnp.maximum(jnp.quantile(flat, ratio, axis=1, method="linear"), max_val)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    return jnp.clip(x0, -s, s) / s


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
):
    """The solvers' data-prediction model (x, model_time, alpha_t, sigma_t) -> x_0.

    x_0 = (x_t - sigma_t eps') / alpha_t (DPM-Solver++ eq. 8 / UniPC's data prediction), with
    eps' = eps - sigma_t * classifier_scale * grad_x log p(y | x_t, t) when classifier_fn is
    given (ADM's classifier guidance on the score, the gradient taken by `jax.grad` where this
    is called: inside the solver's scan), and `dynamic_threshold` applied when thresholding.
    All examples share the step, so the scalar sigma_t applies to each example's gradient
    (uni_pc.py's model_wrapper broadcasts a (B,) sigma_t over the last image axis instead, a
    bug that only batch 1 escapes). The networks receive t = model_time as (B,) float32.
    """

    def predict(x, model_time, alpha, sigma):
        t = jnp.full((batch,), model_time, jnp.float32)
        eps = model_eps(model_fn(x, t), channels)
        if classifier_fn is not None:
            eps = eps - sigma * classifier_guidance_grad(classifier_fn, x, t, y, classifier_scale)
        x0 = (x - sigma * eps) / alpha
        return dynamic_threshold(x0) if thresholding else x0

    return predict


def check_inputs(x_T, classifier_fn, y):
    """x_T as float32 NHWC (one-line errors for a missing label or a non-batch x_T)."""
    if classifier_fn is not None and y is None:
        raise ValueError("y: classifier guidance needs the target labels")
    x_T = jnp.asarray(x_T, jnp.float32)
    if x_T.ndim < 2:
        raise ValueError(f"x_T: expected a batch of NHWC images, got shape {x_T.shape}")
    return x_T
